"""Runs many ``ldm-jax`` command lines cheaply: this process imports the heavy libraries once, then forks one
child per command line (each child is a fresh ``ldm-jax`` process as far as the command can tell: its own
flags, working directory, stdout/stderr files and exit status).

Protocol (JSON lines): read ``{"argv": [...], "cwd": DIR, "stdout": FILE, "stderr": FILE, "timeout": S,
"limits": {"fsize": BYTES}}`` from stdin, write ``{"rc": CODE}`` (``rc`` -9 on timeout) to stdout.
Nothing is imported that starts threads (no JAX backend is created before the fork).
"""

import json
import os
import resource
import signal
import sys
import time
import traceback

import absl.flags  # noqa: F401
import flax.linen  # noqa: F401
import jax  # noqa: F401
import ml_collections  # noqa: F401
import numpy  # noqa: F401
import optax  # noqa: F401
import PIL.Image  # noqa: F401

import ldm_jax.cli
import ldm_jax.data  # noqa: F401
import ldm_jax.eval.generated  # noqa: F401
import ldm_jax.ldm  # noqa: F401
import ldm_jax.training.autoencoder  # noqa: F401
import ldm_jax.training.ldm  # noqa: F401
import ldm_jax.training.loop  # noqa: F401
import ldm_jax.training.preflight  # noqa: F401


def _child(request: dict) -> int:
    os.chdir(request["cwd"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    fsize = (request.get("limits") or {}).get("fsize")
    if fsize:  # files may not grow past this: writes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(fsize), int(fsize)))
    os.environ.update(request.get("env") or {})
    sys.argv = ["ldm-jax", *request["argv"]]
    try:
        ldm_jax.cli.main(sys.argv)
        return 0
    except SystemExit as e:
        if e.code is None:
            return 0
        if isinstance(e.code, int):
            return e.code
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - reported like an uncaught exception of a real process
        traceback.print_exc()
        return 1


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.02)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(request)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        rc = _wait(pid, float(request.get("timeout", 300)))
        print(json.dumps({"rc": rc}), flush=True)


if __name__ == "__main__":
    main()
