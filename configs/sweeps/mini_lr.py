"""The fair mini protocol's tuning budget: every model gets the same learning-rate sweep on the
mini protocol (`tiny`, 200 steps × 16 × 128 tokens, seed 0), one model per sweep:
`--config=configs/sweeps/mini_lr.py:<model>`.

  for m in transformer titans hope hope_attention; do
    python main.py --mode=sweep --config=configs/sweeps/mini_lr.py:$m --workdir=runs/mini_lr/$m
  done

Then each model runs seeds 0-2 at its best rate (README, "A fair mini protocol"). The grid
brackets the `tiny` presets' rate (2e-3, chosen for Transformer++) by factors of 2; 8e-3 was
added when every model was best at 4e-3, 16e-3 when Titans and HOPE were best at 8e-3, and
32e-3 when HOPE was best at 16e-3.
"""

from experiments import sweep

LEARNING_RATES = (1e-3, 2e-3, 4e-3, 8e-3, 16e-3, 32e-3)


def get_config(model: str = "transformer"):
  return sweep.define(
      base=f"configs/{model}.py:tiny",
      grid={"train.lr": list(LEARNING_RATES)},
      seeds=[0],
      fixed={"train.steps": 200},
      metric="eval.json:perplexity")
