"""Loading pipeline components: diffusers scheduler configs, SD folders, CompVis single files, ldm_jax workdirs,
and the one-line errors for bad input. Nothing here compiles a sampling loop."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler

from ldm_jax.convert import compvis
from ldm_jax.convert.common import flatten, write_safetensors
from ldm_jax.ldm import LatentDiffusion
from ldm_jax.pipelines import Img2Img, Inpaint, TextToImage, scheduler_from_config
from ldm_jax.types import ConfigError
from tests.pipelines.helpers import smooth_image


@pytest.fixture(scope="module")
def comps(sd_comps):
    return sd_comps


def flat_np(tree) -> dict:
    return {k: np.asarray(v) for k, v in flatten(jax.device_get(tree)).items()}


def assert_same_tree(a, b):
    fa, fb = flat_np(a), flat_np(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


# ---------------------------------------------------------------------------------------- scheduler configs
def test_sd15_scheduler_config_defaults():
    """SD 1.5's scheduler folder (PNDM, no timestep_spacing): leading spacing, offset 1, DDIM to timestep 0."""
    sd15 = dict(_class_name="PNDMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                clip_sample=False)
    schedule, prediction, d = scheduler_from_config(sd15)
    assert prediction == "eps" and d.spacing == "leading" and d.steps_offset == 1
    assert d.final_for("ddim") == "sigma_min" and d.final_for("euler") == "zero" and d.final_for("ddpm") == "zero"
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.numpy()
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), ref, atol=1e-6)


def test_sd2_v_config_trailing_zero_snr():
    cfg = dict(_class_name="DDIMScheduler", beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
               prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True,
               clip_sample=False)
    schedule, prediction, d = scheduler_from_config(cfg)
    assert prediction == "v" and d.spacing == "trailing" and d.steps_offset == 0 and d.final_ddim == "zero"
    ref = DDIMScheduler(**{k: v for k, v in cfg.items() if k != "_class_name"}).alphas_cumprod.numpy()
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), ref, atol=1e-6)
    assert float(schedule.alphas_cumprod[-1]) == 0.0


def test_cosine_betas_and_class_defaults():
    schedule, _, d = scheduler_from_config(dict(_class_name="EulerDiscreteScheduler",
                                                beta_schedule="squaredcos_cap_v2", use_karras_sigmas=True))
    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.numpy()
    np.testing.assert_allclose(np.asarray(schedule.alphas_cumprod), ref, atol=1e-6)
    assert d.spacing == "karras"
    assert scheduler_from_config(dict(_class_name="DPMSolverMultistepScheduler"))[2].spacing == "linspace"


@pytest.mark.parametrize("cfg, match", [
    (dict(clip_sample=True), "clip_sample=true is not supported"),
    (dict(beta_schedule="exp"), "beta_schedule='exp' is not supported"),
    (dict(prediction_type="velocity"), "prediction_type='velocity' is unknown"),
    (dict(timestep_spacing="leadin"), "timestep_spacing='leadin' is unknown"),
])
def test_bad_scheduler_configs(cfg, match):
    with pytest.raises(ConfigError, match=match):
        scheduler_from_config(cfg)


# ---------------------------------------------------------------------------------------- sources
def test_diffusers_folder(tiny_sd, comps):
    ref = DDIMScheduler.from_pretrained(str(tiny_sd.sd / "scheduler"))
    np.testing.assert_allclose(np.asarray(comps.schedule.alphas_cumprod), ref.alphas_cumprod.numpy(), atol=1e-6)
    d = comps.defaults
    assert (d.spacing, d.steps_offset, d.final_ddim, comps.prediction) == ("leading", 1, "sigma_min", "eps")
    assert comps.downsample_factor == 8 and comps.latent_channels == 4 and not comps.is_inpainting_unet
    assert comps.text_encoder.tokenizer.pad_id == 49407 and comps.text_encoder.hidden_size == 32
    torch_conv = tiny_sd.pipe.unet.conv_in.weight.detach().numpy()  # OIHW -> HWIO
    np.testing.assert_array_equal(np.asarray(comps.unet_params["conv_in"]["kernel"]), torch_conv.transpose(2, 3, 1, 0))


def _compvis_file(tiny_sd, comps, path):
    """The tiny SD written as one CompVis-layout file (the inverse of the converter's renaming)."""
    sd = {}
    for k, v in tiny_sd.pipe.unet.state_dict().items():
        sd[compvis.UNET_PREFIX + compvis.unet_compvis_name(k, comps.unet_config)] = v.numpy()
    for k, v in tiny_sd.pipe.vae.state_dict().items():
        name = compvis.vae_compvis_name(k, comps.vae_config)
        sd[compvis.VAE_PREFIX + name] = v.numpy()[:, :, None, None] if compvis._is_vae_attn_matrix(name) else v.numpy()
    for k, v in tiny_sd.pipe.text_encoder.state_dict().items():
        sd[compvis.CLIP_PREFIX + ("" if k.startswith("text_model.") else "text_model.") + k] = v.numpy()
    sd["betas"] = np.linspace(0.1, 0.2, 1000, dtype=np.float32)  # a buffer outside the three parts is ignored
    write_safetensors(path, sd)


def test_single_file_gives_the_same_weights(tiny_sd, comps, tmp_path):
    path = tmp_path / "tiny.safetensors"
    _compvis_file(tiny_sd, comps, path)
    single = LatentDiffusion.from_single_file(path, unet_config={"num_heads": 2, "norm_num_groups": 8},
                              vae_config={"norm_num_groups": 8})
    assert_same_tree(single.unet_params, comps.unet_params)
    assert_same_tree(single.vae_params, comps.vae_params)
    assert_same_tree(single.text_encoder.params, comps.text_encoder.params)
    assert single.unet_config.replace(sample_size=8) == comps.unet_config
    assert single.prediction == "eps" and single.defaults == comps.defaults
    ids = single.text_encoder.tokenize(["a photo of a cat"])[0]
    np.testing.assert_array_equal(ids, comps.text_encoder.tokenize(["a photo of a cat"])[0])
    np.testing.assert_allclose(np.asarray(single.schedule.logsnr_table), np.asarray(comps.schedule.logsnr_table),
                               atol=1e-6)


def test_workdir_uses_ema_parameters(tiny_sd, comps, tiny_workdir):
    """A stage-2 workdir gives the networks training builds from its config, with the EMA U-Net weights."""
    from ldm_jax.ldm import build
    from ldm_jax.ldm.workdirs import read_config

    ema = LatentDiffusion.from_workdir(tiny_workdir.path)
    assert_same_tree(ema.unet_params, tiny_workdir.ema)
    raw = LatentDiffusion.from_pretrained(tiny_workdir.path, ema=False)
    assert_same_tree(raw.unet_params, comps.unet_params)
    config = read_config(str(tiny_workdir.path))
    model = LatentDiffusion.from_config(config)  # what training builds from the same config
    assert model.unet_params is None and model.unet_config == ema.unet_config
    vae_cfg, vae_params = build.frozen_vae(config["model"]["vae"])
    assert_same_tree(ema.vae_params, vae_params)
    assert_same_tree(ema.text_encoder.params, build.text_encoder(config["model"]["text_encoder"]).params)
    assert ema.vae_config == vae_cfg.replace(block_out_channels=tuple(vae_cfg.block_out_channels))
    assert ema.prediction == model.prediction == "v" and ema.schedule.num_train_timesteps is None
    t = np.linspace(0.05, 0.95, 7)
    np.testing.assert_array_equal(np.asarray(ema.schedule.logsnr(t)), np.asarray(model.schedule.logsnr(t)))
    np.testing.assert_array_equal(np.asarray(ema.schedule.timestep(t)), np.asarray(model.schedule.timestep(t)))
    assert ema.defaults.spacing == "uniform" and ema.unet_config == comps.unet_config
    assert TextToImage(ema, compilation_cache=False).default_size == 32  # the training resolution


def test_workdir_with_mismatched_config_is_one_line(tiny_workdir, tmp_path):
    import shutil

    from ldm_jax.convert.common import ConversionError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_workdir.path, bad)
    cfg_file = next(bad.glob("checkpoints/*/config/config.json"))
    cfg = json.loads(cfg_file.read_text())
    cfg["model"]["unet"]["block_out_channels"] = [16]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="do not match the config") as err:
        LatentDiffusion.from_workdir(bad)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input_one_line_errors(comps, tiny_sd, tmp_path):
    t2i = TextToImage(comps, compilation_cache=False)
    compiled = t2i.num_compiled  # the model (a shared fixture) keeps what other tests compiled
    img = smooth_image(0)
    cases = [
        (lambda: t2i([], num_steps=2), "empty prompt list"),
        (lambda: t2i("a", height=60, width=64), "height=60 must be a positive multiple of 8"),
        (lambda: t2i("a", num_steps=0), "num_steps must be an integer >= 1"),
        (lambda: t2i("a", sampler="dpmpp2m"), "did you mean 'dpmpp_2m'"),
        (lambda: t2i("a", spacing="karas"), "did you mean 'karras'"),
        (lambda: t2i("a", noise=np.zeros((2, 8, 8, 4)), height=64, width=64), "noise has shape"),
        (lambda: t2i(["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt: got 3 for 2 prompts"),
        (lambda: t2i("a", chrun=1.0), "did you mean 'churn'"),
        (lambda: t2i("a", guidance_interval=(0.9, 0.1)), "guidance_interval must be"),
        (lambda: t2i("a", guidance_rescale=1.5), r"guidance_rescale must be in \[0, 1\]"),
        (lambda: Img2Img(comps, compilation_cache=False)("a", img, strength=1.5), r"strength must be in \[0, 1\]"),
        (lambda: Img2Img(comps, compilation_cache=False)("a", img, strength=0.05, num_steps=10), "runs no denoising"),
        (lambda: Img2Img(comps, compilation_cache=False)("a", img[:60]), "height=60 must be a positive multiple"),
        (lambda: Inpaint(comps, compilation_cache=False)("a", img, np.zeros((32, 32))), "mask size 32x32 does not"),
        (lambda: Img2Img(comps, compilation_cache=False)("a", np.zeros((3, 64, 64, 3), np.uint8)), "number of images"),
    ]
    inpainting_unet = dataclasses.replace(comps, unet_config=comps.unet_config.replace(in_channels=9))
    cases.append((lambda: TextToImage(inpainting_unet, compilation_cache=False)("a"), "use the Inpaint pipeline"))
    for fn, match in cases:
        with pytest.raises(ConfigError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)
    assert t2i.num_compiled == compiled  # every bad input failed before compiling anything


def test_missing_model_files(tiny_sd, tmp_path):
    import shutil

    with pytest.raises(FileNotFoundError, match="not found"):
        LatentDiffusion.from_pretrained(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd.sd, partial, ignore=shutil.ignore_patterns("vae"))
    with pytest.raises(FileNotFoundError, match="lacks vae/config.json") as err:
        TextToImage.from_pretrained(partial, compilation_cache=False)
    assert "\n" not in str(err.value)
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ConfigError, match="not a checkpoint file"):
        LatentDiffusion.from_pretrained(tmp_path / "weights.txt")


def test_model_id_from_the_local_hugging_face_cache(tiny_sd, comps, tmp_path):
    """An "org/name" id resolves to its snapshot in a local HF cache (layout models--org--name/snapshots/<rev>/,
    refs/main), with no network; an id that is not cached is a one-line error naming it."""
    import shutil

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd.sd, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    model = LatentDiffusion.from_pretrained("someone/tiny-sd", cache_dir=cache)
    assert model.source == str(repo / "snapshots" / ("0" * 40))
    assert_same_tree(model.unet_params, comps.unet_params)
    assert model.defaults == comps.defaults and model.prediction == comps.prediction
    with pytest.raises(FileNotFoundError, match="'someone/other' is not a local path and not in the Hugging Face "
                                                "cache") as err:
        LatentDiffusion.from_pretrained("someone/other", cache_dir=cache)
    assert "\n" not in str(err.value)


def test_persistent_cache_setting_respects_user_and_opt_out(monkeypatch, tmp_path):
    from ldm_jax.ldm import enable_compilation_cache

    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("LDM_JAX_COMPILATION_CACHE", "0")
        assert enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("LDM_JAX_COMPILATION_CACHE", "1")
        monkeypatch.setenv("LDM_JAX_CACHE_DIR", str(tmp_path / "c"))
        assert enable_compilation_cache() == str(tmp_path / "c") and (tmp_path / "c").is_dir()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
        assert enable_compilation_cache() == str(tmp_path / "mine")  # a directory the user chose is kept
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
