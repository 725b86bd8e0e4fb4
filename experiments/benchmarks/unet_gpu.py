"""GPU benchmark: SD-1.5 U-Net training step (bf16 compute, float32 master weights, AdamW) and 512x512 50-step
classifier-free-guided DDIM sampling, in ldm_jax (jit) and in diffusers (PyTorch), on one GPU.

    python experiments/benchmarks/unet_gpu.py jax_train --out=jax_train.json [--batches=32:8,16,32 64:...]
    python experiments/benchmarks/unet_gpu.py jax_sample --out=jax_sample.json
    python experiments/benchmarks/unet_gpu.py torch_train --out=torch_train.json
    python experiments/benchmarks/unet_gpu.py torch_sample --out=torch_sample.json
    JAX_PLATFORMS=cpu python experiments/benchmarks/unet_gpu.py flops --out=sd15_flops.json   # model FLOPs

Weights are random (no download); both frameworks run SD-1.5's architecture (859.5M U-Net parameters,
CLIP-L text encoder, the f=8 KL autoencoder). Each part runs in its own process so that one framework's
memory pool does not starve the other. Reported per configuration: median and spread of step times (after
warm-up), first-compile seconds, model FLOPs per example from the lowered program's cost analysis (`flops`;
the compiled GPU program's own count misses cuDNN's convolutions) and model FLOP utilization
(MFU) = flops / step time / peak, with the H100 SXM dense bf16 peak (989.4 TFLOP/s) and, for reference,
the 8192^3 bf16 matmul rate measured on these machines (~798 TFLOP/s). Memory: XLA's static estimate of the
compiled program (arguments + temporaries + outputs - aliased) and the allocator's peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
from bench_log import PARTIAL, jax_profile
from bench_log import emit as _emit
from bench_log import phase as _phase

H100_BF16_PEAK = 989.4e12
MEASURED_MATMUL = 798e12




def _timeit(fn, sync, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return times


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def _parse_batches(spec: str) -> list[tuple[int, int]]:
    """'32:16,64 64:8,16' -> [(32, 16), (32, 64), (64, 8), (64, 16)] (latent side, batch)."""
    out = []
    for part in spec.split():
        side, batches = part.split(":")
        out += [(int(side), int(b)) for b in batches.split(",")]
    return out


# ----------------------------------------------------------------------------------------------------- JAX
def jax_train(args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from ldm_jax import diffusion
    from ldm_jax.models import presets
    from ldm_jax.models.unet import UNet

    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "runs": []}
    schedule = diffusion.get_schedule("scaled_linear")
    for remat in (False, True) if args.remat == "both" else (args.remat == "on",):
        impl = None if args.attention == "xla" else args.attention
        cfg = (presets.tiny_unet(remat=remat, attention_impl=impl) if args.tiny
               else presets.sd15_unet(remat=remat, attention_impl=impl))
        unet = UNet(cfg, dtype=jnp.bfloat16)
        for side, batch in _parse_batches(args.batches):
            rec = {"latent": side, "batch": batch, "remat": remat}
            try:
                rec.update(_jax_train_one(jax, jnp, optax, diffusion, schedule, unet, side, batch, args))
            except Exception as e:  # OOM at a batch size is a result, not a crash
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            _emit(rec)
            results["runs"].append(rec)
    return results


def _jax_train_one(jax, jnp, optax, diffusion, schedule, unet, side, batch, args) -> dict:
    x0 = jnp.zeros((batch, side, side, 4), jnp.float32)
    ctx = jnp.zeros((batch, 77, unet.config.cross_attention_dim), jnp.float32)
    _phase(f"init latent={side} batch={batch}")
    params = _fast_params(lambda k: unet.init(k, x0[:1], jnp.zeros((1,), jnp.int32), ctx[:1])["params"])
    jax.block_until_ready(params)
    _phase("compiling the train step")
    tx = optax.adamw(1e-5, weight_decay=0.01)
    opt_state = jax.jit(tx.init)(params)

    def loss_fn(p, x0, ctx, rng):
        k1, k2 = jax.random.split(rng)
        t = jax.random.uniform(k1, (x0.shape[0],))
        noise = jax.random.normal(k2, x0.shape)
        xt = diffusion.q_sample(schedule, x0, t, noise)
        out = unet.apply({"params": p}, xt, schedule.timestep(t), ctx)
        return jnp.mean((out.astype(jnp.float32) - noise) ** 2)

    def step(p, o, x0, ctx, rng):
        loss, g = jax.value_and_grad(loss_fn)(p, x0, ctx, rng)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, loss

    rng = jax.random.key(1)
    x0 = jax.random.normal(rng, x0.shape)
    ctx = jax.random.normal(rng, ctx.shape)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, x0, ctx, rng).compile()
    compile_s = time.perf_counter() - t0
    _phase(f"compiled in {compile_s:.1f} s; timing")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    mem = compiled.memory_analysis()
    static_bytes = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes) if mem is not None else None
    state = {"p": params, "o": opt_state}
    del params, opt_state

    def run():
        state["p"], state["o"], loss = compiled(state["p"], state["o"], x0, ctx, rng)
        return loss

    times = _timeit(run, lambda x: x.block_until_ready(), args.warmup, args.iters)
    s = _summary(times)
    profile = jax_profile(lambda: run().block_until_ready(), args.profile) if args.profile else None
    stats = jax.devices()[0].memory_stats() or {}
    out = {"compile_s": compile_s, **s, "flops_per_step": flops, "images_per_s": batch / s["median_s"],
           "mfu_vs_989": flops / s["median_s"] / H100_BF16_PEAK,
           "mfu_vs_measured_matmul": flops / s["median_s"] / MEASURED_MATMUL,
           "static_mem_gib": None if static_bytes is None else static_bytes / 2**30,
           "peak_mem_gib_process": stats.get("peak_bytes_in_use", 0) / 2**30}
    if profile is not None:
        out["profile"] = profile
    state.clear()
    return out


def _fast_params(init_fn):
    """Random N(0, 0.02^2) parameters of init_fn's shapes from one flat draw: timing does not depend on the
    values, and compiling SD-size initializers costs minutes (a flat draw compiles once)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    abstract = nn.unbox(jax.eval_shape(init_fn, jax.random.key(0)))
    leaves, treedef = jax.tree.flatten(abstract)
    sizes = [int(np.prod(leaf.shape)) for leaf in leaves]
    flat = jax.jit(lambda k: 0.02 * jax.random.normal(k, (sum(sizes),), jnp.float32))(jax.random.key(0))
    out, start = [], 0
    for leaf, n in zip(leaves, sizes):
        out.append(flat[start:start + n].reshape(leaf.shape).astype(leaf.dtype))
        start += n
    del flat
    return jax.tree.unflatten(treedef, out)


def flops(args) -> dict:
    """Model FLOPs of one SD-1.5 training example (forward + backward) from the *lowered* HLO's cost analysis.

    On GPU the compiled program's cost analysis leaves out convolutions and attention (they become cuDNN
    custom calls), so the train-step numbers of `jax_train` undercount by ~30x; the lowered program still
    holds every convolution and dot, and costs no compilation (runs on CPU in seconds, from shapes only).
    """
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ldm_jax import diffusion
    from ldm_jax.models import presets
    from ldm_jax.models.unet import UNet

    unet, schedule = UNet(presets.sd15_unet(), dtype=jnp.bfloat16), diffusion.get_schedule("scaled_linear")
    out = {"runs": []}
    for side in (32, 64):
        x0 = jax.ShapeDtypeStruct((1, side, side, 4), jnp.float32)
        ctx = jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)
        init = lambda k, side=side: unet.init(k, jnp.zeros((1, side, side, 4)), jnp.zeros((1,), jnp.int32),
                                              jnp.zeros((1, 77, 768)))["params"]
        params = nn.unbox(jax.eval_shape(init, jax.random.key(0)))

        def loss_fn(p, x0, ctx):
            t = jnp.full((x0.shape[0],), 0.5)
            out = unet.apply({"params": p}, diffusion.q_sample(schedule, x0, t, x0), schedule.timestep(t), ctx)
            return jnp.mean((out.astype(jnp.float32) - x0) ** 2)

        def count(fn, params=params, x0=x0, ctx=ctx):
            c = jax.jit(fn).lower(params, x0, ctx).cost_analysis()
            return float((c[0] if isinstance(c, (list, tuple)) else c)["flops"])

        rec = {"latent": side, "forward_flops_per_image": count(loss_fn),
               "train_flops_per_image": count(jax.grad(loss_fn))}
        _emit(rec)
        out["runs"].append(rec)
    return out


class _FixedTokenizer:
    """Stand-in tokenizer for random-weight benchmarks: every prompt maps to the same 77 ids."""

    max_length = 77

    def tokenize(self, prompts):
        import numpy as np

        n = 1 if isinstance(prompts, str) else len(prompts)
        ids = np.full((n, 77), 49407, np.int32)
        ids[:, 0], ids[:, 1:6] = 49406, np.arange(320, 325)
        return ids, np.ones((n, 77), np.int32)


def jax_sample(args) -> dict:
    import jax
    import jax.numpy as jnp

    from ldm_jax import diffusion
    from ldm_jax.ldm import LatentDiffusion
    from ldm_jax.models import presets
    from ldm_jax.models.text import CLIPTextEncoder, clip_l14
    from ldm_jax.models.text_encoder import TextEncoder
    from ldm_jax.models.unet import UNet
    from ldm_jax.models.vae import AutoencoderKL
    from ldm_jax.pipelines import TextToImage

    dtype = jnp.bfloat16
    impl = None if args.attention == "xla" else args.attention
    ucfg, vcfg, tcfg = presets.sd15_unet(attention_impl=impl), presets.sd_vae(), clip_l14()
    size = 512
    if args.tiny:  # a CPU smoke run of this script
        from ldm_jax.models.text import tiny_clip_text

        tcfg = tiny_clip_text()
        ucfg, vcfg, size = presets.tiny_unet(cross_attention_dim=tcfg.hidden_size), presets.tiny_vae(), 32
    cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype), tree)
    k = jax.random.key(0)
    unet_p = jax.jit(lambda k: cast(UNet(ucfg).init(k, jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,), jnp.int32),
                                                      jnp.zeros((1, 77, ucfg.cross_attention_dim)))["params"]))(k)
    vae_p = jax.jit(lambda k: cast(AutoencoderKL(vcfg).init(k, jnp.zeros((1, 64, 64, 3)))["params"]))(k)
    text_module = CLIPTextEncoder(tcfg, dtype=dtype)
    text_p = jax.jit(lambda k: cast(text_module.init(k, jnp.zeros((1, 77), jnp.int32))["params"]))(k)
    te = TextEncoder(text_module, text_p, _FixedTokenizer())
    model = LatentDiffusion(ucfg, unet_p, vcfg, vae_p, te, diffusion.get_schedule("scaled_linear"), prediction="eps",
                            dtype=dtype, default_size=size)
    pipe = TextToImage(model, compilation_cache=False)
    results = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "runs": []}
    for batch in (1, 8):
        prompts = ["a photograph of an astronaut riding a horse"] * batch
        call = lambda prompts=prompts: pipe(prompts, num_steps=50, guidance_scale=7.5, sampler="ddim", seed=0,
                                            micro_batch=len(prompts), progress=False)
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0
        times = _timeit(call, lambda x: x, 0, args.iters_sample)
        s = _summary(times)
        compile_s = first - s["median_s"]
        rec = {"batch": batch, "size": size, "steps": 50, "cfg": 7.5, "first_call_s": first, "compile_s": compile_s,
               **s, "s_per_image": s["median_s"] / batch}
        _emit(rec)
        results["runs"].append(rec)
    stats = jax.devices()[0].memory_stats() or {}
    results["peak_mem_gib_process"] = stats.get("peak_bytes_in_use", 0) / 2**30
    return results


# --------------------------------------------------------------------------------------------------- torch
def _torch_models(with_vae_text: bool):
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)  # the defaults are SD 1.x's layout
    if not with_vae_text:
        return unet, None, None
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                        num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"))
    torch.manual_seed(0)
    return unet, vae, text


def torch_train(args) -> dict:
    import torch

    dev = "cuda"
    unet, _, _ = _torch_models(False)
    unet = unet.to(dev).train()
    n_params = sum(p.numel() for p in unet.parameters())
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "params": n_params, "runs": []}
    modes = args.torch_modes.split(",")
    for mode in modes:
        model = torch.compile(unet) if mode == "compile" else unet
        for side, batch in _parse_batches(args.batches):
            rec = {"latent": side, "batch": batch, "mode": mode}
            try:
                rec.update(_torch_train_one(torch, model, unet, side, batch, args))
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                torch.cuda.empty_cache()
            _emit(rec)
            results["runs"].append(rec)
    return results


def _torch_train_one(torch, model, unet, side, batch, args) -> dict:
    from diffusers import DDPMScheduler

    dev = "cuda"
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=0.01, fused=True)
    x0 = torch.randn(batch, 4, side, side, device=dev)
    ctx = torch.randn(batch, 77, 768, device=dev)
    torch.cuda.reset_peak_memory_stats()

    def run():
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (batch,), device=dev)
        xt = _add_noise(sched, x0, noise, t)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(xt, t, ctx).sample
        loss = torch.nn.functional.mse_loss(out.float(), noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    times = _timeit(run, lambda x: torch.cuda.synchronize(), args.warmup, args.iters)
    s = _summary(times)
    out = {"first_step_s": first, **s, "images_per_s": batch / s["median_s"],
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    torch.cuda.empty_cache()
    return out


def _add_noise(sched, x0, noise, t):
    ac = sched.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    return ac.sqrt() * x0 + (1 - ac).sqrt() * noise


def torch_sample(args) -> dict:
    import torch
    from diffusers import DDIMScheduler

    dev, dtype = "cuda", torch.bfloat16
    unet, vae, text = _torch_models(True)
    unet, vae, text = (m.to(dev, dtype).eval() for m in (unet, vae, text))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          set_alpha_to_one=False, steps_offset=1, clip_sample=False)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": []}
    modes = args.torch_modes.split(",")
    for mode in modes:
        net = torch.compile(unet) if mode == "compile" else unet
        for batch in (1, 8):
            ids = torch.full((2 * batch, 77), 49407, device=dev)
            ids[:, 0] = 49406

            @torch.no_grad()
            def call(ids=ids, batch=batch, net=net):
                ctx = text(ids).last_hidden_state
                sched.set_timesteps(50)
                x = torch.randn(batch, 4, 64, 64, device=dev, dtype=dtype)
                for t in sched.timesteps:
                    out = net(torch.cat([x, x]), t, ctx).sample
                    c, u = out.chunk(2)
                    x = sched.step(u + 7.5 * (c - u), t, x).prev_sample
                return vae.decode(x / 0.18215).sample

            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            times = _timeit(call, lambda x: torch.cuda.synchronize(), 0, args.iters_sample)
            s = _summary(times)
            rec = {"batch": batch, "mode": mode, "size": 512, "steps": 50, "first_call_s": first, **s,
                   "s_per_image": s["median_s"] / batch}
            _emit(rec)
            results["runs"].append(rec)
    results["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("jax_train", "jax_sample", "torch_train", "torch_sample", "flops"))
    p.add_argument("--out", required=True)
    p.add_argument("--batches", default="32:32,64,128 64:8,16,32")
    p.add_argument("--remat", default="both", choices=("both", "on", "off"))
    p.add_argument("--torch_modes", default="eager")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--iters_sample", type=int, default=3)
    p.add_argument("--attention", default="cudnn", choices=("cudnn", "cudnn_padded", "xla"),
                   help="U-Net attention kernel: cuDNN flash attention (GPU) where cuDNN takes the shapes, also for "
                        "cross-attention with its 77 keys padded to 128 (cudnn_padded), or XLA's")
    p.add_argument("--tiny", action="store_true", help="tiny models: a CPU smoke run of the JAX parts")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="jax_train: also trace N steps and record the time per op kind (host and device)")
    args = p.parse_args()
    PARTIAL.append(args.out + ".partial.jsonl")
    t0 = time.time()
    res = globals()[args.part](args)
    res.update(part=args.part, argv=sys.argv, wall_s=time.time() - t0, host=platform.node(),
               date=time.strftime("%Y-%m-%d"), xla_flags=os.environ.get("XLA_FLAGS", ""))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
