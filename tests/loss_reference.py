"""Slow, obvious float64 reference implementations of the deepmetric losses.

Written from the papers' definitions (not from the library code), as explicit Python loops over
anchors, pairs and triplets on 0-d float64 tensors, so that autograd gives the reference
gradients too. Only for small batches (B, M <= ~60). Sources: contrastive, Hadsell, Chopra,
LeCun (CVPR 2006) and the similarity form of Wang et al. (CVPR 2019); triplet, Schroff et al.
(FaceNet, CVPR 2015) and Hermans, Beyer, Leibe (2017); lifted structure, Oh Song et al.
(CVPR 2016) and Deep_Metric's variant (github.com/bnu-wangxun/Deep_metric); binomial
deviance, Yi et al. (ICPR 2014); NCA, Goldberger et al. (NIPS 2004); multi-similarity, Wang
et al. (CVPR 2019); margin loss and its sampling, Wu et al. (ICCV 2017); Recall@k surrogate,
Patel, Tolias, Matas (CVPR 2022). Proxy losses (at the end, on a :class:`ProxyBatch`):
Proxy-Anchor, Kim et al. (CVPR 2020); ProxyNCA, Movshovitz-Attias et al. (ICCV 2017) and
ProxyNCA++, Teh et al. (ECCV 2020); SoftTriple, Qian et al. (ICCV 2019); normalized softmax,
Zhai and Wu (BMVC 2019); CosFace, Wang et al. (CVPR 2018); ArcFace, Deng et al. (CVPR 2019).

Every function takes a :class:`Batch` and returns ``(loss, count)``: the loss as a 0-d float64
tensor connected to the inputs (an exact zero with a graph when nothing is valid) and the
number of items (anchors, pairs or triplets) it was averaged over.

Conventions shared by every loss:
- S_ik = <f_i, r_k>; D_ik = sqrt(2 - 2 S_ik) (the clamp at 1e-12 under the root only matters
  for exact duplicates and mirrors the documented `Pairs.distance`).
- Without references the references are the batch and k = i is excluded. With references
  only k = self_index[i] is excluded (self_index None or -1: nothing excluded).
- P_i = {k != self : y_k = y_i}, N_i = {k : y_k != y_i}.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MS_PRESETS = {
    "paper": {"alpha": 2.0, "beta": 50.0, "base": 1.0, "epsilon": 0.1},
    "code": {"alpha": 2.0, "beta": 40.0, "base": 0.5, "epsilon": 0.1},
}


class Batch:
    """Anchors x references with scalar access to S, D and the pair sets."""

    def __init__(
        self,
        emb: Tensor,
        labels: Tensor,
        ref_emb: Tensor | None = None,
        ref_labels: Tensor | None = None,
        self_index: Tensor | None = None,
    ) -> None:
        self.emb = emb
        e = emb.double()
        self.B = e.shape[0]
        self.in_batch = ref_emb is None
        if ref_emb is None:
            r = e
            self.y = [int(v) for v in labels.tolist()]
            self.yr = list(self.y)
            self.self_slot = list(range(self.B))
        else:
            r = ref_emb.double()
            self.y = [int(v) for v in labels.tolist()]
            self.yr = [int(v) for v in ref_labels.tolist()]
            if self_index is None:
                self.self_slot = [-1] * self.B
            else:
                self.self_slot = [int(v) for v in self_index.tolist()]
        self.M = r.shape[0]
        self._e = [e[i] for i in range(self.B)]
        self._r = [r[k] for k in range(self.M)]
        self._S: dict[tuple[int, int], Tensor] = {}
        self._D: dict[tuple[int, int], Tensor] = {}

    # scalar access -------------------------------------------------------------------
    def S(self, i: int, k: int) -> Tensor:
        key = (i, k)
        if key not in self._S:
            self._S[key] = torch.dot(self._e[i], self._r[k])
        return self._S[key]

    def D(self, i: int, k: int) -> Tensor:
        key = (i, k)
        if key not in self._D:
            self._D[key] = torch.sqrt(torch.clamp(2.0 - 2.0 * self.S(i, k), min=1e-12))
        return self._D[key]

    def is_pos(self, i: int, k: int) -> bool:
        return self.yr[k] == self.y[i] and k != self.self_slot[i]

    def is_neg(self, i: int, k: int) -> bool:
        return self.yr[k] != self.y[i]

    def P(self, i: int) -> list[int]:
        return [k for k in range(self.M) if self.is_pos(i, k)]

    def N(self, i: int) -> list[int]:
        return [k for k in range(self.M) if self.is_neg(i, k)]

    def not_self(self, i: int) -> list[int]:
        return [k for k in range(self.M) if k != self.self_slot[i]]

    def zero(self) -> Tensor:
        return self.emb.sum() * 0.0


# scalar helpers ---------------------------------------------------------------------------
def _v(x: Tensor) -> float:
    return x.detach().item()


def relu(x: Tensor) -> Tensor:
    return torch.clamp(x, min=0.0)


def softplus(x: Tensor) -> Tensor:
    """log(1 + e^x), stable."""
    return torch.clamp(x, min=0.0) + torch.log1p(torch.exp(-torch.abs(x)))


def lse(xs: list[Tensor], include_zero: bool = False) -> Tensor:
    """log(sum_k e^{x_k}) (+ e^0 when include_zero), shift by the (detached) max."""
    vals = list(xs)
    m = max(v.detach().item() for v in vals) if vals else -math.inf
    if include_zero:
        m = max(m, 0.0)
    total = sum(torch.exp(v - m) for v in vals)
    if include_zero:
        total = total + math.exp(-m)
    return m + torch.log(total)


def mean_of(terms: list[Tensor], batch: Batch) -> Tensor:
    if not terms:
        return batch.zero()
    return sum(terms) / len(terms)


# contrastive (Hadsell et al. 2006; similarity form: Wang et al. 2019) ---------------------
def contrastive(
    batch: Batch,
    form: str = "similarity",
    pos_margin: float | None = None,
    neg_margin: float | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, int]:
    terms = []
    for i in range(batch.B):
        for k in range(batch.M):
            if form == "similarity":
                pm = 1.0 if pos_margin is None else pos_margin
                nm = 0.5 if neg_margin is None else neg_margin
                if batch.is_pos(i, k):
                    terms.append(relu(pm - batch.S(i, k)))
                elif batch.is_neg(i, k):
                    terms.append(relu(batch.S(i, k) - nm))
            else:
                pm = 0.0 if pos_margin is None else pos_margin
                nm = 1.0 if neg_margin is None else neg_margin
                if batch.is_pos(i, k):
                    terms.append(0.5 * relu(batch.D(i, k) - pm) ** 2)
                elif batch.is_neg(i, k):
                    terms.append(0.5 * relu(nm - batch.D(i, k)) ** 2)
    if not terms:
        return batch.zero(), 0
    if reduction == "mean":
        return sum(terms) / len(terms), len(terms)
    return sum(terms) / batch.B, len(terms)


# triplet (Schroff et al. 2015; Hermans et al. 2017) ---------------------------------------
def triplet(
    batch: Batch,
    margin: float = 0.2,
    mining: str = "semihard",
    squared: bool = False,
    soft: bool = False,
    reduce_all: str = "nonzero",
) -> tuple[Tensor, int]:
    def d(i: int, k: int) -> Tensor:
        return batch.D(i, k) ** 2 if squared else batch.D(i, k)

    def term(dap: Tensor, dan: Tensor) -> Tensor:
        return softplus(dap - dan) if soft else relu(dap - dan + margin)

    terms = []
    if mining == "semihard":
        for a in range(batch.B):
            negs = batch.N(a)
            if not negs:
                continue
            for p in batch.P(a):
                dap = d(a, p)
                farther = [n for n in negs if _v(d(a, n)) > _v(dap)]
                if farther:
                    n_star = min(farther, key=lambda n: _v(d(a, n)))
                else:
                    n_star = max(negs, key=lambda n: _v(d(a, n)))
                terms.append(term(dap, d(a, n_star)))
        return mean_of(terms, batch), len(terms)
    if mining == "hard":
        for a in range(batch.B):
            pos, negs = batch.P(a), batch.N(a)
            if not pos or not negs:
                continue
            hardest_p = max((d(a, p) for p in pos), key=_v)
            hardest_n = min((d(a, n) for n in negs), key=_v)
            terms.append(term(hardest_p, hardest_n))
        return mean_of(terms, batch), len(terms)
    if mining == "all":
        for a in range(batch.B):
            negs = batch.N(a)
            for p in batch.P(a):
                for n in negs:
                    terms.append(term(d(a, p), d(a, n)))
        if reduce_all == "nonzero":
            terms = [t for t in terms if _v(t) > 0.0]
        return mean_of(terms, batch), len(terms)
    raise ValueError(mining)


# lifted structure (Oh Song et al. 2016; Deep_Metric's modified variant) -------------------
def lifted_original(batch: Batch, margin: float = 1.0) -> tuple[Tensor, int]:
    """In-batch: unordered positive pairs (i, j), J_ij = log(sum_{N_i} e^{m - D_ik}
    + sum_{N_j} e^{m - D_jl}) + D_ij, L = 1/(2|P|) sum [J]_+^2 over pairs with a negative on
    either side.

    With references (documented choice): ordered pairs (anchor i, positive reference j),
    anchor side only, J_ij = log sum_{N_i} e^{m - D_ik} + D_ij, over pairs whose anchor has a
    negative; same 1/(2|P|) normalisation.
    """
    terms = []
    if batch.in_batch:
        for i in range(batch.B):
            for j in range(i + 1, batch.B):
                if batch.y[i] != batch.y[j]:
                    continue
                exps = [margin - batch.D(i, k) for k in batch.N(i)]
                exps += [margin - batch.D(j, k) for k in batch.N(j)]
                if not exps:
                    continue
                J = lse(exps) + batch.D(i, j)
                terms.append(relu(J) ** 2 / 2.0)
        return mean_of(terms, batch), len(terms)
    for i in range(batch.B):
        negs = batch.N(i)
        if not negs:
            continue
        for j in batch.P(i):
            J = lse([margin - batch.D(i, k) for k in negs]) + batch.D(i, j)
            terms.append(relu(J) ** 2 / 2.0)
    return mean_of(terms, batch), len(terms)


def lifted_modified(batch: Batch, alpha: float = 40.0, beta: float = 2.0) -> tuple[Tensor, int]:
    terms = []
    for i in range(batch.B):
        pos, negs = batch.P(i), batch.N(i)
        if not pos or not negs:
            continue
        lp = lse([-beta * batch.S(i, k) for k in pos])
        ln = lse([alpha * batch.S(i, k) for k in negs])
        terms.append((2.0 / beta) * lp + (2.0 / alpha) * ln)
    return mean_of(terms, batch), len(terms)


def lifted(batch: Batch, variant: str = "original", **kw) -> tuple[Tensor, int]:
    if variant == "original":
        return lifted_original(batch, **kw)
    return lifted_modified(batch, **kw)


# binomial deviance (Yi et al. 2014) -------------------------------------------------------
def binomial(
    batch: Batch,
    scale_pos: float = 2.0,
    threshold: float = 0.5,
    neg_cost: float = 25.0,
    weighting: str = "batch",
) -> tuple[Tensor, int]:
    a, lam, c = scale_pos, threshold, neg_cost

    def pos_term(s: Tensor) -> Tensor:
        return softplus(-a * (s - lam))

    def neg_term(s: Tensor) -> Tensor:
        return softplus(a * c * (s - lam))

    if weighting == "batch":
        pos_terms, neg_terms = [], []
        for i in range(batch.B):
            for k in range(batch.M):
                if batch.is_pos(i, k):
                    pos_terms.append(pos_term(batch.S(i, k)))
                elif batch.is_neg(i, k):
                    neg_terms.append(neg_term(batch.S(i, k)))
        if not pos_terms and not neg_terms:
            return batch.zero(), 0
        loss = batch.zero()
        if pos_terms:
            loss = loss + sum(pos_terms) / len(pos_terms)
        if neg_terms:
            loss = loss + sum(neg_terms) / len(neg_terms)
        return loss, len(pos_terms) + len(neg_terms)
    terms = []
    for i in range(batch.B):
        pos, negs = batch.P(i), batch.N(i)
        if not pos or not negs:
            continue
        lp = sum(pos_term(batch.S(i, k)) for k in pos) / len(pos)
        ln = sum(neg_term(batch.S(i, k)) for k in negs) / len(negs)
        terms.append(lp + ln)
    return mean_of(terms, batch), len(terms)


# NCA (Goldberger et al. 2004) -------------------------------------------------------------
def nca(batch: Batch, scale: float = 16.0) -> tuple[Tensor, int]:
    terms = []
    for i in range(batch.B):
        pos = batch.P(i)
        if not pos:
            continue
        num = lse([scale * batch.S(i, k) for k in pos])
        den = lse([scale * batch.S(i, k) for k in batch.not_self(i)])
        terms.append(-(num - den))
    return mean_of(terms, batch), len(terms)


# multi-similarity (Wang et al. 2019) ------------------------------------------------------
def multi_similarity(
    batch: Batch,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float = 0.1,
    mining: bool = True,
    preset: str | None = None,
) -> tuple[Tensor, int]:
    if preset is not None:
        p = MS_PRESETS[preset]
        alpha, beta, base, epsilon = p["alpha"], p["beta"], p["base"], p["epsilon"]
    terms = []
    for i in range(batch.B):
        pos, negs = batch.P(i), batch.N(i)
        if not pos or not negs:
            continue
        min_pos = min(_v(batch.S(i, k)) for k in pos)
        max_neg = max(_v(batch.S(i, k)) for k in negs)
        mined_neg = [k for k in negs if _v(batch.S(i, k)) + epsilon > min_pos]
        mined_pos = [k for k in pos if _v(batch.S(i, k)) - epsilon < max_neg]
        if not mining:
            mined_neg, mined_pos = negs, pos
        assert bool(mined_pos) == bool(mined_neg)
        if not mined_pos:
            continue
        lp = lse([-alpha * (batch.S(i, k) - base) for k in mined_pos], include_zero=True)
        ln = lse([beta * (batch.S(i, k) - base) for k in mined_neg], include_zero=True)
        terms.append(lp / alpha + ln / beta)
    return mean_of(terms, batch), len(terms)


# margin loss (Wu et al. 2017), given the sampled triplets ---------------------------------
def margin_given_triplets(
    batch: Batch,
    triplets: tuple[Tensor, Tensor, Tensor],
    beta: Tensor,
    margin: float = 0.2,
    nu: float = 0.0,
) -> tuple[Tensor, int]:
    """beta: (1,) global or (C,) per class (float64, may require grad)."""
    a_idx, p_idx, n_idx = (t.tolist() for t in triplets)
    terms = []
    betas = []
    for a, p, n in zip(a_idx, p_idx, n_idx):
        b = beta[0] if beta.numel() == 1 else beta[batch.y[a]]
        betas.append(b)
        terms.append(relu(margin + batch.D(a, p) - b))
        terms.append(relu(margin - (batch.D(a, n) - b)))
    active = sum(1 for t in terms if _v(t) > 0.0)
    if active == 0:
        return batch.zero() + 0.0 * beta.sum(), 0
    total = sum(terms)
    if nu:
        total = total + nu * 2 * sum(betas)  # beta_a once per pair: (a, p) and (a, n)
    return total / active, active


def margin_sampling_probs(
    batch: Batch, cutoff: float = 0.5, nonzero_loss_cutoff: float = 1.4
) -> list[dict[int, float]]:
    """Per anchor: {reference index: probability} of the distance-weighted negative draw."""
    dim = batch._e[0].shape[0]
    out = []
    for a in range(batch.B):
        negs = batch.N(a)
        logw = {}
        for n in negs:
            dist = _v(batch.D(a, n))
            if dist >= nonzero_loss_cutoff:
                continue
            x = max(dist, cutoff)
            logw[n] = (2.0 - dim) * math.log(x) - ((dim - 3.0) / 2.0) * math.log(1.0 - x * x / 4.0)
        if logw:
            m = max(logw.values())
            w = {n: math.exp(v - m) for n, v in logw.items()}
            z = sum(w.values())
            out.append({n: v / z for n, v in w.items()})
        elif negs:
            out.append({n: 1.0 / len(negs) for n in negs})
        else:
            out.append({})
    return out


# Recall@k surrogate (Patel, Tolias, Matas, CVPR 2022) ---------------------------------------
def recall_surrogate_ranks(
    batch: Batch, q: int, rank_temperature: float = 0.01, count_query_in_rank: bool = False
) -> dict[int, Tensor]:
    """{positive p: r(q, p) = 1 + sum over the other references j (not q's own slot, not p)
    of sigma((S_qj - S_qp) / tau2)}, plus sigma((s_qq - S_qp) / tau2) when the query counts,
    s_qq = <q, q> in-batch and 1 with references."""
    ranks = {}
    for p in batch.P(q):
        r = 1.0 + sum(
            torch.sigmoid((batch.S(q, j) - batch.S(q, p)) / rank_temperature)
            for j in batch.not_self(q)
            if j != p
        )
        if count_query_in_rank:
            s_qq = batch.S(q, q) if batch.in_batch else torch.tensor(1.0, dtype=torch.float64)
            r = r + torch.sigmoid((s_qq - batch.S(q, p)) / rank_temperature)
        ranks[p] = r
    return ranks


def recall_surrogate(
    batch: Batch,
    k_values: tuple[int, ...] = (1, 2, 4, 8, 16),
    rank_temperature: float = 0.01,
    k_temperature: float = 1.0,
    count_query_in_rank: bool = False,
    clip: bool = True,
) -> tuple[Tensor, int]:
    """Mean over queries with a positive of 1 - mean_k R_k(q), R_k(q) = min(sum_p
    sigma((k - r(q, p)) / tau1), k) / min(k, |P_q|) (no min with clip=False); k capped at M."""
    ks = [min(k, batch.M) for k in k_values]
    terms = []
    for q in range(batch.B):
        ranks = recall_surrogate_ranks(batch, q, rank_temperature, count_query_in_rank)
        if not ranks:
            continue
        recalls = []
        for k in ks:
            total = sum(torch.sigmoid((k - r) / k_temperature) for r in ranks.values())
            if clip and _v(total) > k:
                total = total * 0.0 + k
            recalls.append(total / min(k, len(ranks)))
        terms.append(1.0 - sum(recalls) / len(recalls))
    return mean_of(terms, batch), len(terms)


ORACLES = {
    "contrastive": contrastive,
    "triplet": triplet,
    "lifted": lifted,
    "binomial": binomial,
    "nca": nca,
    "multi_similarity": multi_similarity,
    "recall_surrogate": recall_surrogate,
}


def reference_loss(name: str, batch: Batch, **hparams) -> tuple[Tensor, int]:
    """Reference value and count for every loss except "margin" (see margin_given_triplets)."""
    return ORACLES[name](batch, **hparams)


# proxy losses -----------------------------------------------------------------------------
class ProxyBatch:
    """Embeddings x proxies with scalar access: the proxies are normalised here, one row at a
    time with plain operations (autograd gives the reference gradients w.r.t. them)."""

    def __init__(self, emb: Tensor, labels: Tensor, proxies: Tensor, per_class: int = 1) -> None:
        self.emb = emb
        self.B = emb.shape[0]
        self.y = [int(v) for v in labels.tolist()]
        self.K = per_class
        self.C = proxies.shape[0] // per_class
        self._e = [emb.double()[i] for i in range(self.B)]
        self._p = []
        for row in proxies.double():
            self._p.append(row / torch.sqrt((row * row).sum()))
        self.proxies = proxies

    def cos(self, i: int, c: int, k: int = 0) -> Tensor:
        """cos(x_i, centre k of class c)."""
        return torch.dot(self._e[i], self._p[c * self.K + k])

    def sq_dist(self, i: int, c: int) -> Tensor:
        """||x_i - p_c / ||p_c||||^2, written as a squared difference."""
        diff = self._e[i] - self._p[c]
        return (diff * diff).sum()

    def centre_dot(self, c: int, k: int, k2: int) -> Tensor:
        return torch.dot(self._p[c * self.K + k], self._p[c * self.K + k2])

    def zero(self) -> Tensor:
        return self.emb.sum() * 0.0 + self.proxies.sum() * 0.0


def _cross_entropy(logits: list[list[Tensor]], y: list[int], exclude_target: bool = False):
    """Mean over rows of LSE(row) - row[y] (LSE over the other entries with exclude_target)."""
    terms = []
    for row, t in zip(logits, y):
        others = [z for c, z in enumerate(row) if c != t] if exclude_target else row
        terms.append(lse(others) - row[t])
    return sum(terms) / len(terms)


def proxy_anchor(batch: ProxyBatch, alpha: float = 32.0, delta: float = 0.1):
    pos_terms, neg_terms = [], []
    for c in range(batch.C):
        pos = [i for i in range(batch.B) if batch.y[i] == c]
        neg = [i for i in range(batch.B) if batch.y[i] != c]
        if pos:
            xs = [-alpha * (batch.cos(i, c) - delta) for i in pos]
            pos_terms.append(lse(xs, include_zero=True))
        if neg:
            neg_terms.append(lse([alpha * (batch.cos(i, c) + delta) for i in neg], True))
    value = sum(pos_terms) / len(pos_terms) + (sum(neg_terms) + batch.zero()) / batch.C
    return value, len(pos_terms)


def proxy_nca(batch: ProxyBatch, temperature: float = 1.0 / 9.0, variant: str = "plus_plus"):
    logits = [[-batch.sq_dist(i, c) / temperature for c in range(batch.C)] for i in range(batch.B)]
    return _cross_entropy(logits, batch.y, exclude_target=variant == "original"), batch.B


def normalized_softmax(batch: ProxyBatch, temperature: float = 0.05):
    logits = [[batch.cos(i, c) / temperature for c in range(batch.C)] for i in range(batch.B)]
    return _cross_entropy(logits, batch.y), batch.B


def cosface(batch: ProxyBatch, scale: float = 64.0, margin: float = 0.35):
    logits = [
        [scale * (batch.cos(i, c) - (margin if c == batch.y[i] else 0.0)) for c in range(batch.C)]
        for i in range(batch.B)
    ]
    return _cross_entropy(logits, batch.y), batch.B


def arcface(batch: ProxyBatch, scale: float = 64.0, margin: float = 0.5):
    """Target logit s cos(theta + m) with theta = acos(cos) while theta + m <= pi, else
    s (cos theta - m sin m)."""
    logits = []
    for i in range(batch.B):
        row = []
        for c in range(batch.C):
            cos = batch.cos(i, c)
            if c == batch.y[i]:
                theta = torch.acos(cos)
                if _v(theta) + margin <= math.pi:
                    cos = torch.cos(theta + margin)
                else:
                    cos = cos - margin * math.sin(margin)
            row.append(scale * cos)
        logits.append(row)
    return _cross_entropy(logits, batch.y), batch.B


def soft_triple(
    batch: ProxyBatch,
    centers_per_class: int = 10,
    scale: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    tau: float = 0.2,
):
    assert centers_per_class == batch.K
    logits = []
    for i in range(batch.B):
        row = []
        for c in range(batch.C):
            s = [batch.cos(i, c, k) for k in range(batch.K)]
            m = max(_v(v) for v in s)
            w = [torch.exp((v - m) / gamma) for v in s]
            relaxed = sum(wk * sk for wk, sk in zip(w, s)) / sum(w)
            row.append(scale * (relaxed - (margin if c == batch.y[i] else 0.0)))
        logits.append(row)
    value = _cross_entropy(logits, batch.y)
    if tau > 0 and batch.K > 1:
        reg = []
        for c in range(batch.C):
            for k in range(batch.K):
                for k2 in range(k + 1, batch.K):
                    reg.append(torch.sqrt(2.0 + 1e-5 - 2.0 * batch.centre_dot(c, k, k2)))
        value = value + tau * sum(reg) / (batch.C * batch.K * (batch.K - 1))
    return value, batch.B


PROXY_ORACLES = {
    "proxy_anchor": proxy_anchor,
    "proxy_nca": proxy_nca,
    "soft_triple": soft_triple,
    "normalized_softmax": normalized_softmax,
    "cosface": cosface,
    "arcface": arcface,
}


def reference_proxy_loss(name: str, batch: ProxyBatch, **hparams) -> tuple[Tensor, int]:
    """Reference value and count of proxy loss ``name`` (hparams without num_classes,
    embedding_dim and seed)."""
    return PROXY_ORACLES[name](batch, **hparams)


# test data --------------------------------------------------------------------------------
CASE_SIZES = {"rand6": (6, 3), "pk16": (16, 4), "rand40": (40, 10)}


def make_case(
    kind: str,
    refs: str | None = None,
    seed: int = 0,
    dim: int = 16,
    dtype: torch.dtype = torch.float64,
    spread: float = 0.25,
):
    """A clustered L2-normalised batch (leaf tensor requiring grad) and optional references.

    kind: "rand6" (B = 6, random labels of 3 classes), "pk16" (P x K = 4 x 4), "rand40"
    (B = 40, random labels of 10 classes).
    refs: None (in-batch); "self" (20 random references with overlapping labels, plus copies
    of half the anchors at random slots named by self_index, plus one extra non-self copy of
    one of those anchors, a genuine duplicate positive); "noself" (20 random references,
    self_index None). The reference tensor is a leaf requiring grad.
    Returns (emb, labels, ref_emb, ref_labels, self_index).
    """
    b, c = CASE_SIZES[kind]
    gen = torch.Generator().manual_seed(1000 * seed + b)
    if kind.startswith("pk"):
        labels = torch.arange(c).repeat_interleave(b // c)
    else:
        labels = torch.randint(0, c, (b,), generator=gen)
        labels[1] = labels[0]  # at least one positive pair
    centers = torch.nn.functional.normalize(torch.randn(c + 2, dim, generator=gen, dtype=dtype))

    def sample(lbl: Tensor) -> Tensor:
        noise = spread * torch.randn(len(lbl), dim, generator=gen, dtype=dtype)
        return torch.nn.functional.normalize(centers[lbl] + noise)

    emb = sample(labels)
    if refs is None:
        return emb.requires_grad_(True), labels, None, None, None
    m0 = 20
    rl = torch.randint(0, c + 2, (m0,), generator=gen)
    r = sample(rl)
    if refs == "noself":
        return emb.requires_grad_(True), labels, r.requires_grad_(True), rl, None
    copies = torch.randperm(b, generator=gen)[: b // 2]
    extra = copies[:1]
    r = torch.cat([r, emb[copies], emb[extra]])
    rl = torch.cat([rl, labels[copies], labels[extra]])
    perm = torch.randperm(len(rl), generator=gen)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(len(perm))
    r, rl = r[perm].contiguous(), rl[perm].contiguous()
    self_index = torch.full((b,), -1, dtype=torch.long)
    self_index[copies] = inv[m0 + torch.arange(len(copies))]
    return emb.requires_grad_(True), labels, r.requires_grad_(True), rl, self_index
