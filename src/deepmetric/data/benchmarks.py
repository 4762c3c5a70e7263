"""The four deep-metric-learning benchmarks in their official layouts, with the zero-shot split.

| name    | train                          | test                                |
|---------|--------------------------------|-------------------------------------|
| cub     | classes 1-100: 5,864 images    | classes 101-200: 5,924              |
| cars196 | classes 1-98: 8,054            | classes 99-196: 8,131               |
| sop     | Ebay_train.txt: 59,551 / 11,318| Ebay_test.txt: 60,502 / 11,316      |
| inshop  | 25,882 images / 3,997 items    | query 14,218 + gallery 12,612 / 3,985 items |

Counts that differ from these raise a :class:`DatasetCountWarning` (a :class:`DatasetError`
with ``strict=True``). CUB's ``train_test_split.txt`` and the Cars devkit's train/test split are
classification splits and are *not* used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from .base import (
    DatasetError,
    DataSource,
    ImageDataset,
    MissingFileError,
    RootRequiredError,
    check_counts,
    parse_int,
    read_lines,
    require_file,
)

# Deferred import: scipy.io (Cars196's .mat files only), inside _loadmat.

__all__ = [
    "CARS196",
    "CUB",
    "INSHOP",
    "SOP",
    "load_cars196",
    "load_cub",
    "load_inshop",
    "load_sop",
]

#: The K of Recall@K of CUB and Cars196: 1, 2, 4, 8 as in the papers (e.g. Wang et al.,
#: "Multi-Similarity Loss", CVPR 2019) plus 16 and 32 as the Deep_Metric code reports.
_SMALL_RECALL_AT = (1, 2, 4, 8, 16, 32)
_SMALL_RECALL_SOURCE = "the papers' 1-8 (Wang et al., CVPR 2019) and Deep_Metric's 16, 32"

# Zero-shot split by original class id (1-based, inclusive ranges).
CLASS_RANGES = {
    "cub": {"train": (1, 100), "test": (101, 200)},
    "cars196": {"train": (1, 98), "test": (99, 196)},
}


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"{name}: unknown split {split!r}; use one of {list(allowed)}")


def _find_root(
    root: str | os.PathLike | None, marker: str, subdirs: tuple[str, ...], source: DataSource
) -> str:
    """The folder holding ``marker``: ``root`` itself or one of ``root/subdir``."""
    name = source.name
    if root is None:
        raise RootRequiredError(name, source.root)
    root = os.fspath(root)
    for candidate in (root, *(os.path.join(root, s) for s in subdirs)):
        if os.path.exists(os.path.join(candidate, marker)):
            return candidate
    tried = ", ".join(
        os.path.join(c, marker) for c in (root, *(os.path.join(root, s) for s in subdirs))
    )
    raise MissingFileError(f"{name}: file not found: {tried}")


def _split_pairs(path: str, ncols: int) -> list[tuple[int, list[str]]]:
    """(line number, tokens) of a whitespace-separated file with ``ncols`` columns."""
    rows = []
    for n, text in read_lines(path):
        tokens = text.split()
        if len(tokens) != ncols:
            raise DatasetError(
                f"{path}, line {n}: expected {ncols} fields, got {len(tokens)}: {text!r}"
            )
        rows.append((n, tokens))
    return rows


# --------------------------------------------------------------------------------------- CUB
def load_cub(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    *,
    strict: bool = False,
) -> ImageDataset:
    """CUB-200-2011 (``root`` = ``CUB_200_2011/`` or its parent).

    Reads ``images.txt`` (image_id path), ``image_class_labels.txt`` (image_id class_id) and
    ``classes.txt`` (class_id name); images under ``images/``. Split: "train" = classes
    1-100, "test" = classes 101-200, "all". ``class_ids`` are the 1-based official ids.
    """
    _check_split("cub", split, ("train", "test", "all"))
    base = _find_root(root, "images.txt", ("CUB_200_2011",), CUB)
    images_txt = os.path.join(base, "images.txt")
    labels_txt = os.path.join(base, "image_class_labels.txt")
    classes_txt = os.path.join(base, "classes.txt")

    paths: dict[int, str] = {}
    for n, (img_id, rel) in _split_pairs(images_txt, 2):
        i = parse_int(img_id, images_txt, n, "image id")
        if i in paths:
            raise DatasetError(f"{images_txt}, line {n}: duplicate image id {i}")
        paths[i] = rel
    class_of: dict[int, int] = {}
    for n, (img_id, cls) in _split_pairs(labels_txt, 2):
        i = parse_int(img_id, labels_txt, n, "image id")
        if i not in paths:
            raise DatasetError(f"{labels_txt}, line {n}: image id {i} is not in {images_txt}")
        if i in class_of:
            raise DatasetError(f"{labels_txt}, line {n}: duplicate image id {i}")
        class_of[i] = parse_int(cls, labels_txt, n, "class id")
    class_names: dict[int, str] = {}
    for n, text in read_lines(classes_txt):
        tokens = text.split(maxsplit=1)
        if len(tokens) != 2:
            raise DatasetError(f"{classes_txt}, line {n}: expected 'class_id name': {text!r}")
        class_names[parse_int(tokens[0], classes_txt, n, "class id")] = tokens[1]
    unlabelled = sorted(set(paths) - set(class_of))
    if unlabelled:
        raise DatasetError(
            f"{labels_txt}: no class for {len(unlabelled)} image ids of "
            f"{images_txt}, e.g. {unlabelled[:5]}"
        )
    unknown = sorted({c for c in class_of.values() if c not in class_names})
    if unknown:
        raise DatasetError(f"{labels_txt}: class ids {unknown[:5]} are not in {classes_txt}")
    used = set(class_of.values())
    empty = [c for c in sorted(class_names) if c not in used]
    if empty:
        raise DatasetError(
            f"{classes_txt}, class {empty[0]} ({class_names[empty[0]]}): empty "
            f"class, no image in {labels_txt}"
            + (f" ({len(empty)} empty classes)" if len(empty) > 1 else "")
        )

    lo, hi = CLASS_RANGES["cub"].get(split, (-(2**62), 2**62))
    ids = [i for i in sorted(paths) if lo <= class_of[i] <= hi]
    if not ids:
        raise DatasetError(f"cub {split}: no image with a class id in {lo}..{hi}")
    ds = ImageDataset(
        [os.path.join(base, "images", paths[i]) for i in ids],
        [class_of[i] for i in ids],
        name="cub",
        split=split,
        transform=transform,
    )
    ds.class_names = [class_names[int(c)] for c in ds.class_ids]
    check_counts(ds, CUB.counts.get(split), strict=strict)
    return ds


CUB = DataSource(
    "cub",
    load_cub,
    root="the CUB_200_2011 folder (images.txt, image_class_labels.txt, classes.txt, images/) "
    "or its parent; from the Caltech-UCSD Birds-200-2011 site",
    aliases=("cub200", "cub-200-2011", "cub_200_2011"),
    official_split=True,
    recall_at=_SMALL_RECALL_AT,
    recall_at_source=_SMALL_RECALL_SOURCE,
    counts={
        "train": {"images": 5864, "classes": 100},
        "test": {"images": 5924, "classes": 100},
    },
)


# ------------------------------------------------------------------------------------- Cars196
def _loadmat(path: str) -> dict[str, Any]:
    from scipy.io import loadmat

    try:
        return loadmat(path)
    except Exception as e:  # scipy raises ValueError/TypeError/... on a corrupt file
        raise DatasetError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _mat_value(value: Any) -> Any:
    """A scalar from a loadmat cell such as ``array([[1]])`` or ``array(['a.jpg'])``."""
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"expected one value, got {flat.size}")
    v = flat[0]
    return str(v) if isinstance(v, str) else v


def _mat_annotations(path: str, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    """The ``annotations`` struct array of a Stanford Cars .mat file as a list of dicts."""
    mat = _loadmat(path)
    if "annotations" not in mat:
        raise DatasetError(f"{path}: no 'annotations' variable (found {sorted(mat)})")
    ann = np.asarray(mat["annotations"]).reshape(-1)
    names = ann.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise DatasetError(f"{path}: annotations lack the fields {missing} (have {list(names)})")
    rows = []
    for k, record in enumerate(ann):
        try:
            rows.append({f: _mat_value(record[f]) for f in fields})
        except ValueError as e:
            raise DatasetError(f"{path}: annotation {k + 1}: {e}") from e
    return rows


def _cars_class(value: Any, path: str, k: int) -> int:
    try:
        c = int(value)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: annotation {k + 1}: class {value!r} is not an integer") from e
    if not 1 <= c <= 196:
        raise DatasetError(f"{path}: annotation {k + 1}: class {c} outside 1..196")
    return c


def load_cars196(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    *,
    strict: bool = False,
) -> ImageDataset:
    """Stanford Cars 196, split by class: "train" = classes 1-98, "test" = 99-196, "all".

    Layout A: ``cars_annos.mat`` + ``car_ims/``. Layout B (devkit): ``cars_train/``,
    ``cars_test/``, ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (at the
    root or in ``devkit/``); both halves are merged, then split by class. Images uncropped.
    """
    _check_split("cars196", split, ("train", "test", "all"))
    if root is None:
        raise RootRequiredError("cars196", CARS196.root)
    root = os.fspath(root)
    annos = os.path.join(root, "cars_annos.mat")
    paths: list[str] = []
    classes: list[int] = []
    if os.path.isfile(annos):
        for k, row in enumerate(_mat_annotations(annos, ("relative_im_path", "class"))):
            paths.append(os.path.join(root, str(row["relative_im_path"])))
            classes.append(_cars_class(row["class"], annos, k))
    else:
        train_mat = os.path.join(root, "devkit", "cars_train_annos.mat")
        test_candidates = [
            os.path.join(root, "cars_test_annos_withlabels.mat"),
            os.path.join(root, "devkit", "cars_test_annos_withlabels.mat"),
        ]
        if not os.path.isfile(train_mat):
            raise MissingFileError(
                f"cars196: file not found: {annos} (layout A) or {train_mat} (devkit layout)"
            )
        test_mat = next((p for p in test_candidates if os.path.isfile(p)), None)
        if test_mat is None:
            raise MissingFileError(
                "cars196: file not found: "
                + " or ".join(test_candidates)
                + " (the devkit's cars_test_annos.mat has no labels; the labelled file is "
                "shipped separately)"
            )
        for mat, folder in ((train_mat, "cars_train"), (test_mat, "cars_test")):
            for k, row in enumerate(_mat_annotations(mat, ("fname", "class"))):
                paths.append(os.path.join(root, folder, str(row["fname"])))
                classes.append(_cars_class(row["class"], mat, k))

    lo, hi = CLASS_RANGES["cars196"].get(split, (1, 196))
    keep = [i for i, c in enumerate(classes) if lo <= c <= hi]
    if not keep:
        raise DatasetError(f"cars196 {split}: no image with a class id in {lo}..{hi}")
    ds = ImageDataset(
        [paths[i] for i in keep],
        [classes[i] for i in keep],
        name="cars196",
        split=split,
        transform=transform,
    )
    check_counts(ds, CARS196.counts.get(split), strict=strict)
    return ds


CARS196 = DataSource(
    "cars196",
    load_cars196,
    root="the Stanford Cars folder (cars_annos.mat and car_ims/, or the devkit layout)",
    aliases=("cars", "cars-196", "stanford_cars"),
    official_split=True,
    recall_at=_SMALL_RECALL_AT,
    recall_at_source=_SMALL_RECALL_SOURCE,
    counts={
        "train": {"images": 8054, "classes": 98},
        "test": {"images": 8131, "classes": 98},
    },
)


# ----------------------------------------------------------------------------------------- SOP
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def _read_sop(path: str) -> tuple[list[str], list[int], list[int]]:
    lines = read_lines(path)
    if not lines or lines[0][1].split() != SOP_HEADER:
        got = lines[0][1] if lines else "an empty file"
        raise DatasetError(
            f"{path}, line 1: expected the header {' '.join(SOP_HEADER)!r}, got {got!r}"
        )
    rel, cls, sup = [], [], []
    for n, text in lines[1:]:
        tokens = text.split()
        if len(tokens) != 4:
            raise DatasetError(
                f"{path}, line {n}: expected 4 fields "
                f"(image_id class_id super_class_id path), got {text!r}"
            )
        parse_int(tokens[0], path, n, "image id")
        cls.append(parse_int(tokens[1], path, n, "class id"))
        sup.append(parse_int(tokens[2], path, n, "super class id"))
        rel.append(tokens[3])
    return rel, cls, sup


def load_sop(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    *,
    strict: bool = False,
) -> ImageDataset:
    """Stanford Online Products (``root`` = ``Stanford_Online_Products/`` or its parent).

    "train" = ``Ebay_train.txt`` (59,551 images, 11,318 classes), "test" = ``Ebay_test.txt``
    (60,502, 11,316). ``super_labels`` holds the 12 super-classes (contiguous; original ids in
    ``super_class_ids``).
    """
    _check_split("sop", split, ("train", "test"))
    base = _find_root(root, "Ebay_train.txt", ("Stanford_Online_Products",), SOP)
    list_file = os.path.join(base, f"Ebay_{split}.txt")
    rel, cls, sup = _read_sop(list_file)
    if not rel:
        raise DatasetError(f"{list_file}: no images listed")
    ds = ImageDataset(
        [os.path.join(base, p) for p in rel],
        cls,
        super_ids=sup,
        name="sop",
        split=split,
        transform=transform,
    )
    check_counts(ds, SOP.counts.get(split), strict=strict)
    return ds


SOP = DataSource(
    "sop",
    load_sop,
    root="the Stanford_Online_Products folder (Ebay_train.txt, Ebay_test.txt) or its parent",
    aliases=("stanford_online_products", "online_products"),
    official_split=True,
    recall_at=(1, 10, 100, 1000),
    recall_at_source="Oh Song et al., Lifted Structured Feature Embedding, CVPR 2016",
    counts={
        "train": {"images": 59551, "classes": 11318},
        "test": {"images": 60502, "classes": 11316},
    },
)


# -------------------------------------------------------------------------------------- In-Shop
INSHOP_HEADER = ["image_name", "item_id", "evaluation_status"]
_ITEM_RE = re.compile(r"id_(\d+)")


def inshop_item_number(item_id: str) -> int:
    """``"id_00000002"`` -> 2 (a one-to-one reading of the official item ids)."""
    m = _ITEM_RE.fullmatch(item_id)
    if m is None:
        raise ValueError(item_id)
    return int(m.group(1))


def _read_inshop(path: str) -> list[tuple[str, str, str]]:
    lines = read_lines(path)
    if len(lines) < 2:
        raise DatasetError(f"{path}: expected a count line and a header line")
    n0, first = lines[0]
    expected = parse_int(first.split()[0], path, n0, "image count")
    n1, header = lines[1]
    if header.split() != INSHOP_HEADER:
        raise DatasetError(
            f"{path}, line {n1}: expected the header {' '.join(INSHOP_HEADER)!r}, got {header!r}"
        )
    rows = []
    for n, text in lines[2:]:
        tokens = text.split()
        if len(tokens) != 3:
            raise DatasetError(
                f"{path}, line {n}: expected 3 fields "
                f"(image_name item_id evaluation_status), got {text!r}"
            )
        if tokens[2] not in ("train", "query", "gallery"):
            raise DatasetError(
                f"{path}, line {n}: evaluation_status {tokens[2]!r} is not train, query or gallery"
            )
        rows.append((tokens[0], tokens[1], tokens[2]))
    if len(rows) != expected:
        raise DatasetError(
            f"{path}: line 1 announces {expected:,} images but "
            f"{len(rows):,} are listed (truncated file?)"
        )
    return rows


def load_inshop(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    *,
    highres: bool = False,
    strict: bool = False,
) -> ImageDataset:
    """In-Shop Clothes Retrieval (DeepFashion): ``Eval/list_eval_partition.txt`` + images.

    Images are under ``Img/`` (rows read ``img/WOMEN/...``) or ``img/`` at the root.

    Splits: "train" (25,882 images, 3,997 items); "query" (14,218) and "gallery" (12,612)
    share one label map over the 3,985 test items; "test" = query + gallery rows with
    ``is_query`` / ``is_gallery`` masks. Item ids ``id_XXXXXXXX`` become ``class_ids`` (the
    number) and ``class_names`` (the text); nothing is hashed.

    Args:
        highres: read ``img_highres/`` instead of ``img/``.
    """
    _check_split("inshop", split, ("train", "query", "gallery", "test"))
    if root is None:
        raise RootRequiredError("inshop", INSHOP.root)
    root = os.fspath(root)
    partition = require_file(
        os.path.join(root, "Eval", "list_eval_partition.txt"),
        "the In-Shop root holds Eval/ and Img/",
    )
    rows = _read_inshop(partition)
    image_base = os.path.join(root, "Img") if os.path.isdir(os.path.join(root, "Img")) else root

    def image_path(name: str) -> str:
        if highres and name.startswith("img/"):
            name = "img_highres/" + name[len("img/") :]
        return os.path.join(image_base, name)

    common = {
        "name": "inshop",
        "transform": transform,
        "id_parser": inshop_item_number,
    }
    if split == "train":
        train = [r for r in rows if r[2] == "train"]
        if not train:
            raise DatasetError(f"{partition}: no train rows")
        ds = ImageDataset(
            [image_path(r[0]) for r in train], [r[1] for r in train], split="train", **common
        )
    else:
        test = [r for r in rows if r[2] != "train"]
        if not test:
            raise DatasetError(f"{partition}: no query or gallery rows")
        ds = ImageDataset(
            [image_path(r[0]) for r in test],
            [r[1] for r in test],
            is_query=[r[2] == "query" for r in test],
            is_gallery=[r[2] == "gallery" for r in test],
            universe=[r[1] for r in test],
            split=split,
            **common,
        )
        if split in ("query", "gallery"):
            ds = ds.role_view(split)
    check_counts(ds, INSHOP.counts.get(split), strict=strict)
    return ds


INSHOP = DataSource(
    "inshop",
    load_inshop,
    root="the In-Shop Clothes Retrieval folder (Eval/list_eval_partition.txt, Img/ or img/)",
    aliases=("in-shop", "in_shop", "deepfashion_inshop"),
    official_split=True,
    recall_at=(1, 10, 20, 30, 40, 50),
    recall_at_source="Liu et al., DeepFashion, CVPR 2016",
    counts={
        "train": {"images": 25882, "classes": 3997},
        "query": {"images": 14218, "classes": 3985},
        "gallery": {"images": 12612, "classes": 3985},
        "test": {
            "images": 26830,
            "classes": 3985,
            "query_images": 14218,
            "gallery_images": 12612,
        },
    },
)
