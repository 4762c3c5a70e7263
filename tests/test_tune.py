"""deepmetric tune and compare (issue 18): search space files, class-disjoint folds, a tiny
tune on digits, pruning, a stopped or killed tune that resumes without repeating finished
trials, two workers on one study (journal file; PostgreSQL when a server is given), compare's
table.

Runs are the tiny digits set: training digits 0-4 split into 3 training and 2 validation
classes (eval.val_fraction 0.4), Conv-4 16-d on 16 x 16 images, batches of 3 x 4.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_runs
from deepmetric.cli import main
from deepmetric.config import ConfigError, load_config, parse_overrides
from deepmetric.data import class_fold_split
from deepmetric.engine import build_data
from deepmetric.engine.preemption import EXIT_STOPPED
from deepmetric.tune import compare, load_space, mean_interval, space_corners, suggest, tune
from deepmetric.tune.space import Param

optuna = pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DEMO = ROOT / "configs" / "demo.yaml"
TINY = [
    *tiny_runs.TINY,
    "--sampler.p=3",
    "--sampler.k=4",
    "--eval.val_fraction=0.4",
    "--train.iterations=20",
    "--train.log_every=5",
    "--train.checkpoint_every=10",
    "--eval.at_start=false",
    "--eval.every=10",
    "--eval.batch_size=512",
    "--schedule.warmup_iterations=0",
    "--output.plots=false",
]
SPACE = """\
optim.lr: {log_uniform: [1.0e-4, 3.0e-3]}
loss.name:
  choice:
    multi_similarity:
      loss.base: {uniform: [0.3, 0.7]}
    contrastive:
      loss.neg_margin: {uniform: [0.3, 0.6]}
"""


def _space(tmp_path: Path, text: str = SPACE) -> Path:
    path = tmp_path / f"space-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(text)
    return path


def _tune_argv(space: Path, out: Path, trials: int, *extra: str) -> list[str]:
    """The arguments of ``deepmetric tune`` on the demo preset with the tiny settings."""
    argv = ["tune", "--config", str(DEMO), "--space", str(space), "--trials", str(trials)]
    return [*argv, "--out", str(out), *TINY, *extra]


def _trials(out: Path, name: str = "demo") -> list:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "study.journal"))
    )
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


def _tune_command(space: Path, out: Path, trials: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "deepmetric", *_tune_argv(space, out, trials, *extra)]


# --------------------------------------------------------------------------- space files


def test_space_file_parses_distributions_choices_sub_spaces_and_fixed_values(tmp_path) -> None:
    space = load_space(
        _space(
            tmp_path,
            SPACE
            + "sampler.k: {int: [2, 6]}\nxbm.size: {log_int: [64, 1024]}\n"
            + "data.transform_options.augment: false\n",
        )
    )
    assert [p.key for p in space] == [
        "optim.lr",
        "loss.name",
        "sampler.k",
        "xbm.size",
        "data.transform_options.augment",
    ]
    point = suggest(
        optuna.trial.FixedTrial(
            {
                "optim.lr": 1e-3,
                "loss.name": "contrastive",
                "contrastive/loss.neg_margin": 0.4,
                "sampler.k": 3,
                "xbm.size": 128,
            }
        ),
        space,
    )
    # the choice comes before its sub-space's keys; the other branch's keys are absent
    assert point == [
        ("optim.lr", 1e-3),
        ("loss.name", "contrastive"),
        ("loss.neg_margin", 0.4),
        ("sampler.k", 3),
        ("xbm.size", 128),
        ("data.transform_options.augment", False),
    ]
    corners = space_corners(space)
    names = {dict(c)["loss.name"] for c in corners}
    assert names == {"multi_similarity", "contrastive"}
    lrs = sorted({dict(c)["optim.lr"] for c in corners})
    assert lrs == pytest.approx([1e-4, 1e-4 + 2.9e-3 / math.pi, 3e-3])


def test_corners_reach_a_choice_inside_a_later_branch() -> None:
    """A nested choice under the second value of a choice is loaded with each of its values
    (a typo there fails before any training, not mid-study)."""
    space = [
        Param("loss.name", "loss.name", "choice", values=["a", "b"], branches=[
            [],
            [Param("loss.reduction", "b/loss.reduction", "choice", values=["mean", "sum"],
                   branches=[[], []])],
        ]),
    ]  # fmt: skip
    corners = [dict(c) for c in space_corners(space)]
    assert {"loss.name": "b", "loss.reduction": "sum"} in corners
    assert {"loss.name": "b", "loss.reduction": "mean"} in corners


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("optim.lrr: {uniform: [0.1, 0.2]}\n", "unknown key 'optim.lrr'"),
        ("optim.lr: {uniforn: [0.1, 0.2]}\n", "optim.lr: expected one distribution"),
        ("optim.lr: {uniform: [0.2, 0.1]}\n", "optim.lr: uniform needs low < high"),
        ("optim.lr: {log_uniform: [0, 0.1]}\n", "log_uniform needs low > 0"),
        ("sampler.k: {int: [2.5, 4]}\n", "sampler.k: int takes [low, high] integers"),
        ("loss.name: {choice: []}\n", "loss.name: choice needs at least one value"),
        ("lr: {uniform: [0.1, 0.2]}\n", "a key is a dotted config key"),
        ("optim.lr: 0.1\n", "nothing to search"),
        ("optim.betas: {choice: [[0.9, 0.99]]}\n", "values must be numbers, strings"),
        (
            "loss.name: {choice: {contrastive: {loss.alpah: {uniform: [1, 2]}}}}\n",
            "alpah",
        ),
        ("sampler.k: {uniform: [2.0, 4.0]}\n", "sampler.k"),
        ("[1, 2]\n", "expected a mapping of config keys"),
        ("eval.select_metric: {choice: [map@r]}\n", "eval.select_metric is set by deepmetric"),
        (  # the same name, True/xbm.size, with two distributions
            "xbm.enabled: {choice: {true: {xbm.size: {int: [64, 128]}}}}\n"
            "train.amp: {choice: {true: {xbm.size: {int: [32, 64]}}}}\n",
            "True/xbm.size: two sub-spaces give this key different distributions",
        ),
    ],
)
def test_bad_search_spaces_are_one_line_errors_naming_the_key(
    tmp_path, capsys, text, expected
) -> None:
    space = _space(tmp_path, text)
    code = main(_tune_argv(space, tmp_path / "out", 1))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("deepmetric: error: "), err
    assert expected in err, err
    assert str(space) in err or "unknown key" not in expected
    assert not (tmp_path / "out" / "trials").exists()  # nothing trained


# --------------------------------------------------------------------------- folds


def test_the_shipped_omniglot_space_loads_with_its_preset_in_every_corner() -> None:
    space = load_space(ROOT / "configs" / "spaces" / "omniglot.yaml")
    corners = space_corners(space)
    losses = set()
    for corner in corners:
        cfg = load_config(ROOT / "configs" / "omniglot_multi_similarity.yaml", corner)
        losses.add(cfg.loss.name)
    assert {"multi_similarity", "arcface"} <= losses


@pytest.mark.parametrize(
    "overrides",
    [["--eval.val_fraction=0.2"], ["--eval.val_folds=5", "--eval.val_fold=0"]],
)
def test_a_validation_split_of_one_class_is_refused(overrides) -> None:
    """One class scores every model 1.0 (each neighbour is a hit): no model selection."""
    cfg = load_config(DEMO, ["--eval.protocol=val", *overrides])  # digits 0-4: 5 classes
    with pytest.raises(ConfigError, match=r"validation split .* has 1 class; retrieval needs"):
        build_data(cfg)


def test_class_folds_partition_the_sorted_classes_into_contiguous_blocks() -> None:
    labels = torch.tensor([7, 3, 3, 9, 1, 5, 5, 2, 8, 0])  # classes 0 1 2 3 5 7 8 9
    vals = []
    for fold in range(3):
        train, val = class_fold_split(labels, 3, fold)
        assert set(train.tolist()).isdisjoint(val.tolist())
        assert sorted(train.tolist() + val.tolist()) == [0, 1, 2, 3, 5, 7, 8, 9]
        vals.append(val.tolist())
    assert vals == [[0, 1], [2, 3, 5], [7, 8, 9]]  # blocks of 8 // 3 ...: 0-2, 2-5, 5-8
    with pytest.raises(ValueError, match=r"fold must be in 0\.\.2"):
        class_fold_split(labels, 3, 3)
    with pytest.raises(ValueError, match="folds <= number of classes"):
        class_fold_split(labels, 9, 0)


def test_val_folds_select_the_validation_classes_of_a_run() -> None:
    seen = []
    for fold in range(2):
        cfg = load_config(
            DEMO, [*TINY, "--eval.protocol=val", "--eval.val_folds=2", f"--eval.val_fold={fold}"]
        )
        train_set, evals = build_data(cfg)
        val_ids = evals["val"].dataset.class_ids.tolist()
        assert set(val_ids).isdisjoint(train_set.class_ids.tolist())
        seen += val_ids
    assert sorted(seen) == [0, 1, 2, 3, 4]  # each training digit validates in one fold
    with pytest.raises(ConfigError, match=r"eval\.val_fold"):
        load_config(DEMO, ["--eval.val_folds=2", "--eval.val_fold=2"])
    with pytest.raises(ConfigError, match=r"eval\.val_folds"):
        load_config(DEMO, ["--eval.val_folds=1"])


# --------------------------------------------------------------------------- tune


def test_tiny_tune_finds_its_best_trial_and_writes_a_preset_that_trains(tmp_path) -> None:
    out = tmp_path / "tune"
    result = tune(str(DEMO), str(_space(tmp_path)), trials=3, out=out, overrides=TINY)
    trials = _trials(out)
    values = {t.number: t.value for t in trials if t.state.name == "COMPLETE"}
    assert len(values) == 3
    best = max(values, key=values.get)
    assert result["best"]["trial"] == best and result["best"]["value"] == values[best]
    for t in trials:  # each trial is a run scored on validation classes only
        summary = json.loads((Path(t.user_attrs["run_dir"]) / "summary.json").read_text())
        assert summary["protocol"] == "val" and summary["best"]["metric"] == "map@r"
        assert summary["best"]["value"] == pytest.approx(t.value)
        assert summary["test_of_best"] == {}  # the test split is never looked at
    with open(out / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == [0, 1, 2]
    assert float(rows[best]["map@r"]) == pytest.approx(values[best], abs=1e-4)
    assert (out / "importance.png").stat().st_size > 10_000
    # best.yaml is the preset + the user's overrides + the best point; it trains as it is
    preset = load_config(out / "best.yaml")
    expected = load_config(DEMO, parse_overrides(TINY) + result["best"]["overrides"])
    assert preset.optim.lr == expected.optim.lr and preset.loss == expected.loss
    assert preset.eval.protocol == "test"  # the preset's own protocol, not the trials' val
    code = main(
        [
            "train",
            "--config",
            str(out / "best.yaml"),
            f"--output.dir={tmp_path / 'r'}",
            "--train.iterations=5",
            "--train.progress=false",
            "--output.report=false",
        ]
    )
    assert code == 0
    # the same command again: already finished, nothing trained again
    before = {p: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.jsonl")}
    tune(str(DEMO), str(_space(tmp_path)), trials=3, out=out, overrides=TINY)
    assert {p: p.stat().st_mtime_ns for p in out.glob("trials/*/metrics.jsonl")} == before


def test_tune_with_folds_scores_the_mean_over_class_disjoint_folds(tmp_path) -> None:
    out = tmp_path / "tune"
    overrides = [*TINY, "--sampler.p=2"]  # fold 1 leaves 2 of the 5 digits for training
    tune(str(DEMO), str(_space(tmp_path)), trials=1, out=out, folds=2, overrides=overrides)
    (trial,) = _trials(out)
    scores = trial.user_attrs["fold_scores"]
    assert len(scores) == 2 and trial.value == pytest.approx(np.mean(scores))
    assert trial.intermediate_values == {0: scores[0], 1: pytest.approx(np.mean(scores))}
    run_dir = Path(trial.user_attrs["run_dir"])
    for fold in range(2):
        cfg = load_config(run_dir / f"fold-{fold}" / "config.yaml")
        assert (cfg.eval.val_folds, cfg.eval.val_fold) == (2, fold)


def test_a_trial_below_the_median_is_pruned_at_an_evaluation(tmp_path, monkeypatch) -> None:
    """The pruner's answer stops the run right after the evaluation it was asked about."""
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 1)
    out = tmp_path / "tune"
    tune(str(DEMO), str(_space(tmp_path)), trials=2, out=out, overrides=TINY)
    states = {t.number: t for t in _trials(out)}
    assert states[0].state.name == "COMPLETE"
    assert states[1].state.name == "PRUNED" and list(states[1].intermediate_values) == [10]
    records = (out / "trials" / "0001" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(r)["iteration"] for r in records) == 10  # of 20
    assert "pruned at step 10" in (out / "trials.md").read_text()


def test_a_trial_is_never_pruned_at_its_last_evaluation(tmp_path, monkeypatch) -> None:
    """A finished run is scored: the pruner is not asked after the last iteration or fold."""
    asked = []  # the step of each question to the pruner

    def should_prune(trial) -> bool:
        asked.append(max(trial.storage.get_trial(trial._trial_id).intermediate_values))
        return True

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", should_prune)
    overrides = [*TINY, "--eval.every=20"]  # one evaluation, at the last iteration
    tune(str(DEMO), str(_space(tmp_path)), trials=1, out=tmp_path / "a", overrides=overrides)
    assert asked == [] and _trials(tmp_path / "a")[0].state.name == "COMPLETE"
    tune(str(DEMO), str(_space(tmp_path)), trials=1, out=tmp_path / "f", folds=2,
         overrides=[*overrides, "--sampler.p=2"])  # fmt: skip
    assert asked == [0]  # after fold 0 (pruned there), never after fold 1


def test_a_failed_trial_is_recorded_and_the_tune_goes_on(tmp_path, monkeypatch) -> None:
    """A trial that raises (out of memory, a config its point breaks) is a failed trial with
    its traceback in its train.log; the tune stops only after 3 such trials in a row."""
    from deepmetric.tune import study

    real = study.train_logged
    calls = []

    def flaky(cfg, run_dir, *args, **kwargs):
        calls.append(run_dir)
        if len(calls) == 1 or "always" in str(run_dir):
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(study, "train_logged", flaky)
    out = tmp_path / "tune"
    tune(str(DEMO), str(_space(tmp_path)), trials=1, out=out, overrides=TINY)
    first, second = _trials(out)
    assert (first.state.name, second.state.name) == ("FAIL", "COMPLETE")
    assert first.user_attrs["failure"] == "error: RuntimeError: CUDA out of memory (simulated)"
    assert "Traceback" in (out / "trials" / "0000" / "train.log").read_text()
    with pytest.raises(ConfigError, match="3 trials in a row failed; the last, trial 2: error"):
        tune(str(DEMO), str(_space(tmp_path)), trials=1, out=tmp_path / "always", overrides=TINY)


def test_a_trial_folder_in_use_by_another_worker_is_not_trained_twice(tmp_path) -> None:
    import fcntl

    out = tmp_path / "tune"
    (out / "trials").mkdir(parents=True)
    with open(out / "trials" / "0000.lock", "w") as held:  # another worker trains trial 0
        fcntl.flock(held, fcntl.LOCK_EX)
        tune(str(DEMO), str(_space(tmp_path)), trials=1, out=out, overrides=TINY)
    first, second = _trials(out)
    assert first.state.name == "FAIL" and first.user_attrs["failure"].startswith("duplicate")
    assert second.state.name == "COMPLETE"
    assert not (out / "trials" / "0000").exists()


def test_a_settings_change_in_the_same_folder_is_refused(tmp_path, capsys) -> None:
    out = tmp_path / "tune"
    space = _space(tmp_path)
    tune(str(DEMO), str(space), trials=1, out=out, overrides=TINY)
    code = main(_tune_argv(space, out, 2, "--metric", "recall@1"))
    err = capsys.readouterr().err
    assert code == 2 and "metric" in err and "holds another tune" in err, err


@pytest.mark.parametrize("metric", ["recall@1000", "nmi", "precision_at_1"])
def test_a_metric_the_runs_do_not_compute_is_refused_before_training(
    tmp_path, capsys, metric
) -> None:
    code = main(_tune_argv(_space(tmp_path), tmp_path / "out", 1, "--metric", metric))
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"--metric {metric}: not computed" in err and "recall@1" in err, err
    assert "as eval.metrics says" in err
    assert not (tmp_path / "out" / "trials").exists()


def test_the_metric_may_be_named_as_eval_metrics_names_it(tmp_path) -> None:
    """--metric map_at_r (the eval.metrics spelling) is the map@r result key: one check,
    that of eval.select_metric, and tune.json holds the result key."""
    from deepmetric.tune.study import _check_space, _settings

    space = _space(tmp_path)
    settings = _settings(str(DEMO), str(space), TINY, "map_at_r", 0, 0, True, None)
    _check_space(settings, load_space(space))
    assert settings.metric == "map@r"
    assert ["eval.select_metric", "map@r"] in settings.fixed


def _wait_for(path: Path, at_least: int, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    """Poll until the run folder ``path`` has a checkpoint >= ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = path / "last"
        if last.is_symlink() and int(os.readlink(last).rsplit("-", 1)[1]) >= at_least:
            return
        if proc.poll() is not None:
            pytest.fail("tune ended early: " + proc.stderr.read().decode())
        time.sleep(0.01)
    pytest.fail(f"no checkpoint >= {at_least} in {path}")


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_or_killed_tune_resumes_without_repeating_finished_trials(
    tmp_path, signum
) -> None:
    """Trial 0 finishes; trial 1 is stopped (SIGTERM: exit 75 after a checkpoint) or killed
    (SIGKILL: left RUNNING, its process gone). The same command again keeps trial 0 and
    continues trial 1's run from its checkpoint as a new trial of the same point."""
    out, space = tmp_path / "tune", _space(tmp_path)
    longer = ["--train.iterations=300", "--eval.every=100"]
    proc = subprocess.Popen(
        _tune_command(space, out, 2, *longer),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(out / "trials" / "0001", 20, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if signum == signal.SIGTERM:
        assert proc.returncode == EXIT_STOPPED, err.decode()
        assert b"run the same command again" in err and b"Traceback" not in err
    finished_0 = (out / "trials" / "0000" / "metrics.jsonl").read_bytes()
    stopped_at = int(os.readlink(out / "trials" / "0001" / "last").rsplit("-", 1)[1])

    tune(str(DEMO), str(space), trials=2, out=out, overrides=[*TINY, *longer])
    trials = {t.number: t for t in _trials(out)}
    assert trials[0].state.name == "COMPLETE"
    assert (out / "trials" / "0000" / "metrics.jsonl").read_bytes() == finished_0
    assert trials[1].state.name == "FAIL"
    assert trials[2].state.name == "COMPLETE" and trials[2].user_attrs["retry_of"] == 1
    assert trials[2].params == trials[1].params
    assert trials[2].user_attrs["run_dir"] == str(out / "trials" / "0001")
    log = (out / "trials" / "0001" / "train.log").read_text()
    assert "resum" in log and f"iteration {stopped_at}" in log, log[-2000:]
    assert not (out / "trials" / "0002").exists()
    assert len(trials) == 3


@pytest.mark.slow
@pytest.mark.parametrize("left_by", ["this process", "before a reboot", "a live process"])
def test_a_running_trial_of_a_dead_worker_is_failed_and_queued_again(tmp_path, left_by) -> None:
    """A RUNNING trial of this machine is abandoned when its pid is gone, is this process
    (which has not started one yet), or belongs to an earlier boot (pids are reused)."""
    import socket

    from deepmetric.tune.storage import boot_id, retry_abandoned

    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path}/s.db")
    trial = study.ask()
    trial.suggest_float("x", 0, 1)
    pid = os.getppid() if left_by == "a live process" else os.getpid()
    trial.set_user_attr("worker", f"{socket.gethostname()}:{pid}")
    trial.set_user_attr("boot", "an-earlier-boot" if left_by == "before a reboot" else boot_id())
    retry_abandoned(study)
    states = [t.state.name for t in study.get_trials()]
    if left_by == "a live process":
        assert states == ["RUNNING"]
    else:
        assert states == ["FAIL", "WAITING"]  # failed, and its point queued to resume


def test_two_workers_share_one_study_in_the_journal_file(tmp_path) -> None:
    out = tmp_path / "tune"
    _two_workers(_space(tmp_path), [out, out])
    trials = _trials(out)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5  # each worker stops once 4 are finished
    assert len({t.number for t in trials}) == len(trials)
    workers = {t.user_attrs["worker"] for t in complete}
    assert len(workers) == 2, workers  # both processes ran trials
    assert len({t.user_attrs["run_dir"] for t in complete}) == len(complete)
    points = {repr(sorted(t.params.items())) for t in trials}
    assert len(points) == len(trials)  # each worker samples with its own seed


def test_a_resumed_tune_draws_new_points(tmp_path) -> None:
    """The study's creator samples with --seed; a later process with a seed of its own (with
    --seed again, it would repeat the first random start-up points)."""
    out, space = tmp_path / "tune", _space(tmp_path)
    tune(str(DEMO), str(space), trials=1, out=out, overrides=TINY)
    tune(str(DEMO), str(space), trials=2, out=out, overrides=TINY)
    first, second = _trials(out)
    assert first.params != second.params
    tune(str(DEMO), str(space), trials=1, out=tmp_path / "again", overrides=TINY)
    assert _trials(tmp_path / "again")[0].params == first.params  # --seed: reproducible


def _two_workers(space: Path, outs: list[Path], *extra: str) -> None:
    """Two ``deepmetric tune`` processes started together, 4 trials wanted; both exit 0."""
    more = ["--train.iterations=60", "--eval.every=30", *extra]
    procs = [
        subprocess.Popen(
            _tune_command(space, out, 4, *more),
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for out in outs
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err.decode()


def _postgres_url() -> str:
    url = os.environ.get("DEEPMETRIC_TEST_POSTGRES", "")
    if not url:
        pytest.skip(
            "no PostgreSQL server given: set DEEPMETRIC_TEST_POSTGRES to a database URL, e.g. "
            "after `apt-get install postgresql && service postgresql start && su postgres -c "
            "'createuser -s root' && createdb deepmetric`: "
            "DEEPMETRIC_TEST_POSTGRES='postgresql+psycopg2:///deepmetric?host=/var/run/postgresql'"
            " (.ci/run does this)"
        )
    return url


@pytest.mark.slow
def test_two_workers_share_one_study_in_postgresql(tmp_path) -> None:
    url = _postgres_url()
    name = f"test-{uuid.uuid4().hex[:8]}"
    outs = [tmp_path / "worker0", tmp_path / "worker1"]  # e.g. two machines
    _two_workers(_space(tmp_path), outs, "--storage", url, "--study", name)
    study = optuna.load_study(study_name=name, storage=url)
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    for i in range(2):  # each worker wrote the results of the whole study
        assert (tmp_path / f"worker{i}" / "best.yaml").is_file()
    optuna.delete_study(study_name=name, storage=url)


def test_an_unreachable_storage_is_a_one_line_error(tmp_path, capsys) -> None:
    url = f"postgresql+psycopg2://nobody@/none?host={tmp_path}"  # no server on that socket
    code = main(_tune_argv(_space(tmp_path), tmp_path / "o", 1, "--storage", url))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"--storage {url}" in err, err
    assert not (tmp_path / "o" / "tune.json").exists()  # the right URL may follow
    secret = f"postgresql+psycopg2://nobody:s3cret@/none?host={tmp_path}"
    assert main(_tune_argv(_space(tmp_path), tmp_path / "o", 1, "--storage", secret)) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "nobody:***@" in err, err


# --------------------------------------------------------------------------- compare


def test_mean_interval_is_the_student_t_interval() -> None:
    mean, half = mean_interval([0.80, 0.82, 0.87])
    s = np.std([0.80, 0.82, 0.87], ddof=1)
    assert mean == pytest.approx(0.83)
    assert half == pytest.approx(4.302652729911275 * s / math.sqrt(3))  # t_{0.975, 2}
    assert math.isnan(mean_interval([0.5])[1])


def test_compare_two_configs_writes_the_table_with_one_run_per_seed(tmp_path) -> None:
    other = tmp_path / "contrastive.yaml"
    other.write_text(DEMO.read_text().replace("name: multi_similarity", "name: contrastive"))
    out = tmp_path / "cmp"
    result = compare(
        [str(DEMO), str(other)], seeds=2, out=out, overrides=[*TINY, "--eval.protocol=val"]
    )
    runs = list(csv.DictReader(open(out / "runs.csv")))
    assert [(r["config"], r["seed"]) for r in runs] == [
        ("demo", "0"),
        ("demo", "1"),
        ("contrastive", "0"),
        ("contrastive", "1"),
    ]
    for r in runs:  # scored once, on the test split, with the best-on-validation checkpoint
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert float(r["map@r"]) == pytest.approx(summary["test_of_best"]["map@r"])
        assert r["scored_on"].startswith("test, best-on-val checkpoint")
        assert load_config(Path(r["run_dir"]) / "config.yaml").seed == int(r["seed"])
    rows = {r["config"]: r for r in result["rows"]}
    for name in ("demo", "contrastive"):
        mine = [float(r["recall@1"]) for r in runs if r["config"] == name]
        assert rows[name]["recall@1"] == pytest.approx(np.mean(mine))
        assert rows[name]["runs"] == 2
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == 2 and "| demo | 2 | 240 |" in table, table
    assert (out / "compare.png").stat().st_size > 5_000


def test_compare_starts_over_a_run_stopped_before_its_first_checkpoint(tmp_path) -> None:
    run_dir = tmp_path / "cmp" / "demo" / "seed-0"
    run_dir.mkdir(parents=True)  # what a run killed in its first iterations leaves
    (run_dir / "metrics.jsonl").write_text('{"iteration": 5, "loss": 1.0}\n')
    (run_dir / "config.yaml").write_text(DEMO.read_text())
    result = compare([str(DEMO)], seeds=1, out=tmp_path / "cmp", overrides=TINY)
    assert result["rows"][0]["runs"] == 1
    assert '"iteration": 5, "loss": 1.0' not in (run_dir / "metrics.jsonl").read_text()


def test_compare_refuses_configs_with_different_budgets(tmp_path, capsys) -> None:
    other = tmp_path / "short.yaml"
    other.write_text(DEMO.read_text().replace("iterations: 600", "iterations: 300"))
    code = main(["compare", "--configs", str(DEMO), str(other), "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "demo: 24,000 = 600 x 40, short: 12,000 = 300 x 40" in err, err
    assert "--train.iterations" in err


def test_compare_takes_one_budget_of_images_whatever_the_batch(tmp_path, monkeypatch) -> None:
    """Half the iterations with twice the batch is the same budget: compare goes on to train."""
    wide = tmp_path / "wide.yaml"
    text = DEMO.read_text().replace("iterations: 600", "iterations: 300")
    wide.write_text(text.replace("sampler: {p: 5, k: 8}", "sampler: {p: 5, k: 16}"))

    def reached(cfg, run_dir, preset):
        raise RuntimeError(f"training {preset}")

    monkeypatch.setattr(sys.modules["deepmetric.tune.compare"], "train_logged", reached)
    with pytest.raises(RuntimeError, match="training"):
        compare([str(DEMO), str(wide)], seeds=1, out=tmp_path / "c")
