"""Data: tfds builders (array_record, no TensorFlow), grain pipelines, tokenization, latent caching.

    from ldm_jax import data
    it = data.make_iterator(data.DataConfig(name="shapes", resolution=32, batch_size=16), tokenizer=tok)
    batch = next(it)            # {"image": (16, 32, 32, 3) float32 in [-1, 1], "caption", "input_ids", ...}
    state = it.get_state()      # JSON-serializable; it.set_state(state) resumes exactly
    data.score_images(images, batch["caption"])   # shapes attribute checker

    data.write_shards("photos/", "shards/", examples_per_shard=1000)   # webdataset-layout tar shards
    it = data.make_iterator(data.DataConfig(name="shards", builder_kwargs={"paths": "shards/*.tar"}))
"""

from ldm_jax.data.builders import BUILDERS, BuildResult, make_builder, prepare, resolve_data_dir
from ldm_jax.data.common import DataError
from ldm_jax.data.latent_cache import build_latent_cache
from ldm_jax.data.latent_records import LatentCache
from ldm_jax.data.pipeline import DataConfig, DataIterator, make_global_batch, make_iterator
from ldm_jax.data.shapes import HELDOUT_PAIRS, attrs_from_captions, caption_to_attrs
from ldm_jax.data.shapes_checker import ShapesChecker, score_images
from ldm_jax.data.shard_stream import ShardIterator
from ldm_jax.data.shards import ShardSummary, list_shards, write_shards
from ldm_jax.data.tokenize import as_tokenize_fn

__all__ = [
    "BUILDERS", "BuildResult", "DataConfig", "DataError", "DataIterator", "HELDOUT_PAIRS", "LatentCache",
    "ShapesChecker", "ShardIterator", "ShardSummary", "as_tokenize_fn", "attrs_from_captions", "build_latent_cache",
    "caption_to_attrs", "list_shards", "make_builder", "make_global_batch", "make_iterator", "prepare",
    "resolve_data_dir", "score_images", "write_shards",
]
