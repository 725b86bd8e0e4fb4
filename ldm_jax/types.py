"""Shared type aliases, the ConfigDict -> frozen dataclass boundary helper and the one UTF-8 text reader.

Imports nothing from the package; every layer (``diffusion/`` included) may import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax

Array = jax.Array
PRNGKey = jax.Array
PyTree = Any
Shape = tuple[int, ...]
# denoise_fn(x_t, t) -> network output of the kind named by `prediction`; t is (B,) in [0, 1].
DenoiseFn = Callable[[Array, Array], Array]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, misspelled or of the wrong type (one-line message)."""


def read_utf8(path, what: str) -> str:
    """The text of the file at `path` (UTF-8, a leading byte-order mark dropped; line ends as stored).

    A missing or unreadable file, or one that is not UTF-8, raises a one-line ConfigError naming `what` (e.g.
    "captions file"), the path and the fix.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read {what} '{path}': {e.strerror or e}") from None
    skip = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = skip + e.start
        raise ConfigError(f"{what} '{path}' is not UTF-8 text (byte 0x{data[at]:02x} at offset {at}): "
                          "save it as UTF-8") from None


def nearest(name: str, choices) -> str:
    """Returns ' (did you mean 'x'?)' for the closest of `choices`, or '' when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_choice(kind: str, name: str, choices) -> None:
    """Raises a one-line ConfigError when `name` is not one of `choices`."""
    if name not in choices:
        raise ConfigError(
            f"unknown {kind} '{name}'{nearest(str(name), choices)}; "
            f"choose one of: {', '.join(sorted(choices))}"
        )


def _as_dict(cfg: Any) -> dict:
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict, without importing it
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise ConfigError(f"expected a ConfigDict or mapping, got {type(cfg).__name__}")


class FrozenConfig:
    """Mixin for frozen dataclasses built from a ConfigDict at the library boundary.

    ``UNetConfig.from_config(cfg.model.unet)`` keeps the fields the dataclass declares, turns lists into
    tuples (so the result is hashable and usable as a jit static argument) and raises a one-line
    ``ConfigError`` naming any unknown key and the nearest valid one.
    """

    @classmethod
    def from_config(cls: type[T], cfg: Any = None, **overrides) -> T:
        values = {**_as_dict(cfg), **overrides}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in values if k not in names]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"{cls.__name__}: unknown field '{k}'{nearest(k, names)}")
        return cls(**{k: _freeze(v) for k, v in values.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self: T, **changes) -> T:
        return dataclasses.replace(self, **changes)


def _freeze(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    return v


def env_int(environ: Mapping[str, str], name: str, minimum: int = 0) -> int | None:
    """The integer in environ[name] (None when unset or empty); a one-line ConfigError naming it otherwise."""
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not an integer") from None
    if number < minimum:
        raise ConfigError(f"{name}={number} must be >= {minimum}")
    return number
