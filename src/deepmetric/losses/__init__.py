"""Pair-based metric learning losses, all with one call:

    loss(embeddings (B, d), labels (B,), ref_emb=None (M, d), ref_labels=None (M,),
         self_index=None (B,)) -> scalar

Embeddings and references must be L2-normalised (row norms 1 +- 0.01; anything else, NaN and
inf included, raises an ``EmbeddingError``, a ValueError saying how to normalise). Build a loss
by name with ``build_loss(name, **hparams)``.
"Deep_Metric" in the docstrings is the reference code github.com/bnu-wangxun/Deep_metric.

Modules: ``pairs`` (PairLoss, Pairs, build_pairs and the input checks shared by every loss),
one module per loss, and the private ``_autograd`` (hand-written backward passes).
"""

from __future__ import annotations

from torch import nn

from ._autograd import masked_logsumexp
from .binomial import BinomialDevianceLoss
from .contrastive import ContrastiveLoss
from .lifted import LiftedStructureLoss
from .margin import MarginLoss
from .multi_similarity import MultiSimilarityLoss
from .nca import NCALoss
from .pairs import EmbeddingError, PairLoss, Pairs, build_pairs
from .triplet import TripletLoss

LOSSES: dict[str, type[PairLoss]] = {
    "contrastive": ContrastiveLoss,
    "triplet": TripletLoss,
    "lifted": LiftedStructureLoss,
    "binomial": BinomialDevianceLoss,
    "nca": NCALoss,
    "multi_similarity": MultiSimilarityLoss,
    "margin": MarginLoss,
}


def build_loss(name: str, **hparams) -> nn.Module:
    """The loss called ``name`` (a key of ``LOSSES``) with the given hyper-parameters.

    Unknown names raise ValueError listing the choices; unknown hyper-parameters raise
    TypeError naming them.
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
    "BinomialDevianceLoss",
    "ContrastiveLoss",
    "EmbeddingError",
    "LiftedStructureLoss",
    "MarginLoss",
    "MultiSimilarityLoss",
    "NCALoss",
    "PairLoss",
    "Pairs",
    "TripletLoss",
    "build_loss",
    "build_pairs",
    "masked_logsumexp",
]
