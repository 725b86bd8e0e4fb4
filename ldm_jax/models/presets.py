"""Named architectures. Each function returns a config (no weights); pass overrides as keyword arguments.

sd15_unet()          Stable Diffusion 1.x U-Net, 859,520,964 parameters
sd15_inpaint_unet()  the same with 9 input channels (latents, mask, masked-image latents)
sd21_unet()          Stable Diffusion 2.x U-Net (linear projections, 64-wide heads), 865,910,724
sdxl_unet()          SDXL base U-Net (3 levels, transformer depths 1/2/10, text_time embedding), 2,567,463,684
sdxl_refiner_unet()  SDXL refiner U-Net (4 levels, depth 4, aesthetic-score conditioning), 2,259,526,660
sd_vae()             the SD 1.x/2.x autoencoder (f = 8, 4 latent channels), 83,653,863
tiny_unet(), tiny_vae()   a few hundred thousand parameters, for CPU tests and smoke runs
tiny_sdxl_unet()     a small U-Net with SDXL's layout (per-level depths, text_time embedding, 6 time ids)
dit_xl_2(), tiny_dit()    DiT-XL/2 (Peebles & Xie 2023) and a small DiT (``models.dit``)
sd3_medium(), sd35_medium(), tiny_mmdit()   SD3 / SD3.5 medium MMDiTs and a small one (``models.mmdit``)
"""

from __future__ import annotations

from ldm_jax.models.dit import dit_xl_2, tiny_dit
from ldm_jax.models.mmdit import sd3_medium, sd35_medium, tiny_mmdit
from ldm_jax.models.unet import UNetConfig
from ldm_jax.models.vae import AutoencoderConfig


def sd15_unet(**overrides) -> UNetConfig:
    """SD 1.x (CompVis v1-inference.yaml): 8 heads per level, 1x1-conv projections, CLIP-L context (768)."""
    return UNetConfig(**overrides)


def sd15_inpaint_unet(**overrides) -> UNetConfig:
    """SD 1.5 inpainting: input = concat(noisy latents 4, mask 1, masked-image latents 4)."""
    return UNetConfig(**{"in_channels": 9, **overrides})


def sd21_unet(**overrides) -> UNetConfig:
    """SD 2.x (v2-inference-v.yaml): head width 64 (5, 10, 20, 20 heads), linear projections, OpenCLIP-H (1024)."""
    base = dict(head_dim=64, use_linear_projection=True, cross_attention_dim=1024, sample_size=96)
    return UNetConfig(**{**base, **overrides})


def sdxl_unet(**overrides) -> UNetConfig:
    """SDXL 1.0 base (Podell et al. 2023): levels 320/640/1280, no attention at the first level, transformer
    depths (1, 2, 10) (mid block 10), 64-wide heads, linear projections, context = CLIP-L + OpenCLIP-bigG
    penultimate states concatenated (768 + 1280 = 2048). The added embedding takes the bigG pooled projection
    (1280) and 6 time ids (original size, crop top-left, target size) x 256: 1280 + 6 * 256 = 2816."""
    base = dict(
        block_out_channels=(320, 640, 1280),
        attention_levels=(False, True, True),
        head_dim=64,
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        sample_size=128,
    )
    return UNetConfig(**{**base, **overrides})


def sdxl_refiner_unet(**overrides) -> UNetConfig:
    """SDXL 1.0 refiner: levels 384/768/1536/1536 with attention at the middle two, 4 transformer layers
    everywhere (mid block too), 64-wide heads, context = OpenCLIP-bigG penultimate states only (1280). The
    added embedding takes the bigG pooled projection (1280) and 5 time ids (original size, crop top-left,
    aesthetic score) x 256: 1280 + 5 * 256 = 2560."""
    base = dict(
        block_out_channels=(384, 768, 1536, 1536),
        attention_levels=(False, True, True, False),
        head_dim=64,
        transformer_layers_per_block=4,
        cross_attention_dim=1280,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560,
        sample_size=128,
    )
    return UNetConfig(**{**base, **overrides})


def sd_vae(**overrides) -> AutoencoderConfig:
    """The KL-f8 autoencoder shared by SD 1.x and 2.x (scaling factor 0.18215)."""
    return AutoencoderConfig(**overrides)


def tiny_unet(**overrides) -> UNetConfig:
    """Two levels (32, 64 channels), one res block each, 2 heads, 8 norm groups; for tests and CPU runs."""
    base = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_levels=(False, True),
        num_heads=2,
        cross_attention_dim=32,
        norm_num_groups=8,
        sample_size=16,
    )
    return UNetConfig(**{**base, **overrides})


def tiny_sdxl_unet(**overrides) -> UNetConfig:
    """SDXL's layout in small: 3 levels (32, 64, 64), attention at levels 1-2 with depths (1, 1, 2), linear
    projections, 2 heads, context 32; added embedding = 16-wide pooled text + 6 time ids x 8 = 64."""
    base = dict(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        attention_levels=(False, True, True),
        num_heads=2,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        norm_num_groups=8,
        sample_size=16,
    )
    return UNetConfig(**{**base, **overrides})


def tiny_vae(**overrides) -> AutoencoderConfig:
    """Three levels (f = 4), 32/64/64 channels, one res block per level, 8 norm groups."""
    base = dict(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=32)
    return AutoencoderConfig(**{**base, **overrides})


__all__ = ["dit_xl_2", "sd15_inpaint_unet", "sd15_unet", "sd21_unet", "sd35_medium", "sd3_medium", "sd_vae",
           "tiny_dit", "tiny_mmdit", "tiny_unet", "tiny_vae", "sdxl_unet", "sdxl_refiner_unet", "tiny_sdxl_unet"]
