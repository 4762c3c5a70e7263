"""Training engine: schedules, parameter groups, atomic checkpoints, exact resume (a real
SIGKILL in the middle of a run, with cross-batch memory, 0 and 2 DataLoader workers)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_runs
from deepmetric.config import ConfigError, OptimConfig, ScheduleConfig, load_config
from deepmetric.engine import (
    TrainState,
    build_optimizer,
    evaluate_checkpoint,
    load_checkpoint,
    lr_factor,
    save_checkpoint,
    train,
)
from deepmetric.engine.checkpoint import find_checkpoint
from deepmetric.losses import build_loss
from deepmetric.models import build_model

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"

# A small, fast version of the demo: 16 x 16 digits, 16-d, batch 10 = 5 x 2, random affine
# augmentation on (so that per-sample augmentation seeds matter), one thread.
TINY = [
    *tiny_runs.TINY,
    "--train.log_every=5",
    "--eval.at_start=false",
    "--eval.every=0",
    "--eval.batch_size=512",
    "--schedule.name=step",
    "--schedule.step_size=25",
    "--schedule.warmup_iterations=5",
]
XBM = ["--xbm.enabled=true", "--xbm.size=50", "--xbm.start_iteration=10"]


def run_in_process(out: Path, *extra: str) -> dict:
    cfg = load_config(DEMO, [*TINY, f"--output.dir={out}", *extra])
    return train(cfg, config_name=str(DEMO))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last" / "model.safetensors"))


def assert_same_state(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    sa = load_checkpoint(a / "last", state=True)[1]
    sb = load_checkpoint(b / "last", state=True)[1]
    for key in ("iteration", "epoch", "batch_in_epoch"):  # (best differs: evaluated at the stop)
        assert sa[key] == sb[key], key
    # memory contents, pointer, fill level, loss parameters and the margin loss's generator
    assert sa["criterion"].keys() == sb["criterion"].keys()
    for k, v in sa["criterion"].items():
        if k.endswith("_extra_state"):
            assert torch.equal(v["generator"], sb["criterion"][k]["generator"]), k
        else:
            assert torch.equal(v, sb["criterion"][k]), k
    for i, st in sa["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sb["optimizer"]["state"][i][k]), (i, k)


# ------------------------------------------------------------------ schedules and optimizer


def test_lr_factor_schedules() -> None:
    step = ScheduleConfig(name="step", step_size=10, gamma=0.5)
    assert [lr_factor(i, step, 100) for i in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    multi = ScheduleConfig(name="multistep", milestones=[1200, 2400], gamma=0.1)
    assert lr_factor(1199, multi, 3000) == 1.0
    assert lr_factor(1200, multi, 3000) == pytest.approx(0.1)
    assert lr_factor(2999, multi, 3000) == pytest.approx(0.01)
    cos = ScheduleConfig(
        name="cosine", min_factor=0.1, warmup_iterations=10, warmup_start_factor=0.0
    )
    assert lr_factor(0, cos, 110) == 0.0
    assert lr_factor(5, cos, 110) == pytest.approx(0.5)
    assert lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(109, cos, 110) == pytest.approx(0.1)
    assert lr_factor(7, ScheduleConfig(name="none"), 10) == 1.0


def test_parameter_groups_have_real_learning_rates() -> None:
    model = build_model("conv4", embedding_dim=8, in_chans=1)
    loss = build_loss("margin")
    cfg = OptimConfig(
        name="sgd",
        lr=0.1,
        weight_decay=1e-4,
        backbone_lr=0.01,
        backbone_weight_decay=0.0,
        loss_lr=0.5,
    )
    opt = build_optimizer(cfg, model, loss)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "head", "loss"}
    assert (groups["backbone"]["lr"], groups["backbone"]["weight_decay"]) == (0.01, 0.0)
    assert (groups["head"]["lr"], groups["head"]["weight_decay"]) == (0.1, 1e-4)
    assert groups["loss"]["lr"] == 0.5 and groups["loss"]["weight_decay"] == 0.0
    assert groups["loss"]["params"][0] is loss.beta
    n_model = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(groups["backbone"]["params"]) + len(groups["head"]["params"]) == n_model
    # the learnable beta of the margin loss is actually trained
    before = loss.beta.detach().clone()
    emb = torch.nn.functional.normalize(model(torch.randn(12, 1, 16, 16)), dim=1)
    loss(emb, torch.arange(12) % 3).backward()
    opt.step()
    assert not torch.equal(before, loss.beta.detach())


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_roundtrip_and_crash_while_writing(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    w1 = {"a": torch.arange(4.0)}
    save_checkpoint(run, 1, w1, {"iteration": 1, "x": [1, 2.5, "s", None]}, "seed: 0\n")
    weights1, state1, text = load_checkpoint(run, ("last",))
    assert torch.equal(weights1["a"], w1["a"]) and state1["x"] == [1, 2.5, "s", None]
    assert text == "seed: 0\n"

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated crash while writing state.pt)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(run, 2, {"a": torch.zeros(4)}, {"iteration": 2}, "seed: 0\n")
    monkeypatch.undo()
    # the previous checkpoint is intact and still the one "last" points to
    weights_after, state_after, _ = load_checkpoint(run, ("last",))
    assert torch.equal(weights_after["a"], w1["a"]) and state_after["iteration"] == 1
    assert find_checkpoint(run, ("last",)).name == "iter-0000001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["iter-0000001"]
    # a process killed while writing leaves a temporary folder, invisible to readers ...
    (run / "checkpoints" / ".tmp-iter-0000002-99999").mkdir()
    assert find_checkpoint(run, ("last",)).name == "iter-0000001"
    save_checkpoint(
        run,
        3,
        {"a": torch.ones(4)},
        {"iteration": 3},
        "seed: 0\n",
        links=("last", "best"),
        keep_last=1,
    )
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["iter-0000003"]  # ... and is cleaned up by the next save (old one pruned)
    assert find_checkpoint(run, ("best",)).name == "iter-0000003"


def test_torch_load_weights_only_state(tmp_path: Path) -> None:
    """state.pt holds only what torch.load(weights_only=True) accepts (no pickled objects)."""
    out = tmp_path / "run"
    run_in_process(out, "--train.iterations=6", "--loss.name=margin", *XBM)
    state = torch.load(out / "last" / "state.pt", weights_only=True)
    assert set(state) == {*TrainState.OBJECTS, *TrainState.COUNTERS, "rng"}
    assert state["iteration"] == 6
    generator = state["criterion"]["loss._extra_state"]["generator"]  # margin loss sampler
    assert generator.dtype == torch.uint8 and generator.numel() > 0


# ------------------------------------------------------------------ end to end


def test_train_writes_run_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_in_process(
        out,
        "--train.iterations=40",
        "--eval.at_start=true",
        "--eval.every=20",
        "--train.checkpoint_every=20",
    )
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "recall.png", "summary.json"):
        assert (out / name).is_file(), name
    assert (out / "last").is_symlink() and (out / "best_test_selected").is_symlink()
    assert not (out / "best").exists()  # test protocol: no unlabelled "best"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("split") == "test"]
    assert [r["iteration"] for r in evals] == [0, 20, 40]
    assert {"recall@1", "recall@8", "map@r"} <= set(evals[0])
    train_records = [r for r in records if "loss" in r]
    assert [r["iteration"] for r in train_records] == list(range(5, 41, 5))
    assert all(r["images_per_s"] > 0 and r["num_active"] >= 0 for r in train_records)
    assert summary["start"]["recall@1"] == evals[0]["recall@1"]
    assert summary["final"]["recall@1"] == evals[-1]["recall@1"]
    # the resolved config re-loads to the same run
    again = load_config(out / "config.yaml")
    assert again.model.embedding_dim == 16 and again.sampler.p == 5
    # refusing to overwrite an existing run
    with pytest.raises(ConfigError, match="already holds a run"):
        run_in_process(out, "--train.iterations=40")


def test_val_protocol_selects_best_on_validation(tmp_path: Path) -> None:
    out = tmp_path / "run"
    summary = run_in_process(
        out,
        "--train.iterations=20",
        "--eval.every=10",
        "--eval.protocol=val",
        "--eval.val_fraction=0.4",
        "--sampler.p=3",
    )
    assert (out / "best").is_symlink() and not (out / "best_test_selected").exists()
    assert summary["best"]["split"] == "val"
    assert summary["test_of_best"]["num_queries"] == 896  # digits 5-9, the best checkpoint
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if r.get("split") == "val"] == [10, 20]
    val = next(r for r in records if r.get("split") == "val")
    assert val["num_queries"] < 901 * 0.5  # 2 of the 5 training classes


def test_resume_continues_exactly_in_process(tmp_path: Path) -> None:
    """Stop at 20 and resume to 40 == 40 straight (margin loss: learnable beta and its
    sampling generator; XBM; step schedule)."""
    args = ["--loss.name=margin", *XBM, "--train.checkpoint_every=10"]
    run_in_process(tmp_path / "straight", "--train.iterations=40", *args)
    run_in_process(tmp_path / "resumed", "--train.iterations=20", *args)
    summary = run_in_process(
        tmp_path / "resumed", "--train.iterations=40", "--train.resume=auto", *args
    )
    assert summary["iteration"] == 40
    assert_same_state(tmp_path / "straight", tmp_path / "resumed")
    records = (tmp_path / "resumed" / "metrics.jsonl").read_text()
    assert '"event": "resume"' in records and "train.iterations" in records  # config diff


PROXY = [
    "--loss.name=proxy_anchor",
    "--sampler.name=random",
    "--sampler.batch_size=10",
    "--train.freeze_backbone_iterations=5",
    "--optim.loss_lr=1e-2",
    "--optim.loss_weight_decay=1e-4",
]


def test_proxy_loss_resume_continues_exactly_in_process(tmp_path: Path) -> None:
    """Proxy-Anchor with random batches and a frozen-backbone warm-up: stop at 20 and resume
    to 40 == 40 straight, proxies and their optimizer moments included."""
    args = [*PROXY, "--train.checkpoint_every=10"]
    run_in_process(tmp_path / "straight", "--train.iterations=40", *args)
    run_in_process(tmp_path / "resumed", "--train.iterations=20", *args)
    run_in_process(tmp_path / "resumed", "--train.iterations=40", "--train.resume=auto", *args)
    assert_same_state(tmp_path / "straight", tmp_path / "resumed")
    state = load_checkpoint(tmp_path / "straight" / "last", state=True)[1]
    proxies = state["criterion"]["proxies"]
    assert proxies.shape == (5, 16) and proxies.dtype == torch.float32  # digits 0-4, 16-d
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    # own lr and weight decay; the step schedule (x0.1 from iteration 25) applies to it too
    assert groups["loss"]["lr"] == pytest.approx(1e-3) and groups["loss"]["weight_decay"] == 1e-4
    initial = build_loss("proxy_anchor", num_classes=5, embedding_dim=16, seed=0).proxies
    assert not torch.equal(proxies, initial.detach())  # trained
    # the run's config (a proxy loss without num_classes) evaluates like any other
    again = evaluate_checkpoint(tmp_path / "straight", out=tmp_path / "e.json", progress=False)
    records = [json.loads(r) for r in (tmp_path / "straight" / "metrics.jsonl").open()]
    assert again["metrics"]["recall@1"] == [r for r in records if "recall@1" in r][-1]["recall@1"]


def test_freeze_backbone_iterations(tmp_path: Path) -> None:
    """During the warm-up only the head and the proxies change: the same weights as a run
    whose backbone learning rate is 0; after it the backbone trains."""
    common = [*PROXY[:3], "--train.iterations=3"]
    run_in_process(tmp_path / "frozen", *common, "--train.freeze_backbone_iterations=3")
    run_in_process(tmp_path / "lr0", *common, "--optim.backbone_lr=0")
    run_in_process(tmp_path / "free", *common)
    frozen, lr0, free = (
        weights(tmp_path / "frozen"),
        weights(tmp_path / "lr0"),
        weights(tmp_path / "free"),
    )
    for key in frozen:
        assert torch.equal(frozen[key], lr0[key]), key
    backbone = [k for k in frozen if k.startswith("backbone.") and "running" not in k]
    assert backbone and any(not torch.equal(frozen[k], free[k]) for k in backbone)
    head = [k for k in frozen if k.startswith("head.")]
    assert head and all(not torch.equal(frozen[k], free[k]) for k in head)
    # the frozen backbone got no Adam moments (as with requires_grad off)
    state = load_checkpoint(tmp_path / "frozen" / "last", state=True)[1]
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert not any(i in state["optimizer"]["state"] for i in groups["backbone"]["params"])
    assert all(i in state["optimizer"]["state"] for i in groups["loss"]["params"])


def test_proxy_loss_num_classes_comes_from_the_training_split(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"loss\.num_classes: 7, but the training split has 5"):
        run_in_process(tmp_path / "a", "--train.iterations=1", *PROXY, "--loss.num_classes=7")
    summary = run_in_process(
        tmp_path / "b", "--train.iterations=2", "--loss.name=cosface", "--loss.num_classes=5"
    )
    assert summary["iteration"] == 2


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "deepmetric", "train", "--config", str(DEMO), *TINY, *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path: Path, workers: int) -> None:
    total, kill_after = 100, 30
    args = [
        f"--train.iterations={total}",
        "--train.checkpoint_every=10",
        f"--data.num_workers={workers}",
        *XBM,
    ]
    run_in_process(tmp_path / "straight", *args)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*args, f"--output.dir={killed}"),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            last = killed / "last"
            if last.is_symlink() and int(os.readlink(last).rsplit("-", 1)[1]) >= kill_after:
                break
            if proc.poll() is not None:
                pytest.fail(f"training ended before the kill: {proc.stderr.read().decode()}")
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its DataLoader workers
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    stopped_at = int(os.readlink(killed / "last").rsplit("-", 1)[1])
    assert kill_after <= stopped_at < total

    done = subprocess.run(
        _cli(*args, f"--output.dir={killed}", "--train.resume=auto"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and f"at iteration {stopped_at}" in done.stdout
    assert_same_state(tmp_path / "straight", killed)
    # metrics.jsonl of the resumed run has no duplicated iterations
    its = [
        json.loads(line)["iteration"]
        for line in (killed / "metrics.jsonl").read_text().splitlines()
        if '"loss"' in line
    ]
    assert its == sorted(set(its)) and its[-1] == total


def test_bf16_autocast_on_cpu_and_fp16_refused(tmp_path: Path) -> None:
    summary = run_in_process(tmp_path / "bf16", "--train.iterations=3", "--train.amp=bf16")
    assert summary["iteration"] == 3 and summary["final"]["recall@1"] > 0
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            run_in_process(tmp_path / "fp16", "--train.iterations=3", "--train.amp=fp16")
        # evaluation resolves train.amp the same way (it used to drop fp16 silently)
        with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
            evaluate_checkpoint(tmp_path / "bf16", ["--train.amp=fp16"], progress=False)
    # the bf16 run's evaluation of its checkpoint is the one logged at the end of training
    again = evaluate_checkpoint(tmp_path / "bf16", out=tmp_path / "e.json", progress=False)
    assert again["metrics"]["recall@1"] == summary["final"]["recall@1"]


def test_bad_train_device_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.device"):
        run_in_process(tmp_path / "bad", "--train.iterations=1", "--train.device=gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            run_in_process(tmp_path / "cuda", "--train.iterations=1", "--train.device=cuda")


def test_embedded_image_files_are_inverted_like_the_training_arrays(tmp_path: Path) -> None:
    from PIL import Image

    from deepmetric.engine.inference import ImageFiles

    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5
    Image.fromarray(pixels).save(tmp_path / "a.png")
    plain = ImageFiles([tmp_path / "a.png"], np.asarray)[0][0]
    inverted, label = ImageFiles([tmp_path / "a.png"], np.asarray, invert=True)[0]
    np.testing.assert_array_equal(plain, pixels)
    np.testing.assert_array_equal(inverted, 255 - pixels)
    assert label == -1


def test_user_mistakes_are_config_errors(tmp_path: Path) -> None:
    """A transform value a preset rejects, a Config built in Python with a wrong option, and
    a resume whose model no longer fits the checkpoint: ConfigError naming the cause."""
    with pytest.raises(ConfigError, match=r"data\.transform_options \(small\): give either size"):
        run_in_process(tmp_path / "a", "--train.iterations=1", "--data.transform_options.crop=20")
    cfg = load_config(DEMO, [*TINY, f"--output.dir={tmp_path / 'b'}"])
    cfg.model.options["in_chan"] = 1  # set in Python: train() checks the options too
    with pytest.raises(ConfigError, match=r"model\.options\.in_chan: not an option"):
        train(cfg)
    run_in_process(tmp_path / "c", "--train.iterations=2")
    with pytest.raises(
        ConfigError,
        match=r"does not fit the configured model.*settings changed "
        r"since: model\.embedding_dim: 16 -> 32",
    ):
        run_in_process(
            tmp_path / "c",
            "--train.iterations=4",
            "--train.resume=auto",
            "--model.embedding_dim=32",
        )
