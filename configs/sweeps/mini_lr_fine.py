"""The fair mini protocol's learning-rate sweep refined: each model at its best rate of
configs/sweeps/mini_lr.py times 2^(-1/2) and 2^(1/2), the points between that grid's factors of
2 on either side of it: `--config=configs/sweeps/mini_lr_fine.py:<model>`.

  for m in transformer titans hope hope_attention; do
    python main.py --mode=sweep --config=configs/sweeps/mini_lr_fine.py:$m \\
        --workdir=runs/mini_lr_fine/$m
  done
  python -m experiments.sweep_compare runs/mini_lr runs/mini_lr_fine --out=runs/mini_lr_fine.png

Same budget for every model (two points, seed 0), so the comparison stays fair.
"""

import math

from configs.sweeps import mini_seeds
from experiments import sweep


def get_config(model: str = "transformer"):
  best = mini_seeds.BEST_LR[model]
  return sweep.define(
      base=f"configs/{model}.py:tiny",
      grid={"train.lr": [round(best / math.sqrt(2), 6), round(best * math.sqrt(2), 6)]},
      seeds=[0],
      fixed={"train.steps": 200},
      metric="eval.json:perplexity")
