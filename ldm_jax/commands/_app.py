"""What every command shares: hyphenated flag spellings, the config preflight, absl app start."""

from __future__ import annotations

import math
import os
import sys

from absl import flags
from absl import logging as absl_logging

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
        quiet = True
    else:
        quiet = False
    try:  # parsed here, not in absl's app.run: a flag error is one line and exit 2 (absl prints two, exit 1)
        remaining = flags.FLAGS(argv)
    except flags.Error as e:
        fail(" ".join(str(e).split()))
    for flag in flags.FLAGS.flags_by_module_dict().get(main.__module__, ()):  # the command's own flags
        if isinstance(flag.value, float) and not math.isfinite(flag.value):
            fail(f"--{flag.name}={flag.value} is not a finite number: give a finite value")
    absl_logging.use_absl_handler()
    if quiet:
        quiet_libraries()
    try:
        main(remaining)
    except ConfigError as e:  # a user error from any layer: one line, exit 2
        fail(" ".join(str(e).split()) or type(e).__name__)
    except OSError as e:
        if not getattr(e, "filename", None):
            raise
        fail(f"{e.filename}: {e.strerror or type(e).__name__}")


def quiet_libraries() -> None:
    """Normal runs show our own warnings (``ldm_jax.*`` loggers) and errors, not the notes libraries leave
    for their developers: tfds / Orbax / grain warnings (absl logging: "OpenCV is not installed", "Metadata
    file does not exist", ...) and the asyncio task tracebacks of a failed background read. ``--verbosity=0``
    (or any explicit verbosity) shows everything."""
    import logging
    import warnings

    # Orbax reports a failed background write at ERROR with its thread's traceback; the run itself stops with
    # one line naming the failure (training.checkpoint.SaveError), so absl-logged records are not shown
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    for name in ("orbax", "jax._src.distributed", "tensorflow_datasets", "grain"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # coroutines of an aborted Orbax read, collected after the event loop closed, report "Event loop is closed"
    # through the unraisable-exception hook at exit (hundreds of lines): not shown in normal runs
    sys.unraisablehook = lambda unraisable: None
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(orbax|tensorflow_datasets|grain|jax)\b")


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


def check_output_file(path: str, flag: str) -> None:
    """A file a command will write at the end: checked before the work (its folder exists and is writable, it is
    not a folder)."""
    if os.path.isdir(path):
        fail(f"{flag}={path} is a folder: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(f"{flag}={path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        fail(f"{flag}={path} cannot be written: choose a writable place")


def check_writable_folder(path: str, flag: str) -> None:
    """A folder a command will write into at the end (created then): checked before the work without creating
    anything — the nearest existing folder on its path must be a writable folder."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        fail(f"{flag}={path} cannot be written: {here} is a file")
    if not os.access(here, os.W_OK):
        fail(f"{flag}={path} cannot be written: {here} is not writable")


def check_workdir_exists(path: str, flag: str = "--workdir") -> None:
    """A trained workdir named on the command line: a folder with checkpoints/ (one line for each way it is not)."""
    if not os.path.exists(path):
        fail(f"{flag}={path} does not exist")
    if not os.path.isdir(path):
        fail(f"{flag}={path} is a file, not a workdir (a folder with checkpoints/)")
    if not os.path.isdir(os.path.join(path, "checkpoints")) or not any(
            n.isdigit() for n in os.listdir(os.path.join(path, "checkpoints"))):
        fail(f"{flag}={path} holds no checkpoints: train it first (ldm-jax train --workdir={path} ...)")


def run_or_fail(fn, *args, **kwargs):
    """Calls a library entry (training, the demo, a sweep): a ConfigError becomes one line and exit 2; a
    non-finite halt, a failed save and a restore out of memory one line and exit 1."""
    from ldm_jax.training.checkpoint import RestoreOutOfMemory, SaveError
    from ldm_jax.training.loop import NonFiniteError

    try:
        return fn(*args, **kwargs)
    except ConfigError as e:
        fail(str(e).splitlines()[0] if str(e) else "configuration error")
    except (NonFiniteError, SaveError, RestoreOutOfMemory) as e:
        fail(" ".join(str(e).split()), code=1)
