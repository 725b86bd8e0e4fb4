"""Memory and FLOP planner: what one training step of a config needs per device, on any mesh.

    ldm-jax plan --config=configs/X.py[:variant] --devices=64 --mesh=data=8,fsdp=8 --batch_size=512 --hbm_gib=80

``plan(config, devices=..., mesh=..., batch_size=..., hbm_gib=..., remat=...)`` returns, per device, the bytes
of parameters, gradients, optimizer state, EMA, activations (with and without remat) and the step's total, the
FLOPs of one step, and the largest per-device batch that fits `hbm_gib`. Every figure says where it comes from:

* **exact** — the training state (float32 parameters, AdamW's two moments, the EMA copy, the step counters) and
  the batch: the bytes of each array's shard in the sharded abstract state the training loop builds
  (``sharding.sharded_abstract`` with the config's logical axis rules, on an ``AbstractMesh`` of the requested
  shape: 1024 devices need no devices). A dimension the mesh axes do not divide stays replicated, as in training.
  The gradient has the parameters' shapes, dtype and sharding.
* **calibrated** — activations and FLOPs per example: the step's loss-and-gradient program
  (``steps.loss_and_grads`` with the run's compute dtype and remat) compiled at per-device batches b1 < b2 (b / 2
  and b at the planned micro-batch b) on the largest part of the mesh this machine holds (one device when it
  has one). XLA's memory analysis gives its temporary bytes T(b): ``s = (T(b2) - T(b1)) / (b2 - b1)`` per
  example and ``act(b) = T(b1) + s (b - b1)`` (the intercept holds what does not grow with the batch, e.g. the
  compute-dtype copy of the parameters). FLOPs per example (forward + backward) and of the update come from the
  cost analysis of the lowered programs at batch 1 on one device (a cost analysis counts a loop body once, and
  XLA:CPU's attention loops over chunks of larger batches). For comparison, the bytes of the residuals
  ``jax.vjp`` keeps per example (before XLA's scheduling and fusion) are reported too. The compiled figures are
  the platform's: XLA:CPU runs bf16 convolutions in float32, chunks the attention over the *global* batch
  (recomputing it in the backward pass) and its schedule keeps remat's recomputed activations about as long as
  the stored ones would live, so a CPU calibration approximates an accelerator: run the planner on one chip of
  the target for its figures. (On GPU, cuDNN attention is a custom call the lowered cost analysis does not count.)
* **modelled** — ``temp = max(4 G, G_full + A + act(b / k))`` with G the gradient bytes per device, G_full the
  whole gradient's and A = G when gradients are accumulated over k > 1 micro-batches. The first term is the
  update: the gradient, the two new Adam moments and the update are all alive until the non-finite guard has
  seen the update's norm (``steps.make_train_step`` keeps the old state until then). The second is the backward
  pass: every device forms the whole float32 gradient (a partial sum over its examples) before it is
  reduce-scattered to the device's shard under FSDP (all-reduced without), and XLA defers and combines those
  reduce-scatters, so the whole size counts. Total per device = state + frozen arrays + batch + temp (the outputs
  alias the donated state). FLOPs per device = ``f_ex * b + f_update / fsdp`` (the update runs on each device's
  parameter shard, replicated over data).
* **compiled** — when this machine has the devices (e.g. forced host CPU devices), the real sharded step is
  compiled too: XLA's memory analysis is then the reported total (the model stays beside it, with their ratio)
  and the largest batch extrapolates from it with the calibrated slope.

The largest batch per device solves ``total(b) <= hbm`` (XLA's static estimate; runtimes reserve memory on top).

The latent-diffusion stage is planned on latent-cache batches (``data.latent_cache``: latents and text-encoder
states precomputed, the frozen VAE and text encoder outside the step, as at scale) with the run's U-Net, compute
dtype, remat, diffusion loss and AdamW + EMA, the loss of ``training.ldm``. No weights are read: the latent shape
comes from the autoencoder's preset, a stage-1 workdir's saved config or a diffusers config.json, the text states'
shape from the text encoder's config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.convert import diffusers as dconv
from ldm_jax.ldm import build
from ldm_jax.ldm.generate import Denoiser
from ldm_jax.ldm.workdirs import is_workdir, read_config
from ldm_jax.models import backbones, hf_text
from ldm_jax.training import optim
from ldm_jax.training import sharding as shd
from ldm_jax.training.ldm import cached_latents, noised_loss, training_context
from ldm_jax.training.optim import OptimizerConfig, make_optimizer
from ldm_jax.training.state import create_state
from ldm_jax.training.steps import StepConfig, loss_and_grads, make_train_step
from ldm_jax.training.task import Task
from ldm_jax.types import ConfigError, PyTree

GIB = 2**30
UPDATE_BUFFERS = 4  # gradient, new first and second Adam moments, the update (see the module docstring)


# ----------------------------------------------------------------------------------------- what is planned
@dataclasses.dataclass(frozen=True)
class Setup:
    """A config's step, ready to lower: the stage's Task, its abstract batch, optimizer, step and mesh rules."""

    config: ml_collections.ConfigDict
    task: Task
    batch: Callable[[int], PyTree]  # global batch size -> ShapeDtypeStructs of the batch
    step_cfg: StepConfig
    tx: object
    schedule: Callable
    rules: tuple
    notes: dict


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def text_context_shape(config) -> tuple[int, ...]:
    """(tokens, width) of the text encoder's states, from its config only (no weights); SDXL's pair: (tokens,
    summed width, pooled width)."""
    sec = build.section(config.model.get("text_encoder"))
    te = build.TextEncoderConfig.from_config(sec)
    if te.name == "minilm":
        return te.max_length, int(_json(os.path.join(hf_text.minilm_dir(), "config.json"))["hidden_size"])

    def read(path):
        d = _json(os.path.join(path, "config.json"))
        return d.get("text_config", d)

    d = read(te.path)
    tokens, width = int(d.get("max_position_embeddings", 77)), int(d["hidden_size"])
    if te.name != "sdxl":
        return tokens, width
    d2 = read(te.path_2)
    return tokens, width + int(d2["hidden_size"]), int(d2.get("projection_dim") or d2["hidden_size"])


def _diffusers_config(path: str, subfolder: str) -> dict:
    for folder in (path, os.path.join(path, subfolder)):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return _json(os.path.join(folder, "config.json"))
    raise ConfigError(f"no config.json in '{path}' or '{os.path.join(path, subfolder)}'")


def _vae_config(config):
    sec = build.section(config.model.get("vae"))
    if sec.get("pretrained"):
        return dconv.vae_config_from_diffusers(_diffusers_config(sec["pretrained"], "vae"))
    if sec.get("workdir"):
        if not is_workdir(sec["workdir"]):
            raise ConfigError(f"model.vae.workdir='{sec['workdir']}' is not a trained autoencoder workdir: to plan "
                              "with the model.vae preset instead, pass --config.model.vae.workdir=")
        return build.vae_config(read_config(sec["workdir"])["model"]["vae"])
    return build.vae_config(sec)


def _backbone_config(config, ctx_dim: int, latent_channels: int, pooled_dim: int | None = None):
    """The denoiser's config, from a pretrained folder's config.json alone (no weights read) or the preset."""
    sec = build.backbone_section(config.model)
    options = build.compute_options(config)
    if sec.get("pretrained"):
        name = build.backbone(config.model)
        if name == "unet" and not is_workdir(sec["pretrained"]):
            return dconv.unet_config_from_diffusers(_diffusers_config(sec["pretrained"], "unet")).replace(**options)
        cfg, _ = build.pretrained_backbone(config.model, context_dim=ctx_dim, latent_channels=latent_channels,
                                           pooled_dim=pooled_dim)
        return cfg.replace(**options)
    return build.backbone_config(config.model, context_dim=ctx_dim, latent_channels=latent_channels,
                                 pooled_dim=pooled_dim, **options)


def ldm_task(config, context: tuple[int, ...] | None = None) -> tuple[Task, Callable[[int], PyTree], dict]:
    """The latent-diffusion step on latent-cache batches: the stage's own loss (``training.ldm.noised_loss``)
    as it runs with ``data.latent_cache``. `context`: (tokens, width[, pooled width]) of the text; an SDXL
    text_time U-Net also gets the pooled text and 6 micro-conditioning numbers, as the stage feeds it."""
    ctx_len, ctx_dim, *rest = context or text_context_shape(config)
    pooled_dim = rest[0] if rest else None
    vae_cfg = _vae_config(config)
    side, f = int(config.data.resolution), vae_cfg.downsample_factor
    if side % f:
        raise ConfigError(f"data.resolution={side} is not a multiple of the VAE's factor {f}")
    latent_shape = (side // f, side // f, vae_cfg.latent_channels)
    net_cfg = _backbone_config(config, ctx_dim, vae_cfg.latent_channels, pooled_dim)
    net = backbones.network(net_cfg)
    dc = build.diffusion_config(config.diffusion)
    schedule = dc.make_schedule()
    if getattr(net_cfg, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + 6 time ids
        pooled_dim = net_cfg.projection_class_embeddings_input_dim - 6 * net_cfg.addition_time_embed_dim
    else:
        pooled_dim = None

    def init(rng):
        x = jnp.zeros((1, *latent_shape), jnp.float32)
        pooled = jnp.zeros((1, pooled_dim)) if pooled_dim else None
        ctx = training_context(jnp.zeros((1, ctx_len, ctx_dim), jnp.float32), pooled, x, f)
        added = {"added": ctx["added"]} if pooled_dim else {}
        return net.init(rng, x, jnp.zeros((1,)), ctx["text"] if pooled_dim else ctx, **added)["params"]

    def loss_fn(params, batch, rng, step, *, frozen, extra):
        del step, frozen, extra
        r_lat, r_t, r_noise = jax.random.split(rng, 3)
        latents = jax.lax.stop_gradient(cached_latents(batch, r_lat, vae_cfg))
        denoiser = Denoiser(params, schedule, net, dc.precondition, dc.sigma_data, dc.network_input)
        ctx = training_context(batch["text_embedding"], batch.get("text_pooled"), latents, f)
        per_example, t = noised_loss(denoiser, latents, ctx, r_t, r_noise, schedule, dc)
        return jnp.mean(per_example), {"mse_t_mean": jnp.mean(t)}

    def batch(n: int):
        lat = jax.ShapeDtypeStruct((n, *latent_shape), jnp.float32)
        out = {"latent_mean": lat, "latent_std": lat,
               "text_embedding": jax.ShapeDtypeStruct((n, ctx_len, ctx_dim), jnp.float32)}
        if pooled_dim:
            out["text_pooled"] = jax.ShapeDtypeStruct((n, pooled_dim), jnp.float32)
        return out

    task = Task(name="ldm", init=init, loss_fn=loss_fn, make_iterator=None, batch_size=int(config.data.batch_size))
    notes = {"latent_shape": list(latent_shape), "context_shape": [ctx_len, ctx_dim],
             "step": "latent-cache batches: the frozen VAE and text encoder run outside the step"}
    return task, batch, notes


def _other_task(config) -> tuple[Task, Callable[[int], PyTree], dict]:
    stage = str(config.train.stage)
    side = int(config.data.resolution)
    if stage == "toy":
        from ldm_jax.training import toy

        shape = (side, side, 3)
        return toy.make_task(config), lambda n: {k: jax.ShapeDtypeStruct((n, *shape), jnp.float32)
                                                 for k in ("x", "y")}, {}
    if stage == "autoencoder":
        from ldm_jax.data import DataConfig
        from ldm_jax.training import autoencoder

        quiet = config.copy_and_resolve_references()
        quiet.sample.every_steps, quiet.eval.every_steps = 0, 0  # no grids or metrics: they read data
        task, _ = autoencoder.make_task(quiet, "")
        shape = (side, side, DataConfig.from_run_config(config, caption_dropout=0.0).channels)
        return task, lambda n: {"image": jax.ShapeDtypeStruct((n, *shape), jnp.float32)}, {}
    raise ConfigError(f"train.stage='{stage}': the planner knows the stages ldm, autoencoder and toy")


def make_setup(config, *, context: tuple[int, ...] | None = None) -> Setup:
    """The `Setup` of `config` (``config.train.remat`` and ``config.data.batch_size`` as they are)."""
    if str(config.train.stage) == "ldm":
        task, batch, notes = ldm_task(config, context)
    else:
        task, batch, notes = _other_task(config)
    step_cfg = StepConfig.from_config(config.train)
    tx, schedule = make_optimizer(OptimizerConfig.from_config(config.optimizer), int(config.train.num_steps))
    return Setup(config, task, batch, step_cfg, tx, schedule, shd.logical_rules(config.mesh.get("rules")), notes)


def _init_state(task: Task, tx, rng):
    init_rng, train_rng, extra_rng = jax.random.split(rng, 3)
    extra = task.init_extra(extra_rng) if task.init_extra is not None else None
    return create_state(task.init(init_rng), tx, train_rng, extra)


_RNG = jax.ShapeDtypeStruct((2,), jnp.uint32)


def abstract_state(setup: Setup, mesh) -> PyTree:
    """The sharded abstract `TrainState` on `mesh` (a Mesh or an AbstractMesh): nothing is allocated."""
    return shd.sharded_abstract(functools.partial(_init_state, setup.task, setup.tx), mesh, setup.rules, _RNG)[0]


def abstract_frozen(setup: Setup, mesh) -> PyTree:
    frozen = setup.task.frozen
    if frozen is None:
        return None
    abstract = jax.eval_shape(lambda: frozen)
    shardings = shd.shardings_for(abstract, mesh, setup.rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(abstract),
                        shardings)


# ------------------------------------------------------------------------------------------- exact bytes
def shard_bytes(tree: PyTree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the most loaded device)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_mesh(data: int, fsdp: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp), shd.MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def state_bytes(setup: Setup, mesh) -> dict:
    """Exact per-device bytes of the training state's parts, the frozen arrays and one example of the batch."""
    state = abstract_state(setup, mesh)
    params = shard_bytes(state.params)
    out = {"params": params, "optimizer": shard_bytes(state.opt_state), "ema": shard_bytes(state.ema_params),
           "extra": shard_bytes(state.extra), "frozen": shard_bytes(abstract_frozen(setup, mesh))}
    out["gradients"] = params  # the gradient has the parameters' shapes, dtype and sharding
    out["counters"] = shard_bytes(state) - out["params"] - out["optimizer"] - out["ema"] - out["extra"]
    out["param_count"] = int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params)))
    out["param_bytes_global"] = int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                                        for x in jax.tree.leaves(state.params)))
    out["batch_per_example"] = int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
                                       for x in jax.tree.leaves(setup.batch(1))))
    return out


# -------------------------------------------------------------------------------------- compiled programs
def _batch_on(setup: Setup, mesh, n: int) -> PyTree:
    sharding = shd.batch_sharding(mesh)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), setup.batch(n))


def lower_step(setup: Setup, mesh, global_batch: int, *, grads_only: bool = False):
    """The lowered train step (or only its loss-and-gradient part) of `global_batch` examples on `mesh`, with the
    training loop's shardings and donation."""
    state, frozen = abstract_state(setup, mesh), abstract_frozen(setup, mesh)
    batch = _batch_on(setup, mesh, global_batch)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    in_shardings = (shardings, jax.tree.map(lambda x: x.sharding, batch), jax.tree.map(lambda x: x.sharding, frozen))
    if grads_only:
        def loss_grads(state, batch, frozen):
            rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)  # as the train step draws it
            return loss_and_grads(setup.task, state.params, batch, rng, state.step, frozen=frozen, extra=state.extra,
                                  dtype=setup.step_cfg.dtype)

        jitted = jax.jit(loss_grads, in_shardings=in_shardings)
    else:
        step = make_train_step(setup.task, setup.tx, setup.schedule, setup.step_cfg)
        jitted = jax.jit(step, in_shardings=in_shardings, out_shardings=(shardings, NamedSharding(mesh, P())),
                         donate_argnums=(0,))
    with jax.set_mesh(mesh), nn.logical_axis_rules(setup.rules):
        return jitted.lower(state, batch, frozen)


def flops_of(analysed) -> float:
    """FLOPs from a lowered (whole program) or compiled (per device) program's cost analysis; nan if none."""
    cost = analysed.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def memory_of(compiled) -> dict:
    """XLA's per-device memory analysis: arguments, outputs, aliased, temporaries and the total
    (arguments + outputs - aliased + temporaries)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "alias", "temp")}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def calibration_mesh(data: int, fsdp: int, available: int) -> tuple[int, int]:
    """The largest sub-mesh of (data, fsdp) that `available` devices hold, keeping as much of fsdp as fits."""
    n = math.gcd(data * fsdp, max(available, 1))
    f = math.gcd(fsdp, n)
    return n // f, f


def calibration_batches(micro_batch: int) -> tuple[int, int]:
    """Per-device batches of the calibration: (b / 2, b) at the planned micro-batch b, (1, 2) for b = 1."""
    return (micro_batch // 2, micro_batch) if micro_batch >= 2 else (1, 2)


def residual_bytes(setup: Setup, batch: int) -> int:
    """Bytes of the residuals ``jax.vjp`` keeps from the forward pass for the backward pass (the step's loss on
    `batch` examples, abstract: nothing is compiled): the activations before XLA's own scheduling and fusion."""
    params = nn.meta.unbox(jax.eval_shape(setup.task.init, _RNG))
    extra = jax.eval_shape(setup.task.init_extra, _RNG) if setup.task.init_extra is not None else None
    frozen = jax.eval_shape(lambda: setup.task.frozen)

    def backward(params, batch, frozen, extra):
        def loss(p):
            p = optim.cast_floating(p, setup.step_cfg.dtype)
            return setup.task.loss_fn(p, batch, jax.random.key_data(jax.random.key(0)), jnp.int32(0),
                                      frozen=frozen, extra=extra)[0]

        return jax.vjp(loss, params)[1]

    leaves = jax.tree.leaves(jax.eval_shape(backward, params, setup.batch(batch), frozen, extra))
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in leaves)


def calibrate(setup: Setup, batches: tuple[int, int], mesh_shape: tuple[int, int] = (1, 1)) -> dict:
    """Per-device activation bytes per example (and the batch-independent part) from the loss-and-gradient
    program compiled on a (data, fsdp) = `mesh_shape` mesh of this platform's devices at per-device batches
    `batches`; FLOPs per example and of the update from the lowered programs at batch 1 on one device (a cost
    analysis counts a loop body once, so programs that loop over the batch, like XLA:CPU's chunked attention,
    must be counted where they do not loop); the residuals jax keeps per example, for comparison."""
    b1, b2 = batches
    if not 0 < b1 < b2:
        raise ConfigError(f"calibration batches {batches}: need 0 < b1 < b2")
    data, fsdp = mesh_shape
    n = data * fsdp
    mesh = shd.make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[:n])
    temp, start = {}, time.perf_counter()
    for b in (b1, b2):
        temp[b] = memory_of(lower_step(setup, mesh, n * b, grads_only=True).compile()).get("temp", float("nan"))
    seconds = time.perf_counter() - start
    one = shd.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    per_example = flops_of(lower_step(setup, one, 1, grads_only=True))
    act = (temp[b2] - temp[b1]) / (b2 - b1)
    return {"mesh": {"data": data, "fsdp": fsdp}, "batches_per_device": [b1, b2], "temp": [temp[b1], temp[b2]],
            "activation_bytes_per_example": act, "activation_bytes_fixed": temp[b1] - act * b1,
            "flops_per_example": per_example, "flops_update": flops_of(lower_step(setup, one, 1)) - per_example,
            "residual_bytes_per_example": (residual_bytes(setup, b2) - residual_bytes(setup, b1)) / (b2 - b1),
            "compile_s": round(seconds, 1), "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind}


def compile_real(setup: Setup, data: int, fsdp: int, global_batch: int) -> dict:
    """XLA's analyses of the real sharded train step on data x fsdp devices of this platform: per-device memory,
    the whole program's FLOPs (lowered) and one device's (compiled)."""
    mesh = shd.make_mesh({"data": data, "fsdp": fsdp}, jax.devices()[:data * fsdp])
    start = time.perf_counter()
    lowered = lower_step(setup, mesh, global_batch)
    compiled = lowered.compile()
    return {**memory_of(compiled), "flops_global": flops_of(lowered), "flops_per_device": flops_of(compiled),
            "compile_s": round(time.perf_counter() - start, 1), "platform": jax.devices()[0].platform}


# ------------------------------------------------------------------------------------------------ the model
def memory_model(sb: dict, cal: dict, per_device_batch: int, grad_accum: int) -> dict:
    """Per-device bytes of one step (module docstring): exact state and batch, modelled temporaries."""
    micro = per_device_batch / grad_accum
    grads, full = sb["gradients"], sb["param_bytes_global"]
    act = max(cal["activation_bytes_fixed"] + cal["activation_bytes_per_example"] * micro, 0.0)
    accum = grads if grad_accum > 1 else 0
    update, backward = UPDATE_BUFFERS * grads, full + accum + act
    out = {"params": sb["params"], "gradients": grads, "optimizer": sb["optimizer"], "ema": sb["ema"],
           "extra": sb["extra"], "counters": sb["counters"], "frozen": sb["frozen"],
           "batch": sb["batch_per_example"] * per_device_batch, "activations": act, "full_gradients": full,
           "grad_accumulator": accum, "update_temporaries": update, "temp": max(update, backward)}
    out["total"] = _fixed(sb) + out["batch"] + out["temp"]
    return {k: int(round(v)) for k, v in out.items()}


def _fixed(sb: dict) -> int:
    return sum(sb[k] for k in ("params", "optimizer", "ema", "extra", "counters", "frozen"))


def largest_batch(sb: dict, cal: dict, hbm_bytes: float, grad_accum: int, offset: float = 0.0) -> int:
    """The largest per-device batch (a multiple of `grad_accum`) whose modelled total (+ `offset`, e.g. the
    compiled program's excess over the model) fits `hbm_bytes`."""
    grads, per_ex = sb["gradients"], sb["batch_per_example"]
    s, c = cal["activation_bytes_per_example"] / grad_accum, cal["activation_bytes_fixed"]
    fixed_backward = sb["param_bytes_global"] + (grads if grad_accum > 1 else 0) + c
    room_update = hbm_bytes - offset - _fixed(sb) - UPDATE_BUFFERS * grads
    room_backward = hbm_bytes - offset - _fixed(sb) - fixed_backward
    if room_update < 0 or room_backward < 0 or per_ex + s <= 0:
        return 0
    best = room_backward / (per_ex + s)
    if per_ex > 0:
        best = min(best, room_update / per_ex)
    return int(best // grad_accum) * grad_accum


def flops_model(cal: dict, per_device_batch: int, global_batch: int, fsdp: int) -> dict:
    """FLOPs of one step: the whole program's and one device's (the update runs on each parameter shard)."""
    return {"per_device": cal["flops_per_example"] * per_device_batch + cal["flops_update"] / fsdp,
            "global": cal["flops_per_example"] * global_batch + cal["flops_update"],
            "per_example": cal["flops_per_example"], "update": cal["flops_update"]}


# ------------------------------------------------------------------------------------------------- plan()
def resolve_mesh(config, devices: int, mesh: dict | None) -> tuple[int, int]:
    """(data, fsdp) for `devices` devices from `mesh` ({"data": d, "fsdp": f}; one of them may be -1 or left out),
    by default the config's ``mesh.fsdp`` with data over the remaining devices."""
    if mesh is None:
        fsdp = int(config.mesh.fsdp)
        mesh = {"data": 1, "fsdp": devices} if fsdp == -1 else {"data": -1, "fsdp": fsdp}
    unknown = sorted(set(mesh) - set(shd.MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh axis '{unknown[0]}' is unknown: the mesh axes are {shd.MESH_AXES}")
    data, fsdp = shd.mesh_shape(mesh.get("data", -1 if "fsdp" in mesh else 1), mesh.get("fsdp", 1), devices)
    if data * fsdp != devices:
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} uses {data * fsdp} of the {devices} devices: give sizes "
                          "whose product is the device count (or -1 for one of them)")
    return data, fsdp


def _override(config, **changes) -> ml_collections.ConfigDict:
    out = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in changes.items():
        section, key = dotted.split(".")
        out[section][key] = value
    return out


def plan_variant(config, *, data: int, fsdp: int, remat: bool, hbm_bytes: float, context=None,
                 calibration_devices: int | None = None, batches: tuple[int, int] | None = None) -> dict:
    """Calibration, memory, FLOPs and largest batch of `config` with ``train.remat = remat`` on a data x fsdp mesh."""
    setup = make_setup(_override(config, **{"train.remat": remat}), context=context)
    devices, global_batch = data * fsdp, int(config.data.batch_size)
    grad_accum = setup.step_cfg.grad_accum
    per_device = global_batch // devices
    available = len(jax.devices()) if calibration_devices is None else min(calibration_devices, len(jax.devices()))
    cal = calibrate(setup, batches or calibration_batches(per_device // grad_accum),
                    calibration_mesh(data, fsdp, available))
    sb = state_bytes(setup, abstract_mesh(data, fsdp))
    return {"setup": setup, "state_bytes": sb, "calibration": cal,
            "memory": memory_model(sb, cal, per_device, grad_accum),
            "largest_batch_per_device": largest_batch(sb, cal, hbm_bytes, grad_accum),
            "flops": flops_model(cal, per_device, global_batch, fsdp)}


def plan(config, *, devices: int, mesh: dict | None = None, batch_size: int | None = None,
         hbm_gib: float | None = None, remat: bool | None = None, context: tuple[int, int] | None = None,
         measure: bool | None = None, compare_remat: bool = True, calibration_devices: int | None = None) -> dict:
    """Per-device memory and FLOPs of `config`'s train step on `devices` devices (module docstring).

    mesh: {"data": d, "fsdp": f} (default: the config's fsdp size, data over the rest); batch_size: the global
    batch (default ``data.batch_size``); hbm_gib: device memory for the largest batch (default 80); remat: the
    setting the figures are for (default ``train.remat``); compare_remat: also plan the other remat setting;
    context: (tokens, width) of the text states instead of the text encoder's; measure: also compile the real
    sharded step (default: when this platform has `devices` devices); calibration_devices: calibrate on at most
    this many devices (default: as many of the mesh as exist). Returns a JSON-serialisable dict; bytes are per
    device.
    """
    if devices < 1:
        raise ConfigError(f"devices={devices} must be >= 1")
    if batch_size is not None:
        config = _override(config, **{"data.batch_size": int(batch_size)})
    data, fsdp = resolve_mesh(config, devices, mesh)
    global_batch, hbm = int(config.data.batch_size), float(80.0 if hbm_gib is None else hbm_gib)
    grad_accum = StepConfig.from_config(config.train).grad_accum
    if global_batch < 1 or global_batch % (devices * grad_accum):
        raise ConfigError(f"batch size {global_batch} must be a positive multiple of {devices} devices x "
                          f"train.grad_accum={grad_accum}")
    if measure and devices > len(jax.devices()):
        raise ConfigError(f"cannot compile for {devices} devices: this platform has {len(jax.devices())} (host CPU "
                          "devices: set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts, as "
                          "`ldm-jax plan` does)")
    chosen = bool(config.train.remat) if remat is None else bool(remat)
    settings = (chosen, not chosen) if compare_remat else (chosen,)
    variants = {}
    for on in settings:
        variants["remat" if on else "no_remat"] = plan_variant(
            config, data=data, fsdp=fsdp, remat=on, hbm_bytes=hbm * GIB, context=context,
            calibration_devices=calibration_devices)
    main = variants["remat" if chosen else "no_remat"]
    setup, sb = main["setup"], main["state_bytes"]
    measured, total, source = None, main["memory"]["total"], "modelled"
    if measure or (measure is None and devices <= len(jax.devices())):
        measured = compile_real(setup, data, fsdp, global_batch)
        measured["total_model_over_compiled"] = main["memory"]["total"] / measured["total"]
        measured["flops_global_model_over_lowered"] = main["flops"]["global"] / measured["flops_global"]
        measured["flops_per_device_model_over_compiled"] = main["flops"]["per_device"] / measured["flops_per_device"]
        # the program's own figure wins; the largest batch extrapolates from it with the calibrated slope
        total, source = measured["total"], "compiled"
        main["largest_batch_per_device"] = largest_batch(sb, main["calibration"], hbm * GIB, grad_accum,
                                                         offset=total - main["memory"]["total"])
    public = ("calibration", "memory", "largest_batch_per_device", "flops")
    return {
        "stage": setup.task.name, "devices": devices, "mesh": {"data": data, "fsdp": fsdp},
        "global_batch": global_batch, "per_device_batch": global_batch // devices, "grad_accum": grad_accum,
        "dtype": setup.step_cfg.dtype, "remat": chosen, "hbm_gib": hbm, "param_count": sb["param_count"],
        "notes": setup.notes, "total_bytes": total, "total_source": source, "memory": main["memory"],
        "flops": main["flops"], "largest_batch_per_device": main["largest_batch_per_device"],
        "largest_global_batch": main["largest_batch_per_device"] * devices,
        "variants": {name: {k: v[k] for k in public} for name, v in variants.items()},
        "measured": measured, "sources": SOURCES,
    }


SOURCES = {
    "exact": "params, gradients, optimizer, ema, extra, counters, frozen, batch: bytes of each array's shard in the "
             "sharded abstract state and batch on the mesh",
    "calibrated": "activations per example and fixed: the loss-and-gradient program compiled at two per-device "
                  "batches on `calibration.mesh` devices of `calibration.platform`; FLOPs per example and of the "
                  "update: the lowered programs at batch 1 on one device",
    "modelled": "temp = max(4 x gradients [update], whole gradient + accumulator + activations [backward]); "
                "total = state + frozen + batch + temp; FLOPs per device = per example x batch + update / fsdp",
    "measured": "XLA's memory analysis and cost analysis of the real sharded step, when its devices exist here",
}
