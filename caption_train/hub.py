"""Say at once, in one line, why a hub id cannot be loaded now: the Hugging Face Hub is unreachable, or offline mode
is on and the model is not in the local cache.

    problem = hub_problem("Salesforce/blip-image-captioning-base")   # None, or the reason to put in a UserError
    if problem:
        raise UserError(f"--model_name_or_path Salesforce/blip-image-captioning-base: {problem}")

Without this, huggingface_hub retries every request on a connection error with exponential backoff (five rounds
per file, each printing "Retrying in Ns"), which costs half a minute to minutes before the first clear error.
One plain request to the hub's endpoint, through huggingface_hub's own HTTP client (so its proxy and TLS settings
apply) and without retries, tells the same thing at once (or after one timeout, where packets are dropped).
"""

from __future__ import annotations

import functools

OFFLINE_HINT = "HF_HUB_OFFLINE=1"


def hub_problem(repo_id: str) -> str | None:
    """Why `repo_id` cannot be loaded from the hub or the local cache right now, or None when loading may go ahead
    (the hub answers, or offline mode is on and the model is cached)."""
    from huggingface_hub import constants, is_offline_mode

    if is_offline_mode():
        if is_cached(repo_id):
            return None
        return (f"{OFFLINE_HINT} is set (local cache only) and {repo_id} is not in the local cache ({constants.HF_HUB_CACHE}); "
                "unset HF_HUB_OFFLINE to download it, or pass a local model folder")
    reason = unreachable_reason(constants.ENDPOINT)
    if reason is None:
        return None
    if is_cached(repo_id):
        return f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({reason}); {repo_id} is in the local cache: set {OFFLINE_HINT} to load it from there"
    return (f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({reason}) and {repo_id} is not in the local cache; "
            f"check your network or pass a local model folder ({OFFLINE_HINT} loads models from the local cache only)")


@functools.lru_cache(maxsize=None)
def unreachable_reason(endpoint: str) -> str | None:
    """None when `endpoint` answers one HTTP request (any status) within huggingface_hub's own timeout for metadata
    requests (HF_HUB_ETAG_TIMEOUT, 10 s by default), else why not. Asked once per process: a command asks for a
    config, a processor and weights, all from the same hub."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    # Any failure to get an answer means unreachable; huggingface_hub has changed HTTP libraries (requests, httpx,
    # httpx2) and their exception classes between versions, so no one library's class is named here.
    except Exception as err:  # noqa: BLE001
        text = str(err).strip()
        return text.splitlines()[0] if text else type(err).__name__
    return None


def is_cached(repo_id: str) -> bool:
    """Whether the model's config.json is in the local hub cache (what loading it offline needs first)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError is a ValueError)
        return False
