"""CLIP text and BERT encoders against transformers' PyTorch models (random tiny configs), and presets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ldm_jax.convert import hf
from ldm_jax.models import text
from ldm_jax.types import ConfigError

VOCAB, LENGTH, EOS = 99, 16, 98


def _close(ours, ref, rtol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < rtol, f"max relative error {err:.2e}"


def _ids(seed, batch=3, eos_at=(5, 9, 15)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, EOS - 1, (batch, LENGTH), generator=g)
    for row, pos in enumerate(eos_at[:batch]):
        ids[row, pos] = EOS
        ids[row, pos + 1 :] = EOS  # SD-1 style padding with EOS after the first EOS
    return ids


@pytest.fixture(scope="module")
def clip_models(tmp_path_factory):
    """{hidden_act: (torch CLIPTextModel, our config, our params)}: random tiny models saved by transformers."""
    out = {}
    for act in ("quick_gelu", "gelu"):
        torch.manual_seed(0)
        cfg = transformers.CLIPTextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=LENGTH, hidden_act=act, eos_token_id=EOS, bos_token_id=EOS - 1,
            pad_token_id=EOS,
        )
        model = transformers.CLIPTextModel(cfg).eval()
        path = tmp_path_factory.mktemp(f"clip_{act}")
        model.save_pretrained(path)
        out[act] = (model, *hf.load_clip_text(path))
    return out


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def clip_pair(request, clip_models):
    return clip_models[request.param]


def test_clip_last_hidden_and_pooled_match_transformers(clip_pair):
    model, cfg, params = clip_pair
    ids = _ids(1)
    with torch.no_grad():
        ref = model(ids)
    hidden, pooled = text.CLIPTextEncoder(cfg).apply({"params": params}, jnp.asarray(ids.numpy()),
                                                     return_pooled=True)
    assert hidden.shape == (3, LENGTH, 32) and pooled.shape == (3, 32)
    _close(hidden, ref.last_hidden_state)
    _close(pooled, ref.pooler_output)
    # default call = last hidden states
    _close(text.CLIPTextEncoder(cfg).apply({"params": params}, jnp.asarray(ids.numpy())), ref.last_hidden_state)


def test_clip_skip_equals_diffusers_penultimate_plus_final_norm(clip_pair):
    model, cfg, params = clip_pair
    ids = _ids(2)
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
        penultimate = model.final_layer_norm(states[-2])  # diffusers clip_skip=1
        first_raw = states[1]
    module = text.CLIPTextEncoder(cfg)
    x = jnp.asarray(ids.numpy())
    _close(module.apply({"params": params}, x, hidden_layer=-2), penultimate)
    _close(module.apply({"params": params}, x, hidden_layer=1, final_norm=False), first_raw)
    with pytest.raises(ValueError, match="hidden_layer=7 out of range"):
        module.apply({"params": params}, x, hidden_layer=7)


def test_clip_padding_mask_and_legacy_eos_rule(clip_pair):
    model, cfg, params = clip_pair
    ids = _ids(3)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 10:] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state
    got = text.CLIPTextEncoder(cfg).apply({"params": params}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    _close(got, ref)
    # eos_token_id == 2 (old configs): pooled at the largest id, as transformers keeps for them
    ids = torch.randint(0, EOS - 2, (3, LENGTH), generator=torch.Generator().manual_seed(4))
    ids[0, 3], ids[1, 8], ids[2, 0] = EOS - 1, EOS - 1, EOS - 1  # no EOS at all: the rules differ
    model.eos_token_id = 2
    try:
        with torch.no_grad():
            ref = model(ids).pooler_output
    finally:
        model.eos_token_id = EOS
    _, pooled = text.CLIPTextEncoder(cfg.replace(eos_token_id=2)).apply(
        {"params": params}, jnp.asarray(ids.numpy()), return_pooled=True)
    _close(pooled, ref)
    hidden = text.CLIPTextEncoder(cfg).apply({"params": params}, jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(pooled, hidden[jnp.arange(3), jnp.array([3, 8, 0])], rtol=1e-6)


@pytest.fixture(scope="module")
def bert_pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=24,
    )
    model = transformers.BertModel(cfg).eval()
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    return model, *hf.load_bert(path)


def test_bert_matches_transformers_with_mask_and_token_types(bert_pair):
    model, cfg, params = bert_pair
    assert cfg.add_pooler and cfg.num_layers == 2
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, token_type_ids=types)
        ref_plain = model(ids).last_hidden_state
    module = text.BertEncoder(cfg)
    x, m, t = (jnp.asarray(a.numpy()) for a in (ids, mask, types))
    hidden, pooled = module.apply({"params": params}, x, m, t, return_pooled=True)
    _close(hidden, ref.last_hidden_state)
    _close(pooled, ref.pooler_output)
    _close(module.apply({"params": params}, x), ref_plain)


def test_mean_pool_is_masked_mean():
    hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(text.mean_pool(hidden, mask), [[1.0, 2.0], [6.0, 7.0]])


def _count(cfg):
    module = text.CLIPTextEncoder(cfg) if isinstance(cfg, text.CLIPTextConfig) else text.BertEncoder(cfg)
    return sum(x.size for x in jax.tree.leaves(text.text_param_shapes(module)))


def test_preset_parameter_counts():
    assert _count(text.clip_l14()) == 123_060_480  # SD-1.x text encoder
    assert _count(text.openclip_h14_text()) == 340_387_840  # SD-2.x text encoder (23 layers)
    assert _count(text.minilm_l6()) == 22_565_376  # all-MiniLM-L6-v2 without its pooler


def test_logical_axes_on_params():
    module = text.CLIPTextEncoder(text.tiny_clip_text(VOCAB))
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    specs = nn.get_partition_spec(boxed)
    assert tuple(specs["token_embedding"]["embedding"]) == ("vocab", "embed")
    assert tuple(specs["layers_0"]["mlp"]["fc1"]["kernel"]) == ("embed", "mlp")
    assert tuple(specs["layers_0"]["attn"]["query"]["kernel"]) == ("embed", "heads")
    assert tuple(specs["final_norm"]["scale"]) == ("norm",)


def test_remat_and_bfloat16(clip_models):
    _, cfg, params = clip_models["gelu"]
    ids = jnp.asarray(_ids(6).numpy())
    ref = text.CLIPTextEncoder(cfg).apply({"params": params}, ids)
    remat = jax.jit(text.CLIPTextEncoder(cfg, remat=True).apply)({"params": params}, ids)
    np.testing.assert_allclose(remat, ref, rtol=1e-5, atol=1e-5)
    bf16 = jax.jit(text.CLIPTextEncoder(cfg, dtype=jnp.bfloat16).apply)({"params": params}, ids)
    assert bf16.dtype == jnp.bfloat16
    # bf16 compute of LayerNorm-ed outputs: within 5% of the float32 output scale
    assert float(jnp.abs(bf16.astype(jnp.float32) - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_bad_inputs_raise_one_line_errors():
    module = text.CLIPTextEncoder(text.tiny_clip_text(VOCAB))
    params = text.text_param_shapes(module)

    def trace(ids):  # the checks run while tracing, so jit and eval_shape raise them too
        return jax.eval_shape(lambda p, i: module.apply({"params": p}, i), params, ids)

    assert trace(jax.ShapeDtypeStruct((2, 77), jnp.int32)).shape == (2, 77, 32)
    with pytest.raises(ValueError, match="exceeds the model's 77 positions; tokenize with max_length=77"):
        trace(jax.ShapeDtypeStruct((1, 80), jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        trace(jax.ShapeDtypeStruct((1, 4), jnp.float32))
    with pytest.raises(ValueError, match=r"must be \(batch, length\)"):
        trace(jax.ShapeDtypeStruct((4,), jnp.int32))
    with pytest.raises(ConfigError, match="did you mean 'quick_gelu'"):
        text.CLIPTextConfig(hidden_act="quick_gelo")
    with pytest.raises(ConfigError, match="not divisible"):
        text.BertConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="needs a config with add_pooler=True"):
        bert = text.BertEncoder(text.tiny_bert(VOCAB))
        jax.eval_shape(lambda: bert.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), return_pooled=True))
