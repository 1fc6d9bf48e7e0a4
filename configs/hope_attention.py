"""HOPE-Attention presets: `--config=configs/hope_attention.py:<preset>`.

HOPE with causal softmax attention (RoPE) as the sequence mixer, followed by the same
3-level CMS as configs/hope.py (levels 1–2 learn in context, level 3 is a training-time
level). Sized within ±10% of the Transformer++ preset of the same name; the CMS switches
(cms_objective, write_gradient, cms_momentum, cms_periods, cms_hidden, cms_lr, memory_writes)
are those of configs/hope.py. The attention cache holds `model.context` tokens when streaming,
or `model.attention_window` tokens (sliding-window attention, also in training) when set.
"""

import ml_collections

from configs import hope

PRESETS = {
    "tiny": dict(cms_hidden="128,128,128", chunk_size=16, cms_fast_periods="16,64"),
    "small": dict(cms_hidden="1280,1152,1152", chunk_size=64, cms_fast_periods="64,512"),
    "760m": dict(cms_hidden="1408,1408,1280", chunk_size=64, cms_fast_periods="64,1024"),
    "1p3b": dict(cms_hidden="1920,1792,1792", chunk_size=64, cms_fast_periods="64,1024"),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/hope_attention.py; choose one of "
                     f"{sorted(PRESETS)}, e.g. configs/hope_attention.py:tiny")
  fields = dict(PRESETS[preset], mixer="attention", attention_window=0, rope_theta=10_000.0)
  return hope.hope_config(preset, name="hope_attention", mixer_fields=fields)
