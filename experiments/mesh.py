"""The device mesh and the rules that place every array on it (JAX's own sharding).

The mesh has three axes, sized by `config.mesh.{data,fsdp,tensor}` (one of them may be
-1: the devices left over):

* `data`   — pure data parallelism: the batch is split, parameters are replicated;
* `fsdp`   — the batch is split AND parameters / optimizer state are sharded (ZeRO-3);
* `tensor` — attention heads and MLP hidden units are split (Megatron-style).

Placement is by rules: a regex over an array's '/'-joined path (the same paths the
levels use, e.g. `layers/0/mlp/w_up/kernel`; optimizer-state leaves end with the path of
their parameter, so one rule covers both) → a `PartitionSpec`. A matrix no rule names is
sharded over `fsdp` on its largest divisible dimension rather than silently replicated;
a dimension that an axis does not divide stays whole on that axis.

Inside the jitted step, the models mark their batch-major arrays — activations and the
in-context state (memories, fast weights and their inner optimizer states, caches) — with
`nested.layers.place`; `STATE_RULES` below say where those live (batch over data × fsdp),
applied as sharding constraints by `with_rules`. Without it (one device, tests) the marks
are no-ops.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nested import layers
from nested.errors import UserError
from nested.levels import param_path

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# (path regex, spec) — first match wins. Kernels are [in, out].
RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed/embedding$", ("tensor", "fsdp")),              # [vocab, d]
    (r"unembed/kernel$", ("fsdp", "tensor")),               # [d, vocab]
    (r"/w[qkv]/kernel$", ("fsdp", "tensor")),               # [d, heads·hd]: heads split
    (r"/wo/kernel$", ("tensor", "fsdp")),                   # [heads·hd, d]
    (r"/w_(gate|up)/kernel$", ("fsdp", "tensor")),          # [d, d_ff]: hidden split
    (r"/w_down/kernel$", ("tensor", "fsdp")),               # [d_ff, d]
)

# Batch-major arrays marked by `nested.layers.place`, by their path inside the marked tree
# (e.g. `mixers/0/k` of HOPE's state; '' for a lone activation). First match wins; a path
# no rule names has its leading (batch) axis over data × fsdp and the rest whole. Heads go
# over `tensor` only where the projections that write them are split so (wk, wv above):
# the memories' heads are read from the unsplit residual stream, and splitting them (or the
# CMS fast weights' hidden units) measured more collectives, not fewer.
STATE_RULES: tuple[tuple[str, tuple], ...] = (
    (r"slot_position$", ()),                                # [L]: one per cache, not per row
    (r"mixers/\d+/[kv]$", (BATCH_AXES, None, "tensor", None)),  # KV cache [B, L, heads, hd]
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
  """Resolves the one -1 entry of `config.mesh` to the devices left over."""
  sizes = [mesh_cfg[a] for a in AXES]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"config.mesh={dict(zip(AXES, sizes))}: each axis needs a positive size, "
                    f"and at most one may be -1 (the devices left over).")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % known:
      raise UserError(f"config.mesh={dict(zip(AXES, sizes))}: the fixed axes ({known} devices) "
                      f"do not divide the {n_devices} devices of this job.")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise UserError(f"config.mesh={dict(zip(AXES, sizes))} spans {math.prod(sizes)} devices, "
                    f"but this job has {n_devices}: make the product equal {n_devices}, or set "
                    f"one axis to -1.")
  return tuple(sizes)


def make_mesh(mesh_cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  shape = mesh_shape(mesh_cfg, jax.device_count())
  # Auto axes: jit propagates shardings from the inputs and the constraints we give it.
  return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batch rows over data × fsdp; everything else of the batch stays whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_divisible(batch_size: int, mesh: jax.sharding.Mesh, what: str) -> None:
  n = batch_divisor(mesh)
  if batch_size % n:
    raise UserError(f"{what}={batch_size} is not divisible by the {n} batch shards of the mesh "
                    f"(data × fsdp = {mesh.shape['data']} × {mesh.shape['fsdp']}): set it to a "
                    f"multiple of {n}.")


def _axis_size(axis: str | tuple[str, ...], mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))


def _fits(spec: Sequence, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  """Drops the axes that do not divide their dimension (or are absent from `shape`)."""
  if len(spec) != len(shape):
    return P()
  return P(*(axis if axis and dim % _axis_size(axis, mesh) == 0 else None
             for axis, dim in zip(spec, shape)))


def _fsdp_fallback(shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  if len(shape) < 2:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % mesh.shape["fsdp"] == 0:
      return P(*("fsdp" if d == dim else None for d in range(len(shape))))
  return P()


def spec_for(path: str, shape: Sequence[int], mesh: jax.sharding.Mesh,
             rules: Sequence[tuple[str, tuple]] = RULES) -> P:
  """The PartitionSpec of the array at `path` (a parameter or an optimizer-state leaf)."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return _fits(spec, shape, mesh)
  return _fsdp_fallback(shape, mesh)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh,
                   rules: Sequence[tuple[str, tuple]] = RULES) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs) by the rules."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, leaf: NamedSharding(mesh, spec_for(param_path(kp), np.shape(leaf), mesh, rules)),
      tree)


def state_spec(path: str, shape: Sequence[int], mesh: jax.sharding.Mesh,
               rules: Sequence[tuple[str, tuple]] = STATE_RULES) -> P:
  """The PartitionSpec of a batch-major array (activation or in-context state) at `path`."""
  for pattern, spec in rules:
    if re.search(pattern, path):
      return _fits(spec, shape, mesh)
  return _fits((BATCH_AXES,) + (None,) * (len(shape) - 1), shape, mesh) if shape else P()


def _constrain(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """`tree` under sharding constraints by `STATE_RULES` (inside a jitted function)."""
  return jax.tree_util.tree_map_with_path(
      lambda kp, x: jax.lax.with_sharding_constraint(
          x, NamedSharding(mesh, state_spec(param_path(kp), np.shape(x), mesh))), tree)


def with_rules(fn, mesh: jax.sharding.Mesh):
  """`fn`, traced with the models' `place` marks bound to this mesh's `STATE_RULES`.

  Wrap the function given to `jax.jit`, so that every trace of it sees the rules.
  """
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with layers.placement(functools.partial(_constrain, mesh=mesh)):
      return fn(*args, **kwargs)
  return traced


def put_batch(batch: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """Places this process's rows of a global batch (each host loads only its own slice)."""
  global_shape = (batch.shape[0] * jax.process_count(),) + batch.shape[1:]
  return jax.make_array_from_process_local_data(batch_sharding(mesh), batch, global_shape)


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """`jax.distributed.initialize` before any device is touched.

  With no arguments JAX detects the cluster itself (SLURM, TPU pods, Kubernetes, Open MPI);
  elsewhere give all three (the coordinator is process 0's host:port).
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if any(given) and not all(given):
    raise UserError("Multi-process runs outside a detected cluster need all of "
                    "--coordinator_address (host:port of process 0), --num_processes and "
                    "--process_id; pass all three, or none on SLURM / TPU pods.")
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except (RuntimeError, ValueError) as e:
    raise UserError(f"jax.distributed.initialize failed ({e}). Outside SLURM, TPU pods and "
                    f"Open MPI, pass --coordinator_address, --num_processes and --process_id."
                    ) from e
