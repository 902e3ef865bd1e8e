"""The interactive page's message schema: every client message type accepted when right and refused when wrong,
with the original tool's `caption_new` / `caption_quality` shapes kept, and server messages that round-trip."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from caption_train.iterative import schema
from caption_train.iterative.schema import (
    MAX_CAPTION_CHARS, MAX_GENERATE_IMAGES, CaptionAccept, CaptionFine, CaptionGenerate, CaptionNew, CaptionQuality, Pause, Resume, Save,
    error_details, parse_client_message,
)

IMG = "0123456789abcdef"
IMG2 = "fedcba9876543210"


def parse(message: dict):
    return parse_client_message(json.dumps(message))


def rejected(message: dict | str) -> list[dict[str, str]]:
    """The error details of a message that must fail validation (fails the test if it validates)."""
    data = message if isinstance(message, str) else json.dumps(message)
    with pytest.raises(ValidationError) as info:
        parse_client_message(data)
    return error_details(info.value)


# ---------------------------------------------------------------------------------------------
# valid messages of every type


@pytest.mark.parametrize(
    "message, cls",
    [
        ({"req_from": "client", "type": "caption_new", "payload": {"image": IMG, "new_caption": "a man sitting in a chair"}}, CaptionNew),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": "a red circle", "previous": "a red square"}, "id": "r1"}, CaptionNew),
        ({"req_from": "client", "type": "caption_quality", "payload": {"image": IMG, "quality": 1}}, CaptionQuality),
        ({"type": "caption_quality", "payload": {"image": IMG, "quality": 5}}, CaptionQuality),
        ({"type": "caption_accept", "payload": {"image": IMG}}, CaptionAccept),
        ({"type": "caption_accept", "payload": {"image": IMG, "model_caption": "a blue square"}}, CaptionAccept),
        ({"type": "caption_generate", "payload": {"images": [IMG, IMG2]}}, CaptionGenerate),
        ({"type": "caption_fine", "payload": {"image": IMG}}, CaptionFine),
        ({"type": "caption_fine", "payload": {"image": IMG, "fine": False, "caption": "a red circle"}, "id": "f1"}, CaptionFine),
        ({"type": "pause", "payload": {}}, Pause),
        ({"type": "pause"}, Pause),
        ({"type": "resume", "payload": {}}, Resume),
        ({"type": "save", "payload": {}, "id": "save-1"}, Save),
    ],
)
def test_valid_messages_parse_to_their_type(message, cls):
    parsed = parse(message)
    assert type(parsed) is cls
    assert parsed.type == message["type"] and parsed.req_from == "client"
    assert parsed.id == message.get("id")


def test_original_message_shapes_are_kept():
    # The original tool's messages were {"req_from": "client", "type": "caption_new", "payload": {"new_caption": ...}}
    # and {"type": "caption_quality", "payload": {"quality": ...}}; they now also name the image.
    new = parse({"req_from": "client", "type": "caption_new", "payload": {"image": IMG, "new_caption": "hello new caption"}})
    assert new.payload.new_caption == "hello new caption" and new.payload.image == IMG
    quality = parse({"req_from": "client", "type": "caption_quality", "payload": {"image": IMG, "quality": 3}})
    assert quality.payload.quality == 3
    assert {"caption_new", "caption_quality"} <= set(schema.CLIENT_MESSAGE_TYPES)


def test_caption_is_normalized_to_one_line():
    parsed = parse({"type": "caption_new", "payload": {"image": IMG, "new_caption": "  a red\n\tcircle,  on   white \n"}})
    assert parsed.payload.new_caption == "a red circle, on white"


def test_limits_at_the_boundary():
    parse({"type": "caption_new", "payload": {"image": IMG, "new_caption": "x" * MAX_CAPTION_CHARS}})
    parse({"type": "caption_generate", "payload": {"images": [IMG] * MAX_GENERATE_IMAGES}})
    parse({"type": "caption_new", "payload": {"image": IMG, "new_caption": "a"}, "id": "i" * 64})


# ---------------------------------------------------------------------------------------------
# invalid messages of every type


@pytest.mark.parametrize(
    "message, where",
    [
        # envelope
        ({"payload": {"image": IMG, "new_caption": "a"}}, "(message)"),  # no type
        ({"type": "caption.new", "payload": {"image": IMG, "new_caption": "a"}}, "(message)"),  # the original test's typo
        ({"type": "hello", "payload": {}}, "(message)"),  # a server message type
        ({"type": "caption_new", "req_from": "training", "payload": {"image": IMG, "new_caption": "a"}}, "req_from"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": "a"}, "id": "i" * 65}, "id"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": "a"}, "id": 7}, "id"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": "a"}, "extra": 1}, "extra"),
        # caption_new
        ({"type": "caption_new", "payload": {"image": IMG}}, "payload.new_caption"),
        ({"type": "caption_new", "payload": {"new_caption": "a"}}, "payload.image"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": ""}}, "payload.new_caption"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": " \n\t "}}, "payload.new_caption"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": "x" * (MAX_CAPTION_CHARS + 1)}}, "payload.new_caption"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": 5}}, "payload.new_caption"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": ["a"]}}, "payload.new_caption"),
        ({"type": "caption_new", "payload": {"image": IMG, "new_caption": "a", "path": "x.txt"}}, "payload.path"),
        ({"type": "caption_new", "payload": "a red circle"}, "payload"),
        ({"type": "caption_new"}, "payload"),
        # image ids are opaque hex, never paths
        ({"type": "caption_new", "payload": {"image": "../../etc/passwd", "new_caption": "a"}}, "payload.image"),
        ({"type": "caption_new", "payload": {"image": "/etc/passwd", "new_caption": "a"}}, "payload.image"),
        ({"type": "caption_new", "payload": {"image": "%2e%2e%2fetc%2fpasswd", "new_caption": "a"}}, "payload.image"),
        ({"type": "caption_new", "payload": {"image": "part0/img_0000.png", "new_caption": "a"}}, "payload.image"),
        ({"type": "caption_new", "payload": {"image": IMG.upper(), "new_caption": "a"}}, "payload.image"),
        ({"type": "caption_new", "payload": {"image": IMG + "0", "new_caption": "a"}}, "payload.image"),
        ({"type": "caption_new", "payload": {"image": IMG + "\n", "new_caption": "a"}}, "payload.image"),
        # caption_quality
        ({"type": "caption_quality", "payload": {"image": IMG, "quality": 0}}, "payload.quality"),
        ({"type": "caption_quality", "payload": {"image": IMG, "quality": 6}}, "payload.quality"),
        ({"type": "caption_quality", "payload": {"image": IMG, "quality": -1}}, "payload.quality"),
        ({"type": "caption_quality", "payload": {"image": IMG, "quality": "3"}}, "payload.quality"),
        ({"type": "caption_quality", "payload": {"image": IMG, "quality": 3.5}}, "payload.quality"),
        ({"type": "caption_quality", "payload": {"image": IMG, "quality": True}}, "payload.quality"),
        ({"type": "caption_quality", "payload": {"image": IMG, "quality": None}}, "payload.quality"),
        ({"type": "caption_quality", "payload": {"image": IMG}}, "payload.quality"),
        ({"type": "caption_quality", "payload": {"quality": 1}}, "payload.image"),
        # caption_accept
        ({"type": "caption_accept", "payload": {}}, "payload.image"),
        ({"type": "caption_accept", "payload": {"image": IMG, "model_caption": ""}}, "payload.model_caption"),
        ({"type": "caption_accept", "payload": {"image": IMG, "new_caption": "a"}}, "payload.new_caption"),
        # caption_generate
        ({"type": "caption_generate", "payload": {"images": []}}, "payload.images"),
        ({"type": "caption_generate", "payload": {"images": [IMG] * (MAX_GENERATE_IMAGES + 1)}}, "payload.images"),
        ({"type": "caption_generate", "payload": {"images": IMG}}, "payload.images"),
        ({"type": "caption_generate", "payload": {"images": ["../x"]}}, "payload.images.0"),
        ({"type": "caption_generate", "payload": {}}, "payload.images"),
        # caption_fine
        ({"type": "caption_fine", "payload": {}}, "payload.image"),
        ({"type": "caption_fine", "payload": {"image": IMG, "fine": "yes"}}, "payload.fine"),
        ({"type": "caption_fine", "payload": {"image": IMG, "fine": 1}}, "payload.fine"),
        ({"type": "caption_fine", "payload": {"image": IMG, "caption": "x" * (MAX_CAPTION_CHARS + 1)}}, "payload.caption"),
        ({"type": "caption_fine", "payload": {"image": "../x"}}, "payload.image"),
        # pause / resume / save take no arguments
        ({"type": "pause", "payload": {"seconds": 5}}, "payload.seconds"),
        ({"type": "resume", "payload": {"now": True}}, "payload.now"),
        ({"type": "save", "payload": {"name": "../../evil"}}, "payload.name"),
        ({"type": "save", "payload": []}, "payload"),
    ],
)
def test_invalid_messages_are_rejected_with_a_location(message, where):
    details = rejected(message)
    locations = [d["loc"] for d in details]
    # The location names the tagged union member first (e.g. "caption_new.payload.image"), then the field.
    assert any(loc == where or loc.endswith("." + where) or loc.endswith(where) for loc in locations), details
    assert all(set(d) == {"loc", "msg"} for d in details)  # the offending input is never echoed back


@pytest.mark.parametrize("text", ["", "{", "[]", "null", "42", '"caption_new"', "\xff\xfe", '{"type": "caption_new", "payload": {"image": "' + IMG + '", "new_caption": "a"}} trailing'])
def test_non_object_or_broken_json_is_rejected(text):
    rejected(text)


def test_error_details_never_echo_large_input():
    details = rejected({"type": "caption_new", "payload": {"image": IMG, "new_caption": "y" * 50_000}})
    assert len(json.dumps(details)) < 1000


# ---------------------------------------------------------------------------------------------
# server -> page


def test_server_messages_round_trip_and_are_strict():
    status = schema.Status(mode="training", state="running", epoch=1, epochs=3, step=2, total_steps=18, loss=1.5, lr=1e-4)
    text = schema.server_message("status", status)
    data = json.loads(text)
    assert data["req_from"] == "server" and data["type"] == "status" and data["payload"]["step"] == 2
    info = schema.ImageInfo(id=IMG, path="a/b.png", caption="a red circle", modified=True, rating=1, excluded=True,
                            model_caption=schema.ModelCaption(text="a red square", step=4))
    assert json.loads(schema.server_message("caption_updated", info))["payload"]["model_caption"] == {"text": "a red square", "step": 4}
    # A loss that went non-finite is sent as null (JSON has no NaN), the rest as numbers.
    loss = schema.LossInfo(epochs=[1, 2], losses=[1.5, float("nan")], same_caption_from=0, down=False, fixed=False, fine=False, rank=1)
    sent = json.loads(schema.server_message("caption_updated", info.model_copy(update={"loss": loss})))["payload"]["loss"]
    assert sent["losses"] == [1.5, None] and sent["rank"] == 1
    error = json.loads(schema.error_message("conflict", "changed", request_id="r9"))
    assert error == {"req_from": "server", "type": "error", "id": "r9", "payload": {"code": "conflict", "message": "changed", "details": []}}
    with pytest.raises(ValidationError):
        schema.Status(mode="training", state="sleeping")
    with pytest.raises(ValidationError):
        schema.ImageInfo(id="../x", path="p", caption="c", modified=False)
    with pytest.raises(ValidationError):
        schema.ImageInfo(id=IMG, path="p", caption="c", modified=False, rating=7)
    with pytest.raises(ValidationError):
        schema.ErrorPayload(code="teapot", message="x")
    with pytest.raises(ValidationError):
        schema.ServerMessage(type="caption_new", payload=status)
