"""Sweep specifications: which config fields vary, and how.

A sweep config is an ordinary training config with a ``sweep`` section::

    c.sweep.product = dict(diffusion=dict(schedule=("linear", "cosine"), prediction=("eps", "v")))
    c.sweep.zip = dict(diffusion=dict(weighting=("uniform", "min_snr"), min_snr_gamma=(0.0, 5.0)))
    c.sweep.seeds = (0, 1)

``product`` takes the Cartesian product of its fields; ``zip`` walks its (equal-length) fields together,
and the zipped tuples are crossed with the product grid; ``seeds`` sets ``train.seed`` (the outermost
axis). The nesting mirrors the config (ConfigDict keys cannot hold dots), leaves are the tuples of values;
a field that does not exist is an error naming the nearest one. ``extra`` lists single runs to add after
the grid, each a nested dict of values (e.g. a second seed for the headline settings only)::

    c.sweep.extra = (dict(diffusion=dict(schedule="linear", prediction="eps"), train=dict(seed=1)),)

An extra run with the same settings as a grid run is the same run (listed once). ``first`` (nested dicts of
values, like ``extra``) moves the runs that match any of its entries to the front, in their order, so that a
sweep cut short has the comparisons that matter most.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import ml_collections

from ldm_jax.configlib import all_keys
from ldm_jax.types import ConfigError, nearest


@dataclasses.dataclass(frozen=True)
class Run:
    name: str                      # file-system safe, unique within the sweep
    overrides: tuple               # ((dotted key, value), ...) in spec order
    config: ml_collections.ConfigDict


def _set(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value


def _check_keys(cfg, keys) -> None:
    valid = set(all_keys(cfg))
    for k in keys:
        if k not in valid:
            raise ConfigError(f"sweep field '{k}' is not a config key{nearest(k, valid)}")


def _short(key: str, value) -> str:
    text = f"{key.split('.')[-1]}={value}"
    return re.sub(r"[^A-Za-z0-9_.=+-]", "", text.replace(" ", ""))


def _leaves(spec) -> dict:
    """Nested {section: {field: values}} -> {"section.field": tuple of values}."""
    return {k: tuple(v) for k, v in _flat(spec or {}).items()}


def _extra_points(spec, order: list[str]) -> list[tuple]:
    points = []
    for entry in spec.get("extra", ()) or ():
        flat = _flat(entry)
        keys = [k for k in order if k in flat] + sorted(k for k in flat if k not in order and k != "train.seed")
        keys += ["train.seed"] if "train.seed" in flat else []
        points.append(tuple((k, flat[k]) for k in keys))
    return points


def _flat(entry, prefix: str = "") -> dict:
    """Nested {section: {field: value}} -> {"section.field": value}."""
    if hasattr(entry, "to_dict"):
        entry = entry.to_dict()
    if not isinstance(entry, dict):
        raise ConfigError(f"sweep entries are nested dicts of config fields, got {entry!r}")
    out = {}
    for k, v in entry.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(_flat(v, key) if isinstance(v, dict) or hasattr(v, "to_dict") else {key: v})
    return out


def expand(config: ml_collections.ConfigDict) -> list[Run]:
    """All runs of the sweep described by ``config.sweep`` (the base config without it)."""
    spec = config.get("sweep", ml_collections.ConfigDict())
    product = _leaves(spec.get("product", {}))
    zipped = _leaves(spec.get("zip", {}))
    seeds = tuple(spec.get("seeds", ()) or ())
    extra = _extra_points(spec, [*product, *zipped])
    _check_keys(config, [*product, *zipped, *(k for pt in extra for k, _ in pt)])
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise ConfigError(f"sweep.zip fields must have equal lengths, got {sorted(lengths)}")
    zip_points = [tuple(zip(zipped, vals)) for vals in zip(*zipped.values())] or [()]
    grid_points = [tuple(zip(product, vals)) for vals in itertools.product(*product.values())] or [()]
    seed_points = [(("train.seed", s),) for s in seeds] or [()]

    base = ml_collections.ConfigDict(config.to_dict())
    if "sweep" in base:
        del base["sweep"]
    runs, names, seen = [], set(), set()
    points = [g + z + s for s, g, z in itertools.product(seed_points, grid_points, zip_points)] + extra
    for overrides in points:
        if frozenset(overrides) in seen:
            continue
        seen.add(frozenset(overrides))
        cfg = ml_collections.ConfigDict(base.to_dict())
        for k, v in overrides:
            _set(cfg, k, v)
        name = ",".join(_short(k, v) for k, v in overrides) or "base"
        if name in names:
            name = f"{name},{len(names)}"
        names.add(name)
        runs.append(Run(name=name, overrides=overrides, config=cfg))
    first = [_flat(entry) for entry in spec.get("first", ()) or ()]
    _check_keys(config, [k for entry in first for k in entry])

    def rank(run: Run) -> int:
        settings = dict(run.overrides)
        return next((i for i, entry in enumerate(first)
                     if all(k in settings and settings[k] == v for k, v in entry.items())), len(first))

    return sorted(runs, key=rank)  # stable: grid order within each rank
