"""The ``deepmetric`` command: train, eval, embed, datasets check, --help; exit codes and
one-line errors without tracebacks for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_runs
from deepmetric.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
TINY = [
    *tiny_runs.TINY,
    "--train.iterations=6",
    "--eval.at_start=false",
    "--eval.batch_size=512",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    n = torch.get_num_threads()
    assert main(["train", "--config", DEMO, *TINY, "--output.dir", str(out)]) == 0
    torch.set_num_threads(n)
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def test_help(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "embed", "datasets"):
        assert command in out
    for argv in (
        ["train", "--help"],
        ["eval", "--help"],
        ["embed", "--help"],
        ["datasets", "check", "--help"],
    ):
        assert main(argv) == 0
        assert "usage: deepmetric" in capsys.readouterr().out
    assert main([]) == 2  # no command: help, usage status


def test_python_dash_m_help_and_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", "--help"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "embed" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", "--version"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and done.stdout.startswith("deepmetric ")


def test_train_prints_summary_and_writes_run(run_dir: Path, capsys) -> None:
    assert (run_dir / "last" / "model.safetensors").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").is_file()


def test_eval_prints_and_writes_json(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "metrics.json"
    assert (
        main(["eval", "--checkpoint", str(run_dir), "--out", str(out), "--eval.recall_at=[1, 2]"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "recall@1" in printed and str(out) in printed
    result = json.loads(out.read_text())
    assert result["split"] == "test" and result["iteration"] == 6
    assert set(result["metrics"]) >= {"recall@1", "recall@2", "map@r"}
    assert result["metrics"]["num_queries"] == 896
    # a run trained with the test protocol has no validation split: its classes were trained on
    assert main(["eval", "--checkpoint", str(run_dir / "last"), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "trained with eval.protocol=test, without a validation split" in err
    assert err.count("\n") == 1 and "--split test" in err
    assert not (run_dir / "eval-val-iter6.json").exists()


def test_eval_matches_training_evaluation(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(out.read_text())["metrics"]["recall@1"] == summary["final"]["recall@1"]


def _write_images(folder: Path, n: int) -> list[Path]:
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True)
    images = load_digits().images[:n]
    paths = []
    for i, img in enumerate(images):
        path = folder / f"sub{i % 2}" / f"img{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_embed_folder_and_list(run_dir: Path, tmp_path: Path, capsys) -> None:
    paths = _write_images(tmp_path / "imgs", 7)
    out = tmp_path / "emb.npy"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(run_dir),
                "--images",
                str(tmp_path / "imgs"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    emb = np.load(out)
    assert emb.shape == (7, 16) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    listed = (tmp_path / "emb.txt").read_text().splitlines()
    assert sorted(listed) == sorted(str(p) for p in paths) and listed == sorted(listed)
    # a list file (relative paths, optional labels), in its own order
    order = [paths[3], paths[0], paths[5]]
    (tmp_path / "list.txt").write_text(
        "".join(f"{p.relative_to(tmp_path)} {i}\n" for i, p in enumerate(order))
    )
    out2 = tmp_path / "emb2.npy"
    assert (
        main(
            [
                "embed",
                "--checkpoint",
                str(run_dir),
                "--images",
                str(tmp_path / "list.txt"),
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    emb2 = np.load(out2)
    np.testing.assert_allclose(emb2, emb[[listed.index(str(p)) for p in order]], atol=1e-6)
    assert "embedded 3 images" in capsys.readouterr().out


def test_datasets_check(tmp_path: Path, capsys) -> None:
    assert main(["datasets", "check", "--dataset", "digits"]) == 0
    assert "result: OK" in capsys.readouterr().out
    assert main(["datasets", "check", "--dataset", "cub", "--root", str(tmp_path)]) == 1
    assert "problem" in capsys.readouterr().out


def test_user_errors_exit_2_with_one_line(run_dir: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (["train", "--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["train", "--config", DEMO, "--optim.lrr=3"], "optim.lrr"),
        (["train", "--config", DEMO, "--loss.margn=3"], "loss.margn"),
        (
            ["train", "--config", DEMO, "--data.name=nope", "--output.dir", str(tmp_path / "r")],
            "unknown data set",
        ),
        (["eval", "--checkpoint", str(tmp_path / "nothing")], "checkpoint not found"),
        (
            [
                "embed",
                "--checkpoint",
                str(run_dir),
                "--images",
                str(tmp_path / "none"),
                "--out",
                str(tmp_path / "e.npy"),
            ],
            "no such folder or list file",
        ),
        (["train", "--config", DEMO, "--output.dir", str(run_dir)], "already holds a run"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("deepmetric: error:") and expected in err, (argv, err)
        assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_config_error_in_subprocess_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {iterations: ten}\n")
    done = subprocess.run(
        [sys.executable, "-m", "deepmetric", "train", "--config", str(bad)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"deepmetric: error: {bad}: train.iterations: expected an integer, got 'ten' (str)"
    ]


def test_internal_errors_show_traceback(monkeypatch, capsys) -> None:
    import deepmetric.engine

    def boom(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(deepmetric.engine, "train", boom)
    assert main(["train", "--config", DEMO]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err and "this is a bug" in err
