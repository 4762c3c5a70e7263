"""A user's image data as the user meets it: 16-bit scans, copies leaking from training into
testing, images of several sizes, a text file named like an image, a forgotten root. Each is
either handled or told in one line that names the file and the key to change."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepmetric.cli import main
from deepmetric.config import ConfigError, load_config
from deepmetric.data import (
    SOURCES,
    DatasetCountWarning,
    DatasetError,
    check_dataset,
    find_source,
    inspect_image,
    open_image,
)
from deepmetric.engine import build_data
from fake_layouts import make_cub, write_garbage
from test_own_data import DEMO, TINY, make_photos


def cli(*args: str) -> int:
    return main([*args])


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--config",
        str(DEMO),
        *TINY,
        "--data.name=folder",
        f"--data.root={root}",
        f"--output.dir={out}",
        *extra,
    ]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if ln.startswith("deepmetric: error:")]
    assert len(lines) == 1, err
    return lines[0]


def split_photos(root: Path) -> Path:
    """``root/train/<class>/`` (4 classes) and ``root/test/<class>/`` (4 other classes)."""
    make_photos(root / "train", classes=4)
    make_photos(root / "test", classes=4, seed=1)
    return root


def folder_config(root: Path, *extra: str):
    return load_config(DEMO, [*TINY, "--data.name=folder", f"--data.root={root}", *extra])


# ------------------------------------------------------------------------- 16-bit images
RAMP = np.linspace(0, 65535, 64).round().astype(np.uint16)


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I;16B", ".tif"), ("I", ".tif")])
def test_16_bit_image_keeps_its_gradient(tmp_path: Path, mode: str, suffix: str) -> None:
    pixels = np.tile(RAMP, (8, 1))  # 8 x 64, dark to bright
    if mode == "I;16B":
        image = Image.frombytes(mode, (64, 8), pixels.astype(">u2").tobytes())
    else:
        image = Image.fromarray(pixels.astype(np.int32) if mode == "I" else pixels)
    path = tmp_path / f"scan{suffix}"
    image.save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(open_image(path))
    assert rgb.shape == (8, 64, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[3, :, 1], np.round(RAMP / 257).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all()  # grey stays grey


def test_datasets_check_says_16_bit_images_are_rescaled(tmp_path: Path) -> None:
    photos = make_photos(tmp_path / "p", classes=4)
    scan = photos / "class_00" / "scan.png"
    Image.fromarray(np.tile(RAMP[:16], (16, 1))).save(scan)  # 16 x 16 like the others
    report = check_dataset("folder", photos)
    assert report.ok
    line = next(ln for ln in report.splitlines() if "16-bit" in ln)
    assert line.strip().startswith("warning") and "rescaled" in line and "scan.png" in line


# ----------------------------------------------------------- leakage and conflicting labels
def test_train_refuses_a_file_in_train_and_in_test(tmp_path: Path, capsys) -> None:
    root = split_photos(tmp_path / "d")
    source = root / "train" / "class_01" / "1.png"
    leak = root / "test" / "class_02" / "leak.png"
    shutil.copyfile(source, leak)
    out = tmp_path / "run"
    assert cli(*train_args(root, out)) == 2
    err = one_line(capsys)
    assert str(source) in err and str(leak) in err and "data.allow_leakage" in err
    assert not (out / "last").exists()
    # opting out (DataConfig.allow_leakage): the run goes on, with a warning
    cfg = folder_config(root)
    cfg.data.allow_leakage = True
    with pytest.warns(UserWarning, match="leak.png"):
        build_data(cfg)
    # --data.validate=none reads no file: nothing is looked for
    build_data(folder_config(root, "--data.validate=none"))


def test_same_image_under_two_labels_is_a_warning(tmp_path: Path) -> None:
    root = split_photos(tmp_path / "d")
    first = root / "train" / "class_00" / "0.png"
    copy = root / "train" / "class_03" / "copy.png"
    shutil.copyfile(first, copy)
    same_label = root / "train" / "class_01" / "again.png"
    shutil.copyfile(root / "train" / "class_01" / "0.png", same_label)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_set, _ = build_data(folder_config(root))
    assert len(train_set) == 18  # nothing dropped: a warning only
    messages = [str(w.message) for w in caught]
    hits = [m for m in messages if str(copy) in m]
    assert len(hits) == 1 and str(first) in hits[0] and "labels differ" in hits[0]
    assert not any(str(same_label) in m for m in messages)  # one label: not a conflict


def test_official_benchmark_leakage_is_a_warning_for_train(tmp_path: Path) -> None:
    base = make_cub(tmp_path, {1: 3, 2: 3, 3: 3, 101: 3, 102: 3, 103: 3}) / "CUB_200_2011"
    rows = [ln.split()[1] for ln in (base / "images.txt").read_text().splitlines()]
    train_file, test_file = base / "images" / rows[0], base / "images" / rows[-1]
    shutil.copyfile(train_file, test_file)
    cfg = load_config(DEMO, [*TINY, "--data.name=cub", f"--data.root={base}"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_data(cfg)
    leaks = [
        str(w.message)
        for w in caught
        if str(test_file) in str(w.message) and not issubclass(w.category, DatasetCountWarning)
    ]
    assert len(leaks) == 1 and "official" in leaks[0] and str(train_file) in leaks[0]


# ------------------------------------------------------------------ images of several sizes
def mixed_sizes(root: Path) -> Path:
    """Six classes of 16 x 16 images, one 20 x 10 image in each class."""
    photos = make_photos(root, classes=6)
    for c in range(6):
        Image.new("RGB", (20, 10), (c * 40, 0, 0)).save(photos / f"class_{c:02d}" / "wide.png")
    return photos


def test_datasets_check_predicts_images_of_several_sizes(tmp_path: Path, capsys) -> None:
    photos = mixed_sizes(tmp_path / "p")
    check = ["datasets", "check", "--config", str(DEMO), "--data.name=folder"]
    # the small preset without a size keeps each image's size: a problem, exit 1
    assert cli(*check, f"--data.root={photos}", "--data.transform_options.size=null") == 1
    out = capsys.readouterr().out
    assert "--data.transform_options.size" in out and "wide.png" in out
    assert "result: 2 problem(s)" in out  # one per split
    # with a size every image is resized: nothing to say
    assert cli(*check, f"--data.root={photos}", "--data.transform_options.size=16") == 0
    out = capsys.readouterr().out
    assert "transform_options.size" not in out and "result: OK" in out
    # without a transform to look at: a warning naming the key
    report = check_dataset("folder", photos)
    assert report.ok
    warned = [ln for ln in report.splitlines() if "--data.transform_options.size" in ln]
    assert warned and all(ln.strip().startswith("warning") for ln in warned)


@pytest.mark.parametrize(("validate", "named"), [("header", "wide.png"), ("none", "in one batch")])
def test_images_of_several_sizes_stop_the_run_on_a_line_of_their_own(
    tmp_path: Path, capsys, validate: str, named: str
) -> None:
    """data.validate=header: found before the first step, naming the files; none: at the
    first batch, while the training bar is drawn (which ends its line first)."""
    photos = mixed_sizes(tmp_path / "p")
    out = tmp_path / "run"
    argv = train_args(
        photos,
        out,
        "--data.transform_options.size=null",
        f"--data.validate={validate}",
        "--train.progress=true",
        "--eval.at_start=false",
    )
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if "deepmetric: error:" in ln)
    assert line.startswith("deepmetric: error: images of different sizes"), err
    assert "--data.transform_options.size" in line and named in line
    assert validate == "none" or not (out / "metrics.jsonl").exists()


# --------------------------------------------------------------- a file that is not an image
def test_text_file_named_jpg_is_named_and_said_not_an_image(tmp_path: Path, capsys) -> None:
    fake = write_garbage(tmp_path / "x.jpg")
    problem = inspect_image(str(fake)).problem
    assert "not an image" in problem and "BytesIO" not in problem
    with pytest.raises(DatasetError, match="not an image") as caught:
        open_image(fake)
    assert str(fake) in str(caught.value)

    photos = split_photos(tmp_path / "d")
    text = write_garbage(photos / "train" / "class_00" / "x.jpg")
    assert cli(*train_args(photos, tmp_path / "run")) == 2
    err = one_line(capsys)
    assert str(text) in err and "not an image" in err and "BytesIO" not in err


# ------------------------------------------------------------------------ no root given
ROOT_NAMES = [source.name for source in SOURCES.values() if source.root]  # all but digits


@pytest.mark.parametrize("name", ROOT_NAMES)
def test_missing_root_names_the_flag_and_what_it_must_name(name: str, capsys) -> None:
    expected = find_source(name).root
    assert cli("train", "--config", str(DEMO), *TINY, f"--data.name={name}") == 2
    err = one_line(capsys)
    assert "--data.root" in err and expected in err
    assert name != "cub" or "CUB_200_2011" in err
    with pytest.raises(ConfigError, match=r"--data\.root"):
        build_data(load_config(DEMO, [*TINY, f"--data.name={name}"]), test_only=True)  # eval

    assert cli("datasets", "check", "--dataset", name) == 2
    err = one_line(capsys)
    assert "--root" in err and expected in err
    assert cli("datasets", "check", "--config", str(DEMO), f"--data.name={name}") == 2
    assert "--data.root" in one_line(capsys)
