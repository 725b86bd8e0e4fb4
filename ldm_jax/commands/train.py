"""ldm-jax train --config=configs/X.py[:variant] --workdir=DIR [--config.a.b=value ...]

Trains the stage the config names (autoencoder or latent diffusion). Rerunning the same command resumes
from the newest checkpoint in the workdir.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from ldm_jax.commands._app import fail, start

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/shapes_ldm.py:tiny",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and samples.")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags look like --workdir=DIR")
    if _CONFIG.value is None or not _WORKDIR.value:
        fail("train needs --config=configs/<name>.py[:variant] and --workdir=DIR")
    from ldm_jax.training import run

    run(_CONFIG.value, _WORKDIR.value)


def run_cli(argv):
    start(main, argv, uses_config=True)
