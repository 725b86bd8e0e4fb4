"""ldm-jax sample --model=PATH --prompt="..." --out=DIR [flags]

Generates images with an ldm_jax workdir, a diffusers SD folder, a CompVis .safetensors/.ckpt file or a model
id in the local Hugging Face cache (`LatentDiffusion.generate`, the path every command shares): text-to-image,
img2img (--init_image, --strength) or inpainting (--init_image, --mask; white = repaint). Writes one PNG per
image (prompt, negative prompt, seed, sampler, steps and guidance in PNG text chunks) and grid.png. Image i uses
seed + i. With a workdir, sampler, steps, guidance and micro-batch default to the run's `sample` config. Examples:

  ldm-jax sample --model=sd15 --prompt="a red apple" --num_images=4 --num_steps=30 --out=samples
  ldm-jax sample --model=sd15 --prompts_file=prompts.txt --sampler=dpmpp_2m --num_steps=20 --out=samples
  ldm-jax sample --model=sd15 --prompt="a watercolor" --init_image=photo.png --strength=0.6 --out=edits
"""

from __future__ import annotations

import json
import math
import os

from absl import flags

from ldm_jax import diffusion
from ldm_jax import images as imlib
from ldm_jax.commands._app import check_writable_folder, fail, start
from ldm_jax.convert.common import ConversionError
from ldm_jax.ldm import LatentDiffusion, SampleConfig, enable_compilation_cache
from ldm_jax.ldm.loading import looks_like_model_id
from ldm_jax.types import ConfigError, read_utf8

_MODEL = flags.DEFINE_string("model", None, "ldm_jax workdir, diffusers SD folder, .safetensors/.ckpt file or a "
                             "model id in the local Hugging Face cache.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "Negative prompt, used for every prompt.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "Text file with one prompt per line ('#' comments).")
_INIT = flags.DEFINE_string("init_image", None, "Input image for img2img / inpainting.")
_STRENGTH = flags.DEFINE_float("strength", None, "img2img/inpaint strength in [0, 1] (default 0.8 / 1.0).")
_MASK = flags.DEFINE_string("mask", None, "Inpainting mask image, same size as --init_image (white = repaint).")
_SAMPLER = flags.DEFINE_string("sampler", None, f"{', '.join(diffusion.SAMPLERS)} (default: the run's "
                               "sample.sampler, else ddim).")
_LORA = flags.DEFINE_multi_string("lora", [], "LoRA file to merge into the U-Net and CLIP text encoder, FILE or "
                                   "FILE:WEIGHT (diffusers/PEFT or kohya safetensors; repeat the flag for several).")
_SPACING = flags.DEFINE_string("spacing", None, f"Time grid: {', '.join(diffusion.SPACINGS)} (default: the model's "
                               "scheduler config).")
_STEPS = flags.DEFINE_integer("num_steps", None, "Sampling steps (default: the run's sample.num_steps, else 50).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale, <= 1: off (default: the "
                               "run's sample.guidance_scale, else 7.5).")
_RESCALE = flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi in [0, 1] (Lin et al. 2023).")
_ETA = flags.DEFINE_float("eta", None, "DDIM / ancestral eta.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first image; image i uses seed + i.")
_NUM = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height, a multiple of 8 (default: model / init image).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width, a multiple of 8 (default: model / init image).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per compiled call (memory; results do not depend on it).")
_MICRO = flags.DEFINE_integer("micro_batch", None, "Images the network sees at once per device (default: the run's "
                              "sample.micro_batch, else 1); results depend on it.")
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
        lines = read_utf8(prompts_file, "prompts file").splitlines()
        out += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not out:
        raise ConfigError("empty prompt list: pass --prompt=... or a --prompts_file with at least one line")
    return out


def _check_flags() -> None:
    if not _MODEL.value or not _OUT.value:
        fail("sample needs --model=PATH and --out=DIR")
    if _STEPS.value is not None and _STEPS.value < 1:
        fail(f"--num_steps must be >= 1, got {_STEPS.value}")
    if _STRENGTH.value is not None and not 0.0 <= _STRENGTH.value <= 1.0:
        fail(f"--strength must be in [0, 1], got {_STRENGTH.value}")
    for name, v in (("height", _HEIGHT.value), ("width", _WIDTH.value)):
        if v is not None and (v <= 0 or v % 8):
            fail(f"--{name}={v} must be a positive multiple of 8")
    if _MASK.value and not _INIT.value:
        fail("--mask needs --init_image (the image to inpaint)")
    if _NUM.value < 1:
        fail(f"--num_images must be >= 1, got {_NUM.value}")
    if not os.path.exists(_MODEL.value) and not looks_like_model_id(_MODEL.value):
        fail(f"model '{_MODEL.value}' not found: pass an ldm_jax workdir, a diffusers SD folder, a .safetensors/.ckpt "
             "file or a model id in the local Hugging Face cache")
    for spec in _LORA.value:
        if not os.path.exists(lora_spec(spec)[0]):
            fail(f"--lora={spec}: file '{lora_spec(spec)[0]}' not found")


def _inputs():
    """(image, mask, height, width) after the size checks (image and mask resized to --height/--width)."""
    image = imlib.as_image_batch(_INIT.value, "--init_image")
    mask = imlib.as_mask_batch(_MASK.value, "--mask") if _MASK.value else None
    h, w = image.shape[1:3]
    if mask is not None and mask.shape[1:3] != (h, w):
        raise ConfigError(f"--mask is {mask.shape[2]}x{mask.shape[1]} but --init_image is {w}x{h}; they must match")
    height, width = _HEIGHT.value or h, _WIDTH.value or w
    if height % 8 or width % 8:
        raise ConfigError(f"--init_image is {w}x{h}, not a multiple of 8; pass --height/--width to resize it")
    image = imlib.resize(image, height, width)
    mask = None if mask is None else imlib.resize(mask, height, width, mask=True)
    return image, mask, height, width


def sampling_settings(model) -> dict:
    """Sampler, steps, guidance and micro-batch: the flags, else the workdir's `sample` config, else SD's."""
    run = model.sample or SampleConfig(num_steps=50, guidance_scale=7.5)
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    return dict(sampler=pick(_SAMPLER.value, run.sampler), num_steps=pick(_STEPS.value, run.num_steps),
                guidance_scale=pick(_GUIDANCE.value, run.guidance_scale),
                micro_batch=pick(_MICRO.value, run.micro_batch))


def generate(prompts: list[str]):
    """Loads the model from the flags and generates; returns (images, settings for the PNG metadata)."""
    image, mask = _inputs()[:2] if _INIT.value else (None, None)  # bad inputs fail before the model loads
    if _CACHE.value:
        enable_compilation_cache()
    model = LatentDiffusion.from_pretrained(_MODEL.value, dtype=_DTYPE.value, prediction=_PREDICTION.value)
    if _LORA.value:
        try:
            model = model.with_lora(*(lora_spec(spec) for spec in _LORA.value))
        except ConversionError as e:  # a file that is no LoRA of this model: one line naming the key or file
            fail(f"--lora: {' '.join(str(e).split())}")
    sampling = sampling_settings(model)
    negative = _NEGATIVE.value
    images = model.generate(prompts, negative or None, image=image, mask=mask, strength=_STRENGTH.value,
                            num_images_per_prompt=_NUM.value, height=None if image is not None else _HEIGHT.value,
                            width=None if image is not None else _WIDTH.value, guidance_rescale=_RESCALE.value,
                            seed=_SEED.value, spacing=_SPACING.value, eta=_ETA.value, batch_size=_BATCH.value,
                            progress=True, **sampling)
    settings = dict(model=_MODEL.value, sampler=sampling["sampler"], num_steps=sampling["num_steps"],
                    guidance_scale=sampling["guidance_scale"], guidance_rescale=_RESCALE.value,
                    micro_batch=sampling["micro_batch"], spacing=_SPACING.value or model.defaults.spacing)
    if image is not None:
        settings.update(strength=_STRENGTH.value if _STRENGTH.value is not None else (0.8 if mask is None else 1.0),
                        init_image=_INIT.value, mask=_MASK.value or "")
    return images, settings


def check_outputs(out: str, count: int, seed: int, grid: bool) -> None:
    """Before any work: --out must be a folder (or not exist yet) that holds none of the files this run writes."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out={out} is a file; pass a folder")
    names = imlib.generated_names(count, seed) + (["grid.png"] if grid else [])
    taken = [n for n in names if os.path.exists(os.path.join(out, n))]
    if taken:
        raise ConfigError(f"--out={out} already holds {taken[0]}" + (f" and {len(taken) - 1} more" if len(taken) > 1
                          else "") + " of this run's files; pass a new folder or another --seed (nothing is "
                          "overwritten)")
    check_writable_folder(out, "--out")  # before the images are generated


def write_outputs(out: str, images, prompts: list[str], negative: str, seed: int, per_prompt: int,
                  settings: dict, grid: bool) -> list[str]:
    """One PNG per image with its prompt, negative prompt, seed and the settings as text chunks (+ grid.png)."""
    per_image = [p for p in prompts for _ in range(per_prompt)]
    paths = imlib.save_generated(out, images, per_image, seed, dict(negative_prompt=negative, **settings))
    if grid:
        imlib.save_png(os.path.join(out, "grid.png"), imlib.make_grid(images),
                       dict(prompts=json.dumps(prompts), seed=seed, **settings))
    return paths


def lora_spec(spec: str) -> tuple[str, float]:
    """'FILE' or 'FILE:WEIGHT' -> (file, weight); a weight that is not a finite number is one line, exit 2."""
    path, sep, weight = spec.rpartition(":")
    if not sep or os.path.exists(spec):
        return spec, 1.0
    try:
        value = float(weight)
    except ValueError:
        return spec, 1.0  # a colon in the file name
    if not math.isfinite(value):
        fail(f"--lora={spec}: the weight must be a finite number")
    return path, value


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags look like --prompt='a red apple'")
    _check_flags()
    try:
        prompts = read_prompts(_PROMPT.value, _PROMPTS_FILE.value)
        check_outputs(_OUT.value, len(prompts) * _NUM.value, _SEED.value, _GRID.value)
        images, settings = generate(prompts)
    except (ConfigError, ConversionError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    paths = write_outputs(_OUT.value, images, prompts, _NEGATIVE.value, _SEED.value, _NUM.value, settings,
                          _GRID.value)
    print(f"wrote {len(paths)} images to {_OUT.value}")


def run_cli(argv):
    start(main, argv)
