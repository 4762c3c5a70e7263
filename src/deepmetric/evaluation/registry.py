"""One record per metric, read by every consumer: :func:`~.retrieval.evaluate` (what to
search, how to reduce), the config check (``eval.metrics``, ``eval.select_metric``), the
console and ``metrics.jsonl``, the plots and the HTML report, ``deepmetric tune --metric``
and ``deepmetric compare``.

A metric has two names: its config name (``eval.metrics: [recall, map_at_r]``, as
:func:`evaluate` takes it) and its result keys (``"recall@1"``, ``"map@r"``: what
``evaluate`` returns and ``metrics.jsonl`` holds; Recall@K has one per K). Adding a metric is
its function in :mod:`.metrics` and its record in :data:`METRICS`.

>>> result_keys(["map_at_r", "recall"], recall_at=(1, 4))
['recall@1', 'recall@4', 'map@r']
>>> result_key("map_at_r", ["recall", "map_at_r"], (1, 2))
'map@r'
>>> display_name("recall@4"), display_name("r_precision")
('Recall@4', 'R-precision')
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from .metrics import map_at_r, nmi, r_precision, recall_at_k
from .verification import FARS, PairScoreCounts

__all__ = [
    "GROUPS",
    "METRICS",
    "Metric",
    "check_metric_names",
    "display_name",
    "metric_of_key",
    "ordered_keys",
    "result_key",
    "result_keys",
]


@dataclass(frozen=True)
class Metric:
    """What one metric is and needs.

    ``needs`` says what :func:`~.retrieval.evaluate` must compute for it and how ``function``
    is called:

    - ``"ranks"``: each query's 0-based first-positive rank, exact below the largest K;
      ``function(first_positive (Q,) int64, k) -> (Q,) float64``, once per K of ``ks``;
    - ``"lists"``: each query's ranked list of R_i items (its number of relevant items);
      ``function(relevant (Q, L) bool, num_relevant (Q,)) -> (Q,) float64``;
    - ``"embeddings"``: the query embeddings and labels; ``function(emb, labels, seed)
      -> float``;
    - ``"pairs"``: the score counts of all pairs (:mod:`.verification`, counted once for
      every pairs metric); ``function(counts: PairScoreCounts, k) -> float``, once per K
      (the FAR targets of TAR@FAR).

    Per-query values are averaged over the queries with R_i >= 1. A group name (``GROUPS``:
    ``verification``) stands for several metrics in ``eval.metrics``.
    """

    name: str  # config name: eval.metrics, evaluate(metrics=...)
    key: str  # result key; "{k}" stands for each K: "recall@{k}"
    display: str  # shown in tables and plots; "{k}" as in key
    needs: Literal["ranks", "lists", "embeddings", "pairs"]
    function: Callable
    higher_is_better: bool = True
    # the K of its own: Precision@1 (1,); TAR@FAR the FAR targets (spelt "1e-3" in keys)
    fixed_ks: tuple[int | float, ...] = ()

    def ks(self, recall_at: Sequence[int]) -> tuple[int | float, ...]:
        """The K of its result keys: its own, else ``recall_at``; () without "{k}"."""
        if "{k}" not in self.key and not self.fixed_ks:
            return ()
        return self.fixed_ks or tuple(recall_at)

    def keys(self, recall_at: Sequence[int]) -> list[str]:
        """Its result keys: ``["recall@1", "recall@2"]``, ``["map@r"]``."""
        if "{k}" not in self.key:
            return [self.key]
        return [self.key.format(k=_spell(k)) for k in self.ks(recall_at)]


def _spell(k: int | float) -> str:
    """A K as keys write it: 4 -> "4", 0.001 -> "1e-3"."""
    if isinstance(k, int):
        return str(k)
    mantissa, exponent = f"{k:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def _tar_at_far(counts: PairScoreCounts, far: float) -> float:
    return counts.tar_at_far(far)[0]


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("recall", "recall@{k}", "Recall@{k}", "ranks", recall_at_k),
        Metric("precision_at_1", "precision@1", "Precision@1", "ranks", recall_at_k, fixed_ks=(1,)),
        Metric("map_at_r", "map@r", "MAP@R", "lists", map_at_r),
        Metric("r_precision", "r_precision", "R-precision", "lists", r_precision),
        Metric("nmi", "nmi", "NMI", "embeddings", nmi),
        Metric("roc_auc", "roc_auc", "ROC AUC", "pairs", lambda c, _: c.auc()),
        Metric("eer", "eer", "EER", "pairs", lambda c, _: c.eer()[0], higher_is_better=False),
        Metric("tar_at_far", "tar@far={k}", "TAR@FAR={k}", "pairs", _tar_at_far, fixed_ks=FARS),
    )
}
"""Every metric, in display order (Recall@K by K, then the others as listed)."""

GROUPS: dict[str, tuple[str, ...]] = {"verification": ("roc_auc", "eer", "tar_at_far")}
"""Names that stand for several metrics in ``eval.metrics``."""


def _near(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_metric_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` with each group replaced by its metrics, or ValueError naming the first
    unknown one and a near match.

    >>> check_metric_names(["recall", "verification"])
    ('recall', 'roc_auc', 'eer', 'tar_at_far')
    >>> check_metric_names(["mapr"])
    Traceback (most recent call last):
    ...
    ValueError: unknown metric 'mapr' (did you mean 'map_at_r'?); expected some of: recall, \
precision_at_1, map_at_r, r_precision, nmi, roc_auc, eer, tar_at_far, verification
    """
    known = [*METRICS, *GROUPS]
    for name in names:
        if name not in known:
            by_key = next((m.name for m in METRICS.values() if m.key == name), None)
            hint = f" (the result key of {by_key!r})" if by_key else _near(name, known)
            raise ValueError(f"unknown metric {name!r}{hint}; expected some of: {', '.join(known)}")
    expanded = [member for name in names for member in GROUPS.get(name, (name,))]
    return tuple(dict.fromkeys(expanded))


def result_keys(names: Sequence[str], recall_at: Sequence[int]) -> list[str]:
    """The result keys of the metrics ``names`` (config names), in display order."""
    names = check_metric_names(names)
    return [key for m in METRICS.values() if m.name in names for key in m.keys(recall_at)]


def _parse_key(key: str) -> tuple[Metric, int | float | None] | None:
    for m in METRICS.values():
        if "{k}" in m.key:
            pattern = re.escape(m.key).replace(re.escape("{k}"), r"(\d+)")
            found = re.fullmatch(pattern, key)
            if found:
                return m, int(found.group(1))
            for k in m.fixed_ks:  # spelt as floats: "tar@far=1e-3"
                if key == m.key.format(k=_spell(k)):
                    return m, k
        elif key == m.key:
            return m, m.fixed_ks[0] if m.fixed_ks else None
    return None


def metric_of_key(key: str) -> Metric | None:
    """The metric a result key belongs to (``"recall@8"`` -> Recall), None for other keys."""
    parsed = _parse_key(key)
    return parsed[0] if parsed else None


def display_name(key: str) -> str:
    """``"recall@4"`` -> ``"Recall@4"``, ``"map@r"`` -> ``"MAP@R"``; other keys as they are."""
    parsed = _parse_key(key)
    if parsed is None:
        return key
    metric, k = parsed
    return metric.display.format(k=_spell(k) if k is not None else k)


def ordered_keys(record: Iterable[str]) -> list[str]:
    """The metric keys among ``record``'s, in display order (Recall@K by K); other keys
    (iteration, counts, times) left out."""
    order = list(METRICS)
    found = [(key, _parse_key(key)) for key in record]
    found = [(key, p) for key, p in found if p is not None]
    # by K; the FAR targets of TAR@FAR by decreasing FAR, as listed
    found.sort(key=lambda item: (order.index(item[1][0].name), _position(*item[1])))
    return [key for key, _ in found]


def _position(metric: Metric, k: int | float | None) -> float:
    if k is None:
        return 0
    return metric.fixed_ks.index(k) if isinstance(k, float) else k


def result_key(spelling: str, names: Sequence[str], recall_at: Sequence[int]) -> str:
    """The result key meant by ``spelling`` (a result key, or the config name of a metric
    with one key: ``"map_at_r"`` -> ``"map@r"``), checked to be among those that the metrics
    ``names`` with ``recall_at`` compute; ValueError saying why not (callers name the key).

    >>> result_key("recall", ["recall"], (1, 2))
    Traceback (most recent call last):
    ...
    ValueError: one key per K: name one of recall@1, recall@2
    """
    computed = result_keys(names, recall_at)
    names = check_metric_names(names)
    if spelling in computed:
        return spelling
    metric = METRICS.get(spelling)
    if metric is not None and metric.name in names:
        keys = metric.keys(recall_at)
        if len(keys) == 1:
            return keys[0]
        raise ValueError(f"one key per K: name one of {', '.join(keys)}")
    parsed = _parse_key(spelling) or ((metric, None) if metric else None)
    if parsed is None:
        why = f"not a metric{_near(spelling, [*computed, *METRICS])}"
    elif parsed[0].name not in names:
        evaluated = ", ".join(names)
        why = f"not computed: {parsed[0].name!r} is not among the evaluated metrics ({evaluated})"
    else:
        why = f"not computed: Recall@K is evaluated at K = {', '.join(map(str, recall_at))}"
    raise ValueError(f"{why}; the evaluation computes {', '.join(computed)}")
