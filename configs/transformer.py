"""Transformer++ presets: `--config=configs/transformer.py:<preset>`.

tiny   CPU, a few minutes on the bundled corpus (byte tokenizer).
small  ~125M parameters, one GPU, byte tokenizer on the bundled corpus or your own data.
760m   the paper's recipe (Titans / Gated DeltaNet): context 4096, 32K SentencePiece vocab,
1p3b   AdamW 4e-4 cosine, weight decay 0.1, 0.5M-token batches. Set --config.data.path and
       --config.data.spm_model (e.g. the Llama-2 tokenizer) to your FineWeb-Edu shards.
       Sized for 8 × 80 GB devices: the mesh and train.grad_accum are set so that each
       device's step fits (BENCHMARKS.md); on other hardware the train loop's fit check
       names the grad_accum that fits.
"""

import ml_collections

from configs import base

# model dims, then train overrides, per preset
PRESETS = {
    "tiny": (dict(vocab_size=256, d_model=128, n_layers=4, n_heads=4, d_ff=384),
             dict(steps=600, seq_len=128, batch_size=16, lr=2e-3, warmup_steps=50,
                  checkpoint_every=200)),
    "small": (dict(vocab_size=256, d_model=768, n_layers=12, n_heads=12, d_ff=3584),
              dict(steps=20_000, seq_len=1024, batch_size=64, lr=6e-4, warmup_steps=1000,
                   checkpoint_every=1000, grad_accum=4)),   # 43.8 GB of one device (XLA)
    "760m": (dict(vocab_size=32_000, d_model=1536, n_layers=24, n_heads=16, d_ff=4096),
             dict(steps=57_220, seq_len=4096, batch_size=128, lr=4e-4, warmup_steps=2000,
                  checkpoint_every=1000, grad_accum=16)),   # 66.5 GB per device of 8 (XLA)
    "1p3b": (dict(vocab_size=32_000, d_model=2048, n_layers=24, n_heads=16, d_ff=5504),
             dict(steps=190_735, seq_len=4096, batch_size=128, lr=4e-4, warmup_steps=2000,
                  checkpoint_every=1000, grad_accum=32)),   # 41.2 GB per device of 8 (XLA)
}
PAPER_PRESETS = ("760m", "1p3b")
# Meshes the paper presets are sized for, 8 × 80 GB devices: parameters and optimizer state
# sharded over all of them (ZeRO-3); 1.3B also splits heads and MLP units over pairs, since
# one 4096-token sequence per device does not fit (75.1 GB at grad_accum 16 without it).
PAPER_MESH = {"760m": dict(data=1, fsdp=-1, tensor=1), "1p3b": dict(data=1, fsdp=-1, tensor=2)}
# Variants of `tiny` that exercise the nested learner.
VARIANTS = ("slow_mlp", "slow_mlp_frozen")


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
  if preset in VARIANTS:
    return slow_mlp(frozen=preset == "slow_mlp_frozen")
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/transformer.py; choose one of "
                     f"{sorted(PRESETS) + list(VARIANTS)}, e.g. configs/transformer.py:tiny")
  model, train = PRESETS[preset]
  c = base.get_base_config()
  c.model = ml_collections.ConfigDict(dict(name="transformer", rope_theta=10_000.0,
                                           tie_embeddings=False, dtype="float32", **model))
  c.train.update(train)
  if preset in PAPER_PRESETS:
    c.model.dtype = "bfloat16"
    c.data.tokenizer = "sentencepiece"
    c.eval.max_batches = 200
    c.mesh.update(PAPER_MESH[preset])
  elif preset == "small":
    c.model.dtype = "bfloat16"
  return c


def slow_mlp(frozen: bool = False) -> ml_collections.ConfigDict:
  """`tiny` with two levels: the MLP weights form a `slow` level that updates once every
  4 steps (on the gradients summed over those steps; `slow_mlp_frozen`: on the gradient of
  the step it updates on alone, frozen in between); everything else updates every step."""
  c = get_config("tiny")
  tokens_per_step = c.train.batch_size * c.train.seq_len
  c.levels = ml_collections.ConfigDict()
  c.levels.slow = base.level("/mlp/", period=4 * tokens_per_step, optimizer=base.adamw(),
                             accumulate="none" if frozen else "sum")
  c.levels.outer = base.level(".*", period=0, optimizer=base.adamw())
  return c
