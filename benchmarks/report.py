"""The HTML report at SOP's scale: build time and file size from saved embeddings.

Synthetic Stanford Online Products test split: 60,502 embeddings of 512 dimensions in 11,316
classes (every class 2 or more images, as in SOP), unit vectors around a random centre per
class, with noise such that Recall@1 is about a trained SOP model's (~0.8). Images are made on
demand (256 x 256 colour gradients with noise, JPEG-encoded and decoded again, so that each
costs about what reading a photo does). The embeddings are saved to a .npy file first; the
timed part loads them and builds the report (``gather_report`` then ``write_report``, what
``build_report`` runs) with the default options: the numbers of up to 10,000 queries of whole
random classes, 2 x 10 query grids with k = 8, the 1,000 worst classes, a 1,500-point PCA map.

    PYTHONPATH=src .venv/bin/python benchmarks/report.py [--images 60502 --dim 512 --classes 11316]
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_set(count: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, dim) float32 unit embeddings and (count,) labels, every class >= 2 images."""
    rng = np.random.default_rng(seed)
    sizes = 2 + rng.multinomial(count - 2 * classes, np.full(classes, 1 / classes))
    labels = np.repeat(np.arange(classes), sizes)
    centres = rng.standard_normal((classes, dim)).astype(np.float32)
    x = centres[labels] + 2.2 * rng.standard_normal((count, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


class SyntheticImages:
    """Image ``i``: a 256 x 256 gradient in its class's colour with noise, through JPEG."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels
        self.seconds = 0.0  # time spent making images (the part a real loader spends reading)
        ramp = np.linspace(0.3, 1.0, 256, dtype=np.float32)
        self.ramp = ramp[:, None, None] * ramp[None, :, None]

    def __call__(self, i: int) -> Image.Image:
        start = time.perf_counter()
        rng = np.random.default_rng(i)
        colour = np.random.default_rng(int(self.labels[i])).integers(40, 256, 3)
        noise = rng.normal(0, 12, (256, 256, 3))
        pixels = np.clip(self.ramp * colour + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        image = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
        self.seconds += time.perf_counter() - start
        return image


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    from deepmetric.report import ReportOptions, gather_report, write_report

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60_502)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=11_316)
    parser.add_argument("--map", default="pca", choices=("pca", "tsne"))
    parser.add_argument("--out", default=None, help="keep the report here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        x, labels = synthetic_set(args.images, args.dim, args.classes, seed=0)
        np.save(Path(tmp) / "emb.npy", x)
        np.save(Path(tmp) / "labels.npy", labels)
        del x
        out = Path(args.out or Path(tmp) / "report.html")
        images = SyntheticImages(labels)

        start, cpu_start = time.perf_counter(), cpu_seconds()
        x = np.load(Path(tmp) / "emb.npy")
        labels = np.load(Path(tmp) / "labels.npy")
        content = gather_report(x, labels, images, options=ReportOptions(map=args.map))
        gathered = time.perf_counter() - start
        write_report(content, out)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        size = out.stat().st_size
        page = out.read_text()

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    means = content.metrics.columns[0][1]
    print(
        f"{args.images:,} x {args.dim} embeddings, {args.classes:,} classes, map {args.map}: "
        f"built in {seconds:.1f} s, CPU time {cpu:.1f} s (numbers and thumbnails "
        f"{gathered:.1f} s, of which "
        f"{images.seconds:.1f} s making the {page.count('data:image/jpeg'):,} images shown; "
        f"page {seconds - gathered:.1f} s), {size / 1e6:.1f} MB, peak RSS {peak:,.0f} MiB; "
        f"Recall@1 {means['recall@1']:.4f}, MAP@R {means['map@r']:.4f} over "
        f"{means['num_queries']:,} queries"
    )


if __name__ == "__main__":
    main()
