"""experiments/sweep_compare.py: several sweeps' results.csv on one table and plot."""

import numpy as np
import pytest

from experiments import sweep, sweep_compare


def write_sweep(root, name, points, key="perplexity"):
  """A results.csv as the sweep writes it: points are (lr, seed, value, diverged_at)."""
  (root / name).mkdir(parents=True)
  rows = [{"name": f"train.lr={lr},seed={seed}", "axes": {"train.lr": lr}, "seed": seed,
           "step": None if value is None else 200, "value": value, "diverged": diverged}
          for lr, seed, value, diverged in points]
  sweep.write_csv(str(root / name / "results.csv"), rows, ["train.lr"], key)


def test_sweeps_of_one_field_share_a_table_and_a_plot(tmp_path):
  lr_root, seeds_root = tmp_path / "lr", tmp_path / "seeds"
  write_sweep(lr_root, "transformer", [(1e-3, 0, 9.5, None), (4e-3, 0, 8.25, None)])
  write_sweep(lr_root, "titans", [(1e-3, 0, 0.0625, None), (4e-3, 0, None, 59)])
  seeds = [8.25, 7.5, 7.75]
  write_sweep(seeds_root, "transformer", [(4e-3, s, v, None) for s, v in enumerate(seeds)])

  every = [sweep_compare.read_series(str(r)) for r in (lr_root, seeds_root)]
  assert list(every[0]) == ["transformer", "titans"]  # the models' order, not the alphabet
  axis = sweep_compare.shared_axis([s for series in every for s in series.values()])
  assert axis == "train.lr"
  summed = sweep_compare.summaries(every, axis)
  table = sweep_compare.markdown([str(lr_root), str(seeds_root)], summed)
  lines = table.splitlines()
  assert lines[0] == "| series | 0.001 | 0.004 |"
  assert lines[2] == "| Transformer++ (lr) | 9.50 | 8.25 |"
  assert lines[3] == "| Titans (lr) | 0.062 | diverged (step 59) |"  # accuracies: 3 digits
  mean, sd = np.mean(seeds), np.std(seeds, ddof=1)
  assert lines[4] == f"| Transformer++ (seeds) |  | {mean:.2f} ± {sd:.2f} (3 seeds) |"

  out = tmp_path / "compare.png"
  sweep_compare.plot([str(lr_root), str(seeds_root)], summed, "perplexity", axis, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweeps_without_a_shared_numeric_field_are_refused(tmp_path):
  write_sweep(tmp_path / "a", "hope", [(1e-3, 0, 9.0, None)])
  series = sweep_compare.read_series(str(tmp_path / "a"))["hope"]
  other = {**series, "axes": ["model.cms_periods"]}
  with pytest.raises(sweep_compare.UserError, match="share no numeric swept field"):
    sweep_compare.shared_axis([series, other])
  with pytest.raises(sweep_compare.UserError, match=r"No sweep results under .*empty"):
    sweep_compare.read_series(str(tmp_path / "empty"))
