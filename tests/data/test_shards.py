"""Sharded streaming input: 10k+ examples in 64 tar shards read by 2 processes (every example once per epoch),
exact resume mid-epoch, corrupt shards and images skipped and counted, bucketing on 1, 2 and 4 processes, the
image-folder writer."""

import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import make_iterator, write_shards
from ldm_jax.data.common import DataError
from ldm_jax.data.pipeline import resize_image, to_channels
from ldm_jax.data.shards import ShardError, fit_image, index_shard, nearest_bucket
from ldm_jax.images import load_rgb
from ldm_jax.types import ConfigError
from tests.data.conftest import as_processes

NUM_EXAMPLES, PER_SHARD = 10_200, 160  # 63 shards of 160 and one of 120: hosts' shares differ in size


def _records(n, start=0):
    for i in range(start, start + n):
        pixels = np.full((8, 8, 3), i % 251, np.uint8)
        pixels[0, 0] = (i >> 16, (i >> 8) & 255, i & 255)  # the example's number, readable from the image
        yield {"image": pixels, "caption": f"example {i}"}


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "big"
    summary = write_shards(_records(NUM_EXAMPLES), out, PER_SHARD, image_format="npy")
    assert len(summary.paths) == 64 and summary.num_examples == NUM_EXAMPLES
    return out


def _cfg(path, **kw):
    options = {"paths": str(path / "*.tar"), "shuffle_buffer": 400}
    options.update(kw.pop("options", {}))
    return {"name": "shards", "builder_kwargs": options, "resolution": 8, "batch_size": 64, "num_threads": 2,
            **kw}


def _numbers(batches):
    """The example numbers written into pixel (0, 0), in stream order."""
    pix = np.round((np.concatenate([b["image"][:, 0, 0] for b in batches]) + 1.0) * 127.5).astype(np.int64)
    return pix[:, 0] << 16 | pix[:, 1] << 8 | pix[:, 2]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_two_processes_see_every_example_once_per_epoch(big):
    one = [list(make_iterator(_cfg(big, num_epochs=1, drop_remainder=False), process_index=p, process_count=2))
           for p in range(2)]
    two = [list(make_iterator(_cfg(big, num_epochs=2, drop_remainder=False), process_index=p, process_count=2))
           for p in range(2)]
    first = [_numbers(h) for h in one]
    assert all(b["image"].shape == (32, 8, 8, 3) and b["image"].dtype == np.float32 for b in one[0][:-1])
    assert set(first[0]).isdisjoint(first[1]) and 4000 < len(first[0]) < 6200
    assert sorted(np.concatenate(first)) == list(range(NUM_EXAMPLES))
    assert not np.array_equal(first[0], np.sort(first[0]))  # shuffled
    # the captions and indices belong to the same examples as the pixels
    batch = one[1][3]
    assert list(batch["caption"]) == [f"example {i}" for i in _numbers([batch])]
    numbers = _numbers([batch])
    np.testing.assert_array_equal(batch["index"], (numbers // PER_SHARD) << 32 | numbers % PER_SHARD)  # shard, place
    second = []
    for p in range(2):
        stream = _numbers(two[p])
        np.testing.assert_array_equal(stream[: len(first[p])], first[p])  # epoch 0, then straight into epoch 1
        second.append(stream[len(first[p]):])
    assert sorted(np.concatenate(second)) == list(range(NUM_EXAMPLES))
    assert set(second[0] // PER_SHARD) != set(first[0] // PER_SHARD)  # shards are dealt anew each epoch


def test_resume_mid_epoch_continues_bit_for_bit(big):
    cfg = _cfg(big, flip=True, caption_dropout=0.3, seed=3, batch_size=128)  # endless, as in training
    it = make_iterator(cfg, process_index=1, process_count=2)
    for _ in range(70):  # 70 * 64 = 4480 examples: late in this host's first epoch, the buffer full
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as stored beside a checkpoint
    assert len(json.dumps(state)) < 4000 and state["epoch"] == 0
    expected = [next(it) for _ in range(30)]  # crosses into epoch 1
    assert it.get_state()["epoch"] == 1
    restored = make_iterator({**cfg, "num_threads": 0, "prefetch": 0}, process_index=1, process_count=2)
    restored.set_state(state)
    _assert_same([next(restored) for _ in range(30)], expected)
    assert restored.get_state() == it.get_state()
    it.close()
    restored.close()


def test_other_settings_are_refused_and_another_process_count_restarts_at_the_next_epoch(big, caplog):
    it = make_iterator(_cfg(big), process_index=0, process_count=2)
    next(it)
    state = it.get_state()
    with pytest.raises(ConfigError, match="shuffle_buffer=400 but this pipeline has shuffle_buffer=10"):
        make_iterator(_cfg(big, options={"shuffle_buffer": 10}), process_index=0, process_count=2).set_state(state)
    with pytest.raises(ConfigError, match="process_index=0 but this pipeline has process_index=1"):
        make_iterator(_cfg(big), process_index=1, process_count=2).set_state(state)
    single = make_iterator(_cfg(big))
    assert single.num_examples == NUM_EXAMPLES and single.steps_per_epoch == NUM_EXAMPLES // 64
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data"):
        single.set_state(state)
    assert "continues at the start of epoch 1" in caplog.text and single.get_state()["epoch"] == 1
    with pytest.raises(ConfigError, match="unknown option 'shufle_buffer'.*shuffle_buffer"):
        make_iterator(_cfg(big, options={"shufle_buffer": 5}))
    with pytest.raises(ConfigError, match="each process needs at least one shard"):
        make_iterator(_cfg(big, options={"paths": str(big / "shard-00000[01].tar")}), process_count=4)


def test_corrupt_shard_and_image_are_skipped_counted_and_warned_once(big, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(big, data)
    truncated = data / "shard-000005.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size * 3 // 5])
    bad = list(_records(9, start=NUM_EXAMPLES))
    bad[4]["image"] = b"\x89PNG\r\n\x1a\n not really a png"
    write_shards(bad, data, 100, prefix="extra")
    with caplog.at_level(logging.WARNING, logger="ldm_jax.data"):
        hosts = [make_iterator(_cfg(data, num_epochs=1, drop_remainder=False), process_index=p, process_count=2)
                 for p in range(2)]
        streams = [_numbers(list(it)) for it in hosts]
    lost = set(range(5 * PER_SHARD, 6 * PER_SHARD)) | {NUM_EXAMPLES + 4}
    assert sorted(np.concatenate(streams)) == sorted(set(range(NUM_EXAMPLES + 9)) - lost)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert sum("corrupt shard" in w and "shard-000005.tar" in w for w in warnings) == 1
    assert sum("unreadable example 4" in w and "extra-000000.tar" in w for w in warnings) == 1
    states = [it.get_state() for it in hosts]
    assert [s["corrupt_shards"] for s in states if s["corrupt_shards"]] == [["shard-000005.tar"]]
    assert sum(s["skipped_examples"] for s in states) == 1
    assert sum(it.stats["corrupt_shards"] for it in hosts) == 1


@pytest.mark.parametrize("cut", ["mid_data", "mid_header", "member_boundary", "garbage", "empty", "no_images"])
def test_index_shard_detects_damage(tmp_path, cut):
    write_shards(_records(3), tmp_path, 10, image_format="png")
    path = tmp_path / "shard-000000.tar"
    raw = path.read_bytes()
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    assert len(index_shard(str(path))) == 3
    end_of_second = members[1].offset_data + 512  # the 2nd member's data fits one block
    damaged = {"mid_data": raw[: members[2].offset_data + 10], "mid_header": raw[: members[2].offset + 300],
               "member_boundary": raw[:end_of_second], "garbage": b"not a tar file" * 100, "empty": b""}
    if cut == "no_images":
        with tarfile.open(path, "w") as tf:
            info = tarfile.TarInfo("a.txt")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
    else:
        path.write_bytes(damaged[cut])
    with pytest.raises(ShardError):
        index_shard(str(path))


def _aspect_records(n):
    rng = np.random.default_rng(0)
    shapes = [(8, 8), (6, 12), (12, 6), (9, 10), (5, 14)]
    for i in range(n):
        h, w = shapes[rng.integers(len(shapes))]
        pixels = np.full((h, w, 3), i % 251, np.uint8)
        yield {"image": pixels, "caption": f"{h}x{w} #{i}"}


def test_bucketing_single_shape_batches_deterministic_and_resumable(tmp_path):
    write_shards(_aspect_records(600), tmp_path, 50)
    buckets = [[8, 8], [6, 12], [12, 6]]
    cfg = _cfg(tmp_path, options={"buckets": buckets, "shuffle_buffer": 64}, batch_size=16, num_epochs=2,
               drop_remainder=False)
    batches = list(make_iterator(cfg))
    assert len({b["image"].shape[1:3] for b in batches}) == 3
    seen = []
    for b in batches:
        assert b["image"].ndim == 4 and b["image"].shape[-1] == 3
        for caption in b["caption"]:
            h, w = map(int, caption.split(" ")[0].split("x"))
            assert tuple(buckets[nearest_bucket(h, w, buckets)]) == b["image"].shape[1:3]
            seen.append(caption)
    assert sorted(seen) == sorted(2 * [r["caption"] for r in _aspect_records(600)])  # partial last batches kept
    again = make_iterator(cfg)
    _assert_same([next(again) for _ in range(40)], batches[:40])
    state = json.loads(json.dumps(again.get_state()))
    assert any(state["queues"])  # examples waiting in bucket queues are part of the state
    restored = make_iterator({**cfg, "prefetch": 0})
    restored.set_state(state)
    _assert_same(list(restored), batches[40:])
    assert restored.stats["borrowed_examples"] == restored.stats["dropped_examples"] == 0
    with pytest.raises(ConfigError, match="bucket_weights must be 3 non-negative numbers"):
        make_iterator(_cfg(tmp_path, options={"buckets": buckets, "bucket_weights": [1, 2]}))
    with pytest.raises(ConfigError, match="queue_size 4 is below the host batch 8"):
        make_iterator(_cfg(tmp_path, options={"buckets": buckets, "queue_size": 4}, batch_size=16), process_count=2)


BUCKETS = [[8, 8], [6, 12], [12, 6]]


@pytest.fixture(scope="module")
def aspect(tmp_path_factory):
    out = tmp_path_factory.mktemp("aspect")
    write_shards(_aspect_records(600), out, 50)  # 12 shards, examples of 5 sizes: 2/5, 2/5, 1/5 to the 3 buckets
    return out


def _own_bucket(caption):
    h, w = map(int, caption.split(" ")[0].split("x"))
    return tuple(BUCKETS[nearest_bucket(h, w, BUCKETS)])


@pytest.mark.parametrize("count", [2, 4])
def test_buckets_on_several_processes_agree_on_shapes_see_each_example_once_and_drop_by_the_rule(aspect, count):
    cfg = _cfg(aspect, options={"buckets": BUCKETS, "shuffle_buffer": 32}, batch_size=16, num_epochs=1, flip=True,
               num_threads=0, prefetch=0)
    host_batch, hosts, stats = 16 // count, [], []
    for p in range(count):
        it = make_iterator({**cfg, "drop_remainder": False}, process_index=p, process_count=count)
        batches = []
        for batch in it:
            batches.append(batch)
            assert sum(map(len, it.get_state()["queues"])) <= 2 * host_batch * 3  # the default queue_size
        hosts.append(batches)
        stats.append(it.stats)
        # drop_remainder drops exactly the host's last batch when it is partial, and counts it
        dropping = make_iterator({**cfg, "drop_remainder": True}, process_index=p, process_count=count)
        tail = len(batches[-1]["index"]) if len(batches[-1]["index"]) < host_batch else 0
        _assert_same(list(dropping), batches[:-1] if tail else batches)
        assert dropping.stats["dropped_examples"] == tail and it.stats["dropped_examples"] == 0
    assert len({len(h) for h in hosts}) == 1  # equal shares (3 or 6 shards of 50): the same number of steps
    for step in zip(*hosts, strict=True):
        assert len({b["image"].shape[1:] for b in step}) == 1  # every step: one shape on all hosts
    assert {b["image"].shape[1:3] for b in hosts[0]} == {tuple(b) for b in BUCKETS}
    captions = [c for h in hosts for b in h for c in b["caption"]]
    assert sorted(captions) == sorted(r["caption"] for r in _aspect_records(600))  # each example once
    borrowed = sum(_own_bucket(c) != b["image"].shape[1:3] for h in hosts for b in h for c in b["caption"])
    assert 0 < borrowed == sum(s["borrowed_examples"] for s in stats) < 0.1 * len(captions)


@pytest.mark.parametrize("count, weights", [(2, None), (4, [2, 2, 1])])
def test_buckets_on_several_processes_resume_mid_epoch_exactly(aspect, count, weights):
    cfg = _cfg(aspect, options={"buckets": BUCKETS, "shuffle_buffer": 32, "bucket_weights": weights},
               batch_size=16, seed=5, flip=True)  # endless, as in training
    hosts = [make_iterator(cfg, process_index=p, process_count=count) for p in range(count)]
    for _ in range(20):
        assert len({next(it)["image"].shape for it in hosts}) == 1
    states = [json.loads(json.dumps(it.get_state())) for it in hosts]
    assert all(s["epoch"] == 0 and any(s["queues"]) for s in states)
    assert len({json.dumps([s["schedule"], s["bucket_weights"]]) for s in states}) == 1
    if weights:
        np.testing.assert_allclose(states[0]["bucket_weights"], [0.4, 0.4, 0.2])
    expected = [[next(it) for _ in range(60)] for it in hosts]  # crosses into the next epoch
    assert all(it.get_state()["epoch"] >= 1 for it in hosts)
    for step in zip(*expected, strict=True):
        assert len({b["image"].shape for b in step}) == 1
    for p, it in enumerate(hosts):
        restored = make_iterator({**cfg, "num_threads": 0, "prefetch": 0}, process_index=p, process_count=count)
        restored.set_state(states[p])
        _assert_same([next(restored) for _ in range(60)], expected[p])
        assert restored.get_state() == it.get_state()
        restored.close()
        it.close()


def test_fit_image_generalises_resize_image():
    rng = np.random.default_rng(1)
    for h, w in [(20, 40), (40, 20), (17, 17), (9, 31)]:
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        for crop in (True, False):
            np.testing.assert_array_equal(fit_image(image, 12, 12, crop), resize_image(image, 12, crop))
        assert fit_image(image, 6, 12).shape == (6, 12, 3)
    assert nearest_bucket(10, 10, [[8, 16], [8, 8], [16, 16]]) == 1  # nearest ratio; the first on ties


def test_image_folder_round_trip(tmp_path):
    folder, rng = tmp_path / "photos", np.random.default_rng(2)
    (folder / "sub").mkdir(parents=True)
    images = {"a.png": (20, 30), "sub/b.png": (30, 20), "c.png": (16, 16)}
    for name, (h, w) in images.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    rows = [{"file_name": name, "text": f"caption of {name}"} for name in images]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = write_shards(folder, tmp_path / "out", 2)
    assert summary.counts == (2, 1) and len(summary.skipped) == 1 and "broken.png" in summary.skipped[0]
    with tarfile.open(summary.paths[0]) as tf:
        assert tf.getnames() == ["000000000.png", "000000000.txt", "000000000.json",
                                 "000000001.png", "000000001.txt", "000000001.json"]
        assert json.loads(tf.extractfile("000000000.json").read()) == {"file_name": "a.png"}
    again = write_shards(folder, tmp_path / "out", 2, overwrite=True)  # the same input gives the same bytes
    assert open(again.paths[0], "rb").read() == open(summary.paths[0], "rb").read()
    with pytest.raises(DataError, match="overwrite=True"):
        write_shards(folder, tmp_path / "out", 2)

    def tokenizer(captions):
        return np.asarray([[len(c), 1] for c in captions])

    cfg = {"name": "shards", "builder_kwargs": {"paths": str(tmp_path / "out")}, "resolution": 16, "batch_size": 3,
           "shuffle": False, "num_epochs": 1, "channels": 1}
    (batch,) = list(make_iterator(cfg, tokenizer=tokenizer))
    order = ["a.png", "c.png", "sub/b.png"]  # sorted listing, as image_folder reads it
    assert list(batch["caption"]) == [f"caption of {n}" for n in order]
    np.testing.assert_array_equal(batch["input_ids"][:, 0], [len(f"caption of {n}") for n in order])
    for row, name in enumerate(order):
        want = resize_image(to_channels(load_rgb(folder / name), 1), 16, True)
        np.testing.assert_allclose(batch["image"][row], want / 127.5 - 1.0, atol=1e-6)


def test_index_shard_reads_long_and_unicode_names_of_any_tar_writer(tmp_path):
    path = tmp_path / "other.tar"
    names = ["deep/" + "x" * 120 + ".jpg", "deep/" + "x" * 120 + ".txt", "é/ü.PNG", "dir/a.b.png", "dir/c.webp",
             "z.json"]
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        with tarfile.open(path, "w", format=fmt) as tf:
            tf.addfile(tarfile.TarInfo("dir"))  # a folder entry, not a member of an example
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = 3
                tf.addfile(info, io.BytesIO(b"abc"))
        shard = index_shard(str(path))
        assert shard.keys == ("deep/" + "x" * 120, "é/ü", "dir/c")  # dir/a's "b.png" and z's "json" are no image
        assert set(shard.members[0]) == {"jpg", "txt"} and set(shard.members[1]) == {"png"}


def test_two_processes_build_a_latent_cache_of_every_example_once(tmp_path):
    from ldm_jax.data import build_latent_cache
    from ldm_jax.data.latent_records import LatentCache

    shards = tmp_path / "shards"
    write_shards(_records(200), shards, 30, image_format="npy")  # 7 shards: dealt 4 / 3

    def images(x):
        assert x.shape == (16, 8, 8, 3)  # full batches only
        return x[:, ::2, ::2], np.full_like(x[:, ::2, ::2], 0.1)

    def text(captions):
        return np.asarray([[len(c)] for c in captions], np.float32)[:, None, :]

    as_processes(2, lambda p, barrier: build_latent_cache(_cfg(shards), images, text, tmp_path / "cache", 16,
                                                          process_index=p, process_count=2, barrier=barrier))
    cache = LatentCache(tmp_path / "cache")
    numbers = sorted(int(cache[i]["caption"].split()[1]) for i in range(len(cache)))
    assert numbers == list(range(200)) and cache.manifest["num_examples"] == 200
