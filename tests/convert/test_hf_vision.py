"""CLIP image tower (models/clip_vision.py) and its HF converter vs transformers' CLIPVisionModel."""

import jax
import numpy as np
import pytest
import torch
import transformers

from ldm_jax.convert import hf_vision
from ldm_jax.convert.common import ConversionError, flatten
from ldm_jax.models.clip_vision import CLIPVisionEncoder

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act="quick_gelu")
TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, eos_token_id=49407, bos_token_id=49406,
            pad_token_id=49407)


def save_tiny_clip(path):
    """A 2-layer, 32-wide random transformers CLIPModel saved to `path`; returns the torch model."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # make the LayerNorms and embeddings non-trivial
        for name, p in model.named_parameters():
            if "norm" in name or "class_embedding" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    return save_tiny_clip(path), path


def test_vision_tower_matches_transformers(clip_dir):
    model, path = clip_dir
    cfg, params = hf_vision.load_clip_vision(path)
    assert cfg.projection_dim == 24 and cfg.num_layers == 2
    pixels = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    out = jax.jit(CLIPVisionEncoder(cfg).apply)({"params": params}, pixels)
    with torch.no_grad():
        ref = model.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        embeds = model.visual_projection(ref.pooler_output)
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.pooled, ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.image_embeds, embeds.numpy(), atol=1e-4, rtol=1e-4)


def test_vision_model_without_prefix_and_round_trip(clip_dir, tmp_path):
    model, path = clip_dir
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    vision.save_pretrained(tmp_path)  # transformers 5: keys without the vision_model. prefix
    cfg, params = hf_vision.load_clip_vision(tmp_path)
    assert cfg.projection_dim == 0
    pixels = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        want = vision(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).pooler_output.numpy()
    got = jax.jit(CLIPVisionEncoder(cfg).apply)({"params": params}, pixels).pooled
    np.testing.assert_allclose(got, want, atol=1e-4)
    # export -> import is the identity, and the export loads into transformers strictly
    cfg2, params2 = hf_vision.load_clip_vision(path)
    state = hf_vision.clip_vision_state_dict(params2)
    missing, unexpected = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**VISION, projection_dim=24)).load_state_dict(
        {k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    back = hf_vision.clip_vision_params_from_state_dict(state, cfg2)
    for k, v in flatten(params2).items():
        np.testing.assert_array_equal(flatten(back)[k], v)


def test_bad_weights_are_listed(clip_dir):
    _, path = clip_dir
    cfg, params = hf_vision.load_clip_vision(path)
    state = hf_vision.clip_vision_state_dict(params)
    state.pop("vision_model.post_layernorm.bias")
    state["vision_model.encoder.layers.0.mlp.fc9.weight"] = np.zeros(3)
    with pytest.raises(ConversionError, match="missing 1: post_norm/bias.*unexpected 1"):
        hf_vision.clip_vision_params_from_state_dict(state, cfg)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        hf_vision.load_clip_vision(path / "nope")
