"""experiments/mqar_report.py: the MQAR table and plot from the sweeps' run directories."""

import json
import os

import pytest

from experiments import mqar_report


def write_run(root, model, num_pairs, accuracy, seed=0, synthetic="mqar"):
  point = os.path.join(root, model, f"data.mqar.num_pairs={num_pairs},seed={seed}")
  os.makedirs(point)
  config = {"seed": seed, "model": {"name": model}, "train": {"seq_len": 64},
            "data": {"synthetic": synthetic, "mqar": {"num_pairs": num_pairs,
                                                       "vocab_size": 256}}}
  results = {"step": 2000, "loss": 0.1, "accuracy": accuracy[0],
             **{f"accuracy_{n}": a for n, a in zip((128, 256), accuracy[1:])}}
  for name, record in (("config.json", config), ("eval.json", results)):
    with open(os.path.join(point, name), "w") as f:
      json.dump(record, f)


def test_report_tables_every_run_by_length_in_model_order_and_plots(tmp_path):
  root = str(tmp_path)
  write_run(root, "hope", 8, (0.5, 0.4, 0.3))
  write_run(root, "transformer", 16, (0.9, 0.2, 0.1))
  write_run(root, "transformer", 8, (0.99, 0.6, 0.35))
  write_run(root, "transformer", 4, (0.3, 0.3, 0.3), synthetic="")   # not MQAR: left out
  mqar_report.main(["mqar_report", root])
  table = open(os.path.join(root, "mqar.md")).read().splitlines()
  assert "chance 0.0078" in table[0]
  assert table[2] == "| model | pairs | no recall | 64 (train) | 128 (2×) | 256 (4×) |"
  assert table[4:] == ["| Transformer++ | 8 | 0.125 | 0.990 | 0.600 | 0.350 |",
                       "| Transformer++ | 16 | 0.062 | 0.900 | 0.200 | 0.100 |",
                       "| HOPE | 8 | 0.125 | 0.500 | 0.400 | 0.300 |"]
  assert os.path.getsize(os.path.join(root, "mqar.png")) > 10_000


def test_report_without_runs_says_what_to_run(tmp_path):
  with pytest.raises(SystemExit, match="run the sweeps in configs/sweeps/mqar.py"):
    mqar_report.main(["mqar_report", str(tmp_path)])
