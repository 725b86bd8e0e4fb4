"""Shared inputs of the pipeline tests."""

import numpy as np

SIZE = 64


def smooth_image(seed: int, size: int = SIZE) -> np.ndarray:
    """A smooth random RGB uint8 image (blobs of color), so the VAE sees structure rather than white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.zeros((size, size, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.4)
        img += rng.uniform(-1, 1, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)[..., None]
    return np.clip(127.5 + 60 * img, 0, 255).astype(np.uint8)


# A tiny random SDXL (tests/pipelines/test_sdxl.py, tests/training/test_sdxl_training.py)
SDXL_TIME_DIM, SDXL_WIDTH = 8, 32
SDXL_UNET = dict(  # SDXL's layout in small: no attention at the first level, per-level transformer depths
    sample_size=SIZE // 8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2), use_linear_projection=True, norm_num_groups=8,
    addition_embed_type="text_time", addition_time_embed_dim=SDXL_TIME_DIM,
)


def _sdxl_clip(projection: bool, act: str):
    import transformers

    from tests.pipelines.conftest import _perturb

    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=SDXL_WIDTH, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                      hidden_act=act, projection_dim=SDXL_WIDTH)
    model = transformers.CLIPTextModelWithProjection(cfg) if projection else transformers.CLIPTextModel(cfg)
    return _perturb(model, 0.02)


def save_tiny_sdxl(root):
    """diffusers' StableDiffusionXLPipeline (CLIP-L-like + bigG-like encoders with projection, a text_time U-Net
    with 6 time ids, force_zeros_for_empty_prompt) and StableDiffusionXLImg2ImgPipeline refiner (bigG only, 5
    time ids), SDXL's Euler scheduler, saved to root/base and root/refiner; returns both pipelines."""
    import torch
    import transformers
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from ldm_jax.models.tokenizers import CLIPTokenizer
    from tests.pipelines.conftest import VAE, _perturb

    torch.manual_seed(0)
    width, time_dim = SDXL_WIDTH, SDXL_TIME_DIM
    base_unet = _perturb(UNet2DConditionModel(cross_attention_dim=2 * width,
                                              projection_class_embeddings_input_dim=width + 6 * time_dim,
                                              **SDXL_UNET), 0.05)
    refiner_unet = _perturb(UNet2DConditionModel(cross_attention_dim=width,
                                                 projection_class_embeddings_input_dim=width + 5 * time_dim,
                                                 **SDXL_UNET), 0.05)
    vae = _perturb(AutoencoderKL(in_channels=3, out_channels=3, scaling_factor=0.13025, **VAE), 0.05)
    clip_l, bigg = _sdxl_clip(False, "quick_gelu"), _sdxl_clip(True, "gelu")
    CLIPTokenizer.default().save(root / "tok")
    CLIPTokenizer.default(pad_token="!").save(root / "tok2")  # SDXL's tokenizer_2 pads with "!"
    tok, tok2 = (transformers.CLIPTokenizer.from_pretrained(str(root / t)) for t in ("tok", "tok2"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    base = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_l, text_encoder_2=bigg, tokenizer=tok,
                                     tokenizer_2=tok2, unet=base_unet, scheduler=scheduler)
    refiner = StableDiffusionXLImg2ImgPipeline(vae=vae, text_encoder=None, text_encoder_2=bigg, tokenizer=None,
                                               tokenizer_2=tok2, unet=refiner_unet, scheduler=scheduler,
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    for name, pipe in (("base", base), ("refiner", refiner)):
        pipe.save_pretrained(root / name)
        pipe.set_progress_bar_config(disable=True)
    return base, refiner
