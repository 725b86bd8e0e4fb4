"""Bad inputs and faults, driven through the ``ldm-jax`` command line as a user would.

Every bad input must end with exit status 2 (1 for a run that stopped: non-finite values, a failed save), one
line on stderr that starts with ``error:`` and says what to do, no traceback, and every file that existed
before (checkpoints, datasets, earlier outputs) byte-identical afterwards.

The command lines run in children of one fork server (tests/cli_forkserver.py) that imported the libraries
once, so each costs about a second instead of a fresh interpreter's start-up. The fixture trains a tiny
autoencoder and a tiny latent-diffusion model once, through the CLI, for the cases that need trained workdirs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
AE_CFG = str(REPO / "configs" / "shapes_autoencoder.py")
LDM_CFG = str(REPO / "configs" / "shapes_ldm.py")
SWEEP_CFG = str(REPO / "configs" / "ablation_noise_schedules.py")
TOY_CFG = str(REPO / "tests" / "training" / "toy_cases.py")


class Cli:
    """``run(*argv, cwd=...) -> (rc, stdout, stderr)`` through the fork server."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "cli_forkserver.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        self.count = 0

    def run(self, *argv: str, cwd: Path, timeout: float = 240, **extra):
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        request = {"argv": list(argv), "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
                   "timeout": timeout, **extra}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return rc, out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def snapshot(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def error_lines(stderr: str) -> list[str]:
    """stderr without progress bars (tqdm redraws with carriage returns)."""
    lines = [line.split("\r")[-1] for line in stderr.splitlines()]
    return [line for line in lines if line.strip() and not re.search(r"\d+%\|", line)]


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    runner = Cli(tmp_path_factory.mktemp("cli_logs"))
    yield runner
    runner.close()


def _write_png(path: Path, size=(16, 16), mode="RGB"):
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory, cli):
    """A folder with what users have lying around: trained workdirs, outputs, prompt files, broken files."""
    root = tmp_path_factory.mktemp("world")
    data = root / "data"
    rc, _, err = cli.run("train", f"--config={AE_CFG}:tiny", "--workdir=ae", f"--config.data.data_dir={data}",
                         "--config.train.num_steps=4", "--config.checkpoint.every_steps=2", cwd=root)
    assert rc == 0, err[-3000:]
    rc, _, err = cli.run("train", f"--config={LDM_CFG}:tiny", "--workdir=ldm", f"--config.data.data_dir={data}",
                         "--config.model.vae.workdir=ae", "--config.train.num_steps=2", cwd=root)
    assert rc == 0, err[-3000:]
    (root / "afile").write_text("not a folder\n")
    (root / "empty").mkdir()
    (root / "prompts.txt").write_text("a red circle\n")
    (root / "latin1.txt").write_bytes("une cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    (root / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    _write_png(root / "image16.png")
    _write_png(root / "mask24.png", size=(24, 24), mode="L")
    (root / "out_done").mkdir()
    _write_png(root / "out_done" / "0000-seed0.png")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("earlier results\n")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        _write_png(images / f"{i}.png")
    broken_images = root / "broken_images"
    shutil.copytree(images, broken_images)
    (broken_images / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "syntax_error.py").write_text("def get_config(:\n    pass\n")
    (root / "no_get_config.py").write_text("x = 1\n")
    (root / "raises.py").write_text("def get_config(arg=None):\n    raise RuntimeError('broken on purpose')\n")
    (root / "not_a_dict.py").write_text("def get_config(arg=None):\n    return {'a': 1}\n")
    # damaged copies of the trained model: an unparsable run config, truncated arrays
    shutil.copytree(root / "ldm", root / "ldm_badjson")
    newest = max(int(n) for n in os.listdir(root / "ldm_badjson" / "checkpoints") if n.isdigit())
    (root / "ldm_badjson" / "checkpoints" / str(newest) / "config" / "config.json").write_text("{not json")
    shutil.copytree(root / "ldm", root / "ldm_truncated")
    state = root / "ldm_truncated" / "checkpoints" / str(newest) / "state"
    for f in state.rglob("*"):
        if f.is_file() and f.parent.name == "d":
            with open(f, "r+b") as fh:
                fh.truncate(8)
    # a demo workdir whose autoencoder/ holds another stage's run
    (root / "demo_other").mkdir()
    shutil.copytree(root / "ldm", root / "demo_other" / "autoencoder")
    return types.SimpleNamespace(root=root, data=data, newest=newest)


TRAIN_AE = ("train", f"--config={AE_CFG}:tiny")
TRAIN_LDM = ("train", f"--config={LDM_CFG}:tiny", "--config.model.vae.workdir=ae")
# (name, argv, exit status, what the one line must contain). {data} is the fixture's data folder.
CASES = [
    # -- the console script
    ("unknown-command", ("trian",), 2, "did you mean 'train'"),
    # -- train: config files
    ("train-no-config", ("train", "--workdir=w"), 2, "--config"),
    ("train-no-workdir", ("train", f"--config={AE_CFG}:tiny"), 2, "--workdir"),
    ("config-missing", ("train", "--config=nope.py", "--workdir=w"), 2, "not found"),
    ("config-syntax-error", ("train", "--config=syntax_error.py", "--workdir=w"), 2, "SyntaxError at line 1"),
    ("config-no-get-config", ("train", "--config=no_get_config.py", "--workdir=w"), 2, "get_config"),
    ("config-raises", ("train", "--config=raises.py", "--workdir=w"), 2, "broken on purpose"),
    ("config-not-configdict", ("train", "--config=not_a_dict.py", "--workdir=w"), 2, "not a ConfigDict"),
    ("config-unknown-variant", ("train", f"--config={AE_CFG}:huge", "--workdir=w"), 2, "unknown variant 'huge'"),
    # -- train: overrides
    ("override-misspelled", (*TRAIN_AE, "--workdir=w", "--config.optimizer.lrr=1"), 2, "config.optimizer.lr"),
    ("override-not-int", (*TRAIN_AE, "--workdir=w", "--config.train.num_steps=ten"), 2, "an integer"),
    ("override-section", (*TRAIN_AE, "--workdir=w", "--config.train=3"), 2, "section"),
    ("override-none-field-text", (*TRAIN_LDM, "--workdir=w", "--config.diffusion.logsnr_min=low"), 2, "a number"),
    ("override-none-field-number", ("train", f"--config={LDM_CFG}:tiny", "--workdir=w",
                                    "--config.diffusion.logsnr_min=-10", "--config.model.vae.workdir=gone"), 2,
     "model.vae.workdir='gone'"),  # the typed None field took -10; the next check is the one that fails
    ("unknown-flag", (*TRAIN_AE, "--workdir=w", "--bogus=1"), 2, "bogus"),
    ("positional-argument", (*TRAIN_AE, "--workdir=w", "extra"), 2, "unexpected arguments"),
    # -- train: values (every number finite and in range, every name known)
    ("lr-nan", (*TRAIN_AE, "--workdir=w", "--config.optimizer.lr=nan"), 2, "optimizer.lr=nan is not a finite"),
    ("lr-inf", (*TRAIN_AE, "--workdir=w", "--config.optimizer.lr=inf"), 2, "not a finite number"),
    ("lr-negative", (*TRAIN_AE, "--workdir=w", "--config.optimizer.lr=-1"), 2, "optimizer.lr must be > 0"),
    ("kl-weight-nan", (*TRAIN_AE, "--workdir=w", "--config.autoencoder.kl_weight=nan"), 2, "not a finite"),
    ("num-steps-zero", (*TRAIN_AE, "--workdir=w", "--config.train.num_steps=0"), 2, "num_steps=0"),
    ("grad-accum-zero", (*TRAIN_AE, "--workdir=w", "--config.train.grad_accum=0"), 2, "grad_accum"),
    ("on-nonfinite-unknown", (*TRAIN_AE, "--workdir=w", "--config.train.on_nonfinite=abort"), 2, "on_nonfinite"),
    ("stage-unknown", (*TRAIN_AE, "--workdir=w", "--config.train.stage=diffusion"), 2, "train.stage"),
    ("decay-unknown", (*TRAIN_AE, "--workdir=w", "--config.optimizer.decay=linear"), 2, "optimizer.decay"),
    ("ema-decay-range", (*TRAIN_AE, "--workdir=w", "--config.train.ema.decay=1.5"), 2, "train.ema.decay"),
    ("dtype-unknown", (*TRAIN_AE, "--workdir=w", "--config.train.dtype=float8"), 2, "float8"),
    ("channels-2", (*TRAIN_AE, "--workdir=w", "--config.data.channels=2"), 2, "channels must be 1 or 3"),
    ("caption-dropout-range", (*TRAIN_LDM, "--workdir=w", "--config.data.caption_dropout=1.5"), 2, "caption_dropout"),
    ("ae-loss-unknown", (*TRAIN_AE, "--workdir=w", "--config.autoencoder.loss=l3"), 2, "autoencoder.loss"),
    ("lpips-without-files", (*TRAIN_AE, "--workdir=w", "--config.autoencoder.perceptual_weight=1"), 2, "lpips"),
    ("vae-preset-unknown", (*TRAIN_AE, "--workdir=w", "--config.model.vae.preset=huge"), 2, "model.vae.preset"),
    ("unet-preset-unknown", (*TRAIN_LDM, "--workdir=w", "--config.model.unet.preset=huge"), 2, "model.unet.preset"),
    ("sampler-unknown", (*TRAIN_LDM, "--workdir=w", "--config.sample.sampler=dpm_fast"), 2, "unknown sampler"),
    ("config-sample-steps-zero", (*TRAIN_LDM, "--workdir=w", "--config.sample.num_steps=0"), 2, "sample.num_steps"),
    ("sample-guidance-negative", (*TRAIN_LDM, "--workdir=w", "--config.sample.guidance_scale=-1"), 2,
     "sample.guidance_scale"),
    ("schedule-unknown", (*TRAIN_LDM, "--workdir=w", "--config.diffusion.schedule=cosin"), 2, "cosine"),
    ("schedule-unsampleable-grid", (*TRAIN_LDM, "--workdir=w", "--config.diffusion.schedule=laplace"), 2,
     "uniform time grid"),
    ("prediction-unknown", (*TRAIN_LDM, "--workdir=w", "--config.diffusion.prediction=noise"), 2, "prediction"),
    ("weighting-unknown", (*TRAIN_LDM, "--workdir=w", "--config.diffusion.weighting=min_snrr"), 2, "weighting"),
    ("text-encoder-unknown", (*TRAIN_LDM, "--workdir=w", "--config.model.text_encoder.name=t5"), 2,
     "text_encoder.name"),
    ("clip-without-path", (*TRAIN_LDM, "--workdir=w", "--config.model.text_encoder.name=clip"), 2,
     "text_encoder.path"),
    # -- train: referenced files and folders
    ("vae-workdir-missing", ("train", f"--config={LDM_CFG}:tiny", "--workdir=w", "--config.model.vae.workdir=gone"),
     2, "model.vae.workdir='gone' does not exist"),
    ("vae-workdir-untrained", ("train", f"--config={LDM_CFG}:tiny", "--workdir=w",
                               "--config.model.vae.workdir=empty"), 2, "has no checkpoints"),
    ("vae-workdir-is-ldm", ("train", f"--config={LDM_CFG}:tiny", "--workdir=w", "--config.model.vae.workdir=ldm"),
     2, "not an autoencoder"),
    ("latent-cache-missing", (*TRAIN_LDM, "--workdir=w", "--config.data.latent_cache=nocache"), 2,
     "data.latent_cache"),
    ("image-folder-missing", (*TRAIN_AE, "--workdir=w", "--config.data.name=image_folder"), 2, "image_folder"),
    # -- train: the workdir
    ("workdir-is-file", (*TRAIN_AE, "--workdir=afile"), 2, "is a file"),
    ("workdir-under-file", (*TRAIN_AE, "--workdir=afile/run"), 2, "cannot be written"),
    ("workdir-other-stage", (*TRAIN_AE, "--workdir=ldm", "--config.data.data_dir={data}"), 2,
     "holds a 'ldm' run"),
    ("workdir-swapped", (*TRAIN_LDM[:2], "--config.model.vae.workdir=ae", "--workdir=ae",
                         "--config.data.data_dir={data}"), 2, "holds a 'autoencoder' run"),
    ("workdir-other-model", (*TRAIN_LDM, "--workdir=ldm", "--config.data.data_dir={data}",
                             "--config.model.unet.block_out_channels=(16,)"), 2, "model.unet.block_out_channels"),
    ("workdir-other-data", (*TRAIN_AE, "--workdir=ae", "--config.data.data_dir={data}",
                            "--config.data.resolution=32"), 2, "data.resolution"),
    ("workdir-other-schedule", (*TRAIN_LDM, "--workdir=ldm", "--config.data.data_dir={data}",
                                "--config.diffusion.schedule=linear"), 2, "diffusion.schedule"),
    # -- train: multi-process flags
    ("multiprocess-partial", (*TRAIN_AE, "--workdir=w", "--num_processes=2"), 2, "--coordinator_address"),
    ("multiprocess-id-range", (*TRAIN_AE, "--workdir=w", "--coordinator_address=localhost:1", "--num_processes=2",
                               "--process_id=5"), 2, "--process_id=5"),
    ("local-device-ids", (*TRAIN_AE, "--workdir=w", "--local_device_ids=a,b"), 2, "--local_device_ids"),
    # -- sample
    ("sample-no-model", ("sample", "--prompt=a", "--out=o"), 2, "--model"),
    ("sample-model-missing", ("sample", "--model=gone", "--prompt=a", "--out=o"), 2, "'gone' not found"),
    ("sample-model-file", ("sample", "--model=afile", "--prompt=a", "--out=o"), 2, "not a checkpoint file"),
    ("sample-model-empty", ("sample", "--model=empty", "--prompt=a", "--out=o"), 2, "unet/config.json"),
    ("sample-model-autoencoder", ("sample", "--model=ae", "--prompt=a", "--out=o"), 2, "'autoencoder' stage"),
    ("sample-guidance-nan", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--guidance_scale=nan"), 2,
     "--guidance_scale=nan is not a finite"),
    ("sample-guidance-inf", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--guidance_scale=inf"), 2,
     "not a finite number"),
    ("sample-eta-nan", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--eta=nan"), 2, "--eta=nan"),
    ("sample-steps-zero", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--num_steps=0"), 2, "--num_steps"),
    ("sample-strength-range", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--init_image=image16.png",
                               "--strength=1.5"), 2, "--strength"),
    ("sample-height-not-8", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--height=30"), 2, "multiple of 8"),
    ("sample-mask-without-image", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--mask=mask24.png"), 2,
     "--init_image"),
    ("sample-num-images-zero", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--num_images=0"), 2,
     "--num_images"),
    ("sample-sampler-unknown", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--sampler=dpm_fast"), 2,
     "unknown sampler"),
    ("sample-spacing-unknown", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--spacing=cubic"), 2,
     "spacing"),
    ("sample-dtype-unknown", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--dtype=float8"), 2, "float8"),
    ("sample-out-is-file", ("sample", "--model=ldm", "--prompt=a", "--out=afile"), 2, "is a file"),
    ("sample-out-under-file", ("sample", "--model=ldm", "--prompt=a", "--out=afile/o"), 2, "cannot be written"),
    ("sample-out-holds-run", ("sample", "--model=ldm", "--prompt=a", "--out=out_done", "--grid=false"), 2,
     "already holds 0000-seed0.png"),
    ("sample-prompts-file-missing", ("sample", "--model=ldm", "--prompts_file=gone.txt", "--out=o"), 2,
     "not found"),
    ("sample-prompts-not-utf8", ("sample", "--model=ldm", "--prompts_file=latin1.txt", "--out=o"), 2,
     "not UTF-8"),
    ("sample-no-prompts", ("sample", "--model=ldm", "--out=o"), 2, "empty prompt list"),
    ("sample-init-image-junk", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--init_image=junk.png"), 2,
     "junk.png"),
    ("sample-init-image-missing", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--init_image=gone.png"), 2,
     "gone.png"),
    ("sample-mask-size", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--init_image=image16.png",
                          "--mask=mask24.png"), 2, "must match"),
    ("sample-lora-missing", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--lora=gone.safetensors"), 2,
     "'gone.safetensors' not found"),
    ("sample-lora-weight-nan", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--lora=afile:nan"), 2,
     "finite number"),
    ("sample-lora-not-safetensors", ("sample", "--model=ldm", "--prompt=a", "--out=o", "--lora=afile"), 2,
     "not a readable safetensors file"),
    ("sample-damaged-config", ("sample", "--model=ldm_badjson", "--prompt=a", "--out=o"), 2, "damaged"),
    ("sample-truncated-arrays", ("sample", "--model=ldm_truncated", "--prompt=a", "--out=o"), 2, "damaged"),
    # -- evaluate
    ("evaluate-nothing", ("evaluate",), 2, "--workdir"),
    ("evaluate-both", ("evaluate", "--workdir=ldm", "--images=images"), 2, "either"),
    ("evaluate-workdir-missing", ("evaluate", "--workdir=gone"), 2, "does not exist"),
    ("evaluate-workdir-file", ("evaluate", "--workdir=afile"), 2, "is a file"),
    ("evaluate-workdir-untrained", ("evaluate", "--workdir=empty"), 2, "holds no checkpoints"),
    ("evaluate-features-unknown", ("evaluate", "--workdir=ldm", "--features=vgg"), 2, "--features"),
    ("evaluate-save-images-full", ("evaluate", "--workdir=ldm", "--save_images=full"), 2, "not empty"),
    ("evaluate-save-images-file", ("evaluate", "--workdir=ldm", "--save_images=afile"), 2, "is a file"),
    ("evaluate-out-is-folder", ("evaluate", "--workdir=ldm", "--out=empty"), 2, "is a folder"),
    ("evaluate-out-no-folder", ("evaluate", "--workdir=ldm", "--out=gone/eval.json"), 2, "does not exist"),
    ("evaluate-guidance-nan", ("evaluate", "--workdir=ldm", "--guidance_scale=nan"), 2, "not a finite"),
    ("evaluate-damaged-config", ("evaluate", "--workdir=ldm_badjson"), 2, "damaged"),
    ("evaluate-truncated-arrays", ("evaluate", "--workdir=ldm_truncated"), 2, "damaged"),
    ("evaluate-images-missing", ("evaluate", "--images=gone", "--reference=images"), 2, "gone"),
    ("evaluate-broken-image", ("evaluate", "--images=broken_images", "--reference=images"), 2, "3.png"),
    ("evaluate-prompts-not-utf8", ("evaluate", "--images=images", "--prompts=latin1.txt", "--clip=empty"), 2,
     ""),
    # -- convert
    ("convert-no-dst", ("convert", "--src=ldm"), 2, "--dst"),
    ("convert-src-missing", ("convert", "--src=gone", "--dst=c"), 2, "does not exist"),
    ("convert-dst-file", ("convert", "--src=ldm", "--dst=afile"), 2, "is a file"),
    ("convert-dst-not-empty", ("convert", "--src=ldm", "--dst=full"), 2, "not empty"),
    ("convert-src-not-workdir", ("convert", "--src=empty", "--dst=c"), 2, "without checkpoints"),
    ("convert-src-truncated", ("convert", "--src=ldm_truncated", "--dst=c"), 2, "damaged"),
    # -- demo and sweep
    ("demo-variant-unknown", ("demo", "--variant=huge"), 2, "--variant"),
    ("demo-other-settings", ("demo", "--variant=tiny", "--workdir=demo_other"), 2, "holds a 'ldm' run"),
    ("sweep-no-sweep-section", ("sweep", f"--config={AE_CFG}:tiny", "--workdir=sw"), 2, "sweep"),
    ("sweep-run-lr-nan", ("sweep", f"--config={SWEEP_CFG}:tiny", "--workdir=sw", "--config.optimizer.lr=nan"), 2,
     "not a finite number"),
    ("sweep-sampler-unknown", ("sweep", f"--config={SWEEP_CFG}:tiny", "--workdir=sw",
                               "--config.sweep.eval.samplers=('ddim', 'dpm_fast')"), 2, "unknown sampler"),
]


def test_case_count():
    assert len({name for name, *_ in CASES}) == len(CASES) >= 60


@pytest.mark.parametrize("name, argv, code, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input(cli, world, name, argv, code, needle):
    before = snapshot(world.root)
    argv = [a.replace("{data}", str(world.data)) for a in argv]
    rc, stdout, stderr = cli.run(*argv, cwd=world.root)
    lines = error_lines(stderr)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert rc == code, (rc, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert needle in lines[0], lines[0]
    assert snapshot(world.root) == before, "files changed"


# ---------------------------------------------------------------------------------------------------- faults
def test_damaged_newest_checkpoint_is_set_aside_with_one_warning_and_training_resumes(cli, world, tmp_path):
    run = tmp_path / "toy"
    rc, _, err = cli.run("train", f"--config={TOY_CFG}", f"--workdir={run}", "--config.train.num_steps=8",
                         "--config.checkpoint.every_steps=4", cwd=tmp_path)
    assert rc == 0, err[-2000:]
    for f in (run / "checkpoints" / "8" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            with open(f, "r+b") as fh:
                fh.truncate(8)
    older = snapshot(run / "checkpoints" / "4")
    rc, _, err = cli.run("train", f"--config={TOY_CFG}", f"--workdir={run}", "--config.train.num_steps=8",
                         "--config.checkpoint.every_steps=4", cwd=tmp_path)
    lines = error_lines(err)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    damaged = [line for line in lines if "is damaged" in line]
    assert len(damaged) == 1 and "resumed from checkpoint step 4" in err, lines
    assert len(lines) <= 3, lines  # the damaged checkpoint, the resume, the mesh note at most
    assert snapshot(run / "checkpoints" / "4") == older and os.listdir(run / "checkpoints_corrupt")
    assert sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit()) == [4, 8]


def test_a_failed_save_stops_the_run_at_once_in_one_line_and_a_rerun_resumes(cli, world, tmp_path):
    run = tmp_path / "toy"
    argv = ("train", f"--config={TOY_CFG}", f"--workdir={run}", "--config.train.num_steps=8",
            "--config.checkpoint.every_steps=2", "--config.toy.width=64")
    rc, _, err = cli.run(*argv, cwd=tmp_path, limits={"fsize": 4096})  # files cannot grow past 4 KiB: "disk full"
    lines = error_lines(err)
    assert rc == 1 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("error: saving") and "training stopped" in lines[-1], lines
    assert not [n for n in os.listdir(run / "checkpoints") if n.isdigit()]  # no partial checkpoint is left
    rc, _, err = cli.run(*argv, cwd=tmp_path)
    assert rc == 0, err[-2000:]
    assert sorted(int(n) for n in os.listdir(run / "checkpoints") if n.isdigit())[-1] == 8


def test_non_finite_training_halts_in_one_line_or_skips(cli, world, tmp_path):
    argv = ("train", f"--config={TOY_CFG}", "--config.train.num_steps=6", "--config.checkpoint.every_steps=2",
            "--config.toy.nan_step=4")
    rc, _, err = cli.run(*argv, f"--workdir={tmp_path / 'halt'}", cwd=tmp_path)
    lines = error_lines(err)
    assert rc == 1 and "Traceback" not in err and lines[-1].startswith("error: non-finite loss"), lines
    assert "newest checkpoint is step 2" in lines[-1]
    rc, _, err = cli.run(*argv, f"--workdir={tmp_path / 'skip'}", "--config.train.on_nonfinite=skip", cwd=tmp_path)
    assert rc == 0 and "update skipped" in err, err[-2000:]


def test_workdirs_moved_together_still_sample_the_same_images(cli, world, tmp_path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(world.root / "ae", moved / "ae")
    shutil.copytree(world.root / "ldm", moved / "ldm")
    argv = ("sample", "--prompt=a red circle", "--num_steps=2", "--grid=false")
    rc, _, err = cli.run(*argv, "--model=ldm", f"--out={tmp_path / 'here'}", cwd=world.root)
    assert rc == 0, err[-2000:]
    os.rename(world.root / "ae", world.root / "ae_hidden")  # the original autoencoder is gone
    try:
        rc, _, err = cli.run(*argv, "--model=ldm", f"--out={tmp_path / 'missing'}", cwd=world.root)
        assert rc == 2 and "model.vae.workdir" in error_lines(err)[-1], err[-2000:]
        rc, _, err = cli.run(*argv, f"--model={moved / 'ldm'}", f"--out={tmp_path / 'moved'}", cwd=tmp_path)
        assert rc == 0, err[-2000:]
    finally:
        os.rename(world.root / "ae_hidden", world.root / "ae")
    here, there = (np.asarray(Image.open(tmp_path / d / "0000-seed0.png")) for d in ("here", "moved"))
    np.testing.assert_array_equal(here, there)  # the pixels (the PNG's text names the model path it came from)
