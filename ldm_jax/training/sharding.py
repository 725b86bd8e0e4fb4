"""One code path from 1 CPU to a pod: a ("data", "fsdp") mesh, logical axis rules, shape-first sharded init.

* ``make_mesh(config.mesh)``: axis sizes from the config, ``-1`` meaning "all remaining devices".
* Logical axis rules (``config.mesh.rules``) map the models' parameter/activation names to mesh axes, e.g.
  ``(("batch", ("data", "fsdp")), ("embed", "fsdp"), ("conv_out", "fsdp"))``; names without a rule replicate.
  A parameter dimension that the mapped mesh axes do not divide evenly is replicated instead.
* ``create_sharded(init_fn, mesh, rules, *args)``: ``jax.eval_shape`` of an init that returns logically
  boxed parameters (``nn.Partitioned``) -> ``nn.get_partition_spec`` -> mesh shardings -> ``jax.jit(init,
  out_shardings=...)``; the parameters are created already sharded and come back unboxed.
* ``global_batch(local, mesh)``: each host's slice of the batch becomes one global array sharded over
  ("data", "fsdp") with ``jax.make_array_from_process_local_data``.
* ``maybe_initialize_distributed()``: multi-host setup through ``jax.distributed.initialize``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.types import ConfigError, PyTree

logger = logging.getLogger("ldm_jax.training")

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("conv_out", "fsdp"))


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves the one allowed ``-1`` in (data, fsdp) and checks the product against the device count."""
    sizes = [int(data), int(fsdp)]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes data={data}, fsdp={fsdp}: use positive sizes and at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {num_devices} devices do not split into groups of {known}: "
                              "set config.mesh.data / config.mesh.fsdp to divide the device count")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) > num_devices:
        raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} needs {math.prod(sizes)} devices but only "
                          f"{num_devices} exist: lower config.mesh.data / config.mesh.fsdp (-1 = all remaining)")
    return sizes[0], sizes[1]


def make_mesh(mesh_cfg, devices: Sequence | None = None) -> Mesh:
    """A ("data", "fsdp") mesh of Auto axes from ``config.mesh`` (a ConfigDict or mapping with data, fsdp).

    When the sizes multiply to fewer devices than exist, the first devices are used (with a warning).
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = mesh_shape(mesh_cfg["data"], mesh_cfg["fsdp"], len(devices))
    n = data * fsdp
    if n < len(devices):
        logger.warning("mesh data=%d x fsdp=%d uses %d of %d devices", data, fsdp, n, len(devices))
    grid = np.asarray(devices[:n], dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def logical_rules(rules) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """Normalises ``config.mesh.rules`` (lists from the command line included) into a tuple of pairs."""
    out = []
    for rule in rules if rules is not None else DEFAULT_RULES:
        if not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f"config.mesh.rules entry {rule!r}: expected (logical_name, mesh_axis or "
                              "(mesh_axes...) or None)")
        name, target = rule
        if isinstance(target, (tuple, list)):
            target = tuple(target)
            bad = [a for a in target if a not in MESH_AXES]
        else:
            bad = [target] if target is not None and target not in MESH_AXES else []
        if bad:
            raise ConfigError(f"config.mesh.rules: '{name}' maps to unknown mesh axis {bad[0]!r}; "
                              f"mesh axes are {MESH_AXES}")
        out.append((name, target))
    return tuple(out)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes from dimensions they do not divide (those dimensions replicate)."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, axes in zip(shape, entries):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(axes if size > 0 and dim % size == 0 else None)
    while fitted and fitted[-1] is None:
        fitted.pop()
    return P(*fitted)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def shardings_for(abstract_boxed: PyTree, mesh: Mesh, rules) -> PyTree:
    """NamedShardings (a tree shaped like the *unboxed* ``abstract_boxed``) from its logical boxes."""
    logical = nn.get_partition_spec(abstract_boxed)
    shapes = nn.meta.unbox(abstract_boxed)

    def one(spec, leaf):
        mesh_spec = nn.logical_to_mesh_axes(spec, rules) if len(spec) else P()
        return NamedSharding(mesh, _fit_spec(mesh_spec, np.shape(leaf), mesh))

    return jax.tree.map(one, logical, shapes, is_leaf=_is_spec)


def sharded_abstract(init_fn: Callable[..., PyTree], mesh: Mesh, rules, *args) -> tuple[PyTree, PyTree]:
    """(unboxed ShapeDtypeStructs carrying their shardings, the NamedShardings) of ``init_fn(*args)``.

    Nothing is allocated. `init_fn` may return ``nn.Partitioned``-boxed leaves (logical axis names) anywhere
    in its tree; plain leaves are replicated.
    """
    abstract = jax.eval_shape(init_fn, *args)
    shardings = shardings_for(abstract, mesh, rules)
    shaped = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.meta.unbox(abstract),
                          shardings)
    return shaped, shardings


def create_sharded(init_fn: Callable[..., PyTree], mesh: Mesh, rules, *args,
                   shardings: PyTree | None = None) -> tuple[PyTree, PyTree]:
    """Shape-first init: (the unboxed value of ``init_fn(*args)``, created directly in its shardings; them)."""
    if shardings is None:
        shardings = sharded_abstract(init_fn, mesh, rules, *args)[1]

    def unboxed(*a):
        return nn.meta.unbox(init_fn(*a))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        value = jax.jit(unboxed, out_shardings=shardings)(*args)
    return value, shardings


def place(tree: PyTree, mesh: Mesh, rules) -> PyTree:
    """Puts an existing (possibly boxed) tree of arrays on the mesh by its logical names (e.g. frozen params)."""
    if tree is None:
        return None
    shardings = shardings_for(tree, mesh, rules)
    return jax.device_put(nn.meta.unbox(tree), shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ("data", "fsdp"); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: PyTree, mesh: Mesh) -> PyTree:
    """This process's slice (numpy, leading dim = global batch / process count) -> global sharded arrays.

    Processes' slices, concatenated in process order, form the global batch.
    """
    sharding = batch_sharding(mesh)
    count = jax.process_count()

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * count, *x.shape[1:]))

    return jax.tree.map(one, local)


def check_batch_size(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    """The global batch must split evenly over the mesh and, per device, into `grad_accum` micro-batches."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if grad_accum < 1 or batch_size % (n * grad_accum):
        raise ConfigError(f"data.batch_size={batch_size} must be a multiple of {n} devices x "
                          f"train.grad_accum={grad_accum} = {n * max(grad_accum, 1)}")
    if batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={batch_size} must be a multiple of the {jax.process_count()} processes")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _cluster_detected() -> bool:
    """True when one of JAX's known cluster environments (SLURM, Open MPI, Cloud TPU, k8s, ...) is present."""
    try:
        from jax._src.clusters import ClusterEnv  # private: the auto-detection JAX itself would run
    except ImportError:  # pragma: no cover - depends on the jax version
        return False
    try:
        return any(not env.opt_in_only_method and env.is_env_present() for env in ClusterEnv._cluster_types)
    except Exception:  # noqa: BLE001 - an odd environment must not stop a single-host run
        return False


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None,
                                 local_device_ids: Sequence[int] | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when this is (likely) one process of a multi-process job.

    Triggers: an explicit coordinator (argument or ``JAX_COORDINATOR_ADDRESS``, with ``JAX_NUM_PROCESSES`` /
    ``JAX_PROCESS_ID`` or arguments), or an environment JAX auto-detects (SLURM, Open MPI, Cloud TPU pods,
    ...). ``local_device_ids`` (or ``JAX_LOCAL_DEVICE_IDS``) restricts this process to some of the host's
    accelerators, for several processes per host. With more than one process, CPU collectives go through gloo.
    Must run before any JAX computation. Returns whether the distributed runtime is (now) initialized.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    if coordinator_address is None and not _cluster_detected():
        return False
    if num_processes is None or num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id,
                               local_device_ids=None if local_device_ids is None else list(local_device_ids))
    logger.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
