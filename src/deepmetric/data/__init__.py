"""Data sets with their zero-shot splits, input transforms and data-set checks.

Every data set yields ``(image_tensor, label)`` and exposes ``labels`` (N,) long (contiguous
0..C-1, no image opened), ``class_ids`` (C,) original ids, ``class_names``, ``num_classes``,
``counts()``, and ``is_query`` / ``is_gallery`` (N,) bool where relevant.

>>> from deepmetric.data import build_dataset, build_transform
>>> train = build_dataset("digits", split="train", transform=build_transform("small", True))
>>> len(train), train.num_classes
(901, 5)
"""

from .arrays import ArrayDataset, load_digits_dataset, load_npz
from .base import (
    DatasetCountWarning,
    DatasetError,
    ImageDataset,
    MetricDataset,
    MissingFileError,
    check_counts,
    open_image,
)
from .benchmarks import OFFICIAL_COUNTS, load_cars196, load_cub, load_inshop, load_sop
from .generic import load_csv, load_folder, load_list
from .registry import DATASETS, CheckReport, build_dataset, build_query_gallery, check_dataset
from .splits import ClassSubset, class_disjoint_split, subset_classes
from .transforms import PRESETS, build_transform

__all__ = [
    "DATASETS",
    "OFFICIAL_COUNTS",
    "PRESETS",
    "ArrayDataset",
    "CheckReport",
    "ClassSubset",
    "DatasetCountWarning",
    "DatasetError",
    "ImageDataset",
    "MetricDataset",
    "MissingFileError",
    "build_dataset",
    "build_query_gallery",
    "build_transform",
    "check_counts",
    "check_dataset",
    "class_disjoint_split",
    "load_cars196",
    "load_csv",
    "load_cub",
    "load_digits_dataset",
    "load_folder",
    "load_inshop",
    "load_list",
    "load_npz",
    "load_sop",
    "open_image",
    "subset_classes",
]
