"""List files, class folders, OML CSV files, and the bad-input errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import ImageFile

from deepmetric.data import (
    DatasetError,
    MissingFileError,
    build_dataset,
    build_query_gallery,
    open_image,
)
from fake_layouts import make_folder, write_garbage, write_image, write_truncated_jpeg


def write_list(root: Path, name: str, rows: list[tuple[str, int]]) -> Path:
    for k, (rel, _) in enumerate(rows):
        if not (root / rel).exists():
            write_image(root / rel, seed=k)
    path = root / name
    path.write_text("".join(f"{rel} {label}\n" for rel, label in rows))
    return path


# ---------------------------------------------------------------------------------- lists
def test_list_file(tmp_path: Path) -> None:
    write_list(tmp_path, "train.txt", [("a/1.jpg", 7), ("a/2.jpg", 7), ("b/1.png", 3)])
    write_image(tmp_path / "c d" / "x y.jpg")
    # any whitespace between the fields, the label is the last token (paths with spaces ok),
    # blank lines skipped
    (tmp_path / "test.txt").write_text("c d/x y.jpg\t12\n\n  b/1.png    3  \n")
    train = build_dataset("list", tmp_path, "train")
    assert train.labels.tolist() == [1, 1, 0]
    assert train.class_ids.tolist() == [3, 7]
    assert train.counts() == {"images": 3, "classes": 2}
    test = build_dataset("list", tmp_path, "test")
    assert test.class_ids.tolist() == [3, 12] and test.labels.tolist() == [1, 0]
    assert test[0][0].shape == (3, 12, 16)
    # research-ms-loss style "path,label" and an explicit file elsewhere
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "mine.csv").write_text("a/1.jpg,4\nb/1.png,5\n")
    mine = build_dataset("list", tmp_path, "all", list_file="lists/mine.csv")
    assert mine.class_ids.tolist() == [4, 5]


def test_list_query_gallery_joint_map(tmp_path: Path) -> None:
    write_list(tmp_path, "query.txt", [("q/1.jpg", 40), ("q/2.jpg", 10)])
    write_list(tmp_path, "gallery.txt", [("g/1.jpg", 10), ("g/2.jpg", 20), ("g/3.jpg", 40)])
    query, gallery = build_query_gallery("list", tmp_path)
    assert query.class_ids.tolist() == gallery.class_ids.tolist() == [10, 20, 40]
    assert query.labels.tolist() == [2, 0] and gallery.labels.tolist() == [0, 1, 2]
    test = build_dataset("list", tmp_path, "test")
    assert test.counts()["query_images"] == 2 and test.counts()["gallery_images"] == 3
    assert build_dataset("list", tmp_path, "gallery").labels.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("a/1.jpg 1\nlonely\n", r"train\.txt, line 2: expected 'path label'"),
        ("a/1.jpg 1\n\na/1.jpg one\n", r"train\.txt, line 3: label 'one' is not an integer"),
        ("a/1.jpg 1.5\n", r"train\.txt, line 1: label '1.5' is not an integer"),
        ("", r"train\.txt: no images listed"),
    ],
)
def test_list_errors(tmp_path: Path, content: str, message: str) -> None:
    write_image(tmp_path / "a" / "1.jpg")
    (tmp_path / "train.txt").write_text(content)
    with pytest.raises(DatasetError, match=message):
        build_dataset("list", tmp_path, "train")


def test_missing_list_and_images(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"train\.txt"):
        build_dataset("list", tmp_path, "train")
    (tmp_path / "train.txt").write_text("a/1.jpg 1\na/2.jpg 1\n")
    write_image(tmp_path / "a" / "1.jpg")
    with pytest.raises(MissingFileError, match=r"1 of 2 images .* are missing: .*a/2\.jpg"):
        build_dataset("list", tmp_path, "train")
    with pytest.warns(UserWarning, match=r"skipped 1 of 2 images .*on_bad_image=skip"):
        ds = build_dataset("list", tmp_path, "train", on_bad_image="skip")
    assert len(ds) == 1
    with pytest.raises(ValueError, match="on_bad_image"):
        build_dataset("list", tmp_path, "train", on_bad_image="ignore")


def test_truncated_and_unreadable_images(tmp_path: Path) -> None:
    truncated = write_truncated_jpeg(tmp_path / "a" / "cut.jpg")
    garbage = write_garbage(tmp_path / "b" / "junk.png")
    write_image(tmp_path / "b" / "ok.png")
    (tmp_path / "train.txt").write_text("a/cut.jpg 0\nb/junk.png 1\nb/ok.png 1\n")
    ds = build_dataset("list", tmp_path, "train")
    assert ds.labels.tolist() == [0, 1, 1]  # labels without opening any image
    with pytest.raises(DatasetError, match=r"cannot read image .*cut\.jpg.*truncated"):
        ds[0]
    with pytest.raises(DatasetError, match=r"cannot read image .*junk\.png"):
        ds[1]
    assert ds[2][1] == 1
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # nothing global was changed
    for level in ("header", "decode"):
        with pytest.raises(DatasetError, match=r"2 of 3 images .* cannot be used: .*cut\.jpg"):
            build_dataset("list", tmp_path, "train", validate=level)
    with pytest.warns(UserWarning, match="skipped 2 of 3 images"):
        ds = build_dataset("list", tmp_path, "train", validate="header", on_bad_image="skip")
    assert len(ds) == 1 and ds.class_ids.tolist() == [1] and ds.labels.tolist() == [0]
    assert {p for p, _ in ds.bad_images} == {str(truncated), str(garbage)}
    with pytest.raises(MissingFileError, match=r"nope\.jpg"):
        open_image(tmp_path / "nope.jpg")


# -------------------------------------------------------------------------------- folders
def test_folder_per_class(tmp_path: Path) -> None:
    make_folder(tmp_path, {"zebra": 2, "ant": 3})
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    write_image(tmp_path / "ant" / "deeper" / "x.JPG")
    ds = build_dataset("folder", tmp_path, "all")
    assert ds.class_names == ["ant", "zebra"]
    assert ds.class_ids.tolist() == [0, 1]
    assert ds.counts() == {"images": 6, "classes": 2}
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1]
    assert ds[5][0].shape == (3, 12, 16)


def test_folder_split_subfolders_and_numeric_names(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"10": 1, "9": 2})
    make_folder(tmp_path / "test", {"101": 1})
    train = build_dataset("folder", tmp_path, "train")
    assert train.class_ids.tolist() == [9, 10] and train.labels.tolist() == [1, 0, 0]
    assert train.class_names == ["9", "10"]
    assert build_dataset("folder", tmp_path, "test").class_ids.tolist() == [101]


def test_folder_errors(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": 1})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty class folder .*empty"):
        build_dataset("folder", tmp_path)
    with pytest.raises(MissingFileError, match="directory not found"):
        build_dataset("folder", tmp_path / "missing")


# ------------------------------------------------------------------------------------ CSV
CSV_ROWS = [
    # label, path, split, is_query, is_gallery
    (5, "im/0.jpg", "train", "", ""),
    (5, "im/1.jpg", "train", "", ""),
    (2, "im/2.jpg", "train", "", ""),
    (30, "im/3.jpg", "validation", "1", "0"),
    (30, "im/4.jpg", "validation", "0", "1"),
    (11, "im/5.jpg", "validation", "1", "1"),
    (11, "im/6.jpg", "validation", "1", "1"),
    (12, "im/7.jpg", "validation", "False", "True"),
]


def write_csv(
    root: Path, rows=CSV_ROWS, header="label,path,split,is_query,is_gallery", name="df.csv"
) -> Path:
    lines = [header]
    for k, row in enumerate(rows):
        write_image(root / row[1], seed=k)
        lines.append(",".join(str(x) for x in row))
    path = root / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_oml_format(tmp_path: Path) -> None:
    file = write_csv(tmp_path)
    train = build_dataset("csv", tmp_path, "train")
    assert train.class_ids.tolist() == [2, 5] and train.labels.tolist() == [1, 1, 0]
    assert train.is_query is None
    test = build_dataset("csv", file, "test")  # root may be the file itself
    assert test.class_ids.tolist() == [11, 12, 30]
    assert test.is_query.tolist() == [True, False, True, True, False]
    assert test.is_gallery.tolist() == [False, True, True, True, True]
    assert test.counts() == {
        "images": 5,
        "classes": 3,
        "query_images": 3,
        "gallery_images": 4,
        "query_classes": 2,
        "gallery_classes": 3,
    }
    query, gallery = build_query_gallery("csv", tmp_path)
    # rows both query and gallery (1-vs-rest) are in both; one label map
    assert query.labels.tolist() == [2, 0, 0] and gallery.labels.tolist() == [2, 0, 0, 1]
    assert query.class_ids.tolist() == gallery.class_ids.tolist()
    assert build_dataset("csv", tmp_path, "query").role == "query"
    assert build_dataset("csv", tmp_path, "validation").counts()["images"] == 5


def test_csv_without_split_column(tmp_path: Path) -> None:
    write_csv(tmp_path, [(1, "a.png"), (4, "b.png")], header="label,path", name="mine.csv")
    ds = build_dataset("csv", tmp_path, "all", csv_file="mine.csv")
    assert ds.class_ids.tolist() == [1, 4]
    train = build_dataset("csv", tmp_path, csv_file="mine.csv")  # half the classes each
    test = build_dataset("csv", tmp_path / "mine.csv", "test")
    assert len(train.class_ids) == len(test.class_ids) == 1
    assert set(train.class_ids.tolist()) | set(test.class_ids.tolist()) == {1, 4}


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([(1, "a.png")], "path", r"line 1: missing columns \['label'\]"),
        ([("x", "a.png")], "label,path", r"df\.csv, line 2: label 'x' is not an integer"),
        (
            [(1, "a.png", "test", "", "")],
            "label,path,split,is_query,is_gallery",
            r"line 2: split 'test' is not train or validation",
        ),
        (
            [(1, "a.png", "validation", "0", "0")],
            "label,path,split,is_query,is_gallery",
            r"line 2: row is neither query nor gallery",
        ),
        (
            [(1, "a.png", "validation", "maybe", "1")],
            "label,path,split,is_query,is_gallery",
            r"line 2: is_query 'maybe' is not a boolean",
        ),
    ],
)
def test_csv_errors(tmp_path: Path, rows, header, message) -> None:
    write_csv(tmp_path, rows, header=header)
    with pytest.raises(DatasetError, match=message):
        build_dataset("csv", tmp_path, "test")


def test_csv_malformed_row_and_missing_file(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    (tmp_path / "df.csv").write_text("label,path\n1,a.png\n2\n")
    with pytest.raises(DatasetError, match=r"df\.csv, line 3: expected 2 fields"):
        build_dataset("csv", tmp_path)
    with pytest.raises(MissingFileError, match=r"other\.csv"):
        build_dataset("csv", tmp_path, csv_file="other.csv")


def test_unknown_name_and_labels_tensor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        build_dataset("mnist")
    write_list(tmp_path, "train.txt", [("a.jpg", 0)])
    ds = build_dataset("list", tmp_path)
    assert isinstance(ds.labels, torch.Tensor) and ds.labels.dtype == torch.long
