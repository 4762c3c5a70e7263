"""Runs that lose nothing (issue 14): preemption by signal, damaged checkpoints, divergence,
a full disk, and the one-line error (exit 2) of every listed user mistake.

docs/reliability.md lists each fault injected here, what happens and what is kept, with the
test that checks it. Runs are the tiny digits set (16 x 16, Conv-4, 16-d, P x K = 5 x 2).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import deepmetric.engine.checkpoint as checkpoint_module
import deepmetric.engine.trainer as trainer_module
import tiny_runs
from deepmetric.cli import main
from deepmetric.config import ConfigError, load_config
from deepmetric.engine import load_checkpoint, save_checkpoint, train
from deepmetric.engine.checkpoint import CheckpointError, list_checkpoints
from deepmetric.engine.divergence import NonFiniteStep, TrainingDiverged, check_step
from deepmetric.engine.preemption import EXIT_STOPPED, StopSignals
from deepmetric.engine.run_folder import set_aside_newer_checkpoints

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DEMO = ROOT / "configs" / "demo.yaml"
TINY = [
    *tiny_runs.TINY,
    "--train.log_every=5",
    "--train.checkpoint_every=10",
    "--eval.at_start=false",
    "--eval.every=0",
    "--eval.batch_size=512",
    "--schedule.name=step",
    "--schedule.step_size=25",
    "--schedule.warmup_iterations=5",
]
# the state that must survive: margin loss (learnable beta, sampling generator), XBM memory
STATEFUL = ["--loss.name=margin", "--xbm.enabled=true", "--xbm.size=50", "--xbm.start_iteration=5"]


def run(out: Path, *extra: str) -> dict:
    """Train in this process (the tiny run, ``extra`` overrides)."""
    return train(load_config(DEMO, [*TINY, f"--output.dir={out}", *extra]), config_name=str(DEMO))


def cli_train(out: Path, *extra: str) -> int:
    """``deepmetric train`` in this process; returns the exit status."""
    return main(["train", "--config", str(DEMO), *TINY, f"--output.dir={out}", *extra])


def one_line_error(capsys) -> str:
    """The single stderr line of a user error (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("deepmetric: error: ") and "Traceback" not in err, err
    return err


def assert_same_state(a: Path, b: Path) -> None:
    """The ``last`` checkpoints of two runs hold the same weights, optimizer moments, loss
    state (memory, beta, generator) and counters, bit for bit."""
    wa, sa, _ = load_checkpoint(a / "last", ())
    wb, sb, _ = load_checkpoint(b / "last", ())
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    for key in ("iteration", "epoch", "batch_in_epoch"):
        assert sa[key] == sb[key], key
    for k, v in sa["criterion"].items():
        other = sb["criterion"][k]
        if isinstance(v, dict):  # the margin loss's sampling generator
            assert torch.equal(v["generator"], other["generator"]), k
        else:
            assert torch.equal(v, other), k
    for i, moments in sa["optimizer"]["state"].items():
        for k, v in moments.items():
            assert torch.equal(v, sb["optimizer"]["state"][i][k]), (i, k)


def all_finite(ckpt: Path) -> bool:
    weights, state, _ = load_checkpoint(ckpt, ())
    tensors = list(weights.values()) + [
        v for moments in state["optimizer"]["state"].values() for v in moments.values()
    ]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def training_iterations(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if '"loss"' in line]


@pytest.fixture(scope="module")
def straight_40(tmp_path_factory) -> Path:
    """An uninterrupted 40-iteration run, the reference of the resume tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    n = torch.get_num_threads()
    run(out, "--train.iterations=40", *STATEFUL)
    torch.set_num_threads(n)
    return out


def _signal_during_step(monkeypatch, step: int, signum: int) -> None:
    """Deliver ``signum`` to this process in the middle of training step ``step`` (the call
    of ``train_step``), as a scheduler would."""
    original, calls = trainer_module.train_step, [0]

    def train_step(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", train_step)


# ------------------------------------------------------------------ preemption


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_bit_exact(
    tmp_path: Path, straight_40: Path, monkeypatch, capsys
) -> None:
    stopped = tmp_path / "stopped"
    handler_before = signal.getsignal(signal.SIGTERM)
    _signal_during_step(monkeypatch, 17, signal.SIGTERM)
    assert cli_train(stopped, "--train.iterations=40", *STATEFUL) == EXIT_STOPPED == 75
    out = capsys.readouterr().out
    ckpt = stopped / "checkpoints" / "iter-0000017"
    assert f"stopped by SIGTERM after iteration 17: checkpoint {ckpt}" in out
    assert os.readlink(stopped / "last") == "checkpoints/iter-0000017"
    assert signal.getsignal(signal.SIGTERM) is handler_before  # handlers restored
    assert not (stopped / "summary.json").exists()  # the run is not finished
    monkeypatch.undo()

    summary = run(stopped, "--train.iterations=40", "--train.resume=auto", *STATEFUL)
    assert summary["iteration"] == 40
    assert_same_state(straight_40, stopped)
    its = training_iterations(stopped)
    assert its == sorted(set(its)) and its[-1] == 40


def test_stop_signals_are_latched_and_restored() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    with StopSignals() as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal changes nothing
        assert stop.requested() == "SIGUSR1"
    assert {s: signal.getsignal(s) for s in before} == before


def _cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepmetric", "train", "--config", str(DEMO), *TINY, *args]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    return env


def _wait_for_checkpoint(run_dir: Path, at_least: int, procs: list, timeout_s: float) -> None:
    """Poll until ``run_dir/last`` names an iteration >= ``at_least``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        last = run_dir / "last"
        if last.is_symlink() and int(os.readlink(last).rsplit("-", 1)[1]) >= at_least:
            return
        if any(p.poll() is not None for p in procs):
            pytest.fail("training ended before the signal: " + procs[0].stderr.read().decode())
        time.sleep(0.005)
    pytest.fail(f"no checkpoint >= {at_least} within {timeout_s} s")


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_with_loader_workers(tmp_path: Path) -> None:
    """SIGINT to the whole process group (Ctrl-C in a terminal: the DataLoader workers get it
    too): exit 75 after a checkpoint, no traceback; resuming gives the uninterrupted run."""
    args = ["--train.iterations=200", "--data.num_workers=2", *STATEFUL]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(
        _cli_command(*args, f"--output.dir={stopped}"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        _wait_for_checkpoint(stopped, 20, [proc], timeout_s=120)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == EXIT_STOPPED, err.decode()
    assert b"Traceback" not in err
    at = int(os.readlink(stopped / "last").rsplit("-", 1)[1])
    assert 20 <= at < 200
    assert f"stopped by SIGINT after iteration {at}: checkpoint".encode() in out

    run(stopped, *args, "--train.resume=auto", "--data.num_workers=0")
    run(tmp_path / "straight", *args, "--data.num_workers=0")
    assert_same_state(tmp_path / "straight", stopped)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_ranks(run_dir: Path, *args: str, world: int = 2) -> list[subprocess.Popen]:
    """``deepmetric train`` in ``world`` processes with torchrun's environment (gloo, CPU)."""
    port = str(_free_port())
    return [
        subprocess.Popen(
            _cli_command(*args, f"--output.dir={run_dir}"),
            env=_env(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK=str(rank),
                LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
                CUDA_VISIBLE_DEVICES="",
                OMP_NUM_THREADS="1",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for rank in range(world)
    ]


def _finish(procs: list[subprocess.Popen], timeout_s: float = 180) -> list[tuple[int, str]]:
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout_s)
            results.append((p.returncode, out.decode() + err.decode()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


@pytest.mark.slow
def test_sigterm_to_one_rank_of_two_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """2 processes (gloo): SIGTERM reaches rank 1 only; both ranks stop after the same step
    (rank 0 writes that checkpoint), exit 75; resumed, the run equals an uninterrupted one
    bit for bit."""
    args = ["--train.iterations=150", *STATEFUL, "--xbm.size=100"]
    stopped, straight = tmp_path / "stopped", tmp_path / "straight"
    reference = _launch_ranks(straight, *args)  # runs alongside
    procs = _launch_ranks(stopped, *args)
    try:
        _wait_for_checkpoint(stopped, 20, procs, timeout_s=120)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        results = _finish(procs)
    for rank, (rc, output) in enumerate(results):
        assert rc == EXIT_STOPPED, f"rank {rank}:\n{output}"
    at = int(os.readlink(stopped / "last").rsplit("-", 1)[1])
    assert 20 <= at < 150
    assert f"stopped by SIGTERM after iteration {at}: checkpoint" in results[0][1]
    assert all(rc == 0 for rc, _ in _finish(reference))

    resumed = _finish(_launch_ranks(stopped, *args, "--train.resume=auto"))
    for rank, (rc, output) in enumerate(resumed):
        assert rc == 0, f"rank {rank}:\n{output}"
    assert f"resumed from {stopped / 'checkpoints' / f'iter-{at:07d}'}" in resumed[0][1]
    assert_same_state(straight, stopped)


# ------------------------------------------------------------------ checkpoints you can trust


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGES = {
    "truncated model": ("model.safetensors", _truncate),
    "bit flipped in model": ("model.safetensors", _flip_a_bit),
    "bit flipped in state": ("state.pt", _flip_a_bit),
    "empty model": ("model.safetensors", _empty),
    "dangling last": (None, None),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_to_the_newest_good_checkpoint(
    tmp_path: Path, straight_40: Path, damage: str, capsys
) -> None:
    out = tmp_path / "run"
    run(out, "--train.iterations=30", "--train.keep_last=3", *STATEFUL)
    newest = out / "checkpoints" / "iter-0000030"
    name, spoil = DAMAGES[damage]
    if spoil is None:
        shutil.rmtree(newest)  # "last" now points at nothing
    else:
        spoil(newest / name)
    capsys.readouterr()

    run(out, "--train.iterations=40", "--train.resume=auto", *STATEFUL)
    printed = capsys.readouterr().out
    assert f"resumed from {out / 'checkpoints' / 'iter-0000020'} at iteration 20" in printed
    if spoil is not None:
        assert f"skipping a damaged checkpoint: {newest / name}:" in printed
        assert (out / "checkpoints" / "superseded-iter-0000030" / name).is_file()  # kept aside
    assert_same_state(straight_40, out)  # continued from 20: the uninterrupted run
    assert training_iterations(out) == list(range(5, 41, 5))


def test_a_run_without_a_usable_checkpoint_is_an_error_not_a_restart(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run(out, "--train.iterations=10")
    metrics = (out / "metrics.jsonl").read_text()
    _truncate(out / "checkpoints" / "iter-0000010" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"holds a run .* but no usable checkpoint .*bytes"):
        run(out, "--train.iterations=20", "--train.resume=auto")
    shutil.rmtree(out / "checkpoints")  # metrics and a dangling "last" only
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        run(out, "--train.iterations=20", "--train.resume=auto")
    (out / "last").unlink()  # metrics only
    with pytest.raises(ConfigError, match=r"already holds a run \(metrics.jsonl\)"):
        run(out, "--train.iterations=20")
    assert (out / "metrics.jsonl").read_text() == metrics  # nothing appended


def test_checkpoints_carry_a_manifest_and_the_last_n_plus_best_are_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for it in range(1, 6):
        links = ("last", "best") if it == 2 else ("last",)
        save_checkpoint(run_dir, it, {"w": torch.full((3,), float(it))}, {"it": it}, "", links)
    names = [p.name for p in list_checkpoints(run_dir)]
    assert names == ["iter-0000005", "iter-0000004", "iter-0000002"]  # keep_last=2 + best
    manifest = json.loads((run_dir / "last" / "manifest.json").read_text())
    assert manifest["iteration"] == 5
    assert set(manifest["files"]) == {"model.safetensors", "state.pt", "config.yaml"}
    _flip_a_bit(run_dir / "best" / "state.pt")
    with pytest.raises(CheckpointError, match=r"iter-0000002/state.pt: content differs"):
        load_checkpoint(run_dir, ("best",))
    assert load_checkpoint(run_dir, ("best",), state=False)[0]["w"][0] == 2  # weights fine


def test_checkpoints_after_the_resumed_one_are_set_aside_and_links_repaired(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    for it, links in ((1, ("last", "best")), (2, ("last",)), (3, ("last", "best"))):
        save_checkpoint(run_dir, it, {"w": torch.ones(1)}, {}, "", links, keep_last=3)
    set_aside_newer_checkpoints(run_dir, 2, best_iteration=1)  # resumed from 2, best at 1
    assert [p.name for p in list_checkpoints(run_dir)] == ["iter-0000002", "iter-0000001"]
    assert (run_dir / "checkpoints" / "superseded-iter-0000003" / "manifest.json").is_file()
    assert os.readlink(run_dir / "last") == "checkpoints/iter-0000002"
    assert os.readlink(run_dir / "best") == "checkpoints/iter-0000001"
    save_checkpoint(run_dir, 3, {"w": torch.ones(1)}, {}, "", ("last", "best_test_selected"))
    (run_dir / "checkpoints" / "iter-0000003").rename(run_dir / "checkpoints" / "x")
    set_aside_newer_checkpoints(run_dir, 2)  # no best known: a dangling best link goes
    assert not (run_dir / "best_test_selected").is_symlink()


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    save_checkpoint(run_dir, 1, {"w": torch.ones(3)}, {"it": 1}, "seed: 0\n")

    def disk_full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_module, "_write_file", disk_full)
    with pytest.raises(CheckpointError) as caught:
        save_checkpoint(run_dir, 2, {"w": torch.zeros(3)}, {"it": 2}, "seed: 0\n")
    message = str(caught.value)
    assert "iter-0000002 (No space left on device while writing model.safetensors)" in message
    assert (
        f"the previous checkpoint {run_dir.resolve() / 'checkpoints' / 'iter-0000001'}" in message
    )
    monkeypatch.undo()
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["iter-0000001"]  # no temp
    weights, state, _ = load_checkpoint(run_dir, ("last",))
    assert state["it"] == 1 and torch.equal(weights["w"], torch.ones(3))


# ------------------------------------------------------------------ divergence guard


def _inject_during_step(monkeypatch, steps: set[int], inject) -> dict[int, dict]:
    """Call ``inject(model, criterion)`` (returning a criterion to use, or None) in training
    steps ``steps``; returns the model's weights and buffers at the start of every step."""
    original, calls, states = trainer_module.train_step, [0], {}

    def train_step(model, criterion, *args, **kwargs):
        calls[0] += 1
        states[calls[0]] = {k: v.clone() for k, v in model.state_dict().items()}
        if calls[0] in steps:
            criterion = inject(model, criterion) or criterion
        return original(model, criterion, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", train_step)
    return states


class _NaNLoss(nn.Module):
    def __init__(self, criterion: nn.Module) -> None:
        super().__init__()
        self.criterion = criterion

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(emb, labels) * float("nan")


def _nan_loss(model: nn.Module, criterion: nn.Module) -> nn.Module:
    return _NaNLoss(criterion)


def _nan_bn_statistics(model: nn.Module, criterion: nn.Module) -> None:
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_var[0] = float("inf")  # as a forward with an overflowing batch would leave it


def test_nan_loss_stops_naming_the_iteration_and_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    _inject_during_step(monkeypatch, {14}, _nan_loss)
    with pytest.raises(TrainingDiverged) as caught:
        run(out, "--train.iterations=30")
    good = out / "checkpoints" / "iter-0000010"
    assert str(caught.value).startswith(
        f"training diverged at iteration 14: the loss is nan; last good checkpoint: {good}"
    )
    assert [p.name for p in list_checkpoints(out)] == ["iter-0000010"] and all_finite(good)


def test_nonfinite_batchnorm_statistics_never_reach_a_checkpoint(
    tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    _inject_during_step(monkeypatch, {13}, _nan_bn_statistics)
    with pytest.raises(TrainingDiverged, match=r"iteration 20: model .*running_var holds NaN"):
        run(out, "--train.iterations=30")
    assert [p.name for p in list_checkpoints(out)] == ["iter-0000010"]
    assert all_finite(out / "last")


def test_check_step_reads_the_loss_and_the_gradient_norm() -> None:
    weight = nn.Parameter(torch.ones(3))
    weight.grad = torch.tensor([0.0, float("inf"), 1.0])
    check_step(torch.tensor(0.5), [weight], gradients=False)  # fp16: the GradScaler's job
    with pytest.raises(NonFiniteStep, match=r"^the gradient norm is inf \(loss 0.5\)$"):
        check_step(torch.tensor(0.5), [weight])
    weight.grad = torch.zeros(3)
    check_step(torch.tensor(0.5), [weight, nn.Parameter(torch.ones(2))])  # no grad: skipped
    with pytest.raises(NonFiniteStep, match=r"^the loss is nan$"):
        check_step(torch.tensor(float("nan")), [weight])


def test_skip_mode_drops_nonfinite_steps_and_stops_after_n_in_a_row(
    tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "run"
    states = _inject_during_step(monkeypatch, {7, 12}, _nan_loss)
    summary = run(out, "--train.iterations=20", "--train.on_nonfinite=skip")
    assert summary["iteration"] == 20 and all_finite(out / "last")
    for step in (7, 12):  # nothing updated, the forward's BatchNorm statistics put back
        for k, v in states[step].items():
            assert torch.equal(v, states[step + 1][k]), (step, k)
    assert not torch.equal(states[8]["head.fc.weight"], states[9]["head.fc.weight"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [e["iteration"] for e in events if e.get("event") == "nonfinite_step_skipped"]
    assert skipped == [7, 12]

    monkeypatch.undo()
    _inject_during_step(monkeypatch, set(range(15, 100)), _nan_loss)
    with pytest.raises(TrainingDiverged, match=r"iteration 17: .* 3 steps in a row"):
        run(
            tmp_path / "again",
            "--train.iterations=30",
            "--train.on_nonfinite=skip",
            "--train.max_nonfinite_in_row=3",
        )


# ------------------------------------------------------------------ one line, exit 2


def test_mistake_sampler_p_above_the_number_of_classes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli_train(out, "--sampler.p=6", "--sampler.k=8") == 2
    assert one_line_error(capsys) == (
        "deepmetric: error: --sampler.p=6 but the training split of data.name=digits has 5 "
        "classes; lower --sampler.p (at most --sampler.p=5)"
    )
    assert not out.exists()
    assert cli_train(out, "--sampler.p=5", "--sampler.k=500", "--sampler.small_classes=skip") == 2
    assert "has 0 classes with at least k=500 images" in one_line_error(capsys)


def _image_folder(root: Path, classes: int, sizes=(20,), per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                side = sizes[i % len(sizes)]
                pixels = rng.integers(0, 255, (side, side), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("protocol", ["test", "val"])
def test_mistake_data_set_with_one_class(tmp_path: Path, protocol: str, capsys) -> None:
    data = _image_folder(tmp_path / "one", classes=1)
    out = tmp_path / "run"
    rc = cli_train(
        out,
        "--data.name=folder",
        f"--data.root={data}",
        "--sampler.p=1",
        f"--eval.protocol={protocol}",
    )
    assert rc == 2
    assert one_line_error(capsys) == (
        f"deepmetric: error: the training split of data.name=folder at {data} has 1 class; "
        "metric learning needs at least 2 (images of another class are the negatives): use a "
        "data set with more classes"
    )
    assert not out.exists()


def test_mistake_diverging_learning_rate(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli_train(out, "--optim.lr=1e9", "--train.iterations=30") == 2
    err = one_line_error(capsys)
    assert "training diverged at iteration" in err and "--optim.lr (now 1e+09)" in err
    assert "last good checkpoint" in err or "no checkpoint was written" in err
    for ckpt in list_checkpoints(out) if out.exists() else []:
        assert all_finite(ckpt)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "run"
    n = torch.get_num_threads()
    run(out, "--train.iterations=20")
    torch.set_num_threads(n)
    return out


@pytest.mark.parametrize("damage", ["truncated model", "bit flipped in model", "empty model"])
def test_mistake_damaged_checkpoint_in_eval(
    tmp_path: Path, trained: Path, damage: str, capsys
) -> None:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, symlinks=True)
    name, spoil = DAMAGES[damage]
    spoil(copy / "checkpoints" / "iter-0000020" / name)
    assert main(["eval", "--checkpoint", str(copy / "last")]) == 2
    err = one_line_error(capsys)
    assert f"{copy.resolve() / 'checkpoints' / 'iter-0000020' / name}:" in err
    assert err.endswith(f"other checkpoints of the run: {copy.resolve()}/checkpoints/iter-0000010")


def test_mistake_disk_full_while_saving(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "run"
    write = checkpoint_module._write_file

    def full_at_20(path: Path, data: bytes) -> None:
        if "iter-0000020" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(checkpoint_module, "_write_file", full_at_20)
    assert cli_train(out, "--train.iterations=30") == 2
    err = one_line_error(capsys)
    assert "could not write checkpoint" in err and "No space left on device" in err
    assert f"the previous checkpoint {out.resolve() / 'checkpoints' / 'iter-0000010'}" in err
    assert load_checkpoint(out, ("last",))[1]["iteration"] == 10  # loadable
    monkeypatch.undo()
    assert cli_train(out, "--train.iterations=30", "--train.resume=auto") == 0


def test_mistake_images_of_different_sizes(tmp_path: Path, capsys) -> None:
    data = _image_folder(tmp_path / "mixed", classes=3, sizes=(24, 20))
    out = tmp_path / "run"
    rc = cli_train(
        out,
        "--data.name=folder",
        f"--data.root={data}",
        "--data.transform_options={}",
        "--sampler.p=3",
    )
    assert rc == 2
    error = one_line_error(capsys)  # found before training, naming the files
    assert error.startswith(
        f"deepmetric: error: images of different sizes in the train split of data.name=folder "
        f"at {data} ("
    ), error
    assert "6 of 12 differ from the most common size" in error
    assert error.endswith(
        "set --data.transform_options.size (e.g. --data.transform_options.size=24) to resize "
        "every image to that square"
    ), error
    assert not out.exists()


def test_mistake_unknown_data_set_name_in_datasets_check(capsys) -> None:
    assert main(["datasets", "check", "--dataset", "cubb"]) == 2
    assert one_line_error(capsys).startswith(
        "deepmetric: error: --dataset cubb: unknown data set 'cubb' (did you mean 'cub'?); "
        "use one of cub, cars196, sop"
    )


def test_embed_out_folder_writes_into_it(trained: Path, tmp_path: Path, capsys) -> None:
    images = _image_folder(tmp_path / "images", classes=1, sizes=(16,), per_class=3) / "test"
    folder = tmp_path / "emb"
    folder.mkdir()
    argv = ["embed", "--checkpoint", str(trained), "--images", str(images), "--out", str(folder)]
    assert main(argv) == 0
    assert np.load(folder / "embeddings.npy").shape == (3, 16)
    assert len((folder / "embeddings.txt").read_text().splitlines()) == 3
    assert not (tmp_path / "emb.npy").exists()
