"""Low-rank adaptation (LoRA, Hu et al. 2021) as a transformation of parameter trees; no module is rewritten.

A LoRA layer adds a rank-r update to the kernel of a frozen Dense or Conv layer:

    W' = W + sum_i  w_i * (alpha_i / r_i) * down_i @ up_i

Dense kernels are (in, out): down is (in, r) and up (r, out). Conv kernels are (kh, kw, in, out): down is a
(kh, kw, in, r) conv with the layer's own stride and padding, up a (1, 1, r, out) conv, and their composition is
the (kh, kw, in, out) kernel einsum("hwir,ro->hwio", down, up[0, 0]). `w_i` is the weight given to adapter i at
inference (several adapters mix linearly); alpha / r is the per-layer scale fixed by the adapter's
hyper-parameters or its file. These are PEFT's ``lora_A`` (down) and ``lora_B`` (up), transposed to Flax layout.

A `LoraAdapter` holds ``params``, a nested dict mirroring the base tree down to each adapted layer, whose two
leaves are ``down`` and ``up`` (``{"down_blocks_0": {..., "attn1": {"to_q": {"down": ..., "up": ...}}}}``), and
static per-layer ``alphas``. It is a pytree whose leaves are the down/up arrays only, so it is what an optimizer
trains:

    adapter = init_lora(LoraConfig(rank=8), base_params, rng)   # up = 0: exactly the base model
    opt_state = tx.init(adapter)                                # optimizer state scales with the rank
    def loss_fn(adapter, batch):                                # base_params closed over, never differentiated
        params = apply_lora(base_params, [(adapter, 1.0)])      # inside jit: W + s down@up, fused by XLA
        return loss(unet.apply({"params": params}, ...))
    grads = jax.grad(loss_fn)(adapter, batch)                   # a LoraAdapter of the same shapes

At inference `merge` bakes adapters into the weights (any number, each with its weight) and `unmerge` subtracts
exactly the same terms. Alphas are static (not leaves): weight decay cannot shrink them, and a change of alpha
recompiles.

Dropout. LoRA dropout masks the input of the low-rank branch only, y = x W + s ((drop(x) down) up), so it cannot
be folded into a merged weight. A `LoraAdapter` carries its training `dropout`; `apply_lora` / `merge` refuse an
adapter with dropout > 0 (ConfigError) rather than drop it silently. Train such an adapter through
`lora_intercept`, which runs every adapted Dense/Conv call unmerged (``flax.linen.intercept_methods``) and applies
the dropout when given an rng; for inference call ``adapter.replace(dropout=0.0)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from functools import partial

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from ldm_jax.models.layers import canonical_dtype, unbox
from ldm_jax.types import Array, ConfigError, FrozenConfig, PRNGKey, PyTree, nearest

# Named groups of target patterns (each a regex matched against the end of a layer's '/'-joined path).
# U-Net names first (diffusers' module names), then the CLIP / BERT text encoders' (ldm_jax.models.text).
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out_0", "attn/query", "attn/key", "attn/value", "attn/out"),
    "feed_forward": ("ff/net_0/proj", "ff/net_2", "mlp/fc1", "mlp/fc2"),
    "projections": ("proj_in", "proj_out"),
    "convs": ("conv1", "conv2", "conv_shortcut", "downsamplers_0/conv", "upsamplers_0/conv"),
    "time": ("time_emb_proj",),
}
_INITS = ("gaussian", "kaiming")


@dataclasses.dataclass(frozen=True)
class LoraConfig(FrozenConfig):
    """Hyper-parameters of a fresh adapter.

    `alpha` (default `rank`) sets the scale alpha / rank of the update. `targets` are group names of
    `TARGET_GROUPS` ("attention": q/k/v/out of every attention layer; "feed_forward", "projections": the spatial
    transformers' proj_in/proj_out, "convs": resnet and resampling convs, "time") or regexes matched against the
    end of a layer path at a '/' boundary ("attn2/to_k", r"down_blocks_\\d+/.*/to_q"). `init`: "gaussian" draws down
    from N(0, 1/rank^2) (PEFT's init_lora_weights="gaussian"), "kaiming" from U(+-1/sqrt(fan_in)) (PEFT's
    default); up is always zero, so a fresh adapter is exactly the identity. `dropout` is the training dropout on
    the low-rank input (see the module docstring: honoured by `lora_intercept` only).
    """

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attention",)
    init: str = "gaussian"
    param_dtype: str = "float32"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoraConfig.rank={self.rank!r}: use a positive integer")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"LoraConfig.alpha={self.alpha!r}: use a positive number (or None for alpha = rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoraConfig.dropout={self.dropout!r}: use a rate in [0, 1)")
        if self.init not in _INITS:
            raise ConfigError(f"LoraConfig.init={self.init!r}{nearest(str(self.init), _INITS)}; use one of {_INITS}")
        if isinstance(self.targets, str) or not self.targets:
            raise ConfigError("LoraConfig.targets: give a non-empty tuple of group names or path patterns")
        for t in self.targets:
            _patterns(t)
        canonical_dtype(self.param_dtype)

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


@flax.struct.dataclass
class LoraAdapter:
    """One adapter: ``params`` {..layer path..: {"down", "up"}} (the only pytree leaves) and static per-layer
    ``alphas`` (((path, alpha), ...), sorted) and training ``dropout``. Layer paths are '/'-joined module paths
    of the base tree ("down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q")."""

    params: dict
    alphas: tuple[tuple[str, float], ...] = flax.struct.field(pytree_node=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    def layers(self) -> dict[str, tuple[Array, Array]]:
        """{layer path: (down, up)}."""
        return {path: (node["down"], node["up"]) for path, node in _walk_layers(self.params)}

    def scales(self) -> dict[str, float]:
        """{layer path: alpha / rank}."""
        ranks = {path: down.shape[-1] for path, (down, _) in self.layers().items()}
        return {path: alpha / ranks[path] for path, alpha in self.alphas}

    @classmethod
    def from_layers(cls, layers: Mapping[str, tuple[Array, Array]], alphas: Mapping[str, float],
                    dropout: float = 0.0) -> LoraAdapter:
        """Builds an adapter from {path: (down, up)} and {path: alpha} (alpha defaults to the layer's rank)."""
        params: dict = {}
        for path, (down, up) in layers.items():
            node = params
            for name in path.split("/"):
                node = node.setdefault(name, {})
            node["down"], node["up"] = down, up
        full = {p: float(alphas.get(p, layers[p][0].shape[-1])) for p in layers}
        return cls(params=params, alphas=tuple(sorted(full.items())), dropout=float(dropout))


def _walk_layers(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Mapping]]:
    for name, node in tree.items():
        path = f"{prefix}/{name}" if prefix else str(name)
        if isinstance(node, Mapping) and "down" in node and "up" in node:
            yield path, node
        elif isinstance(node, Mapping):
            yield from _walk_layers(node, path)


# ---------------------------------------------------------------------------- targets
def _patterns(target: str) -> list[re.Pattern]:
    """The compiled regexes of one `targets` entry (a group name, or a pattern matched at a path's end)."""
    raw = TARGET_GROUPS.get(target, (target,))
    try:
        return [re.compile(rf"(?:.*/)?(?:{p})") for p in raw]
    except re.error as e:
        raise ConfigError(f"LoraConfig.targets: '{target}' is neither a group ({', '.join(TARGET_GROUPS)}) "
                          f"nor a valid regex ({e})") from None


def kernel_shapes(base_params: PyTree) -> dict[str, tuple[int, ...]]:
    """{layer path: kernel shape} of every Dense (2-D) and Conv (4-D) kernel of a (boxed or plain) tree."""
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(unbox(base_params)):
        names = [str(getattr(k, "key", k)) for k in path]
        if names and names[-1] == "kernel" and len(leaf.shape) in (2, 4):
            out["/".join(names[:-1])] = tuple(leaf.shape)
    return out


def target_layers(cfg: LoraConfig, base_params: PyTree) -> dict[str, tuple[int, ...]]:
    """{layer path: kernel shape} of the layers `cfg.targets` selects; a target that selects nothing raises."""
    kernels = kernel_shapes(base_params)
    chosen: dict[str, tuple[int, ...]] = {}
    for target in cfg.targets:
        hits = [p for p in kernels if any(r.fullmatch(p) for r in _patterns(target))]
        if not hits:
            hint = nearest(target, TARGET_GROUPS) or nearest(target, kernels)
            raise ConfigError(f"LoraConfig.targets: '{target}' matches no Dense/Conv kernel of the given "
                              f"parameters{hint}; e.g. {', '.join(sorted(kernels)[:3]) or 'none found'}")
        chosen.update({p: kernels[p] for p in hits})
    return dict(sorted(chosen.items()))


def init_lora(cfg: LoraConfig, base_params: PyTree, rng: PRNGKey) -> LoraAdapter:
    """A fresh adapter for the layers of `base_params` that `cfg.targets` selects (only shapes are read).

    The down factors are consecutive slices, in sorted path order, of one draw from `rng` (one random program to
    compile, however many layers); up is zero, so ``apply_lora(base, [(adapter, w)])`` returns `base` exactly.
    """
    shapes = target_layers(cfg, base_params)
    layers = _draw(rng, tuple(shapes.values()), cfg.rank, cfg.init, cfg.param_dtype)
    alpha = float(cfg.rank if cfg.alpha is None else cfg.alpha)
    return LoraAdapter.from_layers(dict(zip(shapes, layers)), {p: alpha for p in shapes}, cfg.dropout)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _draw(rng, kernels: tuple, rank: int, init: str, param_dtype: str) -> list[tuple[Array, Array]]:
    """(down, up) per kernel shape: gaussian N(0, 1/rank^2), or kaiming U(+-1/sqrt(fan_in)) from a U(-1, 1) draw."""
    dtype = canonical_dtype(param_dtype)
    factor_shapes = [_factor_shapes(shape, rank) for shape in kernels]
    sizes = [math.prod(d) for d, _ in factor_shapes]
    if init == "gaussian":
        flat = jax.random.normal(rng, (sum(sizes),), jnp.float32)
    else:
        flat = jax.random.uniform(rng, (sum(sizes),), jnp.float32, -1.0, 1.0)
    out, start = [], 0
    for (d_shape, u_shape), size in zip(factor_shapes, sizes):
        down = flat[start:start + size].reshape(d_shape)
        down = down / rank if init == "gaussian" else down / math.sqrt(math.prod(d_shape[:-1]))
        out.append((down.astype(dtype), jnp.zeros(u_shape, dtype)))
        start += size
    return out


def _factor_shapes(kernel: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if len(kernel) == 2:
        return (kernel[0], rank), (rank, kernel[1])
    return (*kernel[:3], rank), (1, 1, rank, kernel[3])


# ---------------------------------------------------------------------------- merging
def lora_delta(down: Array, up: Array) -> Array:
    """The kernel-shaped product of one layer's factors: down @ up, or the conv composition (see module doc)."""
    if down.ndim == 2:
        return jnp.matmul(down, up, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("hwir,ro->hwio", down, up[0, 0], precision=jax.lax.Precision.HIGHEST)


def _check_deterministic(adapters, what: str) -> None:
    for adapter, _ in adapters:
        if adapter.dropout > 0:
            raise ConfigError(f"{what}: an adapter has dropout={adapter.dropout}, which a weight merge cannot apply; "
                              "train it through lora_intercept(..., rng=key), or use adapter.replace(dropout=0.0)")


def _add(base_params: PyTree, adapters: Sequence[tuple[LoraAdapter, float]], sign: float, what: str) -> PyTree:
    _check_deterministic(adapters, what)
    params = unbox(base_params)
    deltas: dict[str, Array] = {}
    for adapter, weight in adapters:
        scales = adapter.scales()
        for path, (down, up) in adapter.layers().items():
            d = lora_delta(down.astype(jnp.float32), up.astype(jnp.float32)) * (scales[path] * weight)
            deltas[path] = d if path not in deltas else deltas[path] + d
    for path, d in deltas.items():
        kernel = _get(params, path, what)
        if kernel.shape != d.shape:
            raise ConfigError(f"{what}: adapter layer '{path}' has shape {d.shape}, the kernel {kernel.shape}")
        params = _set(params, path, (kernel.astype(jnp.float32) + sign * d).astype(kernel.dtype))
    return params


def apply_lora(base_params: PyTree, adapters: Sequence[tuple[LoraAdapter, float]]) -> PyTree:
    """W + sum_i w_i (alpha_i / r_i) down_i @ up_i for every adapted kernel; other leaves are passed through.

    `adapters` is a list of (adapter, weight). Returns a plain (unboxed) tree of the base's structure, the
    updated kernels in their own dtype (the sum is formed in float32). Use it inside the jitted loss for training
    (differentiate w.r.t. the adapters) and once, outside, to merge for inference.
    """
    return _add(base_params, adapters, 1.0, "apply_lora")


def merge(base_params: PyTree, adapters: Sequence[tuple[LoraAdapter, float]]) -> PyTree:
    """Bakes the adapters into the weights (= `apply_lora`); `unmerge` undoes it."""
    return _add(base_params, adapters, 1.0, "merge")


def unmerge(merged_params: PyTree, adapters: Sequence[tuple[LoraAdapter, float]]) -> PyTree:
    """Subtracts exactly the terms `merge` added with the same adapters and weights (equal up to rounding)."""
    return _add(merged_params, adapters, -1.0, "unmerge")


def _get(tree: Mapping, path: str, what: str) -> Array:
    node = tree
    for name in path.split("/"):
        if not isinstance(node, Mapping) or name not in node:
            raise ConfigError(f"{what}: adapter layer '{path}' is not in the base parameters "
                              "(an adapter made for another model or config?)")
        node = node[name]
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise ConfigError(f"{what}: base parameters have no kernel at adapter layer '{path}'")
    return node["kernel"]


def _set(tree: Mapping, path: str, kernel: Array) -> dict:
    """A copy of `tree` with `path`/kernel replaced (dicts on the path copied, everything else shared)."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    out[head] = _set(tree[head], rest, kernel) if rest else {**tree[head], "kernel": kernel}
    return out


# ---------------------------------------------------------------------------- unmerged forward (dropout)
@contextlib.contextmanager
def lora_intercept(adapters: Sequence[tuple[LoraAdapter, float]], *, rng: PRNGKey | None = None):
    """Within the context, each ``nn.Dense`` / ``nn.Conv`` call whose module path (relative to the root module
    being applied) is an adapter layer returns base(x) + sum_i w_i s_i up_i(down_i(drop_i(x))): LoRA unmerged,
    with the adapters' dropout when `rng` is given (a fresh mask per adapter and layer from ``fold_in``), none
    without. Apply the model with the frozen base parameters inside it::

        with lora_intercept([(adapter, 1.0)], rng=dropout_key):
            out = unet.apply({"params": base_params}, x, t, context)
    """
    tables = [(i, adapter.layers(), adapter.scales(), adapter.dropout, weight)
              for i, (adapter, weight) in enumerate(adapters)]
    order = {p: j for j, p in enumerate(sorted({p for _, layers, *_ in tables for p in layers}))}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(module, (nn.Dense, nn.Conv)):
            return out
        path = "/".join(module.path)
        for i, layers, scales, rate, weight in tables:
            if path not in layers:
                continue
            x = args[0]
            if rng is not None and rate > 0:
                key = jax.random.fold_in(jax.random.fold_in(rng, i), order[path])
                keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
                x = jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
            out = out + (_branch(module, x, *layers[path]) * (scales[path] * weight)).astype(out.dtype)
        return out

    with nn.intercept_methods(interceptor):
        yield


def _branch(module: nn.Module, x: Array, down: Array, up: Array) -> Array:
    """up(down(x)) for one layer, down with the layer's own conv geometry (stride, padding)."""
    dtype = module.dtype or jnp.result_type(x, down)
    x, down, up = x.astype(dtype), down.astype(dtype), up.astype(dtype)
    if isinstance(module, nn.Dense):
        return jnp.matmul(jnp.matmul(x, down), up)
    conv = module.clone(parent=None, name=None, features=down.shape[-1], use_bias=False)
    h = conv.apply({"params": {"kernel": down}}, x)
    return jnp.einsum("...r,ro->...o", h, up[0, 0])
