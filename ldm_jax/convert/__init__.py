"""Weight converters: diffusers / HF / CompVis single-file <-> ldm_jax parameter trees."""
