"""Gradient caching (train.chunk_size): the parameters' gradients of a batch embedded in chunks
equal those of the whole batch at once, for pair and proxy losses, with a cross-batch memory,
dropout, frozen BatchNorm, clipping and AMP; a resumed chunked run is bit-exact."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import deepmetric.engine.gradient_cache as gradient_cache
from deepmetric.config import ConfigError, load_config
from deepmetric.engine.trainer import train_step
from deepmetric.losses import build_loss
from deepmetric.memory import CrossBatchMemory
from test_engine import assert_same_state, run_in_process
from tiny_runs import DEMO

B, D_IN, D_OUT, CLASSES = 24, 12, 8, 6


class Net(nn.Module):
    """Linear -> (BatchNorm) -> ReLU -> Dropout -> Linear -> unit rows, float64."""

    def __init__(self, dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(D_IN, 16)
        self.norm = nn.BatchNorm1d(16) if batchnorm else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.last = nn.Linear(16, D_OUT)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.last(self.dropout(F.relu(self.norm(self.first(x))))), dim=1)


def batch(step: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(B, D_IN, generator=g, dtype=torch.float64)
    labels = (torch.arange(B) % CLASSES)[torch.randperm(B, generator=g)]
    return x, labels


def criterion_of(name: str) -> nn.Module:
    if name == "proxy_anchor":
        return build_loss(name, num_classes=CLASSES, embedding_dim=D_OUT, seed=3).double()
    if name == "xbm":
        memory = CrossBatchMemory(build_loss("multi_similarity"), 40, D_OUT, start_iteration=1)
        return memory.double()
    return build_loss(name).double()


def step(
    model: nn.Module,
    criterion: nn.Module,
    x: Tensor,
    labels: Tensor,
    chunk_size: int | None,
    *,
    grad_clip: float = 0.0,
    amp: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """One train_step with learning rate 0 (nothing moves); the gradients it left."""
    params = [*model.parameters(), *criterion.parameters()]
    group = {"params": params, "lr": 0.0, "base_lr": 0.0, "name": "head"}
    optimizer = torch.optim.SGD([group], lr=0.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = train_step(
        model,
        criterion,
        optimizer,
        scaler,
        x,
        labels,
        lr_scale=1.0,
        amp=amp,
        grad_clip=grad_clip,
        chunk_size=chunk_size,
    )
    grads = {f"model.{n}": p.grad.clone() for n, p in model.named_parameters()}
    grads |= {f"loss.{n}": p.grad.clone() for n, p in criterion.named_parameters()}
    return {"loss": loss, **grads}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor], **tolerance: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tolerance)


@pytest.mark.parametrize("loss", ["multi_similarity", "contrastive", "proxy_anchor", "xbm"])
@pytest.mark.parametrize("chunk_size", [4, 5, 23])
def test_chunked_gradients_equal_the_whole_batch(loss: str, chunk_size: int) -> None:
    plain_model, chunked_model = Net(), Net()
    plain_loss, chunked_loss = criterion_of(loss), criterion_of(loss)
    for i in range(3):  # the memory term starts at the second step
        x, labels = batch(i)
        plain = step(plain_model, plain_loss, x, labels, None, grad_clip=0.05)
        chunked = step(chunked_model, chunked_loss, x, labels, chunk_size, grad_clip=0.05)
        assert_same(plain, chunked, rtol=1e-10, atol=1e-12)
    assert plain["loss"] > 0 and any(g.abs().sum() > 0 for g in plain.values())
    if loss == "xbm":  # both memories hold the same rows
        assert torch.equal(plain_loss.memory_emb, chunked_loss.memory_emb)


def reference_with_graph(model: nn.Module, criterion: nn.Module, x: Tensor, labels: Tensor, n: int):
    """The whole batch's gradients with the random numbers of a chunk-by-chunk forward (the
    loss in float32, as the training step computes it)."""
    model.zero_grad()
    loss = criterion(torch.cat([model(c) for c in x.split(n)]).float(), labels)
    loss.backward()
    return {f"model.{k}": p.grad.clone() for k, p in model.named_parameters()}


def test_dropout_is_replayed_in_the_second_pass(monkeypatch) -> None:
    x, labels = batch()
    model, criterion = Net(dropout=0.3), build_loss("multi_similarity").double()
    torch.manual_seed(7)
    expected = reference_with_graph(model, criterion, x, labels, 6)
    torch.manual_seed(7)
    chunked = step(model, criterion, x, labels, 6)
    chunked.pop("loss")
    assert_same(expected, chunked, rtol=1e-10, atol=1e-12)
    # without the replay, the second pass draws other masks: other gradients
    monkeypatch.setattr(gradient_cache, "_replayed_rng", lambda *a: contextlib.nullcontext())
    torch.manual_seed(7)
    unreplayed = step(model, criterion, x, labels, 6)
    assert not torch.allclose(unreplayed["model.first.weight"], expected["model.first.weight"])


def test_frozen_batchnorm_is_exact_and_training_batchnorm_updates_its_statistics_once() -> None:
    x, labels = batch()
    frozen_plain, frozen_chunked = Net(batchnorm=True).eval(), Net(batchnorm=True).eval()
    criterion = build_loss("contrastive").double()
    plain = step(frozen_plain, criterion, x, labels, None)
    assert_same(plain, step(frozen_chunked, criterion, x, labels, 8), rtol=1e-10, atol=1e-12)

    model = Net(batchnorm=True)
    expected = Net(batchnorm=True)
    with torch.no_grad():  # pass 1 alone: one update per chunk
        for c in x.split(8):
            expected(c)
    step(model, criterion, x, labels, 8)
    assert torch.equal(model.norm.running_mean, expected.norm.running_mean)
    assert int(model.norm.num_batches_tracked) == 3


def test_bf16_autocast_chunked_is_close_to_the_plain_step() -> None:
    x, labels = batch()
    plain_model, chunked_model = Net().float(), Net().float()
    criterion = build_loss("multi_similarity")
    plain = step(plain_model, criterion, x.float(), labels, None, amp=torch.bfloat16)
    chunked = step(chunked_model, criterion, x.float(), labels, 8, amp=torch.bfloat16)
    assert_same(plain, chunked, rtol=0.05, atol=2e-3)


@pytest.mark.parametrize("chunk_size", [7, 41, 0])
def test_a_chunk_size_that_does_not_divide_the_batch_is_refused(chunk_size: int) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [f"--train.chunk_size={chunk_size}"])  # demo: 5 x 8 = 40 per batch
    message = str(info.value)
    assert message.startswith("command line: train.chunk_size:") and "batch of 40" in message


def test_a_resumed_chunked_run_is_bit_exact(tmp_path: Path) -> None:
    chunked = ["--train.chunk_size=5", "--train.checkpoint_every=6"]
    straight = tmp_path / "straight"
    run_in_process(straight, "--train.iterations=12", *chunked)
    resumed = tmp_path / "resumed"
    run_in_process(resumed, "--train.iterations=6", *chunked)
    run_in_process(resumed, "--train.iterations=12", "--train.resume=auto", *chunked)
    assert_same_state(straight, resumed)
