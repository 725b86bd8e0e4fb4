"""``ldm-jax convert`` of a latent-diffusion workdir: one complete folder (unet, vae, text encoder, tokenizer,
scheduler, model index) that ldm_jax loads back as the same model (the same images bit for bit, the same
sampling defaults in ``ldm-jax sample``) and that diffusers / transformers load where the part is theirs.

Two workdirs, no training: MiniLM (BERT) text encoder + the shapes_ldm.py:tiny U-Net + a discrete scaled_linear
zero-terminal-SNR v-prediction schedule (every part has a diffusers/transformers equivalent), and the pipeline
tests' CLIP + cosine workdir (a continuous schedule diffusers does not have).
"""

import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
import torch
from absl.testing import flagsaver
from PIL import Image

from ldm_jax import diffusion
from ldm_jax.commands import sample
from ldm_jax.configlib import load_config
from ldm_jax.convert import pipeline_folder
from ldm_jax.convert.common import flatten
from ldm_jax.images import read_png_metadata
from ldm_jax.ldm import LatentDiffusion, SamplingDefaults, build
from ldm_jax.ldm.loading import scheduler_parts
from ldm_jax.models.unet import unet_param_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["a red circle in the top left", "a blue square"]
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def assert_same_tree(a, b):
    fa, fb = flatten(jax.device_get(a)), flatten(jax.device_get(b))
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ---------------------------------------------------------------------------------------- scheduler configs
def _section(**kw) -> dict:
    return build.diffusion_config(kw).to_dict()


CASES = {  # name: (diffusion section, sampler, diffusers class or None)
    "scaled_linear_eps_ddim": (_section(schedule="scaled_linear"), "ddim", "DDIMScheduler"),
    "linear_v_zero_snr_dpmpp": (_section(schedule="linear", zero_snr=True, prediction="v",
                                         schedule_options={"beta_end": 0.015}), "dpmpp_2m",
                                "DPMSolverMultistepScheduler"),
    "heun_zero_snr_falls_back_to_euler": (_section(schedule="scaled_linear", zero_snr=True, prediction="x0"),
                                          "heun", "EulerDiscreteScheduler"),
    "cosine_v": (_section(schedule="cosine", prediction="v"), "ddim", None),
    "shifted_sigmoid_bounds": (_section(schedule="sigmoid", schedule_options={"start": -2.0, "end": 2.0, "tau": 0.7},
                                        shift=2.0, logsnr_min=-12.0, logsnr_max=9.0), "euler", None),
    "edm_preconditioned": (_section(schedule="edm", prediction="x0", precondition="edm", sigma_data=0.6), "heun",
                           None),
    "learned": (_section(schedule="learned", weighting="elbo", schedule_options={"hidden": 8}), "ddim", None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_scheduler_config_round_trip(name):
    """The "_ldm_jax" block gives back the exact schedule, prediction, preconditioning and grid defaults; the
    diffusers fields (where there are any) load in diffusers' class and give the same noise levels."""
    section, sampler, cls = CASES[name]
    dif = build.diffusion_config(section)
    params = None
    if dif.learned:  # moved off its initial values, as training would
        params = jax.tree.map(lambda p: np.asarray(p, np.float32) + np.float32(0.1), dif.init_schedule_params(
            jax.random.key(3)))
    schedule = dif.make_schedule(params)
    defaults = SamplingDefaults.for_schedule(schedule)
    cfg = json.loads(json.dumps(pipeline_folder.scheduler_config(
        section, dataclasses.asdict(defaults), sampler, pipeline_folder.learned_schedule_params(schedule))))
    back = scheduler_parts(cfg)
    t = np.linspace(0.0, 1.0, 101)
    np.testing.assert_array_equal(np.asarray(back["schedule"].logsnr(t)), np.asarray(schedule.logsnr(t)))
    assert (back["prediction"], back["precondition"], back["sigma_data"], back["defaults"]) == (
        dif.prediction, dif.precondition, dif.sigma_data, defaults)
    assert cfg.get("_class_name") == cls
    if cls is None:
        assert set(cfg) == {pipeline_folder.LDM_JAX}
        return
    import diffusers

    ref = getattr(diffusers, cls).from_config(cfg)
    assert ref.config.prediction_type == pipeline_folder.DIFFUSERS_PREDICTIONS[dif.prediction]
    ours = np.asarray(schedule.alphas_cumprod)
    np.testing.assert_allclose(ours, ref.alphas_cumprod.numpy(), rtol=0, atol=2e-6)
    del cfg[pipeline_folder.LDM_JAX]  # diffusers' fields alone say the same to ldm_jax
    plain = scheduler_parts(cfg)
    np.testing.assert_allclose(np.asarray(plain["schedule"].alphas_cumprod), ours, atol=1e-6)
    assert (plain["prediction"], plain["defaults"].spacing, plain["defaults"].steps_offset) == (
        dif.prediction, defaults.spacing, defaults.steps_offset)
    assert plain["defaults"].final_for(sampler) == defaults.final_for(sampler)


# ---------------------------------------------------------------------------------------- the workdirs
@pytest.fixture(scope="module")
def minilm_workdir(tiny_sd, tmp_path_factory):
    """configs/shapes_ldm.py:tiny with the tiny SD VAE, a scaled_linear zero-SNR v schedule, dpmpp_2m sampling
    defaults and random U-Net weights (EMA: another draw), saved as the training loop saves a checkpoint."""
    import optax

    from ldm_jax.training.checkpoint import Checkpointer
    from ldm_jax.training.state import create_state

    config = load_config(os.path.join(ROOT, "configs/shapes_ldm.py:tiny")).to_dict()
    config["model"]["vae"] = {"pretrained": str(tiny_sd.sd / "vae")}
    config["diffusion"].update(schedule="scaled_linear", zero_snr=True, prediction="v")
    config["sample"].update(sampler="dpmpp_2m", num_steps=2, guidance_scale=2.5)
    unet_cfg = build.unet_config(config["model"]["unet"], cross_attention_dim=384, in_channels=4, out_channels=4,
                                 **build.compute_options(config))  # what training builds (MiniLM: 384 wide)
    rng = np.random.default_rng(0)

    def draw():
        flat = {k: (1.0 if k.endswith("scale") else 0.0) + 0.05 * rng.standard_normal(s)
                for k, s in unet_param_shapes(unet_cfg).items()}
        from ldm_jax.convert.common import unflatten

        return unflatten({k: v.astype(np.float32) for k, v in flat.items()})

    state = create_state(draw(), optax.sgd(0.1), jax.random.PRNGKey(0)).replace(ema_params=draw())
    path = tmp_path_factory.mktemp("minilm_workdir")
    ckpt = Checkpointer(str(path / "checkpoints"), async_save=False)
    assert ckpt.save(3, state, {"position": 0}, config)
    ckpt.close()
    return path


@pytest.fixture(scope="module")
def workdir_model(minilm_workdir):
    """The workdir's model and its images for PROMPTS with the run's sampling defaults (seed 5, a negative)."""
    model = LatentDiffusion.from_workdir(minilm_workdir)
    kwargs = {k: v for k, v in model.sample.generate_kwargs().items() if k not in ("seed", "negative_prompt")}
    images = model.generate(PROMPTS, "blurry", seed=5, **kwargs)
    return types.SimpleNamespace(model=model, images=images, kwargs=kwargs)


DRIVER = r"""
import json, os, sys
from absl.testing import flagsaver
from ldm_jax.commands import convert

real_access = os.access
for argv, deny in json.loads(sys.argv[1]):
    os.access = (lambda p, m: False if os.path.abspath(p) == deny else real_access(p, m)) if deny else real_access
    try:
        with flagsaver.flagsaver():
            convert.run_cli(["ldm-jax convert", *argv])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    os.access = real_access
    print(f"@@exit {code}", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def converted(minilm_workdir, tmp_path_factory):
    """One process runs the convert CLI: its one-line errors, then the conversion of the MiniLM workdir
    (convert and sample define a --prediction flag each, so they cannot share a process)."""
    root = tmp_path_factory.mktemp("converted")
    (root / "a_file").write_text("x")
    (root / "taken").mkdir()
    (root / "taken" / "x").write_text("x")
    (root / "locked").mkdir()
    src, dst = f"--src={minilm_workdir}", root / "folder"
    cases = [
        ([src, f"--dst={root / 'a_file'}"], None, "is a file: pass a folder"),
        ([src, f"--dst={root / 'taken'}"], None, "exists and is not empty"),
        ([src, f"--dst={root / 'locked' / 'new' / 'out'}"], str(root / "locked"), "cannot write in"),
        ([f"--src={root / 'locked'}", f"--dst={root / 'x'}"], None, "without checkpoints/"),
        ([src, f"--dst={dst}"], None, None),
    ]
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([[a, d] for a, d, _ in cases])],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT})
    chunks = done.stderr.split("@@exit ")  # case k's stderr, then "@@exit <code>"
    assert len(chunks) == len(cases) + 1, done.stderr[-3000:]
    results = []
    for k, (_, _, match) in enumerate(cases):
        err = chunks[k] if k == 0 else chunks[k].split("\n", 1)[1]
        code = int(chunks[k + 1].split("\n", 1)[0])
        results.append((code, [ln for ln in err.strip().splitlines() if ln.startswith("error")], match))
    return types.SimpleNamespace(root=root, folder=dst, results=results, stdout=done.stdout)


def test_convert_cli_errors_are_one_line_and_leave_nothing(converted):
    for code, lines, match in converted.results[:-1]:
        assert code == 2 and len(lines) == 1 and match in lines[0], (match, lines)
    root = converted.root
    assert (root / "a_file").read_text() == "x" and os.listdir(root / "taken") == ["x"]
    assert not (root / "locked" / "new").exists() and not (root / "x").exists()
    assert converted.results[-1][0] == 0 and f"to {converted.folder}" in converted.stdout
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # no staging folder left behind


def test_folder_is_complete(converted):
    folder = converted.folder
    index = json.loads((folder / "model_index.json").read_text())
    assert {k: index[k] for k in COMPONENTS} == {
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "BertModel"], "tokenizer": ["transformers", "BertTokenizer"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part, files in (("unet", ["config.json", "diffusion_pytorch_model.safetensors"]),
                        ("vae", ["config.json", "diffusion_pytorch_model.safetensors"]),
                        ("text_encoder", ["config.json", "model.safetensors"]),
                        ("tokenizer", ["tokenizer.json", "tokenizer_config.json"]),
                        ("scheduler", ["scheduler_config.json"])):
        assert all((folder / part / f).is_file() for f in files), part
    extra = index[pipeline_folder.LDM_JAX]
    assert extra["sample"]["sampler"] == "dpmpp_2m" and extra["default_size"] == 16
    assert extra["text_encoder"] == {"kind": "bert", "max_length": 8, "hidden_layer": None,
                                     "use_attention_mask": True}
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert sched[pipeline_folder.LDM_JAX]["diffusion"]["schedule"] == "scaled_linear"
    assert (sched["prediction_type"], sched["rescale_betas_zero_snr"], sched["final_sigmas_type"]) == (
        "v_prediction", True, "zero")


def test_folder_generates_the_workdir_images(workdir_model, converted):
    """LatentDiffusion.from_pretrained(folder) is the workdir's model: same configs, weights, schedule,
    defaults, and the same images bit for bit."""
    ours = workdir_model.model
    folder = LatentDiffusion.from_pretrained(converted.folder)
    for name in ("unet_config", "vae_config", "prediction", "precondition", "sigma_data", "defaults",
                 "default_size", "sample"):
        assert getattr(folder, name) == getattr(ours, name), name
    for name in ("unet_params", "vae_params"):
        assert_same_tree(getattr(folder, name), getattr(ours, name))
    assert_same_tree(folder.text_encoder.params, ours.text_encoder.params)
    np.testing.assert_array_equal(folder.text_encoder.tokenize(PROMPTS)[0], ours.text_encoder.tokenize(PROMPTS)[0])
    np.testing.assert_array_equal(np.asarray(folder.schedule.logsnr_table), np.asarray(ours.schedule.logsnr_table))
    want = workdir_model.images
    assert want.shape == (2, 16, 16, 3) and want.std() > 1
    np.testing.assert_array_equal(folder.generate(PROMPTS, "blurry", seed=5, **workdir_model.kwargs), want)


def test_diffusers_and_transformers_load_the_parts(workdir_model, converted):
    """Each part loads in its reference library and computes what ours computes."""
    import diffusers
    import transformers

    folder, ours = converted.folder, workdir_model.model
    diffs = {}
    # text encoder + tokenizer
    te = transformers.AutoModel.from_pretrained(folder / "text_encoder").eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder / "tokenizer")
    enc = tok(PROMPTS, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    ids, mask = ours.text_encoder.tokenize(PROMPTS)
    np.testing.assert_array_equal(enc["input_ids"].numpy(), ids)
    with torch.no_grad():
        ref = te(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state.numpy()
    diffs["text_encoder"] = max_diff(ref, ours.text_encoder.encode(PROMPTS))
    # U-Net and VAE (encode: posterior mean; decode) on random inputs, ours in one jitted call
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 2, 2, 4)).astype(np.float32)
    t = np.array([3.0, 640.0], np.float32)
    ctx = rng.standard_normal((2, 8, 384)).astype(np.float32)
    img = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)

    @jax.jit
    def forward(unet_params, vae_params):
        out = ours.unet.apply({"params": unet_params}, x, t, ctx)
        mean, _ = ours.vae.apply({"params": vae_params}, img, method=ours.vae.encode)
        return out, mean, ours.vae.apply({"params": vae_params}, mean, method=ours.vae.decode)

    out, mean, dec = forward(ours.unet_params, ours.vae_params)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))  # noqa: E731
    nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    with torch.no_grad():
        diffs["unet"] = max_diff(nhwc(unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample), out)
        diffs["vae_encode"] = max_diff(nhwc(vae.encode(nchw(img)).latent_dist.mean), mean)
        diffs["vae_decode"] = max_diff(nhwc(vae.decode(nchw(mean)).sample), dec)
    # scheduler
    sched = diffusers.DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler")
    diffs["alphas_cumprod"] = max_diff(sched.alphas_cumprod.numpy(), ours.schedule.alphas_cumprod)
    assert sched.config.prediction_type == "v_prediction" and sched.config.rescale_betas_zero_snr
    print("max |diffusers/transformers - ldm_jax|:", diffs)
    assert all(v < 1e-5 for v in diffs.values()), diffs


def test_sample_cli_on_the_folder_uses_the_run_defaults(workdir_model, converted, tmp_path, capsys):
    """``ldm-jax sample --model=FOLDER`` without sampling flags takes the run's sampler, steps and guidance
    (as with the workdir) and draws the workdir's images."""
    out = tmp_path / "out"
    code = 0
    with flagsaver.flagsaver():
        try:
            sample.run_cli(["ldm-jax sample", f"--model={converted.folder}", *(f"--prompt={p}" for p in PROMPTS),
                            "--negative_prompt=blurry", f"--out={out}", "--seed=5", "--nocompilation_cache"])
        except SystemExit as e:
            code = e.code
    assert not code, capsys.readouterr().err
    for i, name in enumerate(["0000-seed5.png", "0001-seed6.png"]):
        meta = read_png_metadata(out / name)
        assert (meta["sampler"], meta["num_steps"], meta["guidance_scale"]) == ("dpmpp_2m", "2", "2.5")
        assert meta["spacing"] == "leading" and meta["prompt"] == PROMPTS[i]
        np.testing.assert_array_equal(np.asarray(Image.open(out / name)), workdir_model.images[i])


def test_clip_workdir_with_a_continuous_schedule(tiny_workdir, tmp_path):
    """The CLIP + cosine workdir: ldm_jax reloads the same model; transformers' CLIPTextModel gives our hidden
    states; diffusers has no scheduler for the cosine schedule, and the model index says so."""
    import transformers

    from ldm_jax.ldm.workdirs import read_config

    ours = LatentDiffusion.from_workdir(tiny_workdir.path)
    section = build.diffusion_config(read_config(str(tiny_workdir.path))["diffusion"]).to_dict()
    written = pipeline_folder.write_model_folder(str(tmp_path / "f"), ours, section)
    assert written == list(COMPONENTS)
    index = json.loads((tmp_path / "f" / "model_index.json").read_text())
    assert index["scheduler"] == ["ldm_jax", "Schedule"] and index["text_encoder"][1] == "CLIPTextModel"
    assert "_class_name" not in json.loads((tmp_path / "f" / "scheduler" / "scheduler_config.json").read_text())
    folder = LatentDiffusion.from_pretrained(tmp_path / "f")
    for name in ("unet_config", "vae_config", "prediction", "defaults", "default_size", "sample"):
        assert getattr(folder, name) == getattr(ours, name), name
    assert_same_tree(folder.unet_params, ours.unet_params)
    assert_same_tree(folder.text_encoder.params, ours.text_encoder.params)
    t = np.linspace(0, 1, 33)
    np.testing.assert_array_equal(np.asarray(folder.schedule.logsnr(t)), np.asarray(ours.schedule.logsnr(t)))
    assert isinstance(folder.schedule, diffusion.Cosine)
    ids = ours.text_encoder.tokenize(PROMPTS)[0]
    np.testing.assert_array_equal(folder.text_encoder.tokenize(PROMPTS)[0], ids)
    te = transformers.CLIPTextModel.from_pretrained(tmp_path / "f" / "text_encoder").eval()
    with torch.no_grad():
        ref = te(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    diff = max_diff(ref, ours.text_encoder.encode(PROMPTS))
    print("max |CLIPTextModel - ldm_jax|:", diff)
    assert diff < 1e-5
