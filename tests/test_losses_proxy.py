"""Proxy losses against the float64 loop references of tests/loss_reference.py.

Values, gradients w.r.t. the embeddings and the proxies, and active counts on clustered random
batches whose labels leave some classes out; edge cases (one class, one sample, duplicates,
NaN, labels out of range, raw embeddings, a reference set); dtypes (the proxies are never
cast in place); the seeded initialisation; the shared pieces (scaled_unit_rows,
softmax_cross_entropy).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepmetric.losses import LOSSES, PROXY_LOSSES, build_loss
from deepmetric.losses._autograd import cosine_logits_loss
from loss_reference import ProxyBatch, reference_proxy_loss

DIM = 12

# (name, hyper-parameters) covering every variant the oracles know; scales chosen so that
# every term matters in float64 (large defaults are checked separately for finiteness).
CONFIGS = [
    ("proxy_anchor", {}),
    ("proxy_anchor", {"alpha": 8.0, "delta": 0.3}),
    ("proxy_nca", {}),
    ("proxy_nca", {"temperature": 0.5}),
    ("proxy_nca", {"variant": "original"}),
    ("proxy_nca", {"variant": "original", "temperature": 0.25}),
    ("soft_triple", {"centers_per_class": 3}),
    ("soft_triple", {"centers_per_class": 3, "tau": 0.0, "gamma": 0.5, "margin": 0.2}),
    ("soft_triple", {"centers_per_class": 1, "scale": 10.0}),
    ("normalized_softmax", {}),
    ("normalized_softmax", {"temperature": 0.5}),
    ("cosface", {}),
    ("cosface", {"scale": 8.0, "margin": 0.2}),
    ("arcface", {}),
    ("arcface", {"scale": 8.0, "margin": 0.3}),
    ("arcface", {"scale": 4.0, "margin": 2.0}),  # most targets past pi - m: the fallback
]


def cfg_id(cfg):
    name, hp = cfg
    return name + ("-" + ",".join(f"{k}={v}" for k, v in hp.items()) if hp else "")


# (B, C, classes present in the batch): absent classes in every case but "full"
CASES = {"b6c5": (6, 5, 3), "b16c8": (16, 8, 4), "b30c12": (30, 12, 12), "b40c20": (40, 20, 9)}


def make_proxy_case(kind: str, seed: int = 0, dtype=torch.float64, per_class: int = 1):
    """Unit embeddings clustered near their class's proxy (B, DIM) (a leaf), labels (B,) in
    0..C-1 drawn from ``present`` classes, raw proxies (C K, DIM) of norms 0.3-3."""
    b, c, present = CASES[kind]
    g = torch.Generator().manual_seed(100 * seed + b)
    classes = torch.randperm(c, generator=g)[:present]
    labels = classes[torch.randperm(b, generator=g) % present]  # every present class
    proxies = torch.randn(c * per_class, DIM, generator=g, dtype=dtype)
    proxies *= 0.3 + 2.7 * torch.rand(c * per_class, 1, generator=g, dtype=dtype)
    centre = F.normalize(proxies[labels * per_class], dim=1)
    noise = 0.6 * torch.randn(b, DIM, generator=g, dtype=dtype)
    emb = F.normalize(centre + noise, dim=1)
    return emb.requires_grad_(True), labels, proxies


def build(name: str, hp: dict, num_classes: int, proxies: torch.Tensor | None = None):
    """build_loss with num_classes / embedding_dim, in the proxies' dtype, their values
    copied in."""
    loss_fn = build_loss(name, num_classes=num_classes, embedding_dim=DIM, **hp)
    if proxies is not None:
        loss_fn = loss_fn.to(proxies.dtype)
        with torch.no_grad():
            loss_fn.proxies.copy_(proxies)
    return loss_fn


def assert_close(got, want, rtol, what):
    got, want = got.detach().double(), want.detach().double()
    scale = max(1.0, want.abs().max().item())
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} (scale {scale:.3g})"


def check_against_reference(name, hp, emb, labels, proxies, rtol):
    per_class = hp.get("centers_per_class", 10) if name == "soft_triple" else 1
    num_classes = proxies.shape[0] // per_class
    loss_fn = build(name, hp, num_classes, proxies)
    out = loss_fn(emb, labels)
    leaf = proxies.detach().double().clone().requires_grad_(True)
    want, count = reference_proxy_loss(name, ProxyBatch(emb, labels, leaf, per_class), **hp)
    assert out.dim() == 0 and out.dtype == emb.dtype
    assert_close(out, want, rtol, "loss value")
    assert int(loss_fn.num_active) == count
    got_emb, got_proxies = torch.autograd.grad(out, [emb, loss_fn.proxies])
    want_emb, want_proxies = torch.autograd.grad(want, [emb, leaf])
    assert torch.isfinite(got_emb).all() and torch.isfinite(got_proxies).all()
    assert_close(got_emb, want_emb, 5 * rtol, "d/d embeddings")
    assert_close(got_proxies, want_proxies, 5 * rtol, "d/d proxies")
    return out, count


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_matches_reference(cfg, case):
    name, hp = cfg
    per_class = hp.get("centers_per_class", 1)
    emb, labels, proxies = make_proxy_case(case, seed=1, per_class=per_class)
    _, count = check_against_reference(name, hp, emb, labels, proxies, 1e-9)
    if name == "proxy_anchor":
        assert count == CASES[case][2]  # the proxies with a positive


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_float32_matches_reference(cfg):
    """float32 embeddings and proxies: the float64 oracle within float32 rounding."""
    name, hp = cfg
    emb, labels, proxies = make_proxy_case(
        "b16c8", seed=2, per_class=hp.get("centers_per_class", 1)
    )
    emb32 = emb.detach().float().requires_grad_(True)
    check_against_reference(name, hp, emb32, labels, proxies.float(), 2e-5)


def test_cases_are_not_degenerate():
    """The oracle cases exercise both ArcFace branches and proxy-anchor's absent classes."""
    emb, labels, proxies = make_proxy_case("b40c20", seed=1)
    batch = ProxyBatch(emb, labels, proxies)
    angles = [math.acos(batch.cos(i, y).item()) for i, y in enumerate(batch.y)]
    assert min(angles) + 2.0 < math.pi < max(angles) + 2.0  # margin 2.0: both branches
    assert 0 < reference_proxy_loss("proxy_anchor", batch)[1] < batch.C


# ---------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------
EDGE_CONFIGS = [
    ("proxy_anchor", {}),
    ("proxy_nca", {}),
    ("proxy_nca", {"variant": "original"}),
    ("soft_triple", {"centers_per_class": 2}),
    ("normalized_softmax", {}),
    ("cosface", {}),
    ("arcface", {}),
]


def _edge_check(name, hp, emb, labels, num_classes):
    g = torch.Generator().manual_seed(7)
    per_class = hp.get("centers_per_class", 1)
    proxies = torch.randn(num_classes * per_class, DIM, generator=g, dtype=torch.float64)
    out, count = check_against_reference(name, hp, emb, labels, proxies, 1e-9)
    assert torch.isfinite(out) and out.requires_grad
    return out, count


def _unit(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, DIM, generator=g, dtype=torch.float64)).requires_grad_(True)


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=cfg_id)
def test_single_class_in_batch(cfg):
    """Every sample of one class: one proxy anchor with positives, no negative sample for
    it; the other proxies only have negatives."""
    name, hp = cfg
    _, count = _edge_check(name, hp, _unit(6, seed=1), torch.full((6,), 2), 4)
    assert count == (1 if name == "proxy_anchor" else 6)


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=cfg_id)
def test_batch_of_one(cfg):
    name, hp = cfg
    _, count = _edge_check(name, hp, _unit(1, seed=2), torch.tensor([1]), 3)
    assert count == 1


@pytest.mark.parametrize("cfg", [c for c in EDGE_CONFIGS if c[1].get("variant") != "original"])
def test_one_class_in_total(cfg):
    """num_classes = 1: proxy-anchor has no negatives at all, the softmax losses a single
    logit (loss log 1 = 0 up to the margin)."""
    name, hp = cfg
    _edge_check(name, hp, _unit(5, seed=3), torch.zeros(5, dtype=torch.long), 1)


@pytest.mark.parametrize("cfg", EDGE_CONFIGS, ids=cfg_id)
def test_duplicates(cfg):
    """Identical rows (with the same or another label) are ordinary samples."""
    name, hp = cfg
    base = _unit(5, seed=4).detach()
    emb = torch.cat([base, base[:3]]).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 1, 0, 2, 2])
    _edge_check(name, hp, emb, labels, 4)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_embedding_on_its_proxy_has_finite_gradients(name):
    """cos = 1 exactly (an embedding equal to its normalised proxy) at the default scales:
    finite value and gradients (ArcFace's acos slope is infinite there; see its docstring)."""
    loss_fn = build(name, {}, 4)
    emb = F.normalize(loss_fn.proxies.detach()[[0, 10 if name == "soft_triple" else 1]])
    emb = emb.clone().requires_grad_(True)
    out = loss_fn(emb, torch.tensor([0, 1]))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(emb.grad).all()
    assert torch.isfinite(loss_fn.proxies.grad).all()


@pytest.mark.parametrize(
    "cfg",
    [
        ("proxy_anchor", {"alpha": 400.0}),
        ("proxy_nca", {"temperature": 0.001}),
        ("proxy_nca", {"temperature": 0.001, "variant": "original"}),
        ("normalized_softmax", {"temperature": 0.001}),
        ("cosface", {"scale": 1000.0}),
        ("arcface", {"scale": 1000.0}),
        ("soft_triple", {"scale": 1000.0, "gamma": 0.001, "centers_per_class": 3}),
    ],
    ids=cfg_id,
)
def test_large_scales_finite_float32(cfg):
    """Exponents of several hundred: computed in log space, finite values and gradients
    that agree with float64."""
    name, hp = cfg
    emb, labels, proxies = make_proxy_case(
        "b30c12", seed=5, per_class=hp.get("centers_per_class", 1)
    )
    values = []
    for dtype in (torch.float32, torch.float64):
        x = emb.detach().to(dtype).requires_grad_(True)
        loss_fn = build(name, hp, 12, proxies.to(dtype))
        out = loss_fn(x, labels)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(x.grad).all()
        assert torch.isfinite(loss_fn.proxies.grad).all()
        values.append(out.item())
    assert values[0] == pytest.approx(values[1], rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises(name, bad):
    emb = F.normalize(torch.randn(6, DIM), dim=1)
    emb[2, 3] = bad
    with pytest.raises(ValueError, match="embeddings contain NaN or inf"):
        build(name, {}, 4)(emb, torch.arange(6) % 4)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_non_finite_proxies_raise(name):
    loss_fn = build(name, {}, 4)
    with torch.no_grad():
        loss_fn.proxies[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"proxies .* NaN or inf.*optim\.loss_lr"):
        loss_fn(F.normalize(torch.randn(6, DIM), dim=1), torch.arange(6) % 4)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
@pytest.mark.parametrize("bad_label", [4, 17, -1])
def test_labels_out_of_range_raise(name, bad_label):
    labels = torch.tensor([0, 1, 2, bad_label])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=4\)"):
        build(name, {}, 4)(F.normalize(torch.randn(4, DIM), dim=1), labels)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_raw_embeddings_and_wrong_width_raise(name):
    loss_fn = build(name, {}, 4)
    with pytest.raises(ValueError, match="not L2-normalised"):
        loss_fn(3.0 * F.normalize(torch.randn(4, DIM), dim=1), torch.arange(4))
    with pytest.raises(ValueError, match="embedding_dim=12"):
        loss_fn(F.normalize(torch.randn(4, DIM + 1), dim=1), torch.arange(4))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        loss_fn(F.normalize(torch.randn(4, DIM), dim=1), torch.arange(4.0))


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_reference_set_refused(name):
    emb = F.normalize(torch.randn(4, DIM), dim=1)
    with pytest.raises(ValueError, match="takes no reference set"):
        build(name, {}, 4)(emb, torch.arange(4), emb, torch.arange(4))


def test_cross_batch_memory_refuses_a_proxy_loss():
    from deepmetric.memory import CrossBatchMemory

    with pytest.raises(ValueError, match=r"proxy loss.*no pairs"):
        CrossBatchMemory(build("proxy_anchor", {}, 4), size=16, dim=DIM)


def test_constructor_checks():
    with pytest.raises(TypeError, match="num_classes"):
        build_loss("proxy_anchor", embedding_dim=8)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
        build_loss("arcface", num_classes=0, embedding_dim=8)
    with pytest.raises(ValueError, match="embedding_dim must be an integer >= 1"):
        build_loss("cosface", num_classes=3, embedding_dim=2.5)
    with pytest.raises(ValueError, match="variant"):
        build_loss("proxy_nca", num_classes=3, embedding_dim=8, variant="nca")
    with pytest.raises(ValueError, match="needs >= 2 classes"):
        build_loss("proxy_nca", num_classes=1, embedding_dim=8, variant="original")
    with pytest.raises(ValueError, match="temperature"):
        build_loss("normalized_softmax", num_classes=3, embedding_dim=8, temperature=0.0)
    with pytest.raises(ValueError, match="margin"):
        build_loss("arcface", num_classes=3, embedding_dim=8, margin=4.0)
    with pytest.raises(ValueError, match="centers_per_class must be an integer >= 1"):
        build_loss("soft_triple", num_classes=3, embedding_dim=8, centers_per_class=0)
    with pytest.raises(ValueError, match="gamma"):
        build_loss("soft_triple", num_classes=3, embedding_dim=8, gamma=0.0)
    assert set(PROXY_LOSSES) <= set(LOSSES)


# ---------------------------------------------------------------------------------------
# parameters: initialisation, dtypes, state
# ---------------------------------------------------------------------------------------
def test_seeded_initialisation_and_paper_scales():
    a = build_loss("proxy_anchor", num_classes=100, embedding_dim=512, seed=3)
    b = build_loss("proxy_anchor", num_classes=100, embedding_dim=512, seed=3)
    c = build_loss("proxy_anchor", num_classes=100, embedding_dim=512, seed=4)
    assert torch.equal(a.proxies, b.proxies) and not torch.equal(a.proxies, c.proxies)
    assert a.proxies.dtype == torch.float32 and a.proxies.shape == (100, 512)
    assert a.proxies.std().item() == pytest.approx(math.sqrt(2 / 100), rel=0.02)  # fan_out = C
    nca = build_loss("proxy_nca", num_classes=100, embedding_dim=512)
    assert nca.proxies.std().item() == pytest.approx(1 / 8, rel=0.02)
    st = build_loss("soft_triple", num_classes=100, embedding_dim=512)
    assert st.proxies.shape == (1000, 512)
    assert st.proxies.abs().max().item() <= 1 / math.sqrt(1000)
    ns = build_loss("normalized_softmax", num_classes=100, embedding_dim=512)
    assert ns.proxies.abs().max().item() <= 1 / math.sqrt(512)
    arc = build_loss("arcface", num_classes=100, embedding_dim=512)
    assert arc.proxies.std().item() == pytest.approx(0.01, rel=0.02)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_proxies_are_parameters_in_the_state_dict(name):
    loss_fn = build(name, {}, 4)
    assert [n for n, _ in loss_fn.named_parameters()] == ["proxies"]
    other = build_loss(name, num_classes=4, embedding_dim=DIM, seed=9)
    other.load_state_dict(loss_fn.state_dict())
    assert torch.equal(other.proxies, loss_fn.proxies)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_proxies_never_cast_in_place(name):
    """float64 input and bf16 autocast leave the float32 parameter as it is; under autocast
    the loss is the float32 loss of the (bf16-rounded) embeddings."""
    loss_fn = build(name, {}, 4)
    before = loss_fn.proxies.detach().clone()
    labels = torch.arange(6) % 4
    emb64 = F.normalize(torch.randn(6, DIM, dtype=torch.float64), dim=1)
    assert loss_fn(emb64, labels).dtype == torch.float64
    x = torch.randn(6, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb_bf16 = F.normalize(torch.nn.Linear(DIM, DIM)(x), dim=1)
        assert emb_bf16.dtype == torch.bfloat16
        out = loss_fn(emb_bf16, labels)
    assert out.dtype == torch.float32
    assert loss_fn.proxies.dtype == torch.float32 and torch.equal(loss_fn.proxies, before)
    plain = loss_fn(emb_bf16.detach().float(), labels)
    assert out.item() == pytest.approx(plain.item(), rel=1e-6)
    out.backward()
    assert loss_fn.proxies.grad.dtype == torch.float32


def test_proxies_are_trained_by_an_optimizer():
    loss_fn = build("proxy_anchor", {}, 4)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.1)
    before = loss_fn.proxies.detach().clone()
    loss_fn(F.normalize(torch.randn(8, DIM), dim=1), torch.arange(8) % 4).backward()
    opt.step()
    assert not torch.equal(before, loss_fn.proxies.detach())


# ---------------------------------------------------------------------------------------
# shared pieces
# ---------------------------------------------------------------------------------------
def test_cosine_logits_loss_gradcheck():
    """The fused similarity + normalisation backward, for a loss 1/2 sum of squared logits
    (its derivative: the logits), against finite differences; value = the plain formula."""
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)

    def half_square(logits):
        return 0.5 * logits.square().sum(), logits.clone()

    def fn(emb, w):
        return cosine_logits_loss(
            emb, w, torch.linalg.vector_norm(w.detach(), dim=1), 2.5, half_square
        )

    assert torch.autograd.gradcheck(fn, (emb, w))
    plain = 0.5 * (2.5 * emb @ F.normalize(w, dim=1).T).square().sum()
    torch.testing.assert_close(fn(emb, w), plain)


@pytest.mark.parametrize("name", sorted(PROXY_LOSSES))
def test_upstream_gradient_and_retained_graph(name):
    """d(2.5 L) = 2.5 dL, and a retained graph gives the same gradients twice (backward
    does not consume what forward saved)."""
    emb, labels, proxies = make_proxy_case("b16c8", seed=6)
    per_class = 1
    if name == "soft_triple":
        proxies, per_class = proxies.repeat_interleave(2, 0), 2
    hp = {"centers_per_class": 2} if name == "soft_triple" else {}
    loss_fn = build(name, hp, 8, proxies)
    out = loss_fn(emb, labels)
    once = torch.autograd.grad(out, [emb, loss_fn.proxies], retain_graph=True)
    again = torch.autograd.grad(out, [emb, loss_fn.proxies], retain_graph=True)
    scaled = torch.autograd.grad(2.5 * out, [emb, loss_fn.proxies])
    for a, b, c in zip(once, again, scaled):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(c, 2.5 * a)
    assert per_class * 8 == loss_fn.proxies.shape[0]


def test_num_active_units():
    emb = F.normalize(torch.randn(9, DIM), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 1, 3, 3, 3, 3])
    anchor = build("proxy_anchor", {}, 5)
    anchor(emb, labels)
    assert (int(anchor.num_active), anchor.active_unit) == (3, "proxies")
    for name in sorted(set(PROXY_LOSSES) - {"proxy_anchor"}):
        loss_fn = build(name, {}, 5)
        loss_fn(emb, labels)
        assert (int(loss_fn.num_active), loss_fn.active_unit) == (9, "samples")
