"""Forward + backward time and peak tensor memory of deepmetric losses vs PML 2.9.0.

Usage:
    .venv/bin/python benchmarks/losses.py                    # full table, B = 80, 256, 1024
    .venv/bin/python benchmarks/losses.py --batch-sizes 80 --losses nca triplet-hard
    .venv/bin/python benchmarks/losses.py --proxy            # proxy losses, B = 180, 1024,
                                                             # C = 100, 11,318
    .venv/bin/python benchmarks/losses.py --proxy --batch-sizes 180 --classes 100 \
        --proxy-losses proxy_anchor arcface
    .venv/bin/python benchmarks/losses.py --profile multi_similarity --batch-sizes 1024
    .venv/bin/python benchmarks/losses.py --ablate exp_floor --losses lifted-modified

What is measured
- Time: one forward + backward of the loss w.r.t. a (B, d) float32 leaf of L2-normalised
  embeddings (P x K labels, K = 4), median over repeats; deepmetric and PML are interleaved
  in one process (ours, PML, ours, PML, ...) after warm-up calls, torch.set_num_threads(2).
  PML's time includes its miner where it needs one and its internal re-normalisation.
- Peak memory: the largest number of bytes held at once by tensors allocated inside one
  forward + backward (inputs excluded), from the allocation/free events recorded by
  torch.profiler(profile_memory=True) on the CPU allocator. Python-object overhead (PML's
  index lists, loops) is not counted; allocator caching is irrelevant on CPU.

Proxy losses (``--proxy``): the same, with random labels of C classes (not P x K) and
embeddings near their class's proxy; ours and PML hold the same proxies (copied, their values
checked equal) and every call also computes the proxies' gradient. A third function is
interleaved with the two: the floor, S = E P^T for the loss's (C K, d) proxies and its
backward (dE = G P, dP = G^T E), the matmuls any proxy loss pays. Reported: ours / PML and
ours / floor (the goal: ours <= 0.5 x PML, or <= 1.25 x the floor, and no more peak memory).

Ablation (``--ablate NAME``): one CPU special path of ``deepmetric.losses._autograd``, or the
unit-norm check's row norms (see ``ablation_switches``), switched on and off between
interleaved calls in one process, for the loss
alone (forward + backward) and for a training step at the same B (Conv-4 on 1 x 28 x 28
inputs + linear head to d + L2 normalisation + the loss + backward + Adam step), whose time is
what a user sees. Reports with / without as median (min) ratios.

The embeddings are clustered (a shared component, a class centre and noise) so that the
distances spread like those of a trained model (negatives at D ~ 1.1-1.4) and mining rules
have something to select.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from deepmetric.losses import build_loss

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pml_available() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def make_batch(b: int, dim: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(b // k).repeat_interleave(k)
    common = F.normalize(torch.randn(dim, generator=g), dim=0)
    centres = F.normalize(torch.randn(b // k, dim, generator=g), dim=1)
    noise = torch.randn(b, dim, generator=g) / dim**0.5
    emb = F.normalize(0.5 * common + centres[labels] + 0.9 * noise, dim=1)
    return emb, labels


# ---------------------------------------------------------------------------------------
# the compared pairs: name -> (ours factory, PML factory or None, note)
# ---------------------------------------------------------------------------------------
def _pml_with_miner(loss, miner) -> LossFn:
    def fn(emb, labels):
        return loss(emb, labels, miner(emb, labels))

    return fn


def pml_factories() -> dict[str, Callable[[], LossFn]]:
    from pytorch_metric_learning import distances, losses, miners

    return {
        "contrastive": lambda: losses.ContrastiveLoss(
            pos_margin=1.0, neg_margin=0.5, distance=distances.CosineSimilarity()
        ),
        "triplet-semihard": lambda: _pml_with_miner(
            losses.TripletMarginLoss(margin=0.2),
            miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard"),
        ),
        "triplet-hard": lambda: _pml_with_miner(
            losses.TripletMarginLoss(margin=0.2),
            miners.TripletMarginMiner(margin=0.2, type_of_triplets="hard"),
        ),
        "triplet-batchhard": lambda: _pml_with_miner(
            losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()
        ),
        "triplet-all": lambda: losses.TripletMarginLoss(margin=0.2),
        "lifted": lambda: losses.LiftedStructureLoss(neg_margin=1.0, pos_margin=0.0),
        "nca": lambda: losses.NCALoss(softmax_scale=8.0),
        "multi_similarity": lambda: _pml_with_miner(
            losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5),
            miners.MultiSimilarityMiner(epsilon=0.1),
        ),
        "margin": lambda: _pml_with_miner(
            losses.MarginLoss(margin=0.2, beta=1.2, nu=0.0),
            miners.DistanceWeightedMiner(cutoff=0.5, nonzero_loss_cutoff=1.4),
        ),
    }


OURS: dict[str, tuple[str, dict]] = {
    "floor": ("", {}),  # the similarity matrix alone: (E E^T).sum(), forward + backward
    "contrastive": ("contrastive", {}),
    "triplet-semihard": ("triplet", {"mining": "semihard"}),
    "triplet-hard": ("triplet", {"mining": "hard"}),
    "triplet-batchhard": ("triplet", {"mining": "hard"}),
    "triplet-all": ("triplet", {"mining": "all"}),
    "lifted": ("lifted", {}),
    "lifted-modified": ("lifted", {"variant": "modified"}),
    "binomial": ("binomial", {}),
    "nca": ("nca", {"scale": 16.0}),
    "multi_similarity": ("multi_similarity", {}),
    "margin": ("margin", {}),
}

NOTES = {
    "floor": "not a loss: S = E E^T forward and its one-matmul backward, (G + G^T) E: "
    "the matmul cost every loss here pays (PML pays it too)",
    "contrastive": "PML ContrastiveLoss(pos_margin=1, neg_margin=0.5, CosineSimilarity), "
    "AvgNonZero reducer",
    "triplet-semihard": "PML TripletMarginMiner('semihard') + TripletMarginLoss; PML's "
    "'semihard' is a different triplet set",
    "triplet-hard": "PML TripletMarginMiner('hard') + TripletMarginLoss; different definition",
    "triplet-batchhard": "PML BatchHardMiner + TripletMarginLoss (same triplets as ours)",
    "triplet-all": "PML TripletMarginLoss (all triplets, AvgNonZero): same definition",
    "lifted": "PML LiftedStructureLoss(neg_margin=1, pos_margin=0): same value in-batch",
    "nca": "PML NCALoss(softmax_scale=8) = ours at scale 16",
    "multi_similarity": "PML MultiSimilarityMiner + MultiSimilarityLoss",
    "margin": "PML DistanceWeightedMiner + MarginLoss",
}

# PML runs that cannot fit in this machine's memory (23 GB): lifted builds a
# (#positive pairs x #negative pairs) float mask, 3.2e9 entries at B = 1024, K = 4.
PML_SKIP = {("lifted", 1024): "not run: its pos x neg pair mask needs > 25 GB"}


class _Gram(torch.autograd.Function):
    """S = E E^T with the one-matmul backward dL/dE = (G + G^T) E."""

    @staticmethod
    def forward(ctx, emb):
        ctx.save_for_backward(emb)
        return emb @ emb.T

    @staticmethod
    def backward(ctx, grad):
        (emb,) = ctx.saved_tensors
        return (grad + grad.T) @ emb


def similarity_floor(emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The least any in-batch loss here must do: one B x d x B matmul forward, one back."""
    return _Gram.apply(emb).sum()


def make_ours(name: str) -> LossFn:
    if name == "floor":
        return similarity_floor
    loss_name, hp = OURS[name]
    return build_loss(loss_name, **hp)


# ---------------------------------------------------------------------------------------
def fwd_bwd(fn: LossFn, emb: torch.Tensor, labels: torch.Tensor) -> float:
    x = emb.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    loss = fn(x, labels)
    loss.backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(loss), "non-finite loss"
    return elapsed


def peak_bytes(fn: LossFn, emb: torch.Tensor, labels: torch.Tensor) -> int:
    """Peak bytes of tensors allocated and alive at once during one forward + backward."""
    x = emb.detach().clone().requires_grad_(True)
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fn(x, labels)
        loss.backward()
        del loss
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def repeats_for(b: int) -> int:
    return {80: 21, 256: 11}.get(b, 5)


def bench_one(name: str, b: int, dim: int, k: int, pml: dict | None) -> dict:
    emb, labels = make_batch(b, dim, k)
    ours = make_ours(name)
    theirs = None
    skip_note = PML_SKIP.get((name, b))
    if pml is not None and name in pml and skip_note is None:
        theirs = pml[name]()
    torch.manual_seed(0)
    for _ in range(2):  # warm-up
        fwd_bwd(ours, emb, labels)
        if theirs is not None:
            fwd_bwd(theirs, emb, labels)
    t_ours, t_pml = [], []
    for _ in range(repeats_for(b)):
        t_ours.append(fwd_bwd(ours, emb, labels))
        if theirs is not None:
            t_pml.append(fwd_bwd(theirs, emb, labels))
    row = {
        "loss": name,
        "B": b,
        "ours_ms": 1e3 * statistics.median(t_ours),
        "ours_min": 1e3 * min(t_ours),
        "ours_mb": peak_bytes(ours, emb, labels) / 2**20,
        "pml_ms": None,
        "pml_min": None,
        "pml_mb": None,
        "note": skip_note or "",
    }
    if theirs is not None:
        row["pml_ms"] = 1e3 * statistics.median(t_pml)
        row["pml_min"] = 1e3 * min(t_pml)
        row["pml_mb"] = peak_bytes(theirs, emb, labels) / 2**20
    return row


def load_average() -> str:
    """1-minute load average: timings with 2 threads are only meaningful on an idle machine
    (a descheduled OpenMP worker stalls every parallel region)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def fmt(v: float | None, digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ms(median: float | None, low: float | None) -> str:
    return "—" if median is None else f"{median:.2f} ({low:.2f})"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| loss | B | ours ms median (min) | PML ms median (min) | ours / PML median (min) "
        "| ours peak MB | PML peak MB | note |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = "—"
        if r["pml_ms"] is not None:
            ratio = f"{r['ours_ms'] / r['pml_ms']:.3f} ({r['ours_min'] / r['pml_min']:.3f})"
        lines.append(
            f"| {r['loss']} | {r['B']} | {ms(r['ours_ms'], r['ours_min'])} | "
            f"{ms(r['pml_ms'], r['pml_min'])} | {ratio} | {fmt(r['ours_mb'])} | "
            f"{fmt(r['pml_mb'])} | {r['note']} |"
        )
    return "\n".join(lines)


def profile_ours(name: str, b: int, dim: int, k: int) -> None:
    emb, labels = make_batch(b, dim, k)
    fn = make_ours(name)
    for _ in range(2):
        fwd_bwd(fn, emb, labels)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            fwd_bwd(fn, emb, labels)
    print(f"## deepmetric {name}, B = {b}: top ops (3 calls)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ---------------------------------------------------------------------------------------
# ablation: the CPU special paths of deepmetric.losses._autograd, the unit-norm check
# ---------------------------------------------------------------------------------------
def _no_norms(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[0], dtype=x.dtype)


def ablation_switches() -> dict[str, list[tuple[object, str, object]]]:
    """Switch name -> the (object, attribute, value) settings that turn it off."""
    from deepmetric import memory
    from deepmetric.losses import _autograd, pairs

    return {
        # special path: gradient matrices under 1% non-zero multiplied as sparse (CPU)
        "sparse_grad": [(_autograd, "SPARSE_GRAD_DENSITY", 0.0)],
        # special path: masked_logsumexp's exponents clamped at -80 before exp
        "exp_floor": [(_autograd, "exp_nonpositive_", torch.Tensor.exp_)],
        # not a special path: the unit-norm check's row norms (its cost), in the losses and
        # in CrossBatchMemory.enqueue
        "norm_check": [(pairs, "row_norms", _no_norms), (memory, "row_norms", _no_norms)],
    }


ABLATIONS = ("sparse_grad", "exp_floor", "norm_check")
_SAVED: dict[tuple[int, str], object] = {}


def set_switch(name: str, on: bool) -> None:
    """Switch ``name`` of deepmetric.losses on (as shipped) or off."""
    for obj, attr, off_value in ablation_switches()[name]:
        key = (id(obj), attr)
        if key not in _SAVED:
            _SAVED[key] = inspect.getattr_static(obj, attr)
        setattr(obj, attr, _SAVED[key] if on else off_value)


def interleaved(switch: str, step: Callable[[], None], repeats: int) -> dict[bool, list[float]]:
    """Seconds per call of ``step`` with the switch on (True) and off (False), alternating which
    goes first, after two warm-up rounds."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(repeats + 2):
        for on in (True, False) if r % 2 else (False, True):
            set_switch(switch, on)
            start = time.perf_counter()
            step()
            if r >= 2:
                times[on].append(time.perf_counter() - start)
    set_switch(switch, True)
    return times


def ratio_row(label: str, times: dict[bool, list[float]]) -> str:
    on, off = times[True], times[False]
    med_on, med_off = statistics.median(on), statistics.median(off)
    return (
        f"| {label} | {1e3 * med_on:.2f} ({1e3 * min(on):.2f}) | "
        f"{1e3 * med_off:.2f} ({1e3 * min(off):.2f}) | "
        f"{med_on / med_off:.3f} ({min(on) / min(off):.3f}) |"
    )


class Conv4Embedder(torch.nn.Module):
    """Conv-4 (deepmetric.models.conv4) + linear head to ``dim`` + L2 normalisation."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        from deepmetric.models.conv4 import Conv4

        self.backbone = Conv4(in_chans=1)
        self.head = torch.nn.Linear(self.backbone.feature_dim, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images).flatten(1)), dim=1)


def ablate_one(switch: str, name: str, b: int, dim: int, k: int) -> None:
    """Print the with / without rows of one loss at batch size b: loss alone, training step."""
    emb, labels = make_batch(b, dim, k)
    loss_fn = make_ours(name)
    times = interleaved(switch, lambda: fwd_bwd(loss_fn, emb, labels), repeats_for(b))
    print(ratio_row(f"{name} loss, B = {b}", times), flush=True)
    torch.manual_seed(0)
    model = Conv4Embedder(dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.randn(b, 1, 28, 28, generator=torch.Generator().manual_seed(b))

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), labels).backward()
        optimizer.step()

    times = interleaved(switch, train_step, 5)
    print(ratio_row(f"{name} training step (Conv-4), B = {b}", times), flush=True)


def ablate(switch: str, losses: list[str], batch_sizes: list[int], dim: int, k: int) -> None:
    print(f"## --ablate {switch}: with / without it, ms median (min)")
    print("| what | with | without | with / without |")
    print("|---|---:|---:|---:|")
    for name in losses:
        for b in batch_sizes:
            if name != "floor":
                ablate_one(switch, name, b, dim, k)


# ---------------------------------------------------------------------------------------
# proxy losses (--proxy): embeddings against C K learnable proxies
# ---------------------------------------------------------------------------------------
PROXY_OURS: dict[str, dict] = {
    "proxy_anchor": {},
    "proxy_nca": {},
    "soft_triple": {"tau": 0.0},  # PML has no centre regulariser
    "normalized_softmax": {},
    "cosface": {},
    "arcface": {},
}

PROXY_NOTES = {
    "proxy_anchor": "PML ProxyAnchorLoss(margin=0.1, alpha=32): same value",
    "proxy_nca": "PML ProxyNCALoss(softmax_scale=9) = ours at T = 1/9 (ProxyNCA++)",
    "soft_triple": "PML SoftTripleLoss(centers_per_class=10, la=20, gamma=0.1, margin=0.01) = "
    "ours with tau = 0 (timed so: PML has no centre regulariser R; C K = 10 C proxies)",
    "normalized_softmax": "PML NormalizedSoftmaxLoss(temperature=0.05): same value",
    "cosface": "PML CosFaceLoss(margin=0.35, scale=64): same value",
    "arcface": "PML ArcFaceLoss(margin=28.6 degrees, scale=64) = ours at m = 0.5 rad",
}


def pml_proxy_loss(name: str, c: int, dim: int) -> tuple[torch.nn.Module, str, bool]:
    """(PML module, name of its proxy parameter, whether that is (d, C K))."""
    from pytorch_metric_learning import losses

    if name == "proxy_anchor":
        return losses.ProxyAnchorLoss(c, dim, margin=0.1, alpha=32), "proxies", False
    if name == "proxy_nca":
        return losses.ProxyNCALoss(c, dim, softmax_scale=9.0), "proxies", False
    if name == "soft_triple":
        return losses.SoftTripleLoss(c, dim, centers_per_class=10), "fc", True
    if name == "normalized_softmax":
        return losses.NormalizedSoftmaxLoss(c, dim, temperature=0.05), "W", True
    if name == "cosface":
        return losses.CosFaceLoss(c, dim, margin=0.35, scale=64), "W", True
    if name == "arcface":
        return losses.ArcFaceLoss(c, dim, margin=math.degrees(0.5), scale=64), "W", True
    raise ValueError(name)


class ProxyFloor(torch.nn.Module):
    """S = E P^T for (N, d) proxies, forward and backward (autograd: dE = G P, dP = G^T E)."""

    def __init__(self, n: int, dim: int) -> None:
        super().__init__()
        self.proxies = torch.nn.Parameter(torch.randn(n, dim))

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (emb @ self.proxies.T).sum()


def make_proxy_batch(b: int, proxies: torch.Tensor, c: int, seed: int = 0):
    """Random labels of c classes; unit embeddings near their class's first proxy row."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (b,), generator=g)
    per_class = proxies.shape[0] // c
    centre = F.normalize(proxies[labels * per_class], dim=1)
    noise = torch.randn(b, proxies.shape[1], generator=g) / proxies.shape[1] ** 0.5
    return F.normalize(centre + 1.5 * noise, dim=1), labels


def proxy_fwd_bwd(module: torch.nn.Module, emb: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds of one forward + backward (gradients of the embeddings and the proxies)."""
    module.zero_grad(set_to_none=True)
    x = emb.detach().clone().requires_grad_(True)
    start = time.perf_counter()
    loss = module(x, labels)
    loss.backward()
    elapsed = time.perf_counter() - start
    assert torch.isfinite(loss), "non-finite loss"
    return elapsed


def bench_proxy(name: str, b: int, c: int, dim: int, with_pml: bool) -> dict:
    ours = build_loss(name, num_classes=c, embedding_dim=dim, **PROXY_OURS[name])
    emb, labels = make_proxy_batch(b, ours.proxies.detach(), c)
    floor = ProxyFloor(ours.proxies.shape[0], dim)
    modules = {"ours": ours, "floor": floor}
    if with_pml:
        pml, attr, transposed = pml_proxy_loss(name, c, dim)
        with torch.no_grad():
            weight = ours.proxies.T if transposed else ours.proxies
            getattr(pml, attr).copy_(weight)
        v_ours, v_pml = ours(emb, labels).item(), pml(emb, labels).item()
        assert abs(v_ours - v_pml) <= 1e-4 * max(1.0, abs(v_pml)), (v_ours, v_pml)
        modules["pml"] = pml
    repeats = 5 if b * ours.proxies.shape[0] > 10**7 else 11
    times: dict[str, list[float]] = {k: [] for k in modules}
    for r in range(repeats + 2):  # 2 warm-up rounds; the order rotates
        names = list(modules)
        names = names[r % len(names) :] + names[: r % len(names)]
        for key in names:
            t = proxy_fwd_bwd(modules[key], emb, labels)
            if r >= 2:
                times[key].append(t)
    row = {"loss": name, "B": b, "C": c}
    for key, module in modules.items():
        row[f"{key}_ms"] = 1e3 * statistics.median(times[key])
        row[f"{key}_min"] = 1e3 * min(times[key])
        module.zero_grad(set_to_none=True)
        row[f"{key}_mb"] = peak_bytes(module, emb, labels) / 2**20
    return row


def proxy_markdown(rows: list[dict]) -> str:
    lines = [
        "| loss | B | C | ours ms median (min) | PML ms median (min) | floor ms median (min) "
        "| ours / PML | ours / floor | ours peak MB | PML peak MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        pml = "pml_ms" in r
        ratio = f"{r['ours_ms'] / r['pml_ms']:.3f}" if pml else "—"
        lines.append(
            f"| {r['loss']} | {r['B']} | {r['C']:,} | {ms(r['ours_ms'], r['ours_min'])} | "
            f"{ms(r.get('pml_ms'), r.get('pml_min'))} | {ms(r['floor_ms'], r['floor_min'])} | "
            f"{ratio} | {r['ours_ms'] / r['floor_ms']:.3f} | {fmt(r['ours_mb'])} | "
            f"{fmt(r.get('pml_mb'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[80, 256, 1024])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=4, help="samples per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=list(OURS), choices=list(OURS))
    parser.add_argument("--no-pml", action="store_true")
    parser.add_argument("--proxy", action="store_true", help="the proxy losses' table")
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 11318])
    parser.add_argument(
        "--proxy-losses", nargs="+", default=list(PROXY_OURS), choices=list(PROXY_OURS)
    )
    parser.add_argument("--profile", choices=list(OURS), help="profile ours only, then exit")
    parser.add_argument(
        "--ablate", choices=ABLATIONS, help="time ours with and without one switch, then exit"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ablate:
        print(f"load average before: {load_average()}")
        ablate(args.ablate, args.losses, args.batch_sizes, args.dim, args.k)
        print(
            f"torch {torch.__version__}, {args.threads} threads, d = {args.dim}, K = {args.k}, "
            f"load average after: {load_average()}"
        )
        return
    if args.profile:
        for b in args.batch_sizes:
            profile_ours(args.profile, b, args.dim, args.k)
        return
    if args.proxy:
        batch_sizes = args.batch_sizes if "--batch-sizes" in sys.argv else [180, 1024]
        load_before = load_average()
        rows = []
        for name in args.proxy_losses:
            for c in args.classes:
                for b in batch_sizes:
                    rows.append(bench_proxy(name, b, c, args.dim, not args.no_pml))
                    print(proxy_markdown(rows[-1:]).splitlines()[-1], flush=True)
        print(
            f"\ntorch {torch.__version__}, {args.threads} threads, d = {args.dim}, float32 "
            f"CPU, load average before/after: {load_before} / {load_average()}\n"
        )
        print(proxy_markdown(rows))
        print()
        for name in args.proxy_losses:
            print(f"- {name}: {PROXY_NOTES[name]}")
        return
    pml = None if args.no_pml or not pml_available() else pml_factories()
    load_before = load_average()
    rows = []
    for name in args.losses:
        for b in args.batch_sizes:
            row = bench_one(name, b, args.dim, args.k, pml)
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
    print()
    print(
        f"torch {torch.__version__}, {args.threads} threads, d = {args.dim}, K = {args.k}, "
        f"float32 CPU, load average before/after: {load_before} / {load_average()}"
    )
    print()
    print(markdown(rows))
    print()
    for name in args.losses:
        if name in NOTES:
            print(f"- {name}: {NOTES[name]}")


if __name__ == "__main__":
    main()
