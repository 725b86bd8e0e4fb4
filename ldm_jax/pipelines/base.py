"""`Pipeline`: the user-facing wrapper around a `LatentDiffusion` (the three tasks differ in their inputs only)."""

from __future__ import annotations

import os

from ldm_jax.ldm import LatentDiffusion, enable_compilation_cache


class Pipeline:
    """Holds a `LatentDiffusion` (``.model``) and calls its `generate`.

    `compilation_cache`: True enables JAX's persistent compilation cache in the default user cache directory
    (``ldm_jax.ldm.compile_cache``), a path uses that directory, False leaves JAX's setting alone.
    """

    task = "text"

    def __init__(self, model: LatentDiffusion, *, compilation_cache: bool | str = True):
        self.model = model
        if compilation_cache:
            enable_compilation_cache(None if compilation_cache is True else compilation_cache)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, compilation_cache: bool | str = True, **kwargs):
        """From a diffusers SD folder, a single file, an ldm_jax workdir or a cached model id
        (`LatentDiffusion.from_pretrained`: dtype, prediction, ema, kind, step)."""
        return cls(LatentDiffusion.from_pretrained(path, **kwargs), compilation_cache=compilation_cache)

    @property
    def num_compiled(self) -> int:
        """How many generation functions the model has compiled (one per options, micro-batch and shapes)."""
        return len(self.model._compiled)

    @property
    def default_size(self) -> int:
        return self.model.size
