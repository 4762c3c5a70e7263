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
    DataSource,
    ImageDataset,
    MetricDataset,
    MissingFileError,
    RootRequiredError,
    check_counts,
    open_image,
)
from .benchmarks import load_cars196, load_cub, load_inshop, load_sop
from .generic import IMAGE_EXTENSIONS, load_csv, load_folder, load_list, write_folder
from .integrity import VALIDATE_LEVELS, inspect_image, inspect_images, validate_images
from .registry import (
    SOURCES,
    CheckReport,
    build_dataset,
    build_query_gallery,
    check_dataset,
    find_source,
    loader_options,
)
from .splits import (
    ClassSubset,
    class_disjoint_split,
    class_fold_split,
    describe_split,
    split_unsplit,
    subset_classes,
    write_split_csv,
)
from .transforms import (
    BNINCEPTION_MEAN_BGR,
    PRESET_OPTIONS,
    PRESETS,
    build_transform,
    describe_transform,
)

__all__ = [
    "BNINCEPTION_MEAN_BGR",
    "IMAGE_EXTENSIONS",
    "PRESETS",
    "PRESET_OPTIONS",
    "SOURCES",
    "VALIDATE_LEVELS",
    "ArrayDataset",
    "CheckReport",
    "ClassSubset",
    "DataSource",
    "DatasetCountWarning",
    "DatasetError",
    "ImageDataset",
    "MetricDataset",
    "MissingFileError",
    "RootRequiredError",
    "build_dataset",
    "build_query_gallery",
    "build_transform",
    "check_counts",
    "check_dataset",
    "class_disjoint_split",
    "class_fold_split",
    "describe_split",
    "describe_transform",
    "find_source",
    "inspect_image",
    "inspect_images",
    "load_cars196",
    "load_csv",
    "load_cub",
    "load_digits_dataset",
    "load_folder",
    "load_inshop",
    "load_list",
    "load_npz",
    "load_sop",
    "loader_options",
    "open_image",
    "split_unsplit",
    "subset_classes",
    "validate_images",
    "write_folder",
    "write_split_csv",
]
