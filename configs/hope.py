"""HOPE presets: `--config=configs/hope.py:<preset>` (the README's main example is `tiny`).

Same presets as configs/transformer.py — dimensions, context, batch, schedule and data —
with each block = self-modifying Titans + a 3-level Continuum Memory System (SPEC §2), sized
so each preset's parameter count is within ±10% of the Transformer++ preset of that name.
CMS levels 1–2 have periods within the context and learn in context; level 3's period
(4 optimizer steps of tokens) exceeds the context, so it is a training-time level of
`config.levels` (SPEC §1, §3) that updates once every 4 steps on the summed gradients.

The SPEC §3 switches (the paper's ablations), all under config.model:
  cms_objective   "teach" (next-token loss on the chunk) | "local_l2"
  write_gradient  True (BPTT through in-context writes) | False (stop-gradient writes)
  cms_second_order  False (the CMS inner gradient is data to the outer loss) | True (~3x)
  mem_momentum    0.0 (off) | e.g. 0.9: momentum of the memories' gradient term
  cms_momentum    0.0 (off) | e.g. 0.9: SGD momentum of the in-context CMS levels
  dgd             True | False (plain gradient step, no −η k kᵀ term)
  weight_decay    True | False (α_t = 1)
  adaptive_q      False (q = x W_q) | True (q from a self-modifying memory M_q)
  conv            "after" (conv of q, k, v after the projections, SPEC §2) | "before" (of x)
  cms_periods / cms_hidden  "16,64,8192" / "96,96,64": number of CMS levels and periods
  chunk_size, mem_chunk_size, gen_chunk_size: the model's scan step and the memories' chunks
  mem_hidden / gen_hidden: hidden width of M_mem (per head) / of each full-width generator
  cms_lr (0 = plain MLPs), eta_max (η_t = eta_max · sigmoid(·)), inner_clip (0 = off)
  memory_writes   True | False (memories and in-context CMS levels frozen: the memory-off control)
  remat           "chunk" | "dots" | "nested" | "none": what the backward pass keeps of the
                  chunk scan (memory.scan_chunks; a run may resume under another)
  scan_unroll     1 | k: chunk steps per compiled loop iteration, the same values (at tiny on
                  CPU: no faster with remat chunk, 4-5x the compile; BENCHMARKS.md)
"""

import ml_collections

from configs import base, transformer

# HOPE-only model fields per preset; dimensions come from the Transformer++ preset.
PRESETS = {
    # remat "chunk" (tiny: "dots", the paper presets: "nested", below). At tiny "dots" does
    # the FLOPs of "none" (18% fewer than "chunk") in the time of "chunk" on CPU, for 0.6 GB
    # against 0.4 GB; "none" is 4-27% slower (copies of saved residuals), 3x the memory.
    "tiny": dict(cms_hidden="96,96,64", mem_hidden=64, gen_hidden=64, chunk_size=16,
                 mem_chunk_size=16, gen_chunk_size=16, cms_fast_periods="16,64"),
    "small": dict(cms_hidden="1280,1280,1088", mem_hidden=128, gen_hidden=128, chunk_size=64,
                  mem_chunk_size=64, gen_chunk_size=32, cms_fast_periods="64,512"),
    "760m": dict(cms_hidden="1536,1536,1408", mem_hidden=192, gen_hidden=192, chunk_size=64,
                 mem_chunk_size=64, gen_chunk_size=32, cms_fast_periods="64,1024"),
    "1p3b": dict(cms_hidden="2048,1920,1920", mem_hidden=256, gen_hidden=256, chunk_size=64,
                 mem_chunk_size=64, gen_chunk_size=32, cms_fast_periods="64,1024"),
}
SLOW_LEVEL_STEPS = 4  # the slowest CMS level updates once every this many optimizer steps


def hope_config(preset: str, *, name: str, mixer_fields: dict) -> ml_collections.ConfigDict:
  """HOPE or HOPE-Attention at `preset`; shared with configs/hope_attention.py."""
  c = transformer.get_config(preset)
  dims = {k: c.model[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads")}
  fields = dict(mixer_fields)
  fast_periods = fields.pop("cms_fast_periods")
  slow_period = SLOW_LEVEL_STEPS * c.train.batch_size * c.train.seq_len
  c.model = ml_collections.ConfigDict(dict(
      name=name, cms_periods=f"{fast_periods},{slow_period}", context=c.train.seq_len,
      cms_objective="teach", cms_lr=1e-2, cms_momentum=0.0, write_gradient=True,
      cms_second_order=False, memory_writes=True, remat="chunk", scan_unroll=1,
      tie_embeddings=False,
      dtype=c.model.dtype,
      **dims, **fields))
  if preset == "tiny":
    c.model.remat = "dots"
  if preset == "small":   # 50.6 GB (HOPE) / 53.5 GB (HOPE-Attention) of one device, by XLA
    c.train.grad_accum = 8
  if preset in transformer.PAPER_PRESETS:
    # Keeps the chunk carries only every few chunks (30% fewer temporaries at small). Per
    # device of 8, by XLA: HOPE-Attention 56.3 GB at 760m (grad_accum 16, as Transformer++);
    # at 1.3B 70.8 GB with heads over pairs at 32, so heads over 4 devices and 64: 62.0 GB.
    c.model.remat = "nested"
  if preset == "1p3b":
    c.mesh.tensor = 4
    c.train.grad_accum = 64
  # The slowest CMS level (period > context): a training-time level, period in tokens.
  c.levels = ml_collections.ConfigDict()
  c.levels.cms_slow = base.level(r"/cms/2/", period=slow_period, optimizer=base.adamw())
  c.levels.outer = base.level(".*", period=0, optimizer=base.adamw())
  return c


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/hope.py; choose one of "
                     f"{sorted(PRESETS)}, e.g. configs/hope.py:tiny")
  fields = dict(PRESETS[preset], dgd=True, weight_decay=True, adaptive_q=False, mem_momentum=0.0,
                eta_max=1.0, eta_init=0.018, inner_clip=1.0, conv="after", conv_width=4,
                rope_theta=10_000.0)
  return hope_config(preset, name="hope", mixer_fields=fields)
