"""Output helpers shared by the benchmark scripts: one JSON line per finished measurement, printed and
appended to every file in PARTIAL at once (a killed run keeps what it measured), timestamped phases, and a
per-op summary of a JAX profiler trace."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
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


def _kind(name: str) -> str:
    """Op kind of a trace event: its name without the numeric suffix ("dot.518" -> "dot")."""
    return re.sub(r"[._-]?\d+$", "", name.split(":")[0].strip()) or name


_RUNTIME = ("$", "PjRt", "Thunk", "ThunkExecutor", "TfrtCpu", "jit_", "Execute", "PjitFunction", "CommonPjRt",
            "ParseArguments", "Handle input", "AllocateOutput", "Wait for", "PythonRefManager", "ThreadpoolListener")


def hlo_shapes(hlo_text: str) -> dict[str, str]:
    """{instruction name: result shape} of a compiled program's HLO text, e.g. "dot.581" -> "f32[32,32]"."""
    return {m.group(1): re.sub(r"\{[^}]*\}", "", m.group(2))
            for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", hlo_text, re.M)}


def jax_profile(step, iters: int, shapes: dict[str, str] | None = None) -> dict:
    """Time per op kind and per op (ms per call of `step`) from a perfetto trace of `iters` calls.

    XLA:CPU records one event per executed thunk (fusion, dot, convolution, custom call); on GPU the device
    kernels appear under their own trace process, so ``by_process`` splits the op kinds by process (host
    threads vs each device) as well. Runtime bookkeeping events are counted apart. With ``shapes``
    (`hlo_shapes` of the compiled program), ``by_kind_shape_ms`` splits the largest kinds by the ops' result
    shapes (ms and number of ops), which tells e.g. a weight gradient's dot from an attention's."""
    import jax

    d = tempfile.mkdtemp(prefix="xla_prof_")
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(iters):
            step()
    files = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
    if not files:
        return {"error": f"no perfetto trace under {d}"}
    with gzip.open(files[0]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e.get("pid"): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    by_kind, by_name, threads = collections.Counter(), collections.Counter(), collections.Counter()
    by_process = collections.defaultdict(collections.Counter)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("name", "")
        if name.startswith(_RUNTIME):
            threads["__runtime__:" + name.split(":")[0][:40]] += e["dur"]
            continue
        by_kind[_kind(name)] += e["dur"]
        by_name[name[:80]] += e["dur"]
        threads[e.get("tid")] += e["dur"]
        by_process[str(process.get(e.get("pid"), e.get("pid")))][_kind(name)] += e["dur"]

    def ms(us):
        return round(us / 1000.0 / iters, 2)

    extra = {}
    if shapes:
        split = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
        for name, us in by_name.items():
            entry = split[_kind(name)][shapes.get(name, "?")]
            entry[0] += us
            entry[1] += 1
        extra["by_kind_shape_ms"] = {
            kind: {shape: [ms(us), n] for shape, (us, n) in sorted(split[kind].items(), key=lambda kv: -kv[1][0])[:8]}
            for kind, _ in by_kind.most_common(12)}
    return {**extra, "by_kind_ms": {k: ms(v) for k, v in by_kind.most_common()},
            "top_ops_ms": {k: ms(v) for k, v in by_name.most_common(40)},
            "busy_ms_per_thread": {str(k): round(v / 1000.0 / iters, 1) for k, v in threads.most_common(12)},
            "by_process": {p: {k: ms(v) for k, v in c.most_common(25)} for p, c in by_process.items()}}
