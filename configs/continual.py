"""Continual learning: the bundled comedies, then the tragedies (`--mode=continual`,
experiments/continual.py), for `get_config(variant)`:

  transformer      configs/transformer.py:tiny
  hope             configs/hope.py:tiny
  hope_cms_lr0     HOPE with model.cms_lr=0: the in-context CMS levels are plain MLPs
  hope_slow        HOPE whose slowest CMS level updates 4x less often (every 16 steps)

  for v in transformer hope hope_cms_lr0 hope_slow; do
    python main.py --mode=continual --config=configs/continual.py:$v --workdir=runs/cl/$v
  done
  python -m experiments.continual runs/cl

100 steps on each corpus at the tiny presets' batch (16 x 128 bytes), a constant learning
rate after warmup (the switch changes the data only), both corpora evaluated every 25 steps
on 8 validation batches of their held-out plays.
"""

import ml_collections

from configs import hope, transformer

VARIANTS = ("transformer", "hope", "hope_cms_lr0", "hope_slow")


def get_config(variant: str = "hope") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} for configs/continual.py; choose one of "
                     f"{VARIANTS}, e.g. configs/continual.py:hope")
  c = (transformer if variant == "transformer" else hope).get_config("tiny")
  if variant == "hope_cms_lr0":
    c.model.cms_lr = 0.0
  if variant == "hope_slow":
    slow = 4 * c.levels.cms_slow.period
    c.model.cms_periods = ",".join(c.model.cms_periods.split(",")[:-1] + [str(slow)])
    c.levels.cms_slow.period = slow
  c.train.update(dict(min_lr_ratio=1.0, warmup_steps=20, log_every=25))
  c.eval.update(dict(max_batches=8))
  c.continual.update(dict(phases="comedies,tragedies", steps="100,100", eval_every=25,
                          label=variant))
  return c
