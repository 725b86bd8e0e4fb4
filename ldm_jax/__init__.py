"""ldm_jax: latent diffusion in JAX/Flax.

    from ldm_jax import LatentDiffusion        # the one model object and its one generate() (ldm_jax.ldm)
    ldm = LatentDiffusion.from_pretrained("runs/demo/ldm")
    images = ldm.generate(["a red circle in the top left"], seed=0, num_steps=20, guidance_scale=3.0)

Subpackages are imported lazily so that ``import ldm_jax`` stays cheap:
``from ldm_jax import diffusion, models``. Layers, lowest first: types and images, diffusion, models, convert,
data, ldm (the model layer), eval, training, sweeps, pipelines, commands (tests/test_layering.py).
"""

import importlib

from ldm_jax import _xla_cpu

_xla_cpu.apply()  # XLA:CPU defaults (YNNPACK fusions off); must run before JAX starts its CPU backend

__version__ = "0.1.0"
_SUBPACKAGES = ("diffusion", "models", "convert", "data", "ldm", "training", "eval", "pipelines")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"ldm_jax.{name}")
    if name == "LatentDiffusion":  # the model object: ldm_jax.LatentDiffusion.from_pretrained(path)
        return importlib.import_module("ldm_jax.ldm").LatentDiffusion
    raise AttributeError(f"module 'ldm_jax' has no attribute '{name}'")
