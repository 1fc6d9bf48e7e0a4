"""MQAR at 8 key-value pairs against Titans' inner step size: `model.theta_scale` bounds
θ_t = theta_scale · softplus(·), the step each token's write takes (0.02 in configs/titans.py,
where larger steps made language modelling unstable). A memory that must store a pair in one
sight may need a larger one.

  python main.py --mode=sweep --config=configs/sweeps/mqar_theta.py --workdir=runs/mqar_theta

The 0.02 point is configs/sweeps/mqar.py's titans point at 8 pairs (the same config and seed).
"""

from experiments import sweep


def get_config():
  return sweep.define(
      base="configs/mqar.py:titans",
      grid={"model.theta_scale": [0.1, 0.5]},
      seeds=[0],
      fixed={"data.mqar.num_pairs": 8},
      metric="eval.json:accuracy")
