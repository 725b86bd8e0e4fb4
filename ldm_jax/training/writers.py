"""Metric logging: TensorBoard event files (tensorboardX, no TensorFlow) plus ``metrics.jsonl``.

clu's metric writers write TensorBoard summaries through TensorFlow (or torch); tensorboardX writes the
same event files with neither, so it is what we use. Every logged step becomes one JSON object per line
in ``workdir/metrics.jsonl`` (``{"step": 10, "loss": 0.12, "lr": 1e-4, ...}``) for scripts and sweeps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported with torch hidden (tensorboardX imports torch when it can,
    ~2.5 s per process, for features we do not use)."""
    import sys

    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        if hide:
            del sys.modules["torch"]
    return SummaryWriter


def _to_float(v) -> float:
    v = float(np.asarray(v))
    return v if math.isfinite(v) else float("nan")


class MetricWriter:
    """Writes scalars and images for one process (only process 0 writes on a multi-host run)."""

    def __init__(self, logdir: str, *, enabled: bool = True, tensorboard: bool = True):
        self.logdir = logdir
        self.enabled = enabled
        self._tb = None
        if enabled:
            os.makedirs(logdir, exist_ok=True)
            if tensorboard:
                SummaryWriter = _summary_writer_class()

                self._tb = SummaryWriter(logdir=os.path.join(logdir, "tensorboard"), flush_secs=30)
        self._jsonl = os.path.join(logdir, "metrics.jsonl")

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _to_float(v) for k, v in scalars.items()}}
        with open(self._jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, global_step=int(step))

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        """`images`: name -> uint8 (H, W, 3) array."""
        if not self.enabled or self._tb is None:
            return
        for k, img in images.items():
            self._tb.add_image(k, np.asarray(img), global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(logdir: str) -> list[dict]:
    """Reads back ``metrics.jsonl`` (the rows of every logged step)."""
    path = os.path.join(logdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
