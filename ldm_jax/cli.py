"""``ldm-jax <command> [flags]`` — one console script dispatching to the absl apps in ldm_jax/commands.

Each command lives in its own module and defines its flags at import, so only the chosen command's flags
exist in a process. ``python -m ldm_jax <command>`` is the same entry point.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train a model (stage from the config): --config=configs/X.py[:variant] --workdir=DIR",
    "sample": "generate images: --model=PATH --prompt=... --out=DIR (text-to-image, img2img, inpaint)",
    "evaluate": "score a trained workdir or a folder of images (FD, KID, shapes adherence, recon)",
    "convert": "convert weights: diffusers / HF CLIP / CompVis single-file <-> ldm_jax",
    "sweep": "run an ablation sweep: --config=configs/ablation_X.py --workdir=DIR",
    "demo": "the main job: shapes dataset -> autoencoder -> text-to-image LDM -> samples -> scores",
    "plan": "per-device memory and FLOPs of a config's train step on N devices: --config=... --devices=N --mesh=...",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: ldm-jax <command> [--flags]   (ldm-jax <command> --help lists a command's flags)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        from ldm_jax.types import nearest

        print(f"error: unknown command '{command}'{nearest(command, COMMANDS)}; run 'ldm-jax --help'",
              file=sys.stderr)
        raise SystemExit(2)
    module = importlib.import_module(f"ldm_jax.commands.{command}")
    module.run_cli([f"ldm-jax {command}", *argv[2:]])


if __name__ == "__main__":
    main()
