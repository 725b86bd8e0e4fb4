"""JAX's persistent compilation cache for the pipelines (compiled sampling loops survive the process).

``enable_compilation_cache()`` points ``jax_compilation_cache_dir`` at ``$LDM_JAX_CACHE_DIR`` or
``$XDG_CACHE_HOME/ldm_jax/jax`` (``~/.cache/ldm_jax/jax``) unless the user already set a directory (kept as
is) or opted out with ``LDM_JAX_COMPILATION_CACHE=0``. The next process that compiles the same sampling loop
(same model shapes, sampler, steps, batch) loads it from disk instead of compiling again.
"""

from __future__ import annotations

import logging
import os

import jax

logger = logging.getLogger("ldm_jax.pipelines")

_OPT_OUT = ("0", "false", "no", "off")


def default_cache_dir() -> str:
    explicit = os.environ.get("LDM_JAX_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ldm_jax", "jax")


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turns the persistent cache on; returns the directory in use, or None when opted out.

    An explicit `path` wins over the environment; a directory the user already configured in JAX (e.g. with
    ``JAX_COMPILATION_CACHE_DIR``) is kept when `path` is None.
    """
    if path is None and os.environ.get("LDM_JAX_COMPILATION_CACHE", "1").lower() in _OPT_OUT:
        return None
    current = jax.config.jax_compilation_cache_dir
    if path is None and current:
        return current
    target = os.fspath(path) if path is not None else default_cache_dir()
    try:
        os.makedirs(target, exist_ok=True)
    except OSError as e:
        logger.warning("persistent compilation cache disabled: cannot create %s (%s)", target, e)
        return None
    if current and current != target:
        logger.warning("jax_compilation_cache_dir changes from %s to %s; a cache JAX already opened keeps "
                       "the old directory for this process", current, target)
    jax.config.update("jax_compilation_cache_dir", target)
    return target
