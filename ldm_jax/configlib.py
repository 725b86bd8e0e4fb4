"""Config files and their command-line overrides, checked before anything runs.

Config files are Python files with ``get_config(arg=None) -> ml_collections.ConfigDict`` (``--config
configs/shapes_ldm.py:tiny`` passes ``"tiny"``). ``check_overrides`` validates every ``--config.a.b=value``
flag against the loaded config, so a misspelled key or a value of the wrong type stops the run with one
line that names the key and the nearest valid one, instead of a traceback from deep inside absl.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os

import ml_collections

from ldm_jax.types import ConfigError, nearest

_LOADING: list[str] = []  # folders of the config files being loaded (innermost last)


def _resolve(path: str) -> str:
    """A config path as written: absolute, relative to the config file that loads it (a config that includes
    another resolves it relative to itself), else relative to the working directory."""
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and _LOADING:
        beside = os.path.join(_LOADING[-1], path)
        if os.path.isfile(beside):
            return beside
    return path


def _one_line(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return f"SyntaxError at line {e.lineno}: {e.msg}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path.py[:arg]`` and returns ``get_config(arg)``; any failure is a one-line ConfigError."""
    path, _, arg = spec.partition(":")
    path = _resolve(path)
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' not found: pass --config=configs/<name>.py[:variant]")
    name = "ldm_jax_user_config_" + os.path.splitext(os.path.basename(path))[0]
    _LOADING.append(os.path.dirname(os.path.abspath(path)))
    try:
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"config file '{path}' defines no get_config(arg=None)")
        config = module.get_config(arg or None) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's file: its error becomes one line naming it
        raise ConfigError(f"config '{spec}' could not be loaded ({_one_line(e)})") from None
    finally:
        _LOADING.pop()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"config '{spec}': get_config returned {type(config).__name__}, not a ConfigDict")
    return config


def all_keys(cfg, prefix: str = "") -> list[str]:
    """Every dotted path in `cfg`, leaves and sections alike."""
    keys = []
    for k, v in cfg.items():
        path = f"{prefix}.{k}" if prefix else k
        keys.append(path)
        if isinstance(v, ml_collections.ConfigDict):
            keys.extend(all_keys(v, path))
    return keys


def _lookup(cfg, dotted: str):
    """(value, declared type) of a dotted key (the type of a None placeholder field is its declared one)."""
    node, parent = cfg, None
    walked = []
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            here = ".".join(walked)
            siblings = [f"{here}.{s}" if here else s for s in node.keys()] if isinstance(
                node, ml_collections.ConfigDict) else []
            hint = nearest(dotted, siblings) or nearest(dotted, all_keys(cfg))
            hint = hint.replace("mean '", "mean 'config.")
            raise ConfigError(f"unknown config key 'config.{dotted}'{hint}")
        walked.append(part)
        parent, node = node, node[part]
    kind = None
    if node is None and parent is not None:
        try:
            kind = parent.get_type(walked[-1])
        except (AttributeError, KeyError, TypeError):
            kind = None
    return node, kind


def _check_type(key: str, current, raw: str, declared=None) -> None:
    shown = current

    def fail(kind):
        raise ConfigError(f"--config.{key}={raw!r}: expected {kind} (current value {shown!r})")

    if current is None and declared in (int, float, bool):
        current = declared()
    if current is None or isinstance(current, str):
        return
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
            fail("a boolean (true/false)")
    elif isinstance(current, int):
        try:
            int(raw)
        except ValueError:
            fail("an integer")
    elif isinstance(current, float):
        try:
            float(raw)
        except ValueError:
            fail("a number")
    elif isinstance(current, (tuple, list)):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (tuple, list)):
            fail("a tuple/list literal such as '(1, 2)'")
    elif isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} is a section, not a value: set one of its fields instead")


def config_overrides(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Returns (the --config spec, [(dotted key, raw value)]) found in `argv`."""
    spec, overrides = None, []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config=") or a == "--config":
            spec = a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else None)
            i += 1 if "=" in a else 2
            continue
        if a.startswith("--config."):
            key, eq, raw = a[len("--config."):].partition("=")
            if not eq and i + 1 < len(args):
                raw = args[i + 1]
                i += 1
            overrides.append((key, raw))
        i += 1
    return spec, overrides


def check_overrides(argv: list[str]) -> None:
    """Raises ConfigError (one line) for an unknown key or a wrongly typed value among `argv`'s overrides."""
    spec, overrides = config_overrides(argv)
    if spec is None:
        if overrides:
            raise ConfigError("--config.* overrides given without --config=configs/<name>.py")
        return
    cfg = load_config(spec)
    for key, raw in overrides:
        value, declared = _lookup(cfg, key)
        _check_type(key, value, raw, declared)




# Keys base_config gained after runs were saved without them; such a run trained with base_config's value.
ADDED_KEYS = ("model.backbone", "model.dit", "model.mmdit", "diffusion.network_input", "lora",
              "model.text_encoder.path_2")


def with_added_keys(saved: dict) -> dict:
    """A copy of a saved run config (plain dict) with the `ADDED_KEYS` it lacks set to base_config's values, so
    that it compares equal to the same run configured today."""
    out = json.loads(json.dumps(saved))
    base = json.loads(base_config().to_json_best_effort())
    for dotted in ADDED_KEYS:
        *parents, leaf = dotted.split(".")
        node, default = out, base
        for p in parents:
            if not isinstance(node.get(p), dict):
                break
            node, default = node[p], default[p]
        else:
            node.setdefault(leaf, default[leaf])
    return out


def base_config() -> ml_collections.ConfigDict:
    """The one schema every training config starts from (sections as in DESIGN.md).

    Config files call this, then change what their experiment needs, so that
    ``--config.train.num_steps=12 --config.checkpoint.every_steps=4`` works on every one of them.
    """
    c = ml_collections.ConfigDict()
    # data: the fields of ldm_jax.data.DataConfig ("" means None for data_dir and latent_cache).
    c.data = dict(name="shapes", split="train", data_dir="", builder_kwargs={}, resolution=32, channels=3,
                  center_crop=True, flip=False, batch_size=32, seed=0, caption_dropout=0.1,
                  latent_cache="")
    # model: `backbone` picks the denoiser (unet, dit or mmdit), configured by the section of that name: a preset
    # name plus field overrides of its config (models.presets), or `pretrained` = a diffusers folder; the stage-2
    # VAE may instead come from a stage-1 `workdir`.
    c.model = dict(
        backbone="unet",
        unet=dict(preset="tiny", pretrained=""),
        dit=dict(preset="tiny", pretrained=""),
        mmdit=dict(preset="tiny", pretrained=""),
        vae=dict(preset="tiny", pretrained="", workdir=""),
        text_encoder=dict(name="minilm", path="", path_2="", max_length=16, hidden_layer=0),
    )
    # perceptual_weight > 0 adds LPIPS-VGG from local files: lpips_vgg (torchvision vgg16 state dict) and
    # lpips_lin (the lpips package's weights/v0.1/vgg.pth).
    c.autoencoder = dict(loss="l1", kl_weight=1e-6, disc_start=-1, disc_weight=0.5, disc_channels=64,
                         disc_layers=3, disc_lr=1e-4, perceptual_weight=0.0, lpips_vgg="", lpips_lin="")
    # logsnr_min / logsnr_max truncate a continuous schedule (cosine, sigmoid, ... reach logSNR = -inf at t = 1).
    # diffusion: ldm_jax.ldm.build.DiffusionConfig (every schedule, prediction, weighting and noise sampler of the
    # diffusion core, with their options as dicts, and EDM preconditioning).
    # (None placeholders typed float, so that --config.diffusion.logsnr_min=-10 works on the command line)
    c.diffusion = dict(schedule="cosine", schedule_options={}, shift=1.0, zero_snr=False,
                       logsnr_min=ml_collections.config_dict.placeholder(float),
                       logsnr_max=ml_collections.config_dict.placeholder(float), prediction="eps",
                       weighting="uniform", weighting_options={}, min_snr_gamma=5.0,
                       noise_sampling="uniform", noise_sampling_options={}, precondition="none", sigma_data=0.5,
                       network_input="vp")
    # lora: rank > 0 trains low-rank adapters (models.lora) on the frozen `model.unet.pretrained` U-Net (a diffusers
    # unet folder or a latent-diffusion workdir) instead of the whole network; alpha 0 means alpha = rank.
    c.lora = dict(rank=0, alpha=0.0, dropout=0.0, targets=("attention",))
    c.optimizer = dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                       warmup_steps=100, decay="cosine", grad_clip=1.0)
    c.train = dict(stage="ldm", num_steps=1000, seed=0, log_every_steps=50, grad_accum=1,
                   ema=dict(decay=0.999, warmup_steps=100), dtype="float32", remat=False,
                   on_nonfinite="halt", stop_at_step=0)
    c.checkpoint = dict(every_steps=500, keep=3, keep_every=0)
    # sample: ldm_jax.ldm.SampleConfig (training grids; the default settings of evaluation and the CLI).
    c.sample = dict(every_steps=0, prompts=("a red circle in the top left",), negative_prompt="", sampler="ddim",
                    num_steps=20, guidance_scale=3.0, seed=0, micro_batch=1)
    c.eval = dict(every_steps=0, metrics=(), num_samples=64)
    # Logical axis rules: the models' parameter/activation axis names -> mesh axes (unlisted names replicate).
    c.mesh = dict(data=-1, fsdp=1,
                  rules=(("batch", ("data", "fsdp")), ("embed", "fsdp"), ("conv_out", "fsdp")))
    return ml_collections.ConfigDict(c)
