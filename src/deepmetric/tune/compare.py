"""``deepmetric compare``: several configs trained with the same budget of training images
(iterations x images per batch: a batch of 1,000 for 192 iterations against one of 128 for
1,500) and the same seeds, each run scored once, and a table of mean and 95% interval per config.

Which numbers a run contributes (the ``scored on`` column): with ``eval.protocol: val`` and
``eval.final_test``, the best-on-validation checkpoint evaluated once on the test split;
otherwise the last checkpoint on the config's evaluation split (no selection on it).
Runs live in OUT/<config>/seed-<s> and resume when the command is run again.
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

from deepmetric.config import Config, ConfigError, load_config, recall_at
from deepmetric.evaluation import display_name, result_keys

from .study import TuneStopped, train_logged

# Deferred imports: scipy.stats (~1.5 s) and matplotlib (slow to import), inside the functions
# that use them.

__all__ = ["compare", "mean_interval", "table_keys"]


def table_keys(configs: list[Config]) -> list[str]:
    """The table's metrics: the result keys that every config's evaluation computes, Recall@K
    at its smallest K only, in display order."""
    keys = [result_keys(c.eval.metrics, recall_at(c)[:1]) for c in configs]
    return [k for k in keys[0] if all(k in mine for mine in keys[1:])]


def mean_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of the two-sided 95% Student t interval); half-width nan for n = 1."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def compare(
    configs: list[str],
    *,
    seeds: int = 3,
    out: str | Path = "runs/compare",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train every config with seeds 0..seeds-1 (resuming finished or stopped runs) and write
    OUT/compare.md, OUT/compare.csv (one row per config), OUT/runs.csv (one row per run) and
    OUT/compare.png. Returns ``{"rows": [...], "runs": [...], "files": [...]}``."""

    if len(configs) < 1 or seeds < 1:
        raise ConfigError(
            "compare needs at least one config (--configs A.yaml B.yaml) and --seeds >= 1"
        )
    out = Path(out)
    names = _names(configs)
    loaded = {name: load_config(path, overrides) for name, path in zip(names, configs)}
    budgets = {name: _training_images(cfg) for name, cfg in loaded.items()}
    if len(set(budgets.values())) > 1:
        shown = ", ".join(
            f"{n}: {b:,} = {c.train.iterations} x {c.sampler.images_per_batch()}"
            for (n, b), c in zip(budgets.items(), loaded.values())
        )
        raise ConfigError(
            f"compare: the configs train on different numbers of images ({shown}: iterations "
            "x images per batch); give them one budget, e.g. --train.iterations=N, or "
            "iterations in inverse proportion to their batch sizes"
        )
    metrics = table_keys(list(loaded.values()))
    runs = []
    for name, path in zip(names, configs):
        for seed in range(seeds):
            run_dir = out / name / f"seed-{seed}"
            cfg = load_config(
                path,
                [
                    *list(overrides or []),
                    f"--seed={seed}",
                    f"--output.dir={run_dir}",
                    "--train.resume=auto",
                    "--train.progress=false",
                    "--output.report=false",
                ],
            )
            summary = train_logged(cfg, run_dir, path)
            if summary.get("stopped_by"):
                raise TuneStopped(
                    f"{summary['stopped_by']} during {name} seed {seed} (checkpoint "
                    f"{summary.get('checkpoint')})"
                )
            scored_on, values = _scored(summary, cfg)
            runs.append(
                {
                    "config": name,
                    "seed": seed,
                    "scored_on": scored_on,
                    "images": _training_images(cfg),
                    **{m: values.get(m, math.nan) for m in metrics},
                    "run_dir": str(run_dir),
                }
            )
            print(
                f"compare: {name} seed {seed}: "
                + " ".join(f"{m} {runs[-1][m]:.4f}" for m in metrics)
                + f" ({scored_on})",
                flush=True,
            )
    rows = _summarise(runs, names, metrics)
    files = _write(rows, runs, out, metrics)
    print((out / "compare.md").read_text(), end="")
    print(f"written: {', '.join(str(f) for f in files)}")
    return {"rows": rows, "runs": runs, "files": [str(f) for f in files]}


def _training_images(cfg: Config) -> int:
    """The budget every config gets: iterations x images per batch (one process)."""
    return cfg.train.iterations * cfg.sampler.images_per_batch()


def _names(configs: list[str]) -> list[str]:
    """Short unique names: the file stems, with their folder where two stems clash."""
    stems = [Path(c).stem for c in configs]
    names = [
        s if stems.count(s) == 1 else f"{Path(c).parent.name}-{s}" for s, c in zip(stems, configs)
    ]
    if len(set(names)) != len(names):
        raise ConfigError(f"compare: a config is listed twice: {configs}")
    return names


def _scored(summary: dict[str, Any], cfg: Any) -> tuple[str, dict[str, float]]:
    if summary.get("test_of_best"):
        return f"test, best-on-val checkpoint (iteration {summary['best']['iteration']})", summary[
            "test_of_best"
        ]
    split = "validation" if cfg.eval.protocol == "val" else "test"
    return f"{split}, last checkpoint (iteration {summary['iteration']})", summary["final"]


def _summarise(
    runs: list[dict[str, Any]], names: list[str], metrics: list[str]
) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        mine = [r for r in runs if r["config"] == name]
        row: dict[str, Any] = {
            "config": name,
            "runs": len(mine),
            "images": mine[0]["images"],
            "scored_on": mine[0]["scored_on"].split(" (")[0],
        }
        for m in metrics:
            row[m], row[f"{m} 95%"] = mean_interval([r[m] for r in mine])
        rows.append(row)
    return rows


def _write(
    rows: list[dict[str, Any]], runs: list[dict[str, Any]], out: Path, metrics: list[str]
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "compare.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(runs[0]))
        writer.writeheader()
        writer.writerows(runs)
    header = ["config", "runs", "training images", *map(display_name, metrics), "scored on"]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "---:|" * len(metrics) + "---|"]
    for row in rows:
        cells = [f"{row[m]:.4f} ± {row[f'{m} 95%']:.4f}" for m in metrics]
        lines.append(
            f"| {row['config']} | {row['runs']} | {row['images']:,} | "
            + " | ".join(cells)
            + f" | {row['scored_on']} |"
        )
    lines.append("")
    lines.append("mean ± half-width of the 95% Student t interval over the seeds")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    return [
        out / "compare.md",
        out / "compare.csv",
        out / "runs.csv",
        _plot(rows, runs, out, metrics),
    ]


def _plot(
    rows: list[dict[str, Any]], runs: list[dict[str, Any]], out: Path, metrics: list[str]
) -> Path:
    """compare.png: one panel per metric, its own scale; per config the seeds' values (dots)
    and their mean with the 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 4.2), squeeze=False)
    axes = axes[0]
    names = [row["config"] for row in rows]
    for ax, metric in zip(axes, metrics):
        for i, row in enumerate(rows):
            values = [r[metric] for r in runs if r["config"] == row["config"]]
            ax.plot([i] * len(values), values, "o", color="0.6", markersize=4, zorder=1)
            half = row[f"{metric} 95%"]
            ax.errorbar(
                i,
                row[metric],
                yerr=None if math.isnan(half) else half,
                fmt="s",
                color=f"C{i}",
                capsize=6,
                markersize=7,
                zorder=2,
            )
        ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_title(display_name(metric))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("seeds (dots), mean and 95% interval")
    fig.suptitle(f"deepmetric compare: {rows[0]['runs']} seeds, scored on {rows[0]['scored_on']}")
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)
    return out / "compare.png"
