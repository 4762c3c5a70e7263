"""Search space files for ``deepmetric tune``: config keys spelled as overrides, each given a
distribution, a choice or a fixed value.

    optim.lr: {log_uniform: [1.0e-5, 1.0e-2]}      # float, sampled on a log scale
    loss.alpha: {uniform: [0.5, 10.0]}             # float
    sampler.k: {int: [2, 8]}                       # integer, both ends included
    xbm.size: {log_int: [1024, 16384]}             # integer on a log scale
    schedule.name: {choice: [none, cosine]}        # one of a list
    data.transform_options.augment: true           # a fixed value, set in every trial
    loss.name:                                     # a choice with a sub-space per value:
      choice:                                      # its keys are searched (or set) only
        multi_similarity:                          # when that value is chosen
          loss.alpha: {log_uniform: [0.5, 20.0]}
        proxy_anchor:
          sampler.name: random
          sampler.batch_size: 64

A mapping value is always a distribution (set a fixed mapping key by key:
``data.options.invert: true``). Optuna names a parameter by its key, and a key inside a
sub-space by ``VALUE/KEY`` (``multi_similarity/loss.alpha``), so each name has one
distribution. :func:`load_space` checks the file's form; :func:`space_corners` lists override
sets that ``deepmetric tune`` loads as configs before the first trial, so an unknown or
mistyped key is an error naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deepmetric.config import ConfigError

__all__ = ["DISTRIBUTIONS", "Param", "load_space", "space_corners", "suggest"]

#: The distribution names a space file may use, and what each takes.
DISTRIBUTIONS = {
    "uniform": "[low, high] floats",
    "log_uniform": "[low, high] floats, 0 < low",
    "int": "[low, high] integers",
    "log_int": "[low, high] integers, 1 <= low",
    "choice": "a list of values, or a mapping value -> sub-space",
}


@dataclass
class Param:
    """One key of a search space.

    ``kind`` is a :data:`DISTRIBUTIONS` name or ``"fixed"``; ``low`` / ``high`` bound the
    numeric kinds; ``values`` lists a choice's values (``[value]`` for a fixed one);
    ``branches[i]`` is the sub-space searched when ``values[i]`` is chosen.
    """

    key: str
    name: str
    kind: str
    low: float = 0.0
    high: float = 0.0
    values: list[Any] = field(default_factory=list)
    branches: list[list[Param]] = field(default_factory=list)


def load_space(path: str | Path) -> list[Param]:
    """Read and check a search space file; raises ConfigError naming the file and key."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"search space file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{p}: expected a mapping of config keys (optim.lr: ...), got {raw!r}")
    space = _parse(raw, p, prefix="")
    _check_names(space, p)
    if not any(param.kind != "fixed" or param.branches for param in walk(space)):
        raise ConfigError(f"{p}: nothing to search (every key has a fixed value)")
    return space


def _parse(raw: dict[Any, Any], path: Path, prefix: str) -> list[Param]:
    params = []
    for key, spec in raw.items():
        where = f"{path}: {prefix}{key}"
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(
                f"{where}: a key is a dotted config key such as optim.lr or loss.name"
            )
        name = f"{prefix}{key}"
        if not isinstance(spec, dict):
            _check_value(spec, where)
            params.append(Param(key, name, "fixed", values=[spec]))
            continue
        if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            kinds = ", ".join(f"{k} ({v})" for k, v in DISTRIBUTIONS.items())
            raise ConfigError(
                f"{where}: expected one distribution, {{name: arguments}}, with name one of "
                f"{kinds}; got {spec!r} (a fixed mapping is set key by key: {key}.sub_key: ...)"
            )
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            params.append(_parse_choice(key, name, args, path, where))
        else:
            low, high = _bounds(kind, args, where)
            params.append(Param(key, name, kind, low=low, high=high))
    return params


def _parse_choice(key: str, name: str, args: Any, path: Path, where: str) -> Param:
    if isinstance(args, list):
        values, branches = args, [[] for _ in args]
    elif isinstance(args, dict):
        values = list(args)
        branches = []
        for value, sub in args.items():
            if sub is None:
                sub = {}
            if not isinstance(sub, dict):
                raise ConfigError(
                    f"{where}: the sub-space of {value!r} must be a mapping of config keys "
                    f"(or empty), got {sub!r}"
                )
            branches.append(_parse(sub, path, prefix=f"{value}/") if sub else [])
    else:
        raise ConfigError(f"{where}: choice takes a list of values or a mapping, got {args!r}")
    if not values:
        raise ConfigError(f"{where}: choice needs at least one value")
    for value in values:
        _check_value(value, where)
    if len({repr(v) for v in values}) != len(values):
        raise ConfigError(f"{where}: choice lists a value twice: {values}")
    return Param(key, name, "choice", values=values, branches=branches)


def _check_names(space: list[Param], path: Path) -> None:
    """Optuna stores one distribution per name: two keys that share a name (the same key
    under the same value of two choices) must have the same distribution."""
    seen: dict[str, Param] = {}
    for param in walk(space):
        if param.kind == "fixed":
            continue
        other = seen.setdefault(param.name, param)
        shape = (param.kind, param.low, param.high, param.values)
        if shape != (other.kind, other.low, other.high, other.values):
            raise ConfigError(
                f"{path}: {param.name}: two sub-spaces give this key different distributions "
                "under the same choice value; rename a value or give both the same one"
            )


def _check_value(value: Any, where: str) -> None:
    if not (value is None or isinstance(value, bool | int | float | str)):
        raise ConfigError(
            f"{where}: values must be numbers, strings, true/false or null (what Optuna "
            f"stores), got {value!r}"
        )


def _bounds(kind: str, args: Any, where: str) -> tuple[float, float]:
    integer = kind in ("int", "log_int")
    number = int if integer else (int, float)
    if (
        not isinstance(args, list)
        or len(args) != 2
        or not all(isinstance(a, number) and not isinstance(a, bool) for a in args)
    ):
        raise ConfigError(f"{where}: {kind} takes {DISTRIBUTIONS[kind]}, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "log_uniform" and not low > 0:
        raise ConfigError(f"{where}: log_uniform needs low > 0, got {low}")
    if kind == "log_int" and not low >= 1:
        raise ConfigError(f"{where}: log_int needs low >= 1, got {low}")
    if not all(math.isfinite(a) for a in args):
        raise ConfigError(f"{where}: bounds must be finite, got {args}")
    return (int(low), int(high)) if integer else (float(low), float(high))


def walk(space: list[Param]) -> list[Param]:
    """Every key of ``space``, those of the sub-spaces included."""
    out = []
    for param in space:
        out.append(param)
        for branch in param.branches:
            out.extend(walk(branch))
    return out


def suggest(trial: Any, space: list[Param]) -> list[tuple[str, Any]]:
    """Draw one point of ``space`` from an Optuna trial: the ``(key, value)`` overrides, a
    choice before the keys of its sub-space (so ``loss.name`` precedes ``loss.alpha``)."""
    overrides: list[tuple[str, Any]] = []
    for param in space:
        if param.kind == "fixed":
            value = param.values[0]
        elif param.kind == "choice":
            value = trial.suggest_categorical(param.name, param.values)
        elif param.kind in ("int", "log_int"):
            value = trial.suggest_int(
                param.name, int(param.low), int(param.high), log=param.kind == "log_int"
            )
        else:
            value = trial.suggest_float(
                param.name, param.low, param.high, log=param.kind == "log_uniform"
            )
        overrides.append((param.key, value))
        if param.branches:
            branch = param.branches[param.values.index(value)]
            overrides.extend(suggest(trial, branch))
    return overrides


def space_corners(space: list[Param]) -> list[list[tuple[str, Any]]]:
    """Override sets that together touch every key and every choice value: all numbers at
    their low bound, then at their high bound, then inside (a float not a whole number), for
    each value of each choice (the choices above it set to reach it, its sub-space included)
    with the other choices at their first value."""
    corners = []
    for end in ("low", "high", "inner"):
        corners.append(_corner(space, end, pick={}))
        for param, path in _choices_with_paths(space, {}):
            for value in param.values[1:]:
                corners.append(_corner(space, end, pick={**path, param.name: value}))
    return corners


def _choices_with_paths(
    space: list[Param], path: dict[str, Any]
) -> list[tuple[Param, dict[str, Any]]]:
    """Every choice of ``space`` with the choice values (name -> value) that lead to it."""
    out = []
    for param in space:
        if param.kind != "choice":
            continue
        out.append((param, path))
        for value, branch in zip(param.values, param.branches):
            out.extend(_choices_with_paths(branch, {**path, param.name: value}))
    return out


def _corner(space: list[Param], end: str, pick: dict[str, Any]) -> list[tuple[str, Any]]:
    overrides: list[tuple[str, Any]] = []
    for param in space:
        if param.kind in ("fixed", "choice"):
            value = pick.get(param.name, param.values[0])
        elif end == "inner":  # a value inside, not a whole number for floats
            inner = param.low + (param.high - param.low) / math.pi
            value = round(inner) if param.kind in ("int", "log_int") else inner
        else:
            value = getattr(param, end)
        overrides.append((param.key, value))
        if param.branches:
            overrides.extend(_corner(param.branches[param.values.index(value)], end, pick))
    return overrides
