"""The paper's full HOPE (configs/sweeps/hope_ablation.py's first row: memory momentum and an
adaptive q) at HOPE's tuned rate, 16e-3, against the memories' momentum μ: at μ = 0.9 it
stays at the unigram level there, at μ = 0 it trains (README, the ablation table).

  python main.py --mode=sweep --config=configs/sweeps/hope_momentum.py --workdir=runs/hope_momentum
"""

from configs.sweeps import hope_ablation, mini_seeds
from experiments import sweep


def get_config():
  return sweep.define(
      base="configs/hope.py:tiny",
      grid={"model.mem_momentum": [0.5, 0.7]},
      seeds=[0],
      fixed={"model.adaptive_q": hope_ablation.FULL["model.adaptive_q"], "train.steps": 200,
             "train.lr": mini_seeds.BEST_LR["hope"]},
      metric="eval.json:perplexity")
