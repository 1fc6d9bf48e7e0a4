"""Associative memories and their in-context update rules (SPEC §2), chunk-parallel.

A memory is a residual 2-layer MLP over one head's d-dim vectors,

  M(z) = z + silu(z W_in) W_out,      W_in ∈ R^{d×h}, W_out ∈ R^{h×d}   (kernels are [in, out]),

written in context to store key → value pairs with the per-token loss ℓ_t(W) = ‖M(k_t) − v_t‖².

Chunk-parallel semantics (SPEC §2, "chunk-parallel training"). A sequence is split into
chunks of C tokens. Inside a chunk every read and every inner gradient uses the state W_0
at the end of the previous chunk; the chunk's tokens enter the write only through additive
statistics (a weighted gradient sum, a sum of log-retentions, a weighted Gram matrix), so
a chunk is one batched computation and only the chunk-to-chunk recurrence is sequential.
With C = 1 every rule below is exactly its token-by-token recurrence.

Each write rule is an optax transform (`titans_rule`, `dgd_rule`): `update(G, state, W,
**chunk_scalars)` maps the chunk's weighted gradient to the update of W, its state holds
the inner momentum, and inner-gradient clipping is chained in front. The rules act on one
memory; `jax.vmap` them over batch and heads.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nested import layers

Memory = dict  # {"w_in": [d, h], "w_out": [h, d]}


def mlp_memory(w: Memory, z: jax.Array) -> jax.Array:
  """M(z) = z + silu(z W_in) W_out for z [..., d]."""
  return z + jax.nn.silu(z @ w["w_in"]) @ w["w_out"]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def token_losses(w: Memory, keys: jax.Array, targets: jax.Array) -> jax.Array:
  """ℓ_t = ‖M(k_t) − v_t‖² for keys, targets [C, d]; returns [C]."""
  return jnp.sum(jnp.square(mlp_memory(w, keys) - targets), axis=-1)


def weighted_gradient(w: Memory, keys: jax.Array, targets: jax.Array,
                      weights: jax.Array) -> Memory:
  """G = Σ_t w_t ∇_W ℓ_t(W) at one state W, in one backward pass (a VJP with cotangent w).

  The targets are constants of the inner objective (the outer gradient may still flow
  through them: they are closed over, not stop-gradiented).
  """
  _, vjp = jax.vjp(lambda m: token_losses(m, keys, targets), w)
  return vjp(weights.astype(keys.dtype))[0]


def clip_inner_gradient(max_norm: float) -> optax.GradientTransformation:
  """Clips each memory's inner gradient to global norm `max_norm` (0 = off).

  Unbounded inner steps are a known failure of Titans at long context (SPEC §3, stability).
  """
  return optax.clip_by_global_norm(max_norm) if max_norm > 0 else optax.identity()


class MomentumState(NamedTuple):
  momentum: Any  # S, like the memory's weights


def _zeros_like(tree):
  return jax.tree.map(jnp.zeros_like, tree)


def titans_rule(*, clip_norm: float) -> optax.GradientTransformationExtraArgs:
  """Titans' (LMM) write with momentum and forgetting, on one chunk (SPEC §2, Titans).

  Token form (Titans' naming: θ step size, β momentum decay, α forget gate):
    S_t = β_t S_{t−1} − θ_t ∇ℓ_t(M_{t−1}),     M_t = (1 − α_t) M_{t−1} + S_t.
  Chunk form, gradients at the chunk-start state M_0:
    S = B S_prev − G,  M = A M_0 + S,   G = Σ_t θ_t ∇ℓ_t(M_0), B = Π_t β_t, A = Π_t (1 − α_t).

  `update(G, state, M, *, momentum_decay=B, retention=A)` returns M_new − M_0.
  """

  def init_fn(params):
    return MomentumState(_zeros_like(params))

  def update_fn(grads, state, params=None, *, momentum_decay, retention, **_):
    momentum = jax.tree.map(lambda s, g: momentum_decay * s - g, state.momentum, grads)
    updates = jax.tree.map(lambda w, s: (retention - 1.0) * w + s, params, momentum)
    return updates, MomentumState(momentum)

  return optax.chain(clip_inner_gradient(clip_norm),
                     optax.GradientTransformationExtraArgs(init_fn, update_fn))


def dgd_rule(*, clip_norm: float, momentum: float = 0.0) -> optax.GradientTransformationExtraArgs:
  """HOPE's self-modifying write: Delta Gradient Descent with weight decay (SPEC §2–3).

  Token form (column convention of SPEC): M_t = M_{t−1} (α_t I − η_t k_t k_tᵀ) − η_t ∇ℓ_t.
  For an MLP memory the (α I − η k kᵀ) factor right-multiplies the layer that consumes k
  (W_in; a left factor in our [in, out] kernels) and the other layer gets the plain α decay
  (SPEC §3). Chunk form, at the chunk-start state:
    Δ_in  = (A − 1) W_in − K W_in − G_in,      Δ_out = (A − 1) W_out − G_out,
    G = Σ_t η_t ∇ℓ_t(W_0),  K = Σ_t η_t k_t k_tᵀ,  A = Π_t α_t.
  With `momentum` = μ > 0 the write is S ← μ S + Δ, W ← W + S (the "momentum" ablation);
  μ = 0 applies Δ directly. Switching the DGD term off is K = 0; weight decay off is A = 1.

  `update(G, state, W, *, retention=A, gram=K)` returns the update of W.
  """

  def init_fn(params):
    return MomentumState(_zeros_like(params) if momentum else ())

  def update_fn(grads, state, params=None, *, retention, gram, **_):
    delta = {
        "w_in": (retention - 1.0) * params["w_in"] - gram @ params["w_in"] - grads["w_in"],
        "w_out": (retention - 1.0) * params["w_out"] - grads["w_out"],
    }
    if not momentum:
      return delta, state
    velocity = jax.tree.map(lambda s, d: momentum * s + d, state.momentum, delta)
    return velocity, MomentumState(velocity)

  return optax.chain(clip_inner_gradient(clip_norm),
                     optax.GradientTransformationExtraArgs(init_fn, update_fn))


def batched(fn, n: int = 2):
  """vmaps `fn` over `n` leading axes (batch, heads) of every argument."""
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


def chunks(x: jax.Array, size: int, axis: int) -> jax.Array:
  """Splits `axis` (length T, a multiple of `size`) into [T/size, ...] leading chunk axis."""
  length = x.shape[axis]
  if length % size:
    raise ValueError(f"length {length} is not a multiple of the chunk size {size}")
  x = jnp.moveaxis(x, axis, 0)
  x = x.reshape(length // size, size, *x.shape[1:])
  return jnp.moveaxis(x, 1, axis + 1)


def unchunk(x: jax.Array, axis: int) -> jax.Array:
  """Inverse of `chunks`: [N, ..., C (at axis+1), ...] → [..., N·C (at axis), ...]."""
  x = jnp.moveaxis(x, axis + 1, 1)
  x = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
  return jnp.moveaxis(x, 0, axis)


# ----------------------------------------------------------------------------- Titans (LMM)


class TitansState(NamedTuple):
  memory: Memory            # [B, H, ...] per sequence and head
  rule: Any                 # the rule's optax state (momentum), batched like `memory`


def titans_init_state(initial: Memory, batch: int, *, clip_norm: float) -> TitansState:
  """Every sequence starts from the learned initial memory (heads stacked on axis 0)."""
  memory = jax.tree.map(lambda w: jnp.broadcast_to(w, (batch, *w.shape)), initial)
  return TitansState(memory, batched(titans_rule(clip_norm=clip_norm).init)(memory))


def titans_scan(state: TitansState, q, k, v, step, momentum_decay, forget, *, chunk: int,
                clip_norm: float, write_gradient: bool = True):
  """Reads and writes a Titans memory over a segment, chunk by chunk (SPEC §2, Titans).

  Per chunk: o_t = M_0(q_t) (read at the chunk-start state, before the write), then the
  `titans_rule` write with G = Σ θ_t ∇ℓ_t(M_0; k_t, v_t), B = Π β_t, A = Π (1 − α_t).

  Args:
    state: `TitansState` at the segment start.
    q, k, v: [B, H, T, d]; step θ, momentum_decay β, forget α: [B, H, T].
    chunk: C, dividing T.
    write_gradient: False stops the outer gradient at every write.

  Returns:
    (outputs [B, H, T, d], the state after the segment).
  """
  rule = titans_rule(clip_norm=clip_norm)

  def write(memory, rule_state, k, v, step, decay, forget):
    grads = weighted_gradient(memory, k, v, step)
    updates, rule_state = rule.update(grads, rule_state, memory, momentum_decay=jnp.prod(decay),
                                      retention=jnp.prod(1.0 - forget))
    return optax.apply_updates(memory, updates), rule_state

  @jax.checkpoint
  def chunk_step(carry: TitansState, xs):
    # The in-context state, pinned on both sides of the step so that its placement is the
    # mesh's rule rather than whatever propagation finds.
    carry = layers.place(carry)
    q, k, v, step, decay, forget = xs
    out = batched(mlp_memory)(carry.memory, q)
    memory, rule_state = batched(write)(carry.memory, carry.rule, k, v, step, decay, forget)
    new = layers.place(TitansState(memory, rule_state))
    return (new if write_gradient else jax.lax.stop_gradient(new)), out

  xs = (chunks(q, chunk, 2), chunks(k, chunk, 2), chunks(v, chunk, 2), chunks(step, chunk, 2),
        chunks(momentum_decay, chunk, 2), chunks(forget, chunk, 2))
  state, out = jax.lax.scan(chunk_step, state, xs)
  return unchunk(out, 2), state


# ----------------------------------------------------------------------------- self-modifying


class SelfModState(NamedTuple):
  memories: dict            # name → Memory [B, H, ...]
  rule: dict                # name → `dgd_rule` state


def selfmod_init_state(initial: dict, batch: int, *, clip_norm: float,
                       momentum: float) -> SelfModState:
  memories = jax.tree.map(lambda w: jnp.broadcast_to(w, (batch, *w.shape)), initial)
  init = batched(dgd_rule(clip_norm=clip_norm, momentum=momentum).init)
  return SelfModState(memories, {name: init(m) for name, m in memories.items()})


def dgd_write(memory: Memory, rule_state, keys, values, eta, alpha, *, rule, use_dgd: bool,
              use_weight_decay: bool):
  """One chunk's self-modifying write of one memory (see `dgd_rule`).

  The memory makes its own target v̂_t = M_0(v_t) (SPEC §2), then
  G = Σ η_t ∇‖M(k_t) − v̂_t‖²(W_0), K = Σ η_t k_t k_tᵀ (0 without DGD), A = Π α_t (1 without
  weight decay).
  """
  targets = mlp_memory(memory, values)
  grads = weighted_gradient(memory, keys, targets, eta)
  gram = (keys * eta[:, None]).T @ keys if use_dgd else jnp.zeros((keys.shape[-1],) * 2,
                                                                    keys.dtype)
  retention = jnp.prod(alpha) if use_weight_decay else jnp.ones((), keys.dtype)
  updates, rule_state = rule.update(grads, rule_state, memory, retention=retention, gram=gram)
  return optax.apply_updates(memory, updates), rule_state


class Generated(NamedTuple):
  """What the generator memories produce for each token, [B, H, C, ·]."""
  keys: jax.Array
  values: jax.Array
  eta: jax.Array            # [B, H, C]
  alpha: jax.Array          # [B, H, C]
  queries: jax.Array | None


def generate(memories: dict, x: jax.Array, *, eta_bias, alpha_bias, eta_scale: float,
             adaptive_q: bool) -> Generated:
  """k_t = M_k(x_t), v_t = M_v(x_t), η_t, α_t, (q_t = M_q(x_t)) at the chunk-start states.

  q and k are L2-normalised; η_t = eta_scale · softplus(mean M_η(x_t) + b_η) (bounded
  step), α_t = sigmoid(mean M_α(x_t) + b_α) (SPEC §3). x: [B, H, C, d]; biases [H].
  """
  read = lambda name: batched(mlp_memory)(memories[name], x)
  eta = eta_scale * jax.nn.softplus(jnp.mean(read("eta"), -1) + eta_bias[:, None])
  alpha = jax.nn.sigmoid(jnp.mean(read("alpha"), -1) + alpha_bias[:, None])
  queries = l2_normalize(read("q")) if adaptive_q else None
  return Generated(l2_normalize(read("k")), read("v"), eta, alpha, queries)


GENERATORS = ("k", "v", "eta", "alpha")


def selfmod_scan(state: SelfModState, x: jax.Array, fixed_q: jax.Array | None, *, eta_bias,
                 alpha_bias, eta_scale: float, adaptive_q: bool, chunk: int, mem_chunk: int,
                 clip_norm: float, momentum: float, use_dgd: bool, use_weight_decay: bool,
                 write_gradient: bool = True):
  """Self-modifying Titans over a segment (SPEC §2, HOPE's sequence mixer), read before write.

  Two chunk sizes: the generator memories (k, v, η, α, and q when adaptive) write every
  `chunk` tokens; M_mem every `mem_chunk` tokens. M_mem's output feeds none of the
  generators, so the generators run first over the whole segment (one scan), then M_mem
  (a second scan) — exactly the interleaved recurrence.

  Args:
    state: `SelfModState` at the segment start.
    x: [B, H, T, d] per-head inputs; fixed_q: [B, H, T, d] normalised queries from the
      fixed projection (ignored when adaptive_q).

  Returns:
    (o [B, H, T, d], the state after the segment).
  """
  rule = dgd_rule(clip_norm=clip_norm, momentum=momentum)
  write = batched(lambda m, s, k, v, e, a: dgd_write(
      m, s, k, v, e, a, rule=rule, use_dgd=use_dgd, use_weight_decay=use_weight_decay))
  names = GENERATORS + (("q",) if adaptive_q else ())
  finish = (lambda s: s) if write_gradient else jax.lax.stop_gradient

  @jax.checkpoint
  def generator_step(carry, x):
    memories, rule_states = carry
    gen = generate(memories, x, eta_bias=eta_bias, alpha_bias=alpha_bias, eta_scale=eta_scale,
                   adaptive_q=adaptive_q)
    new = {n: write(memories[n], rule_states[n], gen.keys, gen.values, gen.eta, gen.alpha)
           for n in names}
    return finish(({n: m for n, (m, _) in new.items()}, {n: s for n, (_, s) in new.items()})), gen

  gen_memories = {n: state.memories[n] for n in names}
  gen_rules = {n: state.rule[n] for n in names}
  (gen_memories, gen_rules), gen = jax.lax.scan(generator_step, (gen_memories, gen_rules),
                                                chunks(x, chunk, 2))
  gen = jax.tree.map(lambda a: unchunk(a, 2), gen)
  queries = gen.queries if adaptive_q else fixed_q

  @jax.checkpoint
  def mem_step(carry, xs):
    memory, rule_state = carry
    q, k, v, eta, alpha = xs
    out = batched(mlp_memory)(memory, q)
    return finish(write(memory, rule_state, k, v, eta, alpha)), out

  xs = tuple(chunks(a, mem_chunk, 2) for a in (queries, gen.keys, gen.values, gen.eta, gen.alpha))
  (mem, mem_rule), out = jax.lax.scan(mem_step, (state.memories["mem"], state.rule["mem"]), xs)
  memories = {**gen_memories, "mem": mem}
  rules = {**gen_rules, "mem": mem_rule}
  return unchunk(out, 2), SelfModState(memories, rules)
