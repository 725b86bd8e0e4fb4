"""SDXL networks: the U-Net's text_time added embedding, the projected CLIP text encoder, and the real
configs' parameter counts against diffusers / transformers models built on the meta device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ldm_jax import models
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert import hf
from ldm_jax.convert.common import unflatten
from ldm_jax.models import presets, text
from ldm_jax.models.unet import unet_example_added
from ldm_jax.types import ConfigError


def _torch_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "preset,count",
    [(presets.sdxl_unet, 2_567_463_684), (presets.sdxl_refiner_unet, 2_259_526_660)],
    ids=["base", "refiner"],
)
def test_sdxl_unet_counts_match_diffusers_on_meta(preset, count):
    from diffusers import UNet2DConditionModel

    cfg = preset()
    ours = models.count_params(models.unet_param_shapes(cfg))
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(dconv.unet_config_to_diffusers(cfg))
    assert ours == _torch_count(reference) == count
    # the mid block takes the last level's depth, as diffusers does
    depth = cfg.transformer_layers()[-1]
    assert len(reference.mid_block.attentions[0].transformer_blocks) == depth


def test_openclip_bigg_count_matches_transformers_on_meta():
    cfg = text.openclip_bigg_text()
    shapes = text.text_param_shapes(text.CLIPTextEncoder(cfg))
    ours = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    hf_cfg = transformers.CLIPTextConfig(**{k: v for k, v in hf.clip_text_config_to_hf(cfg).items()
                                            if k not in ("architectures", "dtype")})
    with torch.device("meta"):
        reference = transformers.CLIPTextModelWithProjection(hf_cfg)
    assert ours == _torch_count(reference) == 694_659_840
    assert shapes["text_projection"]["kernel"].shape == (1280, 1280)


def test_preset_architectures():
    base, refiner = presets.sdxl_unet(), presets.sdxl_refiner_unet()
    assert base.heads_per_level() == (5, 10, 20) and base.transformer_layers() == (1, 2, 10)
    assert refiner.heads_per_level() == (6, 12, 24, 24) and refiner.transformer_layers() == (4, 4, 4, 4)
    # pooled bigG projection (1280) + 6 (base) or 5 (refiner) time ids x 256
    assert base.projection_class_embeddings_input_dim == 1280 + 6 * 256
    assert refiner.projection_class_embeddings_input_dim == 1280 + 5 * 256


@pytest.fixture(scope="module")
def tiny():
    """Random weights drawn from the parameter shapes (no compiled init): kernels ~ N(0, 1/fan_in)."""
    cfg = presets.tiny_sdxl_unet()
    g = np.random.default_rng(0)
    flat = {}
    for k, shape in models.unet_param_shapes(cfg).items():
        scale = 1 / np.sqrt(np.prod(shape[:-1])) if k.endswith("kernel") else 0.1
        flat[k] = (1.0 if k.endswith("scale") else 0.0) + scale * g.standard_normal(shape).astype(np.float32)
    return cfg, unflatten(flat)


def _inputs(cfg, batch=2):
    g = np.random.default_rng(0)
    x = jnp.asarray(g.normal(size=(batch, 8, 8, 4)), jnp.float32)
    t = jnp.asarray([10.0, 700.0][:batch])
    ctx = jnp.asarray(g.normal(size=(batch, 5, cfg.cross_attention_dim)), jnp.float32)
    added = {
        "text_embeds": jnp.asarray(g.normal(size=(batch, 16)), jnp.float32),
        "time_ids": jnp.asarray([[512, 512, 0, 0, 512, 512], [768, 512, 32, 16, 1024, 1024]][:batch], jnp.float32),
    }
    return x, t, ctx, added


def test_tiny_sdxl_uses_added_conditioning(tiny):
    cfg, params = tiny
    assert set(params["add_embedding"]) == {"linear_1", "linear_2"}
    assert params["add_embedding"]["linear_1"]["kernel"].shape == (16 + 6 * 8, 4 * 32)
    x, t, ctx, added = _inputs(cfg)
    run = jax.jit(lambda p, a: models.UNet(cfg).apply({"params": p}, x, t, ctx, added=a))
    out = run(params, added)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    for key in ("time_ids", "text_embeds"):
        changed = {**added, key: added[key] + 1.0}
        assert float(jnp.max(jnp.abs(run(params, changed) - out))) > 1e-4, key


def test_added_conditioning_errors(tiny):
    cfg, params = tiny
    unet = models.UNet(cfg)
    x, t, ctx, added = _inputs(cfg)
    apply = lambda **kw: jax.eval_shape(lambda: unet.apply({"params": params}, x, t, ctx, **kw))
    with pytest.raises(ValueError, match="needs added="):
        apply()
    with pytest.raises(ValueError, match=r"lacks \['time_ids'\]"):
        apply(added={"text_embeds": added["text_embeds"]})
    with pytest.raises(ValueError, match="= 56, but projection_class_embeddings_input_dim is 64"):
        apply(added={**added, "time_ids": added["time_ids"][:, :5]})
    with pytest.raises(ValueError, match=r"expected \(2, P\) and \(2, N\)"):
        apply(added={**added, "time_ids": added["time_ids"][:1]})
    plain = models.tiny_unet()
    with pytest.raises(ValueError, match="addition_embed_type is None"):
        ex = models.unet_example_inputs(plain)
        jax.eval_shape(lambda: models.UNet(plain).init(jax.random.key(0), *ex, added=added))
    with pytest.raises(ConfigError, match="only None or 'text_time'"):
        presets.tiny_sdxl_unet(addition_embed_type="text")
    with pytest.raises(ConfigError, match="needs positive ints"):
        presets.tiny_sdxl_unet(addition_time_embed_dim=None)
    with pytest.raises(ConfigError, match="addition_embed_type is None"):
        models.tiny_unet(addition_time_embed_dim=8)
    assert unet_example_added(plain) is None
    assert unet_example_added(cfg, 3, num_time_ids=6)["text_embeds"].shape == (3, 16)


def test_projected_clip_text_encoder():
    cfg = text.tiny_clip_text(vocab_size=64, projection_dim=24).replace(eos_token_id=63, max_length=8)
    enc = text.CLIPTextEncoder(cfg)
    ids = jnp.asarray([[62, 5, 9, 63, 63, 63], [62, 1, 2, 3, 4, 63]], jnp.int32)
    params = enc.init(jax.random.key(0), ids)["params"]  # a plain init also creates the projection
    assert models.unbox(params)["text_projection"]["kernel"].shape == (32, 24)
    assert "bias" not in params["text_projection"]
    hidden, embeds = enc.apply({"params": params}, ids, hidden_layer=-2, final_norm=False, return_pooled=True)
    assert hidden.shape == (2, 6, 32) and embeds.shape == (2, 24)
    last = enc.apply({"params": params}, ids)
    kernel = models.unbox(params)["text_projection"]["kernel"]
    want = jnp.stack([last[0, 3], last[1, 5]]) @ kernel  # the first EOS position, then the projection
    np.testing.assert_allclose(embeds, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="projection_dim=0"):
        text.tiny_clip_text(projection_dim=0)
