"""Peak memory and time of one training step, whole batch against gradient caching.

ResNet-18 (random weights) at 112 x 112 px, a 128-d embedding, the multi-similarity loss,
batches of P x 4; each case runs in a fresh process (its peak memory is its own): a warm-up
step of 128 images, then one timed step of B images, whole (``chunk_size`` None) or in
chunks. The plain step is skipped where its activations would not fit (``--plain-max``).
Peak memory: the process's resident memory on the CPU, ``torch.cuda.max_memory_allocated``
on a GPU. ``--backbone bninception`` times deepmetric's BN-Inception model instead.

    PYTHONPATH=src python benchmarks/chunked_step.py                 # the table of RESULTS.md
    PYTHONPATH=src python benchmarks/chunked_step.py --batches 256 --chunk 128
    PYTHONPATH=src python benchmarks/chunked_step.py --device cuda --amp fp16 --plain-max 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from deepmetric.engine.trainer import train_step
from deepmetric.losses import build_loss
from deepmetric.models import build_model

AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet18(weights=None)
        self.backbone.fc = nn.Linear(512, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_case(
    batch: int, chunk: int | None, size: int, device: str, amp: str, backbone: str
) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    if backbone == "resnet18":
        model = Embedder().to(dev)
    else:
        model = build_model(backbone, embedding_dim=512).to(dev)
    criterion = build_loss("multi_similarity")
    group = {"params": list(model.parameters()), "lr": 1e-4, "base_lr": 1e-4, "name": "head"}
    optimizer = torch.optim.SGD([group], lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == "fp16")

    def step(b: int) -> float:
        images = torch.randn(b, 3, size, size, device=dev)
        labels = (torch.arange(b) // 4).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        train_step(
            model, criterion, optimizer, scaler, images, labels,
            lr_scale=1.0, amp=AMP[amp], grad_clip=0.0, chunk_size=chunk,
        )  # fmt: skip
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - start

    step(128)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    before = peak_mib(dev)
    seconds = step(batch)
    return {
        "batch": batch,
        "chunk": chunk,
        "seconds": seconds,
        "ms_per_image": 1000 * seconds / batch,
        "peak_mib": peak_mib(dev),
        "peak_before_mib": before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 256, 1024, 4096])
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--plain-max", type=int, default=1024, help="largest plain batch run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=list(AMP), default="none")
    parser.add_argument("--backbone", default="resnet18", help="resnet18, or a deepmetric name")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # a child process: one measurement, as JSON
        batch, chunk = json.loads(args.case)
        print(json.dumps(one_case(batch, chunk, args.size, args.device, args.amp, args.backbone)))
        return
    print(
        f"torch {torch.__version__}, {args.device} ({torch.get_num_threads()} threads), "
        f"{args.backbone} at {args.size} px, amp {args.amp}"
    )
    memory = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
    print(f"| B | step | time (s) | ms / image | images / s | {memory} (MiB) |")
    print("|---:|---|---:|---:|---:|---:|")
    for batch in args.batches:
        cases = [None] if batch <= args.chunk else [None, args.chunk]
        for chunk in cases:
            if chunk is None and batch > args.plain_max:
                print(f"| {batch:,} | whole batch | skipped (> --plain-max) | | |")
                continue
            command = [sys.executable, __file__, "--size", str(args.size), "--amp", args.amp]
            command += ["--device", args.device, "--backbone", args.backbone]
            command += ["--case", json.dumps([batch, chunk])]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            how = "whole batch" if chunk is None else f"chunks of {chunk}"
            print(
                f"| {batch:,} | {how} | {r['seconds']:.2f} | {r['ms_per_image']:.2f} | "
                f"{batch / r['seconds']:,.0f} | {r['peak_mib']:,.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
