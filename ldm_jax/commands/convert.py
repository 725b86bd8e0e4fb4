"""ldm-jax convert --src=PATH --dst=DIR [--kind=auto|sd15|sd21|sdxl] [--prediction=epsilon|v_prediction]

Writes a diffusers-layout folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) that
ldm_jax's `LatentDiffusion.from_pretrained` and ``ldm-jax sample --model=DIR`` load, and diffusers /
transformers load where the architecture is one of theirs, from:
  * an original (CompVis / Stability) single-file SD 1.x / 2.x or SDXL checkpoint (.safetensors or .ckpt): SDXL
    base files give StableDiffusionXLPipeline folders (text_encoder/ + text_encoder_2/, tokenizer/ +
    tokenizer_2/, SDXL's Euler scheduler), refiner files StableDiffusionXLImg2ImgPipeline ones;
  * an ldm_jax stage-2 (ldm) workdir: the whole model (``ldm_jax.convert.pipeline_folder``): the U-Net (EMA
    weights), its frozen VAE, the text encoder (CLIPTextModel or BertModel, e.g. MiniLM) and its tokenizer, the
    noise schedule (diffusers' fields where diffusers has it, always ldm_jax's exact description) and the run's
    sampling defaults, so that the folder generates the workdir's images bit for bit;
  * an ldm_jax stage-1 (autoencoder) workdir: vae/ only.
DST must not exist, or be an empty folder; it appears complete or not at all (written beside it, then renamed).
"""

from __future__ import annotations

import os
import shutil

from absl import flags

from ldm_jax.commands._app import fail, start

_SRC = flags.DEFINE_string("src", None, "A single-file SD checkpoint or an ldm_jax workdir.")
_DST = flags.DEFINE_string("dst", None, "Output folder (diffusers layout); must not exist, or be empty.")
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", "sd15", "sd21", "sdxl"], "Single-file checkpoint family.")
_PREDICTION = flags.DEFINE_enum("prediction", None, ["epsilon", "v_prediction"],
                                "Scheduler prediction type (default: epsilon for SD 1.x, v_prediction for SD 2.x).")
_EMA = flags.DEFINE_bool("use_ema", False, "Single file: take the U-Net's EMA weights (model_ema.*).")


def _writable_ancestor(path: str) -> str:
    """The nearest existing folder above `path` (where the output folder will be created)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def check_dst(dst: str) -> None:
    """Before any work: DST is a new or empty folder whose parent can be written."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        fail(f"--dst='{dst}' is a file: pass a folder (nothing is overwritten)")
    if os.path.isdir(dst) and os.listdir(dst):
        fail(f"--dst='{dst}' exists and is not empty: choose a new folder (nothing is overwritten)")
    parent = _writable_ancestor(dst)
    if not os.path.isdir(parent):
        fail(f"--dst='{dst}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"--dst='{dst}': cannot write in '{parent}' (permission denied)")


def write_atomically(dst: str, write) -> list[str]:
    """Runs ``write(folder)`` on a hidden folder beside `dst`, then renames it to `dst`; removes it on failure."""
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(dst)}.partial-{os.getpid()}")
    os.mkdir(staging)
    try:
        written = write(staging)
        if os.path.isdir(dst):
            os.rmdir(dst)  # empty (checked before)
        os.rename(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    src, dst = _SRC.value, _DST.value
    if not src or not dst:
        fail("convert needs --src=PATH and --dst=DIR")
    if not os.path.exists(src):
        fail(f"--src='{src}' does not exist")
    if os.path.isdir(src) and not os.path.isdir(os.path.join(src, "checkpoints")):
        fail(f"--src='{src}' is a folder without checkpoints/: give an ldm_jax workdir or a checkpoint file")
    check_dst(dst)
    if _KIND.value == "sdxl" and _PREDICTION.value not in (None, "epsilon"):
        fail(f"--prediction={_PREDICTION.value}: SDXL checkpoints predict epsilon; drop --prediction")

    def write(folder: str) -> list[str]:
        from ldm_jax.pipelines import folders

        if os.path.isdir(src):
            return folders.from_workdir(src, folder)
        return folders.from_single_file(src, folder, _KIND.value, _PREDICTION.value, _EMA.value)

    try:
        written = write_atomically(dst, write)
    except (ValueError, FileNotFoundError) as e:  # ConfigError, ConversionError: one line
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except OSError as e:  # e.g. the disk filled up or a permission changed while writing
        fail(f"{e.filename or dst}: {e.strerror or type(e).__name__}")
    print(f"wrote {', '.join(written)} to {dst}")


def run_cli(argv):
    start(main, argv)
