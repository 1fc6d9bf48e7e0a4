"""Self-modifying Titans, HOPE's sequence mixer (SPEC §2), read before write.

Per token x_t (the mixer's normalised input), with every memory at its chunk-start state:

  k_t = conv(M_k(x̄_t)),  v_t = conv(M_v(x̄_t)),  q_t = conv(x_t W_q)  (or conv(M_q(x̄_t))),
  η_t = η_max · sigmoid(M_η(x̄_t) + b_η),  α_t = sigmoid(M_α(x̄_t) + b_α),   x̄ = x / ‖x‖,
  o_t = M_mem(q_t),   then every memory M□ writes  M□ ← M□ (α_t I − η_t k_t k_tᵀ) − η_t ∇‖M□(k_t) − M□(v_t)‖².

Layout (SPEC §3 defaults):
* The generators M_k, M_v, M_η, M_α (and M_q) are full-width memories R^D → R^D, one per
  layer, so every head's k, v, η and α depend on the whole token; their outputs are split
  into heads. M_mem is one memory per head over d = D/H.
* Every memory is read and written at unit-norm inputs: the generators read x̄ and are
  written with k̄ = k/‖k‖ and targets M(v̄); per head, q, k and v are L2-normalised, so
  M_mem's reads, keys and target inputs all have the scale its writes were made at.
* η and α are per head (from the head's slice of M_η(x̄), M_α(x̄), mean-pooled); the
  full-width generators write with their mean over heads (η) and the geometric mean (α).
* The causal depthwise conv (width 4) follows the projections (`conv="after"`, SPEC §2) or,
  as an alternative, precedes the memories on x (`conv="before"`).
* Two chunk sizes: the generators write every `gen_chunk` tokens, M_mem every `mem_chunk`.
  M_mem's output feeds none of the generators, so the generators run first over the
  segment (one scan), then M_mem (a second scan) — exactly the interleaved recurrence.

Writes use `memory.write_chunk` (exact chunk form, per-token clipping and decay); with
`momentum` μ > 0, S_t = μ S_{t−1} − η_t ∇ℓ_t and W_t = W_{t−1}(α_t I − η_t k_t k_tᵀ) + S_t.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from nested import layers, memory

GENERATORS = ("k", "v", "eta", "alpha")
CONV_PLACEMENTS = ("after", "before")


@dataclasses.dataclass(frozen=True)
class Rule:
  """The switches of the memories' write rule (SPEC §3 ablations)."""
  eta_max: float          # η_t = eta_max · sigmoid(·)
  clip_norm: float        # bound on each token's ‖η_t ∇ℓ_t‖; 0 = off
  momentum: float         # μ of the gradient term; 0 = off
  dgd: bool               # the −η k kᵀ erase
  weight_decay: bool      # the α_t retention
  writes: bool = True     # False: every memory keeps its initial state (the memory-off control)

  def gates(self, eta: jax.Array, log_alpha: jax.Array) -> memory.Gates:
    log_alpha = log_alpha if self.weight_decay else jnp.zeros_like(log_alpha)
    log_mu = (jnp.full_like(eta, math.log(self.momentum)) if self.momentum else None)
    return memory.Gates(eta, log_alpha, log_mu, eta if self.dgd else None)


class SelfModParams(nnx.Module):
  """W_q, the convs, the learned initial states of the memories, the gate biases, W_o."""

  def __init__(self, d_model: int, n_heads: int, *, mem_hidden: int, gen_hidden: int,
               adaptive_q: bool, conv: str, conv_width: int, out_stddev: float, dtype,
               eta_init_logit: float = -4.0, rngs: nnx.Rngs):
    d = d_model
    if not adaptive_q:
      self.w_q = layers.linear(d, d, stddev=0.02, dtype=dtype, rngs=rngs)
    convs = ("q", "k", "v") if conv == "after" else ("x",) + (() if adaptive_q else ("q",))
    self.convs = nnx.Dict({n: layers.conv_kernel(conv_width, d) for n in convs})
    names = GENERATORS + (("q",) if adaptive_q else ())
    # Each generator starts as its own random function z + g(z), |g(z)| ~ |z|: near the
    # identity (a small W_out) M_k and M_v would both start as x̄, so k = v, every target
    # M(v) would equal M(k) and no memory would ever be written.
    self.generators = nnx.Dict({
        n: layers.MemoryInit((), d, gen_hidden, out_stddev=1.0 / math.sqrt(gen_hidden),
                             rngs=rngs) for n in names})
    self.mem = layers.MemoryInit((n_heads,), d // n_heads, mem_hidden, rngs=rngs)
    # η ≈ eta_max · sigmoid(eta_init_logit) and α ≈ sigmoid(5) ≈ 0.993 at init.
    self.eta_bias = nnx.Param(jnp.full((n_heads,), eta_init_logit, jnp.float32))
    self.alpha_bias = nnx.Param(jnp.full((n_heads,), 5.0, jnp.float32))
    self.out_norm = layers.RMSNorm(d)
    self.w_o = layers.linear(d, d, stddev=out_stddev, dtype=dtype, rngs=rngs)


def _zeros_or_none(tree, on: bool):
  return jax.tree.map(jnp.zeros_like, tree) if on else None


def generator_names(p: dict) -> tuple:
  """The generators of these parameters, in the order their bank stacks them."""
  return tuple(n for n in GENERATORS + ("q",) if n in p["generators"])


def init_state(p: dict, batch: int, *, rule: Rule, conv_width: int) -> dict:
  """The in-context state at a sequence start: initial memories, zero momenta, empty convs.

  The generators are one bank, [B, G, ...] in `generator_names` order: they share keys,
  values and gates, so one write computes their decay products and erase once.
  """
  bank = jax.tree.map(lambda *w: jnp.stack(w), *(p["generators"][n] for n in generator_names(p)))
  generators = memory.broadcast_initial(bank, batch)
  mem = memory.broadcast_initial(p["mem"], batch)
  d = p["mem"]["w_in"].shape[0] * p["mem"]["w_in"].shape[1]
  return {"generators": generators, "gen_momentum": _zeros_or_none(generators, rule.momentum),
          "mem": mem, "mem_momentum": _zeros_or_none(mem, rule.momentum),
          "conv": {n: jnp.zeros((batch, conv_width - 1, d), jnp.float32) for n in p["convs"]}}


def _per_head(y: jax.Array, n_heads: int) -> jax.Array:
  """[B, C, D] → [B, C, H, D/H] (time stays on axis 1, as the generator scan needs)."""
  return y.reshape(*y.shape[:-1], n_heads, y.shape[-1] // n_heads)


def _head_gates(raw_eta, raw_alpha, p: dict, n_heads: int, eta_max: float):
  """η, log α per head [B, C, H] from the full-width generator outputs [B, C, D]."""
  pooled = lambda raw: jnp.mean(_per_head(raw, n_heads), axis=-1)
  eta = eta_max * jax.nn.sigmoid(pooled(raw_eta) + p["eta_bias"])
  return eta, jax.nn.log_sigmoid(pooled(raw_alpha) + p["alpha_bias"])


def _generator_scan(p: dict, state: dict, x: jax.Array, q_in: jax.Array | None, *,
                    n_heads: int, rule: Rule, conv: str, chunk: int, write_gradient: bool):
  """The generators over a segment: per token and head the queries, keys, values [B, H, T, d]
  and gates η, log α [B, H, T]; the generators' carry before their last chunk's write and
  that write's arguments (`_generator_write`)."""
  names = generator_names(p)
  bank_apply = jax.vmap(jax.vmap(memory.mlp_memory, (0, None)))   # over batch, then bank

  def read(carry, xs):
    gens, moms, hist = carry
    x, q_in = xs
    hist = dict(hist)
    outputs = bank_apply(gens, memory.l2_normalize(x))            # [B, G, C, D]
    raw = {n: outputs[:, i] for i, n in enumerate(names)}

    def convolved(name, y):
      if conv != "after":
        return y
      y, hist[name] = layers.causal_depthwise_conv(y, p["convs"][name], hist[name])
      return y

    k = convolved("k", raw["k"])
    v = convolved("v", raw["v"])
    q = convolved("q", raw["q"] if "q" in raw else q_in)
    eta, log_alpha = _head_gates(raw["eta"], raw["alpha"], p, n_heads, rule.eta_max)
    heads = lambda y: memory.l2_normalize(_per_head(y, n_heads))
    out = (heads(q), heads(k), heads(v), eta, log_alpha)
    if not rule.writes:
      return (gens, moms, hist), out, None
    # The full-width generators write with the head-mean step and geometric-mean retention.
    gates = rule.gates(jnp.mean(eta, axis=-1), jnp.mean(log_alpha, axis=-1))
    return (gens, moms, hist), out, (memory.l2_normalize(k), memory.l2_normalize(v), gates)

  carry = (state["generators"], state["gen_momentum"],
           {n: h for n, h in state["conv"].items() if conv == "after"})
  carry, args, out = memory.scan_deferring_last_write(
      read, functools.partial(_generator_write, rule), carry, (x, q_in), chunk=chunk, axis=1,
      write_gradient=write_gradient)
  heads_first = tuple(jnp.swapaxes(y, 1, 2) for y in out)                 # → [B, H, T, ·]
  return heads_first, carry, args


def _generator_write(rule: Rule, carry, args):
  """One chunk's writes of the generator bank: keys k̄, each generator's target M(v̄)."""
  if args is None:
    return carry
  gens, moms, hist = carry

  def write(bank, momenta, keys, values, gates):
    return memory.write_chunk(bank, momenta, keys, values, gates, clip_norm=rule.clip_norm,
                              bank=True, self_target=True)   # each generator its own M(v̄)

  gens, moms = jax.vmap(write)(gens, moms, *args)
  return gens, moms, hist


def _mem_write(rule: Rule, carry, args):
  """One chunk's writes of M_mem, per sequence and head."""
  if args is None:
    return carry

  def write(w, s, k, v, eta, log_alpha):
    return memory.write_chunk(w, s, k, v, rule.gates(eta, log_alpha), clip_norm=rule.clip_norm,
                              self_target=True)   # target M_mem(v)

  return memory.batched(write)(*carry, *args)


def _mem_scan(state: dict, q, k, v, eta, log_alpha, *, rule: Rule, chunk: int,
              write_gradient: bool):
  """M_mem per head over the segment: o_t = M_mem(q_t), then its writes; returns the
  outputs, M_mem's carry before its last chunk's write and that write's arguments."""
  def read(carry, xs):
    q, *args = xs
    return carry, memory.batched(memory.mlp_memory)(carry[0], q), (
        tuple(args) if rule.writes else None)

  carry, args, out = memory.scan_deferring_last_write(
      read, functools.partial(_mem_write, rule), (state["mem"], state["mem_momentum"]),
      (q, k, v, eta, log_alpha), chunk=chunk, axis=2, write_gradient=write_gradient)
  return out, carry, args


def mixer_reads(p: dict, state: dict, x: jax.Array, *, n_heads: int, rule: Rule, conv: str,
                gen_chunk: int, mem_chunk: int, write_gradient: bool):
  """Self-modifying Titans over a segment x [B, T, D] (T a multiple of both chunk sizes),
  its memories' last writes left pending.

  Returns (y [B, T, D] in x's dtype, `pending`): `finish_writes(pending)` is the state
  after the segment. y does not depend on the pending writes, so a gradient of y alone
  (HOPE's teach signal) skips them.
  """
  x32 = x.astype(jnp.float32)
  hist = dict(state["conv"])
  if conv == "before":
    x32, hist["x"] = layers.causal_depthwise_conv(x32, p["convs"]["x"], hist["x"])
  q_in = None
  if "w_q" in p:
    q_in = layers.kernel_matmul(p["w_q"], x).astype(jnp.float32)
    if conv == "before":
      q_in, hist["q"] = layers.causal_depthwise_conv(q_in, p["convs"]["q"], hist["q"])
  (q, k, v, eta, log_alpha), gen_carry, gen_args = _generator_scan(
      p, state, x32, q_in, n_heads=n_heads, rule=rule, conv=conv, chunk=gen_chunk,
      write_gradient=write_gradient)
  out, mem_carry, mem_args = _mem_scan(state, q, k, v, eta, log_alpha, rule=rule,
                                       chunk=mem_chunk, write_gradient=write_gradient)
  hist.update(gen_carry[2])
  pending = {"generators": (gen_carry, gen_args), "mem": (mem_carry, mem_args), "conv": hist}
  y = layers.rms_norm(p["out_norm"]["scale"], layers.merge_heads(out))
  return layers.kernel_matmul(p["w_o"], y.astype(x.dtype)), pending


def finish_writes(pending: dict, *, rule: Rule, write_gradient: bool) -> dict:
  """The state after a segment from `mixer_reads`' pending last writes."""
  gens, moms, _ = _generator_write(rule, *pending["generators"])
  mem, mem_momentum = _mem_write(rule, *pending["mem"])
  state = {"generators": gens, "gen_momentum": moms, "mem": mem, "mem_momentum": mem_momentum,
           "conv": pending["conv"]}
  return state if write_gradient else jax.lax.stop_gradient(state)


def mixer(p: dict, state: dict, x: jax.Array, *, n_heads: int, rule: Rule, conv: str,
          gen_chunk: int, mem_chunk: int, write_gradient: bool):
  """Self-modifying Titans over a segment x [B, T, D] (T a multiple of both chunk sizes).

  Returns (y [B, T, D] in x's dtype, the state after the segment).
  """
  y, pending = mixer_reads(p, state, x, n_heads=n_heads, rule=rule, conv=conv,
                           gen_chunk=gen_chunk, mem_chunk=mem_chunk,
                           write_gradient=write_gradient)
  return y, finish_writes(pending, rule=rule, write_gradient=write_gradient)
