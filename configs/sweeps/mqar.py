"""MQAR answer accuracy against the number of key-value pairs (Zoology's first axis), one
model per sweep: `--config=configs/sweeps/mqar.py:<model>`.

  for m in transformer titans hope hope_attention; do
    python main.py --mode=sweep --config=configs/sweeps/mqar.py:$m --workdir=runs/mqar/$m
  done
  python -m experiments.mqar_report runs/mqar      # the table and plot of all four
"""

from experiments import sweep


def get_config(model: str = "transformer"):
  return sweep.define(
      base=f"configs/mqar.py:{model}",
      grid={"data.mqar.num_pairs": [4, 8, 16]},
      seeds=[0],
      metric="eval.json:accuracy")
