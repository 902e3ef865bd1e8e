"""The messages between the interactive page and the server, validated with pydantic (strict: no coercion).

    message = parse_client_message(b'{"type": "caption_quality", "payload": {"image": "0123456789abcdef", "quality": 5}}')
    reply = ServerMessage(type="error", payload=ErrorPayload(code="invalid_message", message="...")).model_dump_json()

Every message is one JSON object `{"req_from", "type", "payload", "id"}`. The page sends `req_from: "client"`
(the default) and may add an `id` that the server's `ack` / `error` reply echoes. Types the page sends:

    caption_new        {image, new_caption, previous?}   write new_caption to the image's .txt (previous: the text
                                                          the person was editing; a mismatch is a `conflict` error)
    caption_quality    {image, quality: 1..5}             rate the caption; 1 excludes the image until re-rated
    caption_accept     {image, model_caption?}            the model's latest caption becomes the caption
    caption_generate   {images: [id, ...]}                caption these images now with the current weights
    caption_fine       {image, fine?, caption?}           the caption is fine (fine: false takes it back): the image
                                                          leaves the review queue while its caption stays this text
                                                          (caption: the text the person judged; a mismatch is a
                                                          `conflict` error)
    pause, resume, save  {}                               training only; save = write step-N/ now

`caption_new` and `caption_quality` keep the original tool's names and payload fields (`new_caption`, `quality`),
now with the image they are about. Images are named by the opaque ids the server hands out, never by a path.
Server messages carry `req_from: "server"`: hello, status, caption_updated, model_captions, saved, ack, error.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError

MAX_CAPTION_CHARS = 2000  # far above BLIP's token limit; a longer "caption" is a paste accident
MAX_GENERATE_IMAGES = 32  # per caption_generate message
MAX_REQUEST_ID_CHARS = 64
IMAGE_ID_PATTERN = r"^[0-9a-f]{16}$"


def normalize_caption_text(text: str) -> str:
    """One line, as the trainer reads captions: whitespace runs (newlines too) collapse to one space."""
    normalized = " ".join(text.split())
    if not normalized:
        raise ValueError("caption is empty")
    return normalized


ImageId = Annotated[str, StringConstraints(pattern=IMAGE_ID_PATTERN)]
Caption = Annotated[str, StringConstraints(max_length=MAX_CAPTION_CHARS), AfterValidator(normalize_caption_text)]
AnyText = Annotated[str, StringConstraints(max_length=MAX_CAPTION_CHARS)]
Quality = Annotated[int, Field(ge=1, le=5)]
RequestId = Annotated[str, StringConstraints(max_length=MAX_REQUEST_ID_CHARS)]


class _Model(BaseModel):
    # strict: "3" is not a quality and true is not an int; forbid: a misspelled field is an error, not ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


# ---------------------------------------------------------------------------------------------
# Page -> server


class _ClientMessage(_Model):
    req_from: Literal["client"] = "client"
    id: RequestId | None = None


class CaptionNewPayload(_Model):
    image: ImageId
    new_caption: Caption
    previous: AnyText | None = None


class CaptionQualityPayload(_Model):
    image: ImageId
    quality: Quality


class CaptionAcceptPayload(_Model):
    image: ImageId
    model_caption: Caption | None = None


class CaptionFinePayload(_Model):
    image: ImageId
    fine: bool = True
    caption: AnyText | None = None


class CaptionGeneratePayload(_Model):
    images: Annotated[list[ImageId], Field(min_length=1, max_length=MAX_GENERATE_IMAGES)]


class EmptyPayload(_Model):
    pass


class CaptionNew(_ClientMessage):
    type: Literal["caption_new"]
    payload: CaptionNewPayload


class CaptionQuality(_ClientMessage):
    type: Literal["caption_quality"]
    payload: CaptionQualityPayload


class CaptionAccept(_ClientMessage):
    type: Literal["caption_accept"]
    payload: CaptionAcceptPayload


class CaptionGenerate(_ClientMessage):
    type: Literal["caption_generate"]
    payload: CaptionGeneratePayload


class CaptionFine(_ClientMessage):
    type: Literal["caption_fine"]
    payload: CaptionFinePayload


class Pause(_ClientMessage):
    type: Literal["pause"]
    payload: EmptyPayload = EmptyPayload()


class Resume(_ClientMessage):
    type: Literal["resume"]
    payload: EmptyPayload = EmptyPayload()


class Save(_ClientMessage):
    type: Literal["save"]
    payload: EmptyPayload = EmptyPayload()


ClientMessage = Annotated[
    Union[CaptionNew, CaptionQuality, CaptionAccept, CaptionGenerate, CaptionFine, Pause, Resume, Save],
    Field(discriminator="type"),
]
CLIENT_MESSAGE_TYPES = ("caption_new", "caption_quality", "caption_accept", "caption_generate", "caption_fine", "pause", "resume", "save")
_CLIENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(ClientMessage)


def parse_client_message(data: str | bytes) -> CaptionNew | CaptionQuality | CaptionAccept | CaptionGenerate | CaptionFine | Pause | Resume | Save:
    """Validate one JSON message from the page; raises pydantic.ValidationError (see `error_details`)."""
    return _CLIENT_ADAPTER.validate_json(data)


def error_details(error: ValidationError) -> list[dict[str, str]]:
    """pydantic's errors without the offending input (which may be huge), as [{"loc": "payload.quality", "msg": ...}]."""
    return [{"loc": ".".join(str(part) for part in item["loc"]) or "(message)", "msg": item["msg"]} for item in error.errors()[:20]]


# ---------------------------------------------------------------------------------------------
# Server -> page


class ModelCaption(_Model):
    text: str
    step: int | None = None  # optimizer step of the weights that wrote it (None in review mode)


class LossInfo(_Model):
    """An image's caption loss per epoch (from the run's sample_losses) and its place in the review queue."""

    epochs: list[int]  # every epoch with a loss, oldest first
    losses: list[float]  # the loss of each (non-finite ones are sent as null)
    same_caption_from: int  # index of the first loss measured on the latest loss's caption text (earlier: older text)
    down: bool | None  # that text's loss went down from its first epoch to its latest (None: one epoch of it)
    fixed: bool  # the caption changed since the latest loss: out of the queue until its next loss is in
    fine: bool  # marked fine for the caption it has now: out of the queue
    rank: int | None  # 1-based place in the review queue; None when not in it


class ImageInfo(_Model):
    id: ImageId
    path: str  # relative to the dataset folder, for display and search only: never accepted back
    caption: str  # the caption training uses now
    modified: bool  # changed from this page (this run, or this review state folder)
    rating: Quality | None = None
    excluded: bool = False  # rating 1: left out of training until re-rated
    probe: bool = False  # one of the trainer's fixed sample images
    model_caption: ModelCaption | None = None
    loss: LossInfo | None = None  # None: no loss recorded for this image (yet)


class Status(_Model):
    mode: Literal["training", "review"]
    state: Literal["starting", "running", "paused", "finished", "idle"]
    pause_requested: bool = False
    epoch: int = 0  # 1-based epoch in progress (0 before the first step)
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    lr: float | None = None
    val_loss: float | None = None
    images: int = 0
    modified: int = 0
    rated: int = 0
    excluded: int = 0
    gold: int = 0
    pending_captions: int = 0
    loss_epoch: int = 0  # the latest epoch with per-image losses (0: none yet)
    ranked: int = 0  # images shown that have a loss
    suspects: int = 0  # images in the review queue now
    model: str | None = None  # review mode: the model captioning, if any
    can_generate: bool = False


class Hello(_Model):
    status: Status
    probe: list[ImageId]
    limits: dict[str, int]


class ModelCaptions(_Model):
    captions: list[ImageInfo]


class Saved(_Model):
    path: str
    step: int


class Ack(_Model):
    request: str
    detail: dict[str, Any] = {}


class ErrorPayload(_Model):
    code: Literal[
        "invalid_json", "invalid_message", "unknown_image", "conflict", "not_writable", "unavailable",
        "busy", "unauthorized", "forbidden", "too_large", "not_found", "internal",
    ]
    message: str
    details: list[dict[str, str]] = []


class ServerMessage(_Model):
    req_from: Literal["server"] = "server"
    type: Literal["hello", "status", "caption_updated", "model_captions", "saved", "ack", "error"]
    id: RequestId | None = None
    payload: Hello | Status | ImageInfo | ModelCaptions | Saved | Ack | ErrorPayload


def server_message(kind: str, payload: _Model, request_id: str | None = None) -> str:
    """One server message as JSON text."""
    return ServerMessage(type=kind, payload=payload, id=request_id).model_dump_json()  # type: ignore[arg-type]


def error_message(code: str, message: str, *, details: list[dict[str, str]] | None = None, request_id: str | None = None) -> str:
    return server_message("error", ErrorPayload(code=code, message=message, details=details or []), request_id)  # type: ignore[arg-type]
