"""Hostile and malformed COCO datasets (issue 14): each case ends in a clear error naming the file, the entry and
the field, or in an announced, counted fix-up — never a traceback, never a silent loss.

Every case builds a tiny dataset in ``tmp_path``: constant-colour images and a COCO JSON.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit import doctor
from detrkit.cli import main
from detrkit.config import RunConfig
from detrkit.data import CLIPPED, DROPPED_EMPTY, DROPPED_OUTSIDE, CocoDetection, CocoFormatError
from detrkit.doctor import check_dataset
from detrkit.images import ImageTooLargeError, read_rgb

COLOR = (200, 100, 50)


def ann(ann_id, image_id, bbox, category_id=1, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def make(root: Path, annotations, *, images=((1, 40, 30),), categories=(1, 2), edit=None, suffix=".png"):
    """Images ``(id, width, height)`` of one colour in ``root/images`` and ``root/instances.json``."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, w, h in images:
        Image.new("RGB", (w, h), COLOR).save(image_dir / f"{i:04d}{suffix}")
    data = {
        "images": [{"id": i, "file_name": f"{i:04d}{suffix}", "width": w, "height": h} for i, w, h in images],
        "categories": [{"id": c, "name": f"cat{c}"} for c in categories],
        "annotations": list(annotations),
    }
    if edit is not None:
        edit(data)
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


@pytest.fixture
def announced():
    """The warnings the ``detrkit`` logger emits (whatever the CLI tests did to its propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("detrkit")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def messages(records) -> list[str]:
    return [r.getMessage() for r in records]


def boxes_of(ds: CocoDetection, index: int = 0) -> torch.Tensor:
    return ds.load_target(index)["boxes"].as_subclass(torch.Tensor)


# ---------------------------------------------------------------- boxes: announced, counted fix-ups


@pytest.mark.parametrize(
    ("bbox", "kind"),
    [
        ([10, 10, 0, 5], DROPPED_EMPTY),  # zero width: zero area
        ([10, 10, 5, 0], DROPPED_EMPTY),  # zero height
        ([10, 10, -3, 4], DROPPED_EMPTY),  # negative width
        ([10, 10, 4, -3], DROPPED_EMPTY),  # negative height
        ([50, 5, 10, 10], DROPPED_OUTSIDE),  # right of a 40-wide image
        ([-20, -20, 10, 10], DROPPED_OUTSIDE),  # above and left of it
        ([5, 40, 10, 10], DROPPED_OUTSIDE),  # below a 30-high image
    ],
)
def test_unusable_box_dropped_and_announced(tmp_path, announced, bbox, kind):
    ds = CocoDetection(*make(tmp_path, [ann(1, 1, [0, 0, 8, 8]), ann(7, 1, bbox)]))
    assert boxes_of(ds).shape == (1, 4)  # the good box stays, the bad one is gone
    assert ds.index.issues.count(kind) == 1
    (message,) = messages(announced)
    assert "instances.json: 1 annotation(s) fixed up" in message
    assert f"{kind} (1): annotation 7 of image 1 ('0001.png'): bbox {bbox}" in message


def test_box_past_the_border_clipped_and_announced(tmp_path, announced):
    ds = CocoDetection(*make(tmp_path, [ann(3, 1, [30, 20, 20, 20]), ann(4, 1, [-5, -5, 10, 10])]))
    torch.testing.assert_close(boxes_of(ds), torch.tensor([[30.0, 20.0, 40.0, 30.0], [0.0, 0.0, 5.0, 5.0]]))
    assert ds.index.issues.count(CLIPPED) == 2
    (message,) = messages(announced)
    assert "2 annotation(s) fixed up" in message and f"{CLIPPED} (2): annotation 3" in message


def test_rounding_overshoot_is_clipped_without_a_word(tmp_path, announced):
    ds = CocoDetection(*make(tmp_path, [ann(1, 1, [20.0, 10.0, 20.4, 20.3])]))  # 0.4 px past the corner
    torch.testing.assert_close(boxes_of(ds), torch.tensor([[20.0, 10.0, 40.0, 30.0]]))
    assert messages(announced) == []


def test_many_fixups_one_warning_with_counts_and_few_examples(tmp_path, announced):
    bad = [ann(100 + i, 1, [1, 1, 0, 1]) for i in range(10)] + [ann(200 + i, 1, [90, 1, 3, 3]) for i in range(4)]
    ds = CocoDetection(*make(tmp_path, [ann(1, 1, [0, 0, 8, 8]), *bad]))
    assert boxes_of(ds).shape == (1, 4)
    (message,) = messages(announced)  # one warning for the dataset
    assert "14 annotation(s) fixed up" in message
    assert f"{DROPPED_EMPTY} (10): annotation 100" in message and "and 7 more" in message
    assert f"{DROPPED_OUTSIDE} (4)" in message and "annotation 203" not in message  # 3 examples per kind


def test_image_without_size_in_json_checked_from_its_header(tmp_path, announced):
    def no_size(d):
        del d["images"][0]["width"], d["images"][0]["height"]

    ds = CocoDetection(*make(tmp_path, [ann(1, 1, [0, 0, 8, 8]), ann(2, 1, [45, 0, 5, 5])], edit=no_size))
    assert boxes_of(ds).shape == (1, 4)
    assert ds.index.issues.count(DROPPED_OUTSIDE) == 1 and "in a 40x30 image" in messages(announced)[0]


# ---------------------------------------------------------------- annotation file: clear errors


@pytest.mark.parametrize(
    "bbox", [[1, 2, math.nan, 4], [1, 2, 3, math.inf], [1, 2, 3], [1, 2, 3, 4, 5], "1 2 3 4", None, [1, True, 3, 4]]
)
def test_bbox_not_four_finite_numbers_names_the_annotation(tmp_path, bbox):
    image_dir, ann_file = make(tmp_path, [ann(1, 1, [0, 0, 5, 5]), ann(42, 1, bbox)])
    got = re.escape(repr(bbox))
    expected = rf"instances.json: invalid bbox \(1\): annotation 42: bbox must be 4 finite numbers .*got {got}"
    with pytest.raises(CocoFormatError, match=expected):
        CocoDetection(image_dir, ann_file)


def test_duplicate_annotation_ids_refused(tmp_path):
    annotations = [ann(7, 1, [0, 0, 5, 5]), ann(7, 1, [5, 5, 5, 5]), ann(8, 1, [1, 1, 5, 5])]
    with pytest.raises(
        CocoFormatError, match=r"instances.json: duplicate annotation id \(1\): annotation id 7 is used 2"
    ):
        CocoDetection(*make(tmp_path, annotations))


def test_annotation_without_or_with_a_bad_id_named_by_position(tmp_path):
    no_id = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, math.nan]}
    with pytest.raises(CocoFormatError) as info:
        CocoDetection(*make(tmp_path, [ann([3], 1, [0, 0, 5, 5]), no_id]))
    assert "invalid annotation (1): annotation [3]: id must be an integer" in str(info.value)
    assert "invalid bbox (1): annotations[1] (no id): bbox must be 4 finite numbers" in str(info.value)


def test_duplicate_image_ids_refused(tmp_path):
    edit = lambda d: d["images"].append({"id": 1, "file_name": "other.png", "width": 8, "height": 8})  # noqa: E731
    with pytest.raises(CocoFormatError, match=r"duplicate image id \(1\): duplicate image id 1"):
        CocoDetection(*make(tmp_path, [], edit=edit))


def test_unknown_image_and_category_ids_all_named_at_once(tmp_path):
    annotations = [
        ann(1, 1, [0, 0, 5, 5]),
        ann(2, 99, [0, 0, 5, 5]),
        ann(3, 98, [0, 0, 5, 5]),
        ann(4, 1, [0, 0, 5, 5], category_id=77),
        ann(5, [1], [0, 0, 5, 5]),  # unhashable: reported, not a TypeError
    ]
    with pytest.raises(CocoFormatError) as info:
        CocoDetection(*make(tmp_path, annotations))
    text = str(info.value)
    assert "unknown image id (3): annotation 2 refers to unknown image id 99; annotation 3" in text
    assert "annotation 5 refers to unknown image id [1]" in text
    assert "unknown category id (1): annotation 4 refers to unknown category id 77. known category ids: [1, 2]" in text
    assert all(line.startswith(str(tmp_path / "instances.json")) for line in text.splitlines())


@pytest.mark.parametrize("file_name", ["../outside.png", "sub/../../outside.png", "ABSOLUTE"])
def test_file_name_leaving_the_image_folder_refused(tmp_path, file_name):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (40, 30)).save(outside)
    name = str(outside) if file_name == "ABSOLUTE" else file_name
    edit = lambda d: d["images"][0].update(file_name=name)  # noqa: E731
    image_dir, ann_file = make(tmp_path, [], edit=edit)
    with pytest.raises(CocoFormatError, match="file_name outside the image folder") as info:
        CocoDetection(image_dir, ann_file)
    assert f"image 1 has file_name {name!r}, which leaves {image_dir}" in str(info.value)
    report = check_dataset(image_dir, ann_file)
    assert not report.ok and report.issues.count("file_name outside the image folder") == 1
    assert report.issues.count(doctor.MISSING_FILE) == 0  # never looked at


def test_subfolders_absolute_paths_inside_and_symlinks_are_fine(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("RGB", (40, 30), COLOR).save(elsewhere / "real.png")

    def edit(d):
        d["images"] += [
            {"id": 2, "file_name": "sub/../0001.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "link.png", "width": 40, "height": 30},
            {"id": 4, "file_name": str(tmp_path / "images" / "0001.png"), "width": 40, "height": 30},
        ]

    image_dir, ann_file = make(tmp_path, [], edit=edit)
    (image_dir / "sub").mkdir()
    os.symlink(elsewhere / "real.png", image_dir / "link.png")  # a symlink inside the folder
    ds = CocoDetection(image_dir, ann_file)
    assert [ds[i][0].shape for i in range(4)] == [(3, 30, 40)] * 4
    assert check_dataset(image_dir, ann_file).ok


# ---------------------------------------------------------------- image modes: each comes out right


def _write_mode_image(path: Path, mode: str) -> np.ndarray:
    """Write a 4x3 image of ``mode``; return the RGB uint8 values it must read as."""
    if mode == "I;16":  # 16-bit grayscale PNG: 51400 / 257 = 200
        Image.fromarray(np.full((3, 4), 51400, dtype=np.uint16)).save(path)
        return np.full((3, 4, 3), 200)
    if mode == "I":  # 32-bit integer TIFF holding 16-bit values
        Image.fromarray(np.full((3, 4), 25700, dtype=np.int32)).save(path)
        return np.full((3, 4, 3), 100)
    if mode == "F":  # float TIFF in [0, 1]
        Image.fromarray(np.full((3, 4), 0.2, dtype=np.float32)).save(path)
        return np.full((3, 4, 3), 51)
    if mode == "LA":  # gray + alpha: the gray, alpha discarded
        Image.new("LA", (4, 3), (90, 0)).save(path)
        return np.full((3, 4, 3), 90)
    if mode == "P":  # palette with a transparent entry: its colour, alpha discarded
        im = Image.new("P", (4, 3), 1)
        im.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
        im.save(path, transparency=1)
        return np.broadcast_to(np.array([10, 20, 30]), (3, 4, 3))
    if mode == "CMYK":  # pure cyan
        Image.new("CMYK", (4, 3), (255, 0, 0, 0)).save(path)
        return np.broadcast_to(np.array([0, 255, 255]), (3, 4, 3))
    if mode == "1":  # 1-bit: white is 255, not 1
        Image.new("1", (4, 3), 1).save(path)
        return np.full((3, 4, 3), 255)
    raise AssertionError(mode)


@pytest.mark.parametrize(
    ("mode", "suffix"),
    [("I;16", ".png"), ("I", ".tif"), ("F", ".tif"), ("LA", ".png"), ("P", ".png"), ("CMYK", ".tif"), ("1", ".png")],
)
def test_image_mode_read_right(tmp_path, mode, suffix):
    image_dir, ann_file = make(tmp_path, [ann(1, 1, [0, 0, 2, 2])], images=[(1, 4, 3)], suffix=suffix)
    expected = _write_mode_image(image_dir / f"0001{suffix}", mode)
    with Image.open(image_dir / f"0001{suffix}") as stored:
        assert stored.mode == mode
    assert np.array_equal(np.asarray(read_rgb(image_dir / f"0001{suffix}")), expected)
    image, _ = CocoDetection(image_dir, ann_file)[0]
    torch.testing.assert_close(image, torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255)


def test_sixteen_bit_png_keeps_its_range_and_is_reported(tmp_path):
    image_dir, ann_file = make(tmp_path, [], images=[(1, 4, 3)])
    ramp = np.array([[0, 257, 32896, 65535]] * 3, dtype=np.uint16)  # → 0, 1, 128, 255 (not clipped to 255)
    Image.fromarray(ramp).save(image_dir / "0001.png")
    assert np.asarray(read_rgb(image_dir / "0001.png"))[0, :, 0].tolist() == [0, 1, 128, 255]
    report = check_dataset(image_dir, ann_file)
    assert report.ok and report.issues.count(doctor.HIGH_BIT_DEPTH) == 1


# ---------------------------------------------------------------- EXIF orientation: the stored grid, always


def _exif_jpeg(path: Path, size: tuple[int, int], orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.new("RGB", size, COLOR).save(path, exif=exif)


def test_exif_rotation_ignored_and_announced(tmp_path):
    image_dir, ann_file = make(tmp_path, [ann(1, 1, [0, 0, 30, 10])], images=[(1, 40, 30), (2, 40, 30)], suffix=".jpg")
    _exif_jpeg(image_dir / "0001.jpg", (40, 30), orientation=6)  # a viewer shows it 30 x 40
    ds = CocoDetection(image_dir, ann_file)
    image, target = ds[0]
    assert image.shape == (3, 30, 40)  # the stored grid, not rotated
    torch.testing.assert_close(target["boxes"], torch.tensor([[15 / 40, 5 / 30, 30 / 40, 10 / 30]]))
    report = check_dataset(image_dir, ann_file)
    assert report.ok and report.issues.count(doctor.EXIF_IGNORED) == 1
    assert "image 1 ('0001.jpg'): EXIF orientation 6" in report.format()


def test_json_size_of_the_rotated_picture_refused_with_the_reason(tmp_path):
    image_dir, ann_file = make(tmp_path, [], images=[(1, 30, 40)], suffix=".jpg")  # the JSON says 30 x 40
    _exif_jpeg(image_dir / "0001.jpg", (40, 30), orientation=8)  # stored 40 x 30, shown 30 x 40
    with pytest.raises(ValueError, match=r"0001.jpg is 40x30 \(w x h\) but .*instances.json says 30x40") as info:
        CocoDetection(image_dir, ann_file)[0]
    assert "EXIF rotation (orientation 8)" in str(info.value) and "exif_transpose" in str(info.value)
    report = check_dataset(image_dir, ann_file)
    assert not report.ok and report.issues.count(doctor.EXIF_SWAPPED) == 1


# ---------------------------------------------------------------- image files: clear errors


def test_image_size_differs_from_json(tmp_path):
    image_dir, ann_file = make(tmp_path, [])
    Image.new("RGB", (41, 30)).save(image_dir / "0001.png")
    with pytest.raises(ValueError, match=r"0001.png is 41x30 .* says 40x30 \(image 1\).*Correct width/height"):
        CocoDetection(image_dir, ann_file)[0]
    report = check_dataset(image_dir, ann_file)
    assert report.issues.count(doctor.SIZE_MISMATCH) == 1 and "the file is 41x30 (w x h), the JSON says 40x30" in (
        report.format()
    )


def test_missing_and_unreadable_images(tmp_path):
    image_dir, ann_file = make(tmp_path, [], images=[(1, 8, 8), (2, 8, 8), (3, 8, 8)])
    (image_dir / "0001.png").unlink()
    (image_dir / "0002.png").write_text("not an image")
    ds = CocoDetection(image_dir, ann_file)
    with pytest.raises(FileNotFoundError, match="image file not found: .*0001.png"):
        ds[0]
    with pytest.raises(OSError, match="cannot read image file .*0002.png"):
        ds[1]
    report = check_dataset(image_dir, ann_file)
    assert report.issues.count(doctor.MISSING_FILE) == 1 and report.issues.count(doctor.UNREADABLE_FILE) == 1


def test_truncated_image_named_when_read(tmp_path):
    image_dir, ann_file = make(tmp_path, [])
    data = (image_dir / "0001.png").read_bytes()
    (image_dir / "0001.png").write_bytes(data[: len(data) // 2])
    assert check_dataset(image_dir, ann_file).ok  # the header is intact: only decoding finds it
    with pytest.raises(OSError, match=r"cannot read image file .*0001.png: image file is truncated"):
        CocoDetection(image_dir, ann_file)[0]


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid, tiny PNG claiming ``width`` x ``height`` (no pixel data is ever allocated)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_naming_the_file(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    _png_header_only(image_dir / "huge.png", 14000, 14000)
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "huge.png", "width": 14000, "height": 14000}],
                "categories": [{"id": 1, "name": "x"}],
                "annotations": [ann(1, 1, [0, 0, 100, 100])],
            }
        )
    )
    assert (image_dir / "huge.png").stat().st_size < 100
    with pytest.raises(ImageTooLargeError, match=r"huge.png is too large .* PIL.Image.MAX_IMAGE_PIXELS"):
        CocoDetection(image_dir, ann_file)[0]
    report = check_dataset(image_dir, ann_file)
    assert report.issues.count(doctor.TOO_LARGE) == 1 and not report.ok


# ---------------------------------------------------------------- the doctor: statistics, num_queries, CLI


def test_more_objects_than_num_queries_warned_with_count_and_max(tmp_path):
    crowded = [ann(10 + i, 1, [i, i, 5, 5]) for i in range(6)] + [ann(30 + i, 2, [i, i, 5, 5]) for i in range(4)]
    image_dir, ann_file = make(tmp_path, crowded, images=[(1, 40, 30), (2, 40, 30), (3, 40, 30)])
    report = check_dataset(image_dir, ann_file, num_queries=3)
    assert report.ok and report.issues.count(doctor.TOO_MANY_OBJECTS) == 2
    assert "2 image(s) with up to 6 objects, but the model has num_queries=3" in report.format()
    assert check_dataset(image_dir, ann_file, num_queries=6).issues.count(doctor.TOO_MANY_OBJECTS) == 0


def test_report_statistics_and_plot(tmp_path):
    annotations = [
        ann(1, 1, [0, 0, 20, 15]),  # half the side of a 40x30 image: relative size 0.5
        ann(2, 1, [0, 0, 4, 3], category_id=2),  # 0.1
        ann(3, 2, [0, 0, 80, 60], iscrowd=1),  # crowd: counted apart
        ann(4, 2, [0, 0, 0, 3]),  # dropped: a fix-up
    ]
    image_dir, ann_file = make(tmp_path, annotations, images=[(1, 40, 30), (2, 80, 60)], categories=(1, 2, 3))
    report = check_dataset(image_dir, ann_file, image_size=60, max_size=None)
    assert report.num_images == 2 and report.boxes_per_image.tolist() == [2, 0] and report.num_crowd == 1
    assert report.class_counts == {"cat1": 1, "cat2": 1, "cat3": 0}
    np.testing.assert_allclose(report.box_relative, [0.5, 0.1])
    # at the model's input the 40x30 image is 80x60: sqrt(box area) = relative size * sqrt(80 * 60)
    np.testing.assert_allclose(report.box_pixels, [0.5 * math.sqrt(4800), 0.1 * math.sqrt(4800)])
    assert report.image_sizes.tolist() == [[40, 30], [80, 60]]
    assert report.issues.count(DROPPED_EMPTY) == 1 and report.issues.count(doctor.EMPTY_CATEGORY) == 1
    text = report.format()
    for expected in ("images    2", "classes   3: cat1 1, cat2 1, cat3 0", "stride 32", "fix-up", "result    OK"):
        assert expected in text
    png = report.plot(tmp_path / "out" / "doctor.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 100


def test_cli_doctor_exit_status_and_config_mode(tmp_path, capsys, monkeypatch):
    logger = logging.getLogger("detrkit")  # main() adds a handler on this test's stderr: undo it afterwards
    for name in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, name, list(logger.handlers) if name == "handlers" else getattr(logger, name))
    good = make(tmp_path / "good", [ann(1, 1, [0, 0, 8, 8])])
    bad = make(tmp_path / "bad", [ann(1, 1, [0, 0, 8, 8]), ann(1, 1, [1, 1, 8, 8])])
    assert main(["doctor", "--images", str(good[0]), "--annotations", str(good[1])]) == 0
    assert "result    OK" in capsys.readouterr().out
    plot = tmp_path / "p.png"
    assert main(["doctor", "--images", str(bad[0]), "--annotations", str(bad[1]), "--plot", str(plot)]) == 1
    assert "duplicate annotation id (1): annotation id 1 is used 2 times" in capsys.readouterr().out
    assert plot.is_file()
    overrides = [
        f"data.train_images={good[0]}",
        f"data.train_annotations={good[1]}",
        f"data.val_images={bad[0]}",
        f"data.val_annotations={bad[1]}",
    ]
    assert main(["doctor", "demo", *overrides]) == 1
    out = capsys.readouterr().out
    assert "[train]" in out and "[val]" in out and "REFUSED" in out
    assert main(["doctor", "--images", str(good[0])]) == 2  # both or a config


def test_training_refuses_before_the_first_step_and_announces(tmp_path, announced):
    from detrkit.engine import build_datasets

    image_dir, ann_file = make(tmp_path, [ann(i, 1, [i, 0, 4, 4]) for i in range(1, 5)], images=[(1, 40, 30)])
    config = RunConfig.from_dict(
        {"model": {"num_queries": 2}, "data": {"train_images": str(image_dir), "train_annotations": str(ann_file)}}
    )
    train_set, _ = build_datasets(config)
    assert len(train_set) == 1
    assert any("more objects than num_queries (1)" in m for m in messages(announced))
    Image.new("RGB", (40, 31)).save(image_dir / "0001.png")  # now the file disagrees with the JSON
    with pytest.raises(ValueError, match=r"(?s)data.train: the dataset has errors.*0001.png.*the JSON says 40x30"):
        build_datasets(config)
