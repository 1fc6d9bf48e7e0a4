"""MQAR at 8 key-value pairs against model width, Zoology's axis for recurrent models (fixed-
state models need width growing with the pairs): `--config=configs/sweeps/mqar_width.py:<model>`.

  python main.py --mode=sweep --config=configs/sweeps/mqar_width.py:titans \
      --workdir=runs/mqar_width/titans

Each point doubles or quadruples configs/mqar.py's width 64 with every size that scales with it
(the feed-forward, memory and CMS hidden widths; 2 heads, so each head's memory widens too).
The width-64 point is configs/sweeps/mqar.py's at 8 pairs (the same config and seed).
"""

from experiments import sweep
from configs import mqar
from nested import fields

# The fields of configs/mqar.py's per-model sizes that scale with the width.
WIDE = ("d_ff", "mem_hidden", "gen_hidden", "cms_hidden")
FACTORS = (2, 4)


def _scaled(name: str, value, factor: int):
  if isinstance(value, str):  # a per-level list, "48,48,32"
    widths = fields.ints(value, field=f"config.model.{name}", example="48,48,32")
    return ",".join(str(v * factor) for v in widths)
  return value * factor


def _point(model: str, factor: int) -> dict:
  own = {f"model.{k}": _scaled(k, v, factor) for k, v in mqar.OWN[model].items() if k in WIDE}
  return {"model.d_model": mqar.WIDTH["d_model"] * factor, **own}


def get_config(model: str = "titans"):
  if model not in mqar.OWN:
    raise ValueError(f"Unknown model {model!r} for configs/sweeps/mqar_width.py; choose one of "
                     f"{mqar.MODELS}, e.g. configs/sweeps/mqar_width.py:titans")
  return sweep.define(
      base=f"configs/mqar.py:{model}",
      points=[_point(model, f) for f in FACTORS],
      seeds=[0],
      fixed={"data.mqar.num_pairs": 8},
      metric="eval.json:accuracy")
