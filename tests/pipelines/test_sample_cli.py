"""`ldm-jax sample`: PNGs with their generation settings in text chunks, a grid, the persistent compilation
cache, and one-line errors for bad input (these run in-process and fail before any model is compiled)."""

import os
import subprocess
import sys

import numpy as np
import pytest
from absl.testing import flagsaver
from PIL import Image

from ldm_jax.commands import sample
from ldm_jax.images import read_png_metadata
from tests.pipelines.helpers import smooth_image


def run_in_process(argv, capsys):
    with flagsaver.flagsaver(), pytest.raises(SystemExit) as exit_info:
        sample.run_cli(["ldm-jax sample", *argv])
    return exit_info.value.code, capsys.readouterr()


def _cli(*args, env):
    done = subprocess.run([sys.executable, "-m", "ldm_jax", "sample", *args], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def _cache_entries(cache) -> set:
    return {p.name for p in cache.rglob("*-cache")}


def test_cli_samples_a_workdir_and_writes_metadata(tiny_workdir, tmp_path):
    """A stochastic sampler (euler_ancestral), batches of 3 over 4 images, the persistent cache."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shapes\na red circle\n\na blue square in the top left\n")
    cache = tmp_path / "jax_cache"
    # the CLI's own cache location (LDM_JAX_CACHE_DIR), not the one the test session exports
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(LDM_JAX_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    common = [f"--model={tiny_workdir.path}", "--negative-prompt=blurry", "--sampler=euler_ancestral", "--num_steps=3",
              "--guidance_scale=3.0", "--height=32", "--width=32", "--batch-size=3"]
    out = tmp_path / "out"
    _cli(*common, f"--prompts-file={prompts}", "--num-images=2", "--seed=7", f"--out={out}", env=env)
    files = sorted(p for p in os.listdir(out) if p != "grid.png")
    assert files == ["0000-seed7.png", "0001-seed8.png", "0002-seed9.png", "0003-seed10.png"]
    images = []
    for i, name in enumerate(files):
        meta = read_png_metadata(out / name)
        assert meta["prompt"] == ["a red circle", "a blue square in the top left"][i // 2]
        assert meta["negative_prompt"] == "blurry" and meta["seed"] == str(7 + i)
        assert (meta["sampler"], meta["num_steps"], meta["guidance_scale"]) == ("euler_ancestral", "3", "3.0")
        assert meta["model"] == str(tiny_workdir.path) and meta["spacing"] == "uniform"
        images.append(np.asarray(Image.open(out / name)))
    images = np.stack(images)
    assert images.shape == (4, 32, 32, 3) and images.std() > 5
    assert all(np.abs(images[i].astype(int) - images[j]).mean() > 1 for i in range(4) for j in range(i))
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)
    assert read_png_metadata(out / "grid.png")["seed"] == "7"
    compiled = _cache_entries(cache)
    assert compiled  # the compiled loop went to the persistent cache

    # A new process: the second prompt alone, seeds 9, 10, 11, in other batches than before (one batch of 3). The
    # images are the same bit for bit, and everything it runs comes out of the persistent cache (no new entry).
    again = tmp_path / "again"
    _cli(*common, "--prompt=a blue square in the top left", "--num-images=3", "--seed=9", f"--out={again}", env=env)
    for name, before in (("0000-seed9.png", images[2]), ("0001-seed10.png", images[3])):
        np.testing.assert_array_equal(np.asarray(Image.open(again / name)), before)
    assert _cache_entries(cache) == compiled


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_inputs")
    Image.fromarray(smooth_image(0)).save(d / "init.png")
    Image.fromarray(smooth_image(0)[:, :60]).save(d / "init60.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8), "L").save(d / "mask32.png")
    return d


def test_cli_bad_input_is_one_line(tiny_sd, inputs, tmp_path, capsys):
    model, out = f"--model={tiny_sd.sd}", f"--out={tmp_path / 'o'}"
    cases = [
        ([model, out], "empty prompt list"),
        ([model, out, "--prompt=a", "--height=60"], "--height=60 must be a positive multiple of 8"),
        ([model, out, "--prompt=a", "--num_steps=0"], "--num_steps must be >= 1"),
        ([model, out, "--prompt=a", f"--init-image={inputs / 'init.png'}", "--strength=1.5"], r"\[0, 1\]"),
        ([f"--model={tmp_path / 'none'}", out, "--prompt=a"], "not found"),
        ([model, out, "--prompt=a", f"--mask={inputs / 'mask32.png'}"], "--mask needs --init_image"),
        ([model, out, "--prompt=a", f"--init-image={inputs / 'init.png'}", f"--mask={inputs / 'mask32.png'}"],
         "--mask is 32x32 but --init_image is 64x64"),
        ([model, out, "--prompt=a", f"--init-image={inputs / 'init60.png'}"], "not a multiple of 8"),
        ([model, out, "--prompt=a", f"--init-image={inputs / 'nothing.png'}"], "image file .* not found"),
        ([model, out, f"--prompts-file={tmp_path / 'missing.txt'}"], "prompts file .* not found"),
        ([f"--model={inputs}", out, "--prompt=a"], "lacks unet/config.json"),
        ([model, f"--out={inputs / 'init.png'}", "--prompt=a"], "is a file"),
        ([model, f"--out={tmp_path / 'taken'}", "--prompt=a", "--num_images=2", "--seed=3"],
         "already holds 0001-seed4.png of this run's files"),
    ]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "0001-seed4.png").write_bytes(b"earlier work")
    import re

    for argv, match in cases:
        code, captured = run_in_process(argv, capsys)
        lines = captured.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, captured.err)
        assert re.search(match, lines[0]), (match, lines[0])
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "taken" / "0001-seed4.png").read_bytes() == b"earlier work"
