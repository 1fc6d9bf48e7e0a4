"""MQAR at 8 key-value pairs against the learning rate, for the models that did not learn the
task at the shared 1e-3 (configs/sweeps/mqar.py): `--config=configs/sweeps/mqar_lr.py:<model>`.

  python main.py --mode=sweep --config=configs/sweeps/mqar_lr.py:titans \
      --workdir=runs/mqar_lr/titans
  python -m experiments.sweep_compare runs/mqar_lr --out=runs/mqar_lr/mqar_lr.png

The 1e-3 point is configs/sweeps/mqar.py's (the same config and seed).
"""

from experiments import sweep


def get_config(model: str = "titans"):
  return sweep.define(
      base=f"configs/mqar.py:{model}",
      grid={"train.lr": [3e-3, 1e-2]},
      seeds=[0],
      fixed={"data.mqar.num_pairs": 8},
      metric="eval.json:accuracy")
