"""Metric learning losses, all with one call:

    loss(embeddings (B, d), labels (B,), ref_emb=None (M, d), ref_labels=None (M,),
         self_index=None (B,)) -> scalar

Embeddings and references must be L2-normalised (row norms 1 +- 0.01; anything else, NaN and
inf included, raises an ``EmbeddingError``, a ValueError saying how to normalise). Build a loss
by name with ``build_loss(name, **hparams)``.
"Deep_Metric" in the docstrings is the reference code github.com/bnu-wangxun/Deep_metric.

Two families:
- pair-based losses (``PAIR_LOSSES``) compare embeddings with each other, in the batch or
  against a reference set (cross-batch memory, a gathered batch);
- proxy-based losses (``PROXY_LOSSES``) compare each embedding with learnable class proxies,
  an ``nn.Parameter`` of the loss built from ``num_classes`` and ``embedding_dim`` (both
  required); they take no reference set.

Modules: ``pairs`` (PairLoss, Pairs, build_pairs and the input checks shared by every loss),
``proxies`` (ProxyLoss and the machinery shared by the proxy losses), one module per loss
family, and the private ``_autograd`` (hand-written backward passes).
"""

from __future__ import annotations

from torch import nn

from ._autograd import masked_logsumexp
from .binomial import BinomialDevianceLoss
from .contrastive import ContrastiveLoss
from .lifted import LiftedStructureLoss
from .margin import MarginLoss
from .margin_softmax import ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss
from .multi_similarity import MultiSimilarityLoss
from .nca import NCALoss
from .pairs import EmbeddingError, PairLoss, Pairs, build_pairs, check_unit_norms, row_norms
from .proxies import ProxyLoss
from .proxy_anchor import ProxyAnchorLoss
from .proxy_nca import ProxyNCALoss
from .recall_surrogate import RecallSurrogateLoss
from .soft_triple import SoftTripleLoss
from .triplet import TripletLoss

PAIR_LOSSES: dict[str, type[PairLoss]] = {
    "contrastive": ContrastiveLoss,
    "triplet": TripletLoss,
    "lifted": LiftedStructureLoss,
    "binomial": BinomialDevianceLoss,
    "nca": NCALoss,
    "multi_similarity": MultiSimilarityLoss,
    "margin": MarginLoss,
    "recall_surrogate": RecallSurrogateLoss,
}
PROXY_LOSSES: dict[str, type[ProxyLoss]] = {
    "proxy_anchor": ProxyAnchorLoss,
    "proxy_nca": ProxyNCALoss,
    "soft_triple": SoftTripleLoss,
    "normalized_softmax": NormalizedSoftmaxLoss,
    "cosface": CosFaceLoss,
    "arcface": ArcFaceLoss,
}
LOSSES: dict[str, type[nn.Module]] = {**PAIR_LOSSES, **PROXY_LOSSES}


def build_loss(name: str, **hparams) -> nn.Module:
    """The loss called ``name`` (a key of ``LOSSES``) with the given hyper-parameters.

    Unknown names raise ValueError listing the choices; unknown hyper-parameters raise
    TypeError naming them. A proxy loss needs ``num_classes`` and ``embedding_dim``.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    cls = LOSSES[name]
    try:
        return cls(**hparams)
    except TypeError as err:
        raise TypeError(f"loss {name!r}: {err}") from err


__all__ = [
    "LOSSES",
    "PAIR_LOSSES",
    "PROXY_LOSSES",
    "ArcFaceLoss",
    "BinomialDevianceLoss",
    "ContrastiveLoss",
    "CosFaceLoss",
    "EmbeddingError",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NCALoss",
    "NormalizedSoftmaxLoss",
    "PairLoss",
    "Pairs",
    "ProxyAnchorLoss",
    "ProxyLoss",
    "ProxyNCALoss",
    "RecallSurrogateLoss",
    "SoftTripleLoss",
    "TripletLoss",
    "build_loss",
    "build_pairs",
    "check_unit_norms",
    "masked_logsumexp",
    "row_norms",
]
