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
* ``maybe_initialize_distributed()``: multi-host setup through ``jax.distributed.initialize`` with the layout
  ``detect_layout(os.environ)`` reads from the launcher: arguments, JAX_* variables, SLURM (``srun``), a Cloud
  TPU slice or a Kubernetes indexed Job (README "On a cluster").
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.types import ConfigError, PyTree, env_int

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


def host_copy(tree: PyTree) -> PyTree:
    """`tree` with every array sharded across processes gathered whole into this process (numpy; a collective:
    every process must call it); arrays this process already holds whole are kept as they are."""
    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return x

    return jax.tree.map(fetch, tree)


# ------------------------------------------------------------------------------------------------------------
# Multi-process layout, read from how the job was launched (no scheduler of our own; see README "On a cluster")

DISTRIBUTED_VAR = "LDM_JAX_DISTRIBUTED"  # "off": never join from the environment; "auto": JAX's own detection
PORT_VARS = ("LDM_JAX_COORDINATOR_PORT", "JAX_COORDINATOR_PORT")
KUBERNETES_PORT = 8476  # pods have a network namespace each: one fixed port is free on the index-0 pod
SLURM_PORT_BASE = 20000  # + SLURM_JOB_ID mod 12000 (below Linux's ephemeral ports): jobs sharing their
                         # first node get different ports
MAX_HOSTS = 100_000


@dataclasses.dataclass(frozen=True)
class ProcessLayout:
    """How this process joins a multi-process job, and where that was read.

    `source` is one of "arguments", "JAX_*", "slurm", "tpu", "kubernetes", "auto". `coordinator` is process
    0's "host:port"; None for "tpu" and "auto", where ``jax.distributed.initialize()`` is called bare and JAX's
    own detection (TPU metadata, Open MPI, ...) fills everything in (`num_processes` / `process_id` are then
    what the variables say, None where they say nothing). `local_device_ids` restricts the process to some of
    its host's accelerators (None: all of them).
    """

    source: str
    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None = None


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compact host list as host names, in order.

    ``"node[001-003,007],gpu-a"`` -> node001, node002, node003, node007, gpu-a. A range keeps the zero padding
    of its lower bound; several bracket groups in one name expand as a product (``"r[1-2]n[1-2]"`` -> r1n1,
    r1n2, r2n1, r2n2). Raises ValueError on a malformed list.
    """
    names, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets at character {i}")
        if ch == "," and depth == 0:
            names.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("a '[' is never closed")
    names.append(text[start:])
    hosts: list[str] = []
    for name in (n.strip() for n in names):
        if not name:
            raise ValueError("an empty host name")
        hosts.extend(_expand_name(name))
        if len(hosts) > MAX_HOSTS:
            raise ValueError(f"more than {MAX_HOSTS} hosts")
    return hosts


def _expand_name(name: str) -> list[str]:
    open_ = name.find("[")
    if open_ < 0:
        if "]" in name:
            raise ValueError(f"'{name}' has a ']' without '['")
        return [name]
    close = name.index("]", open_)
    head, body, rest = name[:open_], name[open_ + 1:close], name[close + 1:]
    tails = _expand_name(rest) if rest else [""]
    return [head + n + tail for n in _expand_ranges(body) for tail in tails]


def _expand_ranges(body: str) -> list[str]:
    out = []
    for part in body.split(","):
        low, dash, high = part.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise ValueError(f"'[{body}]': '{part}' is not a number or a range like 01-04")
        if not dash:
            out.append(low)
            continue
        if int(high) < int(low):
            raise ValueError(f"'[{body}]': range {part} runs backwards")
        if int(high) - int(low) >= MAX_HOSTS:
            raise ValueError(f"'[{body}]': range {part} has more than {MAX_HOSTS} hosts")
        out.extend(f"{n:0{len(low)}d}" for n in range(int(low), int(high) + 1))
    return out


def _check_id(process_id: int, num_processes: int, id_name: str, count_name: str) -> None:
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"{id_name}={process_id} must be in [0, {count_name}={num_processes})")


def _check_address(address: str, name: str) -> str:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={address!r} is not HOST:PORT (e.g. 10.0.0.1:8476)")
    return address


def _port(environ: Mapping[str, str], default: int) -> int:
    for name in PORT_VARS:
        port = env_int(environ, name, minimum=1)
        if port is not None:
            if port > 65535:
                raise ConfigError(f"{name}={port} is not a port (1-65535)")
            return port
    return default


def _device_ids(given: Sequence[int] | None, environ: Mapping[str, str]) -> tuple[int, ...] | None:
    if given is not None:
        return tuple(int(i) for i in given)
    text = environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ConfigError(f"JAX_LOCAL_DEVICE_IDS={text!r}: give non-negative integers such as 0,1")
    return tuple(int(p) for p in parts)


def _from_arguments(environ, coordinator_address, num_processes, process_id) -> ProcessLayout | None:
    if coordinator_address is None and num_processes is None and process_id is None:
        return None
    # what the arguments leave out may come from the JAX_* variables (as jax.distributed.initialize reads them)
    coordinator = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS", "").strip() or None
    count = num_processes if num_processes is not None else env_int(environ, "JAX_NUM_PROCESSES", 1)
    index = process_id if process_id is not None else env_int(environ, "JAX_PROCESS_ID")
    for value, name in ((coordinator, "coordinator_address"), (count, "num_processes"), (index, "process_id")):
        if value is None:
            raise ConfigError(f"multi-process arguments without {name}: give all of coordinator_address, "
                              "num_processes and process_id (or the JAX_* variables)")
    _check_id(index, count, "process_id", "num_processes")
    return ProcessLayout("arguments", _check_address(coordinator, "coordinator_address"), count, index)


def _from_jax_vars(environ) -> ProcessLayout | None:
    names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
    present = [n for n in names if environ.get(n, "").strip()]
    if not present:
        return None
    if missing := [n for n in names if n not in present]:
        raise ConfigError(f"{missing[0]} is not set but {present[0]} is: set all of {', '.join(names)}")
    count, index = env_int(environ, names[1], 1), env_int(environ, names[2])
    _check_id(index, count, names[2], names[1])
    return ProcessLayout("JAX_*", _check_address(environ[names[0]].strip(), names[0]), count, index)


def _from_slurm(environ) -> ProcessLayout | None:
    """A task of ``srun`` (or of ``sbatch --ntasks=N`` run through srun): SLURM_PROCID of SLURM_NTASKS."""
    if not environ.get("SLURM_JOB_ID", "").strip():
        return None
    count_name = "SLURM_STEP_NUM_TASKS" if environ.get("SLURM_STEP_NUM_TASKS", "").strip() else "SLURM_NTASKS"
    count = env_int(environ, count_name, 1)
    if count is None or count == 1:
        return None  # one task (or an allocation's shell, a batch script without --ntasks): nothing to join
    index = env_int(environ, "SLURM_PROCID")
    if index is None:
        raise ConfigError(f"SLURM_PROCID is not set but {count_name}={count}: start the {count} processes with "
                          f"srun (or set {DISTRIBUTED_VAR}=off to run a single process)")
    _check_id(index, count, "SLURM_PROCID", count_name)
    local = env_int(environ, "SLURM_LOCALID")
    if local is None:
        raise ConfigError(f"SLURM_LOCALID is not set but {count_name}={count}: start the processes with srun")
    list_name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                      if environ.get(n, "").strip()), None)
    if list_name is None:
        raise ConfigError(f"SLURM_JOB_NODELIST is not set but {count_name}={count}: the coordinator is the "
                          "first host of the job's node list")
    try:
        nodes = expand_hostlist(environ[list_name].strip())
    except ValueError as e:
        raise ConfigError(f"{list_name}={environ[list_name]!r} is not a Slurm host list: {e}") from None
    port = _port(environ, SLURM_PORT_BASE + env_int(environ, "SLURM_JOB_ID") % 12000)
    # several tasks on a node: one accelerator each, the node-local task index (JAX's own SLURM convention)
    ids = (local,) if count > len(nodes) else None
    return ProcessLayout("slurm", f"{nodes[0]}:{port}", count, index, ids)


def _from_tpu(environ) -> ProcessLayout | None:
    """A Cloud TPU pod slice (GKE: TPU_WORKER_HOSTNAMES + TPU_WORKER_ID; multislice: MEGASCALE_*)."""
    hosts_name = next((n for n in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES") if environ.get(n, "").strip()),
                      None)
    if hosts_name is None and not environ.get("MEGASCALE_COORDINATOR_ADDRESS", "").strip():
        return None
    slices = env_int(environ, "MEGASCALE_NUM_SLICES", 1) or 1
    slice_id = env_int(environ, "MEGASCALE_SLICE_ID") or 0
    _check_id(slice_id, slices, "MEGASCALE_SLICE_ID", "MEGASCALE_NUM_SLICES")
    if hosts_name is None:  # the slice's hosts come from the TPU metadata: JAX reads them
        return ProcessLayout("tpu", None, None, None)
    hosts = [h for h in environ[hosts_name].split(",") if h.strip()]
    worker = env_int(environ, "TPU_WORKER_ID")
    if worker is None and len(hosts) > 1:
        raise ConfigError(f"TPU_WORKER_ID is not set but {hosts_name} lists {len(hosts)} hosts")
    _check_id(worker or 0, len(hosts), "TPU_WORKER_ID", f"the number of hosts in {hosts_name}")
    count = len(hosts) * slices
    return None if count == 1 else ProcessLayout("tpu", None, count, slice_id * len(hosts) + (worker or 0))


def _from_kubernetes(environ) -> ProcessLayout | None:
    """A pod of an indexed Job (or JobSet) with LDM_JAX_NUM_PROCESSES set: process JOB_COMPLETION_INDEX."""
    if not environ.get("JOB_COMPLETION_INDEX", "").strip():
        return None
    count = env_int(environ, "LDM_JAX_NUM_PROCESSES", 1)
    if count is None or count == 1:
        return None  # pods of an indexed Job that train one process each (a sweep's job array)
    index = env_int(environ, "JOB_COMPLETION_INDEX")
    _check_id(index, count, "JOB_COMPLETION_INDEX", "LDM_JAX_NUM_PROCESSES")
    given = environ.get("LDM_JAX_COORDINATOR", "").strip()
    if given:
        address = given if ":" in given else f"{given}:{_port(environ, KUBERNETES_PORT)}"
        return ProcessLayout("kubernetes", _check_address(address, "LDM_JAX_COORDINATOR"), count, index)
    subdomain = environ.get("LDM_JAX_SUBDOMAIN", "").strip()
    if not subdomain:
        raise ConfigError("LDM_JAX_SUBDOMAIN is not set but LDM_JAX_NUM_PROCESSES is: set it to the headless "
                          "Service the pod template names as `subdomain`, or set LDM_JAX_COORDINATOR")
    hostname, suffix = environ.get("HOSTNAME", "").strip(), f"-{index}"
    if not hostname.endswith(suffix) or len(hostname) == len(suffix):
        raise ConfigError(f"HOSTNAME={hostname!r} does not end in -{index} (JOB_COMPLETION_INDEX), as an indexed "
                          "Job's pods do: set LDM_JAX_COORDINATOR to the index-0 pod's host")
    host = f"{hostname[:-len(suffix)]}-0.{subdomain}"
    return ProcessLayout("kubernetes", f"{host}:{_port(environ, KUBERNETES_PORT)}", count, index)


def detect_layout(environ: Mapping[str, str], coordinator_address: str | None = None,
                  num_processes: int | None = None, process_id: int | None = None,
                  local_device_ids: Sequence[int] | None = None) -> ProcessLayout | None:
    """This process's place in a multi-process job, or None for a single process. Pure: reads `environ` only.

    First match wins: the arguments (gaps filled from JAX_*); ``LDM_JAX_DISTRIBUTED`` ("off": None, "auto":
    JAX's own detection); JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID; SLURM; a Cloud TPU
    slice; a Kubernetes indexed Job (a GKE TPU pod is in one too: its TPU variables are the more specific).
    A cluster of one process is None. Partial or inconsistent variables raise a one-line ConfigError naming
    the variable. Local devices: `local_device_ids`, else JAX_LOCAL_DEVICE_IDS, else the cluster's default.
    """
    layout = _from_arguments(environ, coordinator_address, num_processes, process_id)
    if layout is None:
        mode = environ.get(DISTRIBUTED_VAR, "").strip().lower()
        if mode not in ("", "off", "auto"):
            raise ConfigError(f"{DISTRIBUTED_VAR}={mode!r}: use 'off' (one process) or 'auto' (JAX's detection), "
                              "or leave it unset")
        if mode == "off":
            return None
        if mode == "auto":
            layout = ProcessLayout("auto", None, None, None)
    if layout is None:
        sources = (_from_jax_vars, _from_slurm, _from_tpu, _from_kubernetes)
        layout = next((found for find in sources if (found := find(environ)) is not None), None)
    if layout is None:
        return None
    ids = _device_ids(local_device_ids, environ)
    return layout if ids is None else dataclasses.replace(layout, local_device_ids=ids)


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
                                 environ: Mapping[str, str] | None = None) -> bool:
    """Calls ``jax.distributed.initialize`` when `detect_layout` finds this is one process of several.

    The layout goes to JAX explicitly (JAX's own cluster detection is switched off, so it cannot override it);
    "tpu" and "auto" call it bare instead. With more than one process, CPU collectives go through gloo. Must
    run before any JAX computation. Returns whether the distributed runtime is (now) initialized.
    """
    if jax.distributed.is_initialized():
        return True
    layout = detect_layout(os.environ if environ is None else environ, coordinator_address, num_processes,
                           process_id, local_device_ids)
    if layout is None:
        return False
    if layout.num_processes is None or layout.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    ids = None if layout.local_device_ids is None else list(layout.local_device_ids)
    logger.info("jax.distributed: joining from %s as process %s of %s (coordinator %s)", layout.source,
                layout.process_id, layout.num_processes, layout.coordinator or "found by JAX")
    if layout.coordinator is None:
        jax.distributed.initialize(**({} if ids is None else {"local_device_ids": ids}))
    else:
        known = dict(coordinator_address=layout.coordinator, num_processes=layout.num_processes,
                     process_id=layout.process_id, local_device_ids=ids)
        if ids is None:  # JAX would otherwise detect SLURM / k8s itself and pick local devices from there
            known["cluster_detection_method"] = "deactivate"
        jax.distributed.initialize(**known)
    logger.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True
