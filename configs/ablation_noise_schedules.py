"""Noise-schedule ablation on `shapes` (or `fashion_mnist`) at CPU scale: schedule x parametrization x
weighting, on the demo's stage-2 model (U-Net (64, 128), 800 steps of batch 32 on the shared autoencoder).

    ldm-jax sweep --config=configs/ablation_noise_schedules.py --workdir=runs/ablation_shapes
    ldm-jax sweep --config=configs/ablation_noise_schedules.py:samplers --workdir=runs/ablation_samplers \
        --reuse_from=runs/ablation_shapes   # evaluates the two settings the shapes study trained
    ldm-jax sweep --config=configs/ablation_noise_schedules.py:fashion_mnist --workdir=runs/ablation_fmnist
    ldm-jax sweep --config=configs/ablation_noise_schedules.py:tiny --workdir=/tmp/sweep   # seconds (tests)

Schedules (zipped): linear (DDPM, terminal logSNR -10.1), cosine, sigmoid, edm (sigma_max 80: -8.8), cosine
shifted by 2 and cosine rescaled to zero terminal SNR. The continuous cosine and sigmoid reach logSNR = -inf
at t = 1; they are truncated at logSNR -10 (`diffusion.logsnr_min`) so that only the zero-SNR run has a pure
noise endpoint and the others differ in shape, not in where they end. Crossed with prediction eps / v and
weighting uniform / min-SNR(5), seed 0: 24 runs; plus a second seed (1) of the six headline settings
(`sweep.extra`), which train first (`sweep.first`), and Stable Diffusion's scaled_linear schedule (terminal
logSNR -5.4) with and without the zero-SNR rescale (v, uniform, seeds 0 and 1: the baseline pair for Lin et
al.'s brightness bias, trained right after the headline settings): 34 runs. Each run is evaluated with ddim
and dpmpp_2m at 10 and 20 NFE (36 images) and, during training, for prompt adherence every 200 steps (ddim
20, 64 images).

The `fashion_mnist` variant trains the six headline settings and the scaled_linear pair once (1200 steps,
FD-FMNIST on 500 images at each evaluation point: every 300 steps with ddim 20 and at the end with ddim and
dpmpp_2m at 20 NFE; dark backgrounds, mean pixel ~0.29, the other side of the brightness bias from shapes'
white ones). The `samplers` variant trains two settings and evaluates every
sampler (ddim, euler, heun, dpmpp_2m) at 10 / 20 / 50 NFE and ddim at 100 (72 images); both settings are
also in the shapes grid, so with `--reuse_from` it only evaluates the shapes study's checkpoints. With zero terminal SNR
and eps-prediction an eps network cannot recover x0 at alpha = 0; the sampler then evaluates the first step at
the next grid level (`diffusion.sampling`, the sampler matrix in the README), so such a run measures how well eps
training covers the high-noise end rather than a sampler failure.
"""

import os

from ldm_jax.configlib import load_config

_HERE = os.path.dirname(os.path.abspath(__file__))  # the configs it builds on sit beside it, wherever it runs from

_SCHEDULES = dict(schedule=("linear", "cosine", "sigmoid", "edm", "cosine", "cosine"),
                  shift=(1.0, 1.0, 1.0, 1.0, 2.0, 1.0),
                  zero_snr=(False, False, False, False, False, True),
                  logsnr_min=(None, -10.0, -10.0, None, -10.0, -10.0))
_LINEAR = dict(schedule="linear", shift=1.0, zero_snr=False, logsnr_min=None)
_COSINE = dict(schedule="cosine", shift=1.0, zero_snr=False, logsnr_min=-10.0)
_ZERO_SNR = dict(_COSINE, zero_snr=True)
# Stable Diffusion's schedule (terminal logSNR -5.4) with and without the zero-terminal-SNR rescale: the pair
# Lin et al. 2023 compare; the grid's schedules all end at logSNR <= -8.8, too close to pure noise to show a bias
_SD = dict(schedule="scaled_linear", shift=1.0, zero_snr=False, logsnr_min=None)
_SD_ZERO_SNR = dict(_SD, zero_snr=True)
_ZERO_SNR_PAIR = ((_SD, "v", "uniform"), (_SD_ZERO_SNR, "v", "uniform"))
# the settings each headline comparison needs, trained with a second seed
_HEADLINE = ((_LINEAR, "eps", "uniform"), (_COSINE, "eps", "uniform"), (_LINEAR, "eps", "min_snr"),
             (_COSINE, "v", "uniform"), (_ZERO_SNR, "v", "uniform"), (_COSINE, "v", "min_snr"))


def _zip(settings) -> dict:
    """sweep.zip of (schedule dict, prediction, weighting) settings: one run per setting."""
    return dict(diffusion={k: tuple(sched[k] for sched, _, _ in settings) for k in _COSINE}
                | dict(prediction=tuple(p for _, p, _ in settings), weighting=tuple(w for _, _, w in settings)))


def get_config(arg=None):
    arg = arg or "shapes"
    if arg not in ("shapes", "samplers", "fashion_mnist", "tiny"):
        raise ValueError(f"unknown variant '{arg}' of ablation_noise_schedules: use shapes, samplers, fashion_mnist "
                         "or tiny")
    if arg == "fashion_mnist":
        c = load_config(os.path.join(_HERE, "fashion_mnist.py:ldm"))
        ae = os.path.join(_HERE, "fashion_mnist.py:autoencoder")
    else:
        c = load_config(os.path.join(_HERE, "shapes_ldm.py") + (":tiny" if arg == "tiny" else ""))
        ae = os.path.join(_HERE, "shapes_autoencoder.py") + (":tiny" if arg == "tiny" else "")
    c.model.vae.workdir = ""  # the sweep trains one shared autoencoder from sweep.autoencoder
    c.sample.every_steps = 0
    c.train.num_steps = {"tiny": 2, "shapes": 800, "samplers": 800}.get(arg, 1200)
    c.checkpoint.every_steps = c.train.num_steps
    if arg != "tiny":  # convergence curves: prompt adherence (shapes) or FD-FMNIST 4 times per run
        c.eval.metrics = ("adherence",) if c.data.name == "shapes" else ("fd_fmnist",)
        c.eval.every_steps = c.train.num_steps // 4
        c.eval.num_samples = 64 if c.data.name == "shapes" else 500
        c.sample.sampler, c.sample.num_steps, c.sample.guidance_scale = "ddim", 20, 3.0
    c.sweep = dict(
        title=f"Noise schedules on {c.data.name}",
        autoencoder=ae,
        zip=dict(diffusion=_SCHEDULES),
        product=dict(diffusion=dict(prediction=("eps", "v"), weighting=("uniform", "min_snr"))),
        seeds=(0,),
        extra=tuple(dict(diffusion=dict(sched, prediction=pred, weighting=w), train=dict(seed=1))
                    for sched, pred, w in _HEADLINE)
        + tuple(dict(diffusion=dict(sched, prediction=pred, weighting=w), train=dict(seed=seed))
                for sched, pred, w in _ZERO_SNR_PAIR for seed in (0, 1)),
        first=tuple(dict(diffusion=dict(sched, prediction=pred, weighting=w))
                    for sched, pred, w in _HEADLINE + _ZERO_SNR_PAIR),
        eval=dict(samplers=("ddim", "dpmpp_2m"), nfes=(10, 20), extra=(), num_samples=36, guidance_scale=3.0,
                  primary="mean_acc" if c.data.name == "shapes" else "fd_fmnist"),
    )
    if arg == "fashion_mnist":  # the second dataset: the headline settings and the scaled_linear pair, one seed
        c.sweep.zip = _zip(_HEADLINE + _ZERO_SNR_PAIR)
        c.sweep.product, c.sweep.extra = {}, ()
        # the scaled_linear pair first: the brightness-bias test is what this dataset adds to the shapes study
        c.sweep.first = tuple(dict(diffusion=dict(sched, prediction=pred, weighting=w))
                              for sched, pred, w in _ZERO_SNR_PAIR)
        c.sweep.eval.num_samples = 500  # FD-FMNIST needs hundreds of images, not the shapes checker's 36
        c.sweep.eval.nfes = (20,)  # each FD point costs minutes; the NFE axis is the samplers variant's job
    if arg == "samplers":  # the sampler comparison: two settings, every sampler at 10 / 20 / 50 NFE, ddim at 100
        c.sweep.zip = _zip(((_COSINE, "v", "min_snr"), (_LINEAR, "eps", "min_snr")))
        c.sweep.product, c.sweep.extra = {}, ()
        c.sweep.title = "Samplers x NFE on shapes"
        c.sweep.eval = dict(samplers=("ddim", "euler", "heun", "dpmpp_2m"), nfes=(10, 20, 50), extra=(("ddim", 100),),
                            num_samples=72, guidance_scale=3.0, primary="mean_acc")
    if arg == "tiny":
        c.sweep.zip = {}
        c.sweep.product = dict(diffusion=dict(schedule=("linear", "cosine")))
        c.sweep.seeds, c.sweep.extra = (), ()
        c.sweep.eval = dict(samplers=("ddim", "heun"), nfes=(2,), extra=(), num_samples=18, guidance_scale=2.0,
                            primary="shape_acc")
    return c
