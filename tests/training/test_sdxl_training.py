"""Fine-tuning an SDXL-architecture model through the real latent-diffusion stage: configs/sdxl_finetune.py on a
tiny random SDXL folder saved by diffusers (text_time U-Net, CLIP-L-like + bigG-like encoders), with the latent
cache holding the pooled text beside the states and FSDP over 4 devices; the workdir samples through
`LatentDiffusion.from_workdir` (both text encoders, the micro-conditioning) and exports as a
StableDiffusionXLPipeline folder that diffusers loads."""

import os

import jax
import numpy as np

from ldm_jax.configlib import load_config
from ldm_jax.convert import diffusers as dconv
from ldm_jax.ldm import LatentDiffusion
from ldm_jax.ldm.workdirs import restore_params
from ldm_jax.models import TextEncoders
from ldm_jax.training import run
from ldm_jax.training.writers import read_metrics
from tests.pipelines.helpers import SIZE, save_tiny_sdxl

STEPS = 4


def test_sdxl_finetune_config_trains_and_samples(tmp_path):
    folder = tmp_path / "sdxl"
    folder.mkdir()
    save_tiny_sdxl(folder)
    c = load_config(f"configs/sdxl_finetune.py:{folder / 'base'}")
    assert c.model.text_encoder.name == "sdxl" and c.diffusion.schedule == "scaled_linear"
    c.data.name, c.data.data_dir, c.data.resolution, c.data.batch_size = "shapes", str(tmp_path / "data"), SIZE, 8
    c.data.builder_kwargs = {"num_train": 64, "num_test": 16, "num_heldout": 16}
    c.train.dtype, c.train.remat, c.train.num_steps, c.train.log_every_steps = "float32", False, STEPS, 2
    c.optimizer.lr, c.optimizer.warmup_steps = 1e-3, 2
    c.checkpoint.every_steps, c.sample.every_steps = STEPS, 0  # grids: the pipelines' and other stages' tests
    c.sample.num_steps, c.sample.prompts = 3, ("a red circle in the top left", "a blue square")
    c.mesh.data, c.mesh.fsdp = 2, 4
    workdir = str(tmp_path / "run")
    run(c, workdir)

    losses = [r["loss"] for r in read_metrics(workdir) if "loss" in r]
    assert len(losses) == STEPS // 2 and np.all(np.isfinite(losses))
    assert "text_pooled" in open(os.path.join(workdir, "latent_cache", "manifest.json")).read()
    _, start = dconv.load_unet(folder / "base" / "unet")
    trained = restore_params(workdir, ema=False)
    moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(start),
                                                                     strict=True)]
    assert min(moved) > 0  # every weight of the pretrained U-Net is trained, the added embedding included

    model = LatentDiffusion.from_workdir(workdir)
    assert isinstance(model.text_encoder, TextEncoders) and model.num_time_ids == 6
    s = c.sample
    images = model.generate(list(s.prompts), seed=int(s.seed), sampler=str(s.sampler), num_steps=int(s.num_steps),
                            guidance_scale=float(s.guidance_scale))
    assert images.shape == (2, SIZE, SIZE, 3) and images.std() > 1

    # exported as a StableDiffusionXLPipeline folder: diffusers loads it, and it reloads as the same model
    from diffusers import StableDiffusionXLPipeline

    from ldm_jax.convert.common import flatten
    from ldm_jax.pipelines.folders import from_workdir

    written = from_workdir(workdir, str(tmp_path / "folder"))
    assert {"text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"} <= set(written)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder")
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    again = LatentDiffusion.from_pretrained(tmp_path / "folder")
    assert again.num_time_ids == 6 and not again.force_zeros_for_empty_prompt  # trained on "" captions, not zeros
    for a, b in ((again.unet_params, model.unet_params), *zip(again.text_encoder.params, model.text_encoder.params,
                                                              strict=True)):
        fa, fb = flatten(a), flatten(b)
        assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert [(e.hidden_layer, e.final_norm) for e in again.text_encoder.encoders] == [(-2, False)] * 2
