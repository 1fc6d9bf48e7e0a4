"""MQAR at 8 key-value pairs trained three times longer (6000 steps instead of 2000), for the
models that did not learn the task in configs/sweeps/mqar.py's budget:
`--config=configs/sweeps/mqar_steps.py:<model>`.

  python main.py --mode=sweep --config=configs/sweeps/mqar_steps.py:titans \
      --workdir=runs/mqar_steps/titans

Attention's learning of MQAR is a sudden transition (Transformer++ crossed it near step 1000
at 8 pairs): a model that has not crossed it may need more steps, not another architecture.
The learning-rate schedule stretches over the longer run. The 2000-step point is
configs/sweeps/mqar.py's at 8 pairs (the same config and seed).
"""

from experiments import sweep


def get_config(model: str = "titans"):
  return sweep.define(
      base=f"configs/mqar.py:{model}",
      grid={"train.steps": [6000]},
      seeds=[0],
      fixed={"data.mqar.num_pairs": 8},
      metric="eval.json:accuracy")
