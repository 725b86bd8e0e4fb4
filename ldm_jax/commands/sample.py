"""ldm-jax sample --model=PATH --prompt="..." --out=DIR [flags]

Generates images with a diffusers SD folder, a CompVis .safetensors/.ckpt file or an ldm_jax workdir:
text-to-image, img2img (--init-image, --strength) or inpainting (--init-image, --mask; white = repaint).
Writes one PNG per image (prompt, negative prompt, seed, sampler, steps and guidance in PNG text chunks)
and grid.png. Image i uses seed + i. Examples:

  ldm-jax sample --model=sd15 --prompt="a red apple" --num-images=4 --steps=30 --out=samples
  ldm-jax sample --model=sd15 --prompts-file=prompts.txt --sampler=dpmpp_2m --steps=20 --out=samples
  ldm-jax sample --model=sd15 --prompt="a watercolor" --init-image=photo.png --strength=0.6 --out=edits
"""

from __future__ import annotations

import json
import os

from absl import flags

from ldm_jax.commands._app import fail, start

_MODEL = flags.DEFINE_string("model", None, "diffusers SD folder, .safetensors/.ckpt file, or ldm_jax workdir.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "Negative prompt, used for every prompt.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Text file with one prompt per line ('#' comments).")
_INIT = flags.DEFINE_string("init_image", None, "Input image for img2img / inpainting.")
_STRENGTH = flags.DEFINE_float("strength", None, "img2img/inpaint strength in [0, 1] (default 0.8 / 1.0).")
_MASK = flags.DEFINE_string("mask", None, "Inpainting mask image, same size as --init-image (white = repaint).")
_SAMPLER = flags.DEFINE_string("sampler", "ddim", "ddim, ddpm, euler, euler_ancestral, heun, dpmpp_2m, "
                               "dpmpp_2m_sde or unipc.")
_SPACING = flags.DEFINE_string("spacing", None, "Time grid: uniform, karras, logsnr, leading, trailing, linspace "
                               "(default: the model's scheduler config).")
_STEPS = flags.DEFINE_integer("steps", 50, "Number of sampling steps.")
_GUIDANCE = flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (<= 1: off).")
_RESCALE = flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi in [0, 1] (Lin et al. 2023).")
_ETA = flags.DEFINE_float("eta", None, "DDIM / ancestral eta.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first image; image i uses seed + i.")
_NUM = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height, a multiple of 8 (default: model / init image).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width, a multiple of 8 (default: model / init image).")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Images per compiled call.")
_PREDICTION = flags.DEFINE_string("prediction", None, "Override the model's prediction kind (eps, v, x0).")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (float32, bfloat16, float16).")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_GRID = flags.DEFINE_bool("grid", True, "Also write grid.png.")
_CACHE = flags.DEFINE_bool("compilation_cache", True, "Use JAX's persistent compilation cache (~/.cache/ldm_jax).")


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
    """--prompt values then the file's non-empty, non-comment lines; an empty result is an error."""
    out = [p for p in prompts if p.strip()]
    if prompts_file:
        if not os.path.isfile(prompts_file):
            raise FileNotFoundError(f"prompts file '{prompts_file}' not found")
        with open(prompts_file, encoding="utf-8") as f:
            out += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        from ldm_jax.types import ConfigError

        raise ConfigError("empty prompt list: pass --prompt=... or a --prompts-file with at least one line")
    return out


def _check_flags() -> None:
    if not _MODEL.value or not _OUT.value:
        fail("sample needs --model=PATH and --out=DIR")
    if _STEPS.value < 1:
        fail(f"--steps must be >= 1, got {_STEPS.value}")
    if _STRENGTH.value is not None and not 0.0 <= _STRENGTH.value <= 1.0:
        fail(f"--strength must be in [0, 1], got {_STRENGTH.value}")
    for name, v in (("height", _HEIGHT.value), ("width", _WIDTH.value)):
        if v is not None and (v <= 0 or v % 8):
            fail(f"--{name}={v} must be a positive multiple of 8")
    if _MASK.value and not _INIT.value:
        fail("--mask needs --init-image (the image to inpaint)")
    if _NUM.value < 1:
        fail(f"--num-images must be >= 1, got {_NUM.value}")
    if not os.path.exists(_MODEL.value):
        fail(f"model '{_MODEL.value}' not found: pass a diffusers SD folder, a .safetensors/.ckpt file or an "
             "ldm_jax workdir")


def _inputs():
    """(image, mask, height, width) after the size checks (image and mask resized to --height/--width)."""
    from ldm_jax.pipelines import images as imlib
    from ldm_jax.types import ConfigError

    image = imlib.as_image_batch(_INIT.value, "--init-image")
    mask = imlib.as_mask_batch(_MASK.value, "--mask") if _MASK.value else None
    h, w = image.shape[1:3]
    if mask is not None and mask.shape[1:3] != (h, w):
        raise ConfigError(f"--mask is {mask.shape[2]}x{mask.shape[1]} but --init-image is {w}x{h}; they must match")
    height, width = _HEIGHT.value or h, _WIDTH.value or w
    if height % 8 or width % 8:
        raise ConfigError(f"--init-image is {w}x{h}, not a multiple of 8; pass --height/--width to resize it")
    image = imlib.resize(image, height, width)
    mask = None if mask is None else imlib.resize(mask, height, width, mask=True)
    return image, mask, height, width


def generate(prompts: list[str]):
    """Builds the pipeline from the flags and runs it; returns (images, settings for the PNG metadata)."""
    from ldm_jax.pipelines import Img2Img, Inpaint, TextToImage, load_components

    image, mask = _inputs()[:2] if _INIT.value else (None, None)  # bad inputs fail before the model loads
    comps = load_components(_MODEL.value, dtype=_DTYPE.value, prediction=_PREDICTION.value)
    common = dict(num_images_per_prompt=_NUM.value, sampler=_SAMPLER.value, num_steps=_STEPS.value,
                  guidance_scale=_GUIDANCE.value, guidance_rescale=_RESCALE.value, seed=_SEED.value,
                  spacing=_SPACING.value, eta=_ETA.value, batch_size=_BATCH.value)
    negative = _NEGATIVE.value
    settings = dict(model=_MODEL.value, sampler=_SAMPLER.value, steps=_STEPS.value, guidance=_GUIDANCE.value,
                    guidance_rescale=_RESCALE.value, spacing=_SPACING.value or comps.defaults.spacing)
    cache = _CACHE.value
    if _INIT.value is None:
        pipe = TextToImage(comps, compilation_cache=cache)
        images = pipe(prompts, negative, height=_HEIGHT.value, width=_WIDTH.value, **common)
        return images, settings
    if mask is None:
        strength = 0.8 if _STRENGTH.value is None else _STRENGTH.value
        images = Img2Img(comps, compilation_cache=cache)(prompts, image, negative, strength=strength, **common)
    else:
        strength = 1.0 if _STRENGTH.value is None else _STRENGTH.value
        images = Inpaint(comps, compilation_cache=cache)(prompts, image, mask, negative, strength=strength,
                                                         **common)
    settings.update(strength=strength, init_image=_INIT.value, mask=_MASK.value or "")
    return images, settings


def write_outputs(out: str, images, prompts: list[str], negative: str, seed: int, per_prompt: int,
                  settings: dict, grid: bool) -> list[str]:
    """One PNG per image with its prompt, negative prompt, seed and the settings as text chunks (+ grid.png)."""
    from ldm_jax.pipelines import images as imlib

    os.makedirs(out, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        meta = dict(prompt=prompts[i // per_prompt], negative_prompt=negative, seed=seed + i, **settings)
        path = os.path.join(out, f"{i:04d}-seed{seed + i}.png")
        imlib.save_png(path, image, meta)
        paths.append(path)
    if grid:
        imlib.save_png(os.path.join(out, "grid.png"), imlib.make_grid(images),
                       dict(prompts=json.dumps(prompts), seed=seed, **settings))
    return paths


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags look like --prompt='a red apple'")
    _check_flags()
    from ldm_jax.convert.common import ConversionError
    from ldm_jax.types import ConfigError

    try:
        prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
        images, settings = generate(prompts)
    except (ConfigError, ConversionError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    paths = write_outputs(_OUT.value, images, prompts, _NEGATIVE.value, _SEED.value, _NUM.value, settings,
                          _GRID.value)
    print(f"wrote {len(paths)} images to {_OUT.value}")


def run_cli(argv):
    start(main, argv)
