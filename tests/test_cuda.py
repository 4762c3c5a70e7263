"""What only a GPU can run: float16 AMP with its GradScaler, gradient caching on CUDA (RNG
replay of the CUDA generator), a short training run on the device. Skipped without CUDA;
benchmarks/gpu_check.sh runs them on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepmetric.engine.trainer import train_step
from deepmetric.losses import build_loss
from test_engine import run_in_process
from test_gradient_cache import Net, batch, step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_chunked_step_on_cuda_replays_dropout_and_equals_the_whole_batch() -> None:
    x, labels = (t.cuda() for t in batch())
    model = Net().cuda()
    criterion = build_loss("multi_similarity").double().cuda()
    plain = step(model, criterion, x, labels, None)
    chunked = step(Net().cuda(), criterion, x, labels, 6)
    for name, grad in plain.items():
        torch.testing.assert_close(chunked[name], grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_amp_training_with_chunks_on_cuda(tmp_path: Path, amp: str) -> None:
    summary = run_in_process(
        tmp_path / amp,
        "--train.iterations=6",
        "--train.device=cuda",
        f"--train.amp={amp}",
        "--train.chunk_size=10",
    )
    assert summary["iteration"] == 6 and 0 < summary["final"]["recall@1"] <= 1


def test_fp16_chunked_gradients_after_unscaling_are_close_to_float32() -> None:
    x, labels = (t.cuda() for t in batch())
    reference = Net().float().cuda()
    criterion = build_loss("multi_similarity")
    full = step(reference, criterion, x.float(), labels, None)
    model = Net().float().cuda()
    group = {"params": list(model.parameters()), "lr": 0.0, "base_lr": 0.0, "name": "head"}
    optimizer = torch.optim.SGD([group], lr=0.0)
    scaler = torch.amp.GradScaler("cuda")
    train_step(
        model, criterion, optimizer, scaler, x.float(), labels,
        lr_scale=1.0, amp=torch.float16, grad_clip=1.0, chunk_size=6,
    )  # fmt: skip
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, full[f"model.{name}"], rtol=0.05, atol=5e-3)
