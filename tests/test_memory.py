"""Tests of deepmetric.memory.CrossBatchMemory (Wang, Zhang, Huang, Scott, "Cross-Batch Memory
for Embedding Learning", CVPR 2020; the algorithm as the module docstring states it)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric.losses import build_loss
from deepmetric.memory import CrossBatchMemory

DIM = 8


class ToyPairLoss(nn.Module):
    """Independent stand-in with the loss contract: mean over positive pairs of (1 - S) plus
    mean over negative pairs of [S - 0.2]_+ ; num_active = number of positive pairs."""

    active_unit = "pairs"

    def __init__(self) -> None:
        super().__init__()
        self.num_active = torch.zeros((), dtype=torch.long)
        self.last_ref_size = -1

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None, self_index=None):
        b = embeddings.shape[0]
        if ref_emb is None:
            ref_emb, ref_labels, self_index = embeddings, labels, torch.arange(b)
        self.last_ref_size = ref_emb.shape[0]
        sim = embeddings.float() @ ref_emb.float().T
        same = labels[:, None] == ref_labels[None, :]
        not_self = torch.ones_like(same)
        rows = torch.arange(b)[self_index >= 0]
        not_self[rows, self_index[self_index >= 0]] = False
        pos, neg = same & not_self, ~same
        pos_term = torch.where(pos, 1 - sim, 0.0).sum() / pos.sum().clamp(min=1)
        neg_term = torch.where(neg, (sim - 0.2).clamp(min=0), 0.0).sum() / neg.sum().clamp(min=1)
        self.num_active = pos.sum()
        return pos_term + neg_term


def toy_loss_by_loops(x: Tensor, y: Tensor, ref: Tensor, ref_y: Tensor, self_idx) -> Tensor:
    """ToyPairLoss written pair by pair (the oracle for the plumbing tests)."""
    pos_terms, neg_terms = [], []
    for i in range(x.shape[0]):
        for j in range(ref.shape[0]):
            s = (x[i].float() * ref[j].float()).sum()
            if y[i] == ref_y[j] and j != self_idx[i]:
                pos_terms.append(1 - s)
            elif y[i] != ref_y[j]:
                neg_terms.append((s - 0.2).clamp(min=0))
    pos = torch.stack(pos_terms).mean() if pos_terms else x.sum() * 0
    neg = torch.stack(neg_terms).mean() if neg_terms else x.sum() * 0
    return pos + neg


def make_batch(gen: torch.Generator, b: int = 6, classes: int = 3, dim: int = DIM):
    x = F.normalize(torch.randn(b, dim, generator=gen), dim=1).requires_grad_(True)
    y = torch.randint(0, classes, (b,), generator=gen)
    return x, y


def loss_and_grad(fn, x: Tensor, *args) -> tuple[Tensor, Tensor]:
    """fn(x, *args) and its gradient with respect to x."""
    x = x.detach().clone().requires_grad_(True)
    value = fn(x, *args)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


# ---------------------------------------------------------------- exactness of the memory term
@pytest.mark.parametrize("name", ["toy", "contrastive", "multi_similarity", "nca"])
def test_memory_term_equals_loss_against_concatenated_history(name: str) -> None:
    """No wrap: the memory term = loss(batch, cat(detached past batches, current batch)),
    own copies excluded by index; same value and same gradient."""
    make = ToyPairLoss if name == "toy" else (lambda: build_loss(name))
    gen = torch.Generator().manual_seed(0)
    xbm = CrossBatchMemory(make(), size=64, dim=DIM, batch_loss=False)
    hist_x, hist_y = [], []
    for _ in range(5):
        x, y = make_batch(gen)
        offset = sum(len(h) for h in hist_y)
        hist_x.append(x.detach())
        hist_y.append(y)
        ref, ref_y = torch.cat(hist_x), torch.cat(hist_y)
        self_idx = torch.arange(offset, offset + len(y))
        got, got_grad = loss_and_grad(xbm, x, y)
        want, want_grad = loss_and_grad(make(), x, y, ref, ref_y, self_idx)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
        if name == "toy":
            loops, loops_grad = loss_and_grad(toy_loss_by_loops, x, y, ref, ref_y, self_idx)
            torch.testing.assert_close(got, loops, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got_grad, loops_grad, rtol=1e-5, atol=1e-6)


def test_total_is_batch_loss_plus_weighted_memory_term() -> None:
    gen = torch.Generator().manual_seed(1)
    xbm = CrossBatchMemory(build_loss("contrastive"), size=32, dim=DIM, weight=0.3)
    past_x, past_y = make_batch(gen)
    xbm(past_x, past_y)
    x, y = make_batch(gen)
    ref = torch.cat([past_x.detach(), x.detach()])
    ref_y = torch.cat([past_y, y])
    loss = build_loss("contrastive")
    self_idx = torch.arange(6, 12)
    got, got_grad = loss_and_grad(lambda e: xbm(e, y), x)
    want, want_grad = loss_and_grad(
        lambda e: loss(e, y) + 0.3 * loss(e, y, ref, ref_y, self_idx), x
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


def test_memory_gradient_flows_to_anchors_only() -> None:
    """The memory holds detached copies: no graph is kept to earlier batches."""
    gen = torch.Generator().manual_seed(2)
    xbm = CrossBatchMemory(ToyPairLoss(), size=32, dim=DIM, batch_loss=False)
    x1, y1 = make_batch(gen)
    xbm(x1, y1)
    assert not xbm.memory_emb.requires_grad
    x2, y2 = make_batch(gen)
    xbm(x2, y2).backward()
    assert x1.grad is None and x2.grad is not None


def test_backward_after_next_enqueue_raises_instead_of_wrong_gradient() -> None:
    gen = torch.Generator().manual_seed(13)
    xbm = CrossBatchMemory(ToyPairLoss(), size=32, dim=DIM, batch_loss=False)
    first = xbm(*make_batch(gen))
    second = xbm(*make_batch(gen))
    with pytest.raises(RuntimeError, match="inplace"):
        (first + second).backward()


def test_self_excluded_by_index_not_by_value() -> None:
    """An exact duplicate (S = 1) from an earlier batch is a positive; only the own slot is
    excluded."""
    gen = torch.Generator().manual_seed(3)
    toy = ToyPairLoss()
    xbm = CrossBatchMemory(toy, size=32, dim=DIM, batch_loss=False)
    x = F.normalize(torch.randn(4, DIM, generator=gen), dim=1)
    y = torch.tensor([0, 1, 2, 3])  # no in-batch positive
    xbm(x, y)
    assert int(xbm.num_active) == 0  # only own copies share a label: all excluded
    xbm(x.clone(), y)  # same vectors again
    assert int(xbm.num_active) == 4  # each anchor's earlier copy is a positive
    assert toy.last_ref_size == 8


# ---------------------------------------------------------------- ring buffer
def test_wraparound_is_fifo_when_batch_does_not_divide_size() -> None:
    gen = torch.Generator().manual_seed(4)
    size, b = 10, 4
    xbm = CrossBatchMemory(ToyPairLoss(), size=size, dim=DIM, batch_loss=False)
    rows_x, rows_y = [], []
    ptr = 0
    for _ in range(7):
        x, y = make_batch(gen, b=b)
        rows_x.append(x.detach())
        rows_y.append(y)
        all_x, all_y = torch.cat(rows_x)[-size:], torch.cat(rows_y)[-size:]
        # The loss equals the loss against the last `size` rows (any order), self by index.
        self_idx = torch.arange(len(all_y) - b, len(all_y))
        got, got_grad = loss_and_grad(xbm, x, y)
        want, want_grad = loss_and_grad(ToyPairLoss(), x, y, all_x, all_y, self_idx)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
        # Slots are consecutive modulo size and hold this batch.
        slots = (ptr + torch.arange(b)) % size
        torch.testing.assert_close(xbm.memory_emb[slots], x.detach())
        ptr = (ptr + b) % size
        assert int(xbm.ptr) == ptr
        assert int(xbm.filled) == min(len(torch.cat(rows_y)), size)
    # After the last step the memory holds exactly the last `size` rows, oldest overwritten.
    last = torch.cat(rows_x)[-size:]
    order = (ptr + torch.arange(size)) % size  # oldest slot first
    torch.testing.assert_close(xbm.memory_emb[order], last)
    torch.testing.assert_close(xbm.memory_labels[order], torch.cat(rows_y)[-size:])


def test_enqueue_returns_slots_and_size_equal_batch() -> None:
    xbm = CrossBatchMemory(ToyPairLoss(), size=4, dim=DIM)
    x = F.normalize(torch.randn(4, DIM), dim=1)
    y = torch.arange(4)
    assert xbm.enqueue(x, y).tolist() == [0, 1, 2, 3]
    assert xbm.enqueue(x, y).tolist() == [0, 1, 2, 3]
    assert int(xbm.ptr) == 0 and int(xbm.filled) == 4
    assert xbm.enqueue(x[:3], y[:3]).tolist() == [0, 1, 2]
    assert xbm.enqueue(x[:3], y[:3]).tolist() == [3, 0, 1]


def test_partial_fill_uses_only_filled_part() -> None:
    """Unwritten slots (zeros, label 0) must not act as references."""
    gen = torch.Generator().manual_seed(5)
    toy = ToyPairLoss()
    xbm = CrossBatchMemory(toy, size=100, dim=DIM, batch_loss=False)
    x1, _ = make_batch(gen, b=5)
    y1 = torch.zeros(5, dtype=torch.long)  # label 0, like the empty slots
    xbm(x1, y1)
    assert toy.last_ref_size == 5 and int(xbm.filled) == 5
    x2, y2 = make_batch(gen, b=5)
    y2[0] = 0
    got = xbm(x2, y2)
    assert toy.last_ref_size == 10 and int(xbm.filled) == 10
    ref = torch.cat([x1.detach(), x2.detach()])
    want = toy_loss_by_loops(x2, y2, ref, torch.cat([y1, y2]), torch.arange(5, 10))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- warm-up and counting
def test_warmup_uses_in_batch_loss_only_and_counts_iterations() -> None:
    gen = torch.Generator().manual_seed(6)
    loss = build_loss("contrastive")
    xbm = CrossBatchMemory(build_loss("contrastive"), size=40, dim=DIM, start_iteration=3)
    for t in range(3):
        x, y = make_batch(gen)
        torch.testing.assert_close(xbm(x, y), loss(x, y))
        assert int(xbm.iteration) == t + 1
        assert int(xbm.filled) == 0 and int(xbm.ptr) == 0
        assert int(xbm.num_active) == int(loss.num_active)
    x, y = make_batch(gen)
    got = xbm(x, y)
    batch_term = loss(x, y)
    n_batch = int(loss.num_active)
    mem_term = loss(x, y, x.detach(), y, torch.arange(6))
    torch.testing.assert_close(got, batch_term + mem_term)
    assert int(xbm.num_active) == n_batch + int(loss.num_active)
    assert int(xbm.iteration) == 4 and int(xbm.filled) == 6


def test_batch_loss_false_drops_in_batch_term_after_start_only() -> None:
    gen = torch.Generator().manual_seed(7)
    loss = ToyPairLoss()
    xbm = CrossBatchMemory(ToyPairLoss(), size=40, dim=DIM, start_iteration=1, batch_loss=False)
    x, y = make_batch(gen)
    torch.testing.assert_close(xbm(x, y), loss(x, y))  # warm-up: in-batch loss
    x2, y2 = make_batch(gen)
    torch.testing.assert_close(xbm(x2, y2), loss(x2, y2, x2.detach(), y2, torch.arange(6)))


# ---------------------------------------------------------------- checkpointing
def test_state_dict_round_trip_continues_exactly() -> None:
    gen = torch.Generator().manual_seed(8)
    batches = [make_batch(gen, b=4) for _ in range(8)]

    def fresh() -> CrossBatchMemory:
        return CrossBatchMemory(build_loss("multi_similarity"), size=10, dim=DIM, start_iteration=2)

    xbm = fresh()
    for x, y in batches[:5]:
        xbm(x, y)
    assert set(xbm.state_dict()) >= {"memory_emb", "memory_labels", "ptr", "filled", "iteration"}
    buf = io.BytesIO()
    torch.save(xbm.state_dict(), buf)
    buf.seek(0)
    resumed = fresh()
    resumed.load_state_dict(torch.load(buf))
    assert (int(resumed.ptr), int(resumed.filled), int(resumed.iteration)) == (2, 10, 5)
    for x, y in batches[5:]:
        a, b = xbm(x, y), resumed(x, y)
        assert torch.equal(a, b)
    assert torch.equal(xbm.memory_emb, resumed.memory_emb)
    assert int(xbm.ptr) == int(resumed.ptr)


def test_load_state_dict_through_a_parent_module() -> None:
    parent = nn.ModuleDict({"xbm": CrossBatchMemory(ToyPairLoss(), size=8, dim=DIM)})
    parent["xbm"].enqueue(F.normalize(torch.randn(3, DIM), dim=1), torch.arange(3))
    other = nn.ModuleDict({"xbm": CrossBatchMemory(ToyPairLoss(), size=8, dim=DIM)})
    other.load_state_dict(copy.deepcopy(parent.state_dict()))
    assert other["xbm"].enqueue(torch.zeros(2, DIM), torch.arange(2)).tolist() == [3, 4]


# ---------------------------------------------------------------- every loss of the library
LOSS_CONFIGS = [
    ("contrastive", {}),
    ("contrastive", {"form": "distance"}),
    ("triplet", {"mining": "semihard"}),
    ("triplet", {"mining": "hard"}),
    ("triplet", {"mining": "all"}),
    ("lifted", {"variant": "original"}),
    ("lifted", {"variant": "modified"}),
    ("binomial", {}),
    ("nca", {}),
    ("multi_similarity", {}),
    ("margin", {}),
]


@pytest.mark.parametrize(("name", "hp"), LOSS_CONFIGS, ids=lambda v: str(v))
def test_every_pair_loss_runs_inside_memory(name: str, hp: dict) -> None:
    gen = torch.Generator().manual_seed(9)
    xbm = CrossBatchMemory(build_loss(name, **hp), size=50, dim=16, start_iteration=1)
    for _ in range(6):  # warm-up, fill, wrap around
        x = F.normalize(torch.randn(16, 16, generator=gen), dim=1).requires_grad_(True)
        y = torch.arange(4).repeat_interleave(4)
        loss = xbm(x, y)
        loss.backward()
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert torch.isfinite(x.grad).all()
        assert int(xbm.num_active) >= 0
    assert int(xbm.filled) == 50


def test_wrapped_loss_parameters_are_exposed() -> None:
    margin = build_loss("margin", num_classes=4)
    xbm = CrossBatchMemory(margin, size=32, dim=DIM)
    params = dict(xbm.named_parameters())
    assert "loss.beta" in params and params["loss.beta"] is margin.beta
    x, y = make_batch(torch.Generator().manual_seed(10), b=8, classes=4)
    xbm(x, y).backward()
    assert margin.beta.grad is not None
    assert xbm.active_unit == margin.active_unit


# ---------------------------------------------------------------- dtype, device, errors
def test_bfloat16_batch_keeps_float32_buffer() -> None:
    gen = torch.Generator().manual_seed(11)
    xbm = CrossBatchMemory(build_loss("contrastive"), size=20, dim=DIM)
    x, y = make_batch(gen)
    xb = x.detach().bfloat16().requires_grad_(True)
    loss = xbm(xb, y)
    loss.backward()
    assert xbm.memory_emb.dtype == torch.float32
    torch.testing.assert_close(xbm.memory_emb[:6], xb.detach().float())
    assert torch.isfinite(loss) and xb.grad.dtype == torch.bfloat16
    xbm.memory_emb[6:12] = x.detach()  # full float32 precision
    kept = xbm.memory_emb.clone()
    xbm.to(torch.bfloat16)  # casting a parent module must not degrade the memory
    assert xbm.memory_emb.dtype == torch.float32
    assert torch.equal(xbm.memory_emb, kept)
    assert xbm.memory_labels.dtype == torch.long


def test_buffers_follow_module_to() -> None:
    xbm = CrossBatchMemory(ToyPairLoss(), size=8, dim=DIM).to("cpu")
    names = {n for n, _ in xbm.named_buffers()}
    assert {"memory_emb", "memory_labels", "ptr", "filled", "iteration"} <= names
    xbm_meta = CrossBatchMemory(ToyPairLoss(), size=8, dim=DIM).to("meta")
    assert xbm_meta.memory_emb.device.type == "meta"


def test_errors() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module"):
        CrossBatchMemory(lambda *a: 0, size=8, dim=DIM)
    with pytest.raises(ValueError, match="size"):
        CrossBatchMemory(ToyPairLoss(), size=0, dim=DIM)
    with pytest.raises(ValueError, match="dim"):
        CrossBatchMemory(ToyPairLoss(), size=8, dim=0)
    with pytest.raises(ValueError, match="start_iteration"):
        CrossBatchMemory(ToyPairLoss(), size=8, dim=DIM, start_iteration=-1)
    xbm = CrossBatchMemory(ToyPairLoss(), size=4, dim=DIM)
    x, y = make_batch(torch.Generator().manual_seed(12), b=6)
    with pytest.raises(ValueError, match="exceeds the memory size"):
        xbm(x, y)
    with pytest.raises(ValueError, match=r"\(B, 8\)"):
        xbm(torch.randn(2, 5), torch.arange(2))
    with pytest.raises(ValueError, match="labels"):
        xbm(x[:2], torch.arange(3))
    with pytest.raises(ValueError, match="integer"):
        xbm(x[:2], torch.zeros(2))
    bad = x[:2].detach().clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        xbm.enqueue(bad, torch.arange(2))
    assert int(xbm.filled) == 0  # nothing written
    assert int(xbm.iteration) == 0


def test_unit_rows_required_only_for_deepmetric_losses() -> None:
    """With a deepmetric loss the memory refuses rows that are not unit vectors (and NaN) at
    enqueue, writing nothing; a loss of the user's own may work on any rows."""
    raw = 2.0 * F.normalize(torch.randn(4, DIM, generator=torch.Generator().manual_seed(13)))
    ours = CrossBatchMemory(build_loss("contrastive"), size=8, dim=DIM)
    assert ours.unit_rows
    with pytest.raises(ValueError, match="not L2-normalised"):
        ours.enqueue(raw, torch.arange(4))
    bad = F.normalize(raw)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ours.enqueue(bad, torch.arange(4))
    assert int(ours.filled) == 0
    toy = CrossBatchMemory(ToyPairLoss(), size=8, dim=DIM)
    assert not toy.unit_rows
    toy.enqueue(raw, torch.arange(4))
    assert int(toy.filled) == 4
