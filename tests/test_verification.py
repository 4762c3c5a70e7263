"""Verification metrics over all pairs (deepmetric.evaluation.verification): equal to
scikit-learn's roc_curve / roc_auc_score and to a float64 brute force, exact whichever bins
the counting resolves, and wired into evaluate(), the metric records and the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from deepmetric.config import ConfigError, load_config
from deepmetric.evaluation import evaluate, result_keys
from deepmetric.evaluation.registry import display_name, metric_of_key
from deepmetric.evaluation.verification import (
    FARS,
    float_of_key,
    key_of_float,
    pair_score_counts,
)
from tiny_runs import DEMO


def tied_set(n: int = 300, seed: int = 0, classes: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of small multiples of 1/4: every score is exact in float32 whatever the
    matrix product's blocking, and many pairs tie."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(-2, 3, (n, 8)).astype(np.float32) / 4)
    return x, torch.from_numpy(rng.integers(0, classes, n))


def pairs_of(x, y, gallery=None, gallery_labels=None, self_index=None):
    """(scores float64, positive bool) of every pair, as the module defines them."""
    if gallery is None:
        s = (x.double() @ x.double().T).numpy()
        i, j = np.triu_indices(len(x), 1)
        return s[i, j], (y.numpy()[i] == y.numpy()[j])
    s = (x.double() @ gallery.double().T).numpy()
    same = y.numpy()[:, None] == gallery_labels.numpy()[None, :]
    keep = np.ones_like(same)
    if self_index is not None:
        rows = np.flatnonzero(self_index >= 0)
        keep[rows, self_index[rows]] = False
    return s[keep], same[keep]


def brute_tar_at_far(scores, positive, far):
    """Conservative TAR@FAR by brute force: the lowest distinct score whose FAR <= far."""
    neg, pos = scores[~positive], scores[positive]
    best = (0.0, np.inf)
    for t in np.unique(scores):
        if np.sum(neg >= t) <= far * len(neg):
            best = (np.sum(pos >= t) / len(pos), t)
            break  # ascending: the first allowed is the lowest
    return best


@pytest.mark.parametrize("protocol", ["within", "gallery"])
@pytest.mark.parametrize("drop", [False, True])
def test_full_roc_equals_sklearn_with_ties(protocol, drop):
    x, y = tied_set()
    if protocol == "within":
        counts = pair_score_counts(x, y, resolve_all=True)
        scores, positive = pairs_of(x, y)
    else:
        g, gy = tied_set(200, seed=1)
        own = np.full(300, -1)
        own[:50] = np.arange(50)  # the first 50 queries are in the gallery too
        g[:50], gy[:50] = x[:50], y[:50]
        counts = pair_score_counts(x, y, g, gy, self_index=own, resolve_all=True)
        scores, positive = pairs_of(x, y, g, gy, own)
    assert (counts.num_positive, counts.num_negative) == (positive.sum(), (~positive).sum())
    want = roc_curve(positive, scores, drop_intermediate=drop)
    got = counts.roc(drop_intermediate=drop)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert counts.auc() == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)


@pytest.mark.parametrize("seed", [0])
def test_partial_resolution_equals_the_full_roc(seed):
    """Default counting resolves only some bins, over several passes when the budget is
    small; AUC, EER and TAR@FAR are the full ROC's, bit for bit."""
    torch.manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(160, 12), dim=1)
    y = torch.arange(160) % 8
    full = pair_score_counts(x, y)  # a small set: every key, by sorting
    assert full.resolved_all
    assert full.auc() == pair_score_counts(x, y, resolve_all=True, memory_budget_bytes=2**17).auc()
    for budget in (2**19, 2**17):
        # budgets too small to keep every pair's key: the counting path of large sets, one
        # pass per round of bins, fewer bins a round with less memory
        part = pair_score_counts(x, y, memory_budget_bytes=budget)
        assert not part.resolved_all and len(part.keys) < len(full.keys)  # bins stay whole
        assert part.auc() == full.auc()
        assert part.eer() == full.eer()
        for far in FARS[:4]:
            assert part.tar_at_far(far) == full.tar_at_far(far)


@pytest.mark.parametrize("far", [1e-1, 1e-2, 1e-3])
def test_tar_at_far_equals_a_float64_brute_force(far):
    x, y = tied_set(200, seed=3, classes=4)
    scores, positive = pairs_of(x, y)
    tar, threshold = pair_score_counts(x, y).tar_at_far(far)
    want_tar, want_threshold = brute_tar_at_far(scores, positive, far)
    assert (tar, threshold) == (pytest.approx(want_tar, abs=1e-15), want_threshold)


def test_tar_at_far_rules_differ_where_the_nearest_point_exceeds_the_target():
    """Positives 1, .95, .75; ten negatives .9, .8, .7 ... (FAR steps of 0.1). At a target of
    0.15 the conservative rule stops at threshold .9 (FAR 0.1, TAR 2/3); insightface's nearest
    point of the drop_intermediate ROC is FAR 0.2 (> target), TAR 1 at threshold .75."""
    scores = [1.0, 0.95, 0.75, 0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35]
    x = torch.tensor(scores)[:, None]
    y = torch.tensor([0, 0, 0] + [1] * 10)
    g, gy = torch.tensor([[1.0]]), torch.tensor([0])
    counts = pair_score_counts(x, y, g, gy, fars=(0.15,), resolve_all=True)
    tar, threshold = counts.tar_at_far(0.15)
    assert (tar, threshold) == (pytest.approx(2 / 3), pytest.approx(0.9))
    tar, threshold = counts.tar_at_far(0.15, rule="nearest")
    assert (tar, threshold) == (1.0, pytest.approx(0.75))
    with pytest.raises(ValueError, match="resolve_all"):
        counting = pair_score_counts(x, y, g, gy, fars=(0.15,), memory_budget_bytes=512)
        counting.tar_at_far(0.15, rule="nearest")


def test_eer_interpolates_between_the_points_around_the_crossing():
    """Scores: positives .9 .6 .3, negatives .8 .5 .2 .1. ROC points (FAR, FNR): (0,1),
    (0,2/3), (1/4,2/3), (1/4,1/3), (1/2,1/3), (1/2,0) ... FAR - FNR changes sign between
    (1/4,1/3) and (1/2,1/3): FNR constant 1/3, the crossing at FAR = 1/3."""
    g = torch.tensor([[1.0]])
    x = torch.tensor([[0.9], [0.6], [0.3], [0.8], [0.5], [0.2], [0.1]])
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    eer, threshold = pair_score_counts(x, y, g, torch.tensor([0]), resolve_all=True).eer()
    assert eer == pytest.approx(1 / 3)
    assert threshold == pytest.approx(0.5, abs=1e-7)


def test_keys_order_special_floats_and_merge_signed_zeros():
    values = torch.tensor(
        [float("-inf"), -3.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.17e-38, 0.5, 1.0, float("inf")]
    )
    keys = key_of_float(values)
    assert bool((keys[1:] >= keys[:-1]).all())
    assert keys[3] == keys[4]  # -0.0 and +0.0 are one threshold
    assert bool((keys[5:] > keys[4:-1]).all()) and bool((keys[1:4] > keys[:3]).all())
    np.testing.assert_array_equal(float_of_key(keys.numpy()), (values + 0.0).double().numpy())
    rng = np.random.default_rng(0)
    scale = 10.0 ** rng.integers(-40, 3, 100_000)
    many = torch.from_numpy((rng.standard_normal(100_000) * scale).astype(np.float32))
    order = torch.argsort(key_of_float(many), stable=True)
    assert bool((many[order][1:] >= many[order][:-1]).all())


def test_evaluate_reports_verification_keys_and_thresholds():
    x, y = tied_set(250, seed=5)
    out = evaluate(x, y, metrics=["recall", "verification"], recall_at=(1,))
    counts = pair_score_counts(x, y, resolve_all=True)
    assert out["roc_auc"] == counts.auc()
    assert (out["eer"], out["eer_threshold"]) == counts.eer()
    for far in FARS:
        key = f"{far:.0e}".replace("e-0", "e-")
        tar, threshold = counts.tar_at_far(far)
        if far * counts.num_negative < 1:
            assert np.isnan(out[f"tar@far={key}"])
        else:
            assert (out[f"tar@far={key}"], out[f"threshold@far={key}"]) == (tar, threshold)
    assert out["num_positive_pairs"] == counts.num_positive
    assert "recall@1" in out


def test_edge_cases_no_positive_pair_one_class_nan_and_unresolvable_far():
    x = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)
    alone = evaluate(x, torch.arange(20), metrics=["verification"])  # singletons: no positive
    assert np.isnan(alone["roc_auc"]) and alone["num_positive_pairs"] == 0
    one = evaluate(x, torch.zeros(20, dtype=torch.long), metrics=["verification"])
    assert np.isnan(one["eer"]) and one["num_negative_pairs"] == 0
    counts = pair_score_counts(x, torch.arange(20) % 2)
    assert np.isnan(counts.tar_at_far(1e-3)[0])  # 100 negatives cannot resolve 1e-3
    with pytest.raises(ValueError, match="needs at least 1,000 negative pairs; this set has 100"):
        counts.threshold_at_far(1e-3)
    with pytest.raises(ValueError, match="not resolved"):  # the counting path of large sets
        pair_score_counts(x, torch.arange(20) % 2, memory_budget_bytes=512).tar_at_far(0.05)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pair_score_counts(bad, torch.arange(20) % 2)


def test_duplicates_score_one_and_tie_as_the_module_counts_them():
    x = torch.nn.functional.normalize(torch.randn(5, 4), dim=1).repeat(4, 1)  # each 4 times
    y = torch.arange(20) % 5
    counts = pair_score_counts(x, y, resolve_all=True)
    scores, positive = pairs_of(x, y)
    assert counts.auc() == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    assert counts.tar_at_far(1e-1)[0] == 1.0


def test_metric_records_and_config_names():
    keys = result_keys(["verification"], (1,))
    assert keys == ["roc_auc", "eer"] + [f"tar@far=1e-{i}" for i in range(1, 6)]
    assert [display_name(k) for k in keys[:3]] == ["ROC AUC", "EER", "TAR@FAR=1e-1"]
    assert metric_of_key("eer").higher_is_better is False
    cfg = load_config(DEMO, ["--eval.metrics=[recall, verification]", "--eval.select_metric=eer"])
    assert cfg.eval.select_metric == "eer"
    with pytest.raises(ConfigError, match="did you mean 'verification'"):
        load_config(DEMO, ["--eval.metrics=[recall, verificaton]"])
