"""grain pipeline: batch format, exact resume from saved state, per-host sharding, augmentation, tokenization."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.data import pipeline
from ldm_jax.data.pipeline import DataConfig, make_global_batch, make_iterator, resize_image, to_channels
from ldm_jax.data.shapes_checker import score_images
from ldm_jax.types import ConfigError


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_format_matches_source(shapes_cfg, shapes32):
    batch = next(make_iterator(shapes_cfg))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["caption"].dtype.kind == "U" and batch["index"].dtype == np.int64
    assert {"color", "shape", "position", "size", "template"} <= batch.keys()
    src = shapes32.source("train")
    for row, i in enumerate(batch["index"]):
        record = src[int(i)]
        np.testing.assert_allclose(batch["image"][row], record["image"] / 127.5 - 1.0, atol=1e-6)
        assert batch["caption"][row] == record["caption"].decode() and batch["color"][row] == record["color"]
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


def test_restored_iterator_yields_the_same_batches(shapes_cfg):
    # 200 examples / 16 = 12 steps per epoch: resuming at step 10 crosses into the reshuffled second epoch.
    cfg = {**shapes_cfg, "caption_dropout": 0.3, "flip": True, "seed": 5}
    it = make_iterator(cfg)
    assert it.steps_per_epoch == 12
    _take(it, 10)
    state = json.loads(json.dumps(it.get_state()))  # as stored next to a checkpoint
    expected = _take(it, 6)
    restored = make_iterator({**cfg, "num_threads": 0})  # thread count does not change the stream
    restored.set_state(state)
    _assert_same(_take(restored, 6), expected)
    fresh = make_iterator(cfg)
    _take(fresh, 10)
    _assert_same(_take(fresh, 6), expected)


def test_state_from_other_settings_is_refused(shapes_cfg):
    state = make_iterator(shapes_cfg).get_state()
    other = make_iterator({**shapes_cfg, "seed": 1})
    with pytest.raises(ConfigError, match="seed=0 but this pipeline has seed=1"):
        other.set_state(state)


def test_two_hosts_read_disjoint_shards_covering_the_epoch(shapes_cfg):
    cfg = {**shapes_cfg, "num_epochs": 1, "batch_size": 12}  # 200 = 16 * 12 + 8: the 8 are dropped
    single = list(make_iterator(cfg))
    hosts = [list(make_iterator(cfg, process_index=p, process_count=2)) for p in range(2)]
    assert len(single) == len(hosts[0]) == len(hosts[1]) == 16
    for step, (a, b) in enumerate(zip(*hosts, strict=True)):
        assert a["image"].shape[0] == b["image"].shape[0] == 6
        assert not set(a["index"]) & set(b["index"])
        # the hosts' rows side by side are the one-host global batch, in order (row i gets the same noise)
        np.testing.assert_array_equal(np.concatenate([a["index"], b["index"]]), single[step]["index"])
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), single[step]["image"])
    epoch = np.concatenate([b["index"] for h in hosts for b in h])
    assert len(epoch) == len(set(epoch)) == 192


def test_a_position_saved_on_two_hosts_resumes_on_one_or_four(shapes_cfg):
    cfg = {**shapes_cfg, "batch_size": 8}  # repeating epochs, as in training
    reference = make_iterator(cfg)
    batches = [next(reference)["index"] for _ in range(30)]
    hosts = [make_iterator(cfg, process_index=p, process_count=2) for p in range(2)]
    for _ in range(27):  # 27 steps: into the second epoch (200 / 8 = 25 steps each)
        for it in hosts:
            next(it)
    states = [it.get_state() for it in hosts]
    assert states[0] == states[1]  # the position counts global batches: the same on every host
    for count in (1, 4):
        resumed = [make_iterator(cfg, process_index=p, process_count=count) for p in range(count)]
        for it in resumed:
            it.set_state(states[0])
        for step in range(27, 30):
            got = np.concatenate([next(it)["index"] for it in resumed])
            np.testing.assert_array_equal(got, batches[step])


def test_epochs_are_reshuffled_permutations(shapes_cfg):
    cfg = {**shapes_cfg, "num_epochs": 2, "batch_size": 8}
    order = np.concatenate([b["index"] for b in make_iterator(cfg)])
    first, second = order[:200], order[200:]
    assert sorted(first) == sorted(second) == list(range(200))
    assert not np.array_equal(first, second)
    unshuffled = np.concatenate([b["index"] for b in make_iterator({**cfg, "shuffle": False, "num_epochs": 1})])
    assert list(unshuffled) == list(range(200))


def test_caption_dropout_is_seeded_per_example(shapes_cfg):
    cfg = {**shapes_cfg, "caption_dropout": 0.5, "num_epochs": 1, "batch_size": 8}
    dropped = [np.concatenate([b["caption"] == "" for b in make_iterator({**cfg, "seed": s})]) for s in (3, 3, 4)]
    np.testing.assert_array_equal(dropped[0], dropped[1])
    assert 0.35 < dropped[0].mean() < 0.65 and not np.array_equal(dropped[0], dropped[2])
    assert not np.concatenate([b["caption"] == "" for b in make_iterator({**cfg, "caption_dropout": 0.0})]).any()


def test_flip_mirrors_image_caption_and_position(shapes_cfg, shapes32):
    cfg = {**shapes_cfg, "flip": True, "num_epochs": 1, "batch_size": 40, "shuffle": False}
    batch = next(make_iterator(cfg))
    src = shapes32.source("train")
    flipped = 0
    for row, i in enumerate(batch["index"]):
        original = src[int(i)]["image"] / 127.5 - 1.0
        if np.allclose(batch["image"][row], original[:, ::-1]) and not np.allclose(original, original[:, ::-1]):
            flipped += 1
            assert batch["caption"][row] == pipeline.mirror_caption(src[int(i)]["caption"].decode())
    assert 8 < flipped < 32
    # The mirrored labels and captions still describe the flipped images exactly.
    assert score_images(batch["image"], {k: batch[k] for k in ("color", "shape", "position", "size")})["all_acc"] == 1
    assert score_images(batch["image"], list(batch["caption"]))["all_acc"] == 1


def test_resize_crop_and_channels():
    image = np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (20, 1, 3))  # (20, 40, 3), x ramp
    cropped = resize_image(image, 10, center_crop=True)
    squashed = resize_image(image, 10, center_crop=False)
    assert cropped.shape == squashed.shape == (10, 10, 3)
    assert 55 <= cropped[:, 0, 0].mean() <= 70 and 165 <= cropped[:, -1, 0].mean() <= 180  # middle half only
    assert squashed[:, 0, 0].mean() < 20 and squashed[:, -1, 0].mean() > 215  # whole width
    gray = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert to_channels(gray, 1).shape == (2, 2, 1)
    assert to_channels(gray, 1)[0, 0, 0] == round(0.299 * 0 + 0.587 * 1 + 0.114 * 2)
    np.testing.assert_array_equal(to_channels(gray[..., :1], 3), np.repeat(gray[..., :1], 3, axis=-1))
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 1] = [0, 0, 255, 255]
    np.testing.assert_array_equal(to_channels(rgba, 3), [[[255, 255, 255], [0, 0, 255]]])


def test_tokenizers_add_arrays(shapes_cfg):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "red", "blue", "circle", "in", "the", "top", "left"]
    fast = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    fast.pre_tokenizer = Whitespace()
    cfg = {**shapes_cfg, "max_length": 6, "batch_size": 4}
    batch = next(make_iterator(cfg, tokenizer=fast))
    assert batch["input_ids"].shape == (4, 6) and batch["input_ids"].dtype == np.int32
    for row, caption in enumerate(batch["caption"]):
        ids = [words.index(w) if w in words else 1 for w in caption.replace(",", " ,").split()][:6]
        assert list(batch["input_ids"][row][: len(ids)]) == ids
        assert batch["attention_mask"][row].sum() == len(ids)
    hf = PreTrainedTokenizerFast(tokenizer_object=fast, pad_token="[PAD]", unk_token="[UNK]")
    hf_batch = next(make_iterator(cfg, tokenizer=hf))
    np.testing.assert_array_equal(hf_batch["input_ids"], batch["input_ids"])
    plain = next(make_iterator(cfg, tokenizer=lambda texts: np.array([[len(t)] for t in texts])))
    assert list(plain["input_ids"][:, 0]) == [len(c) for c in plain["caption"]]


def test_global_batch_over_eight_devices(shapes_cfg):
    batch = next(make_iterator(shapes_cfg))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    arrays = make_global_batch(batch, NamedSharding(mesh, P("data")))
    assert "caption" not in arrays and arrays["image"].shape == (16, 32, 32, 3)
    assert len(arrays["image"].addressable_shards) == 8
    for shard in arrays["image"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch["image"][shard.index])
    np.testing.assert_array_equal(np.asarray(arrays["index"]), batch["index"])


def test_config_errors_are_one_line(shapes_cfg):
    cases = [
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"caption_dropout": 1.5}, "caption_dropout"),
        ({"batch_sise": 4}, "did you mean 'batch_size'"),
        ({"latent_cache": "/x", "flip": True}, "flip does not apply"),
    ]
    for change, text in cases:
        with pytest.raises(ConfigError, match=text) as info:
            DataConfig.from_config({**shapes_cfg, **change})
        assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="not divisible by process_count"):
        make_iterator({**shapes_cfg, "batch_size": 15}, process_count=2)
    with pytest.raises(ConfigError, match="too few for batch_size"):
        make_iterator({**shapes_cfg, "batch_size": 256, "num_epochs": 1})


def test_reader_processes_give_the_same_stream_and_state(shapes_cfg):
    cfg = {**shapes_cfg, "flip": True, "caption_dropout": 0.3, "batch_size": 32}
    expected = _take(make_iterator(cfg), 5)
    mp_cfg = {**cfg, "num_workers": 1}
    it, restored = make_iterator(mp_cfg), make_iterator(mp_cfg)
    try:
        _assert_same(_take(it, 2), expected[:2])
        state = json.loads(json.dumps(it.get_state()))
        restored.set_state(state)
        _assert_same(_take(restored, 3), expected[2:])
    finally:
        it.close()
        restored.close()
    with pytest.raises(ConfigError, match="num_workers=1 but this pipeline has num_workers=0"):
        make_iterator(cfg).set_state(state)
