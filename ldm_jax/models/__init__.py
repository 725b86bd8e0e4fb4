"""Flax linen networks of latent diffusion, NHWC in and out, with typed frozen configs.

    unet = UNet(cfg); out = unet.apply({"params": p}, x, timesteps, context, y=None)
    dit = DiT(cfg); out = dit.apply({"params": p}, x, timesteps, context, y=None)        # Peebles & Xie 2023
    mmdit = MMDiT(cfg); out = mmdit.apply({"params": p}, x, timesteps, context, pooled=None)  # SD3's MMDiT
    backbones.network(cfg) builds whichever of the three a config describes
    cn = ControlNet(cn_cfg); down, mid = cn.apply({"params": q}, x, timesteps, context, cond_image)
    out = unet.apply({"params": p}, x, timesteps, context, down_residuals=down, mid_residual=mid)
    lora.merge(params, [(adapter, weight)])   LoRA as a transformation of parameter trees (models.lora)
    vae = AutoencoderKL(cfg); mean, logvar = vae.apply({"params": p}, images, method=vae.encode)

Precision: every module has `dtype` (computation) and `param_dtype` (storage); normalisations and the
attention softmax run in float32 whatever `dtype` is.

Parameters. ``init`` returns parameters boxed in ``nn.Partitioned`` with logical axis names; ``apply``
accepts boxed or plain trees. ``unbox(params)`` strips the boxes; the converters return plain arrays.
``nn.get_partition_spec(jax.eval_shape(init))`` gives the logical spec tree for sharding.

Logical axis names (map them to mesh axes with ``nn.logical_axis_rules``; unmapped names replicate):
    parameters:  "embed"     input feature dim of a dense layer / output dim of a down-projection
                 "mlp"       hidden / output feature dim of an up-projection (time MLP, GEGLU, proj_in)
                 "heads"     the heads*head_dim dim of attention q/k/v (output) and to_out (input) kernels
                 "conv_in", "conv_out"  input / output channels of a (kh, kw, in, out) conv kernel
                 "norm"      GroupNorm / LayerNorm scale and bias (small: keep replicated)
                 "vocab"     rows of an embedding table (class embedding)
    activations: "batch", "height", "width", "embed" (NHWC maps); "batch", "length", "embed" (sequences);
                 "batch", "length", "heads", "kv" (attention q/k/v)
A typical FSDP rule set: [("batch", ("data", "fsdp")), ("embed", "fsdp"), ("conv_out", "fsdp")].
"""

from ldm_jax.models import backbones, lora
from ldm_jax.models.attention import (
    FeedForward,
    MultiHeadAttention,
    SpatialSelfAttention,
    SpatialTransformer,
    TransformerBlock,
    dot_product_attention,
)
from ldm_jax.models.controlnet import (
    ControlNet,
    ControlNetConfig,
    controlnet_example_inputs,
    controlnet_from_unet,
    controlnet_param_shapes,
    init_controlnet,
)
from ldm_jax.models.dit import DiT, DiTConfig, dit_param_shapes, init_dit
from ldm_jax.models.layers import GroupNorm, LayerNorm, ResnetBlock, count_params, timestep_embedding, unbox
from ldm_jax.models.mmdit import MMDiT, MMDiTConfig, init_mmdit, mmdit_param_shapes
from ldm_jax.models.presets import (
    dit_xl_2,
    sd3_medium,
    sd15_inpaint_unet,
    sd15_unet,
    sd21_unet,
    sd35_medium,
    sd_vae,
    sdxl_refiner_unet,
    sdxl_unet,
    tiny_dit,
    tiny_mmdit,
    tiny_sdxl_unet,
    tiny_unet,
    tiny_vae,
)
from ldm_jax.models.text import (
    BertConfig,
    BertEncoder,
    CLIPTextConfig,
    CLIPTextEncoder,
    clip_l14,
    mean_pool,
    minilm_l6,
    openclip_bigg_text,
    openclip_h14_text,
    tiny_bert,
    tiny_clip_text,
)
from ldm_jax.models.text_encoder import TextEncoder, TextEncoders
from ldm_jax.models.tokenizers import CLIPTokenizer, WordPieceTokenizer
from ldm_jax.models.unet import UNet, UNetConfig, init_unet, unet_example_inputs, unet_param_shapes
from ldm_jax.models.vae import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    init_vae,
    vae_example_inputs,
    vae_param_shapes,
)

__all__ = [
    "ControlNet",
    "ControlNetConfig",
    "controlnet_example_inputs",
    "controlnet_from_unet",
    "controlnet_param_shapes",
    "init_controlnet",
    "DiT",
    "DiTConfig",
    "MMDiT",
    "MMDiTConfig",
    "backbones",
    "lora",
    "openclip_bigg_text",
    "sdxl_refiner_unet",
    "sdxl_unet",
    "tiny_sdxl_unet",
    "dit_param_shapes",
    "dit_xl_2",
    "init_dit",
    "init_mmdit",
    "mmdit_param_shapes",
    "sd35_medium",
    "sd3_medium",
    "tiny_dit",
    "tiny_mmdit",
    "AutoencoderConfig",
    "AutoencoderKL",
    "DiagonalGaussian",
    "FeedForward",
    "GroupNorm",
    "LayerNorm",
    "MultiHeadAttention",
    "ResnetBlock",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "TransformerBlock",
    "UNet",
    "UNetConfig",
    "count_params",
    "dot_product_attention",
    "init_unet",
    "init_vae",
    "sd15_inpaint_unet",
    "sd15_unet",
    "sd21_unet",
    "sd_vae",
    "tiny_unet",
    "tiny_vae",
    "timestep_embedding",
    "unbox",
    "unet_example_inputs",
    "unet_param_shapes",
    "vae_example_inputs",
    "vae_param_shapes",
    "BertConfig",
    "BertEncoder",
    "CLIPTextConfig",
    "CLIPTextEncoder",
    "CLIPTokenizer",
    "TextEncoder",
    "TextEncoders",
    "WordPieceTokenizer",
    "clip_l14",
    "mean_pool",
    "minilm_l6",
    "openclip_h14_text",
    "tiny_bert",
    "tiny_clip_text",
]
