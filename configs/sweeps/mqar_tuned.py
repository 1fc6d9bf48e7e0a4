"""MQAR answer accuracy against the number of key-value pairs, each model at its own best
learning rate on MQAR (configs/sweeps/mqar_lr.py at 8 pairs):
`--config=configs/sweeps/mqar_tuned.py:<model>`.

  python main.py --mode=sweep --config=configs/sweeps/mqar_tuned.py:hope \
      --workdir=runs/mqar_tuned/hope

configs/sweeps/mqar.py runs every model at 1e-3, Transformer++'s best of 1e-3, 3e-3 and 1e-2.
Every model's best of those three at 8 pairs (README, "Every model at three learning rates"):
1e-3 but for HOPE, 3e-3. A model whose best is 1e-3 gets that sweep's points again here (the
same configs and seed).
"""

from experiments import sweep

BEST_LR = {"transformer": 1e-3, "titans": 1e-3, "hope": 3e-3, "hope_attention": 1e-3}


def get_config(model: str = "hope"):
  if model not in BEST_LR:
    raise ValueError(f"Unknown model {model!r} for configs/sweeps/mqar_tuned.py; choose one of "
                     f"{sorted(BEST_LR)}, e.g. configs/sweeps/mqar_tuned.py:hope")
  return sweep.define(
      base=f"configs/mqar.py:{model}",
      grid={"data.mqar.num_pairs": [4, 8, 16]},
      seeds=[0],
      fixed={"train.lr": BEST_LR[model]},
      metric="eval.json:accuracy")
