"""What a finished ``deepmetric tune`` writes into its folder: the trial table (trials.csv,
trials.md), the best point as a ready preset (best.yaml), and Optuna's plots of parameter
importance (importance.png, PED-ANOVA, Optuna 5's default evaluator) and of the optimisation
history (history.png)."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

from deepmetric.config import dump_config, load_config, parse_overrides

from .space import Param, suggest

# Deferred imports: optuna and matplotlib (optional / slow to import), inside the functions
# that use them.

__all__ = ["best_overrides", "write_results"]


def best_overrides(trial: Any, space: list[Param]) -> list[tuple[str, Any]]:
    """The ``(key, value)`` overrides of a finished trial's point (fixed keys included)."""
    import optuna

    return suggest(optuna.trial.FixedTrial(trial.params), space)


def write_results(study: Any, settings: Any, space: list[Param], out: Path) -> dict[str, Any]:
    """Write the trial table, best.yaml and the plots; print where they are. Returns
    ``{"out", "best": {"trial", "value", "overrides"} | None, "finished", "files"}``."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    files = [_write_table(trials, settings.metric, out)]
    files.append(files[0].with_suffix(".md"))
    best = None
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        trial = study.best_trial
        point = best_overrides(trial, space)
        files.append(_write_preset(settings, trial, point, len(finished), out / "best.yaml"))
        files += _write_plots(study, out)
        best = {"trial": trial.number, "value": trial.value, "overrides": point}
        shown = " ".join(f"--{k}={v}" for k, v in point)
        print(
            f"tune: best of {len(finished)} finished trials: trial {trial.number}, validation "
            f"{settings.metric} {trial.value:.4f}: {shown}"
        )
        print(f"preset: {out / 'best.yaml'} (deepmetric train --config {out / 'best.yaml'})")
    else:
        print(f"tune: no trial completed yet ({len(finished)} pruned); no preset written")
    print(f"trials: {files[0]}, {files[1]}")
    return {
        "out": str(out),
        "best": best,
        "finished": len(finished),
        "files": [str(f) for f in files],
    }


def _write_table(trials: list[Any], metric: str, out: Path) -> Path:
    """trials.csv (every trial, in order) and trials.md (best first)."""
    names = sorted({name for t in trials for name in t.params})
    header = ["trial", "state", metric, "seconds", *names, "note"]
    rows = []
    for t in trials:
        note = t.user_attrs.get("failure", "")
        if t.state.name == "PRUNED" and t.intermediate_values:
            step = max(t.intermediate_values)
            note = f"pruned at step {step} ({t.intermediate_values[step]:.4f})"
        if "retry_of" in t.user_attrs:
            note = f"retry of {t.user_attrs['retry_of']}" + (f"; {note}" if note else "")
        seconds = t.duration.total_seconds() if t.duration else None
        rows.append(
            [
                t.number,
                t.state.name.lower(),
                "" if t.value is None else f"{t.value:.4f}",
                "" if seconds is None else f"{seconds:.0f}",
                *[_cell(t.params.get(n, "")) for n in names],
                note,
            ]
        )
    path = out / "trials.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    ranked = sorted(rows, key=lambda r: (r[2] == "", -float(r[2] or 0)))
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in ranked]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return path


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


#: Overrides of a tune's command line that set how trials are validated, logged and run,
#: not what they learn: used by the trials, left out of best.yaml (which keeps the preset's).
TRIAL_ONLY = (
    "eval.",
    "data.val_options",
    "output.",
    "train.progress",
    "train.threads",
    "train.log_every",
    "train.checkpoint_every",
    "train.resume",
)


def _write_preset(
    settings: Any, trial: Any, point: list[tuple[str, Any]], finished: int, path: Path
) -> Path:
    """The preset with the user's overrides (but those in :data:`TRIAL_ONLY`) and the best
    point, as a complete config."""
    given = parse_overrides(settings.overrides)
    kept = [(k, v) for k, v in given if not k.startswith(TRIAL_ONLY)]
    dropped = [(k, v) for k, v in given if k.startswith(TRIAL_ONLY)]
    cfg = load_config(settings.preset, kept + point)
    how = f" --folds {settings.folds}" if settings.folds else ""
    header = [
        f"# Tuned by deepmetric tune from {settings.preset} with the search space "
        f"{settings.space}{how}",
        f"# (study {settings.study_name!r}, {finished} finished trials, TPE seed {settings.seed}).",
        f"# Best: trial {trial.number}, class-disjoint validation {settings.metric} "
        f"{trial.value:.4f}; the test split was never used to choose.",
        "# The trial's point on top of the preset:",
        *[f"#   {k}: {v}" for k, v in point],
        *([f"# Set on the tune's command line: {_shown(kept)}"] if kept else []),
        *(
            [f"# Used by the trials only (the preset's own here): {_shown(dropped)}"]
            if dropped
            else []
        ),
    ]
    path.write_text("\n".join(header) + "\n" + dump_config(cfg))
    return path


def _shown(pairs: list[tuple[str, Any]]) -> str:
    return " ".join(f"--{k}={v}" for k, v in pairs)


def _write_plots(study: Any, out: Path) -> list[Path]:
    """importance.png and history.png (matplotlib, Agg); skipped when Optuna cannot draw them
    (too few trials, or no parameter that varies)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as oplt

    written = []
    plots = {
        "importance.png": lambda: oplt.plot_param_importances(
            study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        ),
        "history.png": lambda: oplt.plot_optimization_history(study),
    }
    for name, draw in plots.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning of the matplotlib backend
            try:
                ax = draw()
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                print(f"tune: {name} not drawn: {e}")
                continue
        fig = ax.figure
        if name == "importance.png":
            ax.set_title("Hyper-parameter importance (PED-ANOVA)", loc="left")
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        written.append(out / name)
    return written
