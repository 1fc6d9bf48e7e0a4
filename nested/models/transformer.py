"""Transformer++ (Llama-style): RMSNorm, RoPE, SwiGLU, no biases, optional tied embeddings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nested import layers


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  rope_theta: float = 10_000.0
  tie_embeddings: bool = False
  dtype: str = "float32"  # compute dtype; parameters are always float32


class Block(nnx.Module):
  """Pre-norm residual block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    out_stddev = layers.residual_stddev(cfg.n_layers)
    self.attn_norm = layers.RMSNorm(cfg.d_model)
    self.attn = layers.CausalSelfAttention(
        cfg.d_model, cfg.n_heads, out_stddev=out_stddev, rope_theta=cfg.rope_theta,
        dtype=dtype, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model)
    self.mlp = layers.SwiGLU(cfg.d_model, cfg.d_ff, out_stddev=out_stddev, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """Maps int tokens [..., T] to float32 logits [..., T, vocab_size]."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = layers.token_embedding(cfg, rngs=rngs)
    self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    layers.add_readout(self, cfg, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    positions = jnp.arange(tokens.shape[-1])
    # The lookup would inherit the table's split of d over fsdp: pin the batch instead.
    x = layers.place(self.embed(tokens))
    for block in self.layers:
      x = block(x, positions)
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.unembed(x)
    return logits.astype(jnp.float32)
