"""User mistakes told in one line with exit status 2, and presets that adapt to small data:
an unwritable run folder, numbers outside their domain, a loss hyper-parameter of the wrong
type, a resume past the iteration budget, the folder preset on a folder of few classes."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiny_runs
from deepmetric.cli import main
from deepmetric.config import ConfigError, load_config
from tiny_runs import DEMO, FOLDER, ROOT

TINY = [
    *tiny_runs.TINY,
    "--train.checkpoint_every=5",
    "--eval.at_start=false",
    "--eval.every=0",
    "--eval.batch_size=512",
    "--output.plots=false",
]


def cli_train(*extra: str, config: Path = DEMO, tiny: list[str] = TINY) -> int:
    return main(["train", "--config", str(config), *tiny, *extra])


def one_line_error(capsys) -> str:
    """The single stderr line of a user error (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("deepmetric: error: ") and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ unwritable run folder


def _never_trains(monkeypatch) -> None:
    """The run folder is checked before any data is read."""
    import deepmetric.engine.trainer as trainer_module

    def fail(*args, **kwargs):
        raise AssertionError("data were built before the run folder was checked")

    monkeypatch.setattr(trainer_module, "build_data", fail)


def test_unwritable_output_dir_is_one_line_before_training(monkeypatch, capsys) -> None:
    _never_trains(monkeypatch)
    assert cli_train("--output.dir", "/proc/deepmetric-run") == 2
    assert one_line_error(capsys) == (
        "deepmetric: error: --output.dir: cannot write /proc/deepmetric-run (no such file or "
        "directory): choose a writable folder with --output.dir"
    )


def test_read_only_working_directory_and_output_folder(tmp_path: Path, monkeypatch, capsys) -> None:
    """A read-only mount: chmod 0o555 (which root ignores), and writes refused for real by
    a file system that raises EROFS under ``ro``."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    mkdir, write_bytes = Path.mkdir, Path.write_bytes

    def refuse(path: Path) -> None:
        if ro in path.absolute().parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(Path, "mkdir", lambda p, *a, **k: refuse(p) or mkdir(p, *a, **k))
    monkeypatch.setattr(Path, "write_bytes", lambda p, d: refuse(p) or write_bytes(p, d))
    _never_trains(monkeypatch)
    monkeypatch.chdir(ro)  # the default runs/<config>-<time> in a read-only folder
    assert cli_train() == 2
    err = one_line_error(capsys)
    assert err.startswith("deepmetric: error: output.dir (null: a new folder under runs/): ")
    assert "cannot write runs/demo-" in err
    assert err.endswith("(read-only file system): choose a writable folder with --output.dir")
    assert cli_train("--output.dir", str(ro / "run")) == 2
    assert one_line_error(capsys) == (
        f"deepmetric: error: --output.dir: cannot write {ro / 'run'} (read-only file system): "
        "choose a writable folder with --output.dir"
    )
    ro.chmod(0o755)


def test_read_only_file_system_elsewhere_is_one_line(monkeypatch, capsys) -> None:
    import deepmetric.engine

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run/metrics.jsonl")

    monkeypatch.setattr(deepmetric.engine, "train", read_only)
    assert main(["train", "--config", str(DEMO)]) == 2
    assert one_line_error(capsys) == (
        "deepmetric: error: cannot write /mnt/ro/run/metrics.jsonl (read-only file system): "
        "choose a writable folder (--output.dir, --out)"
    )


# ------------------------------------------------------------------ numeric domains


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.embedding_dim=-4", "model.embedding_dim: expected >= 1, got -4"),
        ("--eval.batch_size=0", "eval.batch_size: expected >= 1, got 0"),
        ("--optim.weight_decay=-0.1", "optim.weight_decay: expected >= 0, got -0.1"),
        ("--optim.momentum=1.0", "optim.momentum: expected in [0, 1), got 1.0"),
        ("--optim.betas=[0.9, 1.5]", "optim.betas: expected each in [0, 1), got [0.9, 1.5]"),
        ("--optim.eps=0", "optim.eps: expected > 0, got 0.0"),
        ("--optim.grad_clip=-1", "optim.grad_clip: expected >= 0, got -1.0"),
        ("--xbm.weight=-1", "xbm.weight: expected >= 0, got -1.0"),
        ("--schedule.gamma=0", "schedule.gamma: expected > 0, got 0.0"),
        ("--schedule.min_factor=1.5", "schedule.min_factor: expected in [0, 1], got 1.5"),
        ("--schedule.warmup_iterations=-5", "schedule.warmup_iterations: expected >= 0, got -5"),
        ("--schedule.warmup_start_factor=0", "expected in (0, 1], got 0.0"),
        ("--train.threads=0", "train.threads: expected >= 1 (or null), got 0"),
        ("--optim.backbone_lr=-1e-4", "optim.backbone_lr: expected >= 0 (or null), got -0.0001"),
        ("--seed=-1", "seed: expected >= 0, got -1"),
    ],
)
def test_numbers_outside_their_domain_are_refused_at_load(override: str, message: str) -> None:
    key = override[2:].split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, [override])
    assert str(e.value).startswith(f"command line (--{key}): ")
    assert message in str(e.value)


def test_number_outside_its_domain_in_a_file_names_the_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: {embedding_dim: 0}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: model.embedding_dim: expected >= 1, got 0$"):
        load_config(path)
    assert main(["train", "--config", str(DEMO), "--model.embedding_dim=-4"]) == 2
    assert one_line_error(capsys) == (
        "deepmetric: error: command line (--model.embedding_dim): model.embedding_dim: "
        "expected >= 1, got -4"
    )


# ------------------------------------------------------------------ loss hyper-parameters


def test_loss_hyper_parameter_of_the_wrong_type_names_key_source_and_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, ["--loss.alpha=abc"])
    assert str(e.value) == (
        "command line (--loss.alpha): loss.alpha (multi_similarity): expected a number, "
        "got 'abc' (str)"
    )
    path = tmp_path / "run.yaml"
    path.write_text("loss: {name: triplet, squared: maybe}\n")
    with pytest.raises(ConfigError, match=rf"^{path}: loss.squared \(triplet\): expected true"):
        load_config(path)
    # a value the loss rejects: where its key was set (the command line, not the preset)
    with pytest.raises(ConfigError, match=r"^command line \(--loss.form\): loss \(contrastive\)"):
        load_config(DEMO, ["--loss.name=contrastive", "--loss.form=cosine"])


# ------------------------------------------------------------------ resume past the budget


def test_resume_below_the_checkpoint_iteration_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli_train("--train.iterations=10", f"--output.dir={out}") == 0
    capsys.readouterr()
    metrics = (out / "metrics.jsonl").read_text()
    argv = ("--train.resume=auto", f"--output.dir={out}")
    assert cli_train("--train.iterations=5", *argv) == 2
    ckpt = out.resolve() / "checkpoints" / "iter-0000010"
    assert one_line_error(capsys) == (
        f"deepmetric: error: --train.iterations=5 is below the iteration of the checkpoint "
        f"resumed from ({ckpt}: iteration 10): set --train.iterations=10 to evaluate it as it "
        "is, or more to train on"
    )
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing changed
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "iter-0000005",
        "iter-0000010",
    ]
    # at exactly the checkpoint's iteration: evaluated and reported
    assert cli_train("--train.iterations=10", *argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iteration"] == 10 and "recall@1" in summary["final"]


# ------------------------------------------------------------------ folder preset, few classes


def _flat_folder(root: Path, classes: int, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (16, 16), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


# the folder preset with a network small enough for a test; sampler.p stays the preset's
SMALL_NET = [
    "--model.backbone=conv4",
    "--model.pretrained=null",
    "--model.embedding_dim=16",
    "--model.options={in_chans: 1}",
    "--data.transform=small",
    "--data.transform_options={size: 16}",
    "--data.num_workers=0",
    "--train.iterations=2",
    "--train.progress=false",
    "--train.threads=1",
    "--eval.at_start=false",
    "--output.report=false",
    "--output.plots=false",
]


def test_folder_preset_adapts_p_to_a_folder_of_few_classes(tmp_path: Path, capsys) -> None:
    photos = _flat_folder(tmp_path / "photos", classes=4)  # 2 training, 2 test classes
    out = tmp_path / "run"
    argv = (f"--data.root={photos}", f"--output.dir={out}")
    assert cli_train(*argv, config=FOLDER, tiny=SMALL_NET) == 0
    captured = capsys.readouterr()
    assert "sampler.p 8 -> 2: the training split has 2 classes" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iteration"] == 2 and "recall@1" in summary["final"]
    assert load_config(out / "config.yaml").sampler.p == 2  # the run records what it used
    # set on the command line: still refused
    again = (f"--data.root={photos}", f"--output.dir={tmp_path / 'again'}", "--sampler.p=8")
    assert cli_train(*again, config=FOLDER, tiny=SMALL_NET) == 2
    assert one_line_error(capsys).startswith(
        f"deepmetric: error: --sampler.p=8 but the training split of data.name=folder at "
        f"{photos} has 2 classes; lower --sampler.p (at most --sampler.p=2)"
    )


# ------------------------------------------------------------------ a preset's data path


@pytest.mark.parametrize("preset", ["omniglot.yaml", "omniglot_multi_similarity.yaml"])
def test_a_presets_missing_data_file_names_the_key_and_where_the_data_comes_from(
    preset: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The Omniglot presets read a file outside the repository (a relative path)."""
    monkeypatch.chdir(tmp_path)  # where ../shared/data/... is not
    config = ROOT / "configs" / preset
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), f"--output.dir={out}"]) == 2
    error = one_line_error(capsys)
    assert error.startswith(f"deepmetric: error: {config}: data.root: ../shared/data/"), error
    assert f"does not exist (from {tmp_path})" in error
    assert "npz reads an .npz file" in error and "images_background.npz (3.3 MB" in error
    assert "brendenlake/omniglot" in error and error.endswith("--data.root PATH")
    assert not out.exists()


def test_a_missing_root_on_the_command_line_says_so(tmp_path: Path, capsys) -> None:
    gone = tmp_path / "photos"
    assert cli_train("--data.name=folder", f"--data.root={gone}") == 2
    error = one_line_error(capsys)
    assert f"command line: data.root: {gone} does not exist; folder reads a folder" in error
