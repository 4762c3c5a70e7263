"""One record per metric and per data source, read by every consumer: the evaluation, the
config check, the console, the plots and report, tune and compare."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

import tiny_runs
from deepmetric.config import ConfigError, load_config, recall_at
from deepmetric.data import SOURCES, find_source
from deepmetric.engine import train
from deepmetric.engine.runlog import format_metrics
from deepmetric.evaluation import (
    METRICS,
    display_name,
    evaluate,
    metric_of_key,
    ordered_keys,
    result_key,
    result_keys,
)
from deepmetric.report.run import metrics_table
from evaluation_reference import clustered
from tiny_runs import DEMO

TINY = [
    *tiny_runs.TINY,
    "--model.embedding_dim=8",
    "--output.plots=false",
    "--eval.batch_size=512",
]


# ------------------------------------------------------------------------------ metrics
@pytest.mark.parametrize(
    "names", [c for n in range(1, 4) for c in itertools.combinations(METRICS, n)]
)
def test_evaluate_returns_exactly_the_keys_the_records_name(names) -> None:
    x, labels = clustered(60, 6, 8, seed=3)
    out = evaluate(x, labels, recall_at=(1, 3), metrics=names)
    counts = ("num_queries", "num_queries_without_positive", "num_positive_pairs")
    counts += ("num_negative_pairs",)
    metric_keys = [k for k in out if k not in counts and "threshold" not in k]
    assert sorted(metric_keys) == sorted(result_keys(names, (1, 3)))
    assert ordered_keys(out) == result_keys(names, (1, 3))  # display order, from the record
    for key in metric_keys:
        assert metric_of_key(key).name in names
        # TAR@FAR below 1 / negative pairs (under 1,770 pairs here: 1e-4, 1e-5) is unresolvable
        unresolvable = key in ("tar@far=1e-4", "tar@far=1e-5")
        assert np.isnan(out[key]) if unresolvable else 0.0 <= out[key] <= 1.0


def test_every_result_key_has_a_display_name_and_a_place_in_the_order() -> None:
    keys = result_keys(list(METRICS), (1, 10, 2))
    assert keys == [
        "recall@1",
        "recall@10",
        "recall@2",
        "precision@1",
        "map@r",
        "r_precision",
        "nmi",
        "roc_auc",
        "eer",
        *(f"tar@far=1e-{i}" for i in range(1, 6)),
    ]
    assert [display_name(k) for k in keys] == [
        "Recall@1",
        "Recall@10",
        "Recall@2",
        "Precision@1",
        "MAP@R",
        "R-precision",
        "NMI",
        "ROC AUC",
        "EER",
        *(f"TAR@FAR=1e-{i}" for i in range(1, 6)),
    ]
    # a record as metrics.jsonl holds it: Recall@K by K, other keys dropped
    record = {"iteration": 5, "nmi": 0.5, "recall@10": 0.9, "recall@2": 0.8, "precision@1": 0.7}
    assert ordered_keys(record) == ["recall@2", "recall@10", "precision@1", "nmi"]
    assert display_name("iteration") == "iteration" and metric_of_key("loss") is None


def test_the_console_and_the_report_show_every_metric_of_a_record() -> None:
    """format_metrics dropped precision@1, which the report showed: both read the record."""
    record = {"split": "test", "iteration": 3, "recall@1": 0.5, "precision@1": 0.5, "nmi": 0.25}
    record |= {"map@r": 0.125, "r_precision": 0.2, "num_queries": 10, "eval_time_s": 1.5}
    shown = format_metrics(record)
    assert (
        shown == "recall@1 0.5000  precision@1 0.5000  map@r 0.1250  r_precision 0.2000  nmi 0.2500"
    )
    table = metrics_table([record], "test", 3)
    assert table.keys == ordered_keys(record)


@pytest.mark.parametrize(
    ("spelling", "expected"),
    [("map_at_r", "map@r"), ("map@r", "map@r"), ("precision_at_1", "precision@1")],
)
def test_select_metric_takes_the_config_name_or_the_result_key(spelling, expected) -> None:
    cfg = load_config(
        DEMO,
        [f"--eval.select_metric={spelling}", "--eval.metrics=[recall, map_at_r, precision_at_1]"],
    )
    assert cfg.eval.select_metric == expected


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["--eval.metrics=[recall, mapr]"], ["eval.metrics", "'mapr'", "did you mean 'map_at_r'"]),
        (["--eval.metrics=[recall, map@r]"], ["eval.metrics", "result key of 'map_at_r'"]),
        (["--eval.select_metric=nmi"], ["eval.select_metric=nmi", "not computed", "recall@1"]),
        (["--eval.select_metric=recall@3"], ["eval.select_metric", "K = 1, 2, 4, 8"]),
        (["--eval.select_metric=recall"], ["eval.select_metric", "name one of recall@1"]),
        (["--eval.select_metric=mAP"], ["eval.select_metric=mAP", "not a metric"]),
        (["--eval.metrics=[]"], ["eval.metrics", "at least one metric"]),
    ],
)
def test_metric_mistakes_are_config_errors_at_load(overrides, needles) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, overrides)
    message = str(info.value)
    assert message.startswith("command line:"), message
    for needle in needles:
        assert needle in message, message


def test_select_metric_map_at_r_saves_the_best_checkpoint_by_map_at_r(tmp_path: Path) -> None:
    """``map_at_r`` used to match no result key: no best checkpoint, no test of the best."""
    out = tmp_path / "run"
    cfg = load_config(
        DEMO,
        [
            *TINY,
            f"--output.dir={out}",
            "--train.iterations=4",
            "--eval.every=2",
            "--eval.protocol=val",
            "--eval.val_fraction=0.4",
            "--sampler.p=3",
            "--eval.select_metric=map_at_r",
        ],
    )
    summary = train(cfg)
    assert summary["best"]["metric"] == "map@r"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r.get("split") == "val" and r["iteration"] > 0]
    best_value = max(r["map@r"] for r in trained)
    assert summary["best"]["value"] == best_value
    assert summary["test_of_best"]["num_queries"] == 896 and (out / "best").is_symlink()


def test_the_default_select_metric_follows_eval_metrics_with_a_note() -> None:
    cfg = load_config(DEMO, ["--eval.metrics=[r_precision, map_at_r]"])
    assert cfg.eval.select_metric == "map@r"  # the first in display order
    assert any("eval.select_metric" in note and "map@r" in note for note in cfg.notes)


def test_result_key_refuses_what_the_evaluation_does_not_compute() -> None:
    assert result_key("recall@4", ["recall"], (1, 4)) == "recall@4"
    with pytest.raises(ValueError, match="one key per K"):
        result_key("recall", ["recall"], (1, 4))
    with pytest.raises(ValueError, match="not computed"):
        result_key("nmi", ["recall"], (1, 4))


# ------------------------------------------------------------------------------ data sources
ALIASES = [(source.name, alias) for source in SOURCES.values() for alias in source.aliases]


@pytest.mark.parametrize(("name", "alias"), ALIASES)
def test_every_alias_gets_its_sources_recall_at(name, alias) -> None:
    """``--data.name=CUB200`` reported Recall@(1, 2, 4, 8) instead of CUB's 1 ... 32."""
    for spelling in (alias, alias.upper()):
        assert find_source(spelling) is SOURCES[name]
        cfg = load_config(None, [f"--data.name={spelling}"], validate=False)
        assert recall_at(cfg) == SOURCES[name].recall_at


def test_the_benchmarks_recall_at_come_from_their_papers() -> None:
    cub = load_config(None, ["--data.name=CUB200"], validate=False)
    inshop = load_config(None, ["--data.name=in-shop"], validate=False)
    assert recall_at(cub) == (1, 2, 4, 8, 16, 32)
    assert recall_at(inshop) == (1, 10, 20, 30, 40, 50)
    for source in SOURCES.values():
        if source.official_split:
            assert source.recall_at_source and source.counts and source.image_files
    cfg = load_config(None, ["--data.name=sop", "--eval.recall_at=[1, 5]"], validate=False)
    assert recall_at(cfg) == (1, 5)


def test_no_alias_names_two_sources_and_an_unknown_name_gets_a_near_match() -> None:
    names = [n for s in SOURCES.values() for n in (s.name, *s.aliases)]
    assert len(names) == len(set(names))
    with pytest.raises(ValueError, match=r"unknown data set 'cub2000' \(did you mean 'cub200'"):
        find_source("cub2000")
