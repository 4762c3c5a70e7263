"""What a report shows, as plain numbers and text (no HTML): filled by :mod:`.numbers`,
:mod:`.run` and :mod:`.index`, drawn by :mod:`.html`.

Items (queries, gallery images, map points) are named by a thumbnail key (``str``): the
evaluation set's row index in a run's report, the image path in an index's report; the
thumbnails themselves are in :attr:`ReportContent.thumbnails`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReportOptions:
    """How much a report shows; every count is a bound, so the file stays small for any set.

    k: retrievals per query in the grids; queries: rows per grid (worst, random);
    max_queries: queries whose numbers are computed (all of them up to this count, else
    those of randomly drawn classes, each searched against the whole gallery);
    max_classes: rows of the per-class table (the worst); max_points: points of the 2-D map;
    map: "pca" or "tsne"; thumbnail: longest side (px) of the embedded JPEGs;
    max_thumbnail_bytes: budget of the embedded images (the map's hover images are dropped
    beyond it, grid images never); seed: every random draw.
    """

    k: int = 8
    queries: int = 10
    max_queries: int = 10_000
    max_classes: int = 1_000
    max_points: int = 1_500
    map: str = "pca"
    thumbnail: int = 96
    max_thumbnail_bytes: int = 20_000_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.map not in ("pca", "tsne"):
            raise ValueError(f"ReportOptions.map: expected 'pca' or 'tsne', got {self.map!r}")
        counts = ("k", "queries", "max_queries", "max_classes", "max_points", "thumbnail")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"ReportOptions.{name}: expected >= 1, got {getattr(self, name)}")


@dataclass
class MetricsTable:
    """Rows = metric keys of metrics.jsonl ("recall@1", "map@r", ...); columns = records."""

    keys: list[str]
    columns: list[tuple[str, dict[str, float]]]  # (heading, {key: value}) in display order
    note: str = ""


@dataclass
class ConfigDiff:
    """The run's resolved settings that differ from its preset file."""

    preset: str | None  # the preset file, None when unknown
    rows: list[tuple[str, object, object, bool]]  # (dotted key, preset, run, on command line)
    note: str = ""  # why there is no diff, when there is none


@dataclass
class Curves:
    """Training loss per logged iteration; Recall@1 per evaluation, per split."""

    loss: tuple[list[int], list[float]]  # (iterations, mean loss of the window)
    recall_at_1: dict[str, tuple[list[int], list[float]]]  # split -> (iterations, values)


@dataclass
class ClassTable:
    """Per-class retrieval results, worst first (Recall@1, then MAP@R)."""

    names: list[str]  # (C,)
    size: list[int]  # (C,) queries of the class (its images when query = gallery)
    recall_at_1: list[float]  # (C,)
    map_at_r: list[float]  # (C,)
    total: int  # classes with an evaluated query (>= C: the table may show the worst only)
    size_name: str = "images"  # what ``size`` counts: "images" (query = gallery) or "queries"


@dataclass
class GridRow:
    """One query and its k nearest gallery items (nearest first)."""

    query: str  # thumbnail key
    query_label: str | None
    ap: float | None  # AP@R of the query (as averaged in MAP@R), None when unknown
    items: list[str]  # (k,) thumbnail keys
    labels: list[str | None]  # (k,)
    scores: list[float]  # (k,) inner products
    correct: list[bool | None]  # (k,) same label as the query; None when a label is unknown


@dataclass
class Grid:
    title: str
    rows: list[GridRow]


@dataclass
class EmbeddingMap:
    """A 2-D projection of (a sample of) the evaluation embeddings."""

    method: str  # "PCA" or "t-SNE"
    points: list[tuple[float, float]]  # (M,)
    keys: list[str]  # (M,) thumbnail keys
    labels: list[str]  # (M,) class names
    colours: list[int]  # (M,) colour index of each point's class
    total: int  # items in the evaluation set


@dataclass
class Verification:
    """Verification over all pairs of the evaluation set
    (:mod:`deepmetric.evaluation.verification`): a pair is accepted when its score >= a
    threshold."""

    num_positive: int
    num_negative: int
    auc: float
    eer: tuple[float, float]  # (EER, threshold)
    tar_at_far: list[tuple[float, float, float]]  # (FAR target, TAR, threshold); NaN: unresolvable
    roc: tuple[list[float], list[float]]  # (far, tar) (P,) a sample of the ROC, FAR >= far_min
    far_min: float  # left end of the log FAR axis (a power of ten)
    edges: list[float]  # (B + 1,) score bins of the histograms
    positive: list[int]  # (B,) positive pairs per bin
    negative: list[int]  # (B,) negative pairs per bin
    thresholds: list[tuple[str, float]]  # (name, score) lines drawn on the histograms


@dataclass
class ReportContent:
    """Everything a report shows; sections left None are not drawn."""

    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)  # (name, value) header lines
    metrics: MetricsTable | None = None
    config_diff: ConfigDiff | None = None
    curves: Curves | None = None
    classes: ClassTable | None = None
    grids: list[Grid] = field(default_factory=list)
    embedding_map: EmbeddingMap | None = None
    verification: Verification | None = None
    thumbnails: dict[str, str] = field(default_factory=dict)  # key -> data: URI
    notes: list[str] = field(default_factory=list)  # what was sampled or left out, and why
