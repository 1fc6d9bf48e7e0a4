"""Building blocks shared by every model: RMSNorm, RoPE, causal attention, SwiGLU, and
`place`, the one hook through which a model meets the mesh's placement rules.

Parameters are stored in float32; `dtype` is the compute dtype (bfloat16 on
accelerators). Kernels are [in, out]: `y = x @ W`. None of the layers has a bias.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from flax import nnx


# The placement rules of the function being traced (experiments/mesh.py), or None.
_placement: contextvars.ContextVar[Callable[[Any], Any] | None] = contextvars.ContextVar(
    "nested_placement", default=None)


@contextlib.contextmanager
def placement(rules: Callable[[Any], Any]) -> Iterator[None]:
  """Within, `place(tree)` is `rules(tree)`.

  Enter it inside the function that is jitted, never around the call: a jit cache entry
  traced without it must not be reused with it, and vice versa.
  """
  token = _placement.set(rules)
  try:
    yield
  finally:
    _placement.reset(token)


def place(tree: Any) -> Any:
  """Hands `tree` — activations or in-context state, batch axis first — to the placement
  rules of the enclosing `placement` (sharding constraints under a mesh); the identity
  outside one, so a model traced without a mesh is unchanged."""
  rules = _placement.get()
  return tree if rules is None else rules(tree)


def dense_init(stddev: float) -> nnx.Initializer:
  return nnx.initializers.normal(stddev=stddev)


def linear(d_in: int, d_out: int, *, stddev: float, dtype, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(
      d_in, d_out, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=dense_init(stddev), rngs=rngs)


def rms_norm(scale: jax.Array, x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """`x / rms(x) * scale` over the last axis, computed in float32, returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * scale).astype(
      x.dtype)


class RMSNorm(nnx.Module):
  """`rms_norm` with a learned scale."""

  def __init__(self, dim: int, *, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(self.scale[...], x, self.eps)


def rope(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), rotate-half convention.

  x: [..., T, H, D] with D even; positions: [T] or broadcastable to x[..., :, 0, 0].
  """
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., :, None, None] * freqs  # [..., T, 1, half]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal softmax attention with RoPE on queries and keys."""

  def __init__(self, d_model: int, n_heads: int, *, out_stddev: float, rope_theta: float,
               dtype, rngs: nnx.Rngs):
    if d_model % n_heads:
      raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    self.n_heads, self.head_dim, self.rope_theta = n_heads, d_model // n_heads, rope_theta
    self.wq = linear(d_model, d_model, stddev=0.02, dtype=dtype, rngs=rngs)
    self.wk = linear(d_model, d_model, stddev=0.02, dtype=dtype, rngs=rngs)
    self.wv = linear(d_model, d_model, stddev=0.02, dtype=dtype, rngs=rngs)
    self.wo = linear(d_model, d_model, stddev=out_stddev, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    *batch, length, _ = x.shape
    heads = lambda t: t.reshape(*batch, length, self.n_heads, self.head_dim)
    q = rope(heads(self.wq(x)), positions, theta=self.rope_theta)
    k = rope(heads(self.wk(x)), positions, theta=self.rope_theta)
    v = heads(self.wv(x))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.wo(out.reshape(*batch, length, self.n_heads * self.head_dim))


def ring_cache(batch: int, cache_len: int, n_heads: int, head_dim: int) -> dict:
  """An empty KV cache of the last `cache_len` tokens: keys, values [B, L, H, D] and the
  position each slot holds (-1: empty)."""
  shape = (batch, cache_len, n_heads, head_dim)
  return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32),
          "slot_position": jnp.full((cache_len,), -1, jnp.int32)}


def ring_attention(p: dict, cache: dict, x: jax.Array, positions: jax.Array, *, n_heads: int,
                   rope_theta: float) -> tuple[jax.Array, dict]:
  """Causal softmax attention (RoPE) of a segment x [B, T, d] at `positions` [T] over a
  ring-buffer KV cache of the last L tokens, given the weights of `CausalSelfAttention`
  (`wq/kernel`, ...); returns (output, cache with the segment written).

  The segment is written at slot positions[0] % L and must not wrap around the ring (chunks
  of a length dividing L, or one segment from position 0 with T <= L). With L >= the tokens
  seen this is exact causal attention; beyond, a sliding window of L (RoPE scores depend on
  relative positions only).
  """
  b, t, d = x.shape
  heads = lambda a: a.reshape(b, t, n_heads, d // n_heads)
  q = rope(heads(kernel_matmul(p["wq"], x)), positions, theta=rope_theta)
  k = rope(heads(kernel_matmul(p["wk"], x)), positions, theta=rope_theta)
  v = heads(kernel_matmul(p["wv"], x))
  cache_len = cache["k"].shape[1]
  start = positions[0] % cache_len
  keys = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(jnp.float32), start, 1)
  values = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(jnp.float32), start, 1)
  slot_pos = jax.lax.dynamic_update_slice_in_dim(cache["slot_position"], positions, start, 0)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), keys) / math.sqrt(q.shape[-1])
  visible = ((slot_pos[None, :] >= 0) & (slot_pos[None, :] <= positions[:, None])
             & (slot_pos[None, :] > positions[:, None] - cache_len))
  probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, values).reshape(b, t, d).astype(x.dtype)
  return kernel_matmul(p["wo"], out), {"k": keys, "v": values, "slot_position": slot_pos}


class SwiGLU(nnx.Module):
  """`W_down (silu(x W_gate) * x W_up)` (Shazeer 2020)."""

  def __init__(self, d_model: int, d_ff: int, *, out_stddev: float, dtype, rngs: nnx.Rngs):
    self.w_gate = linear(d_model, d_ff, stddev=0.02, dtype=dtype, rngs=rngs)
    self.w_up = linear(d_model, d_ff, stddev=0.02, dtype=dtype, rngs=rngs)
    self.w_down = linear(d_ff, d_model, stddev=out_stddev, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w_down(jax.nn.silu(self.w_gate(x)) * self.w_up(x))


def token_embedding(cfg, *, rngs: nnx.Rngs) -> nnx.Embed:
  """The input embedding table every model here starts with."""
  return nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                   param_dtype=jnp.float32, embedding_init=dense_init(0.02), rngs=rngs)


def add_readout(model: nnx.Module, cfg, *, rngs: nnx.Rngs) -> None:
  """Gives `model` its `final_norm` and, unless `cfg.tie_embeddings`, its `unembed`."""
  model.final_norm = RMSNorm(cfg.d_model)
  if not cfg.tie_embeddings:
    model.unembed = linear(cfg.d_model, cfg.vocab_size, stddev=0.02, dtype=jnp.dtype(cfg.dtype),
                           rngs=rngs)


def embed(cfg, params: dict, tokens: jax.Array) -> jax.Array:
  """Token embeddings [B, T, D] in the compute dtype, from the pure-dict params.

  Under a mesh the lookup would inherit the table's split of D over fsdp and reshard every
  activation after it; `place` keeps them split over the batch instead.
  """
  table = params["embed"]["embedding"]
  return place(jnp.take(table, tokens, axis=0).astype(jnp.dtype(cfg.dtype)))


def readout(cfg, params: dict, h: jax.Array) -> jax.Array:
  """Float32 logits of the last hidden states: final RMSNorm, then the (tied) unembedding."""
  h = rms_norm(params["final_norm"]["scale"], h)
  table = params["embed"]["embedding"] if cfg.tie_embeddings else params["unembed"]["kernel"].T
  return (h @ table.T.astype(h.dtype)).astype(jnp.float32)


def residual_stddev(n_layers: int) -> float:
  """GPT-2's scaled init for projections that write into the residual stream."""
  return 0.02 / math.sqrt(2 * n_layers)


def causal_depthwise_conv(x: jax.Array, kernel: jax.Array,
                          history: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Causal depthwise 1-D convolution over time, streamable.

  y_t = Σ_{j<W} kernel[j] ⊙ x_{t−W+1+j}, with x_s for s < 0 taken from `history`.

  Args:
    x: [B, T, D]; kernel: [W, D]; history: [B, W−1, D], the inputs before x (zeros at the
      start of a sequence).

  Returns:
    (y [B, T, D], the new history: the last W−1 inputs).
  """
  width = kernel.shape[0]
  padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)
  length = x.shape[1]
  y = sum(padded[:, j:j + length] * kernel[j].astype(x.dtype) for j in range(width))
  return y, padded[:, padded.shape[1] - (width - 1):]


def split_heads(x: jax.Array, n_heads: int) -> jax.Array:
  """[B, T, D] → [B, H, T, D/H]."""
  b, t, d = x.shape
  return x.reshape(b, t, n_heads, d // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x: jax.Array) -> jax.Array:
  """[B, H, T, D/H] → [B, T, D]."""
  b, h, t, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


def conv_kernel(width: int, dim: int) -> nnx.Param:
  """A causal depthwise conv kernel [width, dim] that starts as the identity (last tap 1):
  it learns how much local context to mix in."""
  return nnx.Param(jnp.zeros((width, dim), jnp.float32).at[-1].set(1.0))


def kernel_matmul(p: dict, x: jax.Array) -> jax.Array:
  """x @ W for the pure-dict params of an `nnx.Linear` ({"kernel": [in, out]}), in x's dtype."""
  return x @ p["kernel"].astype(x.dtype)


class MemoryInit(nnx.Module):
  """The learned initial state of an MLP memory (nested/memory.py) of width `dim` and hidden
  width `hidden`: W_in [*lead, dim, hidden], W_out [*lead, hidden, dim] (lead = (heads,)
  for one memory per head, () for one full-width memory)."""

  def __init__(self, lead: tuple, dim: int, hidden: int, *, out_stddev: float = 0.02,
               rngs: nnx.Rngs):
    normal = lambda shape, std: nnx.Param(std * jax.random.normal(rngs.params(), shape,
                                                                   jnp.float32))
    self.w_in = normal((*lead, dim, hidden), 1.0 / math.sqrt(dim))
    self.w_out = normal((*lead, hidden, dim), out_stddev)
