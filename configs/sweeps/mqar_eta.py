"""MQAR at 8 key-value pairs against HOPE's initial write strength: `model.eta_init` is η_t at
initialisation (η_t = eta_max · sigmoid(M_η(x̄) + bias), eta_max 1; 0.018 in configs/hope.py). In
a linear memory with unit-norm keys a delta-rule write of strength η stores a pair in one sight
only as η approaches 1; HOPE's memories are residual MLPs (the share of the error one write
removes is not η itself), but at 0.018 their writes start weak, and must be learnt stronger.

  python main.py --mode=sweep --config=configs/sweeps/mqar_eta.py --workdir=runs/mqar_eta

The 0.018 point is configs/sweeps/mqar.py's hope point at 8 pairs (the same config and seed).
"""

from experiments import sweep


def get_config():
  return sweep.define(
      base="configs/mqar.py:hope",
      grid={"model.eta_init": [0.2, 0.5]},
      seeds=[0],
      fixed={"data.mqar.num_pairs": 8},
      metric="eval.json:accuracy")
