"""Dataset scanning, image loading in every mode, the CaptionDataset and the validation split."""

import collections
import hashlib
import io
import json
import logging
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from caption_train.data.captions import CaptionTransform
from caption_train.data.dataset import CaptionDataset, drop_failed
from caption_train.data.images import ImageLoadError, load_rgb, probe_image
from caption_train.data.scan import Sample, ScanResult, scan_dataset, split_validation
from caption_train.errors import UserError


def save_image(path, mode="RGB", size=(8, 8), color=(200, 30, 30), **save_kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save_kwargs)
    return path


def write_caption(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)


def image_info(path, attribute):
    with Image.open(path) as image:
        return getattr(image, attribute)


def tree_digest(root):
    """Every file and directory under root with a hash of its contents, to prove nothing was written."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            entries[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            full = os.path.join(dirpath, name)
            digest = hashlib.sha256(Path(full).read_bytes()).hexdigest()
            entries[os.path.relpath(full, root)] = (digest, os.stat(full).st_mtime_ns)
    return entries


@pytest.fixture
def messy_dataset(tmp_path):
    root = tmp_path / "ds"
    save_image(root / "a.png")
    write_caption(root / "a.txt", "a red\n square,\t  small  \n")
    save_image(root / "sub" / "deeper" / "B.JPG", color=(10, 200, 10))
    write_caption(root / "sub" / "deeper" / "B.txt", "green square")
    save_image(root / "sub" / "c.PnG")
    write_caption(root / "sub" / "c.txt", "\ufeffbom caption", encoding="utf-8")
    save_image(root / "sub" / "d.webp")  # missing caption
    save_image(root / "e.bmp")
    write_caption(root / "e.txt", "  \n\t ")  # empty caption
    save_image(root / "f.jpeg")
    write_caption(root / "f.txt", "caf\xe9", encoding="latin-1")  # not UTF-8
    (root / "g.jpg").write_text("I am not an image")
    write_caption(root / "g.txt", "fake")
    (root / "h.png").write_bytes(b"")
    write_caption(root / "h.txt", "empty file")
    (root / "notes.txt").write_text("not a sidecar")
    (root / ".hidden").mkdir()
    save_image(root / ".hidden" / "x.png")
    write_caption(root / ".hidden" / "x.txt", "hidden")
    return root


# ---------------------------------------------------------------------------- scan


def test_scan_nested_tree_with_every_skip_reason(messy_dataset):
    result = scan_dataset(messy_dataset)
    rel = [s.image_path.relative_to(messy_dataset).as_posix() for s in result.samples]
    assert rel == ["a.png", "sub/c.PnG", "sub/deeper/B.JPG"]
    captions = {s.image_path.name: s.caption for s in result.samples}
    assert captions == {"a.png": "a red square, small", "c.PnG": "bom caption", "B.JPG": "green square"}
    assert result.skipped == {
        "missing caption": 1,
        "empty caption": 1,
        "caption not UTF-8": 1,
        "unreadable image": 2,
    }
    summary = result.summary()
    assert "\n" not in summary
    assert summary.startswith(f"dataset {messy_dataset}: 3 images with captions; skipped 5 (")
    assert "2 unreadable image" in summary and "1 missing caption" in summary and "1 caption not UTF-8" in summary


def test_scan_without_probe_keeps_broken_images(messy_dataset):
    result = scan_dataset(messy_dataset, probe=False)
    assert {s.image_path.name for s in result.samples} == {"a.png", "c.PnG", "B.JPG", "g.jpg", "h.png"}


def test_summary_without_skips():
    result = ScanResult(root="/x", samples=[Sample("/x/a.png", "a")] * 2, skipped=collections.Counter())
    assert result.summary() == "dataset /x: 2 images with captions"


def test_metadata_jsonl_with_sidecar_precedence(tmp_path):
    root = tmp_path / "ds"
    save_image(root / "one.png")
    write_caption(root / "one.txt", "from sidecar")
    save_image(root / "sub" / "two.png")
    save_image(root / "three.png")
    save_image(root / "four.png")
    lines = [
        json.dumps({"file_name": "one.png", "text": "from metadata"}),
        json.dumps({"file_name": "./sub/two.png", "text": "two  from\nmetadata"}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"file_name": "three.png"}),
        "",
        json.dumps({"file_name": "four.png", "text": "   "}),
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    result = scan_dataset(root)
    captions = {s.image_path.name: s.caption for s in result.samples}
    assert captions == {"one.png": "from sidecar", "two.png": "two from metadata"}
    assert result.skipped == {"bad metadata line": 3, "missing caption": 1, "empty caption": 1}


def test_scan_order_is_sorted_regardless_of_creation_order(tmp_path):
    root = tmp_path / "ds"
    names = [f"d{i:02d}" for i in range(20)]
    for name in reversed(names):
        save_image(root / name / "z.png")
        write_caption(root / name / "z.txt", name)
        save_image(root / name / "a.png")
        write_caption(root / name / "a.txt", name)
    result = scan_dataset(root)
    assert [s.image_path.relative_to(root).as_posix() for s in result.samples] == [
        f"{name}/{file}" for name in names for file in ("a.png", "z.png")
    ]


def test_scan_does_not_follow_symlinked_directory_loops(tmp_path):
    root = tmp_path / "ds"
    save_image(root / "a.png")
    write_caption(root / "a.txt", "a")
    try:
        os.symlink(root, root / "loop", target_is_directory=True)
    except OSError:
        pytest.skip("symlinks not available")
    assert [s.image_path.name for s in scan_dataset(root).samples] == ["a.png"]


def test_scan_missing_dir(tmp_path):
    with pytest.raises(UserError, match="no such directory") as info:
        scan_dataset(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)


def test_scan_file_as_dir(tmp_path):
    file = tmp_path / "file.png"
    save_image(file)
    with pytest.raises(UserError, match="not a directory"):
        scan_dataset(file)


def test_scan_no_pairs_explains_layout(tmp_path):
    root = tmp_path / "ds"
    save_image(root / "a.png")
    save_image(root / "b.png")
    with pytest.raises(UserError) as info:
        scan_dataset(root)
    message = str(info.value)
    assert "found 2 images" in message and "2 missing caption" in message
    assert "img.png + img.txt" in message and "\n" not in message


def test_scan_empty_dir(tmp_path):
    with pytest.raises(UserError, match=r"found no images; caption-train reads \.bmp \.jpeg \.jpg \.png \.webp\)"):
        scan_dataset(tmp_path)


def test_scan_and_iteration_leave_dataset_untouched(messy_dataset):
    (messy_dataset / "sub" / "broken.png").write_bytes(truncated_png_bytes())
    write_caption(messy_dataset / "sub" / "broken.txt", "broken")
    before = tree_digest(messy_dataset)
    result = scan_dataset(messy_dataset)
    dataset = CaptionDataset(result.samples, CaptionTransform(shuffle=True, dropout=0.5), random_flip=0.5)
    for epoch in range(2):
        dataset.set_epoch(epoch)
        items = [dataset[i] for i in range(len(dataset))]
    assert sum(item is None for item in items) == 1  # the truncated png passes the probe, fails on load
    assert tree_digest(messy_dataset) == before


# ---------------------------------------------------------------------------- load_rgb / probe_image


def test_load_rgb_palette_with_transparency_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    image.putpixel((0, 0), 1)
    image.save(tmp_path / "p.png", transparency=0)
    image.save(tmp_path / "p.gif", transparency=0)
    for name in ("p.png", "p.gif"):
        rgb = load_rgb(tmp_path / name)
        assert rgb.mode == "RGB"
        assert rgb.getpixel((0, 0)) == (255, 0, 0)
        assert rgb.getpixel((1, 1)) == (255, 255, 255), name


def test_load_rgb_rgba_composites_on_white(tmp_path):
    image = Image.new("RGBA", (2, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (0, 0, 255, 128))
    image.save(tmp_path / "a.png")
    rgb = load_rgb(tmp_path / "a.png")
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    r, g, b = rgb.getpixel((1, 0))
    assert abs(r - 127) <= 2 and abs(g - 127) <= 2 and b == 255


def test_load_rgb_la_composites_on_white(tmp_path):
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (0, 255))
    image.save(tmp_path / "la.png")
    rgb = load_rgb(tmp_path / "la.png")
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize(
    "mode, color, expected",
    [("L", 77, (77, 77, 77)), ("1", 1, (255, 255, 255)), ("1", 0, (0, 0, 0)), ("RGB", (1, 2, 3), (1, 2, 3))],
)
def test_load_rgb_simple_modes(tmp_path, mode, color, expected):
    save_image(tmp_path / "x.png", mode=mode, color=color)
    rgb = load_rgb(tmp_path / "x.png")
    assert rgb.mode == "RGB" and rgb.getpixel((3, 3)) == expected


def test_load_rgb_cmyk_jpeg(tmp_path):
    save_image(tmp_path / "c.jpg", mode="CMYK", color=(0, 255, 255, 0), quality=100)
    assert image_info(tmp_path / "c.jpg", "mode") == "CMYK"
    r, g, b = load_rgb(tmp_path / "c.jpg").getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_load_rgb_16bit_png_scaled_not_clipped(tmp_path):
    image = Image.new("I;16", (4, 1), 0)
    for x, value in enumerate([0, 128 * 257, 1000, 65535]):
        image.putpixel((x, 0), value)
    image.save(tmp_path / "g16.png")
    assert image_info(tmp_path / "g16.png", "mode") in ("I;16", "I")
    rgb = load_rgb(tmp_path / "g16.png")
    assert [rgb.getpixel((x, 0))[0] for x in range(4)] == [0, 128, 4, 255]


def test_load_rgb_float_and_big_endian_16bit(tmp_path):
    from caption_train.data.images import to_rgb

    assert to_rgb(Image.new("F", (1, 1), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(Image.new("I;16B", (1, 1), 65535)).getpixel((0, 0)) == (255, 255, 255)


def test_load_rgb_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert image_info(tmp_path / "r.jpg", "size") == (16, 8)
    assert load_rgb(tmp_path / "r.jpg").size == (8, 16)


def test_load_rgb_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert image_info(tmp_path / "anim.gif", "n_frames") == 2
    assert load_rgb(tmp_path / "anim.gif").getpixel((1, 1)) == (255, 0, 0)


def truncated_png_bytes():
    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    data = buffer.getvalue()
    return data[: len(data) // 2]


def test_load_rgb_truncated_png_raises(tmp_path):
    path = tmp_path / "t.png"
    path.write_bytes(truncated_png_bytes())
    assert probe_image(path) is None  # the header is fine
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert info.value.path == path and "t.png" in str(info.value)
    assert not isinstance(info.value, UserError)


def test_load_rgb_not_an_image(tmp_path):
    (tmp_path / "x.jpg").write_text("hello")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_rgb(tmp_path / "x.jpg")
    with pytest.raises(ImageLoadError):
        load_rgb(tmp_path / "missing.png")


def test_probe_image_reasons(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    save_image(tmp_path / "png_named.jpg", format="PNG")
    assert probe_image(tmp_path / "zero.png") == "empty file"
    assert "not an image" in probe_image(tmp_path / "text.jpg")
    assert probe_image(tmp_path / "png_named.jpg") is None
    assert probe_image(tmp_path / "missing.png") is not None


@pytest.mark.parametrize("limit", [10, 5])  # 16 pixels: warning zone (10) and error zone (5 -> > 2x)
def test_decompression_bomb_is_an_error(tmp_path, monkeypatch, limit):
    save_image(tmp_path / "big.png", size=(4, 4))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageLoadError, match="too large"):
        load_rgb(tmp_path / "big.png")
    assert probe_image(tmp_path / "big.png").startswith("too large")


# ---------------------------------------------------------------------------- CaptionDataset


def make_samples(tmp_path, n=6):
    samples = []
    for i in range(n):
        image = Image.new("RGB", (4, 2), (0, 0, 0))
        image.putpixel((0, 0), (255, 255, 255))  # marks the left edge, to detect flips
        path = tmp_path / f"{i}.png"
        image.save(path)
        samples.append(Sample(path, "first, b, c, d, e, f, g"))
    return samples


def test_dataset_items_and_set_epoch(tmp_path):
    samples = make_samples(tmp_path)
    dataset = CaptionDataset(samples, CaptionTransform(shuffle=True, frozen_parts=1), seed=3)
    assert len(dataset) == 6
    image, caption, path, _ = dataset[0]
    assert image.mode == "RGB" and path == str(samples[0].image_path)
    assert caption.startswith("first, ") and sorted(caption.split(", ")) == sorted(samples[0].caption.split(", "))
    epoch0 = [dataset[i][1] for i in range(6)]
    assert epoch0 == [dataset[i][1] for i in range(6)]  # repeatable
    dataset.set_epoch(1)
    epoch1 = [dataset[i][1] for i in range(6)]
    assert epoch1 != epoch0
    other_seed = CaptionDataset(samples, CaptionTransform(shuffle=True, frozen_parts=1), seed=4)
    assert [other_seed[i][1] for i in range(6)] != epoch0


def test_dataset_flip_off_by_default_and_on_when_asked(tmp_path):
    samples = make_samples(tmp_path)
    plain = CaptionDataset(samples)
    for epoch in range(5):
        plain.set_epoch(epoch)
        assert all(plain[i][0].getpixel((0, 0)) == (255, 255, 255) for i in range(6))
        assert all(plain[i][1] == samples[i].caption for i in range(6))
    always = CaptionDataset(samples, random_flip=1.0)
    assert always[0][0].getpixel((3, 0)) == (255, 255, 255)
    half = CaptionDataset(make_samples(tmp_path, n=40), random_flip=0.5)
    flipped = sum(half[i][0].getpixel((3, 0)) == (255, 255, 255) for i in range(40))
    assert 8 < flipped < 32
    with pytest.raises(ValueError):
        CaptionDataset(samples, random_flip=2)


def test_dataset_corrupt_image_returns_none_and_warns_once(tmp_path, caplog):
    samples = make_samples(tmp_path, n=2)
    samples[1].image_path.write_bytes(truncated_png_bytes())
    dataset = CaptionDataset(samples)
    with caplog.at_level(logging.WARNING, logger="caption_train.data.dataset"):
        items = [dataset[i] for i in (0, 1, 1, 1)]
    assert items[1:] == [None, None, None]
    warnings = [r for r in caplog.records if r.name == "caption_train.data.dataset"]
    assert len(warnings) == 1 and "1.png" in warnings[0].getMessage()
    assert drop_failed(items) == [items[0]]
    assert drop_failed([None, None]) == []


# ---------------------------------------------------------------------------- split_validation


def fake_samples(n):
    return [Sample(Path(f"/d/{i}.png"), str(i)) for i in range(n)]


def test_split_validation_zero_fraction():
    samples = fake_samples(5)
    assert split_validation(samples, 0, seed=1) == (samples, [])
    assert split_validation(fake_samples(1), 0.0, seed=1) == (fake_samples(1), [])


@pytest.mark.parametrize("n, fraction, n_val", [(2, 0.01, 1), (2, 0.9, 1), (100, 0.1, 10), (10, 0.5, 5), (3, 0.99, 2)])
def test_split_validation_bounds(n, fraction, n_val):
    samples = fake_samples(n)
    train, val = split_validation(samples, fraction, seed=0)
    assert len(val) == n_val and len(train) == n - n_val
    assert sorted(train + val, key=lambda s: int(s.caption)) == samples


def test_split_validation_deterministic_and_order_independent():
    samples = fake_samples(50)
    train, val = split_validation(samples, 0.2, seed=5)
    assert split_validation(samples, 0.2, seed=5) == (train, val)
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_validation(shuffled, 0.2, seed=5)[1]) == set(val)
    assert set(split_validation(samples, 0.2, seed=6)[1]) != set(val)


def test_split_validation_errors():
    with pytest.raises(UserError, match="at least 2"):
        split_validation(fake_samples(1), 0.1, seed=0)
    with pytest.raises(UserError):
        split_validation(fake_samples(5), 1.0, seed=0)
    with pytest.raises(UserError):
        split_validation(fake_samples(5), -0.1, seed=0)


# ---------------------------------------------------------------------------- start-up scan: spot check, messages


def test_no_pairs_message_lists_the_extensions_found(tmp_path):
    root = tmp_path / "ds"
    save_image(root / "a.png")
    save_image(root / "sub" / "b.JPG")
    with pytest.raises(UserError) as info:
        scan_dataset(root)
    assert "found 2 images (.jpg .png); skipped 2 missing captions)" in str(info.value)
    save_image(tmp_path / "one" / "c.webp")
    with pytest.raises(UserError, match=r"found 1 image \(\.webp\); skipped 1 missing caption\)"):
        scan_dataset(tmp_path / "one")


def test_summary_says_image_for_one():
    result = ScanResult(root="/x", samples=[Sample("/x/a.png", "a")], skipped=collections.Counter())
    assert result.summary() == "dataset /x: 1 image with captions"


def broken_and_good(root, good, broken):
    """`good` readable and `broken` unreadable (text named .png) images, all captioned, named so that they sort in
    the order given: (kind, index) pairs in a list."""
    for i, kind in enumerate(["good"] * good + ["broken"] * broken):
        path = root / f"{i:02d}_{kind}.png"
        if kind == "good":
            save_image(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not an image")
        write_caption(path.with_suffix(".txt"), f"caption {i}")


def test_spot_check_probes_at_most_n_evenly_spaced_images(tmp_path):
    root = tmp_path / "ds"
    broken_and_good(root, good=6, broken=2)  # 00..05 good, 06 and 07 broken
    # 8 images, at most 4 checked: every second one (00 02 04 06): 06 is caught, 07 is left to the loader.
    result = scan_dataset(root, probe=False, spot_check=4)
    assert [p.name for p, _ in result.problems] == ["06_broken.png"] and result.skipped == {"unreadable image": 1}
    assert [s.image_path.name for s in result.samples][-1] == "07_broken.png" and not result.probed
    # A dataset no bigger than the spot check is probed in full, like probe=True.
    full = scan_dataset(root, probe=False, spot_check=8)
    assert full.probed and full.skipped == {"unreadable image": 2} and len(full.samples) == 6
    # Without a spot check no image is opened at all.
    assert len(scan_dataset(root, probe=False).samples) == 8


def test_spot_check_fails_when_every_checked_image_is_broken(tmp_path):
    root = tmp_path / "ds"
    broken_and_good(root, good=0, broken=6)
    with pytest.raises(UserError, match=r"none of the 3 images checked can be read \(e\.g\. .*00_broken\.png: not an image"):
        scan_dataset(root, probe=False, spot_check=3)
    with pytest.raises(UserError, match="no usable image"):  # all of them checked: nothing left
        scan_dataset(root, probe=False, spot_check=10)


# ---------------------------------------------------------------------------- kohya repeat folders


@pytest.mark.parametrize("name, repeats", [
    ("30_mystyle", 30), ("10_extra", 10), ("1_once", 1), ("007_bond", 7), ("5_a_b", 5),
    ("mystyle", None), ("30", None), ("30mystyle", None), ("v2_style", None), ("0_none", None), ("_x", None),
    ("\u0663_arabic_digit", None), ("-3_neg", None),
])
def test_repeat_count_follows_kohya(name, repeats):
    from caption_train.data.scan import repeat_count

    assert repeat_count(name) == repeats


@pytest.fixture
def repeat_dataset(tmp_path):
    root = tmp_path / "ds"
    for rel in ["30_mystyle/a.png", "30_mystyle/deeper/b.png", "10_extra/c.png", "plain/d.png", "plain/5_nested/e.png", "f.png"]:
        save_image(root / rel)
        write_caption((root / rel).with_suffix(".txt"), f"caption of {rel}, red, small, square, plain")
    return root


def test_scan_reads_repeats_from_the_top_level_folder(repeat_dataset):
    from caption_train.data.scan import format_repeat_folders

    result = scan_dataset(repeat_dataset)
    repeats = {s.image_path.relative_to(repeat_dataset).as_posix(): s.repeats for s in result.samples}
    # Only the folder right under the dataset root counts (kohya's rule); nested folders inherit it.
    assert repeats == {"10_extra/c.png": 10, "30_mystyle/a.png": 30, "30_mystyle/deeper/b.png": 30,
                       "f.png": 1, "plain/5_nested/e.png": 1, "plain/d.png": 1}
    folders = result.repeat_folders
    assert folders == {"10_extra": (10, 1), "30_mystyle": (30, 2)}
    assert format_repeat_folders(folders) == "10_extra x10 (1 image), 30_mystyle x30 (2 images)"
    assert format_repeat_folders({f"{i}_x": (i, 1) for i in range(1, 12)}, limit=2) == "1_x x1 (1 image), 2_x x2 (1 image), and 9 more"


def test_repeat_folder_counts_leave_out_images_the_scan_skipped(repeat_dataset):
    (repeat_dataset / "30_mystyle" / "z.png").write_text("not an image")
    (repeat_dataset / "30_mystyle" / "z.txt").write_text("caption")
    (repeat_dataset / "10_extra" / "nocaption.png").write_bytes((repeat_dataset / "f.png").read_bytes())
    for kwargs in ({}, {"probe": False, "spot_check": 100}):
        result = scan_dataset(repeat_dataset, **kwargs)
        assert result.repeat_folders == {"10_extra": (10, 1), "30_mystyle": (30, 2)}, kwargs
    assert scan_dataset(repeat_dataset, probe=False).repeat_folders == {"10_extra": (10, 1), "30_mystyle": (30, 3)}


def test_dataset_serves_each_image_repeats_times_with_its_own_caption_draws(repeat_dataset):
    samples = scan_dataset(repeat_dataset).samples
    transform = CaptionTransform(dropout=0.0, shuffle=True)
    dataset = CaptionDataset(samples, transform, seed=3, repeat=True)
    assert len(dataset) == 10 + 30 + 30 + 1 + 1 + 1
    assert dataset.samples == samples  # the distinct images, e.g. for the interactive page
    served = collections.Counter(dataset.sample_at(i).image_path.name for i in range(len(dataset)))
    assert served == {"c.png": 10, "a.png": 30, "b.png": 30, "f.png": 1, "e.png": 1, "d.png": 1}
    with pytest.raises(IndexError):
        dataset.sample_at(len(dataset))
    # Walk order: f.png (root files first), then 10_extra/c.png x10 at indices 1..10, and so on. Items come from the
    # right image; repeats are distinct indices, so each gets its own seeded caption shuffle.
    assert [s.image_path.name for s in samples[:2]] == ["f.png", "c.png"]
    items = [dataset[i] for i in range(1, 11)]
    assert {path for _, _, path, _ in items} == {str(samples[1].image_path)}
    assert len({caption for _, caption, _, _ in items}) > 3
    assert len(CaptionDataset(samples, transform, repeat=False)) == len(samples) == 6
    assert len(CaptionDataset(samples)) == 6  # validation datasets: every image once


def test_split_is_over_distinct_images_before_repeating(repeat_dataset):
    samples = scan_dataset(repeat_dataset).samples
    for seed in range(5):
        train, val = split_validation(samples, 0.34, seed=seed)
        assert len(val) == 2 and len(train) == 4
        dataset = CaptionDataset(train, repeat=True)
        served = {dataset.sample_at(i) for i in range(len(dataset))}
        assert served == set(train) and not served & set(val)
        assert len(dataset) == sum(s.repeats for s in train)


# ---------------------------------------------------------------------------- the trainer with repeat folders


def make_repeat_shapes(root):
    """2 images in 3_rep/ and 2 at the root: 8 training samples per epoch with repeats, 4 without."""
    from caption_train.tiny import make_shapes_dataset

    pairs = make_shapes_dataset(root, 4, seed=2, size=32, subfolders=0)
    (root / "3_rep").mkdir()
    for image, _ in pairs[:2]:
        for path in (image, image.with_suffix(".txt")):
            path.rename(root / "3_rep" / path.name)
    return root


class _StopAfter:
    """A TrainingHooks that asks the loop to stop (like SIGINT) once step `k` is done."""

    def __new__(cls, k):
        from caption_train.hooks import TrainingHooks

        class Hooks(TrainingHooks):
            def on_step_end(self, run, epoch):
                if run.step == k:
                    run.request_stop()

        return Hooks()


@pytest.mark.slow
def test_training_with_repeats_counts_steps_and_resumes_mid_epoch(tmp_path, tiny_blip, capsys):
    from caption_train.config import load_train_config
    from caption_train.tracking import read_metrics
    from caption_train.train import TrainingStopped, train

    from conftest import base_args

    root = make_repeat_shapes(tmp_path / "ds")
    stochastic = ["--batch_size", "2", "--epochs", "2", "--shuffle_captions", "--random_flip", "0.5", "--lr", "3e-3", "--num_sample_captions", "0"]

    def losses(final):
        return [row["train/loss"] for row in read_metrics(final.parent / "metrics.jsonl") if "train/loss" in row]

    full = train(load_train_config(base_args(root, tiny_blip, tmp_path / "full", *stochastic)))
    out = capsys.readouterr().out
    assert "  repeat folders: 3_rep x3 (2 images)" in out.splitlines()
    assert "4 training (8 with repeats) / 0 validation images; 4 optimizer steps per epoch x 2 epochs = 8 steps" in out
    assert len(losses(full)) == 8

    # Stopped mid-epoch (step 3 of epoch 1's 4), resumed: skip_first_batches skips 3 of the 4 repeated batches.
    args = base_args(root, tiny_blip, tmp_path / "stopped", *stochastic)
    with pytest.raises(TrainingStopped):
        train(load_train_config(args), hooks=_StopAfter(3))
    resumed = train(load_train_config([*args, "--resume", "auto"]))
    assert losses(resumed) == pytest.approx(losses(full), rel=1e-5)

    off = train(load_train_config(base_args(root, tiny_blip, tmp_path / "off", *stochastic, "--kohya_repeats", "false")))
    out = capsys.readouterr().out
    assert "  repeat folders ignored (kohya_repeats = false): 3_rep x3 (2 images)" in out.splitlines()
    assert "4 training / 0 validation images; 2 optimizer steps per epoch x 2 epochs = 4 steps" in out
    assert len(losses(off)) == 4
