"""The model layer: one latent-diffusion model object and one generation path.

    from ldm_jax import LatentDiffusion
    ldm = LatentDiffusion.from_pretrained("runs/demo/ldm")     # workdir, diffusers folder, .safetensors, or a
                                                              # model id in the local Hugging Face cache
    images = ldm.generate(["a red circle in the top left"], seed=0, sampler="ddim", num_steps=20,
                          guidance_scale=3.0)                 # uint8 (N, H, W, 3); image i uses seed + i

Training (sample grids, evaluation callbacks), ``ldm-jax evaluate``, the sweeps, the demo, ``ldm-jax sample`` and
the pipelines all generate through `LatentDiffusion.generate`, so one seed gives one image everywhere.

Modules: `model` (the object), `generate` (the jitted body, the seeding rule, micro-batches over devices),
`loading` (diffusers folders, single files, workdirs, run configs, the local HF cache), `build` (config sections
-> configs, frozen encoders, schedule), `workdirs` (reading checkpoints for inference), `compile_cache`.
"""

from ldm_jax.ldm.compile_cache import default_cache_dir, enable_compilation_cache
from ldm_jax.ldm.generate import Denoiser, SampleConfig, UNetDenoiser
from ldm_jax.ldm.loading import SamplingDefaults, cached_snapshot, scheduler_from_config
from ldm_jax.ldm.model import LatentDiffusion

__all__ = ["Denoiser", "LatentDiffusion", "SampleConfig", "SamplingDefaults", "UNetDenoiser", "cached_snapshot",
           "default_cache_dir", "enable_compilation_cache", "scheduler_from_config"]
