"""Distributed training helpers: 2-process gloo runs on CPU against one process.

The multi-process tests launch this very file as a script, once per rank, with torchrun's
environment variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT on 127.0.0.1 and
a free port); each rank writes its results to a file that the test compares with the same
computation done here in one process. One launch covers every loss, the XBM steps, the uneven
gathers and the sharded evaluation, so process start-up is paid once.

The setup for the gradient checks: a tiny linear model (float64, DDP-wrapped) on fixed inputs;
rank r embeds its half of the global batch, gathers (with gradient), computes the global loss
and backpropagates; after DDP's averaging the parameter gradients must equal those of one
process computing the loss on the whole batch, and the loss value must be the true one (no
world-size factor).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepmetric import distributed as D
from deepmetric.engine.trainer import train_step
from deepmetric.losses import build_loss

WORLD = 2
DIM_IN, DIM_OUT = 10, 6
NUM_CLASSES = 6
B_GLOBAL = 24  # 12 rows per rank; every class has rows on both ranks
SRC = Path(__file__).resolve().parents[1] / "src"
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

LOSS_CASES: dict[str, tuple[str, dict]] = {
    "contrastive_similarity": ("contrastive", {"form": "similarity"}),
    "contrastive_distance": ("contrastive", {"form": "distance"}),
    "triplet_semihard": ("triplet", {"mining": "semihard"}),
    "triplet_hard": ("triplet", {"mining": "hard"}),
    "triplet_all": ("triplet", {"mining": "all"}),
    "lifted_original": ("lifted", {"variant": "original"}),
    "lifted_modified": ("lifted", {"variant": "modified"}),
    "binomial": ("binomial", {}),
    "nca": ("nca", {}),
    "multi_similarity": ("multi_similarity", {}),
    # random negative sampling: identical generator seed on every rank and in the reference
    "margin": ("margin", {"seed": 7}),
    "margin_per_class": ("margin", {"seed": 7, "num_classes": NUM_CLASSES}),
    # proxy losses: the proxies (same seed on every rank) get the global loss's gradient
    "proxy_anchor": ("proxy_anchor", {"num_classes": NUM_CLASSES, "embedding_dim": DIM_OUT}),
    "proxy_nca": ("proxy_nca", {"num_classes": NUM_CLASSES, "embedding_dim": DIM_OUT}),
    "soft_triple": (
        "soft_triple",
        {"num_classes": NUM_CLASSES, "embedding_dim": DIM_OUT, "centers_per_class": 3},
    ),
    "normalized_softmax": (
        "normalized_softmax",
        {"num_classes": NUM_CLASSES, "embedding_dim": DIM_OUT},
    ),
    "cosface": ("cosface", {"num_classes": NUM_CLASSES, "embedding_dim": DIM_OUT, "scale": 8.0}),
    "arcface": ("arcface", {"num_classes": NUM_CLASSES, "embedding_dim": DIM_OUT, "scale": 8.0}),
}
PROXY_STEPS = 3

XBM_STEPS = 4
XBM_SIZE = 40  # < 2 global batches: the ring buffer wraps during the test
UNEVEN_SIZES = (3, 5)
EVAL_N = 11


# --------------------------------------------------------------------------------------------
# Shared computations (run identically by each rank and by the single-process reference)
# --------------------------------------------------------------------------------------------


def _inputs(step: int = 0) -> tuple[Tensor, Tensor]:
    """Fixed global batch: (B_GLOBAL, DIM_IN) float64 inputs and labels 0..5, each class on
    both ranks' halves."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(B_GLOBAL, DIM_IN, generator=g, dtype=torch.float64)
    labels = torch.arange(B_GLOBAL) % NUM_CLASSES
    labels = labels[torch.randperm(B_GLOBAL, generator=g)]
    return x, labels


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(DIM_IN, DIM_OUT).double()


def _local(t: Tensor) -> Tensor:
    """This rank's contiguous share of a global tensor (everything in one process)."""
    rank, world = D.get_rank(), D.get_world_size()
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def _embed(model: nn.Module, x: Tensor) -> Tensor:
    return F.normalize(model(x), dim=1)


def _loss_step(case: str) -> dict:
    """One forward/backward of a loss case on the global batch; same code in every setting."""
    name, hparams = LOSS_CASES[case]
    model = D.wrap_model(_model())
    criterion = build_loss(name, **hparams).double()
    x, labels = _inputs()
    emb = _embed(model, _local(x))
    global_emb, global_labels = D.gather_batch(emb, _local(labels))
    loss = criterion(global_emb, global_labels)
    loss.backward()
    D.average_gradients(criterion.parameters())
    out = {
        "loss": loss.detach().clone(),
        "num_active": int(criterion.num_active),
        "grads": {n: p.grad.clone() for n, p in D.unwrap_model(model).named_parameters()},
        "loss_grads": {n: p.grad.clone() for n, p in criterion.named_parameters()},
        "local_only_loss": criterion(emb.detach(), _local(labels)).detach().clone(),
    }
    return out


class _UnitRows(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1)


CHUNKED_CASES = ("multi_similarity", "contrastive_distance", "proxy_anchor")


def _trainer_step(case: str, chunk_size: int | None) -> dict:
    """The trainer's step (the loss in float32) with learning rate 0: the gradients it leaves.
    chunk_size 5: chunks of 5, 5 and 2 of each rank's 12 rows."""
    name, hparams = LOSS_CASES[case]
    net = nn.Sequential(_model(), _UnitRows())
    model = D.wrap_model(net)
    criterion = build_loss(name, **hparams).double()
    group = {"params": [*net.parameters(), *criterion.parameters()], "lr": 0.0, "base_lr": 0.0}
    optimizer = torch.optim.SGD([{**group, "name": "head"}], lr=0.0)
    x, labels = _inputs()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(
        model, criterion, optimizer, scaler, _local(x), _local(labels),
        lr_scale=1.0, amp=None, grad_clip=0.0, chunk_size=chunk_size,
    )  # fmt: skip
    return {
        "grads": {n: p.grad.clone() for n, p in net[0].named_parameters()},
        "loss_grads": {n: p.grad.clone() for n, p in criterion.named_parameters()},
    }


def _xbm_steps() -> dict:
    """A few SGD steps with a cross-batch memory fed the gathered global batch."""
    from deepmetric.memory import CrossBatchMemory

    model = D.wrap_model(_model())
    xbm = CrossBatchMemory(build_loss("contrastive"), size=XBM_SIZE, dim=DIM_OUT, start_iteration=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for step in range(XBM_STEPS):
        x, labels = _inputs(step)
        opt.zero_grad()
        emb = _embed(model, _local(x))
        global_emb, global_labels = D.gather_batch(emb, _local(labels))
        loss = xbm(global_emb, global_labels)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return {
        "losses": torch.stack(losses),
        "params": {n: p.detach().clone() for n, p in D.unwrap_model(model).named_parameters()},
        "memory": {k: v.clone() for k, v in xbm.state_dict().items()},
    }


class _UnitLinear(nn.Module):
    """The tiny linear model followed by L2 normalisation (what a proxy loss expects)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = _model()

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x), dim=1)


def _proxy_train_steps() -> dict:
    """A few steps of the trainer's own ``train_step`` with Proxy-Anchor (gather, global
    loss, loss-parameter gradients averaged over ranks, AdamW with the loss group at 10x)."""
    from deepmetric.config import OptimConfig
    from deepmetric.engine.optim import build_optimizer
    from deepmetric.engine.trainer import train_step

    model = D.wrap_model(_UnitLinear())
    criterion = build_loss("proxy_anchor", num_classes=NUM_CLASSES, embedding_dim=DIM_OUT)
    optim = OptimConfig(name="adamw", lr=0.05, loss_lr=0.5, loss_weight_decay=1e-4)
    optimizer = build_optimizer(optim, D.unwrap_model(model), criterion)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for step in range(PROXY_STEPS):
        x, labels = _inputs(step)
        loss = train_step(
            model, criterion, optimizer, scaler, _local(x), _local(labels),
            lr_scale=1.0, amp=None, grad_clip=0.0,
        )  # fmt: skip
        losses.append(loss)
    return {
        "losses": torch.stack(losses),
        "proxies": criterion.proxies.detach().clone(),
        "params": {n: p.detach().clone() for n, p in D.unwrap_model(model).named_parameters()},
    }


def _uneven_weights(n: int) -> Tensor:
    return torch.linspace(-1.0, 2.0, n * 3, dtype=torch.float64).reshape(n, 3)


def _uneven_local(rank: int) -> Tensor:
    start = sum(UNEVEN_SIZES[:rank])
    full = torch.arange(sum(UNEVEN_SIZES) * 3, dtype=torch.float64).reshape(-1, 3) / 7.0
    return full[start : start + UNEVEN_SIZES[rank]]


def _sampler_batches(num_replicas: int | None = None, rank: int | None = None) -> list:
    """Two epochs of P x K batches (defaults: world size and rank of the process group)."""
    from deepmetric.samplers import PKSampler

    labels = torch.arange(60) % 7
    sampler = PKSampler(labels, p=3, k=2, seed=4, num_replicas=num_replicas, rank=rank)
    batches = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches.append([list(b) for b in sampler])
    return batches


def _engine_evaluation() -> dict:
    """The trainer's evaluation of a Conv-4 on the digits test split (896 images, 64 a batch,
    so every rank's batches have the same shapes as one process's): sharded over the ranks
    of the process group, one process without one."""
    from deepmetric.config import load_config
    from deepmetric.engine import Evaluator, build_data, build_model_from_config

    cfg = load_config(
        DEMO,
        [
            "--eval.batch_size=64",
            "--data.num_workers=0",
            # verification: each rank counts its share of the pairs, the counts are summed
            "--eval.metrics=[recall, map_at_r, r_precision, nmi, verification]",
        ],
    )
    torch.manual_seed(0)
    model = build_model_from_config(cfg)
    _, eval_sets = build_data(cfg, test_only=True)
    evaluator = Evaluator(cfg, eval_sets, torch.device("cpu"), None, persistent_workers=False)
    metrics = evaluator.evaluate(model)["test"]
    metrics.pop("eval_time_s")
    return {"metrics": metrics, "shard": evaluator.shards["test"]}


def _pair_counts(shard: tuple[int, int], all_reduce) -> dict:
    """Verification pair counts of 600 embeddings of multiples of 1/4 (few distinct scores)
    with a budget too small to keep the keys: the counting path, in 30 blocks of 10 rows
    that the ranks take in turn."""
    from deepmetric.evaluation.verification import pair_score_counts

    generator = torch.Generator().manual_seed(3)
    x = torch.randint(-2, 3, (600, 8), generator=generator).float() / 4
    counts = pair_score_counts(
        x, torch.arange(600) % 7, memory_budget_bytes=2**20, shard=shard, all_reduce=all_reduce
    )
    return {
        "keys": counts.keys,
        "positive": counts.positive,
        "negative": counts.negative,
        "ties_twice": counts.ties_twice,
        "auc": counts.auc(),
        "eer": counts.eer(),
    }


def _eval_embeddings(index: Tensor) -> Tensor:
    """A deterministic 'embedding' of dataset items by index."""
    return torch.stack([index.double(), (index * index).double(), -index.double()], 1).float()


# --------------------------------------------------------------------------------------------
# Worker (each rank runs this file as a script)
# --------------------------------------------------------------------------------------------


def _worker_all(out_dir: Path) -> None:
    rank, world, local_rank = D.init_distributed(timeout_s=60)
    assert (rank, world, local_rank) == (D.get_rank(), D.get_world_size(), D.get_local_rank())
    assert D.is_distributed() and D.is_main_process() == (rank == 0)
    res: dict = {"rank": rank, "world": world, "backend": torch.distributed.get_backend()}
    res["broadcast"] = D.broadcast_object({"from": rank}, src=0)

    res["losses"] = {case: _loss_step(case) for case in LOSS_CASES}
    res["chunked"] = {case: _trainer_step(case, 5) for case in CHUNKED_CASES}
    res["xbm"] = _xbm_steps()
    res["proxy_steps"] = _proxy_train_steps()

    # Uneven all_gather_with_grad: the same loss on every rank, and a rank-dependent loss.
    x = _uneven_local(rank).requires_grad_(True)
    g = D.all_gather_with_grad(x)
    (g * _uneven_weights(g.shape[0])).square().sum().backward()
    res["uneven_gathered"] = g.detach().clone()
    res["uneven_grad_same"] = x.grad.clone()
    x.grad = None
    g = D.all_gather_with_grad(x)
    (g * (rank + 1.0)).sum().backward()
    res["uneven_grad_per_rank"] = x.grad.clone()
    ints = torch.arange(UNEVEN_SIZES[rank]) + 100 * rank
    res["uneven_ints"] = D.all_gather(ints)
    res["uneven_bools"] = D.all_gather(ints % 2 == 0)

    # Sharded evaluation, two ways: contiguous shards of a model's embeddings, and a permuted
    # uneven split with a duplicated index (as a padding sampler would produce).
    x_eval, labels_eval = _inputs(99)
    model = _model()
    idx = D.shard_indices(B_GLOBAL - 1)
    with torch.no_grad():
        emb = _embed(model, x_eval[idx])
    res["eval_model"] = D.gather_eval(emb, labels_eval[idx], idx)
    perm = torch.randperm(EVAL_N, generator=torch.Generator().manual_seed(5))
    mine = perm[:4] if rank == 0 else torch.cat([perm[4:], perm[:1]])
    res["eval_perm"] = D.gather_eval(_eval_embeddings(mine), mine % 3, mine)

    # BatchNorm statistics differ per rank after a training forward: rank 0's are broadcast.
    bn = nn.BatchNorm1d(3)
    bn(torch.randn(8, 3, generator=torch.Generator().manual_seed(rank)))
    D.broadcast_buffers(bn)
    res["bn_buffers"] = {k: v.clone() for k, v in bn.state_dict().items()}

    # The trainer's sharded evaluation (rank 0's metrics broadcast to every rank).
    res["engine_eval"] = _engine_evaluation()
    res["pair_counts"] = _pair_counts((rank, world), D.sum_over_ranks)

    # PKSampler takes world size and rank from the process group.
    res["sampler_batches"] = _sampler_batches()

    # sync_bn on CPU: a warning, the model still trains.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bn_model = D.wrap_model(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), sync_bn=True)
    res["sync_bn_warned"] = any("sync_bn" in str(w.message) for w in caught)
    bn_model(torch.randn(6, 4)).sum().backward()

    D.barrier()
    torch.save(res, out_dir / f"rank{rank}.pt")
    D.destroy_distributed()


def _worker_dies(out_dir: Path, stall: bool = False) -> None:
    """Rank 1 dies (or stalls) right after joining; rank 0's next collective must raise (at
    once when the peer's socket closes, after the 2 s collective timeout when it stalls)."""
    rank, _, _ = D.init_distributed(timeout_s=2)
    if rank == 1:
        if stall:
            time.sleep(6)
        os._exit(3)
    start = time.monotonic()
    result = {"raised": False}
    try:
        t = torch.ones(4)
        for _ in range(3):  # the peer may not have gone yet on the first call
            torch.distributed.all_reduce(t)
            time.sleep(0.5)
    except Exception as err:  # whatever torch raises, it must raise
        result = {"raised": True, "type": type(err).__name__, "message": str(err)[:300]}
    result["elapsed"] = time.monotonic() - start
    (out_dir / "dies.json").write_text(json.dumps(result))
    os._exit(0)  # skip destroy_process_group on a broken group


def _worker_stalls(out_dir: Path) -> None:
    _worker_dies(out_dir, stall=True)


WORKERS = {"all": _worker_all, "dies": _worker_dies, "stalls": _worker_stalls}


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    scenario: str, out_dir: Path, world: int = WORLD, timeout_s: float = 120.0
) -> list[tuple[int, str]]:
    """Run ``scenario`` in ``world`` processes with torchrun's environment; kill on timeout.

    Returns (returncode, output) per rank.
    """
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ)
        env.update(
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            CUDA_VISIBLE_DEVICES="",  # gloo on CPU even on a GPU machine
            OMP_NUM_THREADS="1",
            PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, scenario, str(out_dir)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout_s
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        outputs = [p.communicate()[0] for p in procs]
        pytest.fail(f"{scenario}: ranks did not finish in {timeout_s}s\n" + "\n".join(outputs))
    return results


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist")
    results = launch("all", out_dir)
    for rank, (rc, out) in enumerate(results):
        assert rc == 0, f"rank {rank} failed:\n{out}"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_process_group_basics(dist_results):
    for rank, res in enumerate(dist_results):
        assert (res["rank"], res["world"], res["backend"]) == (rank, WORLD, "gloo")
        assert res["broadcast"] == {"from": 0}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_and_gradients_match_single_process(dist_results, case):
    ref = _loss_step(case)  # one process, whole batch (no process group here)
    assert ref["num_active"] > 0
    for res in dist_results:
        got = res["losses"][case]
        # the true global loss value: no world-size factor
        torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-6, atol=1e-7)
        assert got["num_active"] == ref["num_active"]
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-6, atol=1e-8)
        assert got["loss_grads"].keys() == ref["loss_grads"].keys()
        for name, grad in ref["loss_grads"].items():
            torch.testing.assert_close(got["loss_grads"][name], grad, rtol=1e-6, atol=1e-8)
    # the global batch matters: the per-rank loss differs from the global one
    local = dist_results[0]["losses"][case]["local_only_loss"]
    assert not torch.allclose(local, ref["loss"])


@pytest.mark.parametrize("case", CHUNKED_CASES)
def test_chunked_step_on_two_ranks_equals_one_process_on_the_whole_batch(dist_results, case):
    """Gradient caching under DDP: each rank embeds its half in chunks, the loss sees the
    gathered global batch, gradients are all-reduced once (no_sync until the last chunk)."""
    ref = _trainer_step(case, None)  # one process, whole batch, no chunks
    assert any(bool(g.abs().sum() > 0) for g in ref["grads"].values())
    for res in dist_results:
        got = res["chunked"][case]
        for name, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-6, atol=1e-8)
        for name, grad in ref["loss_grads"].items():
            torch.testing.assert_close(got["loss_grads"][name], grad, rtol=1e-6, atol=1e-8)


def test_xbm_memories_identical_across_ranks_and_match_single_process(dist_results):
    ref = _xbm_steps()
    mem0 = dist_results[0]["xbm"]["memory"]
    for res in dist_results:
        for key, value in res["xbm"]["memory"].items():
            assert torch.equal(value, mem0[key]), f"memory {key} differs between ranks"
            torch.testing.assert_close(value, ref["memory"][key], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(res["xbm"]["losses"], ref["losses"], rtol=1e-6, atol=1e-7)
        for name, p in ref["params"].items():
            torch.testing.assert_close(res["xbm"]["params"][name], p, rtol=1e-6, atol=1e-8)
    # the ring buffer wrapped: the memory holds rows of the last steps
    assert int(mem0["filled"]) == XBM_SIZE
    assert int(mem0["ptr"]) == (XBM_STEPS - 1) * B_GLOBAL % XBM_SIZE


def test_proxies_identical_across_ranks_and_match_single_process(dist_results):
    """Proxy-Anchor trained by train_step: after each rank's optimizer steps the proxies
    are bit-identical on every rank and equal one process's on the global batch."""
    ref = _proxy_train_steps()
    proxies0 = dist_results[0]["proxy_steps"]["proxies"]
    assert not torch.equal(
        proxies0, build_loss("proxy_anchor", num_classes=6, embedding_dim=6).proxies
    )
    for res in dist_results:
        got = res["proxy_steps"]
        assert torch.equal(got["proxies"], proxies0), "proxies differ between ranks"
        torch.testing.assert_close(got["proxies"], ref["proxies"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        for name, p in ref["params"].items():
            torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=1e-6)


def test_uneven_all_gather_with_grad(dist_results):
    full = torch.cat([_uneven_local(r) for r in range(WORLD)])
    w = _uneven_weights(full.shape[0])
    xf = full.clone().requires_grad_(True)
    (xf * w).square().sum().backward()
    offsets = [0, UNEVEN_SIZES[0], sum(UNEVEN_SIZES)]
    for rank, res in enumerate(dist_results):
        assert torch.equal(res["uneven_gathered"], full)
        own = slice(offsets[rank], offsets[rank + 1])
        # same loss on every rank: local gradient = W x dL/dx_local
        torch.testing.assert_close(res["uneven_grad_same"], WORLD * xf.grad[own])
        # rank s computes sum((s + 1) * G): gradient = sum over s of (s + 1)
        expected = torch.full_like(res["uneven_grad_per_rank"], sum(range(1, WORLD + 1)))
        torch.testing.assert_close(res["uneven_grad_per_rank"], expected)
        ints = torch.cat([torch.arange(n) + 100 * r for r, n in enumerate(UNEVEN_SIZES)])
        assert torch.equal(res["uneven_ints"], ints)
        assert torch.equal(res["uneven_bools"], ints % 2 == 0)


def test_sharded_evaluation_equals_one_process(dist_results):
    x_eval, labels_eval = _inputs(99)
    with torch.no_grad():
        emb = _embed(_model(), x_eval[: B_GLOBAL - 1])
    all_idx = torch.arange(EVAL_N)
    for res in dist_results:
        got_emb, got_labels = res["eval_model"]
        torch.testing.assert_close(got_emb, emb, rtol=0, atol=1e-12)
        assert torch.equal(got_labels, labels_eval[: B_GLOBAL - 1])
        perm_emb, perm_labels = res["eval_perm"]
        assert torch.equal(perm_emb, _eval_embeddings(all_idx))
        assert torch.equal(perm_labels, all_idx % 3)


def test_broadcast_buffers_gives_every_rank_rank_0s_statistics(dist_results):
    bn0, bn1 = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    bn0(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))  # what rank 0 saw
    bn1(torch.randn(8, 3, generator=torch.Generator().manual_seed(1)))  # ... and rank 1
    for key, value in bn0.state_dict().items():
        assert torch.equal(dist_results[1]["bn_buffers"][key], dist_results[0]["bn_buffers"][key])
        torch.testing.assert_close(dist_results[1]["bn_buffers"][key], value)
    assert not torch.allclose(bn1.running_mean, bn0.running_mean)  # they did differ


def test_trainer_evaluation_is_sharded_and_equals_one_process(dist_results):
    """Each rank embeds half of the evaluation set; the metrics, computed on rank 0 from the
    gathered embeddings and broadcast, are the single-process ones on every rank."""
    ref = _engine_evaluation()
    assert ref["shard"] == list(range(896))
    assert dist_results[0]["engine_eval"]["shard"] == list(range(448))
    assert dist_results[1]["engine_eval"]["shard"] == list(range(448, 896))
    assert ref["metrics"]["num_queries"] == 896
    for res in dist_results:
        assert res["engine_eval"]["metrics"] == ref["metrics"]


def test_verification_pair_counts_summed_over_ranks_equal_one_process(dist_results):
    ref = _pair_counts((0, 1), None)
    alone = _pair_counts((0, 2), None)  # one rank's share is not the whole
    assert alone["positive"].sum() < ref["positive"].sum()
    for res in dist_results:
        got = res["pair_counts"]
        for key in ("keys", "positive", "negative"):
            np.testing.assert_array_equal(got[key], ref[key])
        assert (got["ties_twice"], got["auc"], got["eer"]) == (
            ref["ties_twice"],
            ref["auc"],
            ref["eer"],
        )
    assert dist_results[0]["engine_eval"]["metrics"]["num_negative_pairs"] > 0


def test_sampler_shards_by_rank(dist_results):
    seen = [[], []]
    for rank, res in enumerate(dist_results):
        assert res["sampler_batches"] == _sampler_batches(WORLD, rank)
        for epoch in range(2):
            seen[epoch].append({i for b in res["sampler_batches"][epoch] for i in b})
    n0, n1 = (len(res["sampler_batches"][0]) for res in dist_results)
    assert n0 == n1 > 0  # equal counts: no rank waits for the others' extra batch
    one_process = _sampler_batches(1, 0)
    for epoch in range(2):
        assert seen[epoch][0] != seen[epoch][1]  # different batches on each rank
        single = one_process[epoch]
        merged = [
            b for pair in zip(*(r["sampler_batches"][epoch] for r in dist_results)) for b in pair
        ]
        assert merged == single[: len(merged)]  # rank r takes global batches r, r + W, ...


def test_sync_bn_on_cpu_warns(dist_results):
    assert all(res["sync_bn_warned"] for res in dist_results)


@pytest.mark.parametrize("scenario", ["dies", "stalls"])
def test_failing_rank_raises_instead_of_hanging(tmp_path, scenario):
    results = launch(scenario, tmp_path, timeout_s=90)
    assert results[1][0] == 3
    assert results[0][0] == 0, results[0][1]
    outcome = json.loads((tmp_path / "dies.json").read_text())
    assert outcome["raised"], outcome
    assert outcome["elapsed"] < 5, outcome  # the stalled peer sleeps 6 s


# End to end: ``torchrun --nproc-per-node 2 -m deepmetric train`` on CPU (gloo), and resume.

ROOT = Path(__file__).resolve().parents[1]
TRAIN_OVERRIDES = [
    "--train.checkpoint_every=2",
    "--train.log_every=1",
    "--train.progress=false",
    "--train.threads=1",
    "--eval.at_start=false",
    "--output.report=false",
    # select the best checkpoint on 2 held-out training classes, evaluated every 2 iterations
    # (one image a batch: the same batch shapes on 2 ranks as in one process, so the same
    # float rounding in the convolutions)
    "--eval.protocol=val",
    "--eval.val_fraction=0.4",
    "--sampler.p=3",
    "--eval.every=2",
    "--eval.batch_size=1",
    # the memory is fed the gathered global batch (48 = 3 x 8 x 2) and must survive resume;
    # the margin loss's learnable beta (averaged over ranks) and sampling generator too
    "--loss.name=margin",
    "--xbm.enabled=true",
    "--xbm.size=200",
    "--xbm.start_iteration=1",
]


def _torchrun_train(run_dir: Path, iterations: int, *extra: str) -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={WORLD}", "-m", "deepmetric", "train",
        "--config", str(ROOT / "configs" / "demo.yaml"),
        f"--output.dir={run_dir}", f"--train.iterations={iterations}",
        *TRAIN_OVERRIDES, *extra,
    ]  # fmt: skip
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _weights(run_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "last" / "model.safetensors")


@pytest.mark.slow
def test_torchrun_train_and_resume(tmp_path):
    pytest.importorskip("deepmetric.cli")
    pytest.importorskip("deepmetric.engine")
    if not (ROOT / "configs" / "demo.yaml").exists():
        pytest.skip("configs/demo.yaml missing")

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _torchrun_train(straight, 4)
    _torchrun_train(resumed, 2)
    _torchrun_train(resumed, 4, "--train.resume=auto")

    for run_dir in (straight, resumed):
        # rank 0 alone logs: one training record per iteration, one evaluation every 2
        records = _records(run_dir)
        train_records = [r["iteration"] for r in records if "loss" in r]
        assert train_records == [1, 2, 3, 4]
        evals = [r for r in records if r.get("split") == "val"]
        assert [r["iteration"] for r in evals] == [2, 4]
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)

    # resume continues the same 2-process run: same weights, same memory
    w_straight, w_resumed = _weights(straight), _weights(resumed)
    assert w_straight.keys() == w_resumed.keys()
    for key, value in w_straight.items():
        torch.testing.assert_close(w_resumed[key], value, rtol=1e-5, atol=1e-6, msg=key)
    s_straight = torch.load(straight / "last" / "state.pt", weights_only=False)
    s_resumed = torch.load(resumed / "last" / "state.pt", weights_only=False)
    for key, value in s_straight["criterion"].items():
        torch.testing.assert_close(s_resumed["criterion"][key], value, rtol=1e-5, atol=1e-6)

    # the distributed (sharded) evaluations equal single-process evaluations of the same
    # checkpoints, and the best checkpoint is the one the logged validation metric selects
    from deepmetric.engine import evaluate_checkpoint

    records = _records(straight)
    val = [r for r in records if r.get("split") == "val"]
    single = evaluate_checkpoint(
        straight / "last", split="val", out=tmp_path / "v.json", progress=False
    )
    best_iteration = max(val, key=lambda r: (r["recall@1"], -r["iteration"]))["iteration"]
    assert os.readlink(straight / "best").endswith(f"iter-{best_iteration:07d}")
    test_of_best = next(r for r in records if r.get("checkpoint") == "best")
    single_best = evaluate_checkpoint(
        straight / "best", split="test", out=tmp_path / "t.json", progress=False
    )
    for key in ("recall@1", "recall@2", "map@r", "r_precision", "num_queries"):
        assert val[-1][key] == single["metrics"][key], key
        assert test_of_best[key] == single_best["metrics"][key], key


# Single-process behaviour (no process group in the pytest process).


def test_single_process_is_identity(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert D.init_distributed() == (0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert D.init_distributed() == (0, 1, 0)
    assert not D.is_distributed() and D.is_main_process()
    assert (D.get_rank(), D.get_world_size()) == (0, 1)
    x, labels = torch.randn(5, 3, requires_grad=True), torch.arange(5)
    ge, gl = D.gather_batch(x, labels)
    assert ge is x and gl is labels
    assert D.all_gather_with_grad(x) is x and D.all_gather(labels) is labels
    model = nn.Linear(3, 2)
    assert D.wrap_model(model, sync_bn=True) is model and D.unwrap_model(model) is model
    assert D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    D.average_gradients(model.parameters())
    D.destroy_distributed()


def test_init_distributed_without_rendezvous_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        D.init_distributed()


def test_gather_batch_checks_lengths():
    with pytest.raises(ValueError, match="differ"):
        D.gather_batch(torch.randn(4, 2), torch.arange(3))


@pytest.mark.parametrize("n", [0, 1, 7, 10, 23])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_indices_partition(n, world):
    shards = [D.shard_indices(n, r, world) for r in range(world)]
    assert [i for s in shards for i in s] == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        D.shard_indices(n, world, world)


def test_gather_eval_single_process_sorts_and_dedups():
    idx = torch.tensor([3, 0, 2, 1, 3])
    emb, labels = D.gather_eval(_eval_embeddings(idx), idx * 10, idx)
    assert torch.equal(emb, _eval_embeddings(torch.arange(4)))
    assert torch.equal(labels, torch.arange(4) * 10)
    with pytest.raises(ValueError, match="same length"):
        D.gather_eval(torch.zeros(2, 3), torch.zeros(2), [0])


if __name__ == "__main__":
    WORKERS[sys.argv[1]](Path(sys.argv[2]))
