"""The fair mini protocol's second half: each model at its best learning rate of
configs/sweeps/mini_lr.py (seed 0, README "A fair mini protocol"), trained at seeds 0-2;
`--config=configs/sweeps/mini_seeds.py:<model>`.

  for m in transformer titans hope hope_attention; do
    python main.py --mode=sweep --config=configs/sweeps/mini_seeds.py:$m \
        --workdir=runs/mini_seeds/$m
  done
  python main.py --mode=tables --config=configs/tables.py:mini_tuned --workdir=runs/mini_seeds

A point is named as in the learning-rate sweep (`train.lr=0.004,seed=0`), so the seed-0 run
can be copied from runs/mini_lr/<model> instead of retrained; the sweep checks that its
recorded config is this point's.
"""

from experiments import sweep

# The lowest validation perplexity of each model's learning-rate sweep (seed 0, 200 steps):
# Transformer++ 8.1151 at 4e-3 (8.1157 at 8e-3), Titans 7.5529 at 8e-3 (16e-3 diverged),
# HOPE-Attention 8.0914 at 4e-3, HOPE 7.8013 at 16e-3 (7.9762 at 32e-3).
BEST_LR = {"transformer": 4e-3, "titans": 8e-3, "hope": 16e-3, "hope_attention": 4e-3}


def get_config(model: str = "transformer"):
  if model not in BEST_LR:
    raise ValueError(f"mini_seeds.py:{model}: choose one of {sorted(BEST_LR)}.")
  return sweep.define(
      base=f"configs/{model}.py:tiny",
      grid={"train.lr": [BEST_LR[model]]},
      seeds=[0, 1, 2],
      fixed={"train.steps": 200},
      metric="eval.json:perplexity")
