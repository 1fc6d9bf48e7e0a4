"""Checkpoints in `<workdir>/checkpoints`: orbax, async, atomic, the last N kept.

Each checkpoint holds the train state and a JSON record of what produced it (the
model's hyper-parameters and every parameter's shape). Before anything is written
into a workdir that already holds checkpoints, that record is compared with the
current config, so a run never resumes from — or overwrites — another model's
checkpoint.

Integrity (issue 17): the record also holds a checksum of every array of the saved state,
computed on the device before the async write, and a digest of the record itself. A restore
verifies both before the state is used; a mismatch is a UserError naming the damaged arrays
and the newest checkpoint that verifies, never garbage weights. A state with non-finite
values is never saved, so rotation never deletes a good checkpoint for a bad one.

One writer at a time: `workdir_lock` holds an advisory lock on `<workdir>/.lock` while a run
trains there, so a second run started into the same workdir stops before it writes.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from nested import models
from nested.errors import UserError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def manager(workdir: str, *, keep: int = 3, keep_every: int = 0,
            read_only: bool = False) -> ocp.CheckpointManager:
  """Orbax's manager of <workdir>/checkpoints: the latest `keep` checkpoints, and with
  `keep_every` every checkpoint at a multiple of it (milestones, never rotated out)."""
  policies = ocp.checkpoint_managers
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(
          [policies.LatestN(keep)] + ([policies.EveryNSteps(keep_every)] if keep_every else [])),
      create=not read_only, read_only=read_only, enable_async_checkpointing=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def model_record(model_cfg: ml_collections.ConfigDict, abstract_params) -> dict[str, Any]:
  """What must agree between a checkpoint and the model restoring it."""
  shapes = {jax.tree_util.keystr(path): list(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  return {"model": model_cfg.to_dict(), "param_shapes": shapes}


def check_compatible(saved: dict[str, Any], current: dict[str, Any], workdir: str) -> None:
  """Raises a UserError naming the differences if `saved` came from another model (the
  models' execution fields, such as `remat`, may differ, and a field one record lacks is
  at the model's default there: a checkpoint from before a field existed resumes at it)."""
  saved_model, current_model = saved["model"], current["model"]
  defaults = models.field_defaults(current_model.get("name"))
  value = lambda record, k: record.get(k, defaults.get(k))
  diffs = [f"model.{k}: checkpoint {value(saved_model, k)!r}, config {value(current_model, k)!r}"
           for k in sorted(set(saved_model) | set(current_model))
           if k not in models.EXECUTION_FIELDS
           and value(saved_model, k) != value(current_model, k)]
  if not diffs and saved["param_shapes"] != current["param_shapes"]:
    diffs = ["parameter shapes differ (same hyper-parameters, different code version?)"]
  if diffs:
    raise UserError(
        f"The workdir {workdir} holds checkpoints of a different model ({'; '.join(diffs[:6])}). "
        f"Nothing was written. To start this model, pass a new --workdir; to continue the "
        f"saved run, pass the config it was trained with (its copy is {workdir}/config.json).")


def _mix32(x: jax.Array) -> jax.Array:
  """murmur3's 32-bit finalizer: every input bit flips about half the output bits."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _bits(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32 (64-bit elements become two words)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
  """sum_i mix(bits_i ^ mix(i)) mod 2^32: position-dependent, and exact integer addition
  makes it independent of how the array is sharded (a restore may reshard)."""
  bits = _bits(x)
  index = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for d in reversed(range(bits.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, d) * jnp.uint32(stride)
    stride *= bits.shape[d]
  return jnp.sum(_mix32(bits ^ _mix32(index + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


@jax.jit
def _fingerprint(state):
  """(checksum of every leaf, whether every value is finite per leaf), computed on device."""
  finite = lambda x: (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                      else jnp.bool_(True))
  return jax.tree.map(_array_checksum, state), jax.tree.map(finite, state)


def fingerprint(state) -> tuple[dict[str, str], list[str]]:
  """({array path: checksum hex}, paths of arrays holding NaN or inf) of a train state."""
  checksums, finite = jax.device_get(_fingerprint(state))
  name = lambda path: jax.tree_util.keystr(path, simple=True, separator="/")
  return ({name(p): f"{int(c):08x}" for p, c in jax.tree_util.tree_flatten_with_path(checksums)[0]},
          [name(p) for p, f in jax.tree_util.tree_flatten_with_path(finite)[0] if not f])


def _digest(record: dict[str, Any]) -> str:
  body = {k: v for k, v in record.items() if k != "digest"}
  return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def _record_file(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(step_dir(mngr, step), "record", "metadata")


class Damaged(Exception):
  """A checkpoint that fails verification; `what` says which part and how."""

  def __init__(self, step: int, what: str):
    super().__init__(what)
    self.step, self.what = step, what


def read_record(mngr: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The record of `step`, verified against its digest; `Damaged` if unreadable or altered."""
  path = _record_file(mngr, step)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    record = restored["record"]
  except Exception as e:  # any failure to read or parse a stored file is damage to it
    raise Damaged(step, f"its record {path} is unreadable ({type(e).__name__})") from e
  if not isinstance(record, dict) or "model" not in record or (
      "digest" in record and record["digest"] != _digest(record)):
    raise Damaged(step, f"its record {path} does not match its digest")
  return record


def latest_record(mngr: ocp.CheckpointManager, workdir: str = "", step: int | None = None,
                  abstract_state=None) -> tuple[int, dict[str, Any]] | None:
  """The latest step (or `step`) and its verified model record, without loading arrays (with
  `abstract_state`, a damaged record's error names the newest checkpoint that verifies)."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  try:
    return step, read_record(mngr, step)
  except Damaged as e:
    raise damaged_error(mngr, e, workdir, abstract_state) from e


def save(mngr: ocp.CheckpointManager, step: int, state, record: dict[str, Any],
         workdir: str = "") -> None:
  """Starts an async save (orbax writes to a temporary directory and renames when done),
  after computing every array's checksum on the device. Refuses a non-finite state."""
  checksums, nonfinite = fingerprint(state)
  if nonfinite:
    raise UserError(
        f"At step {step} the train state holds NaN or inf ({', '.join(nonfinite[:4])}"
        f"{', ...' if len(nonfinite) > 4 else ''}): it was not saved, and the checkpoints "
        f"already in {mngr.directory} are untouched ({last_good(mngr)}). Lower "
        f"--config.train.lr, or pass --config.train.on_nonfinite=skip to drop such steps.")
  record = {**record, "step": step, "checksums": checksums}
  record["digest"] = _digest(record)
  try:
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                            record=ocp.args.JsonSave(record)), force=True)
  except (OSError, ValueError) as e:
    if write_failure(e) is None:
      raise
    raise write_error(mngr, step, e, workdir) from e


def finish(mngr: ocp.CheckpointManager, workdir: str = "") -> None:
  """Waits for the async save in flight; a failed write becomes a UserError."""
  try:
    mngr.wait_until_finished()
  except (OSError, ValueError) as e:
    if write_failure(e) is None:
      raise
    raise write_error(mngr, None, e, workdir) from e


# tensorstore reports a failed file write (disk full, EFBIG, EACCES) as a ValueError whose
# message carries the OS error code, e.g. "... File too large [os_error_code='27']".
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


def write_failure(e: Exception) -> str | None:
  """The OS's words for a failed write (an OSError, or tensorstore's ValueError carrying an
  OS error code); None for any other error, which is not the disk's fault."""
  if isinstance(e, OSError):
    return e.strerror or str(e)
  code = _OS_ERROR_CODE.search(str(e))
  return os.strerror(int(code.group(1))) if code else None


def write_error(mngr, step: int | None, e: Exception, workdir: str) -> UserError:
  return UserError(
      f"Writing the checkpoint{f' at step {step}' if step else ''} to {mngr.directory} failed "
      f"({write_failure(e)}). Orbax writes into a temporary directory and "
      f"renames it only when complete, so the earlier checkpoints are intact "
      f"({last_good(mngr)}). Free space or fix the permissions of --workdir={workdir or '.'} "
      f"and re-run the same command: it resumes from the latest checkpoint.")


def last_good(mngr: ocp.CheckpointManager) -> str:
  steps = mngr.all_steps()
  return f"the latest is step {max(steps)}" if steps else "none was saved yet"


def _restore_args(target):
  """Orbax's restore arguments for `target`: the whole train state, or a dict of some of its
  fields (e.g. {"params": ...}), of which orbax reads only those arrays (a partial restore).
  Saves and restores all go through orbax's PyTree handler: a manager binds one handler to
  the "state" item at first use, and refuses arguments of another."""
  return ocp.args.PyTreeRestore(item=target, partial_restore=isinstance(target, dict),
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))


def _verify(mngr, step: int, record: dict[str, Any], target):
  """The restored `target` at `step`, or `Damaged` naming the arrays that fail their checksum."""
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=_restore_args(target)))["state"]
  except Exception as e:  # the tree matches the record, so a failed read is damage
    raise Damaged(step, f"its arrays could not be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
  checksums, _ = fingerprint(restored)
  bad = [name for name in checksums if record["checksums"][name] != checksums[name]]
  if bad:
    raise Damaged(step, f"{len(bad)} array(s) fail their checksum: "
                        f"{', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}")
  return restored


def newest_intact(mngr, below: int, abstract_state) -> int | None:
  """The newest step before `below` whose record and arrays verify."""
  for step in sorted((s for s in mngr.all_steps() if s < below), reverse=True):
    try:
      record = read_record(mngr, step)
      if "checksums" in record:
        _verify(mngr, step, record, abstract_state)
      return step
    except Damaged:
      continue
  return None


def damaged_error(mngr, e: Damaged, workdir: str, abstract_state) -> UserError:
  intact = newest_intact(mngr, e.step, abstract_state) if abstract_state is not None else None
  older = [s for s in mngr.all_steps() if s < e.step]
  if intact is not None:
    fix = (f"The newest intact checkpoint is step {intact}: resume from it with "
           f"--config.train.resume_step={intact} (the checkpoints after it are moved to "
           f"{set_aside_dir(workdir or '.')}, not deleted).")
  elif older and abstract_state is None:
    fix = (f"Older checkpoints exist (steps {', '.join(map(str, older))}): resume from one with "
           f"--config.train.resume_step=N (the checkpoints after it are moved to "
           f"{set_aside_dir(workdir or '.')}, not deleted).")
  else:
    fix = "No older checkpoint verifies: start again in a new --workdir."
  return UserError(
      f"The checkpoint at step {e.step} in {mngr.directory} is damaged: {e.what}. It was not "
      f"used, and nothing was written. {fix}")


def set_aside_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints_set_aside")


def set_aside_after(mngr: ocp.CheckpointManager, step: int, workdir: str) -> None:
  """Moves the checkpoints after `step` out of orbax's sight, so training resumes from
  `step` and rewrites those steps; nothing is deleted."""
  if step not in mngr.all_steps():
    raise UserError(
        f"config.train.resume_step={step} names no checkpoint in {mngr.directory}; the saved "
        f"steps are {', '.join(map(str, mngr.all_steps())) or 'none'}.")
  later = [s for s in mngr.all_steps() if s > step]
  if not later:
    return
  if jax.process_index() == 0:
    for s in later:
      target = os.path.join(set_aside_dir(workdir), str(s))
      if os.path.exists(target):
        target += f".{os.getpid()}"
      os.makedirs(set_aside_dir(workdir), exist_ok=True)
      os.replace(step_dir(mngr, s), target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("checkpoint_set_aside")
  mngr.reload()


def apply_resume_step(mngr: ocp.CheckpointManager, resume_step: int, workdir: str) -> None:
  """config.train.resume_step=N: sets aside the checkpoints after N, unless the latest was
  written by a run already resumed from N (re-running the same command continues it)."""
  latest = mngr.latest_step()
  if not resume_step or latest is None or latest == resume_step:
    return
  try:
    continues = read_record(mngr, latest).get("resumed_from") == resume_step
  except Damaged:
    continues = False
  if not continues:
    set_aside_after(mngr, resume_step, workdir)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, workdir: str,
            record: dict[str, Any] | None = None, *, params_only: bool = False):
  """Restores the state at `step` onto the shardings of `abstract_state`, verifying every
  array's checksum (records from before checksums: the tree's fit only). With `params_only`,
  returns {"params": ...}: orbax reads the parameters alone, and only they are verified."""
  if record is None:
    record = latest_record(mngr, workdir, step)[1]
  target = {"params": abstract_state.params} if params_only else abstract_state
  expected = fingerprint_names(abstract_state)
  if "checksums" in record and sorted(record["checksums"]) != expected:
    missing = sorted(set(expected) - set(record["checksums"]))
    extra = sorted(set(record["checksums"]) - set(expected))
    raise _misfit(step, workdir, f"arrays only in the config: {missing[:3]}; only in the "
                                 f"checkpoint: {extra[:3]}")
  if "checksums" in record:
    try:
      return _verify(mngr, step, record, target)
    except Damaged as e:
      raise damaged_error(mngr, e, workdir, abstract_state) from e
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=_restore_args(target)))
  except (ValueError, KeyError, TypeError) as e:
    raise _misfit(step, workdir, f"{type(e).__name__}: {str(e)[:300]}") from e
  return restored["state"]


def fingerprint_names(tree) -> list[str]:
  return sorted(jax.tree_util.keystr(path, simple=True, separator="/")
                for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


def _misfit(step: int, workdir: str, detail: str) -> UserError:
  return UserError(
      f"The checkpoint at step {step} in {workdir} does not fit the current training state "
      f"({detail}). The model matches, so the optimizer config "
      f"(config.levels / config.train) probably changed since it was saved: restore the "
      f"saved config ({workdir}/config.json) or start a new --workdir.")


def check_workdir(workdir: str) -> None:
  """A workdir that can hold checkpoints, or a one-paragraph UserError."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file, not a directory: pass a directory (it is "
                    f"created if missing), e.g. --workdir={workdir}.run.")
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise UserError(f"--workdir={workdir} cannot be written ({type(e).__name__}: "
                    f"{e.strerror or e}): pass a directory you can write to, or fix its "
                    f"permissions or free space.") from e


class Diverged(UserError):
  """A run stopped at a NaN or inf loss or gradient norm (config.train.on_nonfinite=stop); a
  sweep records the step and goes on to its next point."""

  def __init__(self, message: str, *, step: int, loss: float, grad_norm: float):
    super().__init__(message)
    self.step, self.loss, self.grad_norm = step, loss, grad_norm


class NonFiniteGuard:
  """Stops the run (config.train.on_nonfinite="stop") or logs a skipped update ("skip") when a
  step's loss or gradient norm is NaN or inf. It reads each step's flag one step late, once the
  next step is queued, so the device never waits for the host."""

  def __init__(self, mode: str, mngr: ocp.CheckpointManager, workdir: str):
    if mode not in ("stop", "skip"):
      raise UserError(f"config.train.on_nonfinite={mode!r} must be 'stop' (end the run at a "
                      f"non-finite loss or gradient norm) or 'skip' (drop that step's update).")
    self.mode, self.mngr, self.workdir = mode, mngr, workdir
    self.pending = None

  def watch(self, step: int, metrics: dict[str, Any]) -> None:
    """Checks the previous step, then keeps `step`'s flag for later."""
    self.check()
    self.pending = (step, metrics["nonfinite"], metrics["loss"], metrics["grad_norm"])

  def check(self) -> None:
    """Checks the step kept last (call before a save: waits for it)."""
    if self.pending is None:
      return
    step, flag, loss, grad_norm = self.pending
    self.pending = None
    if not bool(flag):
      return
    if self.mode == "skip":
      from absl import logging
      logging.warning("step %d: loss %s, gradient norm %s: update skipped "
                      "(config.train.on_nonfinite=skip).", step, float(loss), float(grad_norm))
      return
    raise Diverged(
        f"At step {step} the loss was {float(loss)} and the gradient norm {float(grad_norm)}: "
        f"the run stopped, and nothing after that step was saved. Last good checkpoint: "
        f"{last_good(self.mngr)} in {self.mngr.directory} (re-running resumes from it). Lower "
        f"--config.train.lr or clip harder (config.train.clip_norm), or pass "
        f"--config.train.on_nonfinite=skip to drop such steps' updates and go on.",
        step=int(step), loss=float(loss), grad_norm=float(grad_norm))


@contextlib.contextmanager
def workdir_lock(workdir: str, *, lead: bool = True) -> Iterator[None]:
  """Holds `<workdir>/.lock` (an `flock`, released by the OS if the process dies) on the lead
  process; a second holder is refused with a UserError naming the first."""
  if not lead:   # the other processes of one distributed run write through the lead's lock
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, ".lock"), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      raise UserError(f"{workdir} is in use: {holder} is training there. Nothing was written. "
                      f"Wait for it to finish (or stop it), or pass another --workdir.") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def write_json_atomic(path: str, obj: Any) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)
