"""The burn-rate measurement: per-step FLOPs series, components, and the mode's outputs."""

import json
import os

import numpy as np
import pytest

from conftest import micro_config
from experiments import burn_rate, mesh as mesh_lib, state as state_lib, train
from nested import levels


def slow_mlp_config(cache_dir, period_steps=4, accumulate="sum", **overrides):
  config = micro_config(cache_dir, preset="slow_mlp", **overrides)
  config.levels.slow.period = period_steps * config.train.batch_size * config.train.seq_len
  config.levels.slow.accumulate = accumulate
  return config


@pytest.mark.parametrize("accumulate", ["sum", "none"])
def test_flops_series_spikes_exactly_where_levels_fire(accumulate):
  components = {"forward": 10.0, "backward": {"all": 20.0, "frozen:slow": 14.0}, "clip": 1.0,
                "levels": {"outer": {"period": 1, "update": 5.0, "accumulate": 0.0},
                           "slow": {"period": 3, "update": 7.0, "accumulate": 2.0}}}
  level_list = [levels.Level("slow", "s", None, 3, accumulate),
                levels.Level("outer", ".*", None, 1)]
  series = burn_rate.flops_per_step(components, [levels.plan_step(level_list, s)
                                                 for s in range(9)])
  total = sum(series.values())
  # Steps 3, 6, 9 fire the slow level; with "none" the others skip 6 FLOPs of backward pass.
  other = 32.0 if accumulate == "none" else 38.0
  expected = np.array([other, other, 45.0] * 3)
  np.testing.assert_array_equal(total, expected)
  np.testing.assert_array_equal(series["update/slow"] > 0, [t % 3 == 0 for t in range(1, 10)])


def test_components_are_consistent_with_the_model_size(cache_dir):
  exp = state_lib.build(slow_mlp_config(cache_dir))
  params = state_lib.init_state(exp).params
  batch = mesh_lib.put_batch(train.host_batch(exp, 0), exp.mesh)
  c = burn_rate.step_components(exp, params, batch)
  tokens = exp.config.train.batch_size * exp.config.train.seq_len
  n = sum(level["params"] for level in c["levels"].values())
  assert list(c["backward"]) == ["all"]       # one variant: no level is ever frozen
  assert 1.5 < c["backward"]["all"] / c["forward"] < 3.5
  assert c["forward"] > 2 * (n - 256 * 32) * tokens * 0.9  # 2 FLOPs per weight per token
  slow = c["levels"]["slow"]
  assert slow["accumulate"] == slow["params"]  # one add per weight
  assert c["levels"]["outer"]["accumulate"] == 0  # period 1 accumulates nothing
  assert slow["update"] > 5 * slow["params"]  # AdamW: several FLOPs per weight


@pytest.fixture(scope="module")
def measured(cache_dir):
  return burn_rate.measure(slow_mlp_config(cache_dir, accumulate="none"), 8)


def test_measurement_follows_the_level_periods(measured):
  assert len(measured["seconds_per_step"]) == 8
  assert [f["slow"] for f in measured["fired"]] == [t % 4 == 0 for t in range(1, 9)]
  updates = np.asarray(measured["flops_per_step"]["update/slow"])
  assert (updates > 0).tolist() == [t % 4 == 0 for t in range(1, 9)]
  amortised = measured["amortised"]
  assert 0 < amortised["update_share"] < 1 - amortised["forward_backward_share"]
  assert amortised["peak_to_mean_flops"] > 1


def test_measurement_runs_and_counts_the_frozen_variant(measured):
  """The MLP level is frozen between its firings: those steps run the variant without its
  weight gradients, and the report counts that variant's backward pass."""
  assert measured["variant"] == ["frozen:slow"] * 3 + ["all"] + ["frozen:slow"] * 3 + ["all"]
  backward = measured["components"]["backward"]
  assert backward["frozen:slow"] < backward["all"]
  np.testing.assert_array_equal(measured["flops_per_step"]["backward"],
                                [backward[v] for v in measured["variant"]])
  assert measured["components"]["levels"]["slow"]["accumulate"] == 0   # no accumulator
  kinds = measured["by_kind"]
  assert {k: v["steps"] for k, v in kinds.items()} == {"fires -; frozen slow": 6,
                                                       "fires slow; frozen -": 2}
  assert kinds["fires -; frozen slow"]["flops_vs_heaviest"] < 0.9


def test_mode_writes_report_plot_and_json(cache_dir, tmp_path, monkeypatch, measured):
  config = slow_mlp_config(cache_dir)
  config.burn_rate.steps = 8
  config.burn_rate.baseline = "configs/transformer.py:tiny"
  calls = []
  monkeypatch.setattr(burn_rate.sweep, "load_config",
                      lambda spec: calls.append(spec) or micro_config(cache_dir))
  monkeypatch.setattr(burn_rate, "measure",
                      lambda c, steps: calls.append((c.model.d_model, steps)) or measured)
  burn_rate.run(config, str(tmp_path))
  assert calls == ["configs/transformer.py:tiny", (32, 8), (32, 8)]
  for name in ("burn_rate.json", "burn_rate.md", "burn_rate.png"):
    assert os.path.getsize(tmp_path / name) > 0
  assert set(json.load(open(tmp_path / "burn_rate.json"))) == {"this config", "baseline"}
  assert "| slow | 4 |" in open(tmp_path / "burn_rate.md").read()
