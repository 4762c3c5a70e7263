"""deepmetric losses against pytorch-metric-learning 2.9.0 where the definitions coincide,
and tests that show where they differ on purpose (each loss's docstring says how).

PML normalises embeddings inside its distances; both libraries get F.normalize(x) of the
same leaf x, so gradients w.r.t. x are comparable. With references PML excludes no self
pair, which is deepmetric's ``self_index=None``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric.losses import build_loss
from loss_reference import make_case

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
from pytorch_metric_learning import distances, miners, reducers  # noqa: E402

CASES = [("rand6", None), ("pk16", None), ("rand40", None), ("pk16", "noself")]
case_ids = [f"{k}-{r or 'inbatch'}" for k, r in CASES]


def leaves(kind, refs, seed=0):
    """Raw (unnormalised) leaves x, rx and their normalisations."""
    emb, labels, ref, ref_labels, _ = make_case(kind, refs, seed=seed)
    g = torch.Generator().manual_seed(seed + 99)
    # random positive row scales: normalisation is part of the compared function
    x = emb.detach() * (0.5 + torch.rand(len(emb), 1, generator=g, dtype=emb.dtype))
    x.requires_grad_(True)
    rx = None
    if ref is not None:
        rx = ref.detach() * (0.5 + torch.rand(len(ref), 1, generator=g, dtype=ref.dtype))
        rx.requires_grad_(True)
    return x, labels, rx, ref_labels


def run_both(ours_fn, pml_fn, x, labels, rx, ref_labels, pml_kwargs=None, scale=None):
    """Values and gradients w.r.t. the raw leaves of ours (times ``scale(ours_module)``) and
    PML."""
    emb = F.normalize(x, dim=1)
    ref = None if rx is None else F.normalize(rx, dim=1)
    ours = ours_fn(emb, labels, ref, ref_labels)
    if scale is not None:
        ours = ours * scale
    kw = dict(pml_kwargs or {})
    if rx is not None:
        kw.update(ref_emb=ref, ref_labels=ref_labels)
    theirs = pml_fn(emb, labels, **kw)
    inputs = [x] + ([rx] if rx is not None else [])
    g_ours = torch.autograd.grad(ours, inputs, allow_unused=True, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, inputs, allow_unused=True)
    return ours, theirs, g_ours, g_theirs, inputs


def assert_same(ours, theirs, g_ours, g_theirs, inputs, rtol=1e-7):
    assert torch.isfinite(ours)
    assert abs(ours.item() - theirs.item()) <= rtol * max(1.0, abs(theirs.item())), (
        ours.item(),
        theirs.item(),
    )
    for a, b, x in zip(g_ours, g_theirs, inputs):
        a = torch.zeros_like(x) if a is None else a
        b = torch.zeros_like(x) if b is None else b
        err = (a - b).abs().max().item()
        assert err <= rtol * max(1.0, b.abs().max().item()), err


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("neg_margin", [0.5, 0.2])
def test_contrastive_similarity_vs_pml_sum(case, neg_margin):
    """Similarity form: per-pair terms 1 - S and [S - m]_+ are PML's ContrastiveLoss with
    CosineSimilarity, pos_margin=1; PML summed = ours(sum_over_batch) * B
    = ours(mean) * #pairs."""
    x, labels, rx, rl = leaves(*case)
    pml = pml_losses.ContrastiveLoss(
        pos_margin=1.0,
        neg_margin=neg_margin,
        distance=distances.CosineSimilarity(),
        reducer=reducers.SumReducer(),
    )
    sum_loss = build_loss("contrastive", neg_margin=neg_margin, reduction="sum_over_batch")
    b = len(labels)
    assert_same(*run_both(sum_loss, pml, x, labels, rx, rl, scale=b))
    mean_loss = build_loss("contrastive", neg_margin=neg_margin)
    mean_loss(F.normalize(x, dim=1), labels, None if rx is None else F.normalize(rx, dim=1), rl)
    n = int(mean_loss.num_active)
    assert_same(*run_both(mean_loss, pml, x, labels, rx, rl, scale=n))


def test_contrastive_distance_form_differs_from_pml_default():
    """PML's ContrastiveLoss (non-squared hinges, each part averaged over its non-zero
    terms) is not Hadsell's 1/2 D^2, 1/2 [m - D]_+^2 mean over pairs."""
    x, labels, _, _ = leaves("pk16", None)
    emb = F.normalize(x, dim=1)
    ours = build_loss("contrastive", form="distance")(emb, labels)
    theirs = pml_losses.ContrastiveLoss()(emb, labels)
    assert abs(ours.item() - theirs.item()) > 1e-3


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("margin", [0.05, 0.2])
def test_triplet_all_vs_pml(case, squared, margin):
    """mining="all", reduce_all="nonzero" = PML TripletMarginLoss (all triplets,
    AvgNonZeroReducer); squared=True = LpDistance(power=2)."""
    x, labels, rx, rl = leaves(*case)
    dist = distances.LpDistance(power=2 if squared else 1)
    pml = pml_losses.TripletMarginLoss(margin=margin, distance=dist)
    ours = build_loss("triplet", mining="all", margin=margin, squared=squared)
    assert_same(*run_both(ours, pml, x, labels, rx, rl))


@pytest.mark.parametrize("case", CASES, ids=case_ids)
def test_triplet_all_reduce_all_vs_pml_mean(case):
    x, labels, rx, rl = leaves(*case)
    pml = pml_losses.TripletMarginLoss(margin=0.2, reducer=reducers.MeanReducer())
    ours = build_loss("triplet", mining="all", margin=0.2, reduce_all="all")
    assert_same(*run_both(ours, pml, x, labels, rx, rl))


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("squared", [False, True])
def test_triplet_hard_vs_pml_batch_hard(case, squared):
    """Batch-hard = PML BatchHardMiner + TripletMarginLoss averaged over mined anchors."""
    x, labels, rx, rl = leaves(*case)
    dist = distances.LpDistance(power=2 if squared else 1)
    miner = miners.BatchHardMiner(distance=dist)
    pml = pml_losses.TripletMarginLoss(margin=0.2, distance=dist, reducer=reducers.MeanReducer())

    def pml_fn(emb, lab, ref_emb=None, ref_labels=None):
        trip = miner(emb, lab, ref_emb, ref_labels)
        return pml(emb, lab, trip, ref_emb, ref_labels)

    ours = build_loss("triplet", mining="hard", margin=0.2, squared=squared)
    assert_same(*run_both(ours, pml_fn, x, labels, rx, rl))


def test_triplet_semihard_differs_from_pml_semihard_miner():
    """PML's "semihard" miner keeps every triplet with 0 < d_an - d_ap <= margin; FaceNet
    semi-hard takes one negative per positive pair (the closest farther one)."""
    x, labels, _, _ = leaves("rand40", None)
    emb = F.normalize(x, dim=1)
    ours_fn = build_loss("triplet", margin=0.2)
    ours = ours_fn(emb, labels)
    n_pos_pairs = int(((labels[:, None] == labels[None]).sum() - len(labels)).item())
    assert int(ours_fn.num_active) == n_pos_pairs
    trip = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")(emb, labels)
    theirs = pml_losses.TripletMarginLoss(margin=0.2)(emb, labels, trip)
    assert len(trip[0]) != n_pos_pairs
    assert abs(ours.item() - theirs.item()) > 1e-3


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES[:3], ids=case_ids[:3])
@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_lifted_original_vs_pml_in_batch(case, margin):
    x, labels, rx, rl = leaves(*case)
    pml = pml_losses.LiftedStructureLoss(neg_margin=margin, pos_margin=0)
    ours = build_loss("lifted", margin=margin)
    assert_same(*run_both(ours, pml, x, labels, rx, rl))


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("scale", [2.0, 16.0, 40.0])
def test_nca_vs_pml(case, scale):
    """Ours at scale s = PML NCALoss(softmax_scale = s / 2) (squared distance on the sphere)."""
    x, labels, rx, rl = leaves(*case)
    pml = pml_losses.NCALoss(softmax_scale=scale / 2)
    ours = build_loss("nca", scale=scale)
    assert_same(*run_both(ours, pml, x, labels, rx, rl), rtol=1e-6)


def test_nca_raw_fixture_raises_and_normalised_equals_pml():
    """PML's tests feed raw torch.randn rows and PML normalises inside its distance; ours
    assumes unit vectors. On such a fixture ours used to return a silently different value
    (the float64 oracle on the raw rows: 3.82 where PML gives 1.59); now it raises and says how
    to normalise, and on F.normalize of the same rows it equals PML (value and gradient)."""
    from loss_reference import Batch, reference_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(4)
    pml = pml_losses.NCALoss(softmax_scale=1.0)  # PML's default = ours at scale 2
    ours = build_loss("nca", scale=2.0)
    silent, _ = reference_loss("nca", Batch(x, labels), scale=2.0)
    assert abs(silent.item() - pml(x, labels).item()) > 2.0
    with pytest.raises(ValueError, match=r"not L2-normalised.*normalize\(embeddings, dim=1\)"):
        ours(x, labels)
    assert_same(*run_both(ours, pml, x, labels, None, None), rtol=1e-9)


def test_nca_pml_drops_underflowing_anchor():
    """At a large scale in float32 an anchor whose positives are far away has a positive
    probability that underflows to 0: PML silently drops it, we keep its (large) loss."""
    e1 = torch.tensor([1.0, 0.0, 0.0])
    e2 = torch.tensor([0.0, 1.0, 0.0])
    emb = torch.stack([e1, -e1, e1 * 0.99 + e2 * 0.14, e2, e2 * 0.99 + e1 * 0.14])
    emb = F.normalize(emb, dim=1)
    labels = torch.tensor([0, 0, 1, 2, 2])  # anchor 0's positive is opposite: D^2 = 4
    ours_fn = build_loss("nca", scale=100.0)
    ours = ours_fn(emb, labels)
    theirs = pml_losses.NCALoss(softmax_scale=50.0)(emb, labels)
    assert int(ours_fn.num_active) == 4  # anchors 0, 1, 3, 4
    assert torch.isfinite(ours) and ours.item() > 50.0
    emb64 = emb.double()
    want = build_loss("nca", scale=100.0)(emb64, labels)
    assert abs(ours.item() - want.item()) <= 1e-4 * want.item()
    assert theirs.item() < 0.5 * ours.item()  # anchors 0 and 1 underflow in PML


# ---------------------------------------------------------------------------------------
MS_HP = [
    {"alpha": 2.0, "beta": 50.0, "base": 0.5, "epsilon": 0.1},
    {"alpha": 3.0, "beta": 20.0, "base": 0.6, "epsilon": 0.3},
]


@pytest.mark.parametrize("case", CASES, ids=case_ids)
@pytest.mark.parametrize("hp", MS_HP, ids=["default", "custom"])
def test_multi_similarity_vs_pml(case, hp):
    """PML MultiSimilarityLoss + MultiSimilarityMiner divides by B (unmined anchors count
    as 0); ours averages over the active anchors: ours * num_active / B = PML."""
    x, labels, rx, rl = leaves(*case)
    loss = pml_losses.MultiSimilarityLoss(alpha=hp["alpha"], beta=hp["beta"], base=hp["base"])
    miner = miners.MultiSimilarityMiner(epsilon=hp["epsilon"])

    def pml_fn(emb, lab, ref_emb=None, ref_labels=None):
        pairs = miner(emb, lab, ref_emb, ref_labels)
        return loss(emb, lab, pairs, ref_emb, ref_labels)

    ours_fn = build_loss("multi_similarity", **hp)
    ours_fn(F.normalize(x, dim=1), labels, None if rx is None else F.normalize(rx, dim=1), rl)
    factor = int(ours_fn.num_active) / len(labels)
    assert_same(*run_both(ours_fn, pml_fn, x, labels, rx, rl, scale=factor), rtol=1e-6)


def test_multi_similarity_without_mining_vs_pml_no_miner():
    x, labels, _, _ = leaves("pk16", None)  # every anchor has positives and negatives
    pml = pml_losses.MultiSimilarityLoss(alpha=2.0, beta=50.0, base=0.5)
    ours = build_loss("multi_similarity", mining=False)
    assert_same(*run_both(ours, pml, x, labels, None, None), rtol=1e-6)


def test_multi_similarity_pml_divides_by_batch():
    """With invalid anchors (a singleton class) PML's value is ours * B_valid / B < ours."""
    x, labels, _, _ = leaves("pk16", None)
    labels = labels.clone()
    labels[0] = 99  # anchor 0: no positive
    emb = F.normalize(x, dim=1).detach()
    ours_fn = build_loss("multi_similarity")
    ours = ours_fn(emb, labels)
    pairs = miners.MultiSimilarityMiner(epsilon=0.1)(emb, labels)
    theirs = pml_losses.MultiSimilarityLoss()(emb, labels, pairs)
    assert int(ours_fn.num_active) < len(labels)
    assert theirs.item() < ours.item()
    assert theirs.item() == pytest.approx(ours.item() * int(ours_fn.num_active) / len(labels))


# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [*CASES, ("pk16", "self")], ids=[*case_ids, "pk16-self"])
@pytest.mark.parametrize("per_class", [False, True])
def test_margin_vs_pml_given_triplets(case, per_class):
    """Given the same (a, p, n) triplets, ours = PML MarginLoss (DivisorReducer: divided by
    the number of non-zero pair terms), nu = 0."""
    x, labels, rx, rl = leaves(*case)
    emb = F.normalize(x, dim=1)
    ref = None if rx is None else F.normalize(rx, dim=1)
    num_classes = 12 if per_class else None
    ours_fn = build_loss("margin", margin=0.2, beta=1.2, num_classes=num_classes)
    pml = pml_losses.MarginLoss(margin=0.2, beta=1.2, nu=0.0, num_classes=num_classes)
    if per_class:
        betas = torch.linspace(0.9, 1.4, 12)
        with torch.no_grad():
            next(ours_fn.parameters()).copy_(betas)
        pml.beta = betas.clone()
    si = None
    if case[1] == "self":
        _, _, _, _, si = make_case(*case)
    ours = ours_fn(emb, labels, ref, rl, si)
    trip = ours_fn.last_triplets
    kw = {} if ref is None else {"ref_emb": ref, "ref_labels": rl}
    theirs = pml(emb, labels, trip, **kw)
    inputs = [x] + ([rx] if rx is not None else [])
    g_ours = torch.autograd.grad(ours, inputs, retain_graph=True)
    g_theirs = torch.autograd.grad(theirs, inputs, allow_unused=True)
    assert_same(ours, theirs, g_ours, g_theirs, inputs, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# proxy losses: the same proxies copied into PML's parameter (PML's W / fc is proxies^T)
# ---------------------------------------------------------------------------------------
PROXY_DIM = 12


def proxy_case(b=24, c=10, per_class=1, seed=0):
    """Raw leaves x (B, d) of random norms, labels leaving some classes out, proxies."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c - 2, (b,), generator=g)  # classes c-2, c-1 absent
    proxies = torch.randn(c * per_class, PROXY_DIM, generator=g, dtype=torch.float64)
    centre = F.normalize(proxies[labels * per_class], dim=1)
    x = centre + 0.6 * torch.randn(b, PROXY_DIM, generator=g, dtype=torch.float64)
    x = x * (0.5 + torch.rand(b, 1, generator=g, dtype=torch.float64))
    return x.requires_grad_(True), labels, proxies


def ours_with(name, proxies, per_class=1, **hp):
    ours = build_loss(
        name, num_classes=proxies.shape[0] // per_class, embedding_dim=PROXY_DIM, **hp
    ).double()
    with torch.no_grad():
        ours.proxies.copy_(proxies)
    return ours


def compare_proxy_losses(ours, pml, pml_weight, x, labels, transposed, rtol=1e-9):
    """Values and gradients w.r.t. the raw leaf x and the proxies (PML's parameter
    ``pml_weight``, transposed when it is (d, C))."""
    with torch.no_grad():
        pml_weight.copy_(ours.proxies.T if transposed else ours.proxies)
    emb = F.normalize(x, dim=1)
    v_ours, v_pml = ours(emb, labels), pml(emb, labels)
    g_ours = torch.autograd.grad(v_ours, [x, ours.proxies], retain_graph=True)
    g_pml = torch.autograd.grad(v_pml, [x, pml_weight])
    g_pml = (g_pml[0], g_pml[1].T if transposed else g_pml[1])
    assert_same(v_ours, v_pml, g_ours, g_pml, [x, ours.proxies], rtol=rtol)
    return v_ours, v_pml


@pytest.mark.parametrize("hp", [{}, {"alpha": 8.0, "delta": 0.3}])
def test_proxy_anchor_vs_pml(hp):
    x, labels, proxies = proxy_case()
    ours = ours_with("proxy_anchor", proxies, **hp)
    pml = pml_losses.ProxyAnchorLoss(
        10, PROXY_DIM, margin=hp.get("delta", 0.1), alpha=hp.get("alpha", 32.0)
    ).double()
    compare_proxy_losses(ours, pml, pml.proxies, x, labels, transposed=False)


@pytest.mark.parametrize("temperature", [1 / 9, 0.5])
def test_proxy_nca_plus_plus_vs_pml(temperature):
    """ProxyNCA++ = PML's ProxyNCALoss(softmax_scale=1/T) (softmax over all proxies)."""
    x, labels, proxies = proxy_case(seed=1)
    ours = ours_with("proxy_nca", proxies, temperature=temperature)
    pml = pml_losses.ProxyNCALoss(10, PROXY_DIM, softmax_scale=1 / temperature).double()
    compare_proxy_losses(ours, pml, pml.proxies, x, labels, transposed=False)


def test_proxy_nca_differs_from_pml_where_pml_drops_samples():
    """On purpose: a sample whose positive probability underflows to 0 keeps its (large)
    loss here; PML leaves it out of the mean (float32, T = 1/200, one sample on the far side
    of the sphere from its proxy)."""
    x, labels, proxies = proxy_case(seed=2)
    x32, proxies32 = x.detach().float(), proxies.float()
    x32[0] = -proxies32[labels[0]]  # cos = -1 to its own proxy
    emb = F.normalize(x32, dim=1)
    ours = build_loss("proxy_nca", num_classes=10, embedding_dim=PROXY_DIM, temperature=1 / 200)
    pml = pml_losses.ProxyNCALoss(10, PROXY_DIM, softmax_scale=200.0)
    with torch.no_grad():
        ours.proxies.copy_(proxies32)
        pml.proxies.copy_(proxies32)
    per_sample = [ours(emb[i : i + 1], labels[i : i + 1]).item() for i in range(len(labels))]
    assert per_sample[0] > 500  # -log p_y with p_y ~ e^-800
    kept = [v for v in per_sample if v < 80]  # PML keeps exactly the samples with p_y > 0
    assert len(kept) < len(per_sample)
    assert ours(emb, labels).item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-5)
    assert pml(emb, labels).item() == pytest.approx(sum(kept) / len(kept), rel=1e-4)


@pytest.mark.parametrize("hp", [{}, {"scale": 8.0, "margin": 0.2}])
def test_cosface_vs_pml(hp):
    x, labels, proxies = proxy_case(seed=3)
    ours = ours_with("cosface", proxies, **hp)
    pml = pml_losses.CosFaceLoss(
        10, PROXY_DIM, margin=hp.get("margin", 0.35), scale=hp.get("scale", 64.0)
    ).double()
    compare_proxy_losses(ours, pml, pml.W, x, labels, transposed=True)


@pytest.mark.parametrize("hp", [{}, {"scale": 8.0, "margin": 0.3}, {"scale": 4.0, "margin": 2.0}])
def test_arcface_vs_pml(hp):
    """PML's margin is in degrees; both use cos theta - m sin m past pi - m."""
    x, labels, proxies = proxy_case(seed=4)
    ours = ours_with("arcface", proxies, **hp)
    margin_deg = math.degrees(hp.get("margin", 0.5))
    pml = pml_losses.ArcFaceLoss(
        10, PROXY_DIM, margin=margin_deg, scale=hp.get("scale", 64.0)
    ).double()
    compare_proxy_losses(ours, pml, pml.W, x, labels, transposed=True)


@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_normalized_softmax_vs_pml(temperature):
    x, labels, proxies = proxy_case(seed=6)
    ours = ours_with("normalized_softmax", proxies, temperature=temperature)
    pml = pml_losses.NormalizedSoftmaxLoss(10, PROXY_DIM, temperature=temperature).double()
    compare_proxy_losses(ours, pml, pml.W, x, labels, transposed=True)


@pytest.mark.parametrize("hp", [{}, {"scale": 10.0, "gamma": 0.5, "margin": 0.2}])
def test_soft_triple_vs_pml(hp):
    """tau = 0: PML's SoftTripleLoss (which has no centre regulariser)."""
    x, labels, proxies = proxy_case(per_class=3, seed=7)
    ours = ours_with("soft_triple", proxies, per_class=3, centers_per_class=3, tau=0.0, **hp)
    pml = pml_losses.SoftTripleLoss(
        10,
        PROXY_DIM,
        centers_per_class=3,
        la=hp.get("scale", 20.0),
        gamma=hp.get("gamma", 0.1),
        margin=hp.get("margin", 0.01),
    ).double()
    compare_proxy_losses(ours, pml, pml.fc, x, labels, transposed=True)


def test_soft_triple_regulariser_vs_pml_sparse_centers():
    """tau > 0: PML's SoftTripleLoss + SparseCentersRegularizer (weight tau) has the same
    sum and divisor; it adds the smallest float under the root where the official code (and
    ours) adds 1e-5, a relative difference below 1e-5 for centres that are not identical."""
    from pytorch_metric_learning.regularizers import SparseCentersRegularizer

    x, labels, proxies = proxy_case(per_class=3, seed=8)
    ours = ours_with("soft_triple", proxies, per_class=3, centers_per_class=3, tau=0.2)
    pml = pml_losses.SoftTripleLoss(
        10,
        PROXY_DIM,
        centers_per_class=3,
        weight_regularizer=SparseCentersRegularizer(10, 3),
        weight_reg_weight=0.2,
    ).double()
    compare_proxy_losses(ours, pml, pml.fc, x, labels, transposed=True, rtol=1e-5)


@pytest.mark.parametrize(
    "name,pml_cls,attr",
    [
        ("proxy_anchor", "ProxyAnchorLoss", "proxies"),
        ("normalized_softmax", "NormalizedSoftmaxLoss", "W"),
        ("arcface", "ArcFaceLoss", "W"),
    ],
)
def test_proxies_keep_their_dtype_unlike_pml(name, pml_cls, attr):
    """On purpose: PML re-assigns its proxies in place to the input's dtype (float64 input
    makes the parameter float64 for good, PML #309 with fp16 under AMP); ours stay float32."""
    emb = F.normalize(torch.randn(6, PROXY_DIM, dtype=torch.float64), dim=1)
    labels = torch.arange(6) % 4
    ours = build_loss(name, num_classes=4, embedding_dim=PROXY_DIM)
    pml = getattr(pml_losses, pml_cls)(4, PROXY_DIM)
    ours(emb, labels), pml(emb, labels)
    assert ours.proxies.dtype == torch.float32
    assert getattr(pml, attr).dtype == torch.float64
