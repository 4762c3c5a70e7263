"""Re-ranking (deepmetric.evaluation.rerank) against dense float64 ports of the papers'
formulas: k-reciprocal encoding as released by Zhong et al. (N x N, loops), alpha-QE / DBA
as written by Radenovic et al.; and the same lists from evaluate, Retriever and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_runs
from deepmetric.evaluation import evaluate
from deepmetric.evaluation.rerank import (
    KReciprocal,
    check_rerank,
    expand_queries,
    prepare_rerank,
    rerank,
)
from evaluation_reference import clustered

DEMO = tiny_runs.DEMO

# --------------------------------------------------------------------------- dense oracles


def dense_k_reciprocal(pool: np.ndarray, k1: int, k2: int, lam: float):
    """The released algorithm (REFERENCE-3 section 6.1) on the whole pool, float64, loops.
    Returns V, V after local QE, and d* (N, N)."""
    x = pool.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = np.clip(2.0 - 2.0 * x @ x.T, 0.0, None)  # squared distances
    dist = dist / dist.max(axis=1, keepdims=True)  # row-max normalisation
    rank = np.argsort(dist, axis=1, kind="stable")
    num = len(x)
    v = np.zeros((num, num))
    half = int(np.around(k1 / 2.0))
    for i in range(num):
        forward = rank[i, : k1 + 1]
        backward = rank[forward, : k1 + 1]
        mine = forward[np.where(backward == i)[0]]
        expanded = mine
        for c in mine:
            c_forward = rank[c, : half + 1]
            c_backward = rank[c_forward, : half + 1]
            theirs = c_forward[np.where(c_backward == c)[0]]
            if len(np.intersect1d(theirs, mine)) > 2.0 / 3 * len(theirs):
                expanded = np.append(expanded, theirs)
        expanded = np.unique(expanded)
        weight = np.exp(-dist[i, expanded])
        v[i, expanded] = weight / weight.sum()
    v_qe = v
    if k2 != 1:
        v_qe = np.stack([v[rank[i, :k2]].mean(axis=0) for i in range(num)])
    shared = np.stack([np.minimum(v_qe[i], v_qe).sum(axis=1) for i in range(num)])
    jaccard = 1.0 - shared / (2.0 - shared)
    return v, v_qe, (1 - lam) * jaccard + lam * dist


def dense_ranking(final: np.ndarray, original: np.ndarray, candidates: int) -> np.ndarray:
    """Each row's first ``candidates`` columns by ``original`` ascending, re-ordered by
    ``final`` ascending (ties: column index); inf marks excluded columns."""
    out = []
    for f, o in zip(final, original):
        head = np.argsort(o, kind="stable")[:candidates]
        out.append(head[np.lexsort((head, f[head]))])
    return np.array(out)


def assert_ranked_by(ours: np.ndarray, expected: np.ndarray, final: np.ndarray) -> None:
    """``ours`` (Q, m) holds each row's items of ``expected`` (Q, m), in the oracle's order
    but for near-ties: the D term of d* is a float32 product (error ~1e-7), so items whose
    d* differ by less than 1e-6 may swap."""
    assert np.array_equal(np.sort(ours, axis=1), np.sort(expected, axis=1))
    along = np.take_along_axis(final, ours, 1)
    assert (np.diff(along, axis=1) >= -1e-6).all()
    assert (ours != expected).mean() < 0.01  # swaps are rare


def dense_alpha_qe(q: np.ndarray, db: np.ndarray, n: int, alpha: float, own=None) -> np.ndarray:
    """normalise(q + sum_{i<=n} max(q.d_i, 0)^alpha d_i), float64, one query at a time."""
    q, db = q.astype(np.float64), db.astype(np.float64)
    out = []
    for i, row in enumerate(q):
        s = db @ row
        if own is not None and own[i] >= 0:
            s[own[i]] = -np.inf
        top = np.lexsort((np.arange(len(db)), -s))[:n]
        new = row + (np.maximum(s[top], 0.0) ** alpha)[:, None].T @ db[top]
        out.append((new / np.linalg.norm(new)).ravel() if n else row)
    return np.array(out)


@pytest.fixture(scope="module")
def points():
    """300 unit vectors in 30 clusters (16-d), float32."""
    return clustered(300, 30, 16, seed=3, noise=0.5)


# --------------------------------------------------------------------------- k-reciprocal


@pytest.mark.parametrize(
    ("k1", "k2", "lam"), [(20, 6, 0.3), (7, 1, 0.0), (10, 3, 0.8), (5, 4, 1.0)]
)
def test_k_reciprocal_equals_the_dense_release(points, k1, k2, lam) -> None:
    x, _ = points
    v, v_qe, final = dense_k_reciprocal(x, k1, k2, lam)
    enc = KReciprocal.build(torch.from_numpy(x), k1, k2, lam)
    np.testing.assert_allclose(enc.encoding.to_dense().numpy(), v, atol=1e-9)
    np.testing.assert_allclose(enc.expanded.to_dense().numpy(), v_qe, atol=1e-9)
    rows = torch.arange(len(x))
    cols = torch.from_numpy(np.argsort(-x @ x.T, axis=1)[:, :60].copy())
    ours = enc.distances(rows, cols).numpy()
    np.testing.assert_allclose(ours, np.take_along_axis(final, cols.numpy(), 1), atol=1e-6)
    # the query set as its own gallery, every item a candidate: the dense ranking
    indices, scores = rerank("k_reciprocal", x, None, 299, {"k1": k1, "k2": k2,
                             "lambda_value": lam, "candidates": 299})  # fmt: skip
    masked = final.copy()
    np.fill_diagonal(masked, np.inf)
    expected = dense_ranking(masked, masked, 299)
    assert_ranked_by(indices.numpy(), expected, final)
    np.testing.assert_allclose(
        scores.numpy(), 1 - np.take_along_axis(final, indices.numpy(), 1), atol=1e-6
    )


@pytest.mark.parametrize(("k1", "k2", "lam", "candidates"), [(20, 6, 0.3, 240), (9, 1, 0.5, 50)])
def test_k_reciprocal_separate_queries_pool_both_sets(points, k1, k2, lam, candidates) -> None:
    x, _ = points
    q, g = x[:60], x[60:]
    _, _, final = dense_k_reciprocal(np.concatenate([q, g]), k1, k2, lam)
    final = final[:60, 60:]
    original = -(q.astype(np.float64) @ g.astype(np.float64).T)
    options = {"k1": k1, "k2": k2, "lambda_value": lam, "candidates": candidates}
    indices, scores = rerank("k_reciprocal", q, g, 240, options)
    expected = dense_ranking(final, original, candidates)
    assert_ranked_by(indices.numpy()[:, :candidates], expected, final)
    np.testing.assert_allclose(
        scores.numpy(), 1 - np.take_along_axis(final, indices.numpy(), 1), atol=1e-6
    )
    # after the candidates, the original order
    tail = np.argsort(original, axis=1, kind="stable")[:, candidates:]
    assert np.array_equal(indices.numpy()[:, candidates:], tail)


def test_encoding_rows_sum_to_one_and_reciprocity_is_symmetric(points) -> None:
    x, _ = points
    enc = KReciprocal.build(torch.from_numpy(x), k1=12, k2=4)
    for v in (enc.encoding, enc.expanded):
        sums = v.to_dense().sum(dim=1)
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=0, atol=1e-12)
    head = enc.neighbours[:, :13]
    for i, j in enc.reciprocal.nonzero().tolist():
        other = head[i, j]
        assert i in head[other].tolist()  # i is among its neighbour's k1 + 1 nearest
        back = head[other].tolist().index(i)
        assert enc.reciprocal[other, back]  # and that entry is reciprocal too
    assert enc.reciprocal[:, 0].all()  # every item is its own first neighbour
    assert not enc.reciprocal.all()  # and the test is not vacuous


# --------------------------------------------------------------------------- alpha-QE


def test_alpha_qe_equals_the_formula(points) -> None:
    x, _ = points
    q, g = torch.from_numpy(x[:50]), torch.from_numpy(x[50:])
    for n, alpha in ((1, 3.0), (2, 3.0), (5, 1.0), (4, 0.0)):
        ours = expand_queries(q, g, n, alpha).numpy()
        np.testing.assert_allclose(ours, dense_alpha_qe(x[:50], x[50:], n, alpha), atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    # alpha = 0: average query expansion (the query and its top n, summed and normalised)
    top = np.argsort(-(x[:50] @ x[50:].T), axis=1, kind="stable")[:, :3]
    mean = x[:50] + x[50:][top].sum(axis=1)
    mean /= np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(expand_queries(q, g, 3, 0.0).numpy(), mean, atol=1e-6)
    # n = 0 leaves the query as it is; DBA with n = 0 is the identity
    assert torch.equal(expand_queries(q, g, 0, 3.0), q)
    prepared = prepare_rerank("alpha_qe", q, g, options={"n": 0, "dba": True})
    assert torch.equal(prepared.gallery, g) and torch.equal(prepared.query, q)


@pytest.mark.parametrize("dba", [False, True])
def test_alpha_qe_lists_equal_a_dense_search(points, dba) -> None:
    x, _ = points
    own = np.arange(len(x))
    db = dense_alpha_qe(x, x, 2, 3.0, own) if dba else x.astype(np.float64)
    expanded = dense_alpha_qe(x, db, 2, 3.0, own)
    scores = expanded @ db.T
    np.fill_diagonal(scores, -np.inf)  # the query set as its own gallery: self excluded
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :20]
    indices, values = rerank("alpha_qe", x, None, 20, {"n": 2, "dba": dba})
    assert np.array_equal(indices.numpy(), expected)
    np.testing.assert_allclose(values.numpy(), np.take_along_axis(scores, expected, 1), atol=1e-5)


# --------------------------------------------------------------------------- evaluate


def list_metrics(rankings: np.ndarray, ql: np.ndarray, gl: np.ndarray, ks, count=None) -> dict:
    """Recall@K and MAP@R of rankings (Q, L) by loops (queries without positive out); R_i
    counted in the rankings (full ones) or given (``count``, the same for every query)."""
    out = {f"recall@{k}": [] for k in ks} | {"map@r": []}
    for row, label in zip(rankings, ql):
        rel = gl[row] == label
        r = int(rel.sum()) if count is None else count
        if r == 0:
            continue
        for k in ks:
            out[f"recall@{k}"].append(bool(rel[:k].any()))
        top = rel[:r]
        out["map@r"].append(float((np.cumsum(top) / np.arange(1, r + 1) * top).sum() / r))
    return {key: float(np.mean(v)) for key, v in out.items()}


KS = (1, 2, 4, 8, 32)


@pytest.mark.parametrize("separate", [False, True])
def test_evaluate_reranked_equals_the_dense_lists(points, separate) -> None:
    """evaluate(rerank="k_reciprocal") is measured on the dense oracle's lists: the first
    candidates re-ranked, the rest of the gallery in its original order (first positives
    beyond the candidates keep their rank)."""
    x, labels = points
    options = {"k1": 10, "k2": 3, "lambda_value": 0.3, "candidates": 12}
    if separate:
        q, ql, g, gl = x[:60], labels[:60], x[60:], labels[60:]
        _, _, final = dense_k_reciprocal(x, 10, 3, 0.3)
        final = final[:60, 60:]
        original = -(q.astype(np.float64) @ g.astype(np.float64).T)
        result = evaluate(q, ql, g, gl, recall_at=KS, rerank="k_reciprocal", rerank_options=options)
    else:
        q, ql, gl = x, labels, labels
        _, _, final = dense_k_reciprocal(x, 10, 3, 0.3)
        original = -(x.astype(np.float64) @ x.astype(np.float64).T)
        np.fill_diagonal(final, np.inf)
        np.fill_diagonal(original, np.inf)
        result = evaluate(x, labels, recall_at=KS, rerank="k_reciprocal", rerank_options=options)
    full = np.argsort(original, axis=1, kind="stable")
    if not separate:
        full = full[:, :-1]  # self, last
    head = dense_ranking(final, original, 12)
    rankings = np.concatenate([head, full[:, 12:]], axis=1)
    expected = list_metrics(rankings, ql, gl, KS)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    plain = list_metrics(full, ql, gl, KS)
    assert expected["map@r"] != plain["map@r"]  # re-ranking changed something
    # the entry point gives the same lists
    indices, _ = rerank("k_reciprocal", q, None if not separate else g, 40, options)
    assert np.array_equal(indices.numpy(), rankings[:, :40])


def test_evaluate_alpha_qe_equals_its_lists(points) -> None:
    x, labels = points
    for options in ({}, {"n": 3, "alpha": 1.0, "dba": True}):
        result = evaluate(x, labels, recall_at=KS, rerank="alpha_qe", rerank_options=options)
        indices, _ = rerank("alpha_qe", x, None, 299, options)
        expected = list_metrics(indices.numpy(), labels, labels, KS)
        for key, value in expected.items():
            assert result[key] == pytest.approx(value, abs=1e-12), key


# --------------------------------------------------------------------------- errors


def test_bad_names_options_and_sizes_are_one_line_errors(points) -> None:
    x, labels = points
    q, g = x[:10], x[10:30]
    cases = [
        ("foo", {}, "unknown re-ranking 'foo'; expected one of: none, k_reciprocal, alpha_qe"),
        ("k_reciprocal", {"k3": 1}, "k3: not an option of re-ranking 'k_reciprocal'"),
        ("alpha_qe", {"n": 2.5}, "n: expected an integer >= 0, got 2.5"),
        ("alpha_qe", {"dba": 1}, "dba: expected true or false, got 1"),
        ("k_reciprocal", {"lambda_value": 2}, "lambda_value: expected a number in [0, 1]"),
        ("k_reciprocal", {"k1": 25}, "re-ranking with k larger than the gallery: k1=25"),
        ("k_reciprocal", {"candidates": 21}, "with k larger than the gallery: candidates=21"),
        ("alpha_qe", {"n": 21}, "re-ranking with k larger than the gallery: n=21"),
    ]
    for name, options, message in cases:
        with pytest.raises(ValueError) as error:
            rerank(name, q, g, 5, options)
        assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="k larger than the gallery: k1=20, but a query can "):
        evaluate(x[:20], labels[:20], rerank="k_reciprocal")  # 19 items to retrieve
    assert check_rerank("k_reciprocal") == {
        "k1": 20,
        "k2": 6,
        "lambda_value": 0.3,
        "candidates": None,
    }


def test_config_checks_rerank_names_and_options() -> None:
    from deepmetric.config import ConfigError, load_config

    cfg = load_config(DEMO, ["--eval.rerank=alpha_qe", "--eval.rerank_options.n=4"])
    assert cfg.eval.rerank == "alpha_qe" and cfg.eval.rerank_options == {"n": 4}
    assert load_config(DEMO).eval.rerank == "none"
    bad = [
        (["--eval.rerank=knn"], "command line (--eval.rerank): eval.rerank: unknown re-ranking"),
        (
            ["--eval.rerank=k_reciprocal", "--eval.rerank_options.k3=1"],
            "(--eval.rerank_options.k3): eval.rerank_options.k3: not an option of re-ranking",
        ),
        (
            ["--eval.rerank=k_reciprocal", "--eval.rerank_options.k1=abc"],
            "eval.rerank_options.k1: expected an integer >= 1, got 'abc'",
        ),
        (
            ["--eval.rerank_options.n=2"],
            "eval.rerank_options.n: not an option of re-ranking 'none'",
        ),
    ]
    for overrides, message in bad:
        with pytest.raises(ConfigError) as error:
            load_config(DEMO, overrides)
        assert message in str(error.value) and "\n" not in str(error.value)


# --------------------------------------------------------------------------- the same lists


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    """A tiny digits run, a gallery of 6 classes x 5 images and 12 labelled query images."""
    from PIL import Image

    from deepmetric.config import load_config
    from deepmetric.engine import train

    run = tmp_path_factory.mktemp("run")
    n = torch.get_num_threads()
    cfg = load_config(DEMO, [*tiny_runs.TINY, "--eval.at_start=false", "--eval.every=0",
                             "--schedule.name=none", "--train.iterations=3"])  # fmt: skip
    cfg.output.dir = str(run)
    train(cfg)
    torch.set_num_threads(n)
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(6):
        base = rng.integers(0, 256, size=(16, 16))
        for k in range(7):
            pixels = np.clip(base + rng.integers(-60, 60, size=(16, 16)), 0, 255)
            folder = root / ("gallery" if k < 5 else "queries") / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{k}.png")
    return run, root


@pytest.mark.parametrize(
    ("name", "options"),
    [("k_reciprocal", {"k1": 5, "k2": 3, "candidates": 8}), ("alpha_qe", {"n": 2, "dba": True})],
)
def test_cli_retriever_and_evaluate_give_the_same_lists(tiny_index, tmp_path, name, options):
    from deepmetric.cli import main
    from deepmetric.engine.inference import embed_paths, load_model
    from deepmetric.retrieval import Retriever, read_gallery

    run, root = tiny_index
    index = Retriever.build(run, root / "gallery", progress=False)
    index.save(tmp_path / "g.index")
    query_paths, query_labels = read_gallery(root / "queries")
    cfg, model, _ = load_model(run)
    q = embed_paths(cfg, model, query_paths, progress=False)
    g = embed_paths(cfg, model, index.items.paths, progress=False)
    k = 10
    indices, scores = rerank(name, q, g, k, options)
    expected = [[index.items.paths[j] for j in row] for row in indices.tolist()]

    hits = Retriever.load(tmp_path / "g.index").search(q, k, rerank=name, rerank_options=options)
    assert hits.paths == expected
    np.testing.assert_allclose(hits.scores, scores.numpy(), rtol=0, atol=1e-6)
    flags = [f"--rerank-option={key}={str(v).lower()}" for key, v in options.items()]
    out = tmp_path / "hits.json"
    argv = ["search", "--index", str(tmp_path / "g.index"), "--images", str(root / "queries")]
    assert main([*argv, "--k", str(k), "--rerank", name, *flags, "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert [w["query"] for w in written] == query_paths
    assert [[r["path"] for r in w["results"]] for w in written] == expected
    plain = Retriever.load(tmp_path / "g.index").search(q, k)
    assert plain.paths != expected  # re-ranking changed the lists

    # evaluate() on the same embeddings measures these lists
    codes = {label: i for i, label in enumerate(sorted(set(query_labels)))}
    ql = np.array([codes[x] for x in query_labels])
    gl = np.array([codes[x] for x in index.items.labels])
    result = evaluate(q, ql, g, gl, recall_at=(1, 2, 4), rerank=name, rerank_options=options)
    reference = list_metrics(indices.numpy(), ql, gl, (1, 2, 4), count=5)  # every R_i = 5
    for key, value in reference.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def test_cli_rerank_errors_are_one_line(tiny_index, tmp_path, capsys) -> None:
    from deepmetric.cli import main
    from deepmetric.retrieval import Retriever

    run, root = tiny_index
    Retriever.build(run, root / "gallery", progress=False).save(tmp_path / "g.index")
    argv = ["search", "--index", str(tmp_path / "g.index"), "--images", str(root / "queries")]
    for extra, message in (
        (["--rerank", "knn"], "--rerank: unknown re-ranking 'knn'"),
        (["--rerank", "alpha_qe", "--rerank-option", "k1=3"], "--rerank-option k1: not an"),
        (["--rerank", "alpha_qe", "--rerank-option", "n"], "--rerank-option n: expected KEY="),
        (
            ["--rerank", "k_reciprocal", "--rerank-option", "k1=31"],  # 30 gallery items
            "--rerank k_reciprocal: re-ranking with k larger than the gallery: k1=31",
        ),
    ):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err


def test_training_evaluation_uses_eval_rerank(points) -> None:
    from deepmetric.config import load_config, recall_at
    from deepmetric.engine.builders import EvalSet
    from deepmetric.engine.evaluator import retrieval_metrics

    x, labels = points
    cfg = load_config(DEMO, ["--eval.rerank=k_reciprocal", "--eval.rerank_options.k1=8"])
    ours = retrieval_metrics(
        torch.from_numpy(x), torch.from_numpy(labels), EvalSet("test", None), cfg
    )
    expected = evaluate(
        x, labels, recall_at=recall_at(cfg), metrics=cfg.eval.metrics, rerank="k_reciprocal",
        rerank_options={"k1": 8},
    )  # fmt: skip
    plain = evaluate(x, labels, recall_at=recall_at(cfg), metrics=cfg.eval.metrics)
    assert ours["map@r"] == expected["map@r"] != plain["map@r"]
    assert ours["recall@1"] == expected["recall@1"]


def test_eval_with_candidates_above_the_gallery_is_a_user_error(tiny_index, capsys) -> None:
    """Reported by a user run: the size error was labelled an internal error (a bug)."""
    from deepmetric.cli import main

    run, _ = tiny_index
    argv = ["eval", "--checkpoint", str(run), "--eval.rerank=k_reciprocal"]
    assert main([*argv, "--eval.rerank_options.candidates=100000"]) == 2
    err = capsys.readouterr().err
    assert "larger than the gallery: candidates=100000" in err and "internal error" not in err
