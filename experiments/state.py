"""An experiment assembled from its config: data, mesh, model, optimizer and train state.

`build(config)` validates everything it can before any compute or any write, so a
bad config fails in a second with a message, not an hour in.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from compression import tree as ctree
from experiments import checkpoint, data, mesh as mesh_lib, profiling
from nested import levels, models, optimizers
from nested.errors import UserError


class TrainState(NamedTuple):
  step: jax.Array      # int32 scalar: optimizer steps taken
  params: Any          # nested dict of float32 arrays
  opt_state: Any


def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to `lr` over `warmup_steps` (the first step already moves: lr/warmup),
  then cosine decay to `lr * min_lr_ratio` at step `steps`."""
  peak, floor = train_cfg.lr, train_cfg.lr * train_cfg.min_lr_ratio
  warmup = max(min(train_cfg.warmup_steps, train_cfg.steps), 1)
  decay = max(train_cfg.steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / decay, 0.0, 1.0)
    cosine = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, peak * (step + 1) / warmup, cosine)

  return schedule


def tokens_per_step(config: ml_collections.ConfigDict) -> int:
  return config.train.batch_size * config.train.seq_len


def level_list(config: ml_collections.ConfigDict) -> tuple[levels.Level, ...]:
  """The levels of `config.levels`, their optimizers on the config's schedule (SPEC §1)."""
  return tuple(levels.levels_from_config(
      config.levels, tokens_per_step=tokens_per_step(config),
      schedule=learning_rate_schedule(config.train), make_transform=optimizers.from_config))


def make_optimizer(config: ml_collections.ConfigDict,
                   level_tuple: tuple[levels.Level, ...] | None = None
                   ) -> optax.GradientTransformation:
  """Global-norm clipping, then the nested learner of the levels (default: the config's)."""
  learner = levels.nested_learner(level_list(config) if level_tuple is None else level_tuple)
  clip = (optax.clip_by_global_norm(config.train.clip_norm) if config.train.clip_norm > 0
          else optax.identity())
  return levels.chain(clip, learner)


def fired_levels(opt_state) -> dict[str, jax.Array]:
  """Which levels updated their parameters on the step that produced `opt_state` (the
  state of `make_optimizer`'s chain: clipping, then the nested learner)."""
  return levels.fired_levels(opt_state[1])


@dataclasses.dataclass(frozen=True)
class Experiment:
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  dataset: data.Dataset | None
  graphdef: nnx.GraphDef
  abstract_params: Any
  optimizer: optax.GradientTransformation
  levels: tuple[levels.Level, ...]      # the optimizer's levels, for `levels.plan_step`

  @functools.cached_property
  def apply(self) -> Callable[[Any, jax.Array], jax.Array]:
    """`(params, tokens) -> logits`; compressed leaves of `params` (JIT-Delta, compression/)
    are decoded inside the caller's jit, just in time: a no-op for a dense tree. One function
    per Experiment, so that jitted steps built from it can be cached on it."""
    apply = models.apply_fn(self.graphdef)
    return lambda params, tokens: apply(ctree.decompress(params), tokens)

  @property
  def loss_weights(self) -> Callable[[jax.Array], jax.Array] | None:
    """`batch -> [rows, seq_len]` weights of the targets the loss counts (a synthetic task's
    answers), or None: every target."""
    task = self.dataset.task if self.dataset is not None else None
    return task.loss_weights if task is not None else None

  @property
  def record(self) -> dict[str, Any]:
    return checkpoint.model_record(self.config.model, self.abstract_params)


def _check_train_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  t = config.train
  for name in ("steps", "seq_len", "batch_size", "grad_accum", "log_every", "checkpoint_every"):
    if t[name] < 1:
      raise UserError(f"config.train.{name}={t[name]} must be at least 1.")
  if t.batch_size % t.grad_accum:
    raise UserError(f"config.train.batch_size={t.batch_size} is not divisible by "
                    f"config.train.grad_accum={t.grad_accum}: each micro-batch must hold the "
                    f"same number of sequences.")
  mesh_lib.check_divisible(t.batch_size // t.grad_accum, mesh,
                           "config.train.batch_size / config.train.grad_accum")
  mesh_lib.check_divisible(config.eval.batch_size, mesh, "config.eval.batch_size")
  if t.keep_every < 0 or t.keep_every % t.checkpoint_every:
    raise UserError(f"config.train.keep_every={t.keep_every} must be 0 (no milestones) or a "
                    f"multiple of config.train.checkpoint_every={t.checkpoint_every}: only "
                    f"the steps that are saved can be kept, e.g. --config.train.keep_every="
                    f"{10 * t.checkpoint_every}.")
  profiling.parse_window(t.profile_steps, t.steps)


def build(config: ml_collections.ConfigDict, *, load_data: bool = True) -> Experiment:
  """Loads the data and checks the config; allocates no parameters.

  load_data=False leaves `dataset` None: enough to compile (and measure) the train step of
  a preset whose data is not on this machine.
  """
  graphdef, abstract_params = models.abstract(config.model)
  mesh = mesh_lib.make_mesh(config.mesh)
  _check_train_config(config, mesh)
  level_tuple = level_list(config)
  optimizer = make_optimizer(config, level_tuple)
  if not load_data:
    return Experiment(config, mesh, None, graphdef, abstract_params, optimizer, level_tuple)
  dataset = data.load_dataset(config.data)
  if dataset.task is not None:
    dataset.task.check(config.train.seq_len)
  if dataset.vocab_size > config.model.vocab_size:
    raise UserError(
        f"The data's vocabulary has {dataset.vocab_size} tokens but config.model.vocab_size="
        f"{config.model.vocab_size}: set --config.model.vocab_size={dataset.vocab_size} (or "
        f"larger), or use the tokenizer the preset was made for.")
  return Experiment(config, mesh, dataset, graphdef, abstract_params, optimizer, level_tuple)


def state_shapes(exp: Experiment, on_device: Any = None) -> TrainState:
  """Shapes and dtypes of the train state; with `on_device` (experiments.compress.OnDevice)
  its chosen parameters are compressed tensors."""
  def shapes(params):
    kept = params if on_device is None else on_device.compress(params)[0]
    return TrainState(jnp.zeros((), jnp.int32), kept, exp.optimizer.init(params))
  return jax.eval_shape(shapes, exp.abstract_params)


def tree_shardings(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Shardings for a tree of parameters (or train state) that may hold compressed tensors:
  arrays by the mesh rules (experiments/mesh.py), compressed tensors (decoded whole, just in
  time) replicated."""
  by_rule = mesh_lib.tree_shardings(tree, mesh)
  replicated = mesh_lib.replicated(mesh)
  return jax.tree.map(
      lambda leaf, sharding: (jax.tree.map(lambda _: replicated, leaf)
                              if ctree.is_compressed(leaf) else sharding),
      tree, by_rule, is_leaf=ctree.is_compressed)


def state_shardings(exp: Experiment, shapes: TrainState | None = None) -> TrainState:
  """Where every leaf of the train state lives: parameters and their optimizer-state
  twins by the mesh rules, scalars and compressed tensors replicated."""
  return tree_shardings(state_shapes(exp) if shapes is None else shapes, exp.mesh)


def init_state(exp: Experiment) -> TrainState:
  """Fresh parameters and optimizer state, created directly in their shards."""
  def init():
    params = models.init_params(exp.config.model, exp.config.seed)
    return TrainState(jnp.zeros((), jnp.int32), params, exp.optimizer.init(params))
  return jax.jit(init, out_shardings=state_shardings(exp))()


def abstract_state(exp: Experiment) -> TrainState:
  """Shapes, dtypes and shardings of the (dense) train state: the target of a restore, which
  may reshard a checkpoint saved on another mesh."""
  shapes = state_shapes(exp)
  return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes, state_shardings(exp, shapes))


def latest_checkpoint(workdir: str, step: int | None = None):
  """(read-only manager, step, model record) of the workdir's latest checkpoint (or of `step`);
  a UserError when there is none."""
  latest = None
  if os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    mngr = checkpoint.manager(workdir, read_only=True)
    if step is not None and step not in mngr.all_steps():
      raise UserError(f"config.train.resume_step={step} names no checkpoint in {workdir}; the "
                      f"saved steps are {', '.join(map(str, mngr.all_steps())) or 'none'}.")
    latest = checkpoint.latest_record(mngr, workdir, step)
  if latest is None:
    raise UserError(f"No checkpoints in {workdir}: train first (--mode=train with this "
                    f"--workdir), or point --workdir at a finished run.")
  return mngr, *latest


def latest_step(exp: Experiment, workdir: str):
  """(read-only manager, step) of the workdir's latest checkpoint; a UserError when there is
  none or it holds another model. config.train.resume_step=N picks step N's instead."""
  mngr, step, record = latest_checkpoint(workdir, exp.config.train.resume_step or None)
  checkpoint.check_compatible(record, exp.record, workdir)
  return mngr, step


def restore_latest(exp: Experiment, workdir: str) -> tuple[int, Any]:
  """(step, params) of the workdir's latest checkpoint; a UserError when there is none or it
  holds another model. Only the parameters are read (not the optimizer state or the level
  accumulators, about twice their bytes under AdamW)."""
  mngr, step = latest_step(exp, workdir)
  return step, checkpoint.restore(mngr, step, abstract_state(exp), workdir,
                                  params_only=True)["params"]
