"""Trains the Fashion-MNIST feature net behind FD-FMNIST and writes its weights and a results file.

    python experiments/fmnist_features/train.py --epochs 8 \
        --out ldm_jax/eval/weights/fmnist_net.safetensors

Reports the test accuracy and the real-data floor of FD-FMNIST (Fréchet distance between the features of
the train and test splits, and between two disjoint halves of the train split) in results.json beside
this script. See README.md for the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ldm_jax.eval import fmnist_net
from ldm_jax.eval.frechet import FeatureStats, kernel_inception_distance, stats_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_steps", type=int, default=0, help="stop early (smoke runs)")
    parser.add_argument("--out", default=str(fmnist_net.WEIGHTS))
    parser.add_argument("--results", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args()

    train_x, train_y = fmnist_net.load_fashion_mnist("train")
    test_x, test_y = fmnist_net.load_fashion_mnist("test")
    num_steps = args.epochs * (len(train_x) // args.batch_size)
    num_steps = min(num_steps, args.max_steps) if args.max_steps else num_steps
    start = time.time()
    params, _ = fmnist_net.train(
        train_x, train_y, num_steps=num_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
        seed=args.seed, log_every=len(train_x) // args.batch_size,
        log_fn=lambda step, loss: print(f"step {step}: loss {loss:.4f} ({time.time() - start:.0f} s)",
                                        flush=True),
    )
    train_time = time.time() - start
    test_acc = fmnist_net.accuracy(params, test_x, test_y)
    train_acc = fmnist_net.accuracy(params, train_x, train_y)
    print(f"test accuracy {test_acc:.4f}, train accuracy {train_acc:.4f}, {train_time:.0f} s")

    features = fmnist_net.fmnist_feature_fn(params, batch_size=1000)
    f_train, f_test = features(train_x[..., None]), features(test_x[..., None])
    half = len(f_train) // 2
    perm = np.random.default_rng(0).permutation(len(f_train))
    results = {
        "epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "seed": args.seed, "steps": num_steps, "train_seconds": round(train_time, 1),
        "test_accuracy": test_acc, "train_accuracy": train_acc,
        "fd_train_vs_test": stats_distance(FeatureStats.from_features(f_train),
                                           FeatureStats.from_features(f_test)),
        "fd_train_half_vs_half": stats_distance(FeatureStats.from_features(f_train[perm[:half]]),
                                                FeatureStats.from_features(f_train[perm[half:]])),
        "fd_test_first5k_vs_last5k": stats_distance(FeatureStats.from_features(f_test[:5000]),
                                                    FeatureStats.from_features(f_test[5000:])),
        "kid_train_vs_test": kernel_inception_distance(f_train, f_test),
    }
    print(json.dumps(results, indent=2))
    fmnist_net.save_weights(args.out, params, metadata={"test_accuracy": f"{test_acc:.4f}", "seed": args.seed,
                                                        "epochs": args.epochs})
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
