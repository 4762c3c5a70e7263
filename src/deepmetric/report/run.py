"""A run's report: what its folder holds (metrics.jsonl, run.json, the resolved config) and the
embeddings of its evaluation split, computed again from the checkpoint.

``RUN/run.json`` is written by ``train()`` when a run starts
(:func:`deepmetric.engine.run_folder.write_run_file`): the preset file the config was
read from and the settings given on the command line, so that the report can show what the run
changed from its preset (the preset is read again when the report is built)::

    {"config_file": "/abs/configs/demo.yaml", "command_line": {"train.iterations": 300}}
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from deepmetric.config import Config, ConfigError, config_to_dict, load_config
from deepmetric.engine.builders import build_eval_loader
from deepmetric.engine.checkpoint import checkpoint_iteration, run_dir_of
from deepmetric.engine.devices import amp_dtype, resolve_device
from deepmetric.engine.inference import evaluation_set, load_model
from deepmetric.engine.run_folder import RUN_FILE
from deepmetric.evaluation import extract_embeddings, ordered_keys

from .build import gather_report, write_report
from .content import ConfigDiff, Curves, MetricsTable, ReportContent, ReportOptions

__all__ = [
    "config_diff",
    "metrics_table",
    "read_records",
    "report_run",
    "training_curves",
]


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1, "c": {}}`` (every level)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_diff(cfg: Config, run_dir: Path) -> ConfigDiff:
    """The settings of ``cfg`` that differ from the run's preset file, read again now; a note
    instead when run.json or the preset file is missing or unreadable."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return ConfigDiff(None, [], f"{path} not found (a run written before run.json existed)")
    info = json.loads(path.read_text())
    preset = info.get("config_file")
    if not preset:
        return ConfigDiff(None, [], "the run was configured in Python, not from a preset file")
    if not Path(preset).is_file():
        return ConfigDiff(preset, [], f"preset file {preset} not found: no comparison")
    try:
        base = load_config(preset, validate=False)
    except ConfigError as e:
        return ConfigDiff(preset, [], f"preset file unreadable by this version: {e}")
    a, b = _flatten(config_to_dict(base)), _flatten(config_to_dict(cfg))
    given = list(info.get("command_line", {}))

    def on_command_line(key: str) -> bool:
        return any(key == g or key.startswith(g + ".") for g in given)

    rows = [
        (key, a.get(key), b.get(key), on_command_line(key))
        for key in dict.fromkeys([*a, *b])
        if a.get(key) != b.get(key)
    ]
    return ConfigDiff(preset, rows, "" if rows else "none: the run used the preset as it is")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` (empty when there is none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics_table(records: list[dict[str, Any]], split: str, iteration: int) -> MetricsTable | None:
    """The metrics.jsonl evaluation record of ``split`` at ``iteration`` next to the untrained
    network's (iteration 0) when the run evaluated it; None when neither exists."""
    evals = [r for r in records if r.get("split") == split]
    trained = next((r for r in reversed(evals) if r.get("iteration") == iteration), None)
    untrained = next((r for r in evals if r.get("iteration") == 0 and "checkpoint" not in r), None)
    columns = []
    if untrained is not None and iteration != 0:
        columns.append(("untrained (iteration 0)", untrained))
    if trained is not None:
        columns.append((f"trained (iteration {iteration})", trained))
    if not columns:
        return None
    note = "" if trained else f"metrics.jsonl has no {split} record at iteration {iteration}."
    return MetricsTable(ordered_keys(columns[-1][1]), [(h, r) for h, r in columns], note)


def training_curves(records: list[dict[str, Any]]) -> Curves | None:
    """Loss of each training record; Recall@1 of each evaluation record during training (the
    final test of a best checkpoint left out), per split. None without either."""
    train = [r for r in records if "loss" in r and "split" not in r]
    recall: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if "recall@1" in r and "split" in r and "checkpoint" not in r:
            its, values = recall.setdefault(r["split"], ([], []))
            its.append(r["iteration"])
            values.append(r["recall@1"])
    if not train and not recall:
        return None
    loss = ([r["iteration"] for r in train], [r["loss"] for r in train])
    return Curves(loss, recall)


def report_run(
    checkpoint: str | os.PathLike,
    *,
    split: str = "test",
    out: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    options: ReportOptions | None = None,
    progress: bool = True,
) -> Path:
    """Write the report of a run folder or checkpoint on its ``split`` ("test", or the run's
    class-disjoint "val"): the images are embedded again with the checkpoint (best, else
    last). Default ``out``: ``RUN/report.html`` for the split the run evaluated on,
    ``RUN/report-SPLIT.html`` for the other."""
    start = time.perf_counter()
    cfg, model, ckpt = load_model(checkpoint, overrides)
    device = resolve_device(cfg.train.device)
    eval_set = evaluation_set(cfg, split, ckpt)
    dataset = eval_set.dataset
    embeddings, labels = extract_embeddings(
        model.to(device),
        build_eval_loader(cfg, dataset, persistent=False),
        device=device,
        amp_dtype=amp_dtype(cfg.train.amp, device),
        flip=cfg.eval.flip,
        progress=progress,
    )
    run_dir, iteration = run_dir_of(ckpt), checkpoint_iteration(ckpt)
    records = read_records(run_dir)
    content = ReportContent(
        title=f"deepmetric report: {run_dir.name}",
        facts=[
            ("data", cfg.data.name),
            ("split", split),
            ("images", f"{len(dataset):,}"),
            ("classes", f"{len(set(labels.tolist())):,}"),
            ("model", f"{cfg.model.backbone}, {cfg.model.embedding_dim}-d"),
            ("checkpoint", f"{ckpt.name} (iteration {iteration})"),
            ("run", str(run_dir)),
        ],
        metrics=metrics_table(records, split, iteration),
        config_diff=config_diff(cfg, run_dir),
        curves=training_curves(records),
    )
    gather_report(
        embeddings,
        labels,
        dataset.load_image,
        class_names=getattr(dataset, "class_names", None),
        query_mask=eval_set.query,
        gallery_mask=eval_set.gallery,
        content=content,
        options=options,
    )
    content.facts.append(("built in", f"{time.perf_counter() - start:.1f} s"))
    if out is None:
        name = "report.html" if split == cfg.eval.protocol else f"report-{split}.html"
        out = run_dir / name
    return write_report(content, out)
