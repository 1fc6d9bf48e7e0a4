"""Training: a pure, jitted `train_step(state, batch) -> (state, metrics)` and the loop around it.

The loop resumes from the workdir's latest checkpoint, logs step, loss, tokens/s and
ETA, appends metrics to `<workdir>/metrics.jsonl`, checkpoints every
`config.train.checkpoint_every` steps and on SIGTERM, and ends with a validation
pass written to `<workdir>/eval.json`.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils

from compression import tree as ctree
from experiments import checkpoint, compress, data, evaluate, footprint, metrics as metrics_lib
from experiments import mesh as mesh_lib, profiling, timing
from experiments import state as state_lib
from experiments.state import TrainState
from nested import levels, models
from nested.errors import UserError


def loss_fn(apply: Callable, labels: Any = None, frozen: frozenset[str] = frozenset(),
            weights: Callable[[jax.Array], jax.Array] | None = None):
  """`(params, batch) -> mean next-token NLL`, with the `frozen` levels' weights (`labels`:
  each parameter's level) constants of its gradient (`levels.freeze`). With `weights`
  (`Experiment.loss_weights`), the mean is over the targets it weights (a task's answers)."""

  def loss(params, batch):
    params = levels.freeze(params, labels, frozen)
    nll = evaluate.token_nll(apply(params, batch[:, :-1]), batch[:, 1:])
    return evaluate.weighted_mean(nll, None if weights is None else weights(batch))

  return loss


def make_train_step(apply: Callable, optimizer: optax.GradientTransformation, grad_accum: int,
                    on_device: compress.OnDevice | None = None, skip_nonfinite: bool = False,
                    level_list: tuple[levels.Level, ...] = (),
                    loss_weights: Callable[[jax.Array], jax.Array] | None = None):
  """The train step `(state, batch, frozen=frozenset()) -> (state, metrics)`, un-jitted.

  Gradients are averaged over `grad_accum` micro-batches.

  `level_list` (the optimizer's levels) matters for levels with accumulate="none", which
  take no gradient between their firings. `frozen` names those that take none at this
  step (`levels.plan_step(level_list, step).frozen`, static under jit: one compiled variant
  per set): their weights are constants of the loss, so the backward pass skips their
  weight gradients. Any such level left out of `frozen` has its gradient zeroed on the
  device instead: the same result, without the saving.

  `metrics["nonfinite"]` flags a NaN or inf loss or gradient norm; with `skip_nonfinite`
  (config.train.on_nonfinite="skip") such a step, or one whose update makes a parameter
  non-finite, keeps the parameters and optimizer state it started from (the levels' step
  counts still advance, so that every level keeps firing on its step numbers).

  With `on_device` (config.compression.train) some parameters arrive exact-compressed: the
  step decodes them, and re-encodes those whose level fired.

  `loss_weights` (`Experiment.loss_weights`) restricts the loss to the targets it weights;
  micro-batches are then averaged as equals (exact when each row weights as many targets,
  as MQAR's do).
  """
  gated = tuple(lv for lv in level_list
                if lv.accumulate == "none" and lv.accumulate_last < lv.period)

  def loss_and_grads(params, batch, frozen):
    labels = levels.label_params(level_list, params) if gated else None
    value_and_grad = jax.value_and_grad(loss_fn(apply, labels, frozen, loss_weights))
    if grad_accum == 1:
      loss, grads = value_and_grad(params, batch)
    else:
      # Micro-batch j takes rows j, j + grad_accum, ...: each device keeps its own rows.
      micro = batch.reshape(-1, grad_accum, batch.shape[-1]).swapaxes(0, 1)

      def accumulate(carry, mb):
        return jax.tree.map(jnp.add, carry, value_and_grad(params, mb)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
      loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
    return loss, grads, labels

  def train_step(state: TrainState, batch: jax.Array,
                 frozen: frozenset[str] = frozenset()) -> tuple[TrainState, dict[str, Any]]:
    params = ctree.decompress(state.params)          # a no-op unless on_device
    loss, grads, labels = loss_and_grads(params, batch, frozen)
    if gated:
      grads = levels.gate_gradients(
          grads, labels, [lv for lv in gated if lv.name not in frozen], state.step)
    # Level-aware: a level that does not fire leaves its params and optimizer state alone.
    new_params, opt_state = levels.update_and_apply(optimizer, grads, state.opt_state, params)
    fired = state_lib.fired_levels(opt_state)
    grad_norm = optax.tree.norm(grads)
    nonfinite = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
    if skip_nonfinite:
      nonfinite |= ~jnp.all(jnp.array([jnp.all(jnp.isfinite(p))
                                       for p in jax.tree.leaves(new_params)]))
      keep = lambda old, new: jax.tree.map(lambda o, n: jnp.where(nonfinite, o, n), old, new)
      new_params = keep(params, new_params)
      opt_state = levels.with_counts_of(keep(state.opt_state, opt_state), opt_state)
      fired = {name: f & ~nonfinite for name, f in fired.items()}
    metrics = {"loss": loss, "grad_norm": grad_norm, "nonfinite": nonfinite,
               **{f"fired/{name}": f for name, f in fired.items()}}
    if on_device is not None:
      new_params, metrics["compression/overflow"] = on_device.update(state.params, new_params,
                                                                     fired)
    return TrainState(state.step + 1, new_params, opt_state), metrics

  return train_step


def jit_train_step(exp: state_lib.Experiment, on_device: compress.OnDevice | None = None):
  """`make_train_step` for `exp`, jitted: `step(state, batch, plan.frozen)` compiles once per
  distinct `frozen` set (static; positional, as jit with shardings takes no keywords), on
  first use (`levels.plan_step`)."""
  shardings = state_lib.state_shardings(exp, state_lib.state_shapes(exp, on_device))
  return jax.jit(
      mesh_lib.with_rules(make_train_step(exp.apply, exp.optimizer, exp.config.train.grad_accum,
                                          on_device, exp.config.train.on_nonfinite == "skip",
                                          exp.levels, exp.loss_weights),
                         exp.mesh),
      in_shardings=(shardings, mesh_lib.batch_sharding(exp.mesh)),
      out_shardings=(shardings, mesh_lib.replicated(exp.mesh)), donate_argnums=0,
      static_argnums=2)


def step_footprint(exp: state_lib.Experiment,
                   frozen: frozenset[str] = frozenset()) -> footprint.Footprint:
  """Bytes per device of `exp`'s train step at its global batch, compiled from shapes alone
  (nothing allocated: a GPU-sized step can be measured on a CPU)."""
  batch = jax.ShapeDtypeStruct((exp.config.train.batch_size, exp.config.train.seq_len + 1),
                               jnp.int32, sharding=mesh_lib.batch_sharding(exp.mesh))
  return footprint.compile_step(jit_train_step(exp), state_lib.abstract_state(exp), batch,
                                frozen)[1]


class CompiledVariants:
  """`step(state, batch, frozen)` run by executables compiled ahead of time, one per `frozen`
  set on its first use. Each is checked against the device's memory before it runs
  (`footprint.check_fits`: a step that cannot fit fails before anything is allocated, naming
  the bytes, the budget and a grad_accum that would fit), and its compile time and bytes per
  device are logged."""

  def __init__(self, jitted, config: ml_collections.ConfigDict, batch_shards: int = 1):
    self._jitted, self._config, self._compiled = jitted, config, {}
    self._batch_shards = batch_shards

  def __call__(self, state: TrainState, batch: jax.Array, frozen: frozenset[str]):
    if frozen not in self._compiled:
      compiled, f = footprint.compile_step(self._jitted, state, batch, frozen)
      footprint.check_fits(f, self._config, self._batch_shards)
      logging.info("Compiled the train step%s in %.1f s: %s per device (arguments %s, "
                   "temporaries %s).", f" with {sorted(frozen)} frozen" if frozen else "",
                   f.compile_seconds, footprint.gb(f.total), footprint.gb(f.arguments),
                   footprint.gb(f.temporaries))
      self._compiled[frozen] = compiled
    return self._compiled[frozen](state, batch)


def host_batch(exp: state_lib.Experiment, step: int):
  """This process's rows of the global batch for `step`: a pure function of (seed, step)."""
  return data.train_batch(exp.dataset, seed=exp.config.seed, step=step,
                          batch_size=exp.config.train.batch_size, seq_len=exp.config.train.seq_len,
                          process_index=jax.process_index(), process_count=jax.process_count())


def device_batches(exp: state_lib.Experiment, count: int) -> list:
  """The batches of steps 0 .. count − 1, each placed on the experiment's mesh (for benchmarks
  that time a compiled step on real data)."""
  return [mesh_lib.put_batch(host_batch(exp, step), exp.mesh) for step in range(count)]


class _SigtermFlag:
  """Turns SIGTERM into a flag the loop checks between steps (preemption → save, exit)."""

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def restore_or_init(exp: state_lib.Experiment, mngr, workdir: str) -> TrainState:
  """The latest checkpoint's state, verified; with config.train.resume_step=N, that of step N
  (once: the checkpoints after it are set aside, and the ones this run writes remember N)."""
  checkpoint.apply_resume_step(mngr, exp.config.train.resume_step, workdir)
  abstract = state_lib.abstract_state(exp)
  latest = checkpoint.latest_record(mngr, workdir, abstract_state=abstract)
  if latest is None:
    logging.info("No checkpoint in %s: starting from scratch.", workdir)
    return state_lib.init_state(exp)
  step, record = latest
  checkpoint.check_compatible(record, exp.record, workdir)
  logging.info("Resuming from the checkpoint at step %d in %s.", step, workdir)
  return checkpoint.restore(mngr, step, abstract, workdir, record)


def is_lead_process() -> bool:
  """Process 0 writes the workdir's JSON files and logs progress; every process takes
  part in checkpoint saves (orbax coordinates them)."""
  return jax.process_index() == 0


def stop_requested(sigterm: _SigtermFlag) -> bool:
  """Whether any process got SIGTERM: all must save the same step, or the save hangs."""
  if jax.process_count() == 1:
    return sigterm.raised
  flags = multihost_utils.process_allgather(np.array([sigterm.raised]))
  return bool(np.any(flags))


def check_overflow(overflow: int, step: int, config: ml_collections.ConfigDict) -> None:
  if overflow:
    raise UserError(
        f"At step {step}, {overflow} tensor(s) kept compressed for training had more escapes "
        f"(weights outside their block's 15-exponent window) than config.compression."
        f"escape_capacity={config.compression.escape_capacity} of their weights. Their "
        f"weights after this step are not usable and were not saved. Re-run with a larger "
        f"--config.compression.escape_capacity (it resumes from the last checkpoint), or "
        f"without --config.compression.train.")


def compress_state(exp: state_lib.Experiment, on_device: compress.OnDevice,
                   state: TrainState) -> TrainState:
  """The dense `state` with `on_device`'s parameters encoded, on the device."""
  shardings = state_lib.state_shardings(exp, state_lib.state_shapes(exp, on_device))
  params, overflow = jax.jit(on_device.compress, out_shardings=(
      shardings.params, mesh_lib.replicated(exp.mesh)))(state.params)
  check_overflow(int(overflow), int(state.step), exp.config)
  return state._replace(params=params)


@jax.jit
def dense_state(state: TrainState) -> TrainState:
  """The train state as checkpoints hold it: every parameter dense."""
  return state._replace(params=ctree.decompress(state.params))


def progress_meter(exp: state_lib.Experiment, start: int) -> metrics_lib.Progress:
  """Throughput and ETA, with MFU for Transformer++ on a device whose peak is on the datasheet
  (PaLM's 6N + attention FLOP count describes no in-context learner; CPUs have no datasheet
  peak)."""
  peak = timing.datasheet_tflops(jax.devices()[0].device_kind) or 0.0
  flops = (timing.model_flops_per_token(exp.config, models.count_params(exp.abstract_params))
           if exp.config.model.name == "transformer" else 0.0)
  return metrics_lib.Progress(start, exp.config.train.steps, state_lib.tokens_per_step(exp.config),
                              devices=jax.device_count(), flops_per_token=flops,
                              peak_flops=peak * 1e12)


def train(exp: state_lib.Experiment, workdir: str) -> TrainState:
  """Runs the loop from the latest checkpoint (if any) to `config.train.steps`, the only
  writer of `workdir` while it does (`checkpoint.workdir_lock`)."""
  with checkpoint.workdir_lock(workdir, lead=is_lead_process()):
    return _train(exp, workdir)


def _train(exp: state_lib.Experiment, workdir: str) -> TrainState:
  cfg = exp.config.train
  mngr = checkpoint.manager(workdir, keep=cfg.keep_checkpoints, keep_every=cfg.keep_every)
  state = restore_or_init(exp, mngr, workdir)
  lead = is_lead_process()
  if lead:
    checkpoint.write_json_atomic(os.path.join(workdir, "config.json"), exp.config.to_dict())
  start = int(state.step)
  if start >= cfg.steps:
    logging.info("Already trained for %d steps (config.train.steps=%d).", start, cfg.steps)
    mngr.close()
    return state

  on_device = compress.on_device(exp.config, exp.abstract_params)
  if on_device is not None:
    state = compress_state(exp, on_device, state)
  train_step = CompiledVariants(jit_train_step(exp, on_device), exp.config,
                                mesh_lib.batch_divisor(exp.mesh))
  guard = checkpoint.NonFiniteGuard(cfg.on_nonfinite, mngr, workdir)
  ckpt_record = {**exp.record, "resumed_from": cfg.resume_step}
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start) if lead else None
  progress = progress_meter(exp, start)
  schedule = state_lib.learning_rate_schedule(cfg)
  sigterm = _SigtermFlag()
  profiler = profiling.ProfileWindow(cfg.profile_steps, cfg.steps, workdir)
  logging.info("Training %s for steps %d..%d on a %s mesh: %s", exp.config.model.name, start + 1,
               cfg.steps, dict(exp.mesh.shape), exp.dataset.description)
  if exp.dataset.task is None:    # a synthetic task draws every batch afresh
    # Of the steps this call trains: a resumed run (or a continual phase) covers fewer.
    logging.info("%d steps cover %.3g epochs of the training windows.", cfg.steps - start,
                 data.epochs_covered(exp.dataset, steps=cfg.steps - start,
                                     batch_size=cfg.batch_size, seq_len=cfg.seq_len))
  try:
    for step in range(start, cfg.steps):
      profiler.before_step(step)
      plan = levels.plan_step(exp.levels, step)
      state, step_metrics = train_step(state, mesh_lib.put_batch(host_batch(exp, step), exp.mesh),
                                       plan.frozen)
      done = step + 1
      profiler.after_step(done, state)
      guard.watch(done, step_metrics)
      if on_device is not None and plan.fires & on_device.levels:
        check_overflow(int(step_metrics["compression/overflow"]), done, exp.config)
      log_step = done % cfg.log_every == 0 or done == cfg.steps
      stop = stop_requested(sigterm) if (log_step or jax.process_count() == 1) else False
      if lead and (log_step or stop):
        record = {"step": done, "lr": float(schedule(step)),
                  **{k: v.item() for k, v in jax.device_get(step_metrics).items()},
                  **progress.report(done)}
        writer.write(record)
        logging.info("step %d/%d | loss %.4f | %.3g tok/s | lr %.3g | ETA %s", done, cfg.steps,
                     record["loss"], record["tokens_per_sec"], record["lr"],
                     metrics_lib.format_duration(record["eta_sec"]))
      if exp.config.eval.every and done % exp.config.eval.every == 0 and done != cfg.steps:
        results = evaluate.evaluate(exp, state.params)
        if lead:
          writer.write({"step": done, **{f"val/{k}": v for k, v in results.items()}})
      if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop:
        guard.check()
        checkpoint.save(mngr, done, dense_state(state) if on_device else state, ckpt_record,
                        workdir)
      if stop:
        checkpoint.finish(mngr, workdir)
        logging.warning("SIGTERM: saved the checkpoint at step %d; exiting. Re-run the same "
                        "command to resume.", done)
        sys.exit(143)
  finally:
    sigterm.restore()
    profiler.stop()
    if writer:
      writer.close()
    checkpoint.finish(mngr, workdir)
    mngr.close()
  return state


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`--mode=train`: train, then evaluate on the validation split."""
  exp = state_lib.build(config)
  checkpoint.check_workdir(workdir)
  state = train(exp, workdir)
  results = {"step": int(state.step), **evaluate.evaluate(exp, state.params)}
  if is_lead_process():
    checkpoint.write_json_atomic(os.path.join(workdir, "eval.json"), results)
    evaluate.log_results(results)
  return results
