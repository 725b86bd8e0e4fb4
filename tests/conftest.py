"""Test-wide setup: 8 forced CPU devices (set before jax is imported), float32 matmuls, no network."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TFDS_DATA_DIR", "/tmp/ldm_jax_tfds_unused")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
