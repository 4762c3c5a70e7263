"""deepmetric.evaluation against brute-force references (full matrices, loops, float64).

Tie-heavy data uses quantised embeddings (multiples of 1/4, small d): their float32 dot
products are exact, so float32 chunked search and the float64 reference see the same ties.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

import deepmetric.evaluation.blocks as blocks_module
import deepmetric.evaluation.exact as exact_module
import deepmetric.evaluation.neighbours as search_module
import deepmetric.evaluation.topk as topk_module
from deepmetric.data import SOURCES
from deepmetric.evaluation import (
    evaluate,
    extract_embeddings,
    kmeans_assign,
    knn,
)
from deepmetric.evaluation.blocks import plan_chunks
from deepmetric.evaluation.exact import knn_torch
from evaluation_reference import (
    KS,
    assert_metrics_equal,
    budgets,
    clustered,
    evaluate_budgets,
    load_benchmark,
    pml_calculator,
    quantised,
    ref_knn,
    ref_metrics,
    with_duplicates,
)


@pytest.fixture(params=[4096, 37], ids=["blocks4096", "blocks37"])
def block_columns(request, monkeypatch):
    """Run with the default self-search blocks and with blocks of 37 rows (diagonal and
    off-diagonal blocks, uneven sizes, and room in budgets where 256-row blocks do not fit)."""
    if request.param == 37:
        monkeypatch.setattr(blocks_module, "SELF_BLOCK", 37)
        monkeypatch.setattr(blocks_module, "MIN_SELF_BLOCK", 1)
    return request.param


class Paths:
    """Which ways search() ran since the last take(): "self" (symmetric self-search),
    "counting" (whole gallery rows, ranks counted) or "lists" (gallery blocks, faiss)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def take(self) -> set[str]:
        seen, self.seen = self.seen, set()
        return seen


@pytest.fixture
def paths(monkeypatch):
    recorder = Paths()
    for name, label in (("search_self", "self"), ("search_rows", "counting"),
                        ("search_lists", "lists")):  # fmt: skip
        real = getattr(search_module, name)

        def spy(*args, _real=real, _label=label, **kwargs):
            recorder.seen.add(_label)
            return _real(*args, **kwargs)

        monkeypatch.setattr(search_module, name, spy)
    return recorder


# ------------------------------------------------------------------------------------------
# knn


@pytest.mark.parametrize("exclude_self", [False, True])
@pytest.mark.parametrize("k", [1, 7, 40])
def test_knn_torch_matches_bruteforce_with_ties(exclude_self, k, block_columns):
    q = with_duplicates(quantised(120, 6, seed=1), seed=2)
    g = q if exclude_self else with_duplicates(quantised(150, 6, seed=3), seed=4)
    ref_v, ref_i = ref_knn(q, g, k, exclude_self)
    for budget in budgets(len(q), len(g), k):
        v, i = knn(q, g, k, exclude_self=exclude_self, memory_budget_bytes=budget)
        assert v.dtype == torch.float32 and i.dtype == torch.int64
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_array_equal(v.numpy(), ref_v.astype(np.float32))
        if exclude_self:  # gallery=None: the query set, searched symmetrically
            v, i = knn(q, None, k, exclude_self=True, memory_budget_bytes=budget)
            np.testing.assert_array_equal(i.numpy(), ref_i)
            np.testing.assert_array_equal(v.numpy(), ref_v.astype(np.float32))
    if not exclude_self:  # the query set with each item's own copy kept
        ref_v, ref_i = ref_knn(q, q, k, False)
        v, i = knn(q, None, k)
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_array_equal(v.numpy(), ref_v.astype(np.float32))


def test_self_search_large_blocks_with_ties_matches_bruteforce():
    # blocks of 512 and 476 rows: off-diagonal blocks reduced along columns by the two-level
    # top-k
    x = with_duplicates(quantised(1500, 4, seed=31, levels=2), seed=32)
    for k in (3, 11):
        v, i = exact_module.knn_self(torch.from_numpy(x), k, True, 700)
        ref_v, ref_i = ref_knn(x, x, k, True)
        np.testing.assert_array_equal(i.numpy(), ref_i)
        np.testing.assert_array_equal(v.numpy(), ref_v.astype(np.float32))
    y = clustered(1500, 40, 8, seed=33)[0]
    _, i = exact_module.knn_self(torch.from_numpy(y), 6, True, 700)
    np.testing.assert_array_equal(i.numpy(), ref_knn(y, y, 6, True)[1])


def test_self_search_computes_each_block_once_and_plans_within_budget(monkeypatch):
    calls = []
    real_scores_into = exact_module.scores_into

    def spy(query, gallery, buffer):
        calls.append((query.shape[0], gallery.shape[0]))
        return real_scores_into(query, gallery, buffer)

    monkeypatch.setattr(exact_module, "scores_into", spy)
    x = quantised(100, 5, seed=30)
    _, i = exact_module.knn_self(torch.from_numpy(x), 4, True, 30)
    np.testing.assert_array_equal(i.numpy(), ref_knn(x, x, 4, True)[1])
    # blocks of at most 30 rows, cut evenly: 4 blocks of 25; only the 10 pairs a <= b,
    # 6,250 scores of 10,000
    assert len(calls) == 10 and sum(r * c for r, c in calls) == 6250
    assert blocks_module.plan_self_block(60_502, 11, 2**30) == 4096
    block = blocks_module.plan_self_block(200_000, 100, 2**28)
    assert 256 <= block < 4096
    assert 12 * 200_000 * 100 + block * (8 * block + 96 * 101) <= 2**28
    assert blocks_module.plan_self_block(10**7, 100, 2**30) == 0  # lists alone exceed it


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("k", [1, 5, 12])
@pytest.mark.parametrize("levels", [None, 3000, 40], ids=["distinct", "some-ties", "many-ties"])
def test_topk_exact_two_level_matches_stable_sort(dim, k, levels):
    # 1,037 positions per line: 64 interleaved groups of 16 (the two-level path) + a tail of 13
    g = torch.Generator().manual_seed(k)
    shape = (1037, 300) if dim == 0 else (300, 1037)
    if levels is None:
        scores = torch.randn(shape, generator=g)
    else:
        scores = torch.randint(0, levels, shape, generator=g).float()
    scores[7] = float("-inf")  # a masked line / masked entries in every line
    lines = scores if dim == 1 else scores.T
    ref_v, ref_i = torch.sort(lines, dim=1, descending=True, stable=True)
    v, i = topk_module.topk_exact(scores, k, dim)
    assert torch.equal(i, ref_i[:, :k]) and torch.equal(v, ref_v[:, :k])
    cand_v, cand_i = topk_module.topk_candidates(scores, k + 1, dim)
    assert cand_v.shape == (lines.shape[0], k + 1)
    assert torch.equal(lines.gather(1, cand_i), cand_v)  # positions match values
    if levels is None:  # distinct values: the candidates are exactly the top k + 1
        finite = torch.isfinite(ref_v[:, k])  # (not the all -inf line of dim=1)
        assert finite.sum() >= lines.shape[0] - 1
        assert torch.equal(cand_i[finite].sort(1).values, ref_i[finite, : k + 1].sort(1).values)


def test_plan_chunks_splits_gallery_when_budget_is_small():
    assert plan_chunks(1000, 500, 10, 2**30) == (1000, 500)
    rows, cols = plan_chunks(1000, 500, 10, 100_000)
    assert cols == 500 and 1 <= rows < 1000
    rows, cols = plan_chunks(1000, 500, 10, 3_000)
    assert rows == 2 and cols < 500
    with pytest.raises(ValueError, match="too small"):
        plan_chunks(1000, 500, 10, 100)


@pytest.mark.parametrize("query_chunk,gallery_chunk", [(1, 1), (7, 13), (64, 3), (200, 200)])
def test_knn_torch_explicit_chunks(query_chunk, gallery_chunk):
    q = torch.from_numpy(with_duplicates(quantised(60, 5, seed=5), seed=6))
    self_index = torch.arange(60)
    expected = ref_knn(q.numpy(), q.numpy(), 9, True)[1]
    _, i = knn_torch(q, q, 9, self_index, query_chunk, gallery_chunk)
    np.testing.assert_array_equal(i.numpy(), expected)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_knn_faiss_equals_torch_with_ties(exclude_self):
    q = with_duplicates(quantised(200, 8, seed=7, levels=2), seed=8)
    g = q if exclude_self else with_duplicates(quantised(300, 8, seed=9, levels=2), seed=10)
    for k in (1, 5, 30):
        tv, ti = knn(q, g, k, exclude_self=exclude_self, backend="torch")
        fv, fi = knn(q, g, k, exclude_self=exclude_self, backend="faiss")
        np.testing.assert_array_equal(fi.numpy(), ti.numpy())
        np.testing.assert_array_equal(fv.numpy(), tv.numpy())
        np.testing.assert_array_equal(ti.numpy(), ref_knn(q, g, k, exclude_self)[1])


def test_knn_faiss_equals_torch_random():
    x, _ = clustered(500, 20, 32, seed=11)
    tv, ti = knn(x, x, 10, exclude_self=True)
    fv, fi = knn(x, x, 10, exclude_self=True, backend="faiss")
    np.testing.assert_array_equal(fi.numpy(), ti.numpy())
    np.testing.assert_allclose(fv.numpy(), tv.numpy(), atol=1e-5)


def test_knn_all_equal_scores_orders_by_index():
    q = np.ones((4, 3), np.float32)
    g = np.ones((9, 3), np.float32)
    for backend in ("torch", "faiss"):
        _, i = knn(q, g, 5, backend=backend)
        assert (i == torch.arange(5)).all()
        _, i = knn(g, None, 4, exclude_self=True, backend=backend)
        expected = [[j for j in range(9) if j != r][:4] for r in range(9)]
        assert i.tolist() == expected


@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
def test_approximate_backends_agree_on_clustered_data(backend):
    x, labels = clustered(3000, 30, 32, seed=12, noise=0.3)
    _, exact = knn(x, None, 10, exclude_self=True)
    _, approx = knn(x, None, 10, exclude_self=True, backend=backend)
    assert (approx[:, 0] == exact[:, 0]).double().mean() > 0.9
    assert not (approx == torch.arange(3000)[:, None]).any()  # self excluded
    ann_agreement = load_benchmark("retrieval").ann_agreement
    report = ann_agreement(x, k=10, backend=backend, num_samples=500)
    assert report["num_samples"] == 500 and report["recall@1"] > 0.9
    assert 0.5 < report["top_k_agreement"] <= 1.0
    flat = ann_agreement(x, k=10, backend="faiss", num_samples=300, seed=3)
    assert flat["recall@1"] == 1.0 and flat["top_k_agreement"] == 1.0
    ours = evaluate(x, labels, backend=backend, metrics=("recall",), recall_at=(1,))
    exact_metrics = evaluate(x, labels, metrics=("recall",), recall_at=(1,))
    assert abs(ours["recall@1"] - exact_metrics["recall@1"]) < 0.02
    with pytest.raises(ValueError, match="unknown index_options"):
        knn(x, None, 3, backend=backend, index_options={"bogus": 1})


# ------------------------------------------------------------------------------------------
# metrics


def test_evaluate_matches_reference_with_ties_and_singletons(paths, block_columns):
    rng = np.random.default_rng(13)
    x = with_duplicates(quantised(300, 6, seed=14, levels=2), seed=15)
    labels = rng.integers(0, 60, 300)
    labels[:10] = 1000 + np.arange(10)  # singleton classes: no positive
    ref = ref_metrics(x, labels)
    assert ref["num_queries_without_positive"] >= 10
    runs = []
    for backend in ("torch", "faiss"):
        for budget in evaluate_budgets(labels):
            ours = evaluate(
                x, labels, recall_at=KS, metrics=("recall", "map_at_r", "r_precision"),
                backend=backend, memory_budget_bytes=budget, per_class=True,
            )  # fmt: skip
            runs.append(paths.take())
            assert_metrics_equal(ours, ref)
            assert ours["num_queries"] == 300 - ref["num_queries_without_positive"]
            per_class = ours["per_class"]
            assert set(per_class["labels"].tolist()) == set(ref["per_class"])
            for c, r1, ap in zip(
                per_class["labels"].tolist(), per_class["recall@1"], per_class["map@r"]
            ):
                assert r1.item() == pytest.approx(ref["per_class"][c]["recall@1"], abs=1e-12)
                assert ap.item() == pytest.approx(ref["per_class"][c]["map@r"], abs=1e-12)
    second = "self" if block_columns == 37 else "counting"  # 37-row self blocks fit more
    assert runs == [{"self"}, {second}, {"lists"}] + [{"lists"}] * 3


def test_evaluate_counting_path_hard_data(paths, block_columns):
    # pairs in high noise: the first positive is usually beyond the top-R list (R = 1),
    # so ranks come from counting; heavy ties from quantisation
    x = quantised(400, 4, seed=16, levels=1)
    labels = np.repeat(np.arange(200), 2)
    ref = ref_metrics(x, labels, ks=(1, 2, 10, 100, 1000))
    runs = []
    for budget in evaluate_budgets(labels, ks=(1, 2, 10, 100, 1000), rows=1):
        ours = evaluate(
            x, labels, recall_at=(1, 2, 10, 100, 1000), metrics=("recall", "map_at_r"),
            memory_budget_bytes=budget,
        )  # fmt: skip
        runs.append(paths.take())
        for k in (1, 2, 10, 100, 1000):
            assert ours[f"recall@{k}"] == pytest.approx(ref[f"recall@{k}"], abs=1e-12)
        assert ours["map@r"] == pytest.approx(ref["map@r"], abs=1e-12)
    second = "self" if block_columns == 37 else "counting"
    assert runs == [{"self"}, {second}, {"lists"}]


def test_evaluate_disjoint_query_gallery_inshop_style(paths, block_columns):
    rng = np.random.default_rng(17)
    q = with_duplicates(quantised(150, 6, seed=18, levels=2), seed=19)
    g = quantised(220, 6, seed=20, levels=2)
    g[:30] = q[:30]  # the query image also in the gallery: nothing is excluded
    ql = rng.integers(0, 40, 150)
    gl = rng.integers(0, 45, 220)
    gl[:30] = ql[:30]
    ref = ref_metrics(q, ql, g, gl)
    runs = []
    for backend in ("torch", "faiss"):
        for budget in evaluate_budgets(ql, gl):
            ours = evaluate(
                q, ql, g, gl, recall_at=KS, metrics=("recall", "map_at_r", "r_precision"),
                backend=backend, memory_budget_bytes=budget,
            )  # fmt: skip
            runs.append(paths.take())
            assert_metrics_equal(ours, ref)
    assert runs == [{"counting"}, {"counting"}, {"lists"}] + [{"lists"}] * 3


def test_evaluate_random_continuous_data_and_numpy_torch_inputs():
    x, labels = clustered(400, 25, 16, seed=21, noise=1.0)
    ref = ref_metrics(x, labels)
    ours = evaluate(torch.from_numpy(x), torch.from_numpy(labels), recall_at=KS, metrics=(
        "recall", "precision_at_1", "map_at_r", "r_precision"))  # fmt: skip
    assert_metrics_equal(ours, ref)
    assert ours["precision@1"] == ours["recall@1"]


def test_all_queries_without_positive():
    x = quantised(20, 4, seed=22)
    out = evaluate(x, np.arange(20), metrics=("recall", "map_at_r"), recall_at=(1, 5))
    assert out["num_queries"] == 0 and out["num_queries_without_positive"] == 20
    assert np.isnan(out["recall@1"]) and np.isnan(out["map@r"])


def test_large_label_ids_do_not_collide():
    # ids above 2**24 collide in float32 (PML casts labels to float); ours stay int64
    x, labels = clustered(200, 10, 8, seed=23, noise=2.0)
    big = labels + 2**40
    big[::2] += 1  # distinct in int64, identical in float32
    assert len(np.unique(big.astype(np.float32))) < len(np.unique(big))
    ours = evaluate(x, big, metrics=("recall", "map_at_r"), recall_at=(1,))
    ref = ref_metrics(x, big, ks=(1,))
    assert ours["recall@1"] == pytest.approx(ref["recall@1"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(ref["map@r"], abs=1e-12)


def test_nmi_equals_sklearn_on_the_same_clustering():
    x, labels = clustered(600, 12, 16, seed=24, noise=0.8)
    clusters = kmeans_assign(torch.from_numpy(x), 12, seed=5)
    expected = normalized_mutual_info_score(labels, clusters.numpy(), average_method="arithmetic")
    out = evaluate(x, labels, metrics=("nmi",), seed=5)
    assert out["nmi"] == pytest.approx(expected, abs=1e-12)
    assert set(out) == {"nmi"}
    assert 0.5 < out["nmi"] <= 1.0
    assert evaluate(x, labels, metrics=("nmi",), seed=5)["nmi"] == out["nmi"]  # seeded


def test_default_keys_and_the_sources_recall_at():
    x, labels = clustered(300, 10, 16, seed=25)
    out = evaluate(x, labels)
    expected = {f"recall@{k}" for k in SOURCES["cub"].recall_at} | {"map@r", "r_precision", "nmi"}
    assert expected | {"num_queries", "num_queries_without_positive"} == set(out)
    assert SOURCES["sop"].recall_at == (1, 10, 100, 1000)
    assert SOURCES["inshop"].recall_at == (1, 10, 20, 30, 40, 50)
    assert SOURCES["cars196"].recall_at == SOURCES["cub"].recall_at == (1, 2, 4, 8, 16, 32)


# ------------------------------------------------------------------------------------------
# pytorch-metric-learning oracle (no ties: continuous data; definitions coincide)


def test_matches_pml_accuracy_calculator():
    calc = pml_calculator()
    x, labels = clustered(800, 40, 32, seed=26, noise=1.2)
    theirs = calc.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    ours = evaluate(x, labels, recall_at=(1,), metrics=("recall", "map_at_r", "r_precision"))
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    # query vs gallery
    q, ql = x[:300], labels[:300]
    g, gl = x[300:], labels[300:]
    theirs = calc.get_accuracy(
        torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(g), torch.from_numpy(gl)
    )
    ours = evaluate(q, ql, g, gl, recall_at=(1,), metrics=("recall", "map_at_r", "r_precision"))
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)


# ------------------------------------------------------------------------------------------
# validation


def test_invalid_inputs_raise_clear_errors():
    x = np.zeros((5, 3), np.float32)
    labels = np.arange(5)
    with pytest.raises(ValueError, match="empty"):
        evaluate(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="2-D"):
        evaluate(np.zeros(5, np.float32), labels)
    with pytest.raises(ValueError, match="dimensions differ"):
        evaluate(x, labels, np.zeros((4, 2), np.float32), np.arange(4))
    with pytest.raises(ValueError, match="5 rows"):
        evaluate(x, np.arange(4))
    with pytest.raises(ValueError, match="gallery_labels has 3"):
        evaluate(x, labels, np.zeros((4, 3), np.float32), np.arange(3))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(bad, labels)
    with pytest.raises(ValueError, match="NaN"):
        knn(x, bad, 1)
    with pytest.raises(ValueError, match="integers"):
        evaluate(x, labels.astype(np.float32))
    with pytest.raises(ValueError, match="both"):
        evaluate(x, labels, x)
    with pytest.raises(ValueError, match="unknown metric 'mrr'"):
        evaluate(x, labels, metrics=("recall", "mrr"))
    with pytest.raises(ValueError, match="recall_at"):
        evaluate(x, labels, recall_at=(0, 1))
    with pytest.raises(ValueError, match="backend"):
        evaluate(x, labels, backend="annoy")
    with pytest.raises(ValueError, match="k must be"):
        knn(x, x, 5, exclude_self=True)
    with pytest.raises(ValueError, match="k must be"):
        knn(x, x, 0)
    with pytest.raises(ValueError, match="exclude_self"):
        knn(x, x[:4], 1, exclude_self=True)
    with pytest.raises(ValueError, match="floating point"):
        knn(np.zeros((2, 3), np.int64), None, 1)


# ------------------------------------------------------------------------------------------
# extraction


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.bn(self.conv(x))).mean(dim=(2, 3)) + x[:, 0, :, :2].flatten(1)[:, :4]
        return torch.nn.functional.normalize(y, dim=1)


def test_extract_embeddings_eval_mode_flip_and_mode_restore():
    torch.manual_seed(0)
    model = _Tiny()
    model.train()
    model.bn.eval()  # a frozen BN inside a training model must stay frozen afterwards
    images = torch.randn(10, 1, 6, 6)
    labels = torch.arange(10) % 3
    loader = [(images[i : i + 4], labels[i : i + 4]) for i in range(0, 10, 4)]
    emb, lab = extract_embeddings(model, loader, progress=False)
    assert emb.shape == (10, 4) and emb.dtype == torch.float32
    assert lab.dtype == torch.int64 and (lab == labels).all()
    assert model.training and not model.bn.training and model.drop.training
    model.eval()
    with torch.no_grad():
        expected = model(images)
        flipped = model(images.flip(-1))
    model.train()
    torch.testing.assert_close(emb, expected)
    emb_flip, _ = extract_embeddings(model, loader, flip=True, progress=False)
    torch.testing.assert_close(
        emb_flip, torch.nn.functional.normalize((expected + flipped) / 2, dim=1)
    )
    emb_bf16, _ = extract_embeddings(model, loader, amp_dtype=torch.bfloat16, progress=False)
    assert emb_bf16.dtype == torch.float32
    torch.testing.assert_close(emb_bf16, expected, atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="no batches"):
        extract_embeddings(model, [], progress=False)
    with pytest.raises(ValueError, match="amp_dtype"):
        extract_embeddings(model, loader, amp_dtype=torch.float64, progress=False)
