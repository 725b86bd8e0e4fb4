"""CLIP BPE (offline, from open_clip's vocab) and WordPiece tokenizers against the reference tokenizers."""

import json

import numpy as np
import pytest
import transformers

from ldm_jax.convert.hf import minilm_dir
from ldm_jax.models.tokenizers import CLIPTokenizer, WordPieceTokenizer, byte_alphabet, clip_vocab_and_merges

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, 4k, highly detailed!!",
    "",
    "naïve café — 東京 🐱 it's 3.14",
    " ".join(["very long prompt"] * 40),  # > 77 tokens: truncated, EOS kept
]


@pytest.fixture(scope="module")
def vocab_merges():
    return clip_vocab_and_merges()


@pytest.fixture(scope="module")
def default_tok():
    return CLIPTokenizer.default()


def _write_folder(path, vocab, merges, pad_token):
    """An SD-style tokenizer folder: vocab.json + merges.txt + configs naming the pad token."""
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (path / "special_tokens_map.json").write_text(json.dumps(special))
    (path / "tokenizer_config.json").write_text(json.dumps({**special, "model_max_length": 77}))
    return path


def test_byte_alphabet_is_a_bijection_onto_printables():
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256 and all(c.isprintable() and not c.isspace() for c in alphabet)
    assert alphabet[:3] == ["!", '"', "#"] and alphabet[-1] == chr(256 + 67)


def test_vocab_sizes_and_openai_ids(vocab_merges, default_tok):
    vocab, merges = vocab_merges
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    ids = default_tok(["a photo of a cat"])
    assert ids.dtype == np.int32 and ids.shape == (1, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 7:] == 49407).all()  # SD-1.x pads with EOS


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_folder_tokenizer_equals_transformers(tmp_path, vocab_merges, default_tok, pad_token, pad_id):
    folder = _write_folder(tmp_path / "tokenizer", *vocab_merges, pad_token)
    ours = CLIPTokenizer.from_dir(folder)
    ref = transformers.CLIPTokenizer.from_pretrained(str(folder))
    expected = ref(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    ids, mask = ours.tokenize(PROMPTS)
    assert ours.pad_id == pad_id and ours.max_length == 77
    np.testing.assert_array_equal(ids, np.array(expected))
    assert ids[-1, -1] == 49407 and mask[-1].all()  # truncated to 77 with EOS last
    assert ids[2, :2].tolist() == [49406, 49407] and (ids[2, 2:] == pad_id).all() and mask[2].sum() == 2
    if pad_id == 49407:  # the default (built from open_clip's file) is SD-1.x's tokenizer
        np.testing.assert_array_equal(default_tok(PROMPTS), ids)


def test_saved_tokenizer_round_trips(tmp_path, default_tok):
    default_tok.save(tmp_path / "tok")
    again = CLIPTokenizer.from_dir(tmp_path / "tok")
    np.testing.assert_array_equal(again(PROMPTS), default_tok(PROMPTS))


def test_clip_tokenizer_input_errors(tmp_path, default_tok):
    with pytest.raises(TypeError, match="prompts must be strings"):
        default_tok(["ok", 3])
    assert default_tok("a photo of a cat").shape == (1, 77)
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)


def test_wordpiece_matches_tokenizers_reference():
    tok = WordPieceTokenizer.from_file(minilm_dir(), max_length=32)
    ids, mask = tok.tokenize(["A watercolor painting of a red fox sleeping under a pine tree.", "x " * 50])
    # ids from sentence-transformers' tokenizer for all-MiniLM-L6-v2
    expected = [101, 1037, 2300, 18717, 4169, 1997, 1037, 2417, 4419, 5777, 2104, 1037, 7222, 3392, 1012, 102]
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == np.int32
    assert ids[0, :16].tolist() == expected and (ids[0, 16:] == 0).all()
    assert mask[0].tolist() == [1] * 16 + [0] * 16
    assert ids[1, 0] == 101 and ids[1, -1] == 102 and mask[1].all()  # truncated, [SEP] kept
    assert tok.vocab_size == 30522
