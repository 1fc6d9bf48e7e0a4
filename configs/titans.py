"""Titans (LMM) presets: `--config=configs/titans.py:<preset>`.

Same presets as configs/transformer.py — dimensions, context, batch, schedule and data —
with the attention replaced by the long-term memory (SPEC §2) and the SwiGLU width lowered
so each preset's parameter count is within ±10% of the Transformer++ preset of that name.
Memory switches: model.chunk_size, model.mem_hidden, model.theta_scale (bound of the step
size), model.inner_clip (0 = off), model.write_gradient (False = stop-gradient writes),
model.memory_writes (False = the memory never changes: the memory-off control),
model.remat ("chunk" | "dots" | "nested" | "none": what the backward pass keeps of the chunk scan).

theta_scale is 0.02: with momentum kept per token (β ≈ 0.88 at init) a gradient's total
step is θ/(1 − β) ≈ 8θ, and at 0.1 `tiny` trained unstably (validation perplexity 18.2 after
200 steps, against 8.99 at 0.02; seed 0, README's mini protocol).
"""

import ml_collections

from configs import transformer

# Titans-only model fields per preset; the rest comes from the Transformer++ preset.
PRESETS = {
    "tiny": dict(d_ff=296, mem_hidden=64, chunk_size=16),
    "small": dict(d_ff=3296, mem_hidden=128, chunk_size=64),
    "760m": dict(d_ff=3520, mem_hidden=192, chunk_size=64),
    "1p3b": dict(d_ff=4800, mem_hidden=256, chunk_size=64),
}


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/titans.py; choose one of "
                     f"{sorted(PRESETS)}, e.g. configs/titans.py:tiny")
  c = transformer.get_config(preset)
  dims = {k: c.model[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads")}
  c.model = ml_collections.ConfigDict(dict(
      name="titans", theta_scale=0.02, inner_clip=1.0, write_gradient=True, memory_writes=True,
      remat="chunk", conv_width=4,
      tie_embeddings=False, dtype=c.model.dtype, **dims, **PRESETS[preset]))
  return c

