"""Latent cache: round trip with toy encoders, reuse, dropout to the empty-caption embedding, exact resume, the same
cache built by 1 or several processes (from a dataset or from tar shards)."""

import json

import numpy as np
import pytest

from ldm_jax.data import latent_cache, write_shards
from ldm_jax.data.common import DataError
from ldm_jax.data.latent_cache import build_latent_cache
from ldm_jax.data.latent_records import LatentCache
from ldm_jax.data.pipeline import make_iterator
from ldm_jax.types import ConfigError
from tests.data.conftest import as_processes

BATCH = 24  # does not divide the 40 test examples: the last batch is padded


class ToyEncoders:
    """Deterministic stand-ins: 4x4 mean pooling for the VAE, character codes for the text encoder."""

    def __init__(self):
        self.calls = 0

    def images(self, images):
        assert images.shape == (BATCH, 32, 32, 3)  # always full batches
        self.calls += 1
        mean = images.reshape(BATCH, 8, 4, 8, 4, 3).mean(axis=(2, 4))
        return mean, 0.1 + np.abs(mean)

    @staticmethod
    def text(captions):
        assert len(captions) == BATCH
        codes = np.zeros((BATCH, 6, 2), np.float32)
        for i, c in enumerate(captions):
            chars = [ord(ch) / 128.0 for ch in c[:6]]
            codes[i, : len(chars), 0] = chars
            codes[i, :, 1] = len(c)
        return {"hidden": codes, "mask": (codes[..., 0] > 0).astype(np.int32)}


@pytest.fixture(scope="module")
def source(shapes_cfg):
    return {**shapes_cfg, "split": "test", "num_threads": 0}


@pytest.fixture(scope="module")
def cache(source, tmp_path_factory):
    enc = ToyEncoders()
    out = tmp_path_factory.mktemp("latents")
    result = build_latent_cache(source, enc.images, enc.text, out, BATCH,
                                encoder_ids={"vae": "toy-pool4", "text": "toy-chars"})
    return result, enc, out


def test_cache_round_trip_matches_direct_encoding(cache, shapes32):
    result, enc, out = cache
    manifest = json.loads((out / latent_cache.MANIFEST).read_text())
    assert manifest["num_examples"] == len(result) == 40 and enc.calls == 2
    assert manifest["encoder_ids"] == {"vae": "toy-pool4", "text": "toy-chars"}
    shapes_of = {f["name"]: f["shape"] for f in manifest["fields"]}
    assert shapes_of["latent_mean"] == [8, 8, 3] and shapes_of["hidden"] == [6, 2] and shapes_of["mask"] == [6]
    src = shapes32.source("test")
    seen = set()
    for k in range(len(result)):
        record = result[k]
        i = int(record["index"])
        seen.add(i)
        image = np.repeat((src[i]["image"] / 127.5 - 1.0)[None], BATCH, axis=0).astype(np.float32)
        mean, std = ToyEncoders().images(image)
        np.testing.assert_allclose(record["latent_mean"], mean[0], atol=1e-6)
        np.testing.assert_allclose(record["latent_std"], std[0], atol=1e-6)
        caption = src[i]["caption"].decode()
        assert record["caption"] == caption and record["color"] == src[i]["color"]
        np.testing.assert_array_equal(record["hidden"], ToyEncoders.text([caption] * BATCH)["hidden"][0])
    assert seen == set(range(40))


def test_cache_feeds_the_pipeline_with_dropout_and_resume(cache):
    result, _, out = cache
    cfg = {"latent_cache": str(out), "batch_size": 8, "caption_dropout": 0.4, "seed": 2, "num_threads": 0}
    it = make_iterator(cfg)
    batches = [next(it) for _ in range(10)]  # 5 steps per epoch: two epochs
    batch = batches[0]
    assert batch["latent_mean"].shape == (8, 8, 8, 3) and batch["hidden"].dtype == np.float32
    assert batch["mask"].dtype == np.int32 and "image" not in batch
    empty = ToyEncoders.text([""] * BATCH)
    by_index = {int(result[k]["index"]): result[k] for k in range(len(result))}
    dropped = 0
    for b in batches:
        for row, i in enumerate(b["index"]):
            if b["caption"][row] == "":
                dropped += 1
                np.testing.assert_array_equal(b["hidden"][row], empty["hidden"][0])
                np.testing.assert_array_equal(b["mask"][row], empty["mask"][0])
            else:
                np.testing.assert_array_equal(b["hidden"][row], by_index[int(i)]["hidden"])
            np.testing.assert_array_equal(b["latent_mean"][row], by_index[int(i)]["latent_mean"])
    assert 10 < dropped < 55
    resumed = make_iterator(cfg)
    [next(resumed) for _ in range(3)]
    state = json.loads(json.dumps(resumed.get_state()))
    again = make_iterator(cfg)
    again.set_state(state)
    for expected in batches[3:10]:
        got = next(again)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])


def test_cache_is_reused_and_guarded(cache, source, tmp_path):
    _, _, out = cache
    enc = ToyEncoders()
    ids = {"vae": "toy-pool4", "text": "toy-chars"}
    build_latent_cache(source, enc.images, enc.text, out, BATCH, encoder_ids=ids)
    assert enc.calls == 0  # reused
    with pytest.raises(DataError, match="other data or encoders"):
        build_latent_cache(source, enc.images, enc.text, out, BATCH, encoder_ids={"vae": "other"})
    half = build_latent_cache(source, enc.images, enc.text, tmp_path / "f16", BATCH, encoder_ids=ids,
                              dtype="float16")
    full = LatentCache(out)
    assert half.manifest["stored_dtype"] == "float16"
    np.testing.assert_allclose(half[3]["latent_mean"], full[3]["latent_mean"], atol=2e-3)
    with pytest.raises(DataError, match="no latent cache"):
        LatentCache(tmp_path / "nothing")


def test_three_processes_build_the_same_cache_as_one(cache, source, tmp_path):
    one, _, _ = cache
    out = tmp_path / "together"
    as_processes(3, lambda p, barrier: build_latent_cache(
        source, ToyEncoders().images, ToyEncoders.text, out, BATCH,
        encoder_ids={"vae": "toy-pool4", "text": "toy-chars"}, process_index=p, process_count=3, barrier=barrier))
    manifest = json.loads((out / latent_cache.MANIFEST).read_text())
    assert manifest["records"] == [f"latents-{p:05d}-of-00003.array_record" for p in range(3)]
    together = LatentCache(out)
    assert len(together) == len(one) == 40
    for i in range(40):
        a, b = together[i], one[i]
        assert a.keys() == b.keys() and a["caption"] == b["caption"]
        for k in a:
            if k != "caption":
                np.testing.assert_array_equal(a[k], b[k])


def test_cache_from_shards_is_the_same_on_one_two_and_three_processes(tmp_path):
    rng = np.random.default_rng(4)
    records = [{"image": rng.integers(0, 255, (32, 32, 3), np.uint8), "caption": f"shard example {i}"}
               for i in range(80)]
    write_shards(records, tmp_path / "shards", 10, image_format="npy")  # 8 shards
    bad = tmp_path / "shards" / "shard-000002.tar"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated: every build skips it
    source = {"name": "shards", "builder_kwargs": {"paths": str(tmp_path / "shards")}, "resolution": 32,
              "num_threads": 0}
    ids = {"vae": "toy-pool4", "text": "toy-chars"}
    caches = []
    for count in (1, 2, 3):
        out = tmp_path / f"by{count}"
        as_processes(count, lambda p, barrier, out=out, count=count: build_latent_cache(
            source, ToyEncoders().images, ToyEncoders.text, out, BATCH, encoder_ids=ids, process_index=p,
            process_count=count, barrier=barrier))
        caches.append(LatentCache(out))
    one = caches[0]
    kept = [i for i in range(80) if i // 10 != 2]
    assert one.manifest["records"] == [f"latents-shard-{s:06d}.array_record" for s in range(8) if s != 2]
    assert one.manifest["num_examples"] == len(one) == len(kept)
    assert [one[k]["caption"] for k in range(len(one))] == [records[i]["caption"] for i in kept]  # shard, place
    np.testing.assert_array_equal([one[k]["index"] for k in range(len(one))], [(i // 10) << 32 | i % 10 for i in kept])
    for other in caches[1:]:
        assert other.manifest == one.manifest
        for k in range(len(one)):
            a, b = other[k], one[k]
            assert a.keys() == b.keys() and a["caption"] == b["caption"]
            for key in a:
                if key != "caption":
                    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        for key in one.uncond:
            np.testing.assert_array_equal(other.uncond[key], one.uncond[key])


def test_buckets_are_refused_before_any_encoding(tmp_path):
    source = {"name": "shards", "builder_kwargs": {"paths": str(tmp_path / "none"), "buckets": [[8, 8], [6, 12]]},
              "resolution": 8}
    with pytest.raises(ConfigError, match="latent_cache with aspect-ratio buckets"):
        build_latent_cache(source, ToyEncoders().images, ToyEncoders.text, tmp_path / "cache", BATCH)
    assert not (tmp_path / "cache").exists()
