"""Model families behind one registry, chosen from the model's own config (`model_type`), never its name.

    family, config = resolve_family("Salesforce/blip-image-captioning-base")
    model, processor = family.load("Salesforce/blip-image-captioning-base", overrides={})

A family module (one per model family, `blip.py` first) subclasses `ModelFamily` and decorates it with
`@register`. Importing this package imports every family module so the registry is complete.
"""

from caption_train.models.base import ModelFamily, family_for_model_type, register, registered_families, resolve_family
from caption_train.models import blip  # noqa: F401  (registers itself)
from caption_train.models import blip2, florence2, git, paligemma  # noqa: F401  (register themselves)
# The generic chat-VLM family takes the image-text-to-text model types no family above registered.
from caption_train.models import chat_vlm  # noqa: F401

__all__ = ["ModelFamily", "family_for_model_type", "register", "registered_families", "resolve_family"]
