"""Workaround for grain reading absl flags outside an absl app (the one absl.flags use below the entry points).

grain 0.2.x's multiprocess prefetch reads ``--grain_enable_multiprocess_worker_profiling`` through absl's
global FLAGS, which raises ``UnparsedFlagAccessError`` unless an ``absl.app`` entry point has parsed them.
Library callers (tests, notebooks, benchmarks) have no such entry point, so before starting reader
processes the flags are marked parsed, which makes every grain flag read its default. Under ``absl.app``
(the ``ldm-jax`` commands) the flags are already parsed and this does nothing.
"""

from __future__ import annotations


def ensure_absl_flags_parsed() -> None:
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
