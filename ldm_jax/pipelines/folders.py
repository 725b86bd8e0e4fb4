"""Diffusers-layout model folders written from the places weights come from (what ``ldm-jax convert`` runs):
`from_single_file` (an original CompVis / Stability SD 1.x / 2.x / SDXL checkpoint) and `from_workdir` (an
ldm_jax autoencoder or latent-diffusion workdir). Both write into an existing empty folder and return the
components written; the command writes into a staging folder and renames it (``commands.convert``).
"""

from __future__ import annotations

import os

import ml_collections

from ldm_jax.convert import compvis, hf
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert.pipeline_folder import write_json, write_model_folder
from ldm_jax.ldm import LatentDiffusion, build
from ldm_jax.ldm.workdirs import read_config, restore_params


def scheduler_config(prediction: str) -> dict:
    """SD's DDIM settings (scaled_linear 0.00085..0.012, 1000 steps, leading spacing, offset 1)."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
            "prediction_type": prediction, "timestep_spacing": "leading"}


def sdxl_scheduler_config() -> dict:
    """SDXL's Euler settings (SD's table, leading spacing, offset 1, eps)."""
    return {**scheduler_config("epsilon"), "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
            "use_karras_sigmas": False}


def from_single_file(src: str, dst: str, kind: str = "auto", prediction: str | None = None,
                     use_ema: bool = False) -> list[str]:
    """A single-file checkpoint -> unet/, vae/, text encoder(s) + tokenizer(s), scheduler/ and model_index.json
    (SD 1.x / 2.x: StableDiffusionPipeline with DDIM; SDXL: StableDiffusionXLPipeline, or the refiner's
    StableDiffusionXLImg2ImgPipeline, with Euler). `prediction` (epsilon / v_prediction) defaults by kind."""
    parts = compvis.load_single_file(src, kind, use_ema=use_ema)
    kind = parts["kind"]
    written = []
    if "unet" in parts:
        dconv.save_unet(os.path.join(dst, "unet"), *parts["unet"])
        written.append("unet")
    if "vae" in parts:
        dconv.save_vae(os.path.join(dst, "vae"), *parts["vae"])
        written.append("vae")
    for part, suffix in (("text_encoder", ""), ("text_encoder_2", "_2")):
        if part in parts:
            hf.save_clip_text(os.path.join(dst, part), *parts[part])
            compvis.clip_tokenizer(kind, part).save(os.path.join(dst, "tokenizer" + suffix))
            written += [part, "tokenizer" + suffix]
    names = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    if kind == "sdxl":
        if prediction not in (None, "epsilon"):
            raise ValueError(f"--prediction={prediction}: SDXL checkpoints predict epsilon")
        write_json(os.path.join(dst, "scheduler", "scheduler_config.json"), sdxl_scheduler_config())
        refiner = "text_encoder" not in parts
        index = {"_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
                 "scheduler": ["diffusers", "EulerDiscreteScheduler"], "force_zeros_for_empty_prompt": not refiner,
                 "image_encoder": [None, None], "feature_extractor": [None, None]}
        if refiner:
            index.update(requires_aesthetics_score=True, text_encoder=[None, None], tokenizer=[None, None])
    else:
        prediction = prediction or ("epsilon" if kind == "sd15" else "v_prediction")
        write_json(os.path.join(dst, "scheduler", "scheduler_config.json"), scheduler_config(prediction))
        index = {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
                 "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    index.update({k: names[k] for k in written})
    write_json(os.path.join(dst, "model_index.json"), index)
    return [*written, "scheduler"]


def from_workdir(src: str, dst: str) -> list[str]:
    """An autoencoder workdir -> vae/; a latent-diffusion workdir -> the whole model
    (``convert.pipeline_folder.write_model_folder``)."""
    config = ml_collections.ConfigDict(read_config(src))
    stage = config.train.stage
    if stage == "autoencoder":
        dconv.save_vae(os.path.join(dst, "vae"), build.vae_config(config.model.vae),
                       restore_params(src, ema=True))
        return ["vae"]
    if stage == "ldm":
        model = LatentDiffusion.from_workdir(src)
        section = build.diffusion_config(config.get("diffusion", {})).to_dict()
        return write_model_folder(dst, model, section, source=os.path.abspath(src))
    raise ValueError(f"workdir '{src}' has stage '{stage}': only autoencoder and ldm workdirs export")
