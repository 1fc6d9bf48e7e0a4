"""Associative memories and their in-context write rules, chunk-parallel and exact (SPEC §2).

A memory is a residual 2-layer MLP,

  M(z) = z + silu(z W_in) W_out,      W_in ∈ R^{n×h}, W_out ∈ R^{h×n}   (kernels are [in, out]),

written in context to store key → target pairs with the per-token loss ℓ_t(W) = ‖M(k_t) − v_t‖².

**The token rule.** Every memory here is written by one recurrence, per token t,

  S_t = b_t S_{t−1} − s_t ∇ℓ_t                            (momentum; without it S_t = −s_t ∇ℓ_t)
  W_t = a_t W_{t−1} − e_t k_t k_tᵀ W_{t−1} + S_t           (the erase term only on W_in)

with s_t the step (clipped per token to `clip_norm`), a_t the retention, b_t the momentum
decay and e_t the erase strength. Titans (LMM): a = 1 − α, b = β, s = θ, no erase.
HOPE's DGD: a = α, e = η, s = η, so W_in ← (αI − η k kᵀ) W_in − η ∇ℓ (SPEC §2); its
momentum ablation adds a constant b = μ on the gradient term only, outside decay and erase.

**Chunk-parallel training** (SPEC §2; Titans §3.2). In a chunk of C tokens every read and
every inner gradient uses the state W_0 at the end of the previous chunk; only the
gradients are frozen there — retention, momentum and erase stay per token. Each token's
gradient is an outer product (∇_{W_in} ℓ_t = k_t δ_tᵀ, ∇_{W_out} ℓ_t = a_t e_tᵀ), so the C
steps of the recurrence collapse to C×C matrices of scalar decay products (cumulative
log-sums, every exponent ≤ 0) and, for the erase, one unit-lower-triangular solve (the UT
form of Π(I − β k kᵀ) used by chunkwise DeltaNet / Gated DeltaNet): see `decayed_write`.
The chunk form equals the token recurrence with chunk-start gradients; the chunk size is
a speed knob, and C = 1 is the plain token recurrence. The write rules are pure functions
of one memory; `batched` vmaps them over batch and heads.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from nested import layers

Memory = dict  # {"w_in": [n, h], "w_out": [h, n]}


def mlp_memory(w: Memory, z: jax.Array) -> jax.Array:
  """M(z) = z + silu(z W_in) W_out for z [..., n]."""
  return z + jax.nn.silu(z @ w["w_in"]) @ w["w_out"]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TokenGradients(NamedTuple):
  """∇ℓ_t for each token of a chunk as outer products: ∇_{W_in} = keys_t ⊗ d_pre_t,
  ∇_{W_out} = hidden_t ⊗ d_out_t; `sq_norm` = ‖∇ℓ_t‖² over both layers."""
  pre: jax.Array        # [C, h] keys W_in (the erase term reuses it)
  d_pre: jax.Array      # [C, h]
  hidden: jax.Array     # [C, h] silu(k W_in)
  d_out: jax.Array      # [C, n] 2 (M(k) − v)
  sq_norm: jax.Array    # [C]


def token_gradients(w: Memory, keys: jax.Array, targets: jax.Array, *,
                    self_target: bool = False) -> TokenGradients:
  """The gradient of ℓ_t = ‖M(k_t) − v_t‖² at W for every token (keys, targets [C, n]).

  Written out rather than taken by autodiff because the rule needs each token's gradient
  as factors (and its norm, for per-token clipping), never as a [C, n, h] tensor. The
  targets are constants of the inner loss; the outer gradient still flows through them.
  self_target: v_t = M(targets_t) at the same W (HOPE's self-generated values); the residual
  M(k) − M(v) = k − v + (silu(k W_in) − silu(v W_in)) W_out then takes one W_out product.
  """
  pre = keys @ w["w_in"]
  sig = jax.nn.sigmoid(pre)
  hidden = pre * sig
  if self_target:
    residual = keys - targets + (hidden - jax.nn.silu(targets @ w["w_in"])) @ w["w_out"]
  else:
    residual = keys + hidden @ w["w_out"] - targets
  d_out = 2.0 * residual
  d_pre = (d_out @ w["w_out"].T) * sig * (1.0 + pre * (1.0 - sig))   # silu'(pre)
  sq = lambda x: jnp.sum(x * x, axis=-1)
  return TokenGradients(pre, d_pre, hidden, d_out,
                        sq(keys) * sq(d_pre) + sq(hidden) * sq(d_out))


def clipped_step(step: jax.Array, sq_norm: jax.Array, max_norm: float) -> jax.Array:
  """s_t scaled so that each token's step s_t ∇ℓ_t has norm ≤ max_norm (0 = off).

  Unbounded inner steps are a known failure of Titans at long context (SPEC §3).
  """
  if max_norm <= 0:
    return step
  norm = step * jnp.sqrt(sq_norm)
  return step * jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))


def _masked_exp(diff: jax.Array, mask: jax.Array) -> jax.Array:
  # The inner `where` keeps exp away from the (positive) exponents outside the mask, so
  # neither the value nor its gradient ever sees an inf.
  return jnp.where(mask, jnp.exp(jnp.where(mask, diff, 0.0)), 0.0)


def _shift_down(x: jax.Array) -> jax.Array:
  """Row t of the result is row t − 1 of x (zeros for t = 0): "the state before token t"."""
  return jnp.concatenate([jnp.zeros_like(x[:1]), x[:-1]], axis=0)


def unit_lower_inverse(m: jax.Array) -> jax.Array:
  """The inverse of a unit lower-triangular matrix [n, n], by block forward substitution.

  Pairs of diagonal blocks are merged log2(n) times, inv([[A, 0], [B, D]]) =
  [[A⁻¹, 0], [−D⁻¹ B A⁻¹, D⁻¹]], as batched matmuls: no LAPACK call (XLA:CPU's triangular
  solve goes through it, and hung once inside a scan here) and tensor-core friendly.
  """
  n = m.shape[-1]
  size = 1 << max(n - 1, 0).bit_length()              # next power of two
  m = jnp.pad(m, ((0, size - n), (0, size - n))) + jnp.diag(
      (jnp.arange(size) >= n).astype(m.dtype))        # identity in the padding
  inv = jnp.ones((size, 1, 1), m.dtype)                # the 1×1 diagonal blocks' inverses
  block = 1
  while block < size:
    pairs = size // (2 * block)
    diag = jnp.diagonal(m.reshape(pairs, 2 * block, pairs, 2 * block), axis1=0, axis2=2)
    lower = jnp.moveaxis(diag, -1, 0)[:, block:, :block]          # B of each pair
    a, d = inv[0::2], inv[1::2]
    zeros = jnp.zeros_like(a)
    inv = jnp.concatenate([jnp.concatenate([a, zeros], axis=2),
                           jnp.concatenate([-d @ lower @ a, d], axis=2)], axis=1)
    block *= 2
  return inv[0, :n, :n]


class Decay(NamedTuple):
  """A chunk's scalar decay products, shared by every matrix written with the same gates.

  With Γ_t = Σ_{r≤t} log a_r and Λ_t = Σ_{r≤t} log b_r (t = 0..C−1):
    retain[t, s] = exp(Γ_t − Γ_s)                  (t ≥ s): W's own retention from s to t;
    reach[t, j]  = Σ_{j≤s≤t} retain[t, s] exp(Λ_s − Λ_j): the weight with which the step
                   made at j is in W_t (= retain without momentum);
    reach_s0[t]  = Σ_{s≤t} retain[t, s] exp(Λ_s): the weight of the carried momentum S_{−1}.
  Every exponent is ≤ 0, so nothing overflows whatever the gates.
  """
  gamma: jax.Array               # [C] Γ
  lam: jax.Array | None          # [C] Λ; None without momentum
  retain: jax.Array              # [C, C]
  reach: jax.Array               # [C, C]
  reach_s0: jax.Array | None     # [C]


def chunk_decay(log_retention: jax.Array, log_momentum: jax.Array | None) -> Decay:
  c = log_retention.shape[0]
  causal = jnp.tril(jnp.ones((c, c), bool))
  gamma = jnp.cumsum(log_retention)
  retain = _masked_exp(gamma[:, None] - gamma[None, :], causal)
  if log_momentum is None:
    return Decay(gamma, None, retain, retain, None)
  lam = jnp.cumsum(log_momentum)
  carry = _masked_exp(lam[:, None] - lam[None, :], causal)
  return Decay(gamma, lam, retain, retain @ carry, retain @ jnp.exp(lam))


class Erase(NamedTuple):
  """The erase −e_t x_t x_tᵀ W_{t−1} of a chunk, shared by the matrices whose rows are x."""
  gram: jax.Array                # [C, C] X Xᵀ
  solve: jax.Array               # [C, C] (I + diag(e) (retain' ⊙ X Xᵀ))⁻¹ diag(e)


def chunk_erase(decay: Decay, rows: jax.Array, erase: jax.Array) -> Erase:
  """With u_t = e_t W_{t−1}ᵀ x_t the erase makes W_t = (no-erase W_t) − Σ_{j≤t} retain[t, j]
  x_j u_jᵀ; expanding W_{t−1} gives the unit lower-triangular system
  (I + diag(e) (retain' ⊙ X Xᵀ)) U = diag(e) R, retain' = retain shifted one token down
  (the UT transform of chunkwise (Gated) DeltaNet)."""
  gram = rows @ rows.T
  system = jnp.eye(rows.shape[0], dtype=rows.dtype) + erase[:, None] * (
      _shift_down(decay.retain) * gram)
  return Erase(gram, unit_lower_inverse(system) * erase[None, :])


def decayed_write(w0: jax.Array, s0: jax.Array | None, rows: jax.Array, grads: jax.Array,
                  decay: Decay, erase: Erase | None = None,
                  rows_w0: jax.Array | None = None) -> tuple[jax.Array, jax.Array | None]:
  """C tokens of the memory recurrence for one matrix, in closed form.

  Token t = 0..C−1 adds the rank-1 step x_t g_tᵀ (rows x [C, n], grads g [C, m]):
    S_t = b_t S_{t−1} − x_t g_tᵀ                     (S_t = −x_t g_tᵀ without momentum)
    W_t = a_t W_{t−1} − e_t x_t x_tᵀ W_{t−1} + S_t   (no middle term without erase)
  so W_{C−1} = exp(Γ) W_0 + reach_s0 S_{−1} − Xᵀ (reach[−1] ⊙ G + retain[−1] ⊙ U), U
  from `chunk_erase` with R_t = exp(Γ_{t−1}) x_tᵀ W_0 + reach_s0_{t−1} x_tᵀ S_{−1} −
  Σ_{j<t} reach[t−1, j] (x_t·x_j) g_j.

  Args:
    w0: W_{−1} [n, m], the state at the chunk start; s0: S_{−1} (None without momentum).
    rows, grads: [C, n], [C, m]; decay: `chunk_decay`; erase: `chunk_erase` of these rows.
    rows_w0: X W_0 [C, m] when the caller has it (the inner gradient's forward computed it).

  Returns:
    (W_{C−1}, S_{C−1}) — S is None without momentum.
  """
  weights = decay.reach[-1][:, None] * grads          # each row's share of W_{C−1}
  if erase is not None:
    before = _shift_down                                   # the state before token t
    rows_w0 = rows @ w0 if rows_w0 is None else rows_w0
    rhs = jnp.exp(before(decay.gamma))[:, None] * rows_w0 - (
        before(decay.reach) * erase.gram) @ grads
    if s0 is not None:
      rhs = rhs + before(decay.reach_s0)[:, None] * (rows @ s0)
    weights = weights + decay.retain[-1][:, None] * (erase.solve @ rhs)
  # One product with Xᵀ for the gradient and erase terms together.
  out = jnp.exp(decay.gamma[-1]) * w0 - rows.T @ weights
  if s0 is not None:
    out = out + decay.reach_s0[-1] * s0
  if s0 is None:
    return out, None
  lam = decay.lam
  return out, jnp.exp(lam[-1]) * s0 - rows.T @ (jnp.exp(lam[-1] - lam)[:, None] * grads)


class Gates(NamedTuple):
  """Per-token coefficients of one memory's writes over a chunk, each [C] (or None)."""
  step: jax.Array                   # s_t, before clipping
  log_retention: jax.Array          # log a_t
  log_momentum: jax.Array | None    # log b_t; None = no momentum
  erase: jax.Array | None           # e_t on W_in; None = no erase term


def write_chunk(memory: Memory, momentum: Memory | None, keys: jax.Array, targets: jax.Array,
                gates: Gates, *, clip_norm: float, bank: bool = False,
                self_target: bool = False) -> tuple[Memory, Memory | None]:
  """One chunk's writes of one memory (module docstring), gradients at the chunk start.

  Args:
    memory: W_0 {"w_in", "w_out"}; momentum: S_0 like it, or None without momentum.
    keys, targets: [C, n].
    gates: the chunk's per-token coefficients.
    clip_norm: bound on each token's ‖s_t ∇ℓ_t‖ (0 = off).
    bank: `memory`, `momentum` and `targets` have a leading axis of M memories written with
      the same keys and gates (their decay products and erase solve are computed once).
    self_target: each memory's target is its own M(targets) at W_0 (HOPE, SPEC §2); with
      `bank`, the targets' inputs are shared by the bank and have no leading axis.

  Returns:
    (memory, momentum) after the chunk.
  """
  decay = chunk_decay(gates.log_retention, gates.log_momentum)
  erase = None if gates.erase is None else chunk_erase(decay, keys, gates.erase)

  def one(w, s, targets):
    g = token_gradients(w, keys, targets, self_target=self_target)
    step = clipped_step(gates.step, g.sq_norm, clip_norm)[:, None]
    s0 = (lambda name: None) if s is None else (lambda name: s[name])
    w_in, s_in = decayed_write(w["w_in"], s0("w_in"), keys, step * g.d_pre, decay, erase,
                               rows_w0=g.pre)
    w_out, s_out = decayed_write(w["w_out"], s0("w_out"), g.hidden, step * g.d_out, decay)
    return {"w_in": w_in, "w_out": w_out}, (None if s is None else {"w_in": s_in, "w_out": s_out})

  if not bank:
    return one(memory, momentum, targets)
  return jax.vmap(one, (0, 0, None if self_target else 0))(memory, momentum, targets)


def batched(fn: Callable, n: int = 2) -> Callable:
  """vmaps `fn` over `n` leading axes (e.g. batch, heads) of every argument."""
  for _ in range(n):
    fn = jax.vmap(fn)
  return fn


def broadcast_initial(initial: Any, batch: int) -> Any:
  """Every sequence starts from the learned (meta-learned, SPEC §2) initial state."""
  return jax.tree.map(lambda w: jnp.broadcast_to(w, (batch, *w.shape)), initial)


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


REMAT = ("chunk", "dots", "nested", "none")


def _group_size(n: int) -> int:
  """The divisor of n closest to √n: groups of that many chunks, that many groups."""
  return min((g for g in range(1, n + 1) if n % g == 0), key=lambda g: abs(g - math.sqrt(n)))


def scan_chunks(step: Callable, carry: Any, xs: Any, *, chunk: int, axis: int,
                remat: str, write_gradient: bool = True, unroll: int = 1) -> tuple[Any, Any]:
  """`lax.scan` of `step(carry, chunk_xs) -> (carry, ys)` over chunks of `chunk` along `axis`.

  remat (what the backward pass keeps of the N chunk steps):
    "chunk"   each step `jax.checkpoint`-ed: N carries, one step's activations at a time;
    "dots"    each step checkpointed saving its matrix products (`dots_saveable`): the
              backward pass recomputes only the elementwise work between them;
    "nested"  groups of g ≈ √N checkpointed steps, each group checkpointed: N/g + g carries,
              for one more forward pass (the two-level checkpointing of Chen et al. 2016);
    "none"    nothing recomputed: every step's activations kept (fastest, largest); also
              the choice inside a step that is itself checkpointed, where a second
              checkpoint would run its forward a third time.
  write_gradient: False stops the outer gradient at every write (SPEC §3 alternative).
  unroll: chunk steps per iteration of the compiled loop (`lax.scan`'s unroll; of the inner
    loop under "nested"). Unrolled steps pass their carry without the loop's copies into and
    out of its stacked residuals, for a longer compile; the values are the same.
  """
  if remat not in REMAT:
    raise ValueError(f"remat={remat!r}; choose one of {REMAT}")

  def body(carry, xs):
    # The in-context state, pinned on both sides of the step so that its placement is the
    # mesh's rule rather than whatever propagation finds.
    new, ys = step(layers.place(carry), xs)
    new = layers.place(new)
    return (new if write_gradient else jax.lax.stop_gradient(new)), ys

  xs = jax.tree.map(lambda x: chunks(x, chunk, axis), xs)
  if remat == "nested":
    n = jax.tree.leaves(xs)[0].shape[0]
    group = _group_size(n)
    grouped = jax.tree.map(lambda x: x.reshape(n // group, group, *x.shape[1:]), xs)

    @jax.checkpoint
    def group_body(carry, xs):
      return jax.lax.scan(jax.checkpoint(body), carry, xs, unroll=unroll)

    carry, ys = jax.lax.scan(group_body, carry, grouped)
    ys = jax.tree.map(lambda y: y.reshape(n, *y.shape[2:]), ys)
  else:
    if remat != "none":
      policy = jax.checkpoint_policies.dots_saveable if remat == "dots" else None
      body = jax.checkpoint(body, policy=policy)
    carry, ys = jax.lax.scan(body, carry, xs, unroll=unroll)
  return carry, jax.tree.map(lambda y: unchunk(y, axis), ys)


def scan_deferring_last_write(read: Callable, write: Callable, carry: Any, xs: Any, *,
                              chunk: int, axis: int, write_gradient: bool = True):
  """`scan_chunks` of `write ∘ read` over chunks of `chunk` along `axis`, except that the
  last chunk's write is returned undone: (carry before it, its arguments, every chunk's ys).

  read(carry, chunk_xs) -> (carry, ys, write_args); write(carry, write_args) -> carry.
  The last write only changes the state the next segment starts from, so a loss of these
  outputs alone (HOPE's teach signal) must not differentiate it: inside one scan it would,
  as the transpose of a scan runs its whole body even for carries without a cotangent.
  """
  length = jax.tree.leaves(xs)[0].shape[axis]
  cut = lambda x, start, stop: jax.lax.slice_in_dim(x, start, stop, axis=axis)
  last = jax.tree.map(lambda x: cut(x, length - chunk, length), xs)
  ys = None
  if length > chunk:
    def step(carry, xs):
      carry, ys, args = read(carry, xs)
      return write(carry, args), ys
    head = jax.tree.map(lambda x: cut(x, 0, length - chunk), xs)
    carry, ys = scan_chunks(step, carry, head, chunk=chunk, axis=axis, remat="none",
                            write_gradient=write_gradient)
  carry, last_ys, args = read(carry, last)
  if ys is not None:
    last_ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=axis), ys, last_ys)
  return carry, args, last_ys


# ----------------------------------------------------------------------------- Titans (LMM)


class TitansState(NamedTuple):
  memory: Memory            # [B, H, ...] per sequence and head
  momentum: Memory          # S, like `memory`


def titans_init_state(initial: Memory, batch: int) -> TitansState:
  """The learned initial memory (heads stacked on axis 0) for every sequence, S = 0."""
  memory = broadcast_initial(initial, batch)
  return TitansState(memory, jax.tree.map(jnp.zeros_like, memory))


def titans_scan(state: TitansState, q, k, v, step, log_momentum, log_retention, *, chunk: int,
                clip_norm: float, write_gradient: bool = True, writes: bool = True,
                remat: str = "chunk"):
  """Reads and writes a Titans memory over a segment, chunk by chunk (SPEC §2, Titans).

  Per token, with u_t = ∇ℓ_t at the chunk-start state M_0 (Titans' naming: θ step, β
  momentum decay, α forget gate):  o_t = M_0(q_t),  S_t = β_t S_{t−1} − θ_t u_t,
  M_t = (1 − α_t) M_{t−1} + S_t  — the chunk computed at once by `write_chunk`.

  Args:
    state: `TitansState` at the segment start.
    q, k, v: [B, H, T, d]; step θ, log_momentum log β, log_retention log(1 − α): [B, H, T].
    chunk: C, dividing T.
    write_gradient: False stops the outer gradient at every write.
    writes: False keeps the memory at its initial state (reads only): the memory-off control.
    remat: what the backward pass keeps of the chunk steps (`scan_chunks`).

  Returns:
    (outputs [B, H, T, d], the state after the segment).
  """
  def write(memory, momentum, k, v, step, log_b, log_a):
    return write_chunk(memory, momentum, k, v, Gates(step, log_a, log_b, None),
                       clip_norm=clip_norm)

  def chunk_step(carry: TitansState, xs):
    q, k, v, step, log_b, log_a = xs
    out = batched(mlp_memory)(carry.memory, q)
    if not writes:
      return carry, out
    return TitansState(*batched(write)(carry.memory, carry.momentum, k, v, step, log_b,
                                       log_a)), out

  state, out = scan_chunks(chunk_step, state, (q, k, v, step, log_momentum, log_retention),
                           chunk=chunk, axis=2, remat=remat, write_gradient=write_gradient)
  return out, state
