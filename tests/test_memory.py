"""Memory write rules against token-by-token references written from SPEC §2's equations.

The references are Python loops over tokens: each token's gradient comes from `jax.grad` of
ℓ = ‖M(k) − v‖² at the chunk-start state (jitted and vmapped over batch and heads for speed,
nothing else), then momentum, decay, erase and clipping are applied to that token alone, as
the equations are written. No closed form, no cumulative products, no triangular solve.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nested import memory, selfmod

B, H, D, HID = 2, 2, 4, 6


def mlp_ref(w, z):
  return z + jax.nn.silu(z @ w["w_in"]) @ w["w_out"]


def loss_ref(w, key, target):
  return jnp.sum((mlp_ref(w, key) - target) ** 2)


@functools.partial(jax.jit, static_argnames=("clip", "momentum", "erase"))
def token_update(w0, w, s, key, target, step, retention, decay, erase_eta, *, clip, momentum,
                 erase):
  """One token of S_t = b S − u_t, W_t = a W − e k kᵀ W_in + S_t, u_t = s ∇ℓ(W_0) clipped."""
  g = jax.grad(loss_ref)(w0, key, target)
  u = {n: step * x for n, x in g.items()}
  norm = jnp.sqrt(sum(jnp.sum(x * x) for x in u.values()))
  if clip:
    u = {n: x * jnp.minimum(1.0, clip / norm) for n, x in u.items()}
  s = {n: (decay * s[n] if momentum else 0.0) - u[n] for n in u}
  w_in = retention * w["w_in"] + s["w_in"]
  if erase:
    w_in = w_in - erase_eta * jnp.outer(key, key) @ w["w_in"]
  return {"w_in": w_in, "w_out": retention * w["w_out"] + s["w_out"]}, s


def random_memory(rng, lead=(H,), dim=D, hidden=HID):
  return {"w_in": jnp.asarray(rng.normal(size=(*lead, dim, hidden)) / np.sqrt(dim), jnp.float32),
          "w_out": jnp.asarray(rng.normal(size=(*lead, hidden, dim)) * 0.3, jnp.float32)}


def uniform(rng, lo, hi, *shape):
  return jnp.asarray(rng.uniform(lo, hi, size=shape), jnp.float32)


# ----------------------------------------------------------------------------- one chunk


@pytest.mark.parametrize("momentum,erase,clip,self_target", [
    (False, False, 0.0, False), (False, True, 0.0, False), (True, False, 0.3, False),
    (True, True, 0.0, False), (True, True, 0.3, False), (False, True, 0.3, True),
    (True, True, 0.0, True)])
def test_write_chunk_equals_the_token_recurrence(momentum, erase, clip, self_target):
  """64 tokens with strong random gates (η up to 0.6, α down to 0.8, β down to 0.5), where a
  first-order chunk rule is off by tens of percent. self_target: the target of token t is
  M_0(v_t), the memory's own image of v_t at the chunk start (HOPE)."""
  rng = np.random.default_rng(int(momentum) * 4 + int(erase) * 2 + int(clip > 0))
  c = 64
  w0 = {n: x[0] for n, x in random_memory(rng).items()}
  s0 = {n: 0.1 * jnp.asarray(rng.normal(size=x.shape), jnp.float32) for n, x in w0.items()}
  keys = memory.l2_normalize(jnp.asarray(rng.normal(size=(c, D)), jnp.float32))
  targets = jnp.asarray(rng.normal(size=(c, D)), jnp.float32)
  step, a, b, e = (uniform(rng, 0.05, 0.5, c), uniform(rng, 0.8, 1.0, c),
                   uniform(rng, 0.5, 0.99, c), uniform(rng, 0.0, 0.6, c))
  gates = memory.Gates(step, jnp.log(a), jnp.log(b) if momentum else None, e if erase else None)
  got, got_s = jax.jit(functools.partial(memory.write_chunk, clip_norm=clip,
                                          self_target=self_target))(
      w0, s0 if momentum else None, keys, targets, gates)
  w, s = w0, s0
  for t in range(c):
    target = mlp_ref(w0, targets[t]) if self_target else targets[t]
    w, s = token_update(w0, w, s, keys[t], target, step[t], a[t], b[t], e[t], clip=clip,
                        momentum=momentum, erase=erase)
  moved = max(float(jnp.max(jnp.abs(w[n] - w0[n]))) for n in w)
  assert moved > 0.1   # the writes are large: equality below is not equality with w0
  for n in w:
    np.testing.assert_allclose(got[n], w[n], rtol=1e-4, atol=1e-5, err_msg=n)
    if momentum:
      np.testing.assert_allclose(got_s[n], s[n], rtol=1e-4, atol=1e-5, err_msg=n)


def test_momentum_with_zero_gradient_only_decays():
  """μ = 0.9 and no gradient (step 0): W ← α W per token, positive and shrinking; momentum
  must not act on the decay (a rule that did would overshoot and flip the sign)."""
  rng = np.random.default_rng(0)
  rule = selfmod.Rule(eta_max=1.0, clip_norm=0.0, momentum=0.9, dgd=False, weight_decay=True)
  w = {"w_in": jnp.ones((D, HID)), "w_out": jnp.ones((HID, D))}
  s = jax.tree.map(jnp.zeros_like, w)
  keys = memory.l2_normalize(jnp.asarray(rng.normal(size=(16, D)), jnp.float32))
  log_alpha = jnp.full((16,), np.log(0.993), jnp.float32)
  gates = rule.gates(jnp.zeros((16,)), log_alpha)
  ratios = []
  for _ in range(8):
    w, s = memory.write_chunk(w, s, keys, jnp.zeros((16, D)), gates, clip_norm=0.0)
    ratios.append(float(w["w_in"][0, 0]))
  np.testing.assert_allclose(ratios, 0.993 ** (16 * np.arange(1, 9)), rtol=1e-5)


def test_first_order_chunk_rule_is_not_the_recurrence():
  """The rule the chunk form replaced — (Πα − Σ η k kᵀ) W − Σ η ∇ℓ — is measurably different
  at these gates, so the equality tests above can tell the two apart."""
  rng = np.random.default_rng(5)
  c = 16
  w0 = {n: x[0] for n, x in random_memory(rng).items()}
  keys = memory.l2_normalize(jnp.asarray(rng.normal(size=(c, D)), jnp.float32))
  targets = jnp.asarray(rng.normal(size=(c, D)), jnp.float32)
  eta, alpha = uniform(rng, 0.05, 0.3, c), uniform(rng, 0.9, 1.0, c)
  exact, _ = memory.write_chunk(w0, None, keys, targets,
                                memory.Gates(eta, jnp.log(alpha), None, eta), clip_norm=0.0)
  grads = [jax.grad(loss_ref)(w0, keys[t], targets[t]) for t in range(c)]
  gram = sum(eta[t] * jnp.outer(keys[t], keys[t]) for t in range(c))
  first_order = jnp.prod(alpha) * w0["w_in"] - gram @ w0["w_in"] - sum(
      eta[t] * grads[t]["w_in"] for t in range(c))
  rel = float(jnp.linalg.norm(first_order - exact["w_in"]) / jnp.linalg.norm(exact["w_in"] -
                                                                            w0["w_in"]))
  assert rel > 0.05, rel


# ----------------------------------------------------------------------------- Titans


def titans_reference(w, q, k, v, theta, beta, alpha, *, clip, chunk):
  """One sequence and head: o_t = M_0(q_t); S_t = β_t S − θ_t u_t; M_t = (1−α_t) M + S_t."""
  m, s, outs = w, jax.tree.map(jnp.zeros_like, w), []
  for t in range(len(q)):
    if t % chunk == 0:
      m0 = m
    outs.append(mlp_ref(m0, q[t]))
    m, s = token_update(m0, m, s, k[t], v[t], theta[t], 1.0 - alpha[t], beta[t], 0.0, clip=clip,
                        momentum=True, erase=False)
  return jnp.stack(outs), m, s


@pytest.mark.parametrize("chunk,clip", [(1, 0.05), (4, 0.0), (16, 0.5), (64, 0.0)])
def test_titans_scan_equals_the_token_recurrence(chunk, clip):
  rng = np.random.default_rng(chunk)
  t = 128
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = random_memory(rng)
  q, k = memory.l2_normalize(f(B, H, t, D)), memory.l2_normalize(f(B, H, t, D))
  v = 0.5 * f(B, H, t, D)
  theta, beta, alpha = (uniform(rng, 0.02, 0.1, B, H, t), uniform(rng, 0.5, 0.95, B, H, t),
                        uniform(rng, 0.0, 0.1, B, H, t))
  state = memory.titans_init_state(w, B)
  out, final = jax.jit(functools.partial(memory.titans_scan, chunk=chunk, clip_norm=clip))(
      state, q, k, v, theta, jnp.log(beta), jnp.log1p(-alpha))
  assert float(jnp.max(jnp.abs(out))) < 10.0  # a stable regime, where equality means something
  for b in range(B):
    for h in range(H):
      ref_out, ref_m, ref_s = titans_reference(
          {n: x[h] for n, x in w.items()}, q[b, h], k[b, h], v[b, h], theta[b, h], beta[b, h],
          alpha[b, h], clip=clip, chunk=chunk)
      np.testing.assert_allclose(out[b, h], ref_out, rtol=2e-4, atol=2e-5)
      for n in ref_m:
        np.testing.assert_allclose(final.memory[n][b, h], ref_m[n], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(final.momentum[n][b, h], ref_s[n], rtol=2e-4, atol=2e-5)


def test_titans_chunk_size_changes_the_function():
  """Gradients at the chunk start are an approximation of the token rule: C = 1 and C = 8
  differ (so the equality above at each C is a real constraint)."""
  rng = np.random.default_rng(7)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = random_memory(rng)
  q, k, v = memory.l2_normalize(f(1, H, 16, D)), memory.l2_normalize(f(1, H, 16, D)), f(1, H, 16, D)
  gates = (uniform(rng, 0.1, 0.4, 1, H, 16), jnp.log(uniform(rng, 0.5, 0.9, 1, H, 16)),
           jnp.log(uniform(rng, 0.9, 1.0, 1, H, 16)))
  state = memory.titans_init_state(w, 1)
  one, _ = memory.titans_scan(state, q, k, v, *gates, chunk=1, clip_norm=0.0)
  eight, _ = memory.titans_scan(state, q, k, v, *gates, chunk=8, clip_norm=0.0)
  assert not np.allclose(one, eight, atol=1e-4)


@pytest.mark.parametrize("write_gradient", [True, False])
def test_titans_gradient_reaches_initial_state_only_through_writes(write_gradient):
  """The loss reads only chunks ≥ 1, so the initial memory matters only via the writes."""
  rng = np.random.default_rng(3)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = random_memory(rng)
  q, k, v = memory.l2_normalize(f(B, H, 8, D)), memory.l2_normalize(f(B, H, 8, D)), f(B, H, 8, D)
  gates = (uniform(rng, 0.1, 0.4, B, H, 8), jnp.log(uniform(rng, 0.5, 0.9, B, H, 8)),
           jnp.log(uniform(rng, 0.9, 1.0, B, H, 8)))

  def later_reads(w):
    out, _ = memory.titans_scan(memory.titans_init_state(w, B), q, k, v, *gates, chunk=4,
                                clip_norm=1.0, write_gradient=write_gradient)
    return jnp.sum(out[:, :, 4:] ** 2)

  norm = float(sum(jnp.sum(g * g) for g in jax.tree.leaves(jax.grad(later_reads)(w))))
  assert (norm > 1e-8) if write_gradient else (norm == 0.0), norm


@pytest.mark.parametrize("n", [1, 5, 16, 64])
def test_unit_lower_inverse(n):
  rng = np.random.default_rng(n)
  m = np.tril(rng.normal(size=(n, n)) * 0.3, -1) + np.eye(n)
  np.testing.assert_allclose(memory.unit_lower_inverse(jnp.asarray(m)), np.linalg.inv(m),
                             rtol=1e-4, atol=1e-5)


def test_each_remat_recomputes_what_it_names():
  """The backward pass of a chunk scan, counted: "chunk" runs every step's forward again,
  "dots" all of it but the matrix product (saved), "nested" two forwards, "none" nothing."""
  from experiments import flops  # pylint: disable=g-import-not-at-top
  b, d, length, c = 4, 8, 40, 4

  def loss(w, x, remat):
    def step(h, xs):
      h = jnp.tanh(h @ w + xs.sum(1))
      return h, h
    ys = memory.scan_chunks(step, jnp.zeros((b, d)), x, chunk=c, axis=1, remat=remat)[1]
    return jnp.sum(ys ** 2)

  def counted(remat):
    grad = jax.grad(functools.partial(loss, remat=remat))
    return flops.count(grad, jnp.ones((d, d)), jnp.ones((b, length, d)))

  steps = length // c
  product, rest = 2 * b * d * d, b * c * d + 2 * b * d   # h @ w; the sum, the add and tanh
  none = counted("none")
  assert counted("chunk") - none == steps * (product + rest)
  assert counted("dots") - none == steps * rest
  assert counted("nested") - none >= 2 * steps * (product + rest)
