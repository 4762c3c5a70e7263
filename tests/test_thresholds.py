"""Calibrated thresholds (index build --threshold-far, search --threshold) and open-set
evaluation: the threshold is exact on the validation pairs, never reads the test classes, and
the CLI, ``Retriever`` and the evaluation agree."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_runs
from deepmetric.cli import main
from deepmetric.config import ConfigError, load_config
from deepmetric.engine import train
from deepmetric.engine.builders import build_eval_loader
from deepmetric.engine.inference import evaluate_checkpoint, evaluation_set, load_model
from deepmetric.evaluation import extract_embeddings
from deepmetric.evaluation.open_set import (
    calibrate_threshold,
    held_out_classes,
    open_set_metrics,
)
from deepmetric.retrieval import IndexFileError, Retriever

TINY = [
    *tiny_runs.TINY,
    "--eval.at_start=false",
    "--eval.every=0",
    "--schedule.name=none",
    "--train.iterations=3",
]
# digits 0-4 train: 2 of the 5 classes are the validation classes (~360 images, ~32k negative
# pairs); digits 5-9 are the test split
VAL = ["--eval.protocol=val", "--eval.val_fraction=0.4", "--sampler.p=3"]
OPEN_SET = ["--eval.open_set_fraction=0.5", "--eval.open_set_far=1e-3"]


@pytest.fixture(scope="module")
def val_run(tmp_path_factory) -> Path:
    """A tiny digits run with validation classes, open-set evaluation on (val and the test of
    the best checkpoint)."""
    folder = tmp_path_factory.mktemp("valrun")
    n = torch.get_num_threads()
    cfg = load_config(tiny_runs.DEMO, [*TINY, *VAL, *OPEN_SET])
    cfg.output.dir = str(folder)
    summary = train(cfg)
    torch.set_num_threads(n)
    (folder / "summary-test.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """gallery/: 6 class folders of 4 images; other/: 3 more classes (calibration);
    one/: a single class."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for folder, classes in (("gallery", range(6)), ("other", range(6, 9)), ("one", [9])):
        for c in classes:
            base = rng.integers(0, 256, size=(16, 16))
            for k in range(4):
                pixels = np.clip(base + rng.integers(-40, 40, size=(16, 16)), 0, 255)
                path = root / folder / f"class_{c}" / f"{k}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels.astype(np.uint8)).save(path)
    return root


def validation_pairs(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings and labels of the run's validation classes, as `deepmetric eval --split
    val` builds them."""
    cfg, model, ckpt = load_model(run)
    val = evaluation_set(cfg, "val", ckpt)
    emb, labels = extract_embeddings(model, build_eval_loader(cfg, val.dataset, False))
    return emb.numpy(), labels.numpy()


def brute_force_threshold(emb: np.ndarray, labels: np.ndarray, far: float):
    """(threshold, FAR, TAR): the lowest distinct score whose share of negative pairs i < j
    scoring >= it is <= far, by sorting every float64 pair score."""
    e = emb.astype(np.float64)
    i, j = np.triu_indices(len(e), 1)
    scores = np.einsum("nd,nd->n", e[i], e[j])
    positive = labels[i] == labels[j]
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    fp, tp = np.cumsum(~positive), np.cumsum(positive)
    last = np.r_[scores[1:] != scores[:-1], True]  # the end of each tie group
    ok = np.flatnonzero(last & (fp <= far * (~positive).sum()))[-1]
    return scores[ok], fp[ok] / (~positive).sum(), tp[ok] / positive.sum()


def test_threshold_equals_a_brute_force_on_the_validation_pairs(val_run, images) -> None:
    r = Retriever.build(val_run, images / "gallery", calibrate={"far": 1e-2}, progress=False)
    t = r.manifest["threshold"]
    emb, labels = validation_pairs(val_run)
    value, far, tar = brute_force_threshold(emb, labels, 1e-2)
    assert t["value"] == pytest.approx(value, abs=1e-6)
    assert t["achieved"]["far"] == pytest.approx(far, abs=1e-12) and far <= 1e-2
    assert t["achieved"]["tar"] == pytest.approx(tar, abs=1e-12)
    n = len(labels)
    assert t["pairs"]["positive"] + t["pairs"]["negative"] == n * (n - 1) // 2
    assert t["target"] == {"far": 1e-2}
    assert t["calibrated_on"].startswith(f"validation classes of {val_run.resolve()}")
    assert t["calibrated_on"].endswith(f"({n} images, 2 classes)")
    assert t["model"] == r.manifest["fingerprint"]["checkpoint_sha256"]
    # a precision target: the lowest threshold whose pair precision reaches it
    p = r.calibrate(precision=0.9)
    assert p["achieved"]["precision"] >= 0.9 and p["target"] == {"precision": 0.9}


def test_calibration_never_reads_the_test_classes(val_run, images, monkeypatch) -> None:
    import deepmetric.engine.splits as splits

    r = Retriever.build(val_run, images / "gallery", progress=False)
    before = r.calibrate(far=1e-2)
    built, real = [], splits.build_dataset

    def poisoned(name, root, split, *args, **kwargs):
        built.append(split)
        dataset = real(name, root, split, *args, **kwargs)
        if split == "test":  # noise images under shuffled labels
            dataset.images = torch.randint_like(dataset.images, 0, 256)
            dataset.labels = dataset.labels[torch.randperm(len(dataset.labels))]
        return dataset

    monkeypatch.setattr(splits, "build_dataset", poisoned)
    assert r.calibrate(far=1e-2) == before
    assert built and "test" not in built
    # the open-set evaluation of the test split: its threshold comes from the validation
    # classes too (the same value with poisoned test data)
    result = evaluate_checkpoint(val_run, OPEN_SET, split="test", progress=False)
    emb, labels = validation_pairs(val_run)
    expected = calibrate_threshold(emb, labels, far=1e-3)["value"]
    assert result["metrics"]["open_set/threshold"] == expected


def test_no_match_for_a_class_absent_from_the_gallery(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32))

    def points(classes: list[int], per_class: int = 5) -> tuple[np.ndarray, list[str]]:
        x = np.repeat(centres[classes], per_class, 0)
        x += 0.05 * rng.normal(size=x.shape)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), [str(c) for c in np.repeat(classes, per_class)]

    gallery, glabels = points([0, 1, 2])
    r = Retriever.from_embeddings(gallery, [f"g{i}" for i in range(15)], glabels)
    calibration, clabels = points([3, 4, 5, 6])  # other classes: validation stand-ins
    t = r.calibrate(calibration, clabels, far=0.01)
    assert t["calibrated_on"] == "20 embeddings given (20 images, 4 classes)"
    queries, _ = points([0, 9], per_class=1)  # class 0 is in the gallery, class 9 is not
    hits = r.search(queries, k=3, threshold="auto")
    assert hits.match == [True, False] and hits.threshold == t["value"]
    assert len(hits.paths[0]) == 3 and all(s >= t["value"] for s in hits.scores[0])
    assert set(hits.labels[0]) == {"0"}
    assert hits.paths[1] == [] and hits.scores[1] == []
    rows = hits.rows()
    assert rows[-1] == {
        "query": "1",
        "rank": None,
        "path": None,
        "score": None,
        "label": None,
        "match": False,
    }
    assert all(row["match"] for row in rows[:-1])
    # without a threshold nothing changes; "auto" after a save and load; a number
    plain = r.search(queries, k=3)
    assert plain.match is None and len(plain.paths[1]) == 3 and "match" not in plain.rows()[0]
    r.save(tmp_path / "e.index")
    again = Retriever.load(tmp_path / "e.index")
    assert again.manifest["threshold"] == t
    assert again.search(queries, k=3, threshold="auto") == hits
    assert again.search(queries, k=3, threshold=2.0).match == [False, False]
    with pytest.raises(ConfigError, match="at least 2 classes"):
        r.calibrate(calibration[:5], clabels[:5], far=0.01)
    # with re-ranking the decision stays on the calibrated inner products (k-reciprocal
    # scores 1 - d* are on another scale): the same matches, the re-ranked order
    options = {"k1": 4, "k2": 2}
    reranked = r.search(
        queries, k=3, threshold="auto", rerank="k_reciprocal", rerank_options=options
    )
    assert reranked.match == [True, False] and reranked.paths[1] == []
    unthresholded = r.search(queries, k=3, rerank="k_reciprocal", rerank_options=options)
    assert reranked.paths[0] == unthresholded.paths[0]


def test_cli_and_retriever_agree(val_run, images, tmp_path: Path, capsys) -> None:
    index = tmp_path / "t.index"
    build = ["index", "build", "--checkpoint", str(val_run), "--images", str(images / "gallery")]
    assert main([*build, "--out", str(index), "--threshold-far", "0.01"]) == 0
    assert "calibrated on validation classes of" in capsys.readouterr().out
    manifest = json.loads((index / "manifest.json").read_text())
    r = Retriever.load(index)
    queries = images / "other"
    expected = r.search(queries, k=3, threshold="auto")
    assert manifest["threshold"]["value"] == expected.threshold
    out = tmp_path / "hits.json"
    search = ["search", "--index", str(index), "--images", str(queries), "--k", "3"]
    assert main([*search, "--threshold", "auto", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert [q["match"] for q in written] == expected.match
    assert [[x["path"] for x in q["results"]] for q in written] == expected.paths

    # a score that some queries reach and others do not: both kinds of rows are written
    best = sorted(s[0] for s in r.search(queries, k=1).scores)
    middle = (best[len(best) // 2 - 1] + best[len(best) // 2]) / 2
    hits = r.search(queries, k=3, threshold=middle)
    assert True in hits.match and False in hits.match
    for suffix in ("csv", "json"):
        out = tmp_path / f"middle.{suffix}"
        assert main([*search, "--threshold", str(middle), "--out", str(out)]) == 0
        if suffix == "json":
            written = json.loads(out.read_text())
            assert [q["match"] for q in written] == hits.match
            assert all(q["results"] == [] for q in written if not q["match"])
        else:
            with open(out, newline="") as f:
                rows = list(csv.DictReader(f))
            assert list(rows[0]) == ["query", "rank", "path", "score", "label", "match"]
            misses = [row for row in rows if row["match"] == "False"]
            assert len(misses) == hits.match.count(False)
            assert all(row["rank"] == row["path"] == row["score"] == "" for row in misses)
            assert len(rows) == len(misses) + sum(len(p) for p in hits.paths)
    capsys.readouterr()
    assert main([*search, "--threshold", str(middle)]) == 0
    assert "no match (no item scores >= the threshold" in capsys.readouterr().out

    # a run without validation classes: calibrated on the folder given, and said so
    other = tmp_path / "o.index"
    folder = str(images / "other")
    args = [*build, "--out", str(other), "--threshold-far", "0.05", "--eval.protocol=test"]
    assert main([*args, "--calibration-images", folder]) == 0
    assert f"calibrated on {folder} (12 images, 3 classes)" in capsys.readouterr().out
    assert Retriever.load(other).manifest["threshold"]["calibrated_on"].startswith(folder)


def test_bad_threshold_inputs_are_one_line_errors(val_run, images, tmp_path, capsys) -> None:
    index = tmp_path / "plain.index"
    build = ["index", "build", "--checkpoint", str(val_run), "--images", str(images / "gallery")]
    assert main([*build, "--out", str(index)]) == 0
    capsys.readouterr()

    def fails(*args: str, match: str) -> None:
        assert main(list(args)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err

    search = ["search", "--index", str(index), "--images", str(images / "other")]
    # an index built without (or before) thresholds
    fails(*search, "--threshold", "auto", match="has no calibrated threshold")
    with pytest.raises(IndexFileError, match="--threshold-far"):
        Retriever.load(index).search(np.zeros((1, 16), np.float32), threshold="auto")
    # neither a number nor auto
    fails(*search, "--threshold", "high", match="--threshold: expected a number or 'auto'")
    fails(*search, "--threshold", "nan", match="--threshold: expected a number or 'auto'")
    # a FAR below what the validation pairs resolve: nothing is written
    out = tmp_path / "never.index"
    fails(*build, "--out", str(out), "--threshold-far", "1e-9", match="--threshold-far 1e-09: ")
    assert not out.exists()
    # calibration images of one class
    one = str(images / "one")
    args = [*build, "--out", str(out), "--threshold-far", "0.1", "--calibration-images", one]
    fails(*args, match="needs images of at least 2 classes")
    # a run without validation classes and no calibration images
    args = [*build, "--out", str(out), "--threshold-far", "0.1", "--eval.protocol=test"]
    fails(*args, match="pass --calibration-images FOLDER")
    assert not out.exists()


def test_open_set_metrics_of_a_hand_computed_case() -> None:
    # 1-d "embeddings" with a second coordinate to L2-normalise; scores are cos(a - b)
    angles = torch.tensor([0.0, 0.1, 1.0, 1.1, 2.0, 2.05])
    emb = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    labels = [0, 0, 1, 1, 2, 2]
    # class 2 leaves the gallery; threshold cos(0.5): each query's best score is its nearest
    # gallery neighbour, itself excluded: 0 -> 1 (0.1), 1 -> 0 (0.1), 2 -> 3 (0.1),
    # 3 -> 2 (0.1), 4 -> 3 (0.9), 5 -> 3 (0.95): queries 0-3 answer match (they have one),
    # 4 and 5 answer no match (they have none)
    r = open_set_metrics(emb, labels, float(np.cos(0.5)), held_out=[2], recall_at=(1, 2))
    assert r["open_set/precision"] == 1.0 and r["open_set/recall"] == 1.0
    assert r["open_set/no_match_recall"] == 1.0
    assert r["open_set/queries_with_match"] == 4 and r["open_set/queries_without_match"] == 2
    assert r["open_set/recall@1"] == 1.0
    # threshold cos(0.93): query 4 (0.9) now answers match without having one
    r = open_set_metrics(emb, labels, float(np.cos(0.93)), held_out=[2], recall_at=(1,))
    assert r["open_set/precision"] == pytest.approx(4 / 5) and r["open_set/recall"] == 1.0
    assert r["open_set/no_match_recall"] == pytest.approx(1 / 2)
    # threshold cos(0.05): nobody matches; precision has nothing to count
    r = open_set_metrics(emb, labels, float(np.cos(0.05)), held_out=[2], recall_at=(1,))
    assert np.isnan(r["open_set/precision"]) and r["open_set/recall"] == 0.0
    # query / gallery masks (In-Shop style): queries 0, 2, 4 against gallery 1, 3, 5
    query = torch.tensor([True, False, True, False, True, False])
    r = open_set_metrics(
        emb, labels, float(np.cos(0.5)), held_out=[2], recall_at=(1,), query=query, gallery=~query
    )
    assert r["open_set/queries_with_match"] == 2 and r["open_set/precision"] == 1.0
    assert r["open_set/no_match_recall"] == 1.0  # query 4: 0.9 from item 3, the nearest
    assert held_out_classes([0, 1, 2, 3], 0.5, seed=0) == held_out_classes([3, 2, 1, 0], 0.5, 0)
    assert len(held_out_classes(list(range(10)), 0.01, seed=1)) == 1


def test_open_set_evaluation_in_training_and_eval(val_run, capsys) -> None:
    summary = json.loads((val_run / "summary-test.json").read_text())
    for metrics in (summary["final"], summary["test_of_best"]):  # val, then test of the best
        assert {"open_set/precision", "open_set/recall", "open_set/recall@1"} <= set(metrics)
    emb, labels = validation_pairs(val_run)
    expected = calibrate_threshold(emb, labels, far=1e-3)["value"]
    assert summary["test_of_best"]["open_set/threshold"] == pytest.approx(expected, abs=1e-6)
    # a given score on a run without validation classes; "auto" there is a one-line error
    test_only = ["--eval.protocol=test", *OPEN_SET]
    result = evaluate_checkpoint(
        val_run, [*test_only, "--eval.open_set_threshold=0.5"], split="test", progress=False
    )
    assert result["metrics"]["open_set/threshold"] == 0.5
    with pytest.raises(ConfigError, match="never used to calibrate"):
        evaluate_checkpoint(val_run, test_only, split="test", progress=False)
    assert main(["eval", "--checkpoint", str(val_run), *test_only]) == 2
    assert capsys.readouterr().err.count("\n") == 1
