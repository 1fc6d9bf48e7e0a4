"""Transformer++ (Llama-style): RMSNorm, RoPE, SwiGLU, no biases, optional tied embeddings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nested import cms, layers


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

  def init_state(self, batch: int, cache_len: int) -> dict:
    """The decoding state: an empty KV cache of the last `cache_len` tokens per layer."""
    return init_state(self.cfg, batch, cache_len)

  def stream(self, tokens: jax.Array, state: dict,
             lookahead: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Logits of a segment [B, T] attending to the cached tokens before it, and the state
    with the segment cached (the models' common streaming interface; `lookahead` unused).
    One segment from a fresh state (T <= cache_len), then segments of one token: a KV-cache
    decoder."""
    del lookahead
    return run(self.cfg, nnx.to_pure_dict(nnx.state(self, nnx.Param)), tokens, state)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    positions = jnp.arange(tokens.shape[-1])
    # The lookup would inherit the table's split of d over fsdp: pin the batch instead.
    x = layers.place(self.embed(tokens))
    for block in self.layers:
      x = block(x, positions)
    x = self.final_norm(x)
    logits = self.embed.attend(x) if self.cfg.tie_embeddings else self.unembed(x)
    return logits.astype(jnp.float32)


def init_state(cfg: TransformerConfig, batch: int, cache_len: int) -> dict:
  head_dim = cfg.d_model // cfg.n_heads
  return layers.place({"position": jnp.zeros((), jnp.int32),
                       "layers": [layers.ring_cache(batch, cache_len, cfg.n_heads, head_dim)
                                  for _ in range(cfg.n_layers)]})


def run(cfg: TransformerConfig, params: dict, tokens: jax.Array, state: dict):
  """`Transformer.__call__` on a segment after the cached ones: (logits, state after)."""
  positions = state["position"] + jnp.arange(tokens.shape[-1], dtype=jnp.int32)
  h = layers.embed(cfg, params, tokens)
  caches = []
  for i in range(cfg.n_layers):
    p = params["layers"][i]
    y, cache = layers.ring_attention(p["attn"], state["layers"][i],
                                     layers.rms_norm(p["attn_norm"]["scale"], h), positions,
                                     n_heads=cfg.n_heads, rope_theta=cfg.rope_theta)
    caches.append(cache)
    h = h + y
    h = h + cms.swiglu(p["mlp"], layers.rms_norm(p["mlp_norm"]["scale"], h))
  return layers.readout(cfg, params, h), {"position": positions[-1] + 1, "layers": caches}
