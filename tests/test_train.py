"""The train step, gradient accumulation, exact resume, and data-parallel equivalence."""

import json
import os
import re

import jax
import numpy as np
import optax
import pytest

from conftest import forget_checkpoints_after, micro_config
from experiments import checkpoint, evaluate, flops, state as state_lib, train
from nested import levels
from nested.errors import UserError


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def assert_trees_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))


def test_train_step_lowers_loss_on_a_fixed_batch(cache_dir):
  exp = state_lib.build(micro_config(cache_dir, **{"train.lr": 1e-2, "train.warmup_steps": 1,
                                                "train.steps": 30}))
  step = train.jit_train_step(exp)
  state = state_lib.init_state(exp)
  batch = train.host_batch(exp, int(np.random.default_rng().integers(1000)))
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.7 * losses[0], losses


def test_gradient_accumulation_matches_one_big_batch(cache_dir):
  # SGD with rate 1 makes the parameter change the averaged gradient itself (Adam's
  # first step, ~sign(g), would amplify round-off in near-zero gradients).
  exp = state_lib.build(micro_config(cache_dir))
  batch = train.host_batch(exp, int(np.random.default_rng().integers(1000)))
  params = jax.device_get(state_lib.init_state(exp).params)
  moved = {}
  for accum in (1, 4):
    sgd = optax.sgd(1.0)
    step = jax.jit(train.make_train_step(exp.apply, sgd, accum))
    state, metrics = step(state_lib.TrainState(np.int32(0), params, sgd.init(params)), batch)
    moved[accum] = (float(metrics["loss"]), jax.tree.map(np.subtract, params_of(state), params))
  np.testing.assert_allclose(moved[1][0], moved[4][0], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(moved[1][1]), jax.tree.leaves(moved[4][1])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-7)


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(cache_dir, tmp_path):
  config = micro_config(cache_dir, **{"train.steps": 7, "train.checkpoint_every": 3})
  workdir = str(tmp_path)
  full = params_of(train.train(state_lib.build(config), workdir))
  forget_checkpoints_after(workdir, 3)
  resumed = train.train(state_lib.build(config), workdir)
  assert int(resumed.step) == 7
  assert_trees_bitwise_equal(full, params_of(resumed))
  steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert steps == list(range(1, 8))


def test_checkpoint_of_another_model_is_refused_and_left_untouched(cache_dir, tmp_path):
  workdir = str(tmp_path)
  train.train(state_lib.build(micro_config(cache_dir, **{"train.steps": 3})), workdir)
  ckpt = checkpoint.checkpoint_dir(workdir)
  before = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
            for r, _, fs in os.walk(ckpt) for f in fs}
  other = state_lib.build(micro_config(cache_dir, **{"train.steps": 6, "model.d_model": 48}))
  with pytest.raises(UserError, match=r"different model \(model.d_model: checkpoint 32, config 48"):
    train.train(other, workdir)
  after = {os.path.join(r, f): os.path.getmtime(os.path.join(r, f))
           for r, _, fs in os.walk(ckpt) for f in fs}
  assert before == after


def test_a_workdir_in_use_is_refused_before_anything_is_written(cache_dir, tmp_path):
  """A second run started into a workdir that a first is training in stops at once."""
  workdir = str(tmp_path)
  exp = state_lib.build(micro_config(cache_dir, **{"train.steps": 2}))
  with checkpoint.workdir_lock(workdir):
    with pytest.raises(UserError, match=rf"is in use: pid {os.getpid()} on .* is training there"):
      train.train(exp, workdir)
    assert sorted(os.listdir(workdir)) == [".lock"]
  assert int(train.train(exp, workdir).step) == 2    # free again once the first is done


def test_a_checkpoint_resumes_under_another_remat_but_not_another_model():
  """What the backward pass keeps is how a step computes, not what: a run that ran out of
  memory may continue with `remat` changed; any other model field is another model."""
  record = lambda **model: {"model": {"name": "hope", "remat": "chunk", "cms_lr": 0.01,
                                      **model}, "param_shapes": {"w": [2, 2]}}
  checkpoint.check_compatible(record(), record(remat="nested", scan_unroll=2), "wd")
  with pytest.raises(UserError, match=r"model.cms_lr: checkpoint 0.01, config 0.0"):
    checkpoint.check_compatible(record(), record(remat="nested", cms_lr=0.0), "wd")
  # A field the checkpoint's record lacks (it was written before the config had it) is at
  # the model's default there: the config may name that default, and only that.
  checkpoint.check_compatible(record(), record(eta_init=0.018), "wd")
  with pytest.raises(UserError, match=r"model.eta_init: checkpoint 0.018, config 0.2"):
    checkpoint.check_compatible(record(), record(eta_init=0.2), "wd")


def test_batch_size_not_divisible_by_accumulation_is_a_user_error(cache_dir):
  with pytest.raises(UserError, match="grad_accum"):
    state_lib.build(micro_config(cache_dir, **{"train.grad_accum": 3}))


def test_default_single_level_equals_plain_clipped_adamw(cache_dir):
  """The one-level nested learner is ordinary pretraining, bit for bit."""
  from nested import optimizers
  exp = state_lib.build(micro_config(cache_dir))
  cfg = exp.config
  adamw = cfg.levels.outer.optimizer
  plain = optax.chain(optax.clip_by_global_norm(cfg.train.clip_norm), optimizers.adamw(
      state_lib.learning_rate_schedule(cfg.train), b1=adamw.b1, b2=adamw.b2, eps=adamw.eps,
      weight_decay=adamw.weight_decay))
  step_nested = train.jit_train_step(exp)
  step_plain = jax.jit(train.make_train_step(exp.apply, plain, 1))
  nested_state = state_lib.init_state(exp)
  params = jax.device_get(nested_state.params)
  plain_state = state_lib.TrainState(np.int32(0), params, plain.init(params))
  for s in range(4):
    batch = train.host_batch(exp, s)
    nested_state, _ = step_nested(nested_state, batch)
    plain_state, _ = step_plain(plain_state, batch)
  assert_trees_bitwise_equal(params_of(nested_state), params_of(plain_state))


def test_slow_mlp_level_changes_only_every_fourth_step(cache_dir, tmp_path):
  config = micro_config(cache_dir, preset="slow_mlp", **{"train.steps": 8})
  config.levels.slow.period = 4 * config.train.batch_size * config.train.seq_len
  exp = state_lib.build(config)
  step, state = train.jit_train_step(exp), state_lib.init_state(exp)
  previous = params_of(state)
  for s in range(1, 9):
    state, metrics = step(state, train.host_batch(exp, s - 1))
    current = params_of(state)
    for block_prev, block_now in zip(previous["layers"].values(), current["layers"].values()):
      mlp_moved = any(not np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(block_prev["mlp"]), jax.tree.leaves(block_now["mlp"])))
      attn_moved = any(not np.array_equal(a, b) for a, b in zip(
          jax.tree.leaves(block_prev["attn"]), jax.tree.leaves(block_now["attn"])))
      assert mlp_moved == (s % 4 == 0), s
      assert attn_moved, s
    assert bool(metrics["fired/slow"]) == (s % 4 == 0) and bool(metrics["fired/outer"])
    previous = current


def test_metrics_record_which_levels_fired(cache_dir, tmp_path):
  config = micro_config(cache_dir, preset="slow_mlp", **{"train.steps": 8})
  config.levels.slow.period = 4 * config.train.batch_size * config.train.seq_len
  train.train(state_lib.build(config), str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["fired/slow"] for r in records] == [s % 4 == 0 for s in range(1, 9)]
  assert all(r["fired/outer"] for r in records)


def test_learning_rate_schedule_matches_closed_form():
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, min_lr_ratio=0.1, warmup_steps=10, steps=110))
  schedule = state_lib.learning_rate_schedule(cfg)
  for step in [0, 4, 9, 10, 35, 60, 109, 110, 500]:
    if step < 10:
      expected = 1e-3 * (step + 1) / 10
    else:
      progress = min((step - 10) / 100, 1.0)
      expected = 1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * progress))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_evaluation_traces_its_step_once_per_experiment(cache_dir):
  """`eval.every` evaluates many times in a run: the eval step is traced (and so compiled)
  once, not on every pass."""
  from experiments import evaluate
  exp = state_lib.build(micro_config(cache_dir))
  params = state_lib.init_state(exp).params
  traced = []

  def listener(event, duration, **kwargs):
    del duration
    if event == "/jax/core/compile/jaxpr_trace_duration":
      traced.append(kwargs.get("fun_name"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first = evaluate.evaluate(exp, params)
    second = evaluate.evaluate(exp, params)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert traced.count("eval_step") == 1, traced
  assert first == second


def test_profile_steps_trace_the_window_and_only_with_the_flag(cache_dir, tmp_path):
  runs = {}
  for spec in ("", "1,2"):
    workdir = tmp_path / (spec or "none")
    train.train(state_lib.build(micro_config(cache_dir, **{"train.steps": 3,
                                                           "train.profile_steps": spec})),
                str(workdir))
    runs[spec] = sorted((workdir / "profile").glob("plugins/profile/*/*.xplane.pb"))
  assert runs[""] == []
  assert len(runs["1,2"]) == 1
  assert b"train_step" in runs["1,2"][0].read_bytes()  # the jitted step's device work


@pytest.mark.parametrize("spec, message", [("2", "not a window"), ("3,3", "not a window"),
                                           ("a,b", "not a window"), ("4,99", "ends past the run")])
def test_bad_profile_steps_are_user_errors(cache_dir, spec, message):
  config = micro_config(cache_dir, **{"train.steps": 10, "train.profile_steps": spec})
  with pytest.raises(UserError, match=message):
    state_lib.build(config, load_data=False)


def tensorboard_scalars(logdir):
  """tag → {step: value} as TensorBoard reads the event files (TFRecords of Event protos, in
  file-name order): a SessionLog START at step s (a purge) drops the earlier events at
  steps >= s."""
  import struct
  from tensorboardX.proto import event_pb2
  series = {}
  for path in sorted(logdir.glob("events.out.tfevents.*")):
    raw, pos = path.read_bytes(), 0
    while pos < len(raw):
      (length,) = struct.unpack("<Q", raw[pos:pos + 8])
      event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its CRC, the record, its CRC
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        for values in series.values():
          for step in [s for s in values if s >= event.step]:
            del values[step]
      for value in event.summary.value:
        series.setdefault(value.tag, {})[event.step] = value.simple_value
  return series


def test_tensorboard_events_match_the_jsonl_after_a_resume(cache_dir, tmp_path):
  config = micro_config(cache_dir, **{"eval.every": 2})
  train.train(state_lib.build(config), str(tmp_path))
  forget_checkpoints_after(str(tmp_path), 3)
  # Resumed at 3 and stopped at 5: the first run's events of steps 4..6 are stale.
  config.train.steps = 5
  train.train(state_lib.build(config), str(tmp_path))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  series = tensorboard_scalars(tmp_path / "tensorboard")
  assert len(list((tmp_path / "tensorboard").glob("events.*"))) == 2
  for tag in ("loss", "grad_norm", "perf/tokens_per_sec_per_device", "val/loss"):
    want = {r["step"]: r[tag] for r in records if tag in r}
    assert sorted(series[tag]) == sorted(want), tag
    np.testing.assert_allclose([series[tag][s] for s in sorted(want)],
                               [want[s] for s in sorted(want)], rtol=1e-6)


def test_keep_every_keeps_milestones_beside_the_latest(cache_dir, tmp_path):
  kept = {}
  for keep_every in (0, 3):
    workdir = str(tmp_path / str(keep_every))
    config = micro_config(cache_dir, **{"train.checkpoint_every": 1, "train.keep_checkpoints": 2,
                                        "train.keep_every": keep_every})
    train.train(state_lib.build(config), workdir)
    kept[keep_every] = checkpoint.manager(workdir, read_only=True).all_steps()
  assert kept == {0: [5, 6], 3: [3, 5, 6]}


@pytest.mark.parametrize("keep_every", [-3, 4])
def test_keep_every_off_the_checkpoint_steps_is_a_user_error(cache_dir, keep_every):
  config = micro_config(cache_dir, **{"train.keep_every": keep_every})  # checkpoint_every 3
  with pytest.raises(UserError, match="multiple of config.train.checkpoint_every=3"):
    state_lib.build(config, load_data=False)


# ------------------------------------------ a level frozen between firings (accumulate="none")

def frozen_mlp_config(cache_dir, accumulate="none", **overrides):
  """slow_mlp with its MLP level firing every 4 steps, frozen in between."""
  config = micro_config(cache_dir, preset="slow_mlp", **overrides)
  config.levels.slow.period = 4 * config.train.batch_size * config.train.seq_len
  config.levels.slow.accumulate = accumulate
  return config


def is_mlp(keypath):
  return "/mlp/" in levels.param_path(keypath)


def test_frozen_steps_take_no_mlp_gradient_and_dispatch_equals_one_program(cache_dir):
  exp = state_lib.build(frozen_mlp_config(cache_dir))
  step = train.jit_train_step(exp)
  dispatched, one_program = state_lib.init_state(exp), state_lib.init_state(exp)
  for s in range(8):
    batch = train.host_batch(exp, s)
    if s == 0:
      # Independently: the global norm of every gradient but the MLPs'.
      params = jax.device_get(dispatched.params)
      grads = jax.grad(lambda p: evaluate.token_nll(exp.apply(p, batch[:, :-1]),
                                                    batch[:, 1:]).mean())(params)
      others = [g for kp, g in jax.tree_util.tree_flatten_with_path(grads)[0] if not is_mlp(kp)]
      want_norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in others))
    plan = levels.plan_step(exp.levels, s)
    assert plan.frozen == ({"slow"} if s % 4 != 3 else set())
    dispatched, m_dispatched = step(dispatched, batch, plan.frozen)
    one_program, m_one = step(one_program, batch)
    if s == 0:
      np.testing.assert_allclose(float(m_dispatched["grad_norm"]), want_norm, rtol=1e-5)
      np.testing.assert_allclose(float(m_one["grad_norm"]), want_norm, rtol=1e-5)
    assert bool(m_dispatched["fired/slow"]) == bool(m_one["fired/slow"]) == (s % 4 == 3)
    for a, b in zip(*map(jax.tree.leaves, (params_of(dispatched), params_of(one_program)))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_freezing_a_level_removes_exactly_its_weight_gradient_matmuls(cache_dir):
  exp = state_lib.build(frozen_mlp_config(cache_dir))
  params = state_lib.init_state(exp).params
  batch = train.host_batch(exp, 0)
  labels = levels.label_params(exp.levels, params)
  count = lambda frozen: flops.count(jax.value_and_grad(train.loss_fn(exp.apply, labels, frozen)),
                                     params, batch)
  tokens = batch.shape[0] * (batch.shape[1] - 1)
  mlp = [x for kp, x in jax.tree_util.tree_flatten_with_path(params)[0] if is_mlp(kp)]
  # dW = xᵀδ: 2 · tokens · fan_in · fan_out FLOPs per MLP kernel, and nothing else.
  assert count(frozenset()) - count(frozenset({"slow"})) == sum(2 * tokens * x.size for x in mlp)


def test_accumulate_none_changes_the_slow_update(cache_dir):
  moved = {}
  for accumulate in ("sum", "none"):
    exp = state_lib.build(frozen_mlp_config(cache_dir, accumulate))
    step, state = train.jit_train_step(exp), state_lib.init_state(exp)
    start = params_of(state)
    for s in range(4):
      state, _ = step(state, train.host_batch(exp, s), levels.plan_step(exp.levels, s).frozen)
    moved[accumulate] = [a - b for (kp, a), b in zip(
        jax.tree_util.tree_flatten_with_path(params_of(state))[0], jax.tree.leaves(start))
        if is_mlp(kp)]
  assert all(np.abs(m).max() > 0 for m in moved["none"])
  assert any(not np.allclose(a, b, rtol=1e-3) for a, b in zip(moved["sum"], moved["none"]))


def test_a_frozen_level_resumes_bitwise_and_reports_its_firings(cache_dir, tmp_path):
  config = frozen_mlp_config(cache_dir, **{"train.steps": 8, "train.checkpoint_every": 3})
  workdir = str(tmp_path)
  full = params_of(train.train(state_lib.build(config), workdir))
  forget_checkpoints_after(workdir, 3)
  resumed = train.train(state_lib.build(config), workdir)
  assert_trees_bitwise_equal(full, params_of(resumed))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["fired/slow"] for r in records] == [s % 4 == 0 for s in range(1, 9)]


def test_skipped_nonfinite_steps_keep_the_level_counts_on_the_step_numbers(cache_dir):
  exp = state_lib.build(frozen_mlp_config(cache_dir, **{"train.on_nonfinite": "skip"}))
  state = state_lib.init_state(exp)
  params = jax.device_get(state.params)
  params["unembed"]["kernel"] = params["unembed"]["kernel"].copy()
  params["unembed"]["kernel"][0, 0] = np.nan       # every step's loss is NaN
  state = state._replace(params=params)
  step = train.jit_train_step(exp)
  for s in range(4):
    state, metrics = step(state, train.host_batch(exp, s), levels.plan_step(exp.levels, s).frozen)
    assert bool(metrics["nonfinite"]) and not bool(metrics["fired/slow"])
  assert_trees_bitwise_equal(params, params_of(state))
  counts = [int(s.count) for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, levels.EveryState))
      if isinstance(s, levels.EveryState)]
  assert counts == [4, 4]      # as many as the steps taken: plan_step stays in step


def test_a_step_over_the_memory_budget_fails_before_training_and_names_a_grad_accum_that_fits(
    cache_dir, tmp_path):
  config = micro_config(cache_dir)
  f = train.step_footprint(state_lib.build(config))
  budget = f.total - f.temporaries // 3      # the fixed bytes fit, the activations do not
  config.train.memory_budget_gb = budget / 2**30
  workdir = str(tmp_path)
  with pytest.raises(UserError, match=r"needs .* per device .* over the budget of .* "
                                      r"\(config.train.memory_budget_gb\)\. Set "
                                      r"--config.train.grad_accum=(\d+)") as error:
    train.train(state_lib.build(config), workdir)
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  assert not os.path.exists(metrics_file) or not open(metrics_file).read()
  assert not checkpoint.manager(workdir).all_steps()
  # The grad_accum it names does fit, compiled for real.
  accum = int(re.search(r"grad_accum=(\d+) \(", str(error.value)).group(1))
  assert accum > 1
  config.train.grad_accum = accum
  assert train.step_footprint(state_lib.build(config)).total <= budget
