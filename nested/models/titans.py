"""Titans (LMM) (SPEC §2): a neural long-term memory as the sequence mixer, then SwiGLU.

Block: `h ← h + LMM(norm(h))`, `h ← h + SwiGLU(norm(h))`. The LMM per head:
q, k, v = SiLU(conv(x W_{q,k,v})) with q, k L2-normalised; data-dependent step size
θ_t = theta_scale · softplus(·), momentum decay β_t = sigmoid(·) and forget gate
α_t = sigmoid(·) from one linear map of x; the deep memory M (2-layer residual MLP, learned
initial state) is read at the chunk-start state and written per token with momentum and
forgetting, S_t = β_t S_{t−1} − θ_t ∇ℓ_t, M_t = (1 − α_t) M_{t−1} + S_t, the gradients taken
at the chunk start (`memory.titans_scan`); output = W_o (RMSNorm(o) ⊙ SiLU(x W_g)). The
memory state is carried explicitly: `init_state` / `stream` continue test-time learning
across segments with the same result as one pass.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from nested import cms, layers, memory
from nested.errors import UserError
from nested.layers import embed, readout


@dataclasses.dataclass(frozen=True)
class TitansConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  mem_hidden: int = 64           # hidden width of the memory MLP (per head)
  chunk_size: int = 16           # tokens per chunk of the memory's scan
  theta_scale: float = 0.02      # θ_t = theta_scale · softplus(·) (see configs/titans.py)
  inner_clip: float = 1.0        # bound on each token's inner step norm ‖θ_t ∇ℓ_t‖; 0 = off
  write_gradient: bool = True    # outer gradient through the memory writes (else stop-grad)
  memory_writes: bool = True     # False: the memory never changes (the memory-off control)
  remat: str = "chunk"           # what backprop keeps of the chunk scan: memory.scan_chunks
  conv_width: int = 4
  tie_embeddings: bool = False
  dtype: str = "float32"         # compute dtype of the projections; the memory runs in fp32

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise UserError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.remat not in memory.REMAT:
      raise UserError(f"model.remat={self.remat!r}; choose one of {memory.REMAT}")


class LMM(nnx.Module):
  """Parameters of the long-term memory layer."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    d, h = cfg.d_model, cfg.n_heads
    dtype = jnp.dtype(cfg.dtype)
    self.w_q = layers.linear(d, d, stddev=0.02, dtype=dtype, rngs=rngs)
    self.w_k = layers.linear(d, d, stddev=0.02, dtype=dtype, rngs=rngs)
    self.w_v = layers.linear(d, d, stddev=0.02, dtype=dtype, rngs=rngs)
    self.w_g = layers.linear(d, d, stddev=0.02, dtype=dtype, rngs=rngs)
    self.conv_q, self.conv_k, self.conv_v = (layers.conv_kernel(cfg.conv_width, d)
                                             for _ in range(3))
    self.w_gates = layers.linear(d, 3 * h, stddev=0.02, dtype=dtype, rngs=rngs)
    # θ ≈ theta_scale · softplus(0), β ≈ sigmoid(2) ≈ 0.88, α ≈ sigmoid(-5) ≈ 0.007 at init.
    self.gate_bias = nnx.Param(jnp.concatenate(
        [jnp.zeros((h,)), jnp.full((h,), 2.0), jnp.full((h,), -5.0)]).astype(jnp.float32))
    self.memory = layers.MemoryInit((h,), d // h, cfg.mem_hidden, rngs=rngs)
    self.out_norm = layers.RMSNorm(d)
    self.w_o = layers.linear(d, d, stddev=layers.residual_stddev(cfg.n_layers), dtype=dtype,
                             rngs=rngs)


class TitansBlock(nnx.Module):
  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    self.mixer_norm = layers.RMSNorm(cfg.d_model)
    self.lmm = LMM(cfg, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(cfg.d_model)
    self.mlp = layers.SwiGLU(cfg.d_model, cfg.d_ff, out_stddev=layers.residual_stddev(cfg.n_layers),
                             dtype=jnp.dtype(cfg.dtype), rngs=rngs)


def lmm_init_state(cfg: TitansConfig, p: dict, batch: int) -> dict:
  conv = jnp.zeros((batch, cfg.conv_width - 1, cfg.d_model), jnp.float32)
  return {"memory": memory.titans_init_state(p["memory"], batch),
          "conv_q": conv, "conv_k": conv, "conv_v": conv}


def lmm(cfg: TitansConfig, p: dict, state: dict, x: jax.Array):
  """The LMM over a segment x [B, T, D] (T a multiple of chunk_size) → (y, state after)."""
  new_state = {}

  def projected(name):
    y, new_state[f"conv_{name}"] = layers.causal_depthwise_conv(
        layers.kernel_matmul(p[f"w_{name}"], x).astype(jnp.float32), p[f"conv_{name}"],
        state[f"conv_{name}"])
    return layers.split_heads(jax.nn.silu(y), cfg.n_heads)

  q, k, v = memory.l2_normalize(projected("q")), memory.l2_normalize(projected("k")), projected("v")
  gates = layers.kernel_matmul(p["w_gates"], x).astype(jnp.float32) + p["gate_bias"]
  step, decay, forget = jnp.split(gates.transpose(0, 2, 1), 3, axis=1)       # [B, H, T] each
  # β = sigmoid(decay) and 1 − α = sigmoid(−forget), as logs: the chunk form works in logs.
  out, new_state["memory"] = memory.titans_scan(
      state["memory"], q, k, v, cfg.theta_scale * jax.nn.softplus(step),
      jax.nn.log_sigmoid(decay), jax.nn.log_sigmoid(-forget), chunk=cfg.chunk_size,
      clip_norm=cfg.inner_clip, write_gradient=cfg.write_gradient, writes=cfg.memory_writes,
      remat=cfg.remat)
  gated = layers.rms_norm(p["out_norm"]["scale"], layers.merge_heads(out)) * jax.nn.silu(
      layers.kernel_matmul(p["w_g"], x).astype(jnp.float32))
  return layers.kernel_matmul(p["w_o"], gated.astype(x.dtype)), new_state


class Titans(nnx.Module):
  """Titans (LMM): int tokens [B, T] → float32 logits [B, T, vocab_size]."""

  def __init__(self, cfg: TitansConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = layers.token_embedding(cfg, rngs=rngs)
    self.layers = nnx.List([TitansBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    layers.add_readout(self, cfg, rngs=rngs)

  def _params(self) -> dict:
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def init_state(self, batch: int, cache_len: int | None = None) -> dict:
    """Each layer's memory at its learned initial state, zero momentum, empty conv history
    (`cache_len`, for the models' common interface, is unused: Titans keeps no cache)."""
    del cache_len
    return init_state(self.cfg, self._params(), batch)

  def stream(self, tokens: jax.Array, state: dict,
             lookahead: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Logits of a segment [B, T] (T a multiple of chunk_size) and the state after it.

    `lookahead` (the token after the segment) is accepted for the models' common streaming
    interface and unused: Titans' writes depend on inputs only, not on next-token targets.
    """
    del lookahead
    return run(self.cfg, self._params(), tokens, state)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    length = tokens.shape[-1]
    padded = -(-length // self.cfg.chunk_size) * self.cfg.chunk_size
    # Padding at the end cannot change earlier outputs (causality); it is cropped.
    tokens2d = jnp.pad(tokens.reshape(-1, length), ((0, 0), (0, padded - length)))
    params = self._params()
    logits, _ = run(self.cfg, params, tokens2d, init_state(self.cfg, params, tokens2d.shape[0]))
    return logits[:, :length].reshape(*tokens.shape, -1)


def init_state(cfg: TitansConfig, params: dict, batch: int) -> dict:
  return layers.place({"layers": [lmm_init_state(cfg, params["layers"][i]["lmm"], batch)
                                  for i in range(cfg.n_layers)]})


def run(cfg: TitansConfig, params: dict, tokens: jax.Array, state: dict):
  if tokens.shape[-1] % cfg.chunk_size:
    raise ValueError(f"segment length {tokens.shape[-1]} is not a multiple of chunk_size="
                     f"{cfg.chunk_size}")
  h = embed(cfg, params, tokens)
  new_layers = []
  for i in range(cfg.n_layers):
    p = params["layers"][i]
    normed = layers.rms_norm(p["mixer_norm"]["scale"], h)
    y, layer_state = lmm(cfg, p["lmm"], state["layers"][i], normed)
    new_layers.append(layer_state)
    h = h + y.astype(h.dtype)
    h = h + cms.swiglu(p["mlp"], layers.rms_norm(p["mlp_norm"]["scale"], h)).astype(h.dtype)
  return readout(cfg, params, h), {"layers": new_layers}

