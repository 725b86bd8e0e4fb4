"""Output helpers shared by the benchmark scripts: one JSON line per finished measurement, printed and
appended to every file in PARTIAL at once (a killed run keeps what it measured), and timestamped phases."""

from __future__ import annotations

import json
import sys
import time

PARTIAL: list[str] = []


def emit(rec: dict) -> None:
    line = json.dumps(rec)
    print(line, flush=True)
    for path in PARTIAL:
        with open(path, "a") as f:
            f.write(line + "\n")


def phase(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
