"""Hyper-parameter search and fair comparisons (``deepmetric tune``, ``deepmetric compare``).

- :mod:`~deepmetric.tune.space`: the search space file format (config keys spelled as
  overrides, each a distribution, a choice with sub-spaces, or a fixed value).
- :mod:`~deepmetric.tune.study`: :func:`tune`, an Optuna study (TPE, median pruning) whose
  trials are resumable deepmetric runs scored on class-disjoint validation data only.
- :mod:`~deepmetric.tune.storage`: where the study lives (journal file or database) and how
  an abandoned trial is queued again to resume from its checkpoint.
- :mod:`~deepmetric.tune.results`: the trial table, the best point as a preset, the plots.
- :mod:`~deepmetric.tune.compare`: :func:`compare`, configs x seeds with one budget, mean and
  95% interval per config.
"""

from .compare import compare, mean_interval
from .space import Param, load_space, space_corners, suggest
from .storage import open_study
from .study import TuneSettings, TuneStopped, trial_config, tune

__all__ = [
    "Param",
    "TuneSettings",
    "TuneStopped",
    "compare",
    "load_space",
    "mean_interval",
    "open_study",
    "space_corners",
    "suggest",
    "trial_config",
    "tune",
]
