"""Continuum Memory System: a chain of MLP levels with different update periods (SPEC §2).

Level ℓ is a pre-norm residual SwiGLU block, `h ← h + MLP_ℓ(norm_ℓ(h))`, run in sequence
(the "sequential" CMS of HOPE). A level with period C^(ℓ) tokens, not larger than the
context, is updated in context: its weights θ^(ℓ) are fast state (one copy per sequence,
starting from the learned initial value), and its inner optimizer is a level in the sense
of SPEC §1 — `nested.levels.every(sgd(η^(ℓ)), C^(ℓ)/chunk)` — fired under a chunk-count
mask inside the model's scan over chunks: the gradients of the last C^(ℓ) tokens are summed
and applied when t ≡ 0 (mod C^(ℓ)). η^(ℓ) = 0 recovers a plain MLP. A level whose period
exceeds the context is ordinary parameters here; its config makes it a training-time level
of `config.levels` (period in tokens).

Inner objectives (SPEC §3): "teach" — the gradient of the next-token loss on the chunk
(computed by the model, which owns the logits); "local_l2" — a per-level regression of the
next token's level input, f = Σ_t ‖MLP(norm(h_t)) − sg(h_{t+1})‖² over the chunk.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from nested import levels
from nested.layers import rms_norm


def swiglu(w: dict, x: jax.Array) -> jax.Array:
  """`silu(x W_gate) * (x W_up) W_down` for the params of `layers.SwiGLU` (`w_gate/kernel`, ...);
  kernels shared ([d, f]) or per sequence ([B, d, f])."""
  mm = lambda a, k: (jnp.einsum("b...d,bdf->b...f", a, k.astype(a.dtype)) if k.ndim == 3
                     else a @ k.astype(a.dtype))
  k = lambda name: w[name]["kernel"]
  return mm(jax.nn.silu(mm(x, k("w_gate"))) * mm(x, k("w_up")), k("w_down"))


def level_forward(norm_scale: jax.Array, mlp: dict, h: jax.Array) -> jax.Array:
  """One CMS level: h + MLP(norm(h))."""
  return h + swiglu(mlp, rms_norm(norm_scale, h))


def cms_forward(norms: Sequence[jax.Array], mlps: Sequence[dict], h: jax.Array):
  """y = MLP^(K)(… MLP^(1)(h)) as a residual chain; returns (y, each level's input)."""
  inputs = []
  for scale, mlp in zip(norms, mlps):
    inputs.append(h)
    h = level_forward(scale, mlp, h)
  return h, inputs


def local_l2_gradient(norm_scale: jax.Array, mlp: dict, h: jax.Array) -> dict:
  """∇_θ Σ_b mean_t ‖MLP_θ(norm(h_t)) − sg(h_{t+1})‖² within one chunk, per sequence.

  h: [B, C, d]; mlp weights per sequence [B, ...]. Summing over sequences keeps each
  sequence's gradient its own.
  """
  normed, target = rms_norm(norm_scale, h[:, :-1]), jax.lax.stop_gradient(h[:, 1:])

  def loss(w):
    err = swiglu(w, normed).astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.sum(jnp.mean(jnp.sum(err * err, -1), -1))

  return jax.grad(loss)(mlp)


def clip_per_sequence(grads: dict, max_norm: float) -> dict:
  """Clips each sequence's (leading axis) gradient to global norm `max_norm` (0 = off)."""
  if max_norm <= 0:
    return grads
  sq = sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), -1) for g in jax.tree.leaves(grads))
  scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-12))
  return jax.tree.map(lambda g: g * scale.reshape(-1, *([1] * (g.ndim - 1))).astype(g.dtype),
                      grads)


def level_optimizer(lr: float, period_chunks: int, *,
                    momentum: float = 0.0) -> optax.GradientTransformation:
  """The in-context level: SGD (with optional momentum) fired every `period_chunks` chunks
  on the sum of the gradients since it last fired (`nested.levels.every`, SPEC §1)."""
  return levels.every(optax.sgd(lr, momentum=momentum or None), period_chunks, accumulate="sum")


def init_fast(mlp: dict, batch: int) -> dict:
  """Each sequence starts from the learned (meta-learned, SPEC §2) initial weights."""
  return jax.tree.map(lambda w: jnp.broadcast_to(w, (batch, *w.shape)), mlp)
