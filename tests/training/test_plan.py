"""The memory/FLOP planner: exact state bytes from the parameter shapes, the model against XLA's analyses of the
real sharded step on 8 host devices, the largest-batch arithmetic and the command line.

The model test plans the way 64..1024 devices are planned (calibrated on one device) and compares with the real
step compiled on 8 devices: a tiny U-Net at 8 x 8 latents, so that XLA:CPU's attention is unchunked in both
programs (it chunks by the global batch); the benchmark U-Net's check is experiments/benchmarks/plan_check.py.
"""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from ldm_jax.configlib import load_config
from ldm_jax.training import plan as pl
from ldm_jax.types import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "shapes_ldm.py")


def tiny_config(resolution=32):
    """shapes_ldm:tiny planned with the tiny VAE preset (f = 4: 8 x 8 x 4 latents at 32 px), no stage-1 workdir."""
    c = load_config(CONFIG + ":tiny")
    c.model.vae.workdir = ""
    c.data.resolution = resolution
    return c


def _fsdp_sharded(spec, shape, fsdp):
    """Whether a parameter with logical axis names `spec` is split over fsdp (DEFAULT_RULES: embed / conv_out)."""
    return fsdp > 1 and any(name in ("embed", "conv_out") and dim % fsdp == 0 for name, dim in zip(spec, shape))


@pytest.mark.parametrize("data, fsdp", [(8, 1), (1, 8), (2, 4), (4, 256)])
def test_state_bytes_are_the_closed_form_count(data, fsdp):
    setup = pl.make_setup(tiny_config())
    boxed = jax.eval_shape(setup.task.init, jax.ShapeDtypeStruct((2,), "uint32"))
    specs = jax.tree.leaves(nn.get_partition_spec(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    shapes = [x.shape for x in jax.tree.leaves(nn.meta.unbox(boxed))]
    count = sum(math.prod(s) for s in shapes)
    # float32: 4 bytes a parameter, divided over fsdp where a dimension named embed / conv_out splits evenly
    params = sum(4 * math.prod(s) // (fsdp if _fsdp_sharded(spec, s, fsdp) else 1) for spec, s in zip(specs, shapes))
    sb = pl.state_bytes(setup, pl.abstract_mesh(data, fsdp))  # 1024 devices: an AbstractMesh, no devices needed
    assert sb["param_count"] == count == 342_532
    assert sb["params"] == sb["gradients"] == sb["ema"] == params
    assert 2 * params <= sb["optimizer"] <= 2 * params + 16  # Adam's two moments + int32 step counts
    assert sb["counters"] == 16  # step, rng (2 x uint32), nonfinite_count
    if fsdp == 1:
        assert params == 4 * count
    else:
        assert 4 * count / fsdp <= params <= 4 * count
    assert sb["batch_per_example"] == 4 * (2 * 8 * 8 * 4 + 8 * 384)  # latent mean + std, 8 x 384 text states


@pytest.mark.parametrize("name", ["dit", "mmdit"])
def test_transformer_backbones_are_planned_from_their_own_parameters(name):
    """configs/shapes_<dit|mmdit>.py: the planner builds the configured backbone (not a U-Net), so its state is
    the transformer's parameter count, the same count the model layer builds and checks workdirs against."""
    from ldm_jax.ldm import build
    from ldm_jax.models import backbones

    c = load_config(os.path.join(ROOT, "configs", f"shapes_{name}.py:tiny"))
    c.model.vae.workdir = ""
    setup = pl.make_setup(c)
    sb = pl.state_bytes(setup, pl.abstract_mesh(2, 4))
    vae = build.vae_config(c.model.vae)
    cfg = build.backbone_config(c.model, context_dim=384, latent_channels=vae.latent_channels)
    assert backbones.kind(cfg) == name
    assert sb["param_count"] == sum(math.prod(s) for s in backbones.param_shapes(cfg).values())
    assert sb["params"] == sb["gradients"] == sb["ema"]


def test_sdxl_text_time_unet_is_planned_with_its_added_embedding():
    """An SDXL U-Net (text_time): planned with the pooled text and time ids the stage feeds it, so its state is
    the full parameter count (the added embedding included)."""
    from ldm_jax.models import presets, unet

    c = tiny_config()
    c.model.unet = {"preset": "tiny_sdxl", "pretrained": ""}
    setup = pl.make_setup(c, context=(8, 32, 16))  # 8 tokens, 32 wide (two encoders), 16-wide pooled text
    want = presets.tiny_sdxl_unet(in_channels=4, out_channels=4)
    sb = pl.state_bytes(setup, pl.abstract_mesh(2, 4))
    assert sb["param_count"] == sum(math.prod(s) for s in unet.unet_param_shapes(want).values())
    assert sb["batch_per_example"] == 4 * (2 * 8 * 8 * 4 + 8 * 32 + 16)  # + the pooled text
    # (its step lowers with them: experiments/benchmarks/plan_check.py calibrates SDXL's; ~30 s here, not in CI)


def test_plan_matches_the_compiled_sharded_step():
    res = pl.plan(tiny_config(), devices=8, mesh={"data": 2, "fsdp": 4}, batch_size=64, compare_remat=False,
                  measure=True, calibration_devices=1)
    mem, real = res["memory"], res["measured"]
    assert res["mesh"] == {"data": 2, "fsdp": 4} and res["per_device_batch"] == 8
    assert res["variants"]["no_remat"]["calibration"]["mesh"] == {"data": 1, "fsdp": 1}
    # the arguments of the compiled step are exactly the state, frozen arrays and batch the planner counts
    exact = sum(mem[k] for k in ("params", "optimizer", "ema", "extra", "counters", "frozen", "batch"))
    assert exact == real["argument"]
    assert abs(real["total_model_over_compiled"] - 1) < 0.10, (mem, real)
    assert abs(real["flops_global_model_over_lowered"] - 1) < 0.05
    assert abs(real["flops_per_device_model_over_compiled"] - 1) < 0.10
    assert res["largest_batch_per_device"] > 1000 and res["largest_global_batch"] == 8 * res["largest_batch_per_device"]


def test_largest_batch_is_the_largest_that_fits():
    sb = {"params": 100, "gradients": 100, "optimizer": 200, "ema": 100, "extra": 0, "counters": 16, "frozen": 0,
          "batch_per_example": 10, "param_bytes_global": 400}
    cal = {"activation_bytes_per_example": 50.0, "activation_bytes_fixed": 20.0, "mesh": {"data": 1, "fsdp": 1}}
    found = []
    for hbm in (1000, 1100, 5000, 20000):
        for accum in (1, 2):
            b = pl.largest_batch(sb, cal, hbm, accum)
            found.append(b)
            assert b % accum == 0
            assert b == 0 or pl.memory_model(sb, cal, b, accum)["total"] <= hbm
            assert pl.memory_model(sb, cal, b + accum, accum)["total"] > hbm
    assert found[-1] > 100 and 0 in found
    # the backward pass holds the whole gradient (400 B), the update four shards of it
    m = pl.memory_model(sb, cal, 4, 1)
    assert m["temp"] == max(4 * 100, 400 + 20 + 50 * 4) and m["total"] == 416 + 40 + m["temp"]
    assert pl.largest_batch(sb, cal, 600, 1) == 0  # the state and update do not fit


def test_mesh_and_batch_errors(tmp_path):
    c = tiny_config()
    assert pl.resolve_mesh(c, 8, {"fsdp": 8}) == (1, 8)
    assert pl.resolve_mesh(c, 8, None) == (8, 1)  # config.mesh.fsdp = 1, data over the rest
    assert pl.calibration_mesh(64, 16, 8) == (1, 8) and pl.calibration_mesh(8, 1, 1) == (1, 1)
    with pytest.raises(ConfigError, match="unknown"):
        pl.resolve_mesh(c, 8, {"model": 8})
    with pytest.raises(ConfigError, match="uses 4 of the 8"):
        pl.resolve_mesh(c, 8, {"data": 2, "fsdp": 2})
    with pytest.raises(ConfigError, match="multiple of 8 devices"):
        pl.plan(c, devices=8, batch_size=12)
    missing = load_config(CONFIG + ":tiny")
    missing.model.vae.workdir = str(tmp_path / "no_autoencoder")
    with pytest.raises(ConfigError, match="model.vae.workdir"):  # one line saying how to plan with the preset
        pl.make_setup(missing)


def test_cli_prints_the_plan_and_one_line_errors(subprocess_env):
    base = [sys.executable, "-m", "ldm_jax", "plan", f"--config={CONFIG}:tiny", "--config.model.vae.workdir=",
            "--config.data.resolution=32"]
    out = subprocess.run([*base, "--devices=8", "--mesh=data=2,fsdp=4", "--batch_size=64", "--calibration_devices=1",
                          "--nomeasure", "--noremat", "--nocompare_remat"], capture_output=True, text=True, timeout=300,
                         env=subprocess_env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "342,532 parameters" in out.stdout and "largest batch in 80 GiB" in out.stdout
    assert "activations" in out.stdout and "FLOPs per step" in out.stdout
    bad = subprocess.run([*base, "--devices=8", "--mesh=data=3"], capture_output=True, text=True, timeout=120,
                         env=subprocess_env, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "mesh" in bad.stderr, bad.stderr
