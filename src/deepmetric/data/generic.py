"""User formats: list files, a folder per class, and OML-style CSV files."""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from .base import (
    DatasetError,
    DataSource,
    ImageDataset,
    MetricDataset,
    MissingFileError,
    RootRequiredError,
    parse_int,
    read_lines,
)

__all__ = [
    "CSV",
    "FOLDER",
    "IMAGE_EXTENSIONS",
    "LIST",
    "load_csv",
    "load_folder",
    "load_list",
    "write_folder",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def _resolve(base: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(base, path)


Where = tuple[str, int]  # (file, 1-based line) a row was read from


def _check_listed_once(paths: list[str], labels: list[int], where: list[Where]) -> None:
    """Each image is listed once: a repeated path is a DatasetError naming both lines (and
    both labels when they differ). Duplicated evaluation rows would inflate the metrics."""
    first: dict[str, tuple[int, Where]] = {}
    for path, label, here in zip(paths, labels, where):
        key = os.path.normcase(os.path.normpath(path))
        if key not in first:
            first[key] = (label, here)
            continue
        label0, there = first[key]
        lines = (
            f"{here[0]}, lines {there[1]} and {here[1]}"
            if here[0] == there[0]
            else f"{there[0]}, line {there[1]} and {here[0]}, line {here[1]}"
        )
        if label0 != label:
            raise DatasetError(
                f"{lines}: {path} is listed with two labels, {label0} and {label}; an image "
                "belongs to one class"
            )
        raise DatasetError(f"{lines}: {path} is listed twice; remove one of the rows")


def _warn_query_without_gallery(ds: ImageDataset) -> None:
    if ds.is_query is None or ds.is_gallery is None:
        return
    query = set(ds.labels[ds.is_query].tolist())
    gallery = set(ds.labels[ds.is_gallery].tolist())
    lonely = query - gallery
    if lonely:
        names = [ds.class_names[i] for i in sorted(lonely)[:5]]
        warnings.warn(
            f"{ds.name}: {len(lonely)} query classes have no gallery image (e.g. {names})",
            stacklevel=3,
        )


# ------------------------------------------------------------------------------------- lists
def _read_list(path: str) -> tuple[list[str], list[int], list[Where]]:
    """Read ``relative/path label`` lines: the label is the last whitespace-separated token
    (the path may contain spaces); lines without whitespace may use ``path,label``."""
    paths, labels, where = [], [], []
    for n, text in read_lines(path):
        if len(text.split()) >= 2:
            rel, label = text.rsplit(maxsplit=1)
        elif "," in text:
            rel, label = text.rsplit(",", 1)
        else:
            raise DatasetError(f"{path}, line {n}: expected 'path label', got {text!r}")
        rel = rel.strip()
        if not rel:
            raise DatasetError(f"{path}, line {n}: empty path in {text!r}")
        labels.append(parse_int(label, path, n))
        paths.append(rel)
        where.append((path, n))
    if not paths:
        raise DatasetError(f"{path}: no images listed")
    return paths, labels, where


def load_list(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    *,
    list_file: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
) -> ImageDataset:
    """List files of ``relative/path label`` lines (Deep_Metric's format; labels are ints).

    With ``root/train.txt`` and ``root/test.txt`` (or ``query.txt`` + ``gallery.txt``) those
    are the splits. A single ``list_file`` has no split: the data set comes back as split
    "all" (``build_dataset`` then holds out classes for testing, see ``test_classes``).
    An image listed twice (also once in query.txt and once in gallery.txt) is an error
    naming both lines.

    Args:
        root: folder holding ``{split}.txt``; image paths are relative to it.
        split: "train", "test", "query", "gallery" (query and gallery read both files and share
            one label map; "test" without test.txt = query + gallery with role masks).
        list_file: one list file (relative to root, or absolute) with every image.
        image_root: folder the image paths are relative to (default: root).
    """
    if root is None and list_file is None:
        raise RootRequiredError("list", LIST.root)
    base = os.fspath(root) if root is not None else os.path.dirname(os.fspath(list_file))
    img_base = os.fspath(image_root) if image_root is not None else base
    common = {"name": "list", "transform": transform}

    def read(file: str) -> tuple[list[str], list[int], list[Where]]:
        rel, labels, where = _read_list(file)
        paths = [_resolve(img_base, p) for p in rel]
        _check_listed_once(paths, labels, where)
        return paths, labels, where

    if list_file is not None:
        paths, labels, _ = read(_resolve(base, os.fspath(list_file)))
        return ImageDataset(paths, labels, split="all", **common)

    own = os.path.join(base, f"{split}.txt")
    query_file, gallery_file = (os.path.join(base, f) for f in ("query.txt", "gallery.txt"))
    if split in ("query", "gallery") or (
        split == "test" and not os.path.isfile(own) and os.path.isfile(query_file)
    ):
        for f in (query_file, gallery_file):
            if not os.path.isfile(f):
                raise MissingFileError(f"list {split}: file not found: {f}")
        q_paths, q_lab, q_where = read(query_file)
        g_paths, g_lab, g_where = read(gallery_file)
        _check_listed_once(q_paths + g_paths, q_lab + g_lab, q_where + g_where)
        ds = ImageDataset(
            q_paths + g_paths,
            q_lab + g_lab,
            is_query=[True] * len(q_paths) + [False] * len(g_paths),
            is_gallery=[False] * len(q_paths) + [True] * len(g_paths),
            split=split,
            **common,
        )
        _warn_query_without_gallery(ds)
        return ds if split == "test" else ds.role_view(split)
    paths, labels, _ = read(own)
    return ImageDataset(paths, labels, split=split, **common)


LIST = DataSource(
    "list",
    load_list,
    root="a folder holding train.txt and test.txt (or query.txt and gallery.txt) of "
    "'relative/path label' lines, or the folder of one list file named by data.options.list_file",
)


# ----------------------------------------------------------------------------------- folders
def load_folder(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
) -> ImageDataset:
    """A folder per class: ``root/<split>/<class>/*.jpg`` when ``root/<split>`` exists, else
    ``root/<class>/*.jpg``, a folder without a split, which comes back as split "all"
    (``build_dataset`` then holds out classes for testing, see ``test_classes``). Images are
    searched recursively inside each class folder (extensions: :data:`IMAGE_EXTENSIONS`,
    any case); other files are ignored.

    Class ids: the folder names as ints when they all are integers, else their ranks in sorted
    order; ``class_names`` = the folder names. An empty class folder is an error.
    """
    if root is None:
        raise RootRequiredError("folder", FOLDER.root)
    base = os.fspath(root)
    split_dirs = [d for d in ("train", "test") if os.path.isdir(os.path.join(base, d))]
    if os.path.isdir(os.path.join(base, split)):
        base = os.path.join(base, split)
    elif split_dirs:
        raise MissingFileError(
            f"folder: {base} has {'/, '.join(split_dirs)}/ but no {split}/ folder"
        )
    else:
        split = "all"
    if not os.path.isdir(base):
        raise MissingFileError(f"folder: directory not found: {base}")
    class_dirs = sorted(
        e.name for e in os.scandir(base) if e.is_dir() and not e.name.startswith(".")
    )
    if not class_dirs:
        raise DatasetError(f"folder: no class folder in {base}")
    numeric = all(d.isdigit() for d in class_dirs)
    numeric = numeric and len({int(d) for d in class_dirs}) == len(class_dirs)  # "7" vs "07"
    paths: list[str] = []
    raw: list[int | str] = []
    for d in class_dirs:
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(base, d)):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            found += [
                os.path.join(dirpath, f)
                for f in sorted(filenames)
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
            ]
        if not found:
            raise DatasetError(
                f"folder: empty class folder {os.path.join(base, d)} "
                f"(no {'/'.join(IMAGE_EXTENSIONS)} file)"
            )
        paths += found
        raw += [int(d) if numeric else d] * len(found)
    ds = ImageDataset(
        paths,
        raw,
        name="folder",
        split=split,
        transform=transform,
    )
    if numeric:
        name_of = {int(d): d for d in class_dirs}
        ds.class_names = [name_of[int(c)] for c in ds.class_ids]
    return ds


FOLDER = DataSource(
    "folder",
    load_folder,
    root="a folder with a folder of images per class (or train/ and test/ holding those)",
    aliases=("imagefolder", "image_folder", "folders"),
)


# --------------------------------------------------------------------------------------- CSV
_TRUE = {"1", "true", "t", "yes", "y", "1.0"}
_FALSE = {"0", "false", "f", "no", "n", "0.0", ""}


def _parse_bool(value: str | None, file: str, line: int, column: str) -> bool:
    v = (value or "").strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise DatasetError(f"{file}, line {line}: {column} {value!r} is not a boolean (0/1)")


def load_csv(
    root: str | os.PathLike | None,
    split: str = "train",
    transform: Callable | None = None,
    *,
    csv_file: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
) -> ImageDataset:
    """A CSV file in OML's format: columns ``label`` (int) and ``path``; optional ``split``
    (``train`` / ``validation``), ``is_query``, ``is_gallery`` (0/1, empty on train rows).
    Other columns (``class_name``, ``category``, bbox ...) are ignored.

    Splits: "train" = train rows; "test" (or "validation") = validation rows with
    ``is_query`` / ``is_gallery`` masks (a row that is both means 1-vs-rest, self excluded at
    evaluation; without the two columns every row is both); "query" / "gallery" = those rows,
    with the label map of all validation rows. Without a ``split`` column the file has no
    split: every row comes back as split "all" (``build_dataset`` then holds out classes for
    testing, see ``test_classes``). A path listed twice (in any split) is an error naming
    both lines.

    Args:
        root: the CSV file, or its folder (then ``csv_file``, default ``df.csv``).
        image_root: folder the paths are relative to (default: the CSV's folder).
    """
    if root is None:
        raise RootRequiredError("csv", CSV.root)
    allowed = ("train", "test", "validation", "query", "gallery", "all")
    if split not in allowed:
        raise ValueError(f"csv: unknown split {split!r}; use one of {list(allowed)}")
    root = os.fspath(root)
    file = root if os.path.isfile(root) else os.path.join(root, os.fspath(csv_file or "df.csv"))
    if not os.path.isfile(file):
        raise MissingFileError(f"csv: file not found: {file}")
    img_base = os.fspath(image_root) if image_root is not None else os.path.dirname(file)
    rows, has_split, has_roles = _read_csv(file, img_base)
    _check_listed_once([r.path for r in rows], [r.label for r in rows], [r.where for r in rows])

    common = {"name": "csv", "transform": transform}
    if not has_split or split == "all":
        roles = {"is_query": [r.query for r in rows], "is_gallery": [r.gallery for r in rows]}
        return ImageDataset(
            [r.path for r in rows],
            [r.label for r in rows],
            split="all",
            **(roles if has_roles else {}),
            **common,
        )
    want_eval = split != "train"
    rows = [r for r in rows if (r.split == "validation") == want_eval]
    if not rows:
        raise DatasetError(f"{file}: no {'validation' if want_eval else 'train'} rows")
    paths, labels = [r.path for r in rows], [r.label for r in rows]
    if not want_eval:
        return ImageDataset(paths, labels, split="train", **common)
    ds = ImageDataset(
        paths,
        labels,
        is_query=[r.query for r in rows],
        is_gallery=[r.gallery for r in rows],
        split="test" if split == "validation" else split,
        **common,
    )
    _warn_query_without_gallery(ds)
    if split in ("query", "gallery"):
        return ds.role_view(split)
    return ds


CSV = DataSource(
    "csv",
    load_csv,
    root="a CSV file in OML's format (columns label, path; optional split, is_query, "
    "is_gallery) or its folder",
)


@dataclass
class _CsvRow:
    path: str
    label: int
    where: Where
    split: str | None  # train / validation; None without a split column
    query: bool
    gallery: bool


def _read_csv(file: str, img_base: str) -> tuple[list[_CsvRow], bool, bool]:
    """(rows, has a split column, has role columns) of an OML-style CSV file."""
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = columns
        missing = [c for c in ("label", "path") if c not in columns]
        if missing:
            raise DatasetError(f"{file}, line 1: missing columns {missing} (have {columns})")
        has_split = "split" in columns
        has_roles = "is_query" in columns or "is_gallery" in columns
        rows = []
        for row in reader:
            n = reader.line_num
            if None in row or any(row.get(c) is None for c in ("label", "path")):
                raise DatasetError(f"{file}, line {n}: expected {len(columns)} fields")
            row_split = None
            if has_split:
                row_split = (row["split"] or "").strip()
                if row_split not in ("train", "validation"):
                    raise DatasetError(
                        f"{file}, line {n}: split {row_split!r} is not train or validation"
                    )
            label = parse_int(row["label"], file, n)
            path = row["path"].strip()
            if not path:
                raise DatasetError(f"{file}, line {n}: empty path")
            q = g = True
            if has_roles and row_split != "train":
                q = _parse_bool(row.get("is_query"), file, n, "is_query")
                g = _parse_bool(row.get("is_gallery"), file, n, "is_gallery")
                if not (q or g):
                    raise DatasetError(f"{file}, line {n}: row is neither query nor gallery")
            rows.append(_CsvRow(_resolve(img_base, path), label, (file, n), row_split, q, g))
    if not rows:
        raise DatasetError(f"{file}: no data rows")
    return rows, has_split, has_roles


def write_folder(dataset: MetricDataset, root: str | os.PathLike) -> int:
    """Write every image of ``dataset`` as ``root/<class name>/<row>.png`` (a layout
    :func:`load_folder` reads back; array images become 8-bit PNGs). Returns the count.

    Raises:
        DatasetError: ``root`` exists and is not empty.
    """
    root = os.fspath(root)
    if os.path.isdir(root) and os.listdir(root):
        raise DatasetError(f"{root} exists and is not empty; choose another --out")
    for i in range(len(dataset)):
        image = dataset.load_image(i)
        if not isinstance(image, Image.Image):  # (C, H, W) float in [0, 1]
            pixels = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        folder = os.path.join(root, dataset.class_names[int(dataset.labels[i])])
        os.makedirs(folder, exist_ok=True)
        image.save(os.path.join(folder, f"{i:06d}.png"))
    return len(dataset)
