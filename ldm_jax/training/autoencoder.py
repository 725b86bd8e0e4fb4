"""Stage 1: the KL autoencoder (Rombach et al. 2022, Sec. 3.1 and Appendix G), optionally adversarial.

    loss = rec + kl_weight * KL + lambda_adv * g_loss * [step >= disc_start]
    rec  = mean |x - D(z)|  (or squared, ``autoencoder.loss="l2"``)  [+ perceptual_weight * LPIPS(x, D(z))],
           z ~ q(z | x)
    KL   = KL(q(z|x) || N(0, I)) summed over latent elements / number of image elements  (per-pixel units,
           like rec, so ``kl_weight`` keeps LDM's meaning of a weight on the summed terms)
    g_loss = -mean D_phi(x_rec)   PatchGAN discriminator D_phi with the hinge loss (Isola et al. 2017)
    lambda_adv = disc_weight * ||grad_W rec|| / (||grad_W g_loss|| + 1e-4)  W = the decoder's last conv (LDM's
                 adaptive weight, Esser et al. 2021 Eq. 7), clipped to [0, 1e4]

The discriminator and its optimizer state live in ``TrainState.extra`` and are updated in the same step
(Adam, b1 = 0.5, b2 = 0.9) on  0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))). The perceptual term
(``autoencoder.perceptual_weight``, LPIPS-VGG from `models.lpips`) needs local weight files
(``autoencoder.lpips_vgg``, ``autoencoder.lpips_lin``); its frozen params are the task's ``frozen``.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ldm_jax.data import DataConfig, make_iterator
from ldm_jax.eval import stage_metrics
from ldm_jax.images import make_grid, save_png, to_uint8
from ldm_jax.ldm import build
from ldm_jax.models import AutoencoderKL, unbox
from ldm_jax.models.lpips import LPIPS, load_lpips
from ldm_jax.training.ldm import NumericBatches
from ldm_jax.training.sharding import host_copy
from ldm_jax.training.task import Task
from ldm_jax.types import ConfigError, FrozenConfig


class PatchDiscriminator(nn.Module):
    """PatchGAN: 4x4 stride-2 convs with LeakyReLU(0.2) and GroupNorm, then a 1-channel logit map."""

    channels: int = 64
    num_layers: int = 3

    @nn.compact
    def __call__(self, x):
        h = nn.leaky_relu(nn.Conv(self.channels, (4, 4), strides=2, padding=1)(x), 0.2)
        for i in range(1, self.num_layers):
            c = self.channels * min(2 ** i, 8)
            h = nn.Conv(c, (4, 4), strides=2 if i < self.num_layers - 1 else 1, padding=1, use_bias=False)(h)
            h = nn.leaky_relu(nn.GroupNorm(num_groups=min(32, c // 4))(h), 0.2)
        return nn.Conv(1, (4, 4), padding=1)(h)


def hinge_d_loss(real_logits, fake_logits):
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def reconstruction(x, rec, kind: str):
    diff = x.astype(jnp.float32) - rec.astype(jnp.float32)
    return jnp.mean(jnp.abs(diff)) if kind == "l1" else jnp.mean(jnp.square(diff))


@dataclasses.dataclass(frozen=True)
class AutoencoderLossConfig(FrozenConfig):
    """Typed ``autoencoder`` section: reconstruction loss (l1 / l2) + kl_weight * KL, the PatchGAN from step
    `disc_start` (-1: none) with LDM's adaptive weight times `disc_weight`, and perceptual_weight * LPIPS-VGG
    from the local files `lpips_vgg` (torchvision vgg16 state dict) and `lpips_lin` (lpips' vgg.pth)."""

    loss: str = "l1"
    kl_weight: float = 1e-6
    disc_start: int = -1
    disc_weight: float = 0.5
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: float = 1e-4
    perceptual_weight: float = 0.0
    lpips_vgg: str = ""
    lpips_lin: str = ""

    def __post_init__(self):
        if self.loss not in ("l1", "l2"):
            raise ConfigError(f"autoencoder.loss='{self.loss}': use 'l1' or 'l2'")
        if min(self.kl_weight, self.disc_weight, self.perceptual_weight, self.disc_lr) < 0:
            raise ConfigError("autoencoder.kl_weight, disc_weight, perceptual_weight and disc_lr must be >= 0")
        if self.perceptual_weight > 0 and not (self.lpips_vgg and self.lpips_lin):
            raise ConfigError("autoencoder.perceptual_weight > 0 needs local LPIPS weights: set autoencoder.lpips_vgg "
                              "(torchvision vgg16 .pth) and autoencoder.lpips_lin (lpips vgg.pth)")


def make_task(config, workdir: str):
    """(Task, callbacks) of the autoencoder stage."""
    ac = AutoencoderLossConfig.from_config(config.autoencoder)
    kind = ac.loss
    vae = AutoencoderKL(build.vae_config(config.model.vae, **build.compute_options(config)))
    dcfg = DataConfig.from_run_config(config, caption_dropout=0.0)
    use_gan = ac.disc_start >= 0
    disc = PatchDiscriminator(ac.disc_channels, ac.disc_layers)
    d_tx = optax.adam(ac.disc_lr, b1=0.5, b2=0.9)
    res = dcfg.resolution
    example = jnp.zeros((1, res, res, dcfg.channels), jnp.float32)

    def init(rng):
        return vae.init(rng, example)["params"]

    def decode_with_last(params, z, kernel):
        p = {**params, "decoder": {**params["decoder"], "conv_out": {**params["decoder"]["conv_out"],
                                                                      "kernel": kernel}}}
        return vae.apply({"params": p}, z, method=vae.decode)

    perceptual_weight, frozen_params = ac.perceptual_weight, None
    if perceptual_weight > 0:
        frozen_params = {"lpips": load_lpips(ac.lpips_vgg, ac.lpips_lin)}
    lpips = LPIPS()

    def rec_terms(x, r, frozen):
        """(reconstruction loss, metrics): L1/L2, plus perceptual_weight * LPIPS when enabled (Rombach et al. 2022)."""
        loss = reconstruction(x, r, kind)
        if perceptual_weight <= 0:
            return loss, {}
        distance = jnp.mean(lpips.apply({"params": frozen["lpips"]}, x, r))
        return loss + perceptual_weight * distance, {"lpips": distance}

    def loss_fn(params, batch, rng, step, *, frozen, extra):
        x = batch["image"]
        post = vae.apply({"params": params}, x, method=vae.posterior)
        z = post.sample(rng)
        rec = vae.apply({"params": params}, z, method=vae.decode)
        rec_loss, metrics = rec_terms(x, rec, frozen)
        kl = jnp.mean(post.kl()) / (x.shape[1] * x.shape[2] * x.shape[3])
        loss = rec_loss + ac.kl_weight * kl
        metrics.update(rec_loss=rec_loss, kl=kl)
        if use_gan:
            kernel = params["decoder"]["conv_out"]["kernel"]
            rec_w, vjp = jax.vjp(lambda k: decode_with_last(params, z, k), kernel)

            def g_loss_of(r):
                return -jnp.mean(disc.apply({"params": extra["params"]}, r))

            g_rec = vjp(jax.grad(lambda r: rec_terms(x, r, frozen)[0])(rec_w))[0]
            g_adv = vjp(jax.grad(g_loss_of)(rec_w))[0]
            lam = jnp.clip(jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_adv) + 1e-4), 0.0, 1e4)
            lam = jax.lax.stop_gradient(lam) * ac.disc_weight * (step >= ac.disc_start)
            g_loss = g_loss_of(rec)
            loss = loss + lam * g_loss
            metrics.update(g_loss=g_loss, adv_weight=lam)
        return loss, metrics

    def init_extra(rng):
        params = disc.init(rng, example)["params"]
        return {"params": params, "opt_state": d_tx.init(params)}

    def update_extra(extra, params, batch, rng, step, *, frozen):
        del frozen
        x = batch["image"]
        rec, _ = vae.apply({"params": params}, x, rng)
        rec = jax.lax.stop_gradient(rec)

        def d_loss_of(dp):
            return hinge_d_loss(disc.apply({"params": dp}, x), disc.apply({"params": dp}, rec))

        d_loss, grads = jax.value_and_grad(d_loss_of)(extra["params"])
        on = step >= ac.disc_start
        updates, opt_state = d_tx.update(grads, extra["opt_state"], extra["params"])
        new_params = optax.apply_updates(extra["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(on, a, b), new, old)  # noqa: E731
        return {"params": keep(new_params, extra["params"]), "opt_state": keep(opt_state, extra["opt_state"])}, {
            "d_loss": d_loss}

    def iterator(process_index, process_count):
        return NumericBatches(make_iterator(dcfg, process_index=process_index, process_count=process_count),
                              ("image",))

    task = Task(name="autoencoder", init=init, loss_fn=loss_fn, make_iterator=iterator,
                batch_size=dcfg.batch_size, frozen=frozen_params, init_extra=init_extra if use_gan else None,
                update_extra=update_extra if use_gan else None)
    callbacks = []
    if int(config.sample.every_steps) > 0:
        callbacks.append(ReconstructionGrid(vae, config, workdir))
    callbacks += stage_metrics.autoencoder_callbacks(config, vae)  # config.eval: PSNR / SSIM on held-out data
    return task, callbacks


class ReconstructionGrid:
    """Callback: originals (top) and EMA reconstructions (bottom) of a fixed batch, as a PNG and a metric."""

    def __init__(self, vae, config, workdir):
        import os

        dcfg = DataConfig.from_run_config(config, caption_dropout=0.0, shuffle=False, batch_size=8, split="train")
        self.images = jnp.asarray(next(make_iterator(dcfg))["image"])
        self.every, self.dir = int(config.sample.every_steps), os.path.join(workdir, "samples")
        self._rec = jax.jit(lambda p, x: vae.apply({"params": p}, x)[0])

    def __call__(self, step, state):
        import os

        if step % self.every:
            return None
        # every process takes part in gathering parameters sharded across processes; process 0 draws the grid
        params = host_copy(unbox(state.ema_params))
        if jax.process_index() != 0:
            return None
        rec = self._rec(params, self.images)
        grid = make_grid(to_uint8(jnp.concatenate([self.images, rec])), cols=len(self.images))
        os.makedirs(self.dir, exist_ok=True)
        save_png(os.path.join(self.dir, f"{step:07d}.png"), grid)
        return {"reconstructions": grid, "ema_rec_l1": float(jnp.mean(jnp.abs(rec - self.images)))}
