"""Time ``deepmetric datasets check`` on a generated tree of SOP's size.

Writes ``--images`` small JPEGs (default 120,000 in 22,634 class folders, like Stanford Online
Products; 96 x 96 colour gradients with noise, a few KB each) under ``--root`` once (kept for
later runs), then times :func:`deepmetric.data.check_dataset` on it (the default zero-shot split
of a flat folder: every file hashed with sha256 and its header and end marker checked), and
optionally the full decode. Prints one line per level.

    PYTHONPATH=src .venv/bin/python benchmarks/datasets_check.py --root /tmp/dm-check-120k
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _write_class(args: tuple[str, int, int]) -> None:
    folder, count, seed = args
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ramp = np.linspace(0, 1, 96)[None, :, None]
    for k in range(count):
        colour = rng.integers(0, 256, size=3)
        pixels = colour * ramp + rng.integers(0, 30, size=(96, 96, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            os.path.join(folder, f"{k}.jpg"), quality=85
        )


def make_tree(root: Path, images: int, classes: int, workers: int) -> None:
    """``images`` JPEGs spread over ``classes`` folders (sizes differ by at most one)."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{images} {classes}":
        return
    base, extra = divmod(images, classes)
    jobs = [(str(root / f"class_{c:05d}"), base + (c < extra), c) for c in range(classes)]
    start = time.perf_counter()
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_class, jobs, chunksize=64))
    done.write_text(f"{images} {classes}")
    print(f"wrote {images:,} JPEGs in {classes:,} folders in {time.perf_counter() - start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/dm-check-120k")
    parser.add_argument("--images", type=int, default=120_000)
    parser.add_argument("--classes", type=int, default=22_634)
    parser.add_argument("--levels", default="header", help="comma-separated: header,decode")
    parser.add_argument(
        "--serial", action="store_true", help="also time the header pass in one thread"
    )
    args = parser.parse_args()

    from deepmetric.data import check_dataset

    root = Path(args.root)
    make_tree(root, args.images, args.classes, os.cpu_count() or 1)
    size = sum(f.stat().st_size for f in root.glob("class_0000*/*.jpg")) / max(
        1, len(list(root.glob("class_0000*/*.jpg")))
    )
    print(f"{args.images:,} images, mean file size {size / 1024:.1f} KiB, {os.cpu_count()} CPUs")
    for level in args.levels.split(","):
        start = time.perf_counter()
        report = check_dataset("folder", root, validate=level)
        seconds = time.perf_counter() - start
        print(
            f"datasets check --validate {level}: {seconds:.1f} s "
            f"({args.images / seconds:,.0f} images/s), {report.splitlines()[-1]}"
        )
    if args.serial:
        from deepmetric.data import build_dataset, inspect_images

        paths = build_dataset("folder", root, "all").paths
        for workers in (1, None):
            start = time.perf_counter()
            inspect_images(paths, "header", digest=True, workers=workers)
            seconds = time.perf_counter() - start
            print(f"hash + header of every file, workers={workers or 'default'}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
