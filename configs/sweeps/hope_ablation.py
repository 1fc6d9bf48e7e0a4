"""The paper's ablation table (arXiv 2512.24695, Table 6) at HOPE `tiny`: the full model, then
one mechanism removed per row, on the mini protocol's budget (200 steps × 16 × 128 tokens).

  python main.py --mode=sweep --config=configs/sweeps/hope_ablation.py --workdir=runs/ablation
  python main.py --mode=tables --config=configs/tables.py:ablation --workdir=runs/ablation

`hope_ablation.py:tuned` runs the same rows at HOPE's best rate of the fair mini protocol
(configs/sweeps/mini_seeds.py's BEST_LR, 16e-3) instead of the preset's 2e-3:

  python main.py --mode=sweep --config=configs/sweeps/hope_ablation.py:tuned \
      --workdir=runs/ablation_tuned
  python main.py --mode=tables --config=configs/tables.py:ablation_tuned \
      --workdir=runs/ablation_tuned

`hope_ablation.py:stable` runs them at 16e-3 with the memories' momentum at 0.5 instead of
0.9: of the momenta tried at that rate (configs/sweeps/hope_momentum.py) 0.5 is the largest
with which the full model trains, so each row removes one mechanism from a model that learns:

  python main.py --mode=sweep --config=configs/sweeps/hope_ablation.py:stable \
      --workdir=runs/ablation_stable
  python main.py --mode=tables --config=configs/tables.py:ablation_stable \
      --workdir=runs/ablation_stable

"Full" is the paper's HOPE: every switch on, so beyond configs/hope.py:tiny (whose defaults
follow SPEC §3) it has the memories' momentum (μ = 0.9) and q from a self-modifying memory.
The paper's rows "w/o inner projection of k / v" have no switch here: k and v always come
from their self-modifying memories, so those rows are not run.
"""

from configs.sweeps import mini_seeds
from experiments import sweep

# "w/o CMS": one MLP of the levels' total width (96 + 96 + 64), trained every step like a
# Transformer's: a single level whose period (2048 tokens) is one optimizer step.
ONE_STEP = 16 * 128
NO_CMS = {"model.cms_periods": str(ONE_STEP), "model.cms_hidden": "256",
          "levels.cms_slow.pattern": "/cms/0/", "levels.cms_slow.period": ONE_STEP}

# The paper's full HOPE: the memories' momentum and an adaptive q on top of the tiny preset.
FULL = {"model.mem_momentum": 0.9, "model.adaptive_q": True}
ROWS = (("HOPE (full)", {}),
        ("w/o DGD", {"model.dgd": False}),
        ("w/o momentum", {"model.mem_momentum": 0.0}),
        ("w/o weight decay", {"model.weight_decay": False}),
        ("w/o CMS", NO_CMS),
        ("w/o inner projection of q", {"model.adaptive_q": False}))


# The largest momentum tried with which the full model trains at the tuned rate
# (configs/sweeps/hope_momentum.py: 0.5 trains, 0.7 does not).
STABLE_MOMENTUM = 0.5
VARIANTS = ("", "tuned", "stable")


def get_config(variant: str = ""):
  if variant not in VARIANTS:
    raise ValueError(f"hope_ablation.py:{variant}: the variants are hope_ablation.py, "
                     f"hope_ablation.py:tuned and hope_ablation.py:stable.")
  tuned = {"train.lr": mini_seeds.BEST_LR["hope"]} if variant else {}
  full = {**FULL, "model.mem_momentum": STABLE_MOMENTUM} if variant == "stable" else FULL
  return sweep.define(
      base="configs/hope.py:tiny",
      points=[{"label": label, **full, **fields} for label, fields in ROWS],
      seeds=[0, 1, 2],
      fixed={"train.steps": 200, **tuned},
      metric="eval.json:perplexity")
