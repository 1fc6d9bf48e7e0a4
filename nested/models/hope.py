"""HOPE and HOPE-Attention (SPEC §2): a sequence mixer followed by a Continuum Memory System.

Block: `h ← h + mixer(norm(h))`, then the CMS levels `h ← h + MLP_ℓ(norm_ℓ(h))`, ℓ = 1..K.
The mixer is self-modifying Titans (`mixer="selfmod"`, HOPE) or causal softmax attention
with RoPE (`mixer="attention"`, HOPE-Attention).

The model is a scan over chunks of `chunk_size` tokens. Its carry — the in-context state —
holds each layer's memories (or attention cache) and causal-conv history, and the fast
weights of the in-context CMS levels with their `levels.every` optimizer states. Per
chunk: every layer runs on the chunk from the carried state; the chunk's logits give the
teach signal (the next-token loss within the chunk, SPEC §3) whose gradient with respect
to the fast CMS weights feeds each in-context level's optimizer, which fires only when the
tokens seen reach a multiple of the level's period. Each chunk step is `jax.checkpoint`-ed
(`remat`: what it keeps), so the outer gradient flows through the writes (BPTT over chunks)
at about one chunk's activation memory; `write_gradient=False` stops it at every write. By default the CMS inner gradient
itself is treated as data by the outer gradient (first order, `cms_second_order=False`);
the memories' writes are always differentiated in full.

The NNX modules hold the parameters (all `nnx.Param`, including the learned initial states
of the memories); the computation is pure functions of their values, so in-context state
never becomes a parameter. `__call__(tokens)` maps [B, T] → logits [B, T, V] from a fresh
state; `init_state` / `stream` carry the state across segments with the same result as
one pass.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from nested import cms, fields, layers, memory, selfmod
from nested.layers import embed, readout
from nested.errors import UserError

_MIXERS = ("selfmod", "attention")
_OBJECTIVES = ("teach", "local_l2")


@dataclasses.dataclass(frozen=True)
class HopeConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  cms_hidden: tuple = (256,)     # SwiGLU width of each CMS level, fastest first ("256,128")
  cms_periods: tuple = (16,)     # update period of each CMS level in tokens ("16,64,8192")
  context: int = 128             # levels with period > context are not updated in context
  chunk_size: int = 16           # tokens per step of the model's scan over chunks
  mixer: str = "selfmod"         # "selfmod" (HOPE) or "attention" (HOPE-Attention)
  mem_hidden: int = 64           # hidden width of M_mem (one memory per head)
  gen_hidden: int = 64           # hidden width of each full-width generator memory (M_k, ...)
  mem_chunk_size: int = 16       # chunk of M_mem (divides chunk_size)
  gen_chunk_size: int = 8        # chunk of M_k, M_v, M_η, M_α (and M_q) (divides chunk_size)
  cms_objective: str = "teach"   # "teach" (next-token loss) or "local_l2"
  cms_lr: float = 1e-2           # η^(ℓ) of the in-context CMS levels; 0 = plain MLPs
  cms_momentum: float = 0.0      # SGD momentum of the in-context CMS levels; 0 = off
  write_gradient: bool = True    # outer gradient through in-context writes (else stop-grad)
  cms_second_order: bool = False  # outer gradient also through the CMS inner gradient (~3x)
  mem_momentum: float = 0.0      # momentum μ of the memories' gradient term; 0 = off
  dgd: bool = True               # the −η k kᵀ term of DGD
  weight_decay: bool = True      # the α_t retention of the memories
  adaptive_q: bool = False       # q from a self-modifying memory M_q instead of x W_q
  eta_max: float = 1.0           # η_t = eta_max · sigmoid(·), a bounded step
  eta_init: float = 0.018        # η_t at initialisation (sets the bias of the sigmoid)
  inner_clip: float = 1.0        # bound on each token's inner step norm; 0 = off
  conv: str = "after"            # causal conv after the projections (SPEC) or "before" them
  memory_writes: bool = True     # False: memories and in-context CMS levels never change
  attention_window: int = 0      # HOPE-Attention: keys kept, in tokens (0 = `context`)
  remat: str = "chunk"           # what backprop keeps of the chunk scan: memory.scan_chunks
  scan_unroll: int = 1           # chunk steps per compiled loop iteration (faster, longer compile)
  conv_width: int = 4
  rope_theta: float = 10_000.0
  tie_embeddings: bool = False
  dtype: str = "float32"         # compute dtype of projections and CMS; memories run in fp32

  def __post_init__(self):
    for name, example in (("cms_hidden", "256,128"), ("cms_periods", "16,64,8192")):
      object.__setattr__(self, name, fields.ints(getattr(self, name), field=f"config.model.{name}",
                                                 example=example))
    for name, value, allowed in (("mixer", self.mixer, _MIXERS),
                                 ("cms_objective", self.cms_objective, _OBJECTIVES),
                                 ("conv", self.conv, selfmod.CONV_PLACEMENTS),
                                 ("remat", self.remat, memory.REMAT)):
      if value not in allowed:
        raise UserError(f"model.{name}={value!r}; choose one of {allowed}")
    if self.scan_unroll < 1:
      raise UserError(f"model.scan_unroll={self.scan_unroll}; it counts chunk steps per loop "
                      f"iteration: 1 (a rolled loop) or more")
    if len(self.cms_hidden) != len(self.cms_periods):
      raise UserError(f"cms_hidden {self.cms_hidden} and cms_periods {self.cms_periods} must "
                       f"have one entry per CMS level")
    if self.d_model % self.n_heads:
      raise UserError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    for name in ("mem_chunk_size", "gen_chunk_size") if self.mixer == "selfmod" else ():
      if self.chunk_size % getattr(self, name):
        raise UserError(f"{name}={getattr(self, name)} must divide chunk_size={self.chunk_size}")
    for p in self.in_context_periods:
      if p % self.chunk_size:
        raise UserError(f"in-context CMS period {p} is not a multiple of chunk_size="
                         f"{self.chunk_size}")
    for name in ("mem_momentum", "cms_momentum"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise UserError(f"model.{name}={getattr(self, name)} must be in [0, 1) (0 = off)")
    if not 0 < self.eta_init < self.eta_max:
      raise UserError(f"model.eta_init={self.eta_init} must lie in (0, eta_max={self.eta_max}) "
                       f"(η_t = eta_max · sigmoid(·)); switch writes off with "
                       f"model.memory_writes=False")
    if self.attention_window % self.chunk_size or self.attention_window < 0:
      raise UserError(f"model.attention_window={self.attention_window} must be a non-negative "
                       f"multiple of chunk_size={self.chunk_size} (0 = the whole context)")

  @property
  def in_context_periods(self) -> tuple:
    return tuple(p for p in self.cms_periods if 0 < p <= self.context)

  @property
  def in_context_levels(self) -> tuple:
    """Indices of the CMS levels updated in context."""
    return tuple(i for i, p in enumerate(self.cms_periods) if 0 < p <= self.context)

  @property
  def reads_lookahead(self) -> bool:
    """Whether `stream`'s state depends on the token after the segment: the teach signal of
    the in-context CMS levels includes the last chunk's boundary pair."""
    return bool(self.in_context_levels) and self.memory_writes and self.cms_objective == "teach"


@dataclasses.dataclass(frozen=True)
class HopeAttentionConfig(HopeConfig):
  mixer: str = "attention"


# ----------------------------------------------------------------------------- parameters


class CMSLevel(nnx.Module):
  def __init__(self, cfg: HopeConfig, hidden: int, *, rngs: nnx.Rngs):
    self.norm = layers.RMSNorm(cfg.d_model)
    self.mlp = layers.SwiGLU(cfg.d_model, hidden, out_stddev=layers.residual_stddev(cfg.n_layers),
                             dtype=jnp.dtype(cfg.dtype), rngs=rngs)


class HopeBlock(nnx.Module):
  def __init__(self, cfg: HopeConfig, *, rngs: nnx.Rngs):
    self.mixer_norm = layers.RMSNorm(cfg.d_model)
    out_stddev = layers.residual_stddev(cfg.n_layers)
    if cfg.mixer == "selfmod":
      self.mixer = selfmod.SelfModParams(
          cfg.d_model, cfg.n_heads, mem_hidden=cfg.mem_hidden, gen_hidden=cfg.gen_hidden,
          adaptive_q=cfg.adaptive_q, conv=cfg.conv, conv_width=cfg.conv_width,
          out_stddev=out_stddev, dtype=jnp.dtype(cfg.dtype),
          eta_init_logit=math.log(cfg.eta_init / (cfg.eta_max - cfg.eta_init)), rngs=rngs)
    else:
      self.mixer = layers.CausalSelfAttention(
          cfg.d_model, cfg.n_heads, out_stddev=out_stddev, rope_theta=cfg.rope_theta,
          dtype=jnp.dtype(cfg.dtype), rngs=rngs)
    self.cms = nnx.List([CMSLevel(cfg, f, rngs=rngs) for f in cfg.cms_hidden])


# ----------------------------------------------------------------------------- mixers


def _rule(cfg: HopeConfig) -> selfmod.Rule:
  return selfmod.Rule(eta_max=cfg.eta_max, clip_norm=cfg.inner_clip, momentum=cfg.mem_momentum,
                      dgd=cfg.dgd, weight_decay=cfg.weight_decay, writes=cfg.memory_writes)


def selfmod_mixer(cfg: HopeConfig, p: dict, state: dict, x: jax.Array):
  """Self-modifying Titans on one chunk (nested/selfmod.py), its last writes pending."""
  return selfmod.mixer_reads(p, state, x, n_heads=cfg.n_heads, rule=_rule(cfg), conv=cfg.conv,
                             gen_chunk=cfg.gen_chunk_size, mem_chunk=cfg.mem_chunk_size,
                             write_gradient=cfg.write_gradient)


def finish_mixers(cfg: HopeConfig, pending: list) -> list:
  """The mixers' states after a chunk: the self-modifying memories' pending writes done."""
  if cfg.mixer != "selfmod":
    return pending
  return [selfmod.finish_writes(p, rule=_rule(cfg), write_gradient=cfg.write_gradient)
          for p in pending]


def attention_init_state(cfg: HopeConfig, batch: int, cache_len: int) -> dict:
  return layers.ring_cache(batch, cache_len, cfg.n_heads, cfg.d_model // cfg.n_heads)


def attention_mixer(cfg: HopeConfig, p: dict, state: dict, x: jax.Array, positions: jax.Array):
  """Causal softmax attention of a chunk over a ring-buffer KV cache of the last L tokens."""
  return layers.ring_attention(p, state, x, positions, n_heads=cfg.n_heads,
                               rope_theta=cfg.rope_theta)


# ----------------------------------------------------------------------------- the model


class Hope(nnx.Module):
  """HOPE / HOPE-Attention: int tokens [B, T] → float32 logits [B, T, vocab_size]."""

  def __init__(self, cfg: HopeConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = layers.token_embedding(cfg, rngs=rngs)
    self.layers = nnx.List([HopeBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
    layers.add_readout(self, cfg, rngs=rngs)

  def _params(self) -> dict:
    return nnx.to_pure_dict(nnx.state(self, nnx.Param))

  def init_state(self, batch: int, cache_len: int | None = None) -> dict:
    """The in-context state at the start of a sequence (learned initial memories / weights).

    cache_len: attention-cache length for HOPE-Attention (default: `attention_window`, else
    `context`; a multiple of `chunk_size`).
    """
    return init_state(self.cfg, self._params(), batch, cache_len)

  def stream(self, tokens: jax.Array, state: dict,
             lookahead: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Logits of a segment [B, T] (T a multiple of chunk_size) and the state after it.

    lookahead [B]: the token after the segment, if known. The last chunk's teach signal
    then includes its boundary pair (see `run`), so streaming a sequence in segments,
    each given its successor's first token, equals one pass over it.
    """
    return run(self.cfg, self._params(), tokens, state, lookahead)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.cfg
    length = tokens.shape[-1]
    padded = -(-length // cfg.chunk_size) * cfg.chunk_size
    # Padding at the end cannot change earlier outputs (causality); it is cropped.
    tokens2d = jnp.pad(tokens.reshape(-1, length), ((0, 0), (0, padded - length)))
    params = self._params()
    state = init_state(cfg, params, tokens2d.shape[0], cfg.attention_window or padded)
    logits, _ = run(cfg, params, tokens2d, state)
    return logits[:, :length].reshape(*tokens.shape, -1)


def _in_context_optimizers(cfg: HopeConfig) -> list:
  return [cms.level_optimizer(cfg.cms_lr, cfg.cms_periods[i] // cfg.chunk_size,
                              momentum=cfg.cms_momentum) for i in cfg.in_context_levels]


def init_state(cfg: HopeConfig, params: dict, batch: int, cache_len: int | None = None) -> dict:
  cache_len = cache_len or cfg.attention_window or cfg.context
  if cfg.mixer == "attention" and cache_len % cfg.chunk_size:
    raise ValueError(f"cache_len={cache_len} must be a multiple of chunk_size={cfg.chunk_size}")
  mixers, fast = [], []
  for i in range(cfg.n_layers):
    p = params["layers"][i]
    mixers.append(selfmod.init_state(p["mixer"], batch, rule=_rule(cfg),
                                     conv_width=cfg.conv_width) if cfg.mixer == "selfmod"
                  else attention_init_state(cfg, batch, cache_len))
    fast.append([memory.broadcast_initial(p["cms"][j]["mlp"], batch)
                 for j in cfg.in_context_levels])
  optimizers = _in_context_optimizers(cfg)
  opt_states = [[tx.init(w) for tx, w in zip(optimizers, layer)] for layer in fast]
  return layers.place({"position": jnp.zeros((), jnp.int32), "mixers": mixers, "fast": fast,
                       "opt": opt_states})


def _cms_weights(cfg: HopeConfig, p_cms: list, fast: list) -> list:
  """Each level's MLP: its fast weights when in context, else the parameters."""
  weights = [p_cms[j]["mlp"] for j in range(len(cfg.cms_periods))]
  for slot, j in enumerate(cfg.in_context_levels):
    weights[j] = fast[slot]
  return weights


def forward_chunk(cfg: HopeConfig, params: dict, mixers: list, fast: list, tokens: jax.Array,
                  positions: jax.Array):
  """All layers on one chunk [B, C]; returns (logits, the mixers' pending states
  (`finish_mixers`), local-L2 grads)."""
  h = embed(cfg, params, tokens)
  new_mixers, local_grads = [], []
  for i in range(cfg.n_layers):
    p = params["layers"][i]
    normed = layers.rms_norm(p["mixer_norm"]["scale"], h)
    if cfg.mixer == "selfmod":
      y, m = selfmod_mixer(cfg, p["mixer"], mixers[i], normed)
    else:
      y, m = attention_mixer(cfg, p["mixer"], mixers[i], normed, positions)
    new_mixers.append(m)
    h = h + y.astype(h.dtype)
    norms = [p["cms"][j]["norm"]["scale"] for j in range(len(cfg.cms_periods))]
    h, inputs = cms.cms_forward(norms, _cms_weights(cfg, p["cms"], fast[i]), h)
    if cfg.cms_objective == "local_l2":
      local_grads.append([cms.local_l2_gradient(norms[j], fast[i][slot], inputs[j])
                          for slot, j in enumerate(cfg.in_context_levels)])
  return readout(cfg, params, h), new_mixers, local_grads


def teach_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
  """Σ over sequences of Σ_t w_t NLL(logits_t, target_t) / C over the chunk's C positions.

  Summing over sequences keeps each sequence's gradient with respect to its own fast
  weights independent of the batch.
  """
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * weights) / logits.shape[1]


def shifted_targets(tokens: jax.Array, lookahead: jax.Array | None):
  """Each position's next token and whether it is known: (targets, weights), both [B, T].

  The teach signal of a chunk includes its boundary pair (last position → the next
  chunk's first token). That is causal: the update it feeds is first read at that next
  token's own position, which already has it as input. Only the segment's last target is
  unknown, unless `lookahead` gives it.
  """
  last = jnp.zeros_like(tokens[:, :1]) if lookahead is None else lookahead[:, None]
  targets = jnp.concatenate([tokens[:, 1:], last.astype(tokens.dtype)], axis=1)
  weights = jnp.ones(tokens.shape, jnp.float32)
  if lookahead is None:
    weights = weights.at[:, -1].set(0.0)
  return targets, weights


def run(cfg: HopeConfig, params: dict, tokens: jax.Array, state: dict,
        lookahead: jax.Array | None = None):
  """The scan over chunks: (logits [B, T, V], state after). T must be a multiple of C."""
  length = tokens.shape[-1]
  if length % cfg.chunk_size:
    raise ValueError(f"segment length {length} is not a multiple of chunk_size={cfg.chunk_size}")
  optimizers = _in_context_optimizers(cfg)
  cms_writes = bool(cfg.in_context_levels) and cfg.memory_writes

  def chunk_step(carry, xs):
    chunk_tokens, targets, weights = xs
    positions = carry["position"] + jnp.arange(cfg.chunk_size, dtype=jnp.int32)
    fast = carry["fast"]
    if cms_writes and cfg.cms_objective == "teach":
      def loss_fn(fast):
        logits, mixers, _ = forward_chunk(cfg, params, carry["mixers"], fast, chunk_tokens,
                                          positions)
        return teach_loss(logits, targets, weights), (logits, mixers)
      grads, (logits, mixers) = jax.grad(loss_fn, has_aux=True)(fast)
    else:
      logits, mixers, grads = forward_chunk(cfg, params, carry["mixers"], fast, chunk_tokens,
                                            positions)
    new_fast, new_opt = fast, carry["opt"]
    if cms_writes:
      if not cfg.cms_second_order:
        # First order: the inner gradient is data to the outer loss (as in first-order MAML);
        # the outer gradient still flows through every write W ← W − η G, not through G.
        grads = jax.lax.stop_gradient(grads)
      new_fast, new_opt = [], []
      for i in range(cfg.n_layers):
        layer_fast, layer_opt = [], []
        for slot, tx in enumerate(optimizers):
          g = cms.clip_per_sequence(grads[i][slot], cfg.inner_clip)
          updates, opt = tx.update(g, carry["opt"][i][slot], fast[i][slot])
          layer_fast.append(optax.apply_updates(fast[i][slot], updates))
          layer_opt.append(opt)
        new_fast.append(layer_fast)
        new_opt.append(layer_opt)
      if not cfg.write_gradient:   # the memories stop theirs inside the mixer
        new_fast = jax.lax.stop_gradient(new_fast)
    # Outside the teach gradient: the memories' last writes do not reach this chunk's logits.
    new = {"position": carry["position"] + cfg.chunk_size, "mixers": finish_mixers(cfg, mixers),
           "fast": new_fast, "opt": new_opt}
    return new, logits

  targets, weights = shifted_targets(tokens, lookahead)
  state, logits = memory.scan_chunks(chunk_step, state, (tokens, targets, weights),
                                     chunk=cfg.chunk_size, axis=1, remat=cfg.remat,
                                     unroll=cfg.scan_unroll)
  return logits, state
