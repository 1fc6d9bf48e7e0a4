"""Which runs `--mode=tables` puts beside the paper's Table 1: `--config=configs/tables.py:<name>`.

mini  the CPU mini protocol (README): Transformer++, Titans, HOPE, HOPE-Attention `tiny`, equal parameters
      and training tokens on the bundled corpus, seeds 0-2, compared with the 760M rows.
mini_tuned  the same, each model at its own best learning rate: the points of
      configs/sweeps/mini_seeds.py:<model>, read from runs/mini_seeds/<model>.
760m  the full-scale rows, from runs of configs/<model>.py:760m in runs/<model>_760m.
1p3b  likewise for 1.3B.
ablation  the arXiv version's ablation table (Table 6) beside the points of
      configs/sweeps/hope_ablation.py, read from the sweep's workdir (`--workdir=runs/ablation`).
ablation_tuned  the same at HOPE's tuned rate: configs/sweeps/hope_ablation.py:tuned.
ablation_stable  the same at the tuned rate and μ = 0.5: configs/sweeps/hope_ablation.py:stable.
"""

import ml_collections

from experiments import sweep

MODELS = (("Transformer++", "transformer"), ("Titans (LMM)", "titans"), ("HOPE", "hope"),
          ("HOPE-Attention", "hope_attention"))
SEEDS = (0, 1, 2)
MINI_SEEDS = "configs/sweeps/mini_seeds.py"
ABLATIONS = {"ablation": "configs/sweeps/hope_ablation.py",
             "ablation_tuned": "configs/sweeps/hope_ablation.py:tuned",
             "ablation_stable": "configs/sweeps/hope_ablation.py:stable"}


def get_config(name: str = "mini") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.evaluate = True  # run the zero-shot tasks on runs that have not been evaluated yet
  if name in ABLATIONS:
    c.sweep = ABLATIONS[name]
  elif name == "mini":
    c.size = "760M"
    c.runs = [(label, f"configs/{model}.py:tiny", f"runs/mini/{model}_seed{seed}")
              for label, model in MODELS for seed in SEEDS]
  elif name == "mini_tuned":
    c.size = "760M"
    c.runs = [(label, f"configs/{model}.py:tiny", f"runs/mini_seeds/{model}/{point.name}")
              for label, model in MODELS
              for point in sweep.expand(sweep.load_config(f"{MINI_SEEDS}:{model}"))]
  elif name in ("760m", "1p3b"):
    c.size = {"760m": "760M", "1p3b": "1.3B"}[name]
    c.runs = [(label, f"configs/{model}.py:{name}", f"runs/{model}_{name}")
              for label, model in MODELS]
  else:
    raise ValueError(f"Unknown tables config {name!r}; choose mini, mini_tuned, 760m, 1p3b, "
                     f"ablation, ablation_tuned or ablation_stable.")
  return c
