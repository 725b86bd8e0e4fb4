"""HF text-encoder folders <-> ldm_jax trees: key prefixes, strict errors, config translation, export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ldm_jax.convert import hf
from ldm_jax.convert.common import ConversionError, read_safetensors, write_safetensors
from ldm_jax.models import text
from ldm_jax.types import ConfigError


def _tiny_hf_clip():
    return transformers.CLIPTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=8, eos_token_id=63, bos_token_id=62, pad_token_id=63,
    )


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(_tiny_hf_clip()).eval()
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    return path, model


def _ids():
    ids = np.array([[62, 5, 9, 63, 63, 63, 63, 63], [62, 1, 2, 3, 4, 5, 6, 63]], np.int32)
    return ids


def test_transformers5_saves_without_prefix_and_both_forms_load(clip_folder, tmp_path):
    path, model = clip_folder
    sd = read_safetensors(path / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in sd)
    cfg, params = hf.load_clip_text(path)
    # an older export: every key under text_model., plus the position_ids buffer it used to save
    old = {f"text_model.{k}": v for k, v in sd.items()}
    old["text_model.embeddings.position_ids"] = np.arange(8)[None]
    params_old = hf.clip_text_params_from_state_dict(old, cfg)
    jax.tree.map(np.testing.assert_array_equal, params_old, params)
    with torch.no_grad():
        ref = model(torch.from_numpy(_ids().astype(np.int64))).last_hidden_state.numpy()
    out = text.CLIPTextEncoder(cfg).apply({"params": params_old}, jnp.asarray(_ids()))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_missing_unexpected_and_mismatched_keys_are_listed_together(clip_folder):
    path, _ = clip_folder
    cfg, _ = hf.load_clip_text(path)
    sd = read_safetensors(path / "model.safetensors")
    del sd["encoder.layers.1.mlp.fc2.weight"]
    del sd["final_layer_norm.bias"]
    sd["text_projection.weight"] = np.zeros((4, 16), np.float32)
    sd["encoder.layers.0.layer_norm1.weight"] = np.ones(15, np.float32)
    with pytest.raises(ConversionError) as err:
        hf.clip_text_params_from_state_dict(sd, cfg)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing 2: final_norm/bias, layers_1/mlp/fc2/kernel" in msg
    assert "unexpected 1: text_projection.weight" in msg
    assert "layers_0/ln_1/scale: expected (16,), got (15,)" in msg
    with pytest.raises(ConversionError, match="missing 16: layers_2/attn/key/bias"):  # a config with one more layer
        hf.clip_text_params_from_state_dict(read_safetensors(path / "model.safetensors"),
                                            cfg.replace(num_layers=3))


def test_config_translation():
    d = _tiny_hf_clip().to_dict()
    cfg = hf.clip_text_config_from_hf(d)
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.max_length, cfg.eos_token_id) == (16, 2, 2, 8, 63)
    assert hf.clip_text_config_from_hf({"text_config": d}) == cfg  # a full CLIPConfig
    assert hf.clip_text_config_from_hf(hf.clip_text_config_to_hf(cfg)) == cfg
    with pytest.raises(ConfigError, match="lacks the field 'hidden_size'"):
        hf.clip_text_config_from_hf({k: v for k, v in d.items() if k != "hidden_size"})
    bert = transformers.BertConfig(hidden_size=48, num_attention_heads=3, intermediate_size=96).to_dict()
    assert hf.bert_config_from_hf(bert).num_heads == 3
    with pytest.raises(ConfigError, match="only 'absolute'"):
        hf.bert_config_from_hf({**bert, "position_embedding_type": "relative_key"})


def test_export_loads_in_transformers(clip_folder, tmp_path):
    path, model = clip_folder
    cfg, params = hf.load_clip_text(path)
    hf.save_clip_text(tmp_path / "export", cfg, params)
    again = transformers.CLIPTextModel.from_pretrained(str(tmp_path / "export")).eval()
    ids = torch.from_numpy(_ids().astype(np.int64))
    with torch.no_grad():
        np.testing.assert_allclose(again(ids).pooler_output.numpy(), model(ids).pooler_output.numpy(), rtol=1e-6)
    assert json.loads((tmp_path / "export" / "config.json").read_text())["num_hidden_layers"] == 2


def test_bert_prefix_buffers_and_errors(tmp_path):
    torch.manual_seed(0)
    cfg_hf = transformers.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=10)
    model = transformers.BertModel(cfg_hf, add_pooling_layer=False).eval()
    sd = {f"bert.{k}": v.numpy() for k, v in model.state_dict().items()}
    sd["bert.embeddings.position_ids"] = np.arange(10)[None]
    (tmp_path / "config.json").write_text(json.dumps(cfg_hf.to_dict()))
    write_safetensors(tmp_path / "model.safetensors", sd)
    cfg, params = hf.load_bert(tmp_path)
    assert not cfg.add_pooler
    ids = np.array([[1, 7, 9, 2]], np.int32)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    np.testing.assert_allclose(text.BertEncoder(cfg).apply({"params": params}, jnp.asarray(ids)), ref,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ConversionError, match="missing 2: pooler/bias, pooler/kernel"):
        hf.bert_params_from_state_dict(sd, cfg.replace(add_pooler=True))


def test_minilm_loads_from_installed_package():
    cfg, params = hf.load_minilm()
    assert cfg == text.minilm_l6().replace(add_pooler=True)
    assert params["word_embeddings"]["embedding"].shape == (30522, 384)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        hf.load_bert(hf.minilm_dir() / "1_Pooling")


@pytest.mark.parametrize("pooler", [True, False])
def test_bert_export_loads_in_transformers(tmp_path, pooler):
    """save_bert writes what transformers' AutoModel reads back: the same tensors, the same hidden states."""
    torch.manual_seed(1)
    cfg_hf = transformers.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=10)
    model = transformers.BertModel(cfg_hf, add_pooling_layer=pooler).eval()
    model.save_pretrained(tmp_path / "in")
    cfg, params = hf.load_bert(tmp_path / "in")
    assert cfg.add_pooler == pooler
    hf.save_bert(tmp_path / "out", cfg, params)
    assert hf.bert_config_from_hf(hf.bert_config_to_hf(cfg), add_pooler=pooler) == cfg
    again = transformers.AutoModel.from_pretrained(str(tmp_path / "out"), add_pooling_layer=pooler).eval()
    assert type(again).__name__ == "BertModel"
    want, got = model.state_dict(), again.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    ids = torch.tensor([[1, 7, 9, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).last_hidden_state.numpy()
    ours = text.BertEncoder(cfg).apply({"params": params}, jnp.asarray(ids.numpy(), jnp.int32),
                                       jnp.asarray(mask.numpy(), jnp.int32))
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
