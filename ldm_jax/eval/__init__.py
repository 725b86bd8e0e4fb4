"""Evaluation: Fréchet distance / KID / precision-recall on any features, feature extractors, prompt
adherence, reconstruction metrics, and a training callback.

    from ldm_jax import eval as ev
    fd = ev.stats_distance(ev.FeatureStats.from_features(a), ev.FeatureStats.from_features(b))
    feats = ev.fmnist_feature_fn()(images)                # FD-FMNIST features (committed weights)
    feats = ev.inception_feature_fn("pt_inception-2015-12-05-6726825d.pth")(images)   # FID features
    ev.prompt_adherence(images, prompts); ev.autoencoder_metrics(roundtrip, photos)
    ev.inception_score(ev.inception_logits_fn("pt_inception-2015-12-05-6726825d.pth")(images))   # (mean, std)
    ev.evaluate_generated("shapes", lambda prompts, seed: ldm.generate(prompts, seed=seed), num_samples=72)
                                                          # the evaluation every command shares
    ev.EvalCallback(1000, {"fd": ev.frechet_metric(...)})

Submodules load on first use (the shapes checker pulls in tensorflow_datasets, the Inception port is big).
"""

import importlib

_EXPORTS = {
    "frechet": ("FeatureStats", "FeatureReservoir", "ShardedFeatureFn", "accumulate", "data_mesh",
                "fid_from_features", "frechet_distance", "kernel_inception_distance", "mmd2_unbiased",
                "precision_recall", "stats_distance"),
    "fmnist_net": ("FMNISTNet", "FMNISTNetConfig", "fmnist_feature_fn", "load_fashion_mnist"),
    "inception": ("FIDInceptionV3", "inception_feature_fn", "inception_logits_fn"),
    "inception_score": ("inception_score",),
    "generated": ("evaluate_generated", "prompts_for"),
    "clip_score": ("CLIPScorer", "clip_score"),
    "adherence": ("adherence_prompts", "generate_and_score", "prompt_adherence"),
    "recon": ("autoencoder_metrics", "photo_crops", "psnr", "skimage_photos", "ssim"),
    "callback": ("EvalCallback", "adherence_metric", "frechet_metric", "reconstruction_metric",
                 "reference_stats"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"ldm_jax.eval.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'ldm_jax.eval' has no attribute '{name}'")


__all__ = sorted(_WHERE)
