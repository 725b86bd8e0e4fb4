"""ldm-jax evaluate: score a trained workdir, or compare two folders of images.

    ldm-jax evaluate --workdir=runs/demo/ldm                  # shapes: colour/shape/position accuracy
    ldm-jax evaluate --workdir=runs/fmnist/ldm --num_samples=2000    # fashion_mnist: FD-FMNIST and KID
    ldm-jax evaluate --workdir=runs/demo/autoencoder         # PSNR / SSIM / rFD on held-out data + photos
    ldm-jax evaluate --images=gen/ --reference=real/ --features=inception \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth [--precision_recall]

A latent-diffusion workdir is sampled from its EMA parameters (sampler, steps and guidance default to the
run's `sample` config). Results go to --out (default WORKDIR/eval.json, or stdout for folders) as JSON, and
one summary line is printed.
"""

from __future__ import annotations

import json
import os
import time
import types

from absl import flags

from ldm_jax.commands._app import fail, start

_WORKDIR = flags.DEFINE_string("workdir", "", "A trained stage's workdir (latent diffusion or autoencoder).")
_IMAGES = flags.DEFINE_string("images", "", "A folder of images to score against --reference.")
_REFERENCE = flags.DEFINE_string("reference", "", "The reference folder of images for --images.")
_FEATURES = flags.DEFINE_enum("features", "fmnist", ["fmnist", "inception"],
                              "Feature network of FD / KID: the framework's Fashion-MNIST net or FID Inception-v3.")
_INCEPTION = flags.DEFINE_string("inception_weights", "", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
_PR = flags.DEFINE_bool("precision_recall", False, "Also improved precision / recall (Kynkaanniemi et al. 2019).")
_NUM = flags.DEFINE_integer("num_samples", 0, "Images to generate (0: 72 for shapes, 2000 for fashion_mnist).")
_SAMPLER = flags.DEFINE_string("sampler", "", "Sampler (default: the run's sample.sampler).")
_STEPS = flags.DEFINE_integer("num_steps", 0, "Sampling steps (default: the run's sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", -1.0, "CFG scale (default: the run's sample.guidance_scale).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the generated images.")
_OUT = flags.DEFINE_string("out", "", "Where the JSON goes (default: WORKDIR/eval.json; stdout for folders).")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_folder(path: str):
    """uint8 (N, H, W, 3) of every image in `path` (sorted; all must share one size)."""
    import numpy as np
    from PIL import Image

    if not os.path.isdir(path):
        fail(f"'{path}' is not a folder of images")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(_IMAGE_EXT))
    if not names:
        fail(f"no images ({', '.join(_IMAGE_EXT)}) in '{path}'")
    images = [np.asarray(Image.open(os.path.join(path, n)).convert("RGB")) for n in names]
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        fail(f"images in '{path}' have several sizes {sorted(sizes)}; resize them to one size first")
    return np.stack(images)


def _feature_fn():
    if _FEATURES.value == "fmnist":
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn

        return fmnist_feature_fn()
    if not _INCEPTION.value:
        fail("--features=inception needs --inception_weights=PATH (pytorch-fid's pt_inception-2015-12-05-6726825d"
             ".pth, or its safetensors copy); nothing is downloaded")
    from ldm_jax.eval.inception import inception_feature_fn

    return inception_feature_fn(_INCEPTION.value)


def distances(feature_fn, real, fake, *, precision_recall: bool = False) -> dict:
    """FD, KID (mean and std over subsets) and optionally precision / recall between two image arrays."""
    import numpy as np

    from ldm_jax.eval.frechet import fid_from_features, kernel_inception_distance
    from ldm_jax.eval.frechet import precision_recall as pr

    feats = lambda x: np.concatenate([np.asarray(feature_fn(x[i:i + 500]), np.float64)
                                      for i in range(0, len(x), 500)])
    fr, ff = feats(real), feats(fake)
    subset = min(1000, len(fr), len(ff))
    kid = kernel_inception_distance(fr, ff, subset_size=subset, num_subsets=50 if subset > 1 else 1)
    out = {"fd": fid_from_features(fr, ff), "kid_mean": kid[0], "kid_std": kid[1], "num_real": len(fr),
           "num_fake": len(ff)}
    if precision_recall:
        out.update(pr(fr, ff, k=min(3, len(fr) - 1, len(ff) - 1)))
    return out


def evaluate_folders() -> dict:
    if not _REFERENCE.value:
        fail("--images needs --reference=FOLDER (the real images to compare with)")
    fake, real = read_folder(_IMAGES.value), read_folder(_REFERENCE.value)
    res = distances(_feature_fn(), real, fake, precision_recall=_PR.value)
    return {"images": _IMAGES.value, "reference": _REFERENCE.value, "features": _FEATURES.value, **res}


def _sampling_options(config) -> dict:
    s = config.get("sample", {})
    return dict(sampler=_SAMPLER.value or str(s.get("sampler", "ddim")),
                num_steps=_STEPS.value or int(s.get("num_steps", 20)),
                guidance_scale=_GUIDANCE.value if _GUIDANCE.value >= 0 else float(s.get("guidance_scale", 3.0)))


def evaluate_ldm(workdir: str, config: dict) -> dict:
    import numpy as np

    from ldm_jax.training.ldm import load_generator

    dataset = config.get("data", {}).get("name", "")
    generator, params = load_generator(workdir)
    opts = _sampling_options(config)
    out = {"workdir": workdir, "stage": "ldm", "dataset": dataset, **opts}
    if dataset == "shapes":
        from ldm_jax.eval.adherence import demo_prompts
        from ldm_jax.eval.adherence import score_demo as score

        prompts, heldout = demo_prompts()
        reps = max(1, -(-(_NUM.value or 72) // len(prompts)))
        images = np.concatenate([generator(params, prompts, seed=_SEED.value + r, **opts) for r in range(reps)])
        out.update(score(images, prompts * reps, heldout * reps), num_images=len(images))
    elif dataset == "fashion_mnist":
        from ldm_jax.data.fashion_mnist import CLASS_NAMES
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn, load_fashion_mnist

        per_class = max(1, (_NUM.value or 2000) // len(CLASS_NAMES))
        prompts = [f"a photo of a {c}" for c in CLASS_NAMES for _ in range(per_class)]
        fake = np.concatenate([generator(params, prompts[i:i + 100], seed=_SEED.value + i, **opts)
                               for i in range(0, len(prompts), 100)])
        real, _ = load_fashion_mnist("test")
        out.update({f"{k}_fmnist" if k.startswith(("fd", "kid")) else k: v for k, v in
                    distances(fmnist_feature_fn(), real[..., None], fake, precision_recall=_PR.value).items()})
    else:
        fail(f"no built-in metric for dataset '{dataset}' (shapes and fashion_mnist have one); sample images "
             "with `ldm-jax sample` and compare folders with --images/--reference")
    return out


def evaluate_autoencoder(workdir: str, config: dict) -> dict:
    import jax
    import numpy as np

    from ldm_jax.data import make_iterator
    from ldm_jax.eval.recon import autoencoder_metrics, photo_crops
    from ldm_jax.models import AutoencoderKL
    from ldm_jax.training import components
    from ldm_jax.training.checkpoint import restore_params

    vae = AutoencoderKL(components.vae_config(config["model"]["vae"]))
    params = components.as_arrays(restore_params(workdir, ema=True))
    roundtrip = jax.jit(lambda x: vae.apply({"params": params}, x)[0])
    data = dict(config["data"], split="test", batch_size=8, shuffle=False, num_epochs=1, caption_dropout=0.0,
                flip=False, latent_cache=None, drop_remainder=False)
    batches, heldout = make_iterator(components.data_config(types.SimpleNamespace(data=data))), []
    for batch in batches:  # up to 256 held-out images, in order
        heldout.append(np.asarray(batch["image"]))
        if sum(map(len, heldout)) >= 256:
            break
    heldout = np.concatenate(heldout)[:256]
    feature_fn = None
    if config["data"].get("name") == "fashion_mnist":
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn

        feature_fn = fmnist_feature_fn()
    out = {"workdir": workdir, "stage": "autoencoder", "dataset": config["data"].get("name")}
    out.update({f"heldout_{k}": v for k, v in autoencoder_metrics(roundtrip, heldout,
                                                                  feature_fn=feature_fn).items()})
    res = int(config["data"].get("resolution", 32))
    out.update({f"photos_{k}": v for k, v in autoencoder_metrics(roundtrip, photo_crops(res, 64)).items()})
    return out


def evaluate_workdir(workdir: str) -> dict:
    from ldm_jax.training.checkpoint import read_config

    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        fail(f"'{workdir}' holds no checkpoints: train it first (ldm-jax train --workdir={workdir} ...)")
    config = read_config(workdir)
    stage = config.get("train", {}).get("stage")
    if stage == "ldm":
        return evaluate_ldm(workdir, config)
    if stage == "autoencoder":
        return evaluate_autoencoder(workdir, config)
    fail(f"'{workdir}' is a '{stage}' run; evaluate scores 'ldm' and 'autoencoder' workdirs")


def main(argv):
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}")
    if bool(_WORKDIR.value) == bool(_IMAGES.value):
        fail("give either --workdir=DIR (a trained run) or --images=DIR --reference=DIR")
    t0 = time.time()
    result = evaluate_workdir(_WORKDIR.value) if _WORKDIR.value else evaluate_folders()
    result["seconds"] = time.time() - t0
    text = json.dumps(result, indent=1, default=float)
    out = _OUT.value or (os.path.join(_WORKDIR.value, "eval.json") if _WORKDIR.value else "")
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        print(text)
    scalars = {k: v for k, v in result.items() if isinstance(v, float) and k not in ("seconds", "guidance_scale")}
    print("evaluate: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()) + (f" -> {out}" if out else ""))


def run_cli(argv):
    start(main, argv)
