"""Tests for nested.levels: `every`, the nested learner, and levels from config."""

import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from nested import levels
from nested.errors import UserError


def _rng():
  return np.random.default_rng()


def _tree(rng, shapes):
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _bits(tree):
  return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(_bits(a), _bits(b)):
    np.testing.assert_array_equal(x, y)


def _make_transform(optimizer_cfg, learning_rate):
  if optimizer_cfg.name == "sgd":
    return optax.sgd(learning_rate)
  if optimizer_cfg.name == "adamw":
    return optax.adamw(learning_rate, weight_decay=optimizer_cfg.weight_decay)
  raise ValueError(optimizer_cfg.name)


# ----------------------------------------------------------------------------- every

@pytest.mark.parametrize("period,accumulate", [(1, "sum"), (3, "sum"), (4, "sum"),
                                               (4, "mean")])
def test_every_sgd_matches_numpy_reference(period, accumulate):
  rng = _rng()
  lr, steps, shapes = 0.1, 12, {"w": (3, 5), "b": (5,)}
  params = _tree(rng, shapes)
  grads = [_tree(rng, shapes) for _ in range(steps)]
  tx = levels.every(optax.sgd(lr), period, accumulate=accumulate)
  state = tx.init(params)
  update = jax.jit(tx.update)

  acc = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
  for t, g in enumerate(grads, start=1):
    updates, state = update(g, state, params)
    acc = {k: acc[k] + g[k] for k in acc}
    if t % period == 0:
      scale = 1 / period if accumulate == "mean" else 1
      expected = {k: -lr * acc[k] * scale for k in acc}
      acc = {k: np.zeros_like(v) for k, v in acc.items()}
    else:
      expected = {k: np.zeros_like(v) for k, v in acc.items()}
    for k in shapes:
      np.testing.assert_allclose(updates[k], expected[k], rtol=1e-6, atol=1e-7)
    assert bool(levels.fired(state)) == (t % period == 0)
  assert int(state.count) == steps


@pytest.mark.parametrize("period,last", [(4, 1), (4, 2), (3, 3)])
@pytest.mark.parametrize("path", ["update", "apply"])
def test_every_accumulate_none_matches_numpy_reference(period, last, path):
  """A frozen level fires on the mean of its last `last` gradients and ignores the rest."""
  rng = _rng()
  lr, steps, shapes = 0.1, 12, {"w": (3, 5), "b": (5,)}
  params = _tree(rng, shapes)
  grads = [_tree(rng, shapes) for _ in range(steps)]
  tx = levels.every(optax.sgd(lr), period, accumulate="none", accumulate_last=last)
  state = tx.init(params)
  assert isinstance(state.accumulator, optax.EmptyState) == (last == 1)
  step = jax.jit(tx.update if path == "update" else tx.apply)
  for t, g in enumerate(grads, start=1):
    if t % period == 0:
      expected = {k: -lr * sum(w[k] for w in grads[t - last:t]) / last for k in shapes}
    else:
      expected = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    out, state = step(g, state, params)
    if path == "apply":
      out, params = jax.tree.map(np.subtract, out, params), out
    for k in shapes:
      np.testing.assert_allclose(out[k], expected[k], rtol=1e-5, atol=1e-6)
    assert bool(levels.fired(state)) == (t % period == 0)


def test_every_leaves_inner_state_bitwise_untouched_between_firings():
  rng = _rng()
  shapes = {"w": (4, 3)}
  params = _tree(rng, shapes)
  tx = levels.every(optax.adam(1e-2), 3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(1, 10):
    before = state.inner_state
    _, state = update(_tree(rng, shapes), state, params)
    if t % 3:
      _assert_bitwise_equal(state.inner_state, before)
    else:
      assert not np.array_equal(state.inner_state[0].mu["w"], before[0].mu["w"])


@pytest.mark.parametrize("make_inner", [optax.adam, optax.sgd])
def test_every_period_one_is_the_inner_transform_bit_for_bit(make_inner):
  rng = _rng()
  shapes = {"w": (6, 4), "b": (4,)}
  params = _tree(rng, shapes)
  inner = make_inner(3e-3)
  wrapped = levels.every(inner, 1)
  s_inner, s_wrapped = inner.init(params), wrapped.init(params)
  for _ in range(5):
    g = _tree(rng, shapes)
    # 0.0 + (-0.0) = +0.0: an accumulator would flip the sign of sgd's zero updates.
    g["b"][:2] = -0.0
    u_inner, s_inner = jax.jit(inner.update)(g, s_inner, params)
    u_wrapped, s_wrapped = jax.jit(wrapped.update)(g, s_wrapped, params)
    _assert_bitwise_equal(u_wrapped, u_inner)
    _assert_bitwise_equal(s_wrapped.inner_state, s_inner)
    params = optax.apply_updates(params, u_inner)
  assert bool(levels.fired(s_wrapped))


@pytest.mark.parametrize("period", [0, -2, 2.0, True, None])
def test_every_rejects_bad_period(period):
  with pytest.raises(ValueError, match="period"):
    levels.every(optax.sgd(1.0), period)


def test_every_rejects_bad_accumulate():
  with pytest.raises(ValueError, match="accumulate"):
    levels.every(optax.sgd(1.0), 2, accumulate="max")


@pytest.mark.parametrize("kwargs,message", [
    (dict(accumulate="none", accumulate_last=5), "accumulate_last must be an int from 1 to"),
    (dict(accumulate="none", accumulate_last=0), "accumulate_last must be an int from 1 to"),
    (dict(accumulate="sum", accumulate_last=2), "applies only to accumulate='none'")])
def test_every_rejects_bad_accumulate_last(kwargs, message):
  with pytest.raises(ValueError, match=message):
    levels.every(optax.sgd(1.0), 4, **kwargs)


def test_plan_step_names_the_firing_and_the_frozen_levels():
  sgd = optax.sgd(1.0)
  level_list = [levels.Level("fast", "a", sgd, 1, "none"),    # period 1: ordinary training
                levels.Level("sum3", "b", sgd, 3, "sum"),
                levels.Level("none4", "c", sgd, 4, "none"),
                levels.Level("last2", "d", sgd, 6, "none", accumulate_last=2)]
  plans = [levels.plan_step(level_list, s) for s in range(12)]
  assert [s for s, p in enumerate(plans) if "sum3" in p.fires] == [2, 5, 8, 11]
  assert [s for s, p in enumerate(plans) if "none4" in p.fires] == [3, 7, 11]
  assert [s for s, p in enumerate(plans) if "last2" in p.fires] == [5, 11]
  assert all("fast" in p.fires and not p.frozen & {"fast", "sum3"} for p in plans)
  assert [s for s, p in enumerate(plans) if "none4" not in p.frozen] == [3, 7, 11]
  assert [s for s, p in enumerate(plans) if "last2" not in p.frozen] == [4, 5, 10, 11]


def _counting(calls):
  """sgd(1) that records, through a traced side effect, each time its update runs."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    jax.debug.callback(lambda: calls.append(1))
    return jax.tree.map(jnp.negative, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def test_skipped_steps_do_not_run_the_inner_update():
  rng = _rng()
  calls = []
  params = _tree(rng, {"w": (2, 3)})
  tx = levels.every(_counting(calls), 4)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(12):
    _, state = update(_tree(rng, {"w": (2, 3)}), state, params)
  jax.effects_barrier()
  assert len(calls) == 3


def test_compiled_update_branches_instead_of_selecting():
  params = _tree(_rng(), {"w": (8, 8)})
  tx = levels.every(optax.adam(1e-3), 4)
  state = tx.init(params)
  hlo = jax.jit(tx.update).lower(params, state, params).compile().as_text()
  # The op itself, not a name in the metadata (HLO text also lists Python function names).
  assert re.search(r"\) conditional\(", hlo)


# ------------------------------------------------------------------------- param_path

def test_param_path_of_every_key_kind():
  tu = jax.tree_util
  assert levels.param_path((tu.DictKey("layers"), tu.SequenceKey(0), tu.GetAttrKey("mlp"),
                            tu.FlattenedIndexKey(2), tu.DictKey("kernel"))) == (
                                "layers/0/mlp/2/kernel")
  # nnx.Variable's `.value` is dropped from the end only.
  assert levels.param_path((tu.DictKey("a"), tu.GetAttrKey("value"))) == "a"
  assert levels.param_path((tu.GetAttrKey("value"), tu.DictKey("a"))) == "value/a"
  assert levels.param_path(()) == ""


class _Stack(nnx.Module):

  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 4, rngs=rngs)])
    self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)


def test_param_path_on_nnx_state():
  _, params = nnx.split(_Stack(nnx.Rngs(0)), nnx.Param)
  paths = sorted(levels.param_path(kp)
                 for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0])
  assert paths == ["head/kernel", "layers/0/bias", "layers/0/kernel", "layers/1/bias",
                   "layers/1/kernel"]


# --------------------------------------------------------------------- nested_learner

def _two_level_learner(lr=0.5):
  return levels.nested_learner([
      levels.Level("slow", r"layers/\d+/kernel", optax.sgd(lr), period=4),
      levels.Level("fast", ".*", optax.sgd(lr), period=1),
  ])


def _changed(before, after):
  return {levels.param_path(kp): not np.array_equal(x, y)
          for (kp, x), y in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                jax.tree.leaves(after))}


def test_nested_learner_periods_on_dict_params():
  rng = _rng()
  layer = {"kernel": (3, 4), "bias": (4,)}
  params = {"layers": {"0": _tree(rng, layer), "1": _tree(rng, layer)},
            "head": _tree(rng, {"kernel": (4, 2)})}
  tx = _two_level_learner()
  state = tx.init(params)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for t in range(1, 10):
    grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    updates, state = step(params, state, grads)
    new = optax.apply_updates(params, updates)
    changed = _changed(params, new)
    assert changed == {"head/kernel": True, "layers/0/bias": True, "layers/1/bias": True,
                       "layers/0/kernel": t % 4 == 0, "layers/1/kernel": t % 4 == 0}
    fired = levels.fired_levels(state)
    assert {k: bool(v) for k, v in fired.items()} == {"slow": t % 4 == 0, "fast": True}
    params = new


def test_nested_learner_on_nnx_state_first_match_wins():
  rng = _rng()
  _, params = nnx.split(_Stack(nnx.Rngs(int(rng.integers(1 << 30)))), nnx.Param)
  tx = _two_level_learner()
  state = tx.init(params)
  for t in range(1, 5):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    changed = _changed(params, new)
    # layers/*/kernel also matches ".*" but "slow" comes first.
    assert changed == {"head/kernel": True, "layers/0/bias": True, "layers/1/bias": True,
                       "layers/0/kernel": t == 4, "layers/1/kernel": t == 4}
    params = new
  assert isinstance(params, nnx.State)


def test_fired_levels_through_a_chain():
  params = _tree(_rng(), {"kernel": (2, 2), "bias": (2,)})
  tx = optax.chain(optax.clip_by_global_norm(1.0), levels.nested_learner([
      levels.Level("slow", "kernel", optax.sgd(0.1), period=2),
      levels.Level("fast", "bias", optax.sgd(0.1), period=1)]))
  state = tx.init(params)
  assert {k: bool(v) for k, v in levels.fired_levels(state).items()} == {
      "slow": False, "fast": False}
  _, state = tx.update(params, state, params)
  assert {k: bool(v) for k, v in levels.fired_levels(state).items()} == {
      "slow": False, "fast": True}
  _, state = tx.update(params, state, params)
  assert {k: bool(v) for k, v in levels.fired_levels(state).items()} == {
      "slow": True, "fast": True}


def test_unmatched_params_are_a_user_error_naming_them():
  params = {"mlp": {"kernel": np.zeros((2, 2), np.float32)},
            "attn": {"q": np.zeros((2,), np.float32), "k": np.zeros((2,), np.float32)}}
  tx = levels.nested_learner([levels.Level("mlp", "mlp/", optax.sgd(1.0), 1)])
  with pytest.raises(UserError) as e:
    tx.init(params)
  message = str(e.value)
  assert "attn/q" in message and "attn/k" in message and "mlp/kernel" not in message
  assert "add a level" in message and "widen" in message


def test_duplicate_level_names_are_a_user_error():
  with pytest.raises(UserError, match="'a'"):
    levels.nested_learner([levels.Level("a", "x", optax.sgd(1.0), 1),
                           levels.Level("a", "y", optax.sgd(1.0), 2)])


def test_invalid_pattern_is_a_user_error():
  with pytest.raises(UserError, match="config.levels.bad.pattern"):
    levels.nested_learner([levels.Level("bad", "(", optax.sgd(1.0), 1)])


# ----------------------------------------------------------------- levels_from_config

def _levels_cfg(**levels_):
  cfg = ml_collections.ConfigDict()
  for name, fields in levels_.items():
    cfg[name] = ml_collections.ConfigDict(fields)
  return cfg


def test_levels_from_config_periods_order_and_fields():
  cfg = _levels_cfg(
      slow=dict(pattern="mlp", period=4 * 256, accumulate="mean", lr_scale=0.5,
                optimizer=dict(name="sgd")),
      outer=dict(pattern=".*", period=0, optimizer=dict(name="adamw", weight_decay=0.1)))
  got = levels.levels_from_config(cfg, tokens_per_step=256,
                                  schedule=optax.constant_schedule(1e-3),
                                  make_transform=_make_transform)
  # Written order, not ConfigDict's sorted order: "outer" would otherwise shadow "slow".
  assert [(lv.name, lv.pattern, lv.period, lv.accumulate) for lv in got] == [
      ("slow", "mlp", 4, "mean"), ("outer", ".*", 1, "sum")]


@pytest.mark.parametrize("period,nearest", [(1000, "768 or 1024"), (100, "256"),
                                            (-512, "256")])
def test_levels_from_config_rejects_periods_off_the_step_grid(period, nearest):
  cfg = _levels_cfg(slow=dict(pattern="mlp", period=period, optimizer=dict(name="sgd")))
  with pytest.raises(UserError) as e:
    levels.levels_from_config(cfg, tokens_per_step=256, schedule=optax.constant_schedule(1.0),
                              make_transform=_make_transform)
  message = str(e.value)
  assert "config.levels.slow.period" in message and str(period) in message
  assert "256 tokens per step" in message and nearest in message


@pytest.mark.parametrize("fields,message", [
    (dict(accumulate="max"), r"config.levels.slow: accumulate must be one of \('sum', 'mean', "
                             r"'none'\), got 'max'"),
    (dict(accumulate="none", accumulate_last=5),
     r"config.levels.slow: accumulate_last must be an int from 1 to the period \(4 steps\)"),
    (dict(accumulate="mean", accumulate_last=2), r"applies only to accumulate='none'")])
def test_levels_from_config_bad_accumulate_names_the_level(fields, message):
  cfg = _levels_cfg(slow=dict(pattern="mlp", period=4 * 8, optimizer=dict(name="sgd"), **fields))
  with pytest.raises(UserError, match=message):
    levels.levels_from_config(cfg, tokens_per_step=8, schedule=0.1,
                              make_transform=_make_transform)


def test_levels_from_config_allows_none_on_a_period_one_level():
  cfg = _levels_cfg(outer=dict(pattern=".*", period=0, accumulate="none",
                               optimizer=dict(name="sgd")))
  (level,) = levels.levels_from_config(cfg, tokens_per_step=8, schedule=0.1,
                                       make_transform=_make_transform)
  assert level.period == 1 and all(level.takes_gradient(s) for s in range(5))


def test_levels_from_config_missing_field_is_a_user_error():
  cfg = _levels_cfg(slow=dict(period=0, optimizer=dict(name="sgd")))
  with pytest.raises(UserError, match="pattern"):
    levels.levels_from_config(cfg, tokens_per_step=8, schedule=0.1,
                              make_transform=_make_transform)


def test_level_schedule_is_offset_to_the_firing_steps():
  seen = {}

  def make_transform(optimizer_cfg, learning_rate):
    seen[optimizer_cfg.tag] = learning_rate
    return optax.sgd(learning_rate)

  schedule = lambda step: 0.01 * (step + 1.0)
  cfg = _levels_cfg(
      a=dict(pattern="a", period=3 * 16, lr_scale=2.0, optimizer=dict(name="sgd", tag="a")),
      b=dict(pattern="b", period=16, optimizer=dict(name="sgd", tag="b")))
  got = levels.levels_from_config(cfg, tokens_per_step=16, schedule=schedule,
                                  make_transform=make_transform)
  assert seen["b"] is schedule
  for n in range(4):
    np.testing.assert_allclose(seen["a"](n), 2.0 * schedule(3 * n + 2))

  # End to end: firing n of level "a" moves the params by lr(global step) * summed grads.
  params = {"a": np.zeros((3,), np.float32), "b": np.zeros((3,), np.float32)}
  grads = {"a": np.ones((3,), np.float32), "b": np.ones((3,), np.float32)}
  tx = levels.nested_learner(got)
  state = tx.init(params)
  for step in range(9):  # 0-based global step
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["b"], -schedule(step) * np.ones(3), rtol=1e-6)
    expected_a = -2.0 * schedule(step) * 3 if step % 3 == 2 else 0.0
    np.testing.assert_allclose(updates["a"], expected_a * np.ones(3), rtol=1e-6)


# ---------------------------------------------------------------- vmap, mesh, orbax

def test_vmap_matches_a_loop_over_examples():
  rng = _rng()
  batch, shapes = 3, {"kernel": (4, 3), "bias": (3,)}
  params = {k: rng.normal(size=(batch,) + s).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.normal(size=(batch,) + s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(6)]
  tx = levels.nested_learner([levels.Level("slow", "kernel", optax.adam(1e-2), 3),
                              levels.Level("fast", "bias", optax.sgd(0.1), 1)])
  state = jax.vmap(tx.init)(params)
  step = jax.jit(jax.vmap(tx.update))
  batched = []
  for g in grads:
    updates, state = step(g, state, params)
    batched.append(updates)

  for i in range(batch):
    p_i = jax.tree.map(lambda x: x[i], params)
    s_i = tx.init(p_i)
    for g, u in zip(grads, batched):
      u_i, s_i = jax.jit(tx.update)(jax.tree.map(lambda x: x[i], g), s_i, p_i)
      for k in shapes:
        np.testing.assert_allclose(u[k][i], u_i[k], rtol=1e-6, atol=1e-7)
  fired = levels.fired_levels(state)
  assert fired["slow"].shape == (batch,) and bool(fired["slow"].all())


_MESH_SCRIPT = textwrap.dedent("""
    import jax, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    from nested import levels

    assert jax.device_count() == 8
    rng = np.random.default_rng()
    host = {"kernel": rng.normal(size=(16, 4)).astype(np.float32),
            "bias": rng.normal(size=(8,)).astype(np.float32)}
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in host.items()}
             for _ in range(4)]
    tx = levels.nested_learner([levels.Level("slow", "kernel", optax.adam(1e-2), 2),
                                levels.Level("fast", "bias", optax.sgd(0.1), 1)])

    def run(place):
      params = place(host)
      state = tx.init(params)  # eagerly: the accumulator must inherit the params' sharding
      step = jax.jit(tx.update)
      outs = []
      for g in grads:
        updates, state = step(place(g), state, params)
        outs.append(updates)
      return params, state, outs

    _, _, reference = run(lambda t: t)
    for axis_type in (AxisType.Auto, AxisType.Explicit):
      mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
      shard = NamedSharding(mesh, P("x"))
      with jax.set_mesh(mesh):
        params, state, outs = run(lambda t: jax.device_put(t, shard))
      for ref, out in zip(reference, outs):
        for k in ref:
          np.testing.assert_allclose(out[k], ref[k], rtol=1e-6, atol=1e-7)
          assert out[k].sharding.is_equivalent_to(shard, out[k].ndim), (axis_type, k)
      acc = state.inner_states["slow"].inner_state.accumulator["kernel"]
      assert acc.sharding.is_equivalent_to(shard, 2), (axis_type, acc.sharding)
    print("OK")
""")


def test_learner_on_an_8_device_mesh_matches_unsharded():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", _MESH_SCRIPT], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_orbax_round_trip_of_the_learner_state(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  rng = _rng()
  params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32)}
  tx = levels.nested_learner([levels.Level("slow", "kernel", optax.adam(1e-2), 3),
                              levels.Level("fast", "bias", optax.adam(1e-2), 1)])
  state = tx.init(params)
  for _ in range(4):  # leaves a non-zero accumulator on "slow"
    _, state = tx.update(jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                                      params), state, params)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "state", state)
    ckpt.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckpt.restore(tmp_path / "state", abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  _assert_bitwise_equal(restored, state)
  assert np.any(np.asarray(restored.inner_states["slow"].inner_state.accumulator["kernel"]))


def test_a_level_that_owns_no_parameter_is_a_user_error():
  params = {"mlp": {"kernel": jnp.ones((2, 2))}, "norm": {"scale": jnp.ones((2,))}}
  catch_all_first = [levels.Level("outer", ".*", optax.sgd(0.1), 1),
                     levels.Level("slow", "mlp", optax.sgd(0.1), 4)]
  with pytest.raises(UserError, match=r"\['slow'\] own no parameter"):
    levels.nested_learner(catch_all_first).init(params)
  levels.nested_learner(catch_all_first[::-1]).init(params)


# ------------------------------------------------------------------ update_and_apply

def test_update_and_apply_matches_update_then_apply_and_skips_untouched():
  rng = _rng()
  params = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32)}
  params["kernel"][0, 0] = -0.0  # a skipped step must not turn -0.0 into +0.0
  tx = levels.chain(optax.clip_by_global_norm(1.0), levels.nested_learner([
      levels.Level("slow", "kernel", optax.adam(1e-2), 3, "mean"),
      levels.Level("fast", "bias", optax.adam(1e-2), 1)]))
  s_ref = s_new = tx.init(params)
  p_ref = p_new = params
  plain = jax.jit(lambda g, s, p: tx.update(g, s, p))
  aware = jax.jit(lambda g, s, p: levels.update_and_apply(tx, g, s, p))
  for t in range(1, 8):
    g = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), params)
    updates, s_ref = plain(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, updates)
    before = p_new
    p_new, s_new = aware(g, s_new, p_new)
    _assert_bitwise_equal(s_new, s_ref)
    if t % 3:
      np.testing.assert_array_equal(np.asarray(p_new["kernel"]).view(np.uint32),
                                    np.asarray(before["kernel"]).view(np.uint32))
      p_ref = dict(p_ref, kernel=p_new["kernel"])  # the plain path's p + 0 drops -0.0's sign
    # p + u fuses differently inside the branch than after it: equal to rounding.
    for k in params:
      np.testing.assert_allclose(p_new[k], p_ref[k], rtol=1e-6, atol=1e-7)


def _while_body_array_copies(hlo: str) -> list[str]:
  """The `copy` instructions of non-scalar arrays in the while loops' bodies of an HLO module."""
  bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo))
  copies, inside = [], False
  for line in hlo.splitlines():
    if line and not line.startswith(" "):
      inside = line.split()[0] in bodies
    elif inside and re.search(r"= \w+\[\d[\d,]*\]\S* copy\(", line):
      copies.append(line.strip())
  return copies


def test_a_skipped_step_copies_no_arrays_in_a_training_loop():
  """Through a `fori_loop` of updates, the accumulator and parameters stay in place: XLA
  copied the accumulator out of the cond on every step when the cond returned it."""
  params = {"w": jnp.ones((64, 32)), "b": jnp.ones((32,))}
  grads = jax.tree.map(lambda x: 1e-3 * x, params)
  tx = levels.every(optax.adam(1e-2), 8)

  def run(params, state, grads):   # gradients as data, as a train step computes them
    step = lambda _, c: levels.update_and_apply(tx, grads, c[1], c[0])
    return jax.lax.fori_loop(0, 64, step, (params, state))

  hlo = jax.jit(run, donate_argnums=(0, 1)).lower(params, tx.init(params),
                                                  grads).compile().as_text()
  assert "while" in hlo
  assert _while_body_array_copies(hlo) == []
