"""CPU benchmark: the same SD-style U-Net in ldm_jax (jit) and in diffusers' UNet2DConditionModel (PyTorch), on
this machine's cores, with ldm_jax's weights exported to diffusers so both compute the same function (checked).

    python experiments/benchmarks/unet_cpu.py                      # everything -> experiments/benchmarks/unet_cpu.json
    python experiments/benchmarks/unet_cpu.py --quick              # smoke run: few iterations, 5 sampling steps
    python experiments/benchmarks/unet_cpu.py --parts=unet --jax_variants=jit,no_ynn,split2

Parts (each writes one JSON line per finished measurement to <out>.partial.jsonl, so a killed run keeps them):
  unet     training step (eps-MSE at uniform random t, backward, AdamW) at batch 16 and 64, one forward at batch
           16, and a 50-step DDIM loop with classifier-free guidance (7.5) at batch 16 and 64: JAX = the whole
           loop in one jit (`diffusion.sample` over `diffusion.cfg`), PyTorch = diffusers' DDIMScheduler loop in
           eager mode and under torch.compile. Frameworks alternate call by call (JAX, torch eager, torch
           compiled, JAX, ...), so a change in background load hits all of them alike.
  sharded  the JAX measurements with the batch split over 2 host devices (a data-parallel mesh; runs in a child
           process started with XLA_FLAGS=--xla_force_host_platform_device_count=2).
  vae      autoencoder encode / decode throughput (images/s): the tiny VAE at 32x32 and the SD VAE at 256x256,
           batch 1 and 2, JAX and diffusers' AutoencoderKL with the same weights.

Threads: torch.set_num_threads(<cores>) and XLA's default pool (one thread per core). Ratios are torch time /
JAX time, so > 1 means ldm_jax is faster. FLOPs per call come from the compiled XLA program's cost analysis;
the fraction of peak divides FLOP/s by cores x clock x FP32 FLOP/cycle derived from /proc/cpuinfo (`cpu_peak`).
JAX variants (`--jax_variants`): `jit` (defaults), `no_ynn` (XLA compile option
xla_cpu_experimental_ynn_fusion_type="": Eigen instead of YNNPACK for dots and convolution gradients),
`split2` (the batch computed as 2 independent halves inside one program, so XLA's executor runs them on
2 cores at once; sampling: the guided and unguided passes as two calls, `cfg(..., batched=False)`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import numpy as np
from bench_log import PARTIAL
from bench_log import emit as _emit
from bench_log import phase as _phase

# XLA's own CPU defaults for the `jit` variant (set before ldm_jax is imported); `no_ynn` is what `import ldm_jax`
# sets otherwise (ldm_jax/_xla_cpu.py)
os.environ.setdefault("LDM_JAX_XLA_CPU_DEFAULTS", "0")
from ldm_jax._xla_cpu import COMPILE_OPTIONS as LDM_JAX_OPTIONS  # noqa: E402

# The benchmark U-Net: SD 1.x layout (attention at the two upper levels, 1x1-conv projections, a plain lowest
# level), scaled down to ~5.3M parameters; 16x16x4 latents, cross-attention to 77 tokens of width 768.
BENCH_UNET = dict(block_out_channels=(32, 64, 128), layers_per_block=2, attention_levels=(True, True, False),
                  head_dim=32, cross_attention_dim=768, sample_size=16, zero_init=False)
LATENT, CONTEXT_LEN, GUIDANCE = 16, 77, 7.5
PARITY_TOL = 1e-3
_YNN = "xla_cpu_experimental_ynn_fusion_type"
VARIANTS = {  # name -> (XLA compile options, batch split, cfg batched)
    "jit": ({}, 1, True),
    "no_ynn": (LDM_JAX_OPTIONS, 1, True),
    "split2": ({}, 2, False),
    "split2_no_ynn": (LDM_JAX_OPTIONS, 2, False),
    # single-threaded Eigen kernels: with the batch over 2 host devices, one core per device
    "no_ynn_st": ({**LDM_JAX_OPTIONS, "xla_cpu_multi_thread_eigen": False}, 1, True),
    # probes of single XLA:CPU options (xla_cpu_profile.py)
    "ynn_conv": ({_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}, 1, True),
    "ynn_dot": ({_YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}, 1, True),
    "onednn": ({"xla_cpu_use_onednn": True}, 1, True),
    "concurrency_sched": ({"xla_cpu_enable_concurrency_optimized_scheduler": True}, 1, True),
}


def _stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def race(fns: dict, warmup: int, iters: int) -> dict:
    """Times each zero-argument callable (which must block until its result is ready) `iters` times, taking
    turns call by call after `warmup` untimed calls each; returns {name: stats}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: _stats(t) for name, t in times.items()}


# ------------------------------------------------------------------------------------------------ machine
def cpu_peak(cores: int) -> dict:
    """FP32 peak FLOP/s of `cores` cores from /proc/cpuinfo: cores x clock x FLOP/cycle.

    FLOP/cycle per core = FMA units x lanes x 2; lanes = 16 (AVX-512) or 8 (AVX2) for fp32. Assumed: two FMA
    units per core (Intel Skylake-SP and later server parts, AMD Zen 2-4); AMD cores execute AVX-512 on 256-bit
    units, so they count as 8 lanes. The clock is the one /proc/cpuinfo reports (the nominal clock under KVM);
    turbo can exceed it, so a "fraction of peak" can overstate utilisation slightly.
    """
    info = open("/proc/cpuinfo").read()
    field = lambda key: (re.search(rf"^{key}\s*:\s*(.*)$", info, re.M) or [None, ""])[1].strip()
    flags, vendor = set(field("flags").split()), field("vendor_id")
    if "avx512f" in flags and vendor != "AuthenticAMD":
        isa, lanes = "AVX-512 FMA", 16
    elif "avx2" in flags and "fma" in flags:
        isa, lanes = "AVX2 FMA" + (" (AVX-512 on 256-bit units)" if "avx512f" in flags else ""), 8
    else:
        isa, lanes = "SSE (no FMA)", 4
    ghz = float(field("cpu MHz") or "nan") / 1000
    per_cycle = 2 * lanes * 2
    return {"model": field("model name"), "vendor": vendor, "cores_used": cores, "ghz": ghz, "isa": isa,
            "fp32_flop_per_cycle_per_core": per_cycle, "peak_flops": cores * ghz * 1e9 * per_cycle,
            "assumption": "2 FMA units per core; clock = /proc/cpuinfo 'cpu MHz'"}


def measured_matmul(torch) -> dict:
    """The best fp32 matmul rate each framework reaches here (2048^3, median of 5): a practical roof."""
    import jax
    import jax.numpy as jnp

    n, flops = 2048, 2 * 2048**3
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(jnp.dot)
    ta = torch.ones(n, n)
    r = race({"jax": lambda: mm(a, a).block_until_ready(), "torch": lambda: torch.mm(ta, ta)}, 1, 5)
    return {k: flops / v["median_s"] for k, v in r.items()}


# ----------------------------------------------------------------------------------------------------- JAX
def jax_model(seed: int = 0):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ldm_jax.models.unet import UNet, UNetConfig

    cfg = UNetConfig(**BENCH_UNET)
    unet = UNet(cfg)
    init = lambda k: unet.init(k, jnp.zeros((1, LATENT, LATENT, 4)), jnp.zeros((1,)),
                               jnp.zeros((1, CONTEXT_LEN, cfg.cross_attention_dim)))["params"]
    params = nn.unbox(jax.jit(init)(jax.random.key(seed)))
    return cfg, unet, params


def _split_apply(fn, k: int):
    """fn over k contiguous slices of the batch (axis 0 of every argument), concatenated: k separate chains of
    ops in one program, which XLA's CPU executor runs concurrently (its kernels for these small convolutions
    and matmuls are single-threaded)."""
    import jax.numpy as jnp

    if k == 1:
        return fn

    def split(*args):
        n = args[0].shape[0] // k
        return jnp.concatenate([fn(*(a[i * n:(i + 1) * n] for a in args)) for i in range(k)], axis=0)

    return split


def jax_fns(unet, schedule, split: int, batched_cfg: bool, num_steps: int):
    """The three benchmarked programs as plain functions: train step, forward, guided DDIM loop."""
    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax import diffusion

    tx = optax.adamw(1e-4, weight_decay=0.01)

    def loss_fn(p, x0, ctx, rng):
        k1, k2 = jax.random.split(rng)
        t = jax.random.uniform(k1, (x0.shape[0],))
        noise = jax.random.normal(k2, x0.shape)
        xt = diffusion.q_sample(schedule, x0, t, noise)
        apply = _split_apply(lambda xt, tt, c: unet.apply({"params": p}, xt, tt, c), split)
        return jnp.mean((apply(xt, schedule.timestep(t), ctx) - noise) ** 2)

    def train(p, o, x0, ctx, rng):
        loss, g = jax.value_and_grad(loss_fn)(p, x0, ctx, rng)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    def forward(p, x, t, ctx):
        return _split_apply(lambda x, t, c: unet.apply({"params": p}, x, t, c), split)(x, t, ctx)

    def model_fn(p, x, t, ctx):  # network in the framework's time t in [0, 1]
        return unet.apply({"params": p}, x, schedule.timestep(t), ctx)

    def sample(p, noise, ctx, uctx):
        guided = diffusion.cfg(jax.tree_util.Partial(model_fn, p), ctx, uctx, GUIDANCE, batched=batched_cfg)
        return diffusion.sample(guided, noise, schedule=schedule, prediction="eps", sampler="ddim",
                                num_steps=num_steps, spacing="leading", final="sigma_min")

    return tx, train, forward, sample


def lowered_flops(fn, args) -> float:
    """FLOPs per call from the cost analysis of the lowered program (no compile), with the CPU attention's batch
    chunking off: the analysis counts a while loop's body once, so a chunked attention would be undercounted."""
    import jax

    from ldm_jax.models import attention

    saved, attention.CPU_SCORE_BYTES = attention.CPU_SCORE_BYTES, 1 << 62
    try:
        cost = jax.jit(lambda *a: fn(*a)).lower(*args).cost_analysis()  # a fresh trace, not the cached one
    finally:
        attention.CPU_SCORE_BYTES = saved
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))


def _compile(fn, args, options, shardings=None, donate=()):
    """jit + lower + compile with XLA compile options; returns (compiled, seconds, flops per call)."""
    import jax

    kw = {} if shardings is None else dict(in_shardings=shardings[0], out_shardings=shardings[1])
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate, **kw).lower(*args).compile(compiler_options=options or None)
    seconds = time.perf_counter() - t0
    return compiled, seconds, lowered_flops(fn, args)


def _mesh_shardings(mesh):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    if mesh is None:
        return None, None
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def jax_cases(unet, params, schedule, variant: str, args, mesh=None) -> dict:
    """{(case, batch): (zero-arg blocking callable, info)} for one JAX variant; compiles everything first."""
    import jax

    options, split, batched_cfg = VARIANTS[variant]
    tx, train, forward, sample = jax_fns(unet, schedule, split, batched_cfg, args.steps)
    rep, data = _mesh_shardings(mesh)
    put = (lambda a, s: a) if mesh is None else jax.device_put
    ctx_dim, out = unet.config.cross_attention_dim, {}
    key = jax.random.key(1)
    for b in args.train_batches:
        x0 = put(jax.random.normal(key, (b, LATENT, LATENT, 4)), data)
        ctx = put(jax.random.normal(key, (b, CONTEXT_LEN, ctx_dim)), data)
        p, o = put(jax.tree.map(lambda a: a.copy(), params), rep), put(jax.jit(tx.init)(params), rep)
        shard = None if mesh is None else ((rep, rep, data, data, rep), (rep, rep, rep))
        fn, secs, flops = _compile(train, (p, o, x0, ctx, key), options, shard, donate=(0, 1))
        state = {"p": p, "o": o}

        def step(fn=fn, state=state, x0=x0, ctx=ctx):
            state["p"], state["o"], loss = fn(state["p"], state["o"], x0, ctx, key)
            loss.block_until_ready()

        step.compiled = fn  # the executable, for its HLO text (xla_cpu_profile.py)
        out[("train", b)] = (step, {"compile_s": secs, "flops": flops})
    for b in args.forward_batches:
        x = put(jax.random.normal(key, (b, LATENT, LATENT, 4)), data)
        t = put(jax.numpy.linspace(1.0, 999.0, b), data)
        ctx = put(jax.random.normal(key, (b, CONTEXT_LEN, ctx_dim)), data)
        shard = None if mesh is None else ((rep, data, data, data), data)
        fn, secs, flops = _compile(forward, (params, x, t, ctx), options, shard)
        out[("forward", b)] = (lambda fn=fn, a=(params, x, t, ctx): fn(*a).block_until_ready(),
                               {"compile_s": secs, "flops": flops})
    for b in args.sample_batches:
        noise = put(jax.random.normal(key, (b, LATENT, LATENT, 4)), data)
        ctx = put(jax.random.normal(key, (b, CONTEXT_LEN, ctx_dim)), data)
        uctx = put(jax.random.normal(jax.random.key(2), (b, CONTEXT_LEN, ctx_dim)), data)
        shard = None if mesh is None else ((rep, data, data, data), data)
        fn, secs, flops = _compile(sample, (params, noise, ctx, uctx), options, shard)
        out[("sample", b)] = (lambda fn=fn, a=(params, noise, ctx, uctx): fn(*a).block_until_ready(),
                              {"compile_s": secs, "flops_cost_analysis": flops})
    return out


def sample_step_flops(unet, params, schedule, batch: int, batched_cfg: bool = True) -> float:
    """FLOPs of one guided denoiser call (2 U-Net passes over `batch`) from the lowered program (no compile):
    the compiled loop's cost analysis counts a while loop's body once, not num_steps times."""
    import jax
    import jax.numpy as jnp

    from ldm_jax import diffusion

    def step(p, x, t, c, u):
        fn = jax.tree_util.Partial(lambda p, x, t, c: unet.apply({"params": p}, x, schedule.timestep(t), c), p)
        return diffusion.cfg(fn, c, u, GUIDANCE, batched=batched_cfg)(x, t)

    x = jnp.zeros((batch, LATENT, LATENT, 4))
    c = jnp.zeros((batch, CONTEXT_LEN, unet.config.cross_attention_dim))
    return lowered_flops(step, (params, x, jnp.full((batch,), 0.5), c, c))


# --------------------------------------------------------------------------------------------------- torch
def torch_model(cfg, params):
    """diffusers UNet2DConditionModel carrying ldm_jax's weights (the package's own exporter)."""
    import torch
    from diffusers import UNet2DConditionModel

    from ldm_jax.convert import diffusers as dconv

    model = UNet2DConditionModel.from_config(dconv.unet_config_to_diffusers(cfg))
    state = {k: torch.from_numpy(np.array(v)) for k, v in dconv.unet_state_dict_from_params(params, cfg).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def torch_fns(model, torch):
    """Train step / forward / guided DDIM loop for one torch module (eager or compiled); returns a factory
    {case: make(batch) -> zero-arg callable}."""
    sched = _ddim()
    acp = sched.alphas_cumprod
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    dim = model.config.cross_attention_dim

    def make_train(b):
        x0, ctx = torch.randn(b, 4, LATENT, LATENT), torch.randn(b, CONTEXT_LEN, dim)

        def step():
            noise, t = torch.randn_like(x0), torch.randint(0, 1000, (b,))
            a = acp[t].view(-1, 1, 1, 1)
            loss = torch.nn.functional.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, ctx).sample, noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    def make_forward(b):
        x, t, ctx = torch.randn(b, 4, LATENT, LATENT), torch.linspace(1, 999, b), torch.randn(b, CONTEXT_LEN, dim)
        return torch.no_grad()(lambda: model(x, t, ctx).sample)

    def make_sample(b, steps, inputs=None):
        noise, ctx, uctx = inputs or (torch.randn(b, 4, LATENT, LATENT), torch.randn(b, CONTEXT_LEN, dim),
                                      torch.randn(b, CONTEXT_LEN, dim))
        both = torch.cat([ctx, uctx])

        @torch.no_grad()
        def loop():
            sched.set_timesteps(steps)
            x = noise
            for t in sched.timesteps:
                c, u = model(torch.cat([x, x]), t, both).sample.chunk(2)
                x = sched.step(u + GUIDANCE * (c - u), t, x).prev_sample
            return x

        return loop

    return {"train": make_train, "forward": make_forward, "sample": make_sample}


# -------------------------------------------------------------------------------------------------- checks
def check_parity(unet, params, schedule, tmodel, torch, steps: int = 10) -> dict:
    """Max |JAX - torch| of one forward (batch 2) and of a guided DDIM loop (batch 1, `steps` steps) from
    the same inputs; raises SystemExit above PARITY_TOL (the two would not be computing the same function)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    dim = unet.config.cross_attention_dim
    x = rng.normal(size=(2, LATENT, LATENT, 4)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    ctx = rng.normal(size=(2, CONTEXT_LEN, dim)).astype(np.float32)
    got = np.asarray(jax.jit(lambda p, *a: unet.apply({"params": p}, *a))(params, x, t, ctx))
    with torch.no_grad():
        want = tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    fwd = float(np.max(np.abs(got - want.numpy().transpose(0, 2, 3, 1))))
    fwd_scale = float(np.max(np.abs(got)))
    _, _, _, sample = jax_fns(unet, schedule, 1, True, steps)
    noise, c, u = x[:1], ctx[:1], ctx[1:]
    got = np.asarray(jax.jit(sample)(params, jnp.asarray(noise), c, u))
    inputs = tuple(torch.from_numpy(a) for a in (noise.transpose(0, 3, 1, 2), c, u))
    want = torch_fns(tmodel, torch)["sample"](1, steps, inputs)()
    smp = float(np.max(np.abs(got - want.numpy().transpose(0, 2, 3, 1))))
    rec = {"forward_max_abs_diff": fwd, "forward_max_abs_out": fwd_scale,
           f"ddim{steps}_cfg_max_abs_diff": smp, "tolerance": PARITY_TOL}
    if not (fwd <= PARITY_TOL and smp <= PARITY_TOL):
        raise SystemExit(f"parity check failed: {rec}; the JAX and diffusers U-Nets differ, timings would be "
                         "meaningless (check ldm_jax/convert/diffusers.py)")
    return rec



# ------------------------------------------------------------------------------------------------- drivers
def _torch_callables(tmodel, torch, args) -> dict:
    """{mode: {(case, batch): callable}} for eager and (if requested) torch.compile'd copies of the model."""
    modes = {"torch_eager": tmodel}
    if args.torch_compile:
        modes["torch_compile"] = torch.compile(tmodel, dynamic=False)
    out = {}
    for mode, model in modes.items():
        make = torch_fns(model, torch)
        out[mode] = {("train", b): make["train"](b) for b in args.train_batches}
        out[mode].update({("forward", b): make["forward"](b) for b in args.forward_batches})
        out[mode].update({("sample", b): make["sample"](b, args.steps) for b in args.sample_batches})
    return out


def _first_call(fn) -> tuple[float | None, str | None]:
    """Runs fn once (torch.compile compiles here); returns (seconds, error message)."""
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as e:  # a backend that does not work on this machine is a result, not a crash
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
    return time.perf_counter() - t0, None


def time_case(case, jax_sets: dict, torch_sets: dict, flops: float, peak: float, args) -> list[dict]:
    """Races every JAX variant and torch mode on one (case, batch); returns one record per contestant plus
    ratios torch / JAX."""
    name, batch = case
    fns, recs = {}, {}
    for variant, cases in jax_sets.items():
        fns[variant] = cases[case][0]
        recs[variant] = {"framework": "jax", **cases[case][1]}
    for mode, cases in torch_sets.items():
        _phase(f"first call of {mode} on {name} batch {batch}" + (" (compiles)" if mode == "torch_compile" else ""))
        first, err = _first_call(cases[case])
        recs[mode] = {"framework": mode, "first_call_s": first}
        if err:
            recs[mode]["error"] = err
        else:
            fns[mode] = cases[case]
    _phase(f"timing {name} batch {batch}: {', '.join(fns)}")
    warmup, iters = (args.warmup, args.iters) if name != "sample" else (args.warmup_sample, args.iters_sample)
    for who, stats in race(fns, warmup, iters).items():
        recs[who].update(stats, flops=flops, images_per_s=batch / stats["median_s"],
                         fraction_of_peak=flops / stats["median_s"] / peak)
    out = []
    for who, rec in recs.items():
        rec.update(case=name, batch=batch, contestant=who)
        if rec["framework"] == "jax":
            for mode in torch_sets:
                if "median_s" in recs[mode]:
                    rec[f"ratio_{mode}"] = recs[mode]["median_s"] / rec["median_s"]
        _emit(rec)
        out.append(rec)
    return out


def part_unet(args, mesh=None, torch_too: bool = True) -> dict:
    import jax
    import torch

    from ldm_jax import diffusion

    torch.set_num_threads(args.threads)
    schedule = diffusion.get_schedule("scaled_linear")
    _phase("initialising the U-Net")
    cfg, unet, params = jax_model()
    res = {"unet_config": BENCH_UNET, "params": int(sum(a.size for a in jax.tree.leaves(params))),
           "latent": [LATENT, LATENT, 4], "context": [CONTEXT_LEN, cfg.cross_attention_dim],
           "peak": cpu_peak(args.threads), "runs": []}
    tsets = {}
    if torch_too:
        tmodel = torch_model(cfg, params)
        _phase("parity check")
        res["parity"] = check_parity(unet, params, schedule, tmodel, torch)
        _emit({"parity": res["parity"]})
        res["measured_matmul_flops"] = measured_matmul(torch)
        tsets = _torch_callables(tmodel, torch, args)
    jsets = {}
    for variant in args.jax_variants:
        _phase(f"compiling JAX variant {variant}")
        jsets[variant] = jax_cases(unet, params, schedule, variant, args, mesh)
    peak = res["peak"]["peak_flops"]
    for case in next(iter(jsets.values())):
        info = jsets[args.jax_variants[0]][case][1]
        flops = info.get("flops")
        if case[0] == "sample":
            flops = args.steps * sample_step_flops(unet, params, schedule, case[1])
        res["runs"] += time_case(case, jsets, tsets, flops, peak, args)
    return res


def part_sharded(args) -> dict:
    """The JAX side with the batch over 2 host devices; runs in a child process with its own XLA_FLAGS."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    # the parent's options, then the child's own: argparse keeps the last value of a repeated option
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--_child=sharded",
           f"--out={args.out}.sharded.json", f"--_partial={PARTIAL[0]}"]
    _phase("sharded part: " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True, env={**os.environ, "XLA_FLAGS": flags.strip()})
    with open(f"{args.out}.sharded.json") as f:
        res = json.load(f)
    os.remove(f"{args.out}.sharded.json")
    return res


def _child_sharded(args) -> dict:
    import jax
    from jax.sharding import AxisType

    mesh = jax.make_mesh((2,), ("data",), axis_types=(AxisType.Auto,))
    res = part_unet(args, mesh=mesh, torch_too=False)
    res["devices"] = [str(d) for d in jax.devices()]
    return res


def _vae_pair(cfg, torch):
    """(JAX module, params, diffusers AutoencoderKL with the same weights)."""
    import flax.linen as nn
    import jax
    from diffusers import AutoencoderKL

    from ldm_jax.convert import diffusers as dconv
    from ldm_jax.models.vae import AutoencoderKL as JaxVAE
    from ldm_jax.models.vae import init_vae

    params = nn.unbox(jax.jit(lambda k: init_vae(cfg, k))(jax.random.key(0)))
    tvae = AutoencoderKL.from_config(dconv.vae_config_to_diffusers(cfg))
    state = {k: torch.from_numpy(np.array(v)) for k, v in dconv.vae_state_dict_from_params(params, cfg).items()}
    tvae.load_state_dict(state, strict=True)
    return JaxVAE(cfg), params, tvae.eval()


def _vae_runs(name: str, cfg, size: int, batches, torch, args, peak: float) -> list[dict]:
    import jax

    _phase(f"{name} at {size}x{size}")
    vae, params, tvae = _vae_pair(cfg, torch)
    f, out = cfg.downsample_factor, []
    ops = {"encode": (lambda p, x: vae.apply({"params": p}, x, method=vae.encode)[0],
                      lambda a: tvae.encode(a).latent_dist.mean),
           "decode": (lambda p, z: vae.apply({"params": p}, z, method=vae.decode), lambda a: tvae.decode(a).sample)}
    for b in batches:
        x = jax.random.uniform(jax.random.key(0), (b, size, size, 3), minval=-1.0, maxval=1.0)
        z = jax.random.normal(jax.random.key(1), (b, size // f, size // f, cfg.latent_channels))
        for op, arg in (("encode", x), ("decode", z)):
            fn, tfn = ops[op]
            targ = torch.from_numpy(np.asarray(arg).transpose(0, 3, 1, 2).copy())
            compiled, secs, flops = _compile(fn, (params, arg), LDM_JAX_OPTIONS)
            call_t = torch.no_grad()(lambda tfn=tfn, targ=targ: tfn(targ))
            diff = float(np.max(np.abs(np.asarray(compiled(params, arg)) - call_t().numpy().transpose(0, 2, 3, 1))))
            r = race({"jax": lambda c=compiled, a=arg: c(params, a).block_until_ready(), "torch_eager": call_t},
                     1, args.iters_vae)
            for who, stats in r.items():
                rec = {"model": name, "size": size, "batch": b, "op": op, "contestant": who, **stats,
                       "images_per_s": b / stats["median_s"], "flops": flops,
                       "fraction_of_peak": flops / stats["median_s"] / peak, "max_abs_diff_vs_torch": diff}
                if who == "jax":
                    rec.update(compile_s=secs, ratio_torch_eager=r["torch_eager"]["median_s"] / stats["median_s"])
                _emit(rec)
                out.append(rec)
    return out


def part_vae(args) -> dict:
    """Encode (to the posterior mean) and decode throughput of the tiny VAE at 32x32 and the SD VAE."""
    import torch

    from ldm_jax.models import presets

    torch.set_num_threads(args.threads)
    peak = cpu_peak(args.threads)["peak_flops"]
    runs = _vae_runs("tiny_vae", presets.tiny_vae(), 32, (16,), torch, args, peak)
    runs += _vae_runs("sd_vae", presets.sd_vae(), args.sd_vae_size, (1, 2), torch, args, peak)
    return {"runs": runs}


def render_table(res: dict) -> str:
    """Markdown tables of a finished run (the README's CPU section): one row per case x contestant."""
    lines = []
    for part in ("unet", "sharded"):
        runs = res.get(part, {}).get("runs", [])
        if not runs:
            continue
        lines += [f"**{part}**" + (" (JAX with the batch over 2 host devices)" if part == "sharded" else ""), "",
                  "| case | batch | contestant | median (s) | min-max (s) | images/s | GFLOP/s | of peak | "
                  "vs torch eager | vs torch.compile | compile / first call (s) |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            if "median_s" not in r:
                lines.append(f"| {r['case']} | {r['batch']} | {r['contestant']} | failed: {r.get('error', '?')[:80]} "
                             "| | | | | | | |")
                continue
            eager, compiled = (f"{r[k]:.2f}x" if k in r else "" for k in ("ratio_torch_eager", "ratio_torch_compile"))
            first = r.get("compile_s", r.get("first_call_s"))
            first = "" if first is None else f"{first:.1f}"
            gflops = r["flops"] / r["median_s"] / 1e9
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['contestant']} | {r['median_s']:.3f} | "
                f"{r['min_s']:.3f}-{r['max_s']:.3f} | {r['images_per_s']:.1f} | {gflops:.1f} | "
                f"{100 * r['fraction_of_peak']:.1f}% | {eager} | {compiled} | {first} |")
        lines.append("")
    vae = res.get("vae", {}).get("runs", [])
    if vae:
        lines += ["**autoencoder**", "", "| model | size | batch | op | contestant | median (s) | images/s | of peak | "
                  "vs torch eager | max abs diff |", "|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
        for r in vae:
            ratio = f"{r['ratio_torch_eager']:.2f}x" if "ratio_torch_eager" in r else ""
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['op']} | {r['contestant']} | "
                         f"{r['median_s']:.3f} | {r['images_per_s']:.3g} | {100 * r['fraction_of_peak']:.1f}% | "
                         f"{ratio} | {r['max_abs_diff_vs_torch']:.1e} |")
    return "\n".join(lines)


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "unet_cpu.json"))
    p.add_argument("--parts", default="unet,sharded,vae")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 iterations, 5 sampling steps, batch 16")
    p.add_argument("--jax_variants", default="jit,no_ynn", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--no_torch_compile", dest="torch_compile", action="store_false")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (cores)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters_sample", type=int, default=5)
    p.add_argument("--warmup_sample", type=int, default=1)
    p.add_argument("--iters_vae", type=int, default=5)
    p.add_argument("--sd_vae_size", type=int, default=256)
    p.add_argument("--table", default=None, metavar="JSON", help="print the markdown tables of a finished run")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_partial", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.jax_variants = args.jax_variants.split(",")
    for v in args.jax_variants:
        if v not in VARIANTS:
            p.error(f"unknown JAX variant {v!r}; choose from {', '.join(VARIANTS)}")
    args.train_batches, args.forward_batches, args.sample_batches = (16, 64), (16,), (16, 64)
    if args.quick:
        args.iters = args.iters_sample = args.iters_vae = 2
        args.warmup = args.warmup_sample = 1
        args.steps, args.sd_vae_size = 5, 64
        args.train_batches, args.sample_batches = (16,), (16,)
    return args


def main(argv=None):
    args = _parse_args(argv)
    if args.table:
        with open(args.table) as f:
            print(render_table(json.load(f)))
        return
    partial = args._partial or re.sub(r"\.json$", "", args.out) + ".partial.jsonl"
    PARTIAL.append(partial)
    t0 = time.time()
    if args._child == "sharded":
        res = _child_sharded(args)
    else:
        res = {}
        for part in args.parts.split(","):
            res[part] = {"unet": part_unet, "sharded": part_sharded, "vae": part_vae}[part](args)
    from importlib import metadata

    import jax
    import torch

    res.update(argv=sys.argv, wall_s=time.time() - t0, host=platform.node(), date=time.strftime("%Y-%m-%d"),
               jax=jax.__version__, torch=torch.__version__, diffusers=metadata.version("diffusers"),
               torch_threads=torch.get_num_threads(),
               cpu_count=os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""), quick=args.quick)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    _phase(f"wrote {args.out}")


if __name__ == "__main__":
    main()
