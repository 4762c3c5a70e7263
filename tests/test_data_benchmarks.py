"""The four benchmarks on tiny fake trees in their official layouts."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from scipy.io import loadmat

from deepmetric.data import (
    SOURCES,
    DatasetCountWarning,
    DatasetError,
    MissingFileError,
    build_dataset,
    build_query_gallery,
    check_dataset,
)
from fake_layouts import (
    make_cars_annos,
    make_cars_devkit,
    make_cub,
    make_inshop,
    make_sop,
    write_garbage,
)

CUB_CLASSES = {1: 2, 2: 1, 100: 3, 101: 2, 150: 1, 200: 2}  # train: 6 images / 3 classes


def quiet(name, root, split="train", **options):
    """Build without the (expected) count warning of a fake tree."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DatasetCountWarning)
        return build_dataset(name, root, split, **options)


@pytest.fixture()
def official_as_fake(monkeypatch):
    """Replace the official numbers by those of a fake tree."""

    def set_counts(name: str, counts: dict[str, dict[str, int]]) -> None:
        for split, numbers in counts.items():
            monkeypatch.setitem(SOURCES[name].counts, split, numbers)

    return set_counts


# ------------------------------------------------------------------------------------- CUB
@pytest.mark.parametrize("at_parent", [True, False])
def test_cub_zero_shot_split_by_class_id(tmp_path: Path, at_parent: bool) -> None:
    parent = make_cub(tmp_path, CUB_CLASSES)
    root = parent if at_parent else parent / "CUB_200_2011"
    train = quiet("cub", root, "train")
    test = quiet("cub", root, "test")
    assert train.counts() == {"images": 6, "classes": 3}
    assert test.counts() == {"images": 5, "classes": 3}
    assert train.class_ids.tolist() == [1, 2, 100]
    assert test.class_ids.tolist() == [101, 150, 200]
    assert train.labels.dtype == torch.long
    assert train.labels.tolist() == [0, 0, 1, 2, 2, 2]
    assert test.labels.tolist() == [0, 0, 1, 2, 2]
    assert train.class_names[0] == "001.Bird_1"
    image, label = test[4]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 12, 16)
    assert label == 2 and int(test.class_ids[label]) == 200
    # train_test_split.txt (every image "training") was not used
    assert set(train.class_ids.tolist()).isdisjoint(test.class_ids.tolist())


def test_official_numbers() -> None:
    OFFICIAL_COUNTS = {name: source.counts for name, source in SOURCES.items()}
    assert OFFICIAL_COUNTS["cub"]["train"] == {"images": 5864, "classes": 100}
    assert OFFICIAL_COUNTS["cub"]["test"] == {"images": 5924, "classes": 100}
    assert OFFICIAL_COUNTS["cars196"]["train"] == {"images": 8054, "classes": 98}
    assert OFFICIAL_COUNTS["cars196"]["test"] == {"images": 8131, "classes": 98}
    assert OFFICIAL_COUNTS["sop"]["train"] == {"images": 59551, "classes": 11318}
    assert OFFICIAL_COUNTS["sop"]["test"] == {"images": 60502, "classes": 11316}
    inshop = OFFICIAL_COUNTS["inshop"]
    assert inshop["train"] == {"images": 25882, "classes": 3997}
    assert inshop["query"] == {"images": 14218, "classes": 3985}
    assert inshop["gallery"] == {"images": 12612, "classes": 3985}


@pytest.mark.parametrize(
    ("name", "maker", "split", "fake"),
    [
        ("cub", lambda p: make_cub(p, CUB_CLASSES), "train", {"images": 6, "classes": 3}),
        ("cub", lambda p: make_cub(p, CUB_CLASSES), "test", {"images": 5, "classes": 3}),
        (
            "cars196",
            lambda p: make_cars_annos(p, {1: 2, 98: 1, 99: 3}),
            "train",
            {"images": 3, "classes": 2},
        ),
        (
            "cars196",
            lambda p: make_cars_annos(p, {1: 2, 98: 1, 99: 3}),
            "test",
            {"images": 3, "classes": 1},
        ),
        ("sop", lambda p: make_sop(p, {1: 2, 2: 2}, {3: 2}), "train", {"images": 4, "classes": 2}),
        ("sop", lambda p: make_sop(p, {1: 2, 2: 2}, {3: 2}), "test", {"images": 2, "classes": 1}),
    ],
)
def test_counts_vs_official(tmp_path, official_as_fake, name, maker, split, fake) -> None:
    root = maker(tmp_path)
    official = SOURCES[name].counts[split]
    # differing counts: a warning naming the difference ...
    with pytest.warns(DatasetCountWarning) as record:
        build_dataset(name, root, split)
    message = str(record[0].message)
    assert f"{fake['images']} images (official {official['images']:,})" in message
    assert f"{name} {split}" in message
    # ... an error with strict=True ...
    with pytest.raises(DatasetError, match="official"):
        build_dataset(name, root, split, strict=True)
    # ... and nothing when they match.
    official_as_fake(name, {split: fake})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = build_dataset(name, root, split, strict=True)
    assert ds.counts() == fake


def test_cub_errors(tmp_path: Path) -> None:
    root = make_cub(tmp_path, CUB_CLASSES) / "CUB_200_2011"
    labels = (root / "image_class_labels.txt").read_text().splitlines()

    bad = labels.copy()
    bad[2] = "3 abc"
    (root / "image_class_labels.txt").write_text("\n".join(bad) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt, line 3: class id 'abc'"):
        quiet("cub", root)

    bad = labels.copy()
    bad[1] = "2 1 extra"
    (root / "image_class_labels.txt").write_text("\n".join(bad) + "\n")
    with pytest.raises(DatasetError, match=r"image_class_labels\.txt, line 2: expected 2"):
        quiet("cub", root)

    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    classes = (root / "classes.txt").read_text()
    (root / "classes.txt").write_text(classes + "7 007.Empty_Bird\n")
    with pytest.raises(DatasetError, match=r"classes\.txt, class 7 .*empty class"):
        quiet("cub", root)

    (root / "classes.txt").write_text(classes)
    (root / "images.txt").unlink()
    with pytest.raises(MissingFileError, match=r"images\.txt"):
        quiet("cub", root)


def test_cub_bad_images_lazy_verify_and_skip(tmp_path: Path) -> None:
    root = make_cub(tmp_path, CUB_CLASSES) / "CUB_200_2011"
    first = root / "images" / (root / "images.txt").read_text().split()[5]  # class 2's only
    write_garbage(first)
    ds = quiet("cub", root)  # lazily checked: construction works ...
    assert len(ds) == 6
    ds[0]
    with pytest.raises(DatasetError, match=first.name):  # ... the image raises, naming it
        ds[2]
    with pytest.raises(DatasetError, match=first.name):
        quiet("cub", root, validate="header")
    with pytest.warns(UserWarning, match="skipped 1 of 6 images"):
        ds = quiet("cub", root, validate="header", on_bad_image="skip")
    assert len(ds) == 5 and ds.bad_images[0][0] == str(first)
    # the emptied class disappears and the labels stay contiguous
    assert ds.labels.tolist() == [0, 0, 1, 1, 1] and ds.class_ids.tolist() == [1, 100]

    first.unlink()  # a missing image is caught at construction
    with pytest.raises(MissingFileError, match=f"1 of 6 images .* missing.*{first.name}"):
        quiet("cub", root)


# ------------------------------------------------------------------------------------ Cars196
def test_fake_cars_mat_has_the_official_structure(tmp_path: Path) -> None:
    make_cars_annos(tmp_path, {1: 1, 99: 1})
    ann = loadmat(tmp_path / "cars_annos.mat")["annotations"]
    assert ann.shape == (1, 2)
    assert ann.dtype.names == (
        "relative_im_path",
        "bbox_x1",
        "bbox_y1",
        "bbox_x2",
        "bbox_y2",
        "class",
        "test",
    )
    assert ann[0, 0]["relative_im_path"].shape == (1,)
    assert ann[0, 0]["class"].shape == (1, 1)
    make_cars_devkit(tmp_path, {1: 1}, {99: 1})
    ann = loadmat(tmp_path / "devkit" / "cars_train_annos.mat")["annotations"]
    assert ann.dtype.names == ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def test_cars_layout_a(tmp_path: Path) -> None:
    root = make_cars_annos(tmp_path, {1: 2, 50: 1, 98: 1, 99: 3, 196: 1})
    train, test = quiet("cars196", root, "train"), quiet("cars196", root, "test")
    assert train.counts() == {"images": 4, "classes": 3}
    assert test.counts() == {"images": 4, "classes": 2}
    assert train.class_ids.tolist() == [1, 50, 98]
    assert test.class_ids.tolist() == [99, 196]
    assert test.labels.tolist() == [0, 0, 0, 1]
    assert train[3][0].shape == (3, 12, 16)


@pytest.mark.parametrize("in_devkit", [False, True])
def test_cars_devkit_layout_merges_then_splits_by_class(tmp_path: Path, in_devkit) -> None:
    # the devkit's own split mixes every class on both sides: it must not be used
    root = make_cars_devkit(
        tmp_path, {1: 2, 99: 1, 150: 1}, {1: 1, 98: 1, 99: 2}, test_annos_in_devkit=in_devkit
    )
    train, test = quiet("cars196", root, "train"), quiet("cars196", root, "test")
    assert train.counts() == {"images": 4, "classes": 2}
    assert test.counts() == {"images": 4, "classes": 2}
    assert train.class_ids.tolist() == [1, 98]
    assert test.class_ids.tolist() == [99, 150]
    assert sum(p.split("/")[-2] == "cars_test" for p in train.paths) == 2


def test_cars_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match=r"cars_annos\.mat"):
        build_dataset("cars196", tmp_path)
    root = make_cars_devkit(tmp_path, {1: 1}, {99: 1})
    (root / "devkit" / "cars_train_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match=r"cannot read .*cars_train_annos\.mat"):
        build_dataset("cars196", root)
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(MissingFileError, match="cars_test_annos_withlabels"):
        build_dataset("cars196", root)


# ---------------------------------------------------------------------------------------- SOP
def test_sop(tmp_path: Path) -> None:
    root = make_sop(tmp_path, {1: 2, 2: 3, 5: 1}, {7: 2, 9: 1})
    train, test = quiet("sop", root, "train"), quiet("sop", root, "test")
    assert train.counts() == {"images": 6, "classes": 3}
    assert test.counts() == {"images": 3, "classes": 2}
    assert train.class_ids.tolist() == [1, 2, 5]
    assert test.class_ids.tolist() == [7, 9]
    # super-classes kept: class c has super-class c % 3 + 1
    assert train.super_labels is not None
    supers = train.super_class_ids[train.super_labels]
    assert supers.tolist() == [(int(c) % 3) + 1 for c in train.class_ids[train.labels]]
    assert quiet("sop", root / "Stanford_Online_Products", "test").counts() == test.counts()
    assert test[2][0].shape == (3, 12, 16)


def test_sop_errors(tmp_path: Path) -> None:
    root = make_sop(tmp_path, {1: 2}, {2: 1}) / "Stanford_Online_Products"
    text = (root / "Ebay_train.txt").read_text().splitlines()
    (root / "Ebay_train.txt").write_text("\n".join(text[1:]) + "\n")
    with pytest.raises(DatasetError, match=r"Ebay_train\.txt, line 1: expected the header"):
        quiet("sop", root)
    (root / "Ebay_train.txt").write_text("\n".join([*text, "9 3 1"]) + "\n")
    with pytest.raises(DatasetError, match=r"Ebay_train\.txt, line 4: expected 4 fields"):
        quiet("sop", root)
    (root / "Ebay_train.txt").write_text("\n".join([*text, "9 x 1 a.jpg"]) + "\n")
    with pytest.raises(DatasetError, match=r"line 4: class id 'x' is not an integer"):
        quiet("sop", root)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("sop", root, "validation")


# ------------------------------------------------------------------------------------ In-Shop
INSHOP_ROWS = [
    ("id_00000001", 1, "train"),
    ("id_00000001", 2, "train"),
    ("id_00000005", 1, "train"),
    ("id_00000002", 1, "query"),
    ("id_00000002", 2, "gallery"),
    ("id_00000002", 3, "gallery"),
    ("id_00000009", 1, "gallery"),
    ("id_00000003", 1, "query"),
    ("id_00000003", 2, "gallery"),
    ("id_00000009", 2, "query"),
]


@pytest.mark.filterwarnings("ignore::deepmetric.data.DatasetCountWarning")
@pytest.mark.parametrize("img_at_root", [False, True])
def test_inshop(tmp_path: Path, img_at_root: bool) -> None:
    root = make_inshop(tmp_path, INSHOP_ROWS, img_at_root=img_at_root)
    train = quiet("inshop", root, "train")
    assert train.counts() == {"images": 3, "classes": 2}
    assert train.class_ids.tolist() == [1, 5]
    assert train.class_names == ["id_00000001", "id_00000005"]
    assert train.is_query is None

    query, gallery = quiet("inshop", root, "query"), quiet("inshop", root, "gallery")
    assert (query.role, gallery.role) == ("query", "gallery")
    assert query.counts() == {"images": 3, "classes": 3}
    assert gallery.counts() == {"images": 4, "classes": 3}
    # one joint label map: same ids behind the same labels
    assert query.class_ids.tolist() == gallery.class_ids.tolist() == [2, 3, 9]
    assert query.class_names == ["id_00000002", "id_00000003", "id_00000009"]
    assert query.labels.tolist() == [0, 1, 2]
    assert gallery.labels.tolist() == [0, 0, 2, 1]

    test = quiet("inshop", root, "test")
    assert test.counts() == {
        "images": 7,
        "classes": 3,
        "query_images": 3,
        "gallery_images": 4,
        "query_classes": 3,
        "gallery_classes": 3,
    }
    q2, g2 = build_query_gallery("inshop", root)
    assert q2.labels.tolist() == query.labels.tolist()
    assert g2.paths == gallery.paths
    assert query[0][0].shape == (3, 12, 16)


@pytest.mark.filterwarnings("ignore::deepmetric.data.DatasetCountWarning")
def test_inshop_joint_map_when_an_item_has_no_query(tmp_path: Path) -> None:
    rows = [
        ("id_00000002", 1, "query"),
        ("id_00000002", 2, "gallery"),
        ("id_00000001", 1, "gallery"),
    ]
    root = make_inshop(tmp_path, rows)
    query, gallery = build_query_gallery("inshop", root)
    # labels index one map over both sets, never a per-set re-indexing
    assert query.class_ids.tolist() == gallery.class_ids.tolist() == [1, 2]
    assert query.labels.tolist() == [1] and gallery.labels.tolist() == [1, 0]


def test_inshop_errors(tmp_path: Path) -> None:
    root = make_inshop(tmp_path, INSHOP_ROWS)
    partition = root / "Eval" / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    partition.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DatasetError, match="announces 10 images but 9"):
        quiet("inshop", root)
    partition.write_text("\n".join([*lines[:-1], lines[-1].replace("query", "val")]) + "\n")
    with pytest.raises(DatasetError, match=r"list_eval_partition\.txt, line 12: evaluation_st"):
        quiet("inshop", root)
    partition.write_text("\n".join([lines[0], "image item status", *lines[2:]]) + "\n")
    with pytest.raises(DatasetError, match="line 2: expected the header"):
        quiet("inshop", root)
    partition.unlink()
    with pytest.raises(MissingFileError, match="list_eval_partition"):
        quiet("inshop", root)


# -------------------------------------------------------------------------------- check_dataset
def test_check_dataset_report(tmp_path: Path) -> None:
    root = make_cub(tmp_path, CUB_CLASSES) / "CUB_200_2011"
    report = check_dataset("cub", root)
    assert not report.ok  # a fake tree never has the official counts
    assert "train: images 6, classes 3" in report
    assert "counts differ from the official ones" in report
    assert report.splitlines()[-1].startswith("result: 2 problem(s)")

    bad = root / "images" / (root / "images.txt").read_text().split()[1]
    write_garbage(bad)
    report = check_dataset("cub", root, splits="train")
    assert f"      {bad}: UnidentifiedImageError" in report

    report = check_dataset("cub", tmp_path / "nowhere")
    assert "ERROR" in report and not report.ok

    report = check_dataset("digits")
    assert report.ok and report.endswith("result: OK")
