"""The high-level TextEncoder: embedded MiniLM against sentence-transformers, and an SD-layout CLIP folder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from ldm_jax.models.text import BertEncoder, mean_pool
from ldm_jax.models.text_encoder import TextEncoder
from ldm_jax.models.tokenizers import CLIPTokenizer

SENTENCE = "A watercolor painting of a red fox sleeping under a pine tree."
# sentence-transformers 6.2 (all-MiniLM-L6-v2, torch CPU float32) on SENTENCE: the first 8 values of the
# normalized embedding, and the norm of the mean-pooled embedding before its Normalize module.
ST_LEADING = [0.0067038, 0.01374324, -0.01131797, 0.08870374, 0.07209176, 0.02549092, 0.00300031, -0.04305735]
ST_NORM = 5.411141872406006


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder.minilm()


def test_minilm_sentence_embedding_equals_sentence_transformers(minilm):
    hidden, mask = minilm.encode([SENTENCE, "x"], return_mask=True)
    assert isinstance(minilm.module, BertEncoder)
    assert hidden.shape == (2, 32, 384) and minilm.hidden_size == 384 and minilm.max_length == 32
    pooled = mean_pool(hidden, mask)[0]
    norm = float(jnp.linalg.norm(pooled))
    np.testing.assert_allclose(norm, ST_NORM, rtol=1e-5)
    np.testing.assert_allclose(pooled[:8] / norm, ST_LEADING, atol=1e-5)
    # batch composition does not change a prompt's conditioning; padding is masked inside BERT
    other = minilm.encode(["a much longer second prompt changes nothing for the first one", SENTENCE])
    np.testing.assert_allclose(other[1], hidden[0], atol=1e-5)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """An SD-layout pair of folders: text_encoder/ (random tiny CLIPTextModel) and tokenizer/."""
    root = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu",
    )
    model = transformers.CLIPTextModel(cfg).eval()
    model.save_pretrained(root / "text_encoder")
    CLIPTokenizer.default(pad_token="!").save(root / "tokenizer")  # SD-2.x pads with id 0
    return root, model


def test_from_hf_clip_finds_sibling_tokenizer_and_matches_torch(sd_folder):
    root, model = sd_folder
    te = TextEncoder.from_hf_clip(root / "text_encoder")
    assert te.tokenizer.pad_id == 0 and te.max_length == 77 and te.hidden_size == 32
    prompts = ["a photo of a cat", "a red circle in the top left"]
    ids = te.tokenize_dict(prompts)["input_ids"]
    with torch.no_grad():
        states = model(torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True).hidden_states
        ref_last = model.final_layer_norm(states[-1]).numpy()
        ref_skip = model.final_layer_norm(states[-2]).numpy()
    np.testing.assert_allclose(te.encode(prompts), ref_last, rtol=1e-4, atol=1e-5)
    skip = TextEncoder.from_hf_clip(root / "text_encoder", root / "tokenizer", hidden_layer=-2)
    # the pure function, as a train step calls it inside its jit, on host-tokenized ids
    got = jax.jit(skip.encode_ids)(skip.params, jnp.asarray(ids))
    np.testing.assert_allclose(got, ref_skip, rtol=1e-4, atol=1e-5)


def test_text_encoder_validates(sd_folder, minilm):
    root, _ = sd_folder
    with pytest.raises(ValueError, match="CLIP text encoders only"):
        TextEncoder(minilm.module, minilm.params, minilm.tokenizer, hidden_layer=-2)
    te = TextEncoder.from_hf_clip(root / "text_encoder")
    with pytest.raises(ValueError, match="exceeds the encoder's 77 positions"):
        TextEncoder(te.module, te.params, CLIPTokenizer(te.tokenizer.hf, max_length=100))
