"""deepmetric losses against the float64 loop references of tests/loss_reference.py.

Values, gradients (embeddings and references) and active counts on clustered random batches,
in-batch and with references; edge cases; numerical robustness; the margin loss's sampler.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric.losses import PAIR_LOSSES, build_loss
from loss_reference import (
    Batch,
    make_case,
    margin_given_triplets,
    margin_sampling_probs,
    reference_loss,
)

# (name, hyper-parameters) covering every variant the oracles know.
CONFIGS = [
    ("contrastive", {}),
    ("contrastive", {"neg_margin": 0.3, "pos_margin": 0.9}),
    ("contrastive", {"reduction": "sum_over_batch"}),
    ("contrastive", {"form": "distance"}),
    ("contrastive", {"form": "distance", "neg_margin": 1.3, "pos_margin": 0.2}),
    ("contrastive", {"form": "distance", "reduction": "sum_over_batch"}),
    ("triplet", {}),
    ("triplet", {"squared": True, "margin": 0.3}),
    ("triplet", {"soft": True}),
    ("triplet", {"mining": "hard"}),
    ("triplet", {"mining": "hard", "squared": True}),
    ("triplet", {"mining": "hard", "soft": True}),
    ("triplet", {"mining": "all"}),
    ("triplet", {"mining": "all", "reduce_all": "all", "margin": 0.1}),
    ("triplet", {"mining": "all", "squared": True, "margin": 0.3}),
    ("lifted", {}),
    ("lifted", {"margin": 0.5}),
    ("lifted", {"variant": "modified"}),
    ("lifted", {"variant": "modified", "alpha": 30.0, "beta": 3.0}),
    ("binomial", {}),
    ("binomial", {"weighting": "per_anchor"}),
    ("binomial", {"scale_pos": 3.0, "threshold": 0.4, "neg_cost": 10.0}),
    ("nca", {}),
    ("nca", {"scale": 4.0}),
    ("multi_similarity", {}),
    ("multi_similarity", {"preset": "paper"}),
    ("multi_similarity", {"preset": "code"}),
    ("multi_similarity", {"epsilon": 0.3, "base": 0.6, "alpha": 3.0, "beta": 20.0}),
    ("multi_similarity", {"mining": False}),
]


def cfg_id(cfg):
    name, hp = cfg
    return name + ("-" + ",".join(f"{k}={v}" for k, v in hp.items()) if hp else "")


CASES = [
    ("rand6", None),
    ("pk16", None),
    ("rand40", None),
    ("rand6", "self"),
    ("pk16", "self"),
    ("rand40", "self"),
    ("pk16", "noself"),
]


def tolerance(out: torch.Tensor) -> float:
    """Relative tolerance for the dtype the loss was computed in."""
    return 1e-9 if out.dtype == torch.float64 else 2e-5


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    got = got.detach().double()
    want = want.detach().double()
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale, (
        f"{what}: max abs error {err:.3e} (scale {scale:.3g})\n{got}\n{want}"
    )


def grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    gs = torch.autograd.grad(out, inputs, allow_unused=True, retain_graph=False)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)]


def tangential(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g without its component along each row of x (x rows are unit vectors)."""
    x = x.detach().double()
    return g - (g * x).sum(1, keepdim=True) * x


def at_kink(name: str, hp: dict, ref) -> bool:
    """[pos_margin - S]_+ with pos_margin >= 1 sits on its kink for an exact duplicate
    (make_case puts one in the references): its gradient there is radial (along the row
    itself) and whether rounding gives S = 1 - 1e-16 or 1 + 2e-16 decides if it is counted.
    Only the tangential components are then compared (the radial one is projected out by
    the L2 normalisation in front of every loss)."""
    return (
        ref is not None
        and name == "contrastive"
        and hp.get("form", "similarity") == "similarity"
        and hp.get("pos_margin", 1.0) >= 1.0
    )


def merge_duplicate_rows(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row of g replaced by the sum over the rows of x identical to it."""
    x = x.detach()
    same = (x[:, None, :] == x[None, :, :]).all(-1).to(g.dtype)
    return same @ g


def selects(name: str, hp: dict) -> bool:
    """Semi-hard / batch-hard pick one of several exactly tied (duplicate) references: the
    choice among identical rows is arbitrary, so their gradients are compared summed."""
    return name == "triplet" and hp.get("mining", "semihard") in ("semihard", "hard")


def check_against_reference(name, hp, emb, labels, ref, ref_labels, self_index, rtol=None):
    loss_fn = build_loss(name, **hp)
    out = loss_fn(emb, labels, ref, ref_labels, self_index)
    want, count = reference_loss(name, Batch(emb, labels, ref, ref_labels, self_index), **hp)
    assert out.dim() == 0
    tol = tolerance(out) if rtol is None else rtol
    assert_close(out, want, tol, "loss value")
    assert int(loss_fn.num_active) == count, (int(loss_fn.num_active), count)
    assert isinstance(loss_fn.active_unit, str) and loss_fn.active_unit
    inputs = [emb] + ([ref] if ref is not None and ref.requires_grad else [])
    got_g = grads(out, inputs)
    want_g = grads(want, inputs)
    for which, g, w, x in zip(("d/d embeddings", "d/d ref_emb"), got_g, want_g, inputs):
        assert torch.isfinite(g).all(), which
        if at_kink(name, hp, ref):
            g, w = tangential(g, x), tangential(w, x)
        if selects(name, hp) and x is ref:
            g, w = merge_duplicate_rows(g, x), merge_duplicate_rows(w, x)
        assert_close(g, w, 5 * tol, which)
    return out, want, count


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1] or 'inbatch'}")
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_matches_reference(cfg, case):
    name, hp = cfg
    kind, refs = case
    emb, labels, ref, ref_labels, self_index = make_case(kind, refs, seed=1)
    check_against_reference(name, hp, emb, labels, ref, ref_labels, self_index)


def test_cases_are_not_degenerate():
    """The oracle cases exercise both sides of every hinge / mining rule."""
    emb, labels, *_ = make_case("rand40")
    b = Batch(emb, labels)
    _, n_all = reference_loss("triplet", b, mining="all", reduce_all="all")
    _, n_nonzero = reference_loss("triplet", b, mining="all")
    assert 0 < n_nonzero < n_all
    _, n_ms = reference_loss("multi_similarity", b)
    _, n_ms_full = reference_loss("multi_similarity", b, mining=False)
    assert 0 < n_ms < n_ms_full


# ---------------------------------------------------------------------------------------
# references: consistency with the in-batch computation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_refs_equal_to_batch_match_in_batch(cfg):
    """ref_emb = a copy of the batch with self_index = arange gives the in-batch value
    (lifted original is documented as anchor-side only with references, so it differs)."""
    name, hp = cfg
    emb, labels, *_ = make_case("pk16", seed=3)
    loss_fn = build_loss(name, **hp)
    in_batch = loss_fn(emb, labels)
    n_in = int(loss_fn.num_active)
    with_refs = loss_fn(emb, labels, emb.detach().clone(), labels.clone(), torch.arange(16))
    n_ref = int(loss_fn.num_active)
    if name == "lifted" and hp.get("variant", "original") == "original":
        assert n_ref == 2 * n_in  # ordered pairs, anchor side only
        return
    assert n_in == n_ref
    assert_close(with_refs, in_batch, 1e-5, "value with refs = batch")


def test_self_index_minus_one_keeps_the_copy():
    """self_index = -1 excludes nothing: the anchor's copy becomes a positive at S = 1."""
    emb, labels, *_ = make_case("pk16", seed=4)
    refs = emb.detach().clone()
    loss_fn = build_loss("contrastive")
    loss_fn(emb, labels, refs, labels, torch.arange(16))
    n_excl = int(loss_fn.num_active)
    loss_fn(emb, labels, refs, labels, torch.full((16,), -1))
    assert int(loss_fn.num_active) == n_excl + 16
    loss_fn(emb, labels, refs, labels, None)
    assert int(loss_fn.num_active) == n_excl + 16


# ---------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------
def _unit(b, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=dtype)).requires_grad_(True)


EDGE_CONFIGS = [
    ("contrastive", {}),
    ("contrastive", {"form": "distance"}),
    ("triplet", {}),
    ("triplet", {"mining": "hard"}),
    ("triplet", {"mining": "all"}),
    ("lifted", {}),
    ("lifted", {"variant": "modified"}),
    ("binomial", {}),
    ("binomial", {"weighting": "per_anchor"}),
    ("nca", {}),
    ("multi_similarity", {}),
    ("margin", {}),
]


def _edge_check(name, hp, emb, labels, ref=None, ref_labels=None, self_index=None):
    """Value and count equal the oracle; a zero is exact, has a graph and zero gradients."""
    loss_fn = build_loss(name, **hp)
    out = loss_fn(emb, labels, ref, ref_labels, self_index)
    assert out.dim() == 0 and torch.isfinite(out)
    assert out.requires_grad, "the loss must keep a graph even when it is zero"
    if name == "margin":
        trip = loss_fn.last_triplets
        beta = next(loss_fn.parameters()).detach().double()
        want, count = margin_given_triplets(
            Batch(emb, labels, ref, ref_labels, self_index), trip, beta
        )
    else:
        want, count = reference_loss(name, Batch(emb, labels, ref, ref_labels, self_index), **hp)
    assert int(loss_fn.num_active) == count
    assert_close(out, want, 1e-5, "value")
    (g,) = torch.autograd.grad(out, [emb])
    assert torch.isfinite(g).all()
    if count == 0:
        assert out.item() == 0.0
        assert (g == 0).all()
    return out, count


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=cfg_id)
def test_all_labels_distinct(cfg):
    """No positive pair (every sample its own class); in-batch and with a memory holding
    only the anchors' own copies."""
    name, hp = cfg
    emb = _unit(8)
    labels = torch.arange(8)
    _, count = _edge_check(name, hp, emb, labels)
    if name not in ("contrastive", "binomial") or hp.get("weighting") == "per_anchor":
        assert count == 0
    _, count = _edge_check(
        name, hp, emb, labels, emb.detach().clone(), labels.clone(), torch.arange(8)
    )
    if name not in ("contrastive", "binomial") or hp.get("weighting") == "per_anchor":
        assert count == 0


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=cfg_id)
def test_single_class(cfg):
    """Every pair positive, no negative."""
    name, hp = cfg
    emb = _unit(6, seed=1)
    labels = torch.full((6,), 3)
    _, count = _edge_check(name, hp, emb, labels)
    if name in ("triplet", "lifted", "multi_similarity", "margin") or hp.get("weighting"):
        assert count == 0


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=cfg_id)
def test_batch_of_one(cfg):
    name, hp = cfg
    _, count = _edge_check(name, hp, _unit(1), torch.tensor([0]))
    assert count == 0


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=cfg_id)
def test_duplicates_are_valid_positives(cfg):
    """Identical rows with the same label are positives at S = 1 (removed by index only)."""
    name, hp = cfg
    base = _unit(6, seed=2).detach()
    emb = torch.cat([base, base[:3]]).requires_grad_(True)  # rows 6, 7, 8 duplicate 0, 1, 2
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    assert (emb[0] @ emb[6]).item() == pytest.approx(1.0, abs=1e-12)
    _, count = _edge_check(name, hp, emb, labels)
    # Also against a memory that stores a second copy of every anchor (not its own slot).
    mem = torch.cat([emb.detach(), emb.detach()])
    mem_labels = torch.cat([labels, labels])
    _edge_check(name, hp, emb, labels, mem, mem_labels, torch.arange(9))
    if name == "contrastive":
        # 9 anchors x 8 others, plus each of the 6 duplicate pairs counted from both ends
        assert count == 72


def test_duplicates_counted_float32():
    """In float32 the duplicate similarity rounds to ~1 - 6e-8 or 1 + 1e-7: still positive."""
    base = F.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(5)))
    emb = torch.cat([base, base])
    labels = torch.arange(5).repeat(2)
    loss_fn = build_loss("contrastive")
    loss_fn(emb, labels)
    assert int(loss_fn.num_active) == 90
    loss_fn = build_loss("nca")
    loss_fn(emb, labels)
    assert int(loss_fn.num_active) == 10


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("where", ["embeddings", "ref_emb"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(name, where, bad):
    emb = _unit(6).detach()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    ref = emb.clone()
    if where == "embeddings":
        emb[2, 3] = bad
    else:
        ref[4, 0] = bad
    loss_fn = build_loss(name)
    with pytest.raises(ValueError, match=f"^{where} contain NaN or inf"):
        loss_fn(emb, labels, ref, labels, torch.arange(6))


@pytest.mark.parametrize("bad", [-2, 6])
def test_self_index_out_of_range_raises(bad):
    emb = _unit(6).detach()
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    self_index = torch.arange(6)
    self_index[3] = bad
    with pytest.raises(ValueError, match=r"self_index must lie in \[-1, 6\)"):
        build_loss("contrastive")(emb, labels, emb.clone(), labels, self_index)


def test_contrastive_reduction_names():
    """Deep_Metric's reduction (sum over pairs / B) is "sum_over_batch"; its former name
    "seed" (also the RNG seed everywhere) is rejected with the new name in the message."""
    with pytest.raises(ValueError, match="sum_over_batch"):
        build_loss("contrastive", reduction="seed")
    with pytest.raises(ValueError, match="reduction must be one of"):
        build_loss("contrastive", reduction="sum")
    emb, labels, *_ = make_case("pk16", seed=2)
    mean_fn = build_loss("contrastive")
    mean = mean_fn(emb, labels)
    summed = build_loss("contrastive", reduction="sum_over_batch")(emb, labels)
    assert_close(summed, mean * int(mean_fn.num_active) / 16, 1e-12, "sum over pairs / B")


def test_unknown_name_and_hparam():
    with pytest.raises(ValueError):
        build_loss("nope")
    with pytest.raises(TypeError):
        build_loss("triplet", margn=0.1)


# ---------------------------------------------------------------------------------------
# the losses assume unit vectors: rows that are not are an error that says how to fix them
# ---------------------------------------------------------------------------------------
def _bf16_autocast_unit(b: int, d: int, seed: int) -> torch.Tensor:
    """F.normalize of a Linear layer's output under CPU bfloat16 autocast, cast to float32:
    norms off 1 by up to ~6e-3 (bfloat16 rounding), what an AMP model hands the loss."""
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(32, d)
    torch.nn.init.normal_(layer.weight, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = F.normalize(layer(torch.randn(b, 32, generator=g)), dim=1)
    assert emb.dtype == torch.bfloat16
    return emb.float()


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_raw_embeddings_raise(name):
    """Rows that are not unit vectors raise a ValueError that gives the norms found and the
    fix, in-batch and for the anchors of a call with references."""
    emb = _unit(8, seed=3).detach()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    raw = emb * torch.linspace(0.5, 3.0, 8)[:, None]
    loss_fn = build_loss(name)
    message = (
        r"^embeddings are not L2-normalised: row norms in \[0\.5, 3\], expected 1 \+- 0\.01"
        r".*torch\.nn\.functional\.normalize\(embeddings, dim=1\).*model\.l2_normalize: true"
    )
    with pytest.raises(ValueError, match=message):
        loss_fn(raw, labels)
    with pytest.raises(ValueError, match=message):
        loss_fn(raw, labels, emb, labels, torch.arange(8))


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_raw_ref_emb_raise(name):
    """Unit anchors against references that are not unit vectors: the error names ref_emb."""
    emb = _unit(8, seed=4).detach()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    refs = emb.clone()
    refs[5] *= 0.9
    with pytest.raises(
        ValueError, match=r"^ref_emb are not L2-normalised: row norms in \[0\.9, 1\]"
    ):
        build_loss(name)(emb, labels, refs, labels, torch.arange(8))


def test_check_ref_norms_false_skips_only_the_reference_norms():
    """check_ref_norms=False (for a caller that checked its references when it stored them)
    skips the norm check of ref_emb only: anchors are still checked, NaN still raises."""
    emb = _unit(8, seed=5).detach()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss_fn = build_loss("contrastive")
    with pytest.raises(ValueError, match=r"^ref_emb are not L2-normalised"):
        loss_fn(emb, labels, 2 * emb, labels)
    loss_fn(emb, labels, 2 * emb, labels, check_ref_norms=False)
    with pytest.raises(ValueError, match=r"^embeddings are not L2-normalised"):
        loss_fn(2 * emb, labels, emb, labels, check_ref_norms=False)
    bad = emb.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^ref_emb contain NaN"):
        loss_fn(emb, labels, bad, labels, check_ref_norms=False)


def test_cross_batch_memory_checks_rows_when_written():
    """The memory term passes the memory as ref_emb with check_ref_norms=False: every row
    was checked when it was enqueued. Rows that are not unit vectors raise there and are not
    written; the memory term itself raises for anchors that are not unit vectors."""
    from deepmetric.memory import CrossBatchMemory

    xbm = CrossBatchMemory(build_loss("multi_similarity"), size=32, dim=8)
    g = torch.Generator().manual_seed(5)
    raw = 3.0 * F.normalize(torch.randn(16, 8, generator=g), dim=1)
    with pytest.raises(
        ValueError, match=r"^embeddings are not L2-normalised: row norms in \[3, 3\]"
    ):
        xbm.enqueue(raw, torch.arange(16) % 4)
    assert int(xbm.filled) == 0 and int(xbm.ptr) == 0  # nothing written
    with pytest.raises(ValueError, match=r"^embeddings are not L2-normalised"):
        xbm(raw[:8], torch.arange(8) % 4)
    xbm.enqueue(F.normalize(raw, dim=1), torch.arange(16) % 4)
    calls = []
    real_forward = xbm.loss.forward

    def spy(*args, **kwargs):
        calls.append(kwargs.get("check_ref_norms", True))
        return real_forward(*args, **kwargs)

    xbm.loss.forward = spy
    xbm(F.normalize(torch.randn(8, 8, generator=g), dim=1), torch.arange(8) % 4)
    assert calls == [True, False]  # the in-batch term, then the memory term


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
@pytest.mark.parametrize("kind", ["float32", "float64", "bf16_autocast"])
def test_normalised_embeddings_pass(name, kind):
    """Unit rows pass in float32 and float64, and so do bfloat16-autocast outputs cast to
    float32 (norms off 1 by bfloat16 rounding), as anchors and as references."""
    labels = torch.arange(4).repeat_interleave(4)
    if kind == "bf16_autocast":
        emb, refs = _bf16_autocast_unit(16, 64, seed=6), _bf16_autocast_unit(16, 64, seed=7)
        assert (torch.linalg.vector_norm(emb, dim=1) - 1).abs().max() > 1e-3  # not exact
    else:
        dtype = torch.float32 if kind == "float32" else torch.float64
        emb, refs = _unit(16, 64, seed=6, dtype=dtype), _unit(16, 64, seed=7, dtype=dtype)
    for out in (build_loss(name)(emb, labels), build_loss(name)(emb, labels, refs, labels)):
        assert torch.isfinite(out)


@pytest.mark.parametrize(
    "norm, ok", [(1.0095, True), (0.9905, True), (1.0105, False), (0.9895, False)]
)
def test_norm_tolerance(norm, ok):
    """Row norms are accepted within 1 +- 0.01 (NORM_TOLERANCE), rejected outside."""
    emb = _unit(8, seed=8).detach()
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    scaled = emb.clone()
    scaled[2] *= norm
    if ok:
        build_loss("nca")(scaled, labels)
        build_loss("nca")(emb, labels, scaled, labels)
    else:
        with pytest.raises(ValueError, match="not L2-normalised"):
            build_loss("nca")(scaled, labels)
        with pytest.raises(ValueError, match="not L2-normalised"):
            build_loss("nca")(emb, labels, scaled, labels)


# ---------------------------------------------------------------------------------------
# numerical robustness
# ---------------------------------------------------------------------------------------
LARGE_SCALE = [
    ("multi_similarity", {"beta": 200.0, "alpha": 50.0}),
    ("lifted", {"variant": "modified", "alpha": 200.0, "beta": 50.0}),
    ("nca", {"scale": 200.0}),
    ("binomial", {"scale_pos": 20.0, "neg_cost": 25.0}),
    ("binomial", {"scale_pos": 20.0, "neg_cost": 25.0, "weighting": "per_anchor"}),
    ("triplet", {"soft": True, "squared": True}),
    ("lifted", {"margin": 60.0}),
]


@pytest.mark.parametrize("cfg", LARGE_SCALE, ids=cfg_id)
def test_large_scales_finite_float32(cfg):
    """exp(200 S) overflows float32: the loss must stay finite and match float64."""
    name, hp = cfg
    emb64, labels, *_ = make_case("pk16", seed=6, spread=0.6)
    emb32 = emb64.detach().float().requires_grad_(True)
    out = build_loss(name, **hp)(emb32, labels)
    (g,) = torch.autograd.grad(out, [emb32])
    assert torch.isfinite(out) and torch.isfinite(g).all()
    want, _ = reference_loss(name, Batch(emb64, labels), **hp)
    (wg,) = torch.autograd.grad(want, [emb64])
    assert abs(out.item() - want.item()) <= 1e-3 * max(1.0, abs(want.item()))
    assert_close(g, wg, 2e-3, "float32 gradient at large scale")


AUTOCAST_CONFIGS = [
    ("contrastive", {}),
    ("contrastive", {"form": "distance"}),
    ("triplet", {}),
    ("triplet", {"mining": "hard"}),
    ("triplet", {"mining": "all"}),
    ("lifted", {}),
    ("lifted", {"variant": "modified"}),
    ("binomial", {}),
    ("nca", {}),
    ("multi_similarity", {}),
    ("margin", {}),
]


@pytest.mark.parametrize("cfg", AUTOCAST_CONFIGS, ids=cfg_id)
def test_bfloat16_autocast(cfg):
    """Under CPU bf16 autocast, with embeddings coming out of a Linear layer (bf16), the loss
    is finite, float32, and equals the float32 loss of the same (bf16-rounded) embeddings
    (similarities are computed with autocast disabled); float32 inputs under autocast give
    the float32 value."""
    name, hp = cfg
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 24, generator=g)
    labels = torch.arange(8).repeat_interleave(4)
    layer = torch.nn.Linear(24, 16)
    torch.nn.init.normal_(layer.weight, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb_bf16 = F.normalize(layer(x), dim=1)
        emb_bf16 = emb_bf16.to(torch.bfloat16)
        out = build_loss(name, **hp)(emb_bf16, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(layer.weight.grad).all()
    ref32 = build_loss(name, **hp)(emb_bf16.detach().float(), labels)
    assert abs(out.item() - ref32.item()) <= 1e-4 * max(1.0, abs(ref32.item()))
    # float32 inputs inside an autocast region: not degraded to bf16
    emb32 = F.normalize(torch.randn(32, 16, generator=g), dim=1)
    plain = build_loss(name, **hp)(emb32, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = build_loss(name, **hp)(emb32, labels)
    assert abs(auto.item() - plain.item()) <= 1e-5 * max(1.0, abs(plain.item()))


# ---------------------------------------------------------------------------------------
# margin loss: value given the sampled triplets, learnable beta, sampler statistics
# ---------------------------------------------------------------------------------------
MARGIN_CONFIGS = [
    {},
    {"margin": 0.3, "beta": 1.0},
    {"num_classes": 12},
    {"nu": 0.1},
    {"nu": 0.05, "num_classes": 12},
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1] or 'inbatch'}")
@pytest.mark.parametrize("hp", MARGIN_CONFIGS, ids=lambda h: cfg_id(("margin", h)))
def test_margin_matches_reference_given_triplets(hp, case):
    emb, labels, ref, ref_labels, self_index = make_case(case[0], case[1], seed=2)
    loss_fn = build_loss("margin", **hp)
    beta_param = next(loss_fn.parameters())
    if hp.get("num_classes"):
        with torch.no_grad():  # distinct per-class values, so indexing by class matters
            beta_param.copy_(torch.linspace(0.9, 1.4, hp["num_classes"]))
    out = loss_fn(emb, labels, ref, ref_labels, self_index)
    a, p, n = loss_fn.last_triplets
    batch = Batch(emb, labels, ref, ref_labels, self_index)
    # one negative per positive pair (a, p) of anchors that have a negative
    want_pairs = sorted((i, k) for i in range(batch.B) if batch.N(i) for k in batch.P(i))
    assert sorted(zip(a.tolist(), p.tolist())) == want_pairs
    assert all(batch.is_neg(i, k) for i, k in zip(a.tolist(), n.tolist()))
    beta64 = beta_param.detach().double().clone().requires_grad_(True)
    kw = {k: v for k, v in hp.items() if k in ("margin", "nu")}
    want, count = margin_given_triplets(batch, (a, p, n), beta64, **kw)
    tol = tolerance(out)
    assert_close(out, want, max(tol, 1e-6), "margin loss value")
    assert int(loss_fn.num_active) == count
    inputs = [emb] + ([ref] if ref is not None else [])
    got_g = torch.autograd.grad(out, [*inputs, beta_param], allow_unused=True)
    want_g = torch.autograd.grad(want, [*inputs, beta64], allow_unused=True)
    for g, w in zip(got_g, want_g):
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        assert_close(g, w, max(5 * tol, 1e-5), "margin gradient")


def test_margin_beta_is_learnable():
    loss_fn = build_loss("margin")
    params = list(loss_fn.parameters())
    assert len(params) == 1 and params[0].requires_grad
    emb, labels, *_ = make_case("pk16", seed=0)
    loss_fn(emb.detach().float(), labels).backward()
    assert params[0].grad is not None and params[0].grad.abs().sum() > 0
    per_class = build_loss("margin", num_classes=7)
    (beta,) = list(per_class.parameters())
    assert beta.shape == (7,)
    emb, labels = emb.detach().float()[:12], labels[:12]  # classes 0, 1, 2 only
    per_class(emb, labels).backward()
    assert (beta.grad[:3] != 0).all() and (beta.grad[3:] == 0).all()


def _sampler_batch(dim=4):
    """Four classes in 4-d with negatives at assorted distances, some beyond 1.4."""
    g = torch.Generator().manual_seed(11)
    e1 = torch.zeros(dim)
    e1[0] = 1.0
    rows, labels = [], []
    for _ in range(3):  # class 0, near +e1
        rows.append(e1 + 0.15 * torch.randn(dim, generator=g))
        labels.append(0)
    for c in (1, 2):  # negatives for class 0 at a spread of distances
        for _ in range(4):
            rows.append(e1 + 0.9 * torch.randn(dim, generator=g))
            labels.append(c)
    for _ in range(2):  # class 3 at -e1 (D ~ 2 from class 0; its negatives mostly far)
        rows.append(-e1 + 0.05 * torch.randn(dim, generator=g))
        labels.append(3)
    return F.normalize(torch.stack(rows).double(), dim=1), torch.tensor(labels)


def test_margin_sampler_distribution():
    """Negatives follow w ∝ q(d)^-1 (d clamped at 0.5, w = 0 at D >= 1.4), no same-class
    negative, uniform among negatives when no weight is non-zero."""
    emb, labels = _sampler_batch()
    batch = Batch(emb, labels)
    probs = margin_sampling_probs(batch)
    assert any(batch.D(i, k).item() >= 1.4 for i in range(batch.B) for k in batch.N(i))
    loss_fn = build_loss("margin", seed=123)
    counts = [dict.fromkeys(range(batch.M), 0) for _ in range(batch.B)]
    draws = 600
    for _ in range(draws):
        loss_fn(emb, labels)
        a, _, n = loss_fn.last_triplets
        for i, k in zip(a.tolist(), n.tolist()):
            assert labels[i] != labels[k], "same-class negative sampled"
            counts[i][k] += 1
    checked = 0
    for i in range(batch.B):
        total = sum(counts[i].values())
        if total == 0:
            continue
        for k in range(batch.M):
            p = probs[i].get(k, 0.0)
            freq = counts[i][k] / total
            if p == 0.0:
                assert counts[i][k] == 0, f"anchor {i} drew {k} with zero weight"
            else:
                sd = math.sqrt(p * (1 - p) / total)
                assert abs(freq - p) <= 5 * sd + 1e-3, (i, k, freq, p)
                checked += 1
    assert checked > 20


def test_margin_sampler_uniform_fallback():
    """Class 0 at +e1 has only negatives at D ~ 2 (>= 1.4): uniform among them. Classes 1
    and 2 at -e1 are close to each other: they never draw class 0 (D >= 1.4)."""
    g = torch.Generator().manual_seed(12)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    centers = [e1, -e1, -e1]
    emb = torch.stack([centers[c] + 0.05 * torch.randn(4, generator=g) for c in (0, 0, 1, 1, 2, 2)])
    emb = F.normalize(emb.double(), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss_fn = build_loss("margin", seed=3)
    counts = torch.zeros(6, 6)
    for _ in range(400):
        loss_fn(emb, labels)
        a, _, n = loss_fn.last_triplets
        counts.index_put_((a, n), torch.ones(len(a)), accumulate=True)
    freq0 = counts[:2, 2:] / counts[:2].sum(1, keepdim=True)
    assert (freq0 - 0.25).abs().max() < 0.06  # 800 draws per anchor: sd ~ 0.015
    assert counts[2:, :2].sum() == 0
    assert (counts[2:4, 4:] > 0).all() and (counts[4:, 2:4] > 0).all()


def test_margin_sampler_seeded():
    emb, labels, *_ = make_case("rand40", seed=3)
    t1 = build_loss("margin", seed=5)
    t2 = build_loss("margin", seed=5)
    t1(emb, labels)
    t2(emb, labels)
    for x, y in zip(t1.last_triplets, t2.last_triplets):
        assert torch.equal(x, y)
        assert x.dtype == torch.long and not x.requires_grad


def test_margin_sampler_uses_references():
    emb, labels, ref, ref_labels, self_index = make_case("pk16", "self", seed=9)
    loss_fn = build_loss("margin")
    for _ in range(20):
        loss_fn(emb, labels, ref, ref_labels, self_index)
        a, p, n = loss_fn.last_triplets
        assert (ref_labels[n] != labels[a]).all()
        assert (ref_labels[p] == labels[a]).all()
        assert (p != self_index[a]).all()


@pytest.mark.parametrize(
    "name, hp", [("contrastive", {}), ("triplet", {"mining": "hard"}), ("margin", {})]
)
def test_sparse_gradient_path_matches_reference(name, hp, monkeypatch):
    """Against a reference set most hinge terms are 0 and the CPU backward multiplies the
    gradient matrix as sparse (losses/_autograd.py, grad_matmul): its gradients equal the
    float64 loop oracle's and the dense product's."""
    from deepmetric.losses import _autograd

    g = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(16, 32, generator=g, dtype=torch.float64), dim=1)
    refs = F.normalize(torch.randn(300, 32, generator=g, dtype=torch.float64), dim=1)
    labels = torch.arange(16) % 4
    ref_labels = torch.randint(0, 400, (300,), generator=g)
    ref_labels[:8] = torch.arange(8) % 4  # two positives per anchor
    calls = []
    sparse_mm = torch.sparse.mm
    monkeypatch.setattr(torch.sparse, "mm", lambda a, b: calls.append(1) or sparse_mm(a, b))
    monkeypatch.setattr(_autograd, "SPARSE_GRAD_MIN_SIZE", 0)  # a small case takes the path

    def run(density: float):
        monkeypatch.setattr(_autograd, "SPARSE_GRAD_DENSITY", density)
        x, r = emb.clone().requires_grad_(), refs.clone().requires_grad_()
        loss_fn = build_loss(name, seed=3, **hp) if name == "margin" else build_loss(name, **hp)
        loss = loss_fn(x, labels, r, ref_labels)
        loss.backward()
        if name == "margin":
            beta = next(loss_fn.parameters()).detach().double()
            batch = Batch(x, labels, r, ref_labels)
            want, _ = margin_given_triplets(batch, loss_fn.last_triplets, beta)
        else:
            want, _ = reference_loss(name, Batch(x, labels, r, ref_labels), **hp)
        want_grads = torch.autograd.grad(want, [x, r], allow_unused=True)
        want_grads = [torch.zeros_like(x) if w is None else w for w in want_grads]
        return [loss.detach(), x.grad, r.grad], [want.detach(), *want_grads]

    dense, _ = run(0.0)
    assert not calls
    sparse, oracle = run(0.05)
    assert calls, "the sparse product was not used"
    for got, dense_value, want in zip(sparse, dense, oracle):
        torch.testing.assert_close(got, dense_value, rtol=1e-12, atol=1e-12)
        assert_close(got, want, 1e-9, "sparse path vs oracle")
    assert sparse[1].abs().sum() > 0 and sparse[2].abs().sum() > 0


@pytest.mark.parametrize("case", ["in_batch", "refs_self_index", "refs_absent_labels"])
def test_same_lists_and_fill_same_match_the_masks(case):
    """The padded (B, C) same-label lists hold exactly the positive slots of the (B, M) mask,
    and fill_same equals masked_fill over the same-label mask, also for anchors whose label is
    absent from the references and with own slots given by self_index (-1 = none)."""
    from deepmetric.losses import build_pairs

    g = torch.Generator().manual_seed(3)
    emb = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 5])  # 2, 4, 5: singletons
    if case == "in_batch":
        pairs = build_pairs(emb, labels)
    else:
        refs = F.normalize(torch.randn(20, 8, generator=g), dim=1)
        ref_labels = torch.randint(0, 4 if case == "refs_absent_labels" else 6, (20,), generator=g)
        self_index = None
        if case == "refs_self_index":
            refs[:12], ref_labels[:12] = emb, labels  # anchors 0..11 stored in slots 0..11
            self_index = torch.arange(12)
            self_index[[2, 7]] = -1  # these two have no own copy
        pairs = build_pairs(emb, labels, refs, ref_labels, self_index)
    lists = pairs.same_lists
    for i in range(12):
        listed = sorted(lists.index[i][lists.positive[i]].tolist())
        assert listed == pairs.pos[i].nonzero().flatten().tolist()
    assert torch.equal(lists.num_same, pairs.same.sum(1))
    assert torch.equal(lists.has_group, pairs.same.any(1))
    x = torch.randn(pairs.sim.shape, generator=g)
    assert torch.equal(pairs.fill_same(x, -7.0), x.masked_fill(pairs.same, -7.0))
    if case == "refs_absent_labels":
        assert not lists.has_group.all()  # labels 4 and 5 are not among the references
