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

__all__ = [
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
      -> float``.

    Per-query values are averaged over the queries with R_i >= 1.
    """

    name: str  # config name: eval.metrics, evaluate(metrics=...)
    key: str  # result key; "{k}" stands for each K: "recall@{k}"
    display: str  # shown in tables and plots; "{k}" as in key
    needs: Literal["ranks", "lists", "embeddings"]
    function: Callable
    higher_is_better: bool = True
    fixed_k: int | None = None  # ranks metrics with one K of their own (Precision@1)

    def ks(self, recall_at: Sequence[int]) -> tuple[int, ...]:
        """The K of its result keys: its own, else ``recall_at``; () without "{k}"."""
        if "{k}" not in self.key and self.fixed_k is None:
            return ()
        return (self.fixed_k,) if self.fixed_k is not None else tuple(recall_at)

    def keys(self, recall_at: Sequence[int]) -> list[str]:
        """Its result keys: ``["recall@1", "recall@2"]``, ``["map@r"]``."""
        if "{k}" not in self.key:
            return [self.key]
        return [self.key.format(k=k) for k in self.ks(recall_at)]


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("recall", "recall@{k}", "Recall@{k}", "ranks", recall_at_k),
        Metric("precision_at_1", "precision@1", "Precision@1", "ranks", recall_at_k, fixed_k=1),
        Metric("map_at_r", "map@r", "MAP@R", "lists", map_at_r),
        Metric("r_precision", "r_precision", "R-precision", "lists", r_precision),
        Metric("nmi", "nmi", "NMI", "embeddings", nmi),
    )
}
"""Every metric, in display order (Recall@K by K, then the others as listed)."""


def _near(name: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_metric_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or ValueError naming the first unknown one and a near match.

    >>> check_metric_names(["mapr"])
    Traceback (most recent call last):
    ...
    ValueError: unknown metric 'mapr' (did you mean 'map_at_r'?); expected some of: recall, \
precision_at_1, map_at_r, r_precision, nmi
    """
    for name in names:
        if name not in METRICS:
            by_key = next((m.name for m in METRICS.values() if m.key == name), None)
            hint = f" (the result key of {by_key!r})" if by_key else _near(name, METRICS)
            raise ValueError(
                f"unknown metric {name!r}{hint}; expected some of: {', '.join(METRICS)}"
            )
    return tuple(names)


def result_keys(names: Sequence[str], recall_at: Sequence[int]) -> list[str]:
    """The result keys of the metrics ``names`` (config names), in display order."""
    return [key for m in METRICS.values() if m.name in names for key in m.keys(recall_at)]


def _parse_key(key: str) -> tuple[Metric, int | None] | None:
    for m in METRICS.values():
        if "{k}" in m.key:
            pattern = re.escape(m.key).replace(re.escape("{k}"), r"(\d+)")
            found = re.fullmatch(pattern, key)
            if found:
                return m, int(found.group(1))
        elif key == m.key:
            return m, m.fixed_k
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
    return metric.display.format(k=k)


def ordered_keys(record: Iterable[str]) -> list[str]:
    """The metric keys among ``record``'s, in display order (Recall@K by K); other keys
    (iteration, counts, times) left out."""
    order = list(METRICS)
    found = [(key, _parse_key(key)) for key in record]
    found = [(key, p) for key, p in found if p is not None]
    found.sort(key=lambda item: (order.index(item[1][0].name), item[1][1] or 0))
    return [key for key, _ in found]


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
