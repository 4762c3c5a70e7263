"""A user's own images: class-disjoint splits of data without one (and the split.csv that
reproduces the run), integrity checks at load and in ``datasets check``, image validation
before the first step."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import tiny_runs
from deepmetric.cli import main
from deepmetric.config import ConfigError, load_config
from deepmetric.data import (
    DatasetError,
    MissingFileError,
    build_dataset,
    check_dataset,
    inspect_image,
    split_unsplit,
)
from deepmetric.engine import train
from fake_layouts import write_garbage, write_image, write_truncated_jpeg

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
# The demo's network and loss on 16 x 16 image files; a few iterations.
TINY = [
    *tiny_runs.TINY,
    "--sampler.p=3",
    "--train.iterations=6",
    "--train.log_every=3",
    "--eval.at_start=true",
    "--eval.every=0",
    "--schedule.name=none",
    "--data.num_workers=0",
]


def make_photos(
    root: Path, classes: int = 8, per_class: int = 4, suffix: str = ".png", seed: int = 0
) -> Path:
    """A flat folder of class folders; each class a colour, each image its own noise (no two
    files identical)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        colour = rng.integers(0, 256, size=3)
        for k in range(per_class):
            noise = rng.integers(-40, 40, size=(16, 16, 3))
            pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
            path = root / f"class_{c:02d}" / f"{k}{suffix}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    return root


def train_on(data: list[str], out: Path, *extra: str) -> dict:
    cfg = load_config(DEMO, [*TINY, *data, f"--output.dir={out}", *extra])
    return train(cfg, config_name=str(DEMO))


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------ splits


def test_flat_folder_trains_on_disjoint_classes_and_split_csv_reproduces_the_run(
    tmp_path: Path, capsys
) -> None:
    photos = make_photos(tmp_path / "photos")
    folder = ["--data.name=folder", f"--data.root={photos}"]
    first = train_on(folder, tmp_path / "run1")
    printed = capsys.readouterr().out
    split_csv = tmp_path / "run1" / "split.csv"
    assert "4 classes held out for testing, never trained on" in printed
    assert f"training 16 images of 4 classes, test 16 images of 4 classes -> {split_csv}" in printed
    rows = read_rows(split_csv)
    train_classes = {r["class_name"] for r in rows if r["split"] == "train"}
    test_classes = {r["class_name"] for r in rows if r["split"] == "validation"}
    assert len(train_classes) == len(test_classes) == 4 and not train_classes & test_classes
    assert len(rows) == 32 and all(Path(r["path"]).is_file() for r in rows)
    assert all(r["is_query"] == r["is_gallery"] == "1" for r in rows if r["split"] != "train")
    assert first["start"]["num_queries"] == 16  # the untrained network, on test classes only

    # the written split, read back as a CSV, gives the same run, bit for bit
    again = train_on(["--data.name=csv", f"--data.root={split_csv}"], tmp_path / "run2")
    for key in ("start", "final"):
        first[key].pop("eval_time_s"), again[key].pop("eval_time_s")
        assert again[key] == first[key]
    a = load_file(str(tmp_path / "run1" / "last" / "model.safetensors"))
    b = load_file(str(tmp_path / "run2" / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "run2" / "split.csv").exists()  # the CSV has its own split


def test_split_rules() -> None:
    labels = [c for c in range(10) for _ in range(3)]
    from deepmetric.data import ImageDataset

    ds = ImageDataset([f"/x/{i}.jpg" for i in range(30)], labels, split="all")
    train = split_unsplit(ds, "train", test_classes=3, seed=1)
    test = split_unsplit(ds, "test", test_classes=3, seed=1)
    assert test.num_classes == 3 and train.num_classes == 7
    assert not set(train.class_ids.tolist()) & set(test.class_ids.tolist())
    assert sorted(train.paths + test.paths) == sorted(ds.paths)
    assert train.labels.max() == 6 and test.labels.max() == 2  # re-indexed per part
    assert split_unsplit(ds, "test", test_classes=0.25, seed=1).num_classes == 2  # round(2.5)
    assert split_unsplit(ds, "test", seed=1).num_classes == 5  # default: half
    other = split_unsplit(ds, "test", test_classes=3, seed=2)
    assert other.class_ids.tolist() != test.class_ids.tolist()  # the seed decides
    # closed-set: every class on both sides, no image on both
    tr = split_unsplit(ds, "train", split_by="images", test_images=0.34, seed=0)
    te = split_unsplit(ds, "test", split_by="images", test_images=0.34, seed=0)
    assert tr.num_classes == te.num_classes == 10 and len(te) == 10 and len(tr) == 20
    assert not set(tr.paths) & set(te.paths)
    for bad in (10, 0.0, 1.5):
        with pytest.raises(ValueError, match="test_classes"):
            split_unsplit(ds, "test", test_classes=bad)
    one = ImageDataset(["/a.jpg", "/b.jpg"], [0, 0], split="all")
    with pytest.raises(DatasetError, match="1 class; a zero-shot split needs at least 2"):
        split_unsplit(one, "train")


def test_split_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="digits: test_classes / split_by apply to data without"):
        build_dataset("digits", split="train", test_classes=2)
    with pytest.raises(ConfigError, match=r"data\.options\.validate: set data\.validate instead"):
        load_config(DEMO, ["--data.options.validate=decode"])
    with pytest.raises(ConfigError, match=r"data\.test_classes: applies to data\.split_by=classes"):
        load_config(DEMO, ["--data.split_by=images", "--data.test_classes=0.3"])
    with pytest.raises(ConfigError, match=r"data.test_classes: expected a fraction in \(0, 1\)"):
        load_config(DEMO, ["--data.test_classes=1.5"])
    photos = make_photos(tmp_path / "p", classes=3)
    with pytest.raises(ConfigError, match="test_classes=3: the data has 3 classes"):
        train_on(
            ["--data.name=folder", f"--data.root={photos}"], tmp_path / "r", "--data.test_classes=3"
        )
    assert not list((tmp_path / "r").glob("*.jpg"))


def test_closed_set_is_said_everywhere(tmp_path: Path, capsys) -> None:
    photos = make_photos(tmp_path / "photos", classes=4, per_class=6)
    out = tmp_path / "run"
    summary = train_on(
        ["--data.name=folder", f"--data.root={photos}", "--data.split_by=images"], out
    )
    printed = capsys.readouterr().out
    assert "CLOSED-SET: 50% of each class's images held out for testing" in printed
    assert "test 12 images (CLOSED-SET: classes seen in training)" in printed
    assert "[     0] test (CLOSED-SET: classes seen in training):" in printed
    assert "test (CLOSED-SET: classes seen in training) split (folder), iteration 6" in printed
    assert summary["start"]["num_queries"] == 12
    rows = read_rows(out / "split.csv")
    assert {r["class_name"] for r in rows if r["split"] == "train"} == {
        r["class_name"] for r in rows if r["split"] == "validation"
    }


def test_folder_with_train_but_no_test_folder(tmp_path: Path) -> None:
    make_photos(tmp_path / "train", classes=2)
    with pytest.raises(MissingFileError, match=r"has train/ but no test/ folder"):
        build_dataset("folder", tmp_path, "test")


# ------------------------------------------------------------------- rows at load time


def write_csv(root: Path, rows: list[tuple], header: str = "label,path,split,is_query,is_gallery"):
    for k, row in enumerate(rows):
        if not (root / row[1]).exists():
            write_image(root / row[1], seed=k)
    (root / "df.csv").write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows))
    return root / "df.csv"


def test_csv_row_listed_twice_names_both_lines(tmp_path: Path) -> None:
    rows = [(1, "a.jpg", "train", "", ""), (2, "b.jpg", "validation", 1, 1)]
    rows += [(3, "c.jpg", "validation", 1, 1), (2, "b.jpg", "validation", 1, 1)]
    file = write_csv(tmp_path, rows)
    with pytest.raises(DatasetError, match=rf"{file}, lines 3 and 5: .*b\.jpg is listed twice"):
        build_dataset("csv", tmp_path, "test")


def test_csv_image_with_two_labels_names_both_lines(tmp_path: Path) -> None:
    rows = [
        (1, "a.jpg", "train", "", ""),
        (1, "b.jpg", "train", "", ""),
        (7, "./a.jpg", "train", "", ""),
    ]
    file = write_csv(tmp_path, rows)
    with pytest.raises(
        DatasetError, match=rf"{file}, lines 2 and 4: .*a\.jpg is listed with two labels, 1 and 7"
    ):
        build_dataset("csv", tmp_path, "train")


def test_csv_image_in_train_and_validation_is_refused(tmp_path: Path) -> None:
    rows = [(1, "a.jpg", "train", "", ""), (1, "a.jpg", "validation", 1, 1)]
    write_csv(tmp_path, rows)
    for split in ("train", "test"):  # whichever split is asked for
        with pytest.raises(DatasetError, match=r"lines 2 and 3: .*a\.jpg is listed twice"):
            build_dataset("csv", tmp_path, split)


def test_list_image_in_query_and_gallery_is_refused(tmp_path: Path) -> None:
    for k, name in enumerate(("q.jpg", "g.jpg")):
        write_image(tmp_path / name, seed=k)
    (tmp_path / "query.txt").write_text("q.jpg 1\n")
    (tmp_path / "gallery.txt").write_text("g.jpg 1\nq.jpg 1\n")
    with pytest.raises(DatasetError, match=r"query\.txt, line 1 and .*gallery\.txt, line 2"):
        build_dataset("list", tmp_path, "test")


def test_duplicated_evaluation_rows_stop_the_run_before_it_starts(tmp_path: Path) -> None:
    """Duplicated evaluation rows made an untrained Recall@1 of 1.000: now the run refuses."""
    photos = make_photos(tmp_path / "photos", classes=6)
    rows = [["label", "path", "split", "is_query", "is_gallery"]]
    for c in range(6):
        for k in range(4):
            path = photos / f"class_{c:02d}" / f"{k}.png"
            rows.append(
                [c, path, "train" if c < 3 else "validation", *(("", "") if c < 3 else (1, 1))]
            )
    rows.append(rows[-1])
    file = tmp_path / "dup.csv"
    file.write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(DEMO),
            *TINY,
            "--data.name=csv",
            f"--data.root={file}",
            f"--output.dir={out}",
        ]
    )
    assert code == 2
    assert not (out / "last").exists()


# ----------------------------------------------------------- files: validation and audit


def test_inspect_image_levels(tmp_path: Path) -> None:
    good = write_image(tmp_path / "ok.jpg", size=(20, 10))
    info = inspect_image(str(good), "header", digest=True)
    assert info.problem is None and info.size == (20, 10) and info.mode == "RGB"
    assert info.format == "JPEG" and len(info.digest) == 64
    cut = write_truncated_jpeg(tmp_path / "cut.jpg")
    assert inspect_image(str(cut), "none").problem is None  # it exists
    assert "truncated JPEG" in inspect_image(str(cut), "header").problem
    png = write_image(tmp_path / "p.png", size=(32, 32))
    png.write_bytes(png.read_bytes()[:-20])
    assert "truncated PNG" in inspect_image(str(png), "header").problem
    assert "UnidentifiedImageError" in inspect_image(str(write_garbage(tmp_path / "g.jpg"))).problem
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert inspect_image(str(tmp_path / "empty.jpg")).problem == "empty file"
    assert inspect_image(str(tmp_path / "nope.jpg")).problem == "missing file"


def test_truncated_jpeg_is_found_before_the_first_step(tmp_path: Path, capsys) -> None:
    photos = make_photos(tmp_path / "photos", suffix=".jpg")
    rows = read_rows_of_split(photos, tmp_path)
    bad = Path(rows[0])  # an image of a training class
    write_truncated_jpeg(bad)
    out = tmp_path / "run"
    args = ["train", "--config", str(DEMO), *TINY, "--data.name=folder", f"--data.root={photos}"]
    assert main([*args, f"--output.dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0  # one line
    assert str(bad) in err and "truncated JPEG" in err and "--data.on_bad_image=skip" in err
    assert not (out / "last").exists() and not (out / "metrics.jsonl").exists()
    # skipping it: the run trains without that file, and says so
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, f"--output.dir={tmp_path / 'run2'}", "--data.on_bad_image=skip"]) == 0
    assert any(str(bad) in str(w.message) for w in caught)
    # --data.validate=none: the old behaviour, the file is named when a batch reaches it
    cfg = load_config(
        DEMO,
        [
            *TINY,
            "--data.name=folder",
            f"--data.root={photos}",
            "--data.validate=none",
            f"--output.dir={tmp_path / 'run3'}",
            "--train.iterations=40",
        ],
    )
    with pytest.raises(DatasetError, match=str(bad)):
        train(cfg)


def read_rows_of_split(photos: Path, tmp_path: Path) -> list[str]:
    """Paths of the training part of ``photos`` (as the default split draws it)."""
    return build_dataset("folder", photos, "train").paths


def test_datasets_check_finds_each_problem(tmp_path: Path, capsys) -> None:
    root = tmp_path / "d"
    (root / "train").mkdir(parents=True)
    make_photos(root / "train", classes=3)
    make_photos(root / "test", classes=2, seed=1)
    report = check_dataset("folder", root)
    assert report.ok and report.endswith("result: OK")
    assert "images per class: min 4, median 4, max 4" in report
    assert "image sizes (w x h): smallest 16x16, median 16x16, largest 16x16" in report
    assert "modes: RGB 12; formats: PNG 12" in report

    # a single-image class and identical files within a split: warnings, still OK
    write_image(root / "train" / "lonely" / "x.png", seed=5)
    (root / "train" / "class_00" / "copy.png").write_bytes(
        (root / "train" / "class_00" / "0.png").read_bytes()
    )
    report = check_dataset("folder", root)
    assert report.ok and "1 classes with a single image" in report and "lonely" in report
    assert "1 groups of byte-identical files within a split (2 files)" in report

    # the same file in train and test: leakage, exit 1
    leak = root / "test" / "class_00" / "leak.png"
    leak.write_bytes((root / "train" / "class_01" / "1.png").read_bytes())
    report = check_dataset("folder", root)
    assert not report.ok and "LEAKAGE: 1 byte-identical files in more than one split" in report
    assert str(leak) in report
    assert main(["datasets", "check", "--dataset", "folder", "--root", str(root)]) == 1
    leak.unlink()

    # an unreadable file: named, exit 1
    cut = write_truncated_jpeg(root / "test" / "class_01" / "cut.jpg")
    report = check_dataset("folder", root)
    assert not report.ok and f"{cut}: truncated JPEG file" in report
    cut.unlink()
    assert main(["datasets", "check", "--dataset", "folder", "--root", str(root)]) == 0
    capsys.readouterr()


def test_datasets_check_conflicting_labels_and_unknown_name(tmp_path: Path, capsys) -> None:
    write_csv(tmp_path, [(1, "a.jpg", "train", "", ""), (2, "a.jpg", "train", "", "")])
    assert main(["datasets", "check", "--dataset", "csv", "--root", str(tmp_path)]) == 1
    assert "lines 2 and 3" in capsys.readouterr().out
    assert main(["datasets", "check", "--dataset", "cubb"]) == 2
    err = capsys.readouterr().err
    assert (
        "--dataset cubb: unknown data set 'cubb' (did you mean 'cub'?)" in err
        and err.count("\n") == 1
    )


def test_datasets_check_splits_data_without_a_split_as_a_run_would(tmp_path: Path, capsys) -> None:
    photos = make_photos(tmp_path / "p", classes=6)
    code = main(
        [
            "datasets",
            "check",
            "--config",
            str(DEMO),
            "--data.name=folder",
            f"--data.root={photos}",
            "--data.test_classes=2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "2 classes held out for testing" in out
    assert "train: images 16, classes 4" in out and "test: images 8, classes 2" in out
