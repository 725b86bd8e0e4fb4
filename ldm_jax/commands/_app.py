"""What every command shares: hyphenated flag spellings, the config preflight, absl app start."""

from __future__ import annotations

import os
import sys

from absl import app, flags

from ldm_jax.configlib import check_overrides
from ldm_jax.types import ConfigError


def normalize(argv: list[str]) -> list[str]:
    """Accepts ``--negative-prompt`` as well as ``--negative_prompt`` (absl wants underscores)."""
    out = []
    for a in argv:
        if a.startswith("--") and not a.startswith("--config"):
            name, eq, value = a[2:].partition("=")
            a = "--" + name.replace("-", "_") + eq + value
        out.append(a)
    return out


def start(main, argv: list[str], *, uses_config: bool = False) -> None:
    argv = normalize(argv)
    if any(a in ("-h", "--help", "--helpshort") for a in argv[1:]):
        print_help(main)
    if uses_config:
        try:
            check_overrides(argv[1:])
        except ConfigError as e:
            fail(str(e))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not any(a.startswith(("--verbosity", "-v", "--v=")) for a in argv[1:]):
        argv = [*argv, "--verbosity=-1"]  # warnings and errors only (Orbax logs every file at INFO)
    try:
        app.run(main, argv=argv)
    except flags.Error as e:  # pragma: no cover - absl prints and exits itself in app.run
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def print_help(main) -> None:
    """Prints the command's docstring and its own flags (absl would list only __main__'s) and exits 0."""
    module = sys.modules[main.__module__]
    print((module.__doc__ or "").strip() + "\n")
    print("flags:")
    print(flags.FLAGS.module_help(module.__name__))
    raise SystemExit(0)


def fail(message: str, code: int = 2) -> None:
    """One-line user error and exit status `code` (2; 1 for a halted run), no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def run_or_fail(fn, *args, **kwargs):
    """Calls a library entry (training, the demo, a sweep): a ConfigError becomes one line and exit 2, a
    non-finite halt one line and exit 1."""
    from ldm_jax.training.loop import NonFiniteError

    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        fail(str(e).splitlines()[0] if str(e) else "configuration error")
    except NonFiniteError as e:
        fail(str(e), code=1)
