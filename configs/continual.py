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

`<variant>,tuned` (e.g. configs/continual.py:hope,tuned) is the longer protocol: each model at
its best rate of the fair mini protocol (configs/sweeps/mini_seeds.py; the HOPE variants at
HOPE's), 300 steps on the comedies and 150 on the tragedies, evaluated every 50 steps.
`<variant>,reference` is the same with the Python language reference as the second corpus
(REFERENCE, written by `python -m experiments.corpora python_reference
runs/corpora/python_reference`; run from the repository root): a corpus that shares little
with the plays, where the two genres share nearly everything at this scale.
"""

import ml_collections

from configs import hope, transformer
from configs.sweeps import mini_seeds
from nested import fields

VARIANTS = ("transformer", "hope", "hope_cms_lr0", "hope_slow")
PROTOCOLS = ("", "tuned", "reference")
REFERENCE = "runs/corpora/python_reference"


def get_config(arg: str = "hope") -> ml_collections.ConfigDict:
  variant, _, protocol = arg.partition(",")
  if variant not in VARIANTS or protocol not in PROTOCOLS:
    raise ValueError(f"Unknown variant {arg!r} for configs/continual.py; choose one of "
                     f"{VARIANTS}, optionally followed by ',tuned' or ',reference', e.g. "
                     f"configs/continual.py:hope or configs/continual.py:hope,tuned")
  c = (transformer if variant == "transformer" else hope).get_config("tiny")
  if variant == "hope_cms_lr0":
    c.model.cms_lr = 0.0
  if variant == "hope_slow":
    slow = 4 * c.levels.cms_slow.period
    periods = fields.ints(c.model.cms_periods, field="config.model.cms_periods",
                          example="16,64,2048")
    c.model.cms_periods = ",".join(str(p) for p in periods[:-1] + (slow,))
    c.levels.cms_slow.period = slow
  c.train.update(dict(min_lr_ratio=1.0, warmup_steps=20, log_every=25))
  c.eval.update(dict(max_batches=8))
  c.continual.update(dict(phases="comedies,tragedies", steps="100,100", eval_every=25,
                          label=variant))
  if protocol in ("tuned", "reference"):
    c.train.lr = mini_seeds.BEST_LR[c.model.name]
    c.continual.update(dict(steps="300,150", eval_every=50))
  if protocol == "reference":
    c.continual.phases = f"comedies,{REFERENCE}"
  return c
