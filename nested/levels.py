"""Levels: an optax transform under a step-count mask, and a learner made of them (SPEC §1).

A level is a gradient transform with an update period. `every` wraps one transform so it
fires once per `period` steps on the gradients accumulated since it last fired;
`nested_learner` splits one parameter tree into levels by regex over parameter paths;
`levels_from_config` builds the levels of `config.levels`.

All three are plain optax transforms (`update` returns zero updates for a level that does
not fire). `update_and_apply(tx, grads, state, params)` also writes the parameters, and
for `every`, `nested_learner` and `chain` it does so under each level's own condition: a
level that does not fire reads and writes neither its parameters nor its inner state; it
only adds the gradient into its accumulator.

A level with accumulate="none" is frozen between its firings: it takes the gradient of the
step it fires on (and of the `accumulate_last - 1` steps before it) and no other. `plan_step`
says, on the host, which levels fire and which are frozen at a step, so that the train
step can be compiled with the frozen levels' weights as constants (`freeze`): their weight
gradients are then not computed at all.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nested.errors import UserError

# `partition` is the current name of `multi_transform` (optax >= 0.2.5).
_partition = getattr(optax, "partition", None) or optax.multi_transform

_ACCUMULATE = ("sum", "mean", "none")


class LevelAwareTransform(optax.GradientTransformationExtraArgs):
  """An optax transform that can also apply its own updates, level by level.

  `apply(grads, state, params, **extra_args) -> (new_params, new_state)` equals
  `update` followed by `optax.apply_updates`, except that a level which does not fire
  leaves its parameters and inner state as they are instead of adding a zero update.
  """
  # A NamedTuple subclass cannot add fields (optax unpacks transforms as (init, update)
  # pairs), so `apply` lives in the instance dict.

  def __new__(cls, init, update, apply):
    self = super().__new__(cls, init, update)
    self.apply = apply
    return self


def update_and_apply(tx: optax.GradientTransformation, grads: Any, state: Any, params: Any,
                     **extra_args) -> tuple[Any, Any]:
  """New parameters and state: `tx.apply` where `tx` has one, else update + apply_updates.

  Args:
    tx: any optax transform; level-aware ones (`every`, `nested_learner`, `chain`) skip the
      parameters of levels that do not fire.
    grads: the step's gradients, shaped like `params`.
    state: `tx`'s state.
    params: the parameters.

  Returns:
    (new_params, new_state).
  """
  apply = getattr(tx, "apply", None)
  if apply is not None:
    return apply(grads, state, params, **extra_args)
  updates, state = tx.update(grads, state, params, **extra_args)
  return optax.apply_updates(params, updates), state


def chain(*transforms: optax.GradientTransformation) -> LevelAwareTransform:
  """`optax.chain(*transforms)` (same state) whose last transform applies its own updates.

  The leading transforms (e.g. gradient clipping) transform the gradients; the last one,
  typically a `nested_learner`, goes through `update_and_apply`.
  """
  if not transforms:
    raise ValueError("chain: give at least one transform.")
  chained = optax.chain(*transforms)
  leading = [optax.with_extra_args_support(t) for t in transforms[:-1]]

  def apply_fn(grads, state, params, **extra_args):
    states = []
    for tx, s in zip(leading, state):
      grads, s = tx.update(grads, s, params, **extra_args)
      states.append(s)
    new_params, last = update_and_apply(transforms[-1], grads, state[-1], params, **extra_args)
    return new_params, type(state)(states + [last])

  return LevelAwareTransform(chained.init, chained.update, apply_fn)


class EveryState(NamedTuple):
  count: jax.Array        # int32 scalar: `update` calls so far
  accumulator: Any        # gradients of the current window (after a firing: of the window that
                          # fired, until the next step overwrites it); EmptyState when unused
  inner_state: Any        # the wrapped transform's state, untouched between firings
  period: jax.Array       # int32 scalar: lets `fired` read a state on its own


def _accumulator_dtype(dtype):
  # Summing thousands of bf16 gradients loses them below bf16's 8-bit mantissa.
  if jnp.issubdtype(dtype, jnp.inexact):
    return jnp.promote_types(dtype, jnp.float32)
  return dtype


def takes_gradient(step, period: int, accumulate: str = "sum", accumulate_last: int = 1):
  """Whether a level's weights take a gradient at 0-based step `step` (int or int array).

  Always, except for accumulate="none": then only on the last `accumulate_last` steps of
  each period, the one it fires on (step ≡ period - 1 mod period) included.
  """
  if accumulate != "none" or period == 1:
    return True
  return (-(step + 1)) % period < accumulate_last


def _check_accumulate(accumulate: str, accumulate_last: int, period: int) -> str | None:
  """What is wrong with these settings, or None."""
  if accumulate not in _ACCUMULATE:
    return f"accumulate must be one of {_ACCUMULATE}, got {accumulate!r}"
  if (isinstance(accumulate_last, bool) or not isinstance(accumulate_last, numbers.Integral)
      or not 1 <= accumulate_last <= period):
    return (f"accumulate_last must be an int from 1 to the period ({period} steps), got "
            f"{accumulate_last!r}")
  if accumulate_last != 1 and accumulate != "none":
    return (f"accumulate_last={accumulate_last} applies only to accumulate='none' (with "
            f"{accumulate!r} every gradient since the last firing is used)")
  return None


def every(inner: optax.GradientTransformation, period: int, *, accumulate: str = "sum",
          accumulate_last: int = 1) -> LevelAwareTransform:
  """Applies `inner` once every `period` steps to the gradients gathered since (SPEC §1).

  With g_t the gradient of step t = 1, 2, ..., the level's gradient at a firing step is
    G_t = Σ_{s=t-period+1..t} g_s                     accumulate="sum"
          (1/period) Σ_{s=t-period+1..t} g_s          accumulate="mean"
          (1/k) Σ_{s=t-k+1..t} g_s, k=accumulate_last accumulate="none"
  and
    u_t, S = inner.update(G_t, S, params)   if t ≡ 0 (mod period)
    u_t = 0, S unchanged                     otherwise (inner is not run: `lax.cond`).
  period == 1 is `inner` itself, bit for bit. accumulate="none" keeps no accumulator when
  k = 1 and ignores the gradients of the other steps (callers that know the step on the
  host need not compute them: `plan_step`, `freeze`). `update_and_apply` (the returned
  transform's `apply`) runs the same arithmetic, but a skipped step only adds g_t into the
  accumulator: params and the inner state pass through the untaken branch unchanged.

  Args:
    inner: the transform of the level.
    period: positive Python int, in steps.
    accumulate: "sum", "mean" or "none" (see above).
    accumulate_last: k, for accumulate="none": 1 ≤ k ≤ period.

  Returns:
    A `LevelAwareTransform` with state `EveryState`.
  """
  if isinstance(period, bool) or not isinstance(period, numbers.Integral) or period < 1:
    raise ValueError(f"every: period must be a positive int, got {period!r}.")
  problem = _check_accumulate(accumulate, accumulate_last, period)
  if problem:
    raise ValueError(f"every: {problem}.")
  period = int(period)
  inner = optax.with_extra_args_support(inner)
  # Period 1 bypasses the accumulator: 0.0 + (-0.0) would turn -0.0 into +0.0.
  has_accumulator = period > 1 and not (accumulate == "none" and accumulate_last == 1)
  divisor = {"sum": 1, "mean": period, "none": accumulate_last}[accumulate]

  def period_array():
    return jnp.asarray(period, jnp.int32)

  def init_fn(params):
    accumulator = optax.EmptyState() if not has_accumulator else jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=_accumulator_dtype(p.dtype)), params)
    return EveryState(jnp.zeros([], jnp.int32), accumulator, inner.init(params), period_array())

  def gathered(accumulator, grads, count):
    """The accumulator with this step's gradient in it (the gradient, without one). The
    first step of a window overwrites what the last window left (no reset after a firing)."""
    if not has_accumulator:
      return grads
    if accumulate == "none":
      window = takes_gradient(count - 1, period, accumulate, accumulate_last)
      grads = jax.tree.map(lambda g: jnp.where(window, g, jnp.zeros_like(g)), grads)
    opens = (count - 1) % period == 0
    return jax.tree.map(lambda a, g: jnp.where(opens, g.astype(a.dtype), a + g.astype(a.dtype)),
                        accumulator, grads)

  def level_gradient(summed, grads):
    return jax.tree.map(lambda a, g: (a / divisor if divisor != 1 else a).astype(g.dtype),
                        summed, grads)

  # The gradient joins the accumulator outside the cond, in one pass that reads it and the
  # gradient and writes it in place (a cond that returned the accumulator made XLA copy it
  # every step; a reset after a firing was a second pass over it). The branches take what
  # they touch as operands (not closures): a skipped step passes params and the inner state
  # through unchanged, which XLA aliases instead of copying.

  def update_fn(updates, state, params=None, **extra_args):
    count = state.count + 1
    if period == 1:
      updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
      return updates, EveryState(count, state.accumulator, inner_state, period_array())
    fires = count % period == 0
    summed = gathered(state.accumulator, updates, count)

    def fire(inner_state, summed, grads):
      new_updates, inner_state = inner.update(level_gradient(summed, grads), inner_state,
                                              params, **extra_args)
      # Both branches of the cond must agree on dtypes.
      return jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates, grads), inner_state

    def skip(inner_state, summed, grads):
      return jax.tree.map(jnp.zeros_like, grads), inner_state

    updates_out, inner_state = jax.lax.cond(fires, fire, skip, state.inner_state, summed, updates)
    return updates_out, EveryState(count, summed if has_accumulator else state.accumulator,
                                   inner_state, period_array())

  def apply_fn(grads, state, params, **extra_args):
    count = state.count + 1
    if period == 1:
      updates, inner_state = inner.update(grads, state.inner_state, params, **extra_args)
      return (optax.apply_updates(params, updates),
              EveryState(count, state.accumulator, inner_state, period_array()))
    fires = count % period == 0
    summed = gathered(state.accumulator, grads, count)

    def fire(params, inner_state, summed, grads):
      updates, inner_state = inner.update(level_gradient(summed, grads), inner_state, params,
                                          **extra_args)
      updates = jax.tree.map(lambda u, g: u.astype(g.dtype), updates, grads)
      return optax.apply_updates(params, updates), inner_state

    def skip(params, inner_state, summed, grads):
      return params, inner_state

    params, inner_state = jax.lax.cond(fires, fire, skip, params, state.inner_state, summed,
                                       grads)
    return params, EveryState(count, summed if has_accumulator else state.accumulator,
                              inner_state, period_array())

  return LevelAwareTransform(init_fn, update_fn, apply_fn)


def fired(state: EveryState) -> jax.Array:
  """Whether the update that produced `state` applied the inner transform.

  fired = (count mod period == 0) and count > 0.

  Args:
    state: an `EveryState`.

  Returns:
    A bool array (scalar, or batched like `state.count`).
  """
  return (state.count % state.period == 0) & (state.count > 0)


@dataclasses.dataclass(frozen=True)
class Level:
  """One level of a nested learner (SPEC §1).

  Attributes:
    name: e.g. "fast", "slow", "outer".
    pattern: regex, `re.search`-ed against each parameter's `param_path`.
    transform: the level's gradient transform.
    period: in optimizer steps.
    accumulate: "sum" or "mean" of the gradients between firings, or "none" (frozen
      between firings; see `every`).
    accumulate_last: with "none", how many steps' gradients (ending at the firing one) it
      takes.
  """
  name: str
  pattern: str
  transform: optax.GradientTransformation
  period: int
  accumulate: str = "sum"
  accumulate_last: int = 1

  def takes_gradient(self, step):
    """Whether this level's weights take a gradient at 0-based step `step`."""
    return takes_gradient(step, self.period, self.accumulate, self.accumulate_last)


class StepPlan(NamedTuple):
  """What the levels do at one step, known on the host from the step number alone."""
  fires: frozenset[str]    # levels whose transform runs (their weights change)
  frozen: frozenset[str]   # levels whose weights take no gradient (accumulate="none")


def plan_step(level_list: Sequence[Level], step: int) -> StepPlan:
  """The plan of 0-based step `step`: level ℓ fires when (step + 1) ≡ 0 mod p_ℓ.

  This matches `every`'s own count as long as each level's count equals the train step's
  (a skipped non-finite step still advances the counts: `with_counts_of`).
  """
  return StepPlan(
      fires=frozenset(lv.name for lv in level_list if (step + 1) % lv.period == 0),
      frozen=frozenset(lv.name for lv in level_list if not lv.takes_gradient(step)))


def freeze(params: Any, labels: Any, frozen: frozenset[str]) -> Any:
  """`params` with the leaves of the `frozen` levels as constants of any derivative taken
  through it (`lax.stop_gradient`): the backward pass then computes no gradient for them
  (their gradient is zero), e.g. no xᵀδ matmul for a frozen linear layer."""
  if not frozen:
    return params
  return jax.tree.map(lambda p, label: jax.lax.stop_gradient(p) if label in frozen else p,
                      params, labels)


def gate_gradients(grads: Any, labels: Any, level_list: Sequence[Level], step: jax.Array) -> Any:
  """`grads` with zeros for the levels that take no gradient at (traced) step `step`.

  The in-program form of `freeze`: the same result, decided on the device (so without
  saving the backward pass's work); levels that always take a gradient are untouched.
  """
  gated = {lv.name: lv.takes_gradient(step) for lv in level_list
           if lv.accumulate == "none" and lv.period > 1}
  if not gated:
    return grads
  return jax.tree.map(
      lambda g, label: jnp.where(gated[label], g, jnp.zeros_like(g)) if label in gated else g,
      grads, labels)


def with_counts_of(opt_state: Any, source: Any) -> Any:
  """`opt_state` with each level's step count (`EveryState.count`) taken from `source`."""
  is_every = lambda x: isinstance(x, EveryState)
  return jax.tree.map(lambda s, c: s._replace(count=c.count) if is_every(s) else s,
                      opt_state, source, is_leaf=is_every)


def param_path(keypath: Sequence[Any]) -> str:
  """The '/'-joined name of a parameter, e.g. "layers/0/mlp/w_up/kernel".

  Args:
    keypath: a JAX key path (DictKey, GetAttrKey, SequenceKey, FlattenedIndexKey entries).

  Returns:
    The path string.
  """
  keys = list(keypath)
  # An nnx.Variable flattens to its `.value`; the path should name the variable.
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value":
    keys = keys[:-1]
  return "/".join(_key_name(k) for k in keys)


def _key_name(key: Any) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _compile_patterns(levels: Sequence[Level]) -> list[tuple[str, re.Pattern]]:
  names = [level.name for level in levels]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f"Level names must be unique; {duplicates} appear more than once in "
                    f"config.levels. Rename one of each pair or merge their patterns.")
  if not levels:
    raise UserError("config.levels is empty: define at least one level, e.g. one with "
                    "pattern '.*' and period 0 for ordinary training.")
  compiled = []
  for level in levels:
    try:
      compiled.append((level.name, re.compile(level.pattern)))
    except re.error as e:
      raise UserError(f"config.levels.{level.name}.pattern={level.pattern!r} is not a valid "
                      f"regular expression ({e}).") from e
  return compiled


def _label_fn(levels: Sequence[Level]) -> Callable[[Any], Any]:
  patterns = _compile_patterns(levels)

  def label(path: str) -> str | None:
    return next((name for name, regex in patterns if regex.search(path)), None)

  def label_tree(params):
    labels = jax.tree_util.tree_map_with_path(lambda kp, _: label(param_path(kp)), params)
    paths = [param_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    # None is an empty subtree to JAX, so unmatched leaves vanish from `labels`' leaves.
    unmatched = [p for p in paths if label(p) is None]
    if unmatched:
      shown = ", ".join(unmatched[:20]) + (f", ... ({len(unmatched)} in all)"
                                           if len(unmatched) > 20 else "")
      raise UserError(
          f"No level's pattern matches these parameters: {shown}. Every parameter must belong "
          f"to a level: add a level to config.levels for them, or widen an existing level's "
          f"pattern (a regex searched in the '/'-joined path; '.*' matches everything).")
    used = set(jax.tree.leaves(labels))
    empty = [name for name, _ in patterns if name not in used]
    if empty:
      # Almost always a mistake: a typo in the pattern, or a catch-all written first.
      raise UserError(
          f"Level(s) {empty} own no parameter: every parameter their pattern matches (if any) "
          f"was taken by a level written before them. Fix the pattern, or write the level "
          f"before catch-alls such as '.*' (the first matching level wins).")
    return labels

  return label_tree


def label_params(levels: Sequence[Level], params: Any) -> Any:
  """The name of the level that owns each parameter (a tree shaped like `params`)."""
  return _label_fn(levels)(params)


def nested_learner(levels: Sequence[Level]) -> LevelAwareTransform:
  """One optimizer over a parameter tree split into levels (SPEC §1).

  Each parameter belongs to the first level whose pattern `re.search`-es its `param_path`
  and is updated by `every(level.transform, level.period, accumulate=level.accumulate)`.

  Args:
    levels: the levels, in order of precedence.

  Returns:
    An `optax.partition` of the wrapped levels, keyed by level name, that can also apply
    its updates level by level (`update_and_apply`).
  """
  label_tree = _label_fn(levels)
  transforms = {level.name: every(level.transform, level.period, accumulate=level.accumulate,
                                 accumulate_last=level.accumulate_last)
                for level in levels}
  partitioned = _partition(transforms, label_tree)

  def apply_fn(grads, state, params, **extra_args):
    # The state is optax.partition's: per level, a MaskedState over the whole tree in
    # which other levels' leaves are MaskedNode.
    labels = label_tree(grads)
    new_params, inner_states = params, {}
    for name, tx in transforms.items():
      mask = jax.tree.map(lambda label, name=name: label == name, labels)
      masked = lambda tree, mask=mask: jax.tree.map(
          lambda m, x: x if m else optax.MaskedNode(), mask, tree)
      level_params, level_state = tx.apply(masked(grads), state.inner_states[name].inner_state,
                                           masked(params), **extra_args)
      new_params = jax.tree.map(lambda m, new, old: new if m else old, mask, level_params,
                                new_params)
      inner_states[name] = state.inner_states[name]._replace(inner_state=level_state)
    return new_params, state._replace(inner_states=inner_states)

  return LevelAwareTransform(partitioned.init, partitioned.update, apply_fn)


def fired_levels(opt_state: Any) -> dict[str, jax.Array]:
  """Which levels fired on the update that produced `opt_state`.

  Args:
    opt_state: the state of a `nested_learner`, or of any transform that contains one.

  Returns:
    Level name -> bool array (see `fired`).
  """
  found = jax.tree_util.tree_flatten_with_path(
      opt_state, is_leaf=lambda x: isinstance(x, EveryState))[0]
  result = {}
  for keypath, state in found:
    names = [k.key for k in keypath if isinstance(k, jax.tree_util.DictKey)]
    if isinstance(state, EveryState) and names:
      # The partition state keys each level's state by the level's name.
      result[str(names[-1])] = fired(state)
  return result


def _written_order(cfg: Any) -> list[str]:
  # ConfigDict's public views sort keys; first-match precedence needs the written order.
  fields = getattr(cfg, "_fields", None)
  return list(fields) if isinstance(fields, dict) else list(cfg.keys())


def _period_in_steps(name: str, period_tokens: int, tokens_per_step: int) -> int:
  if isinstance(period_tokens, bool) or not isinstance(period_tokens, numbers.Integral):
    raise UserError(f"config.levels.{name}.period={period_tokens!r} must be an int number "
                    f"of tokens (0 = every step).")
  if period_tokens == 0:
    return 1
  if period_tokens > 0 and period_tokens % tokens_per_step == 0:
    return period_tokens // tokens_per_step
  lower = max(period_tokens // tokens_per_step, 1) * tokens_per_step
  upper = max(-(-period_tokens // tokens_per_step), 1) * tokens_per_step
  nearest = f"{lower}" if lower == upper else f"{lower} or {upper}"
  raise UserError(
      f"config.levels.{name}.period={period_tokens} tokens is not a positive multiple of the "
      f"{tokens_per_step} tokens per step (batch_size * seq_len), so the level could not fire "
      f"on a step boundary. Use {nearest} (or 0 for every step).")


def _level_schedule(schedule: optax.ScalarOrSchedule, period: int,
                    lr_scale: float) -> optax.ScalarOrSchedule:
  if not callable(schedule):
    return lr_scale * schedule
  if period == 1 and lr_scale == 1.0:
    return schedule
  # The inner transform counts its own firings n; firing n happens at global step n*p + p-1.
  return lambda n: lr_scale * schedule(n * period + period - 1)


def _field(name: str, cfg: Any, key: str, default: Any = None) -> Any:
  if key in cfg:
    return cfg[key]
  if default is None:
    raise UserError(f"config.levels.{name} has no field {key!r}; each level needs pattern, "
                    f"period (tokens), optimizer, and optionally accumulate, accumulate_last and "
                    f"lr_scale.")
  return default


def levels_from_config(levels_cfg: ml_collections.ConfigDict, *, tokens_per_step: int,
                       schedule: optax.ScalarOrSchedule,
                       make_transform: Callable[[ml_collections.ConfigDict, optax.ScalarOrSchedule],
                                                optax.GradientTransformation]) -> list[Level]:
  """The levels of `config.levels`, in the order the config writes them (SPEC §1).

  Level ℓ with period P_ℓ tokens fires every p_ℓ = P_ℓ / tokens_per_step steps (P_ℓ = 0:
  p_ℓ = 1); its firing n (0-based) happens at global step n p_ℓ + p_ℓ - 1, so its
  transform gets the learning rate lr_scale_ℓ · schedule(n p_ℓ + p_ℓ - 1).

  Args:
    levels_cfg: level name -> ConfigDict(pattern, period, optimizer, accumulate="sum",
      accumulate_last=1, lr_scale=1.0).
    tokens_per_step: tokens in one optimizer step.
    schedule: the global learning-rate schedule over 0-based optimizer steps, or a constant.
    make_transform: (optimizer config, learning-rate schedule) -> transform.

  Returns:
    The levels, in precedence order.
  """
  if tokens_per_step < 1:
    raise ValueError(f"tokens_per_step must be positive, got {tokens_per_step}.")
  levels = []
  for name in _written_order(levels_cfg):
    cfg = levels_cfg[name]
    period = _period_in_steps(name, _field(name, cfg, "period"), tokens_per_step)
    accumulate = _field(name, cfg, "accumulate", "sum")
    accumulate_last = _field(name, cfg, "accumulate_last", 1)
    problem = _check_accumulate(accumulate, accumulate_last, period)
    if problem:
      raise UserError(f"config.levels.{name}: {problem} (the level's period is {period} "
                      f"steps; accumulate is one of {_ACCUMULATE}).")
    lr_scale = float(_field(name, cfg, "lr_scale", 1.0))
    transform = make_transform(_field(name, cfg, "optimizer"),
                               _level_schedule(schedule, period, lr_scale))
    levels.append(Level(name, _field(name, cfg, "pattern"), transform, period, accumulate,
                        accumulate_last))
  return levels
