"""ldm-jax convert --src=PATH --dst=DIR [--kind=auto|sd15|sd21] [--prediction=epsilon|v_prediction]

Writes a diffusers-layout folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/, model_index.json) that
diffusers' StableDiffusionPipeline and ldm_jax's pipelines both load, from:
  * an original (CompVis) single-file SD checkpoint (.safetensors or .ckpt);
  * an ldm_jax workdir: stage 1 exports vae/; stage 2 exports unet/ (EMA weights) and its frozen vae/.
An existing non-empty DST is never overwritten.
"""

from __future__ import annotations

import json
import os

from absl import flags

from ldm_jax.commands._app import fail, start

_SRC = flags.DEFINE_string("src", None, "A single-file SD checkpoint or an ldm_jax workdir.")
_DST = flags.DEFINE_string("dst", None, "Output folder (diffusers layout); must not exist or be empty.")
_KIND = flags.DEFINE_enum("kind", "auto", ["auto", "sd15", "sd21"], "Single-file checkpoint family.")
_PREDICTION = flags.DEFINE_enum("prediction", None, ["epsilon", "v_prediction"],
                                "Scheduler prediction type (default: epsilon for SD 1.x, v_prediction for SD 2.x).")
_EMA = flags.DEFINE_bool("use_ema", False, "Single file: take the U-Net's EMA weights (model_ema.*).")


def scheduler_config(prediction: str) -> dict:
    """SD's DDIM settings (scaled_linear 0.00085..0.012, 1000 steps, leading spacing, offset 1)."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
            "prediction_type": prediction, "timestep_spacing": "leading"}


def _write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def from_single_file(src: str, dst: str, kind: str, prediction: str | None, use_ema: bool) -> list[str]:
    from ldm_jax.convert import compvis, hf
    from ldm_jax.convert import diffusers as dconv
    from ldm_jax.models.tokenizers import CLIPTokenizer

    parts = compvis.load_single_file(src, kind, use_ema=use_ema)
    kind = parts["kind"]
    written = []
    if "unet" in parts:
        dconv.save_unet(os.path.join(dst, "unet"), *parts["unet"])
        written.append("unet")
    if "vae" in parts:
        dconv.save_vae(os.path.join(dst, "vae"), *parts["vae"])
        written.append("vae")
    if "text_encoder" in parts:
        hf.save_clip_text(os.path.join(dst, "text_encoder"), *parts["text_encoder"])
        CLIPTokenizer.default(pad_token="<|endoftext|>" if kind == "sd15" else "!").save(os.path.join(dst, "tokenizer"))
        written += ["text_encoder", "tokenizer"]
    prediction = prediction or ("epsilon" if kind == "sd15" else "v_prediction")
    _write_json(os.path.join(dst, "scheduler", "scheduler_config.json"), scheduler_config(prediction))
    index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"]}
    names = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    index.update({k: names[k] for k in written})
    index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    _write_json(os.path.join(dst, "model_index.json"), index)
    return [*written, "scheduler"]


def from_workdir(src: str, dst: str) -> list[str]:
    import ml_collections

    from ldm_jax.convert import diffusers as dconv
    from ldm_jax.ldm import build
    from ldm_jax.ldm.workdirs import read_config, restore_params
    from ldm_jax.models import unbox

    config = ml_collections.ConfigDict(read_config(src))
    stage = config.train.stage
    if stage == "autoencoder":
        dconv.save_vae(os.path.join(dst, "vae"), build.vae_config(config.model.vae),
                       restore_params(src, ema=True))
        return ["vae"]
    if stage == "ldm":
        from ldm_jax.ldm import LatentDiffusion

        model = LatentDiffusion.from_workdir(src)
        dconv.save_unet(os.path.join(dst, "unet"), model.unet_config, unbox(model.unet_params))
        dconv.save_vae(os.path.join(dst, "vae"), model.vae_config, model.vae_params)
        return ["unet", "vae"]
    raise ValueError(f"workdir '{src}' has stage '{stage}': only autoencoder and ldm workdirs export")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    src, dst = _SRC.value, _DST.value
    if not src or not dst:
        fail("convert needs --src=PATH and --dst=DIR")
    if not os.path.exists(src):
        fail(f"--src='{src}' does not exist")
    if os.path.isdir(dst) and os.listdir(dst):
        fail(f"--dst='{dst}' exists and is not empty: choose a new folder (nothing is overwritten)")
    try:
        if os.path.isdir(src):
            if not os.path.isdir(os.path.join(src, "checkpoints")):
                fail(f"--src='{src}' is a folder without checkpoints/: give an ldm_jax workdir or a checkpoint file")
            written = from_workdir(src, dst)
        else:
            written = from_single_file(src, dst, _KIND.value, _PREDICTION.value, _EMA.value)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(f"wrote {', '.join(written)} to {dst}")


def run_cli(argv):
    start(main, argv)
