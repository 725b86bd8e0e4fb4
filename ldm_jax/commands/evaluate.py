"""ldm-jax evaluate: score a trained workdir, or a folder of images against a reference.

    ldm-jax evaluate --workdir=runs/demo/ldm                  # shapes: colour/shape/position accuracy
    ldm-jax evaluate --workdir=runs/fmnist/ldm --num_samples=2000    # fashion_mnist: FD-FMNIST and KID
    ldm-jax evaluate --workdir=runs/demo/autoencoder         # PSNR / SSIM / rFD on held-out data + photos
    ldm-jax evaluate --images=gen/ --reference=real/ --features=inception \
        --inception_weights=pt_inception-2015-12-05-6726825d.pth [--precision_recall]
    ldm-jax evaluate --images=gen/ --reference=fashion_mnist:test      # FD-FMNIST of a folder
    ldm-jax evaluate --images=samples/ --clip=clip-vit-base-patch32    # CLIP score (prompts from the PNGs)
    ldm-jax evaluate --images=gen/ --inception_score --inception_weights=pt_inception-2015-12-05-6726825d.pth

A latent-diffusion workdir is sampled from its EMA parameters through `LatentDiffusion.generate` (sampler,
steps, guidance and micro-batch default to the run's `sample` config; image i uses seed + i, so
--save_images=DIR writes the images `ldm-jax sample` makes for the same prompts and seed), and scored by
`ldm_jax.eval.generated` (the code the training callbacks and sweeps use).
--reference is a folder or a dataset name with an optional split (default test):
`fashion_mnist` reads Debian's files as FD-FMNIST does; other names (shapes, openmoji, a prepared tfds
dataset) go through the data pipeline at the size of the --images. --clip=PATH (an HF CLIPModel folder)
adds the CLIP score of the images against their prompts: for a folder, the 'prompt' text chunk that
`ldm-jax sample` writes into each PNG, or --prompts=FILE (one line per image, file-name order).
Results go to --out (default WORKDIR/eval.json, or stdout for folders) as JSON, and one summary line is
printed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import types

from absl import flags

from ldm_jax import images as imlib
from ldm_jax.commands._app import check_output_file, check_workdir_exists, check_writable_folder, fail, start
from ldm_jax.eval.generated import DATASETS, evaluate_generated
from ldm_jax.ldm import LatentDiffusion, SampleConfig
from ldm_jax.types import read_utf8

FEATURES = ("fmnist", "inception", "clip")
_WORKDIR = flags.DEFINE_string("workdir", "", "A trained stage's workdir (latent diffusion or autoencoder).")
_IMAGES = flags.DEFINE_string("images", "", "A folder of images to score.")
_REFERENCE = flags.DEFINE_string("reference", "", "What --images is compared with: a folder of images or a "
                                 "dataset name[:split] (fashion_mnist, shapes, openmoji, a prepared tfds name).")
_FEATURES = flags.DEFINE_string("features", "fmnist", "Feature network of FD / KID / precision-recall: fmnist "
                                "(the framework's Fashion-MNIST net), inception (FID Inception-v3, needs "
                                "--inception_weights) or clip (CLIP image embeddings, needs --clip).")
_INCEPTION = flags.DEFINE_string("inception_weights", "", "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
_CLIP = flags.DEFINE_string("clip", "", "An HF CLIPModel folder: CLIP score of the images, and --features=clip.")
_PROMPTS = flags.DEFINE_string("prompts", "", "Prompts of --images for the CLIP score, one line per image in "
                               "file-name order (default: each PNG's 'prompt' text chunk).")
_PR = flags.DEFINE_bool("precision_recall", False, "Also improved precision / recall (Kynkaanniemi et al. 2019).")
_IS = flags.DEFINE_bool("inception_score", False, "Also the Inception Score of the images (Salimans et al. 2016, "
                        "torch-fidelity's conventions, 10 splits); needs --inception_weights with the fc layer.")
_NUM_REF = flags.DEFINE_integer("num_reference", 10000, "Most images read from a dataset --reference.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data_dir of a dataset --reference (default: $TFDS_DATA_DIR"
                                " or ~/tensorflow_datasets).")
_NUM = flags.DEFINE_integer("num_samples", 0, "Images to generate (0: 72 for shapes, 2000 for fashion_mnist, "
                            "256 otherwise).")
_SAMPLER = flags.DEFINE_string("sampler", "", "Sampler (default: the run's sample.sampler).")
_STEPS = flags.DEFINE_integer("num_steps", 0, "Sampling steps (default: the run's sample.num_steps).")
_MICRO = flags.DEFINE_integer("micro_batch", 0, "Images the network sees at once (default: the run's "
                              "sample.micro_batch).")
_SAVE = flags.DEFINE_string("save_images", "", "Also write the generated images here (a new folder), one PNG per "
                            "image as `ldm-jax sample` writes them.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", -1.0, "CFG scale (default: the run's sample.guidance_scale).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first generated image; image i uses seed + i.")
_OUT = flags.DEFINE_string("out", "", "Where the JSON goes (default: WORKDIR/eval.json; stdout for folders).")
_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_USER_ERRORS = (ValueError, OSError)  # ConfigError, DataError, ConversionError, missing or unreadable files


def read_folder(path: str):
    """(uint8 (N, H, W, 3), prompts) of every image in `path`, sorted by name; all must share one size.

    A prompt is the PNG's 'prompt' text chunk (None when absent). `ldm-jax sample`'s grid.png is skipped.
    """
    import numpy as np

    if not os.path.isdir(path):
        fail(f"'{path}' is not a folder of images")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(_IMAGE_EXT) and n != "grid.png")
    if not names:
        fail(f"no images ({', '.join(_IMAGE_EXT)}) in '{path}'")
    images, prompts = [], []
    for n in names:
        try:
            image, text = imlib.read_image(os.path.join(path, n))
        except _USER_ERRORS as e:
            fail(str(e))
        images.append(image)
        prompts.append(text.get("prompt"))
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        fail(f"images in '{path}' have several sizes {sorted(sizes)}; resize them to one size first")
    return np.stack(images), prompts


def load_clip_scorer():
    """The CLIPScorer of --clip (None without it)."""
    if not _CLIP.value:
        return None
    from ldm_jax.eval.clip_score import CLIPScorer

    try:
        return CLIPScorer.from_pretrained(_CLIP.value)
    except _USER_ERRORS as e:
        fail(f"--clip={_CLIP.value}: {e}")


def feature_fn(name: str, scorer=None):
    """images -> (N, F) features of the --features network."""
    try:
        if name == "fmnist":
            from ldm_jax.eval.fmnist_net import fmnist_feature_fn

            return fmnist_feature_fn()
        if name == "inception":
            if not _INCEPTION.value:
                fail("--features=inception needs --inception_weights=PATH (pytorch-fid's pt_inception-2015-12-05-"
                     "6726825d.pth, or its safetensors copy); nothing is downloaded")
            from ldm_jax.eval.inception import inception_feature_fn

            return inception_feature_fn(_INCEPTION.value)
    except _USER_ERRORS as e:
        fail(f"--features={name}: {e}")
    if scorer is None:
        fail("--features=clip needs --clip=PATH (a transformers CLIPModel folder); nothing is downloaded")
    return scorer.image_features


def features_of(fn, batches):
    """float64 (N, F) features of an iterable of image batches, 500 images per call."""
    import numpy as np

    out = [np.asarray(fn(b[i:i + 500]), np.float64) for b in batches for i in range(0, len(b), 500)]
    return np.concatenate(out)


def distances(real, fake, *, precision_recall: bool = False) -> dict:
    """FD, KID (mean and std over subsets) and optionally precision / recall between two feature arrays."""
    from ldm_jax.eval.frechet import fid_from_features, kernel_inception_distance
    from ldm_jax.eval.frechet import precision_recall as pr

    if min(len(real), len(fake)) < 2 or (precision_recall and min(len(real), len(fake)) < 4):
        fail(f"too few images ({len(fake)} vs {len(real)} reference): FD and KID need 2 per set, precision / "
             "recall 4")
    subset = min(1000, len(real), len(fake))
    kid = kernel_inception_distance(real, fake, subset_size=subset, num_subsets=50)
    out = {"fd": fid_from_features(real, fake), "kid_mean": kid[0], "kid_std": kid[1], "num_real": len(real),
           "num_fake": len(fake)}
    if precision_recall:
        out.update(pr(real, fake, k=3))
    return out


def reference_batches(spec: str, resolution: int):
    """Image batches of --reference: a folder, fashion_mnist[:split] (Debian's 28x28 files, as FD-FMNIST
    uses) or another dataset name[:split] read in order through the data pipeline at `resolution`."""
    import numpy as np

    if os.path.isdir(spec):
        return [read_folder(spec)[0]]
    name, _, split = spec.partition(":")
    if not name.replace("_", "").replace("-", "").isalnum():
        fail(f"--reference '{spec}' is neither a folder of images nor a dataset name[:split] (fashion_mnist, "
             "shapes, openmoji or a prepared tfds dataset)")
    split, limit = split or "test", max(1, _NUM_REF.value)
    if name == "fashion_mnist":
        from ldm_jax.eval.fmnist_net import load_fashion_mnist

        real, _ = load_fashion_mnist(split)
        return [np.repeat(real[:limit, ..., None], 3, axis=-1)]
    from ldm_jax.data import DataConfig, make_iterator

    data = DataConfig(name=name, split=split, data_dir=_DATA_DIR.value or None, resolution=resolution,
                      batch_size=250, shuffle=False, num_epochs=1, drop_remainder=False, caption_dropout=0.0)
    return _take((b["image"] for b in make_iterator(data)), limit)


def _take(batches, limit: int):
    seen = 0
    for batch in batches:
        yield batch[:limit - seen]
        seen += len(batch)
        if seen >= limit:
            return


def folder_prompts(prompts: list, count: int) -> list[str]:
    """--prompts lines, else the PNG prompts read with the images (all must be present)."""
    if _PROMPTS.value:
        try:
            prompts = [line for line in read_utf8(_PROMPTS.value, "prompts file").splitlines() if line.strip()]
        except _USER_ERRORS as e:
            fail(f"--prompts: {e}")
        if len(prompts) != count:
            fail(f"--prompts={_PROMPTS.value} has {len(prompts)} lines for {count} images; give one per image")
    elif None in prompts:
        fail(f"{prompts.count(None)} of {count} images carry no 'prompt' text chunk; pass --prompts=FILE (one "
             "line per image, file-name order) for the CLIP score")
    return list(prompts)


def inception_score_of(images) -> dict:
    """{"inception_score", "inception_score_std"} of uint8 images under --inception_weights' classifier."""
    if not _INCEPTION.value:
        fail("--inception_score needs --inception_weights=PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, "
             "with its fc layer); nothing is downloaded")
    from ldm_jax.eval.inception import inception_logits_fn
    from ldm_jax.eval.inception_score import inception_score

    try:
        logits = features_of(inception_logits_fn(_INCEPTION.value), [images])
        mean, std = inception_score(logits, splits=min(10, len(images)))
    except _USER_ERRORS as e:
        fail(f"--inception_score: {e}")
    return {"inception_score": mean, "inception_score_std": std}


def evaluate_folders() -> dict:
    if not _REFERENCE.value and not _CLIP.value and not _IS.value:
        fail("--images needs --reference=FOLDER_or_DATASET (FD / KID), --clip=PATH (CLIP score) and/or "
             "--inception_score")
    images, prompts = read_folder(_IMAGES.value)
    prompts = folder_prompts(prompts, len(images)) if _CLIP.value else None
    scorer = load_clip_scorer()
    out = {"images": _IMAGES.value, "num_images": len(images)}
    if _REFERENCE.value:
        try:
            batches = reference_batches(_REFERENCE.value, max(images.shape[1:3]))  # checked before any model loads
            fn = feature_fn(_FEATURES.value, scorer)
            real = features_of(fn, batches)
        except _USER_ERRORS as e:
            fail(f"--reference={_REFERENCE.value}: {e}")
        out.update(reference=_REFERENCE.value, features=_FEATURES.value,
                   **distances(real, features_of(fn, [images]), precision_recall=_PR.value))
    if scorer is not None:
        out.update(scorer(images, prompts))
    if _IS.value:
        out.update(inception_score_of(images))
    return out


def _sampling_options(sample: SampleConfig) -> dict:
    """The run's `sample` settings with the command line's changes (the same names as ``ldm-jax sample``)."""
    changes = dict(sampler=_SAMPLER.value or None, num_steps=_STEPS.value or None,
                   guidance_scale=_GUIDANCE.value if _GUIDANCE.value >= 0 else None,
                   micro_batch=_MICRO.value or None, seed=_SEED.value)
    return sample.replace(**{k: v for k, v in changes.items() if v is not None}).generate_kwargs()


def _test_captions(config: dict, count: int) -> list[str]:
    """The first `count` captions of the run's test split (prompts for the CLIP score of other datasets)."""
    from ldm_jax.data import DataConfig, make_iterator

    data = dict(config["data"], split="test", batch_size=8, shuffle=False, num_epochs=1, caption_dropout=0.0,
                latent_cache=None, drop_remainder=False)
    out = []
    for batch in make_iterator(DataConfig.from_run_config(types.SimpleNamespace(data=data))):
        out += [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]
        if len(out) >= count:
            break
    return out[:count]


def evaluate_ldm(workdir: str, config: dict) -> dict:
    """Shapes adherence or FD-FMNIST / KID of generated images (`generated.evaluate_generated`, as the
    training callbacks and sweeps compute them), plus the CLIP score with --clip."""
    dataset = config.get("data", {}).get("name", "")
    scorer = load_clip_scorer()
    if dataset not in DATASETS and scorer is None:
        fail(f"no built-in metric for dataset '{dataset}' (shapes and fashion_mnist have one): pass --clip=PATH "
             "for the CLIP score, or sample with `ldm-jax sample` and compare folders with --images/--reference")
    if _SAVE.value:
        check_output_folder(_SAVE.value)
    model = LatentDiffusion.from_workdir(workdir)
    settings = _sampling_options(model.sample)
    seed = settings.pop("seed")
    out = {"workdir": workdir, "stage": "ldm", "dataset": dataset, "seed": seed, **settings}
    generate = lambda prompts, s: model.generate(prompts, seed=s, batch_size=64, progress=True,  # noqa: E731
                                                 **settings)
    if dataset in DATASETS:
        n = _NUM.value or {"shapes": 72, "fashion_mnist": 2000}[dataset]
        result, images, prompts = evaluate_generated(dataset, generate, num_samples=n, seed=seed,
                                                     precision_recall=_PR.value, return_images=True)
        out.update(result)
    else:
        prompts = _test_captions(config, _NUM.value or 256)
        images = generate(prompts, seed)
        out["num_images"] = len(images)
    if scorer is not None:
        out.update(scorer(images, prompts))
    if _IS.value:
        out.update(inception_score_of(images))
    if _SAVE.value:
        imlib.save_generated(_SAVE.value, images, prompts, seed, dict(model=workdir, **settings))
    return out


def check_output_folder(path: str) -> None:
    """--save_images must be a new or empty folder (images of another evaluation are never overwritten)."""
    if os.path.isdir(path) and os.listdir(path):
        fail(f"--save_images={path} is not empty; pass a new folder")
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"--save_images={path} is a file; pass a new folder")
    check_writable_folder(path, "--save_images")  # before the images are generated


def evaluate_autoencoder(workdir: str, config: dict) -> dict:
    """PSNR / SSIM (and rFD-FMNIST on fashion_mnist) on 256 held-out images and 64 photo crops."""
    import jax
    import ml_collections

    from ldm_jax.eval.recon import autoencoder_metrics, photo_crops
    from ldm_jax.eval.stage_metrics import heldout_images
    from ldm_jax.ldm import build
    from ldm_jax.ldm.workdirs import restore_params
    from ldm_jax.models import AutoencoderKL

    vae = AutoencoderKL(build.vae_config(config["model"]["vae"]))
    params = build.as_arrays(restore_params(workdir, ema=True))
    roundtrip = jax.jit(lambda x: vae.apply({"params": params}, x)[0])
    heldout = heldout_images(ml_collections.ConfigDict(config), 256)
    fn = None
    if config["data"].get("name") == "fashion_mnist":
        from ldm_jax.eval.fmnist_net import fmnist_feature_fn

        fn = fmnist_feature_fn()
    out = {"workdir": workdir, "stage": "autoencoder", "dataset": config["data"].get("name")}
    out.update({f"heldout_{k}": v for k, v in autoencoder_metrics(roundtrip, heldout, feature_fn=fn).items()})
    res = int(config["data"].get("resolution", 32))
    out.update({f"photos_{k}": v for k, v in autoencoder_metrics(roundtrip, photo_crops(res, 64)).items()})
    return out


def evaluate_workdir(workdir: str) -> dict:
    from ldm_jax.ldm.workdirs import read_config

    check_workdir_exists(workdir)
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
        fail("give either --workdir=DIR (a trained run) or --images=DIR with --reference=DIR_or_DATASET / --clip")
    if _FEATURES.value not in FEATURES:
        from ldm_jax.types import nearest

        fail(f"unknown --features '{_FEATURES.value}'{nearest(_FEATURES.value, FEATURES)}; choose one of "
             f"{', '.join(FEATURES)}")
    out = _OUT.value or (os.path.join(_WORKDIR.value, "eval.json") if _WORKDIR.value else "")
    if _WORKDIR.value:
        check_workdir_exists(_WORKDIR.value)
    if out:
        check_output_file(out, "--out")
    if _SAVE.value:
        check_output_folder(_SAVE.value)
    t0 = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON (tfds prints while preparing)
        result = evaluate_workdir(_WORKDIR.value) if _WORKDIR.value else evaluate_folders()
    result["seconds"] = time.time() - t0
    text = json.dumps(result, indent=1, default=float)
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        print(text)
    scalars = {k: v for k, v in result.items() if isinstance(v, float) and k not in ("seconds", "guidance_scale")}
    print("evaluate: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()) + (f" -> {out}" if out else ""))


def run_cli(argv):
    start(main, argv)
