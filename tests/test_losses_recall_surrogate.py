"""Recall@k surrogate (RS@k) and SiMix against the float64 loop oracle of tests/loss_reference.py.

Values, gradients and counts in-batch and with references, both rank conventions
(``count_query_in_rank``), with and without the clip; limits (tau2 -> 0: integer ranks;
tau1 -> 0: Recall@k); edge cases; SiMix (its draw, the mixed similarities, the loss on the
mixed batch, no reference set); the cross-batch memory path; blocks of queries.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deepmetric.losses.recall_surrogate as rs
from deepmetric.losses import build_loss
from deepmetric.losses.recall_surrogate import mix_rows, simix_draw
from deepmetric.memory import CrossBatchMemory
from loss_reference import Batch, make_case, recall_surrogate, recall_surrogate_ranks
from test_losses import CASES

CONFIGS = [
    {},
    {"count_query_in_rank": True},
    {"clip": False, "rank_temperature": 0.1},
    {"k_values": (1, 3), "k_temperature": 0.5, "count_query_in_rank": True},
]


def cfg_id(hp: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in hp.items()) or "defaults"


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    got, want = got.detach().double(), want.detach().double()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} (scale {scale:.3g})"


def check(
    loss_fn,
    emb,
    labels,
    ref=None,
    ref_labels=None,
    self_index=None,
    oracle_emb=None,
    oracle_labels=None,
    rtol=1e-9,
    **hp,
):
    """The loss equals the oracle (value, count, d/d embeddings and d/d ref_emb); the oracle
    runs on ``oracle_emb`` / ``oracle_labels`` when given (the SiMix batch), else on the
    inputs."""
    out = loss_fn(emb, labels, ref, ref_labels, self_index)
    batch = Batch(
        emb if oracle_emb is None else oracle_emb,
        labels if oracle_labels is None else oracle_labels,
        ref,
        ref_labels,
        self_index,
    )
    want, count = recall_surrogate(batch, **hp)
    assert out.dim() == 0 and out.requires_grad
    assert_close(out, want, rtol, "value")
    assert int(loss_fn.num_active) == count
    inputs = [emb] + ([ref] if ref is not None and ref.requires_grad else [])
    got_g = torch.autograd.grad(out, inputs)
    want_g = torch.autograd.grad(want, inputs, allow_unused=True)
    for which, g, w in zip(("d/d embeddings", "d/d ref_emb"), got_g, want_g):
        w = torch.zeros_like(g) if w is None else w
        assert torch.isfinite(g).all()
        assert_close(g, w, 10 * rtol, which)
    return out, want, count


def unit(b: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64)).requires_grad_(True)


# ---------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1] or 'inbatch'}")
@pytest.mark.parametrize("hp", CONFIGS, ids=cfg_id)
def test_matches_reference(hp, case):
    emb, labels, ref, ref_labels, self_index = make_case(*case, seed=1)
    _, want, count = check(
        build_loss("recall_surrogate", **hp), emb, labels, ref, ref_labels, self_index, **hp
    )
    assert count > 0 and 0.0 < want.item() < 1.0


@pytest.mark.parametrize("count_query", [False, True])
def test_float32_matches_float64(count_query):
    emb, labels, *_ = make_case("rand40", seed=2)
    loss_fn = build_loss("recall_surrogate", count_query_in_rank=count_query)
    want = loss_fn(emb, labels)
    emb32 = emb.detach().float().requires_grad_(True)
    got = loss_fn(emb32, labels)
    assert got.dtype == torch.float32
    (g32,) = torch.autograd.grad(got, [emb32])
    (g64,) = torch.autograd.grad(want, [emb])
    assert_close(got, want, 1e-5, "float32 value")
    assert_close(g32, g64, 1e-4, "float32 gradient")


def test_the_query_adds_about_one_to_every_rank():
    """count_query_in_rank adds sigma((s_qq - S_qp) / tau2) to each rank: ~1 when every
    positive is well below the query itself, so the loss differs (more on small k)."""
    emb, labels, *_ = make_case("pk16", seed=3)
    batch = Batch(emb, labels)
    without = recall_surrogate_ranks(batch, 0)
    with_query = recall_surrogate_ranks(batch, 0, count_query_in_rank=True)
    for p in without:
        assert with_query[p].item() - without[p].item() == pytest.approx(1.0, abs=1e-6)
    paper = build_loss("recall_surrogate")(emb, labels)
    code = build_loss("recall_surrogate", count_query_in_rank=True)(emb, labels)
    assert code.item() > paper.item() + 0.05


# ---------------------------------------------------------------------------------------
# limits: hard ranks, Recall@k
# ---------------------------------------------------------------------------------------
def query_and_refs(sims: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A unit query e_0 and unit references r_j with <e_0, r_j> = sims[j] exactly (each
    r_j in the plane of e_0 and its own axis)."""
    n = len(sims)
    q = torch.zeros(1, n + 1, dtype=torch.float64)
    q[0, 0] = 1.0
    refs = torch.zeros(n, n + 1, dtype=torch.float64)
    for j, s in enumerate(sims):
        refs[j, 0] = s
        refs[j, j + 1] = (1 - s * s) ** 0.5
    return q, refs


def hard_recall_loss(ranks: list[list[int]], ks: list[int], tau1: float) -> float:
    """1 - mean_k min(sum_p sigma((k - r_p) / tau1), k) / min(k, |P|), mean over queries."""
    total = 0.0
    for r in ranks:
        rk = torch.tensor(r, dtype=torch.float64)
        recall = [min(torch.sigmoid((k - rk) / tau1).sum().item(), k) / min(k, len(r)) for k in ks]
        total += 1 - sum(recall) / len(recall)
    return total / len(ranks)


@pytest.mark.parametrize("count_query, want_ranks", [(False, [1, 3, 4]), (True, [2, 4, 5])])
def test_hard_ranks_of_the_reference_example(count_query, want_ranks):
    """REFERENCE-3 10.1: positives at .9, .5, .2, negatives at .7, .1, 0, -.1. As tau2 -> 0
    the smooth ranks become the integer ranks, 1, 3, 4 (paper) or 2, 4, 5 (query counted)."""
    q, refs = query_and_refs([0.9, 0.5, 0.2, 0.7, 0.1, 0.0, -0.1])
    ref_labels = torch.tensor([0, 0, 0, 1, 2, 3, 4])
    labels = torch.tensor([0])
    batch = Batch(q, labels, refs, ref_labels)
    ranks = recall_surrogate_ranks(batch, 0, 1e-4, count_query)
    assert [round(ranks[p].item(), 9) for p in (0, 1, 2)] == want_ranks
    ks = [1, 2, 4, 7]  # M = 7 references: k is capped at 7
    loss_fn = build_loss(
        "recall_surrogate",
        k_values=(1, 2, 4, 8),
        rank_temperature=1e-4,
        count_query_in_rank=count_query,
    )
    got = loss_fn(q, labels, refs, ref_labels).item()
    assert got == pytest.approx(hard_recall_loss([want_ranks], ks, 1.0), abs=1e-12)


@pytest.mark.parametrize("count_query", [False, True])
def test_hard_ranks_in_batch(count_query):
    """tau2 -> 0 on a random batch: the loss is the formula on the integer ranks counted
    directly (1 + number of other references above the positive, + 1 for the query)."""
    emb, labels, *_ = make_case("pk16", seed=4, spread=0.6)
    s = emb.detach() @ emb.detach().T
    ranks = []
    for q in range(16):
        others = [j for j in range(16) if j != q]
        pos = [p for p in others if labels[p] == labels[q]]
        ranks.append([1 + count_query + sum(int(s[q, j] > s[q, p]) for j in others) for p in pos])
    ks = [1, 2, 4, 8, 16]
    want = hard_recall_loss(ranks, ks, 1.0)
    loss_fn = build_loss("recall_surrogate", rank_temperature=1e-6, count_query_in_rank=count_query)
    assert loss_fn(emb, labels).item() == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("count_query", [False, True])
def test_recall_at_k_when_positives_come_first(count_query):
    """Every positive above every negative (gaps >> tau2) and tau1 -> 0: R_k = 1 for every k
    beyond the last positive's rank, |P_q| (+ 1 with the query counted), in a clustered batch.
    At k equal to that rank, with the positives' similarities also far apart (hard ranks), the
    surrogate gives the last positive sigma(0) = 1/2: R_k = (|P_q| - 1/2) / |P_q|."""
    centers = torch.eye(4, 16, dtype=torch.float64)
    labels = torch.arange(4).repeat_interleave(5)  # |P_q| = 4
    g = torch.Generator().manual_seed(5)
    noise = 0.05 * torch.randn(20, 16, generator=g, dtype=torch.float64)
    emb = F.normalize(centers[labels] + noise)
    last = 4 + count_query
    for k in (last + 1, last + 3, 16):
        loss_fn = build_loss(
            "recall_surrogate", k_values=(k,), k_temperature=1e-3, count_query_in_rank=count_query
        )
        assert loss_fn(emb, labels).item() == pytest.approx(0.0, abs=1e-12)
    q, refs = query_and_refs([0.9, 0.8, 0.7, 0.6, 0.3, 0.2, 0.1, 0.0])
    ref_labels = torch.tensor([0, 0, 0, 0, 1, 2, 3, 4])
    for k, want in ((last, 0.5 / 4), (last + 1, 0.0)):
        loss_fn = build_loss(
            "recall_surrogate",
            k_values=(k,),
            rank_temperature=1e-4,
            k_temperature=1e-3,
            count_query_in_rank=count_query,
        )
        assert loss_fn(q, torch.tensor([0]), refs, ref_labels).item() == pytest.approx(
            want, abs=1e-12
        )


# ---------------------------------------------------------------------------------------
# range of the loss and the clip
# ---------------------------------------------------------------------------------------
def tied_class(noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten identical rows of class 0 (up to ``noise``) and six singletons (no positive, not
    queries) near them (S ~ 0.97): each query has 9 tied positives of smooth rank about
    1 + 8 / 2 = 5, so sum_p sigma(8 - 5) ~ 9 x 0.95 > k = 8."""
    g = torch.Generator().manual_seed(6)
    center = torch.eye(1, 8, dtype=torch.float64)
    pos = center + noise * torch.randn(10, 8, generator=g, dtype=torch.float64)
    neg = center + 0.25 * torch.randn(6, 8, generator=g, dtype=torch.float64)
    emb = F.normalize(torch.cat([pos, neg])).requires_grad_(True)
    return emb, torch.tensor([0] * 10 + [1, 2, 3, 4, 5, 6])


def test_clip_keeps_recall_at_most_one():
    """Without the clip smooth ranks of tied positives give R_k > 1 and a negative loss; the
    clip (the official code's min(., k), the default) keeps the loss in [0, 1]. Both equal
    the oracle, gradients included: clipped (q, k) pass none (k = 4 is not clipped)."""
    emb, labels = tied_class()
    clipped = build_loss("recall_surrogate", k_values=(8,))(emb, labels)
    unclipped = build_loss("recall_surrogate", k_values=(8,), clip=False)(emb, labels)
    s = emb.detach() @ emb.detach().T
    rank = 1 + 8 * 0.5 + torch.sigmoid((s[0, 10:] - 1) / 0.01).sum()
    assert unclipped.item() == pytest.approx(1 - 9 * torch.sigmoid(8 - rank).item() / 8)
    assert unclipped.item() < -0.04
    assert clipped.item() == pytest.approx(0.0, abs=1e-12)
    emb, labels = tied_class(noise=0.003)
    values = []
    for clip in (True, False):
        hp = {"k_values": (4, 8), "clip": clip}
        values.append(check(build_loss("recall_surrogate", **hp), emb, labels, **hp)[0].item())
    assert values[0] > values[1] + 0.02  # the clip is active


@pytest.mark.parametrize("simix", [False, True])
def test_loss_in_unit_interval(simix):
    for seed in range(3):
        for spread in (0.05, 0.5, 3.0):
            emb, labels, *_ = make_case("pk16", seed=seed, spread=spread)
            for count_query in (False, True):
                out = build_loss("recall_surrogate", simix=simix, count_query_in_rank=count_query)(
                    emb, labels
                )
                assert 0.0 <= out.item() <= 1.0
    emb, labels = tied_class()
    assert 0.0 <= build_loss("recall_surrogate", simix=simix)(emb, labels).item() <= 1.0


# ---------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("count_query", [False, True])
def test_queries_with_one_and_without_positive(count_query):
    """Rows 2 and 6 have no positive (not counted); rows 0 and 1 have one (normaliser 1)."""
    emb = unit(7, seed=7)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    hp = {"count_query_in_rank": count_query}
    _, _, count = check(build_loss("recall_surrogate", **hp), emb, labels, **hp)
    assert count == 5
    # the one-positive query alone, by hand: R_k = sigma(k - r)
    s = (emb.detach() @ emb.detach().T)[0]
    r = (
        1
        + torch.sigmoid((s[2:] - s[1]) / 0.01).sum()
        + count_query * torch.sigmoid((1 - s[1]) / 0.01)
    )
    ks = torch.tensor([1.0, 2, 4, 7, 7], dtype=torch.float64)  # 8 and 16 capped at B = 7
    want = 1 - torch.sigmoid(ks - r).mean()
    loss_fn = build_loss("recall_surrogate", **hp)
    got = loss_fn(emb[:1], labels[:1], emb.detach(), labels, torch.tensor([0]))
    assert got.item() == pytest.approx(want.item(), abs=1e-12)


def test_no_positive_anywhere_is_a_zero_with_a_graph():
    """Singleton classes, in-batch, against a memory holding only the anchors' own copies,
    and a batch of one: loss exactly 0, num_active 0, zero (not NaN) gradient."""
    emb = unit(8, seed=8)
    labels = torch.arange(8)
    loss_fn = build_loss("recall_surrogate", count_query_in_rank=True)
    for args in (
        (emb, labels),
        (emb, labels, emb.detach().clone(), labels.clone(), torch.arange(8)),
        (emb[:1], labels[:1]),
    ):
        out = loss_fn(*args)
        assert out.item() == 0.0 and out.requires_grad and int(loss_fn.num_active) == 0
        (g,) = torch.autograd.grad(out, [emb])
        assert (g == 0).all()


@pytest.mark.parametrize("count_query", [False, True])
def test_single_class(count_query):
    """No negatives: every query counted, the ranks only hold positives."""
    emb = unit(6, seed=9)
    labels = torch.full((6,), 3)
    hp = {"count_query_in_rank": count_query}
    _, _, count = check(build_loss("recall_surrogate", **hp), emb, labels, **hp)
    assert count == 6


@pytest.mark.parametrize("count_query", [False, True])
def test_duplicates_are_positives(count_query):
    """Identical rows with one label are positives at S = 1 (removed by index only), in-batch
    and against a memory that holds a second copy of every anchor."""
    base = unit(6, seed=10).detach()
    emb = torch.cat([base, base[:3]]).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2])
    hp = {"count_query_in_rank": count_query}
    loss_fn = build_loss("recall_surrogate", **hp)
    _, _, count = check(loss_fn, emb, labels, **hp)
    assert count == 9
    mem = torch.cat([emb.detach(), emb.detach()])
    check(loss_fn, emb, labels, mem, torch.cat([labels, labels]), torch.arange(9), **hp)


@pytest.mark.parametrize("simix", [False, True])
def test_non_finite_input_raises(simix):
    emb = unit(6).detach()
    emb[2, 3] = float("nan")
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"^embeddings contain NaN or inf"):
        build_loss("recall_surrogate", simix=simix)(emb, labels)


@pytest.mark.parametrize(
    "hp, key",
    [
        ({"k_values": (1, 0)}, "k_values"),
        ({"k_values": ()}, "k_values"),
        ({"k_values": (1.5,)}, "k_values"),
        ({"rank_temperature": 0.0}, "rank_temperature"),
        ({"k_temperature": -1.0}, "k_temperature"),
    ],
)
def test_bad_hyper_parameters(hp, key):
    with pytest.raises(ValueError, match=f"^{key} must"):
        build_loss("recall_surrogate", **hp)


def test_blocks_of_queries_give_the_same_result(monkeypatch):
    """The ranks are computed in blocks of queries (RANK_CHUNK_ELEMENTS): one query per block,
    a few per block and a single block agree, in-batch (the diagonal s_qq of each block) and
    with references."""
    for case in (("rand40", None), ("rand40", "self")):
        emb, labels, ref, ref_labels, self_index = make_case(*case, seed=11)
        results = []
        for elements in (1, 5 * 40 * 60, 2**24):
            monkeypatch.setattr(rs, "RANK_CHUNK_ELEMENTS", elements)
            out = build_loss("recall_surrogate", count_query_in_rank=True)(
                emb, labels, ref, ref_labels, self_index
            )
            results.append((out, torch.autograd.grad(out, [emb])[0]))
        for out, g in results[:-1]:
            assert_close(out, results[-1][0], 1e-12, "value by blocks")
            assert_close(g, results[-1][1], 1e-12, "gradient by blocks")


def test_bfloat16_autocast():
    """Embeddings from a bf16 autocast region: the loss is float32 and equals the float32
    loss of the same (rounded) embeddings."""
    g = torch.Generator().manual_seed(12)
    layer = torch.nn.Linear(24, 16)
    labels = torch.arange(8).repeat_interleave(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = F.normalize(layer(torch.randn(32, 24, generator=g)), dim=1)
        out = build_loss("recall_surrogate")(emb, labels)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    ref32 = build_loss("recall_surrogate")(emb.detach().float(), labels)
    assert out.item() == pytest.approx(ref32.item(), abs=1e-6)


# ---------------------------------------------------------------------------------------
# references: the cross-batch memory path
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("count_query", [False, True])
def test_references_rank_the_concatenated_set(count_query):
    """With ref_emb = the batch (detached) followed by other rows and self_index = arange(B)
    the loss is the oracle on that concatenated set with each query's own copy excluded; with
    ref_emb = the batch alone it is the in-batch loss."""
    emb, labels, ref, ref_labels, _ = make_case("pk16", "noself", seed=13)
    refs = torch.cat([emb.detach(), ref.detach()]).requires_grad_(True)
    ref_all = torch.cat([labels, ref_labels])
    hp = {"count_query_in_rank": count_query}
    loss_fn = build_loss("recall_surrogate", **hp)
    check(loss_fn, emb, labels, refs, ref_all, torch.arange(16), **hp)
    in_batch = loss_fn(emb, labels)
    same = loss_fn(emb, labels, emb.detach().clone(), labels.clone(), torch.arange(16))
    assert_close(same, in_batch, 1e-12, "references = the batch")


def test_cross_batch_memory():
    """Through CrossBatchMemory: the second step's loss is the in-batch oracle plus the oracle
    of the batch against the memory (both batches), each anchor's own slot excluded."""
    xbm = CrossBatchMemory(build_loss("recall_surrogate"), size=64, dim=16)
    first, labels1, *_ = make_case("pk16", seed=14)
    xbm(first.detach(), labels1)
    emb, labels, *_ = make_case("pk16", seed=15)
    out = xbm(emb, labels)
    filled = int(xbm.filled)
    mem, mem_labels = xbm.memory_emb[:filled].double(), xbm.memory_labels[:filled]
    in_batch, n_in = recall_surrogate(Batch(emb, labels))
    against, n_mem = recall_surrogate(Batch(emb, labels, mem, mem_labels, torch.arange(16, 32)))
    assert_close(out, in_batch + against, 1e-6, "memory loss")  # the memory is float32
    assert n_in == n_mem == 16
    (g,) = torch.autograd.grad(out, [emb])
    (want,) = torch.autograd.grad(in_batch + against, [emb])
    assert_close(g, want, 1e-4, "memory loss gradient")


# ---------------------------------------------------------------------------------------
# SiMix
# ---------------------------------------------------------------------------------------
def test_simix_draw_and_mixed_rows():
    """P x K = 3 x 4 gives 3 x C(4, 2) = 18 pairs, each unordered same-label pair once; each
    virtual row is alpha x_a + (1 - alpha) x_b with alpha in (0, 1) (not re-normalised), and
    its similarities are the alpha-mix of the real ones."""
    emb, labels = unit(12, d=6, seed=16).detach(), torch.arange(3).repeat(4)  # interleaved
    draw = simix_draw(labels, torch.Generator().manual_seed(0))
    pairs = sorted(zip(draw.first.tolist(), draw.second.tolist()))
    want = sorted((a, b) for a in range(12) for b in range(a + 1, 12) if labels[a] == labels[b])
    assert pairs == want and len(pairs) == 3 * 6
    assert ((draw.alpha > 0) & (draw.alpha < 1)).all() and draw.alpha.std() > 0.1
    mixed = mix_rows(emb, draw)
    assert mixed.shape == (3 * (4 + 6), 6)
    assert torch.equal(mixed[:12], emb)
    for v, (a, b, alpha) in enumerate(zip(draw.first, draw.second, draw.alpha)):
        row = mixed[12 + v]
        assert torch.allclose(row, alpha * emb[a] + (1 - alpha) * emb[b], atol=1e-15)
        assert row.norm() < 1.0  # not re-normalised
    s = emb @ emb.T
    mixed_sim = mix_rows(mix_rows(s, draw, 0), draw, 1)
    assert torch.allclose(mixed_sim, mixed @ mixed.T, atol=1e-14)
    for v, (a, b, alpha) in enumerate(zip(draw.first, draw.second, draw.alpha)):
        for q in range(12):
            want_s = alpha * s[q, a] + (1 - alpha) * s[q, b]
            assert mixed_sim[q, 12 + v].item() == pytest.approx(want_s.item(), abs=1e-14)


@pytest.mark.parametrize("count_query", [False, True])
def test_simix_loss_is_the_oracle_on_the_mixed_batch(count_query):
    """The loss with simix equals the oracle on the batch plus the virtual rows drawn from a
    generator with the same seed (values, counts = every real and virtual query, gradients
    through the mix); the next call draws new weights."""
    emb, labels, *_ = make_case("pk16", seed=17)
    hp = {"count_query_in_rank": count_query}
    loss_fn = build_loss("recall_surrogate", simix=True, seed=3, **hp)
    draw = simix_draw(labels, torch.Generator().manual_seed(3))
    out, _, count = check(
        loss_fn,
        emb,
        labels,
        oracle_emb=mix_rows(emb, draw),
        oracle_labels=torch.cat([labels, labels[draw.first]]),
        **hp,
    )
    assert count == 4 * (4 + 6)
    assert loss_fn(emb, labels).item() != pytest.approx(out.item(), abs=1e-9)


def test_simix_generator_is_saved_and_seeded():
    emb, labels, *_ = make_case("pk16", seed=18)
    emb = emb.detach()
    a = build_loss("recall_surrogate", simix=True, seed=5)
    a(emb, labels)
    state = a.state_dict()
    second = a(emb, labels)
    b = build_loss("recall_surrogate", simix=True, seed=5)
    b.load_state_dict(state)
    assert b(emb, labels).item() == second.item()
    other_seed = build_loss("recall_surrogate", simix=True, seed=6)
    first = build_loss("recall_surrogate", simix=True, seed=5)(emb, labels)
    assert other_seed(emb, labels).item() != first.item()


def test_simix_refuses_references():
    emb, labels, ref, ref_labels, self_index = make_case("pk16", "self", seed=19)
    loss_fn = build_loss("recall_surrogate", simix=True)
    with pytest.raises(ValueError, match=r"^simix=True cannot be used with a reference set"):
        loss_fn(emb, labels, ref, ref_labels, self_index)
    xbm = CrossBatchMemory(loss_fn, size=64, dim=16)
    with pytest.raises(ValueError, match="cross-batch memory"):
        xbm(emb.detach(), labels)


def test_simix_with_a_cross_batch_memory_is_refused_at_config_load() -> None:
    from deepmetric.config import ConfigError, load_config
    from tiny_runs import DEMO

    overrides = ["--loss.name=recall_surrogate", "--loss.simix=true", "--xbm.enabled=true"]
    with pytest.raises(ConfigError, match=r"^command line: loss.simix: .*--xbm.enabled=false"):
        load_config(DEMO, overrides)
