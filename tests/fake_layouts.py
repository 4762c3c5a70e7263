"""Tiny fake trees of the official data-set layouts (real JPEG/PNG files, real .mat structs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat

CARS_ANNOS_FIELDS = (
    "relative_im_path",
    "bbox_x1",
    "bbox_y1",
    "bbox_x2",
    "bbox_y2",
    "class",
    "test",
)
CARS_DEVKIT_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (16, 12)) -> Path:
    """Write a small random RGB image (format from the suffix: .jpg / .png / ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in the middle of its scan data (PIL raises 'image file is truncated')."""
    write_image(path, seed=1, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all")
    return path


def make_cub(tmp: Path, per_class: dict[int, int]) -> Path:
    """``tmp/CUB_200_2011`` with ``per_class[class_id]`` images per class; returns its parent."""
    base = tmp / "CUB_200_2011"
    images, labels, classes = [], [], []
    image_id = 0
    for cls in sorted(per_class):
        folder = f"{cls:03d}.Bird_{cls}"
        classes.append(f"{cls} {folder}")
        for k in range(per_class[cls]):
            image_id += 1
            rel = f"{folder}/Bird_{cls}_{k:04d}_{image_id}.jpg"
            write_image(base / "images" / rel, seed=image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cls}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(classes) + "\n")
    # The classification split, which must be ignored: mark every image as training.
    (base / "train_test_split.txt").write_text(
        "\n".join(f"{i} 1" for i in range(1, image_id + 1)) + "\n"
    )
    return tmp


def _struct_array(rows: list[dict], fields: tuple[str, ...]) -> np.ndarray:
    """A (1, N) MATLAB struct array as scipy writes it (object cells)."""
    arr = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        for f in fields:
            value = row[f]
            arr[0, k][f] = (
                np.array([value])
                if isinstance(value, str)
                else np.array([[value]], dtype=np.uint16 if f.startswith("bbox") else np.uint8)
            )
    return arr


def _box(seed: int) -> dict:
    return {"bbox_x1": 1, "bbox_y1": 2, "bbox_x2": 10 + seed % 5, "bbox_y2": 9}


def make_cars_annos(tmp: Path, per_class: dict[int, int]) -> Path:
    """Layout A: ``cars_annos.mat`` + ``car_ims/000001.jpg ...`` (the test flag alternates, as
    the classification split mixes every class)."""
    rows = []
    n = 0
    for cls in sorted(per_class):
        for _ in range(per_class[cls]):
            n += 1
            rel = f"car_ims/{n:06d}.jpg"
            write_image(tmp / rel, seed=n)
            rows.append({"relative_im_path": rel, "class": cls, "test": n % 2, **_box(n)})
    names = np.empty((1, 196), dtype=object)
    for c in range(196):
        names[0, c] = f"Car model {c + 1}"
    savemat(
        tmp / "cars_annos.mat",
        {"annotations": _struct_array(rows, CARS_ANNOS_FIELDS), "class_names": names},
    )
    return tmp


def make_cars_devkit(
    tmp: Path, train: dict[int, int], test: dict[int, int], test_annos_in_devkit: bool = False
) -> Path:
    """Layout B: cars_train/, cars_test/, devkit/cars_train_annos.mat and
    cars_test_annos_withlabels.mat (at the root, or in devkit/)."""
    (tmp / "devkit").mkdir(parents=True, exist_ok=True)
    for folder, per_class, mat in (
        ("cars_train", train, tmp / "devkit" / "cars_train_annos.mat"),
        (
            "cars_test",
            test,
            tmp / ("devkit" if test_annos_in_devkit else ".") / "cars_test_annos_withlabels.mat",
        ),
    ):
        rows = []
        n = 0
        for cls in sorted(per_class):
            for _ in range(per_class[cls]):
                n += 1
                fname = f"{n:05d}.jpg"
                write_image(tmp / folder / fname, seed=n + (1000 if folder == "cars_test" else 0))
                rows.append({"fname": fname, "class": cls, **_box(n)})
        savemat(mat, {"annotations": _struct_array(rows, CARS_DEVKIT_FIELDS)})
    return tmp


SOP_SUPERS = ["bicycle", "cabinet", "chair"]


def make_sop(tmp: Path, train: dict[int, int], test: dict[int, int]) -> Path:
    """``tmp/Stanford_Online_Products`` with Ebay_train.txt / Ebay_test.txt; class c belongs to
    super-class ``c % 3 + 1``. Returns the parent folder."""
    base = tmp / "Stanford_Online_Products"
    image_id = 0
    for split, per_class in (("train", train), ("test", test)):
        lines = ["image_id class_id super_class_id path"]
        for cls in sorted(per_class):
            sup = cls % 3 + 1
            for k in range(per_class[cls]):
                image_id += 1
                rel = f"{SOP_SUPERS[sup - 1]}_final/{1000 + cls}_{k}.JPG"
                write_image(base / rel, seed=image_id)
                lines.append(f"{image_id} {cls} {sup} {rel}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return tmp


def make_inshop(tmp: Path, rows: list[tuple[str, int, str]], img_at_root: bool = False) -> Path:
    """``Eval/list_eval_partition.txt`` (count line, header, rows) and images under ``Img/``
    (or ``img/`` at the root). ``rows``: (item id such as "id_00000002", image number, status).
    """
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    base = tmp if img_at_root else tmp / "Img"
    for k, (item, number, status) in enumerate(rows):
        rel = f"img/WOMEN/Dresses/{item}/{number:02d}_1_front.jpg"
        write_image(base / rel, seed=k)
        lines.append(f"{rel} {item} {status}")
    (tmp / "Eval").mkdir(parents=True, exist_ok=True)
    (tmp / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return tmp


def make_folder(tmp: Path, per_class: dict[str, int], suffix: str = ".png") -> Path:
    for cls, n in per_class.items():
        for k in range(n):
            write_image(tmp / cls / f"img_{k}{suffix}", seed=k)
    return tmp
