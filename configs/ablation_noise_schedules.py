"""Noise-schedule ablation on `shapes` (or `fashion_mnist`) at CPU scale: schedule x parametrization x
weighting x seeds, every run evaluated with ddim / euler / heun / dpmpp_2m at 10 / 20 / 50 NFE.

    ldm-jax sweep --config=configs/ablation_noise_schedules.py --workdir=runs/ablation_shapes
    ldm-jax sweep --config=configs/ablation_noise_schedules.py:fashion_mnist --workdir=runs/ablation_fmnist
    ldm-jax sweep --config=configs/ablation_noise_schedules.py:tiny --workdir=/tmp/sweep   # seconds (tests)

Schedules (zipped): linear, cosine, sigmoid, edm, shifted cosine (shift 2) and cosine with zero terminal SNR;
crossed with prediction eps / v and weighting uniform / min-SNR(5), seeds 0 and 1: 48 runs. With zero
terminal SNR and eps-prediction the last step cannot recover x0 (alpha = 0); the diffusion core clamps the
final time, so those runs measure that failure rather than crash (Lin et al. 2023 pair zero SNR with v).
"""

from ldm_jax.configlib import load_config

_SCHEDULES = dict(schedule=("linear", "cosine", "sigmoid", "edm", "cosine", "cosine"),
                  shift=(1.0, 1.0, 1.0, 1.0, 2.0, 1.0),
                  zero_snr=(False, False, False, False, False, True))


def get_config(arg=None):
    arg = arg or "shapes"
    if arg not in ("shapes", "fashion_mnist", "tiny"):
        raise ValueError(f"unknown variant '{arg}' of ablation_noise_schedules: use shapes, fashion_mnist or tiny")
    if arg == "fashion_mnist":
        c = load_config("configs/fashion_mnist.py:ldm")
        ae = "configs/fashion_mnist.py:autoencoder"
    else:
        c = load_config("configs/shapes_ldm.py" + (":tiny" if arg == "tiny" else ""))
        ae = "configs/shapes_autoencoder.py" + (":tiny" if arg == "tiny" else "")
    c.model.vae.workdir = ""  # the sweep trains one shared autoencoder from sweep.autoencoder
    c.train.num_steps = 1200 if arg != "tiny" else 2
    c.sample.every_steps = 0
    c.sweep = dict(
        title=f"Noise schedules on {c.data.name}",
        autoencoder=ae,
        zip=dict(diffusion=_SCHEDULES),
        product=dict(diffusion=dict(prediction=("eps", "v"), weighting=("uniform", "min_snr"))),
        seeds=(0, 1),
        eval=dict(samplers=("ddim", "euler", "heun", "dpmpp_2m"), nfes=(10, 20, 50), num_samples=72,
                  guidance_scale=3.0, primary="shape_acc" if c.data.name == "shapes" else "fd_fmnist"),
    )
    if arg == "tiny":
        c.sweep.zip = {}
        c.sweep.product = dict(diffusion=dict(schedule=("linear", "cosine")))
        c.sweep.seeds = ()
        c.sweep.eval = dict(samplers=("ddim", "heun"), nfes=(2,), num_samples=18, guidance_scale=2.0,
                            primary="shape_acc")
    return c
