"""Self-modifying Titans (HOPE's mixer) against a token-by-token reference of SPEC §2.

The reference runs one sequence through a Python loop over tokens with two clocks: the
generators snapshot their states at the start of each generator chunk, M_mem at the start
of each of its chunks. Each token reads the snapshots (read before write), forms its keys,
values, queries and gates, and every memory then takes that token's step from the
equation, M ← M(αI − η k kᵀ) − η ∇‖M(k) − M(v)‖² (momentum: S ← μS − η∇, M ← M(αI − ηkkᵀ) + S),
its gradient from `jax.grad` at the snapshot.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nested import selfmod

B, T, D, HEADS, HID, W = 2, 16, 8, 2, 5, 4


def mlp_ref(w, z):
  return z + jax.nn.silu(z @ w["w_in"]) @ w["w_out"]


def unit(x):
  return x / jnp.sqrt(jnp.sum(x * x) + 1e-6)


@functools.partial(jax.jit, static_argnames=("clip", "momentum", "dgd"))
def dgd_token(w0, w, s, key, value, eta, alpha, *, clip, momentum, dgd):
  """One token's write of one memory, gradient at the snapshot w0 (target M_0(v))."""
  loss = lambda m: jnp.sum((mlp_ref(m, key) - mlp_ref(w0, value)) ** 2)
  g = jax.grad(loss)(w0)
  step = {n: eta * x for n, x in g.items()}
  norm = jnp.sqrt(sum(jnp.sum(x * x) for x in step.values()))
  if clip:
    step = {n: x * jnp.minimum(1.0, clip / norm) for n, x in step.items()}
  s = {n: momentum * s[n] - step[n] for n in step} if momentum else {n: -x for n, x in step.items()}
  erase = eta * jnp.outer(key, key) @ w["w_in"] if dgd else 0.0
  return {"w_in": alpha * w["w_in"] - erase + s["w_in"], "w_out": alpha * w["w_out"] + s["w_out"]}, s


def conv_ref(kernel, window):
  """y_t = Σ_j kernel[j] z_{t−W+1+j} for the window of the last W inputs (oldest first)."""
  return sum(kernel[j] * window[j] for j in range(len(kernel)))


def reference(p, x, *, rule, conv, gen_chunk, mem_chunk):
  """One sequence x [T, D] → (mixer output [T, D], generator and M_mem states after)."""
  gens = dict(p["generators"])
  mem = [{n: w[h] for n, w in p["mem"].items()} for h in range(HEADS)]
  zeros = lambda w: jax.tree.map(jnp.zeros_like, w)
  gen_s = {n: zeros(w) for n, w in gens.items()}
  mem_s = [zeros(w) for w in mem]
  windows = {n: [jnp.zeros(D)] * (W - 1) for n in p["convs"]}
  kw = dict(clip=rule.clip_norm, momentum=rule.momentum, dgd=rule.dgd)
  outs = []
  for t in range(T):
    if t % gen_chunk == 0:
      gen0 = dict(gens)
    if t % mem_chunk == 0:
      mem0 = list(mem)

    def convolve(name, z):
      windows[name] = windows[name][1 - W:] + [z]
      return conv_ref(p["convs"][name], windows[name])

    xt = convolve("x", x[t]) if conv == "before" else x[t]
    raw = {n: mlp_ref(gen0[n], unit(xt)) for n in gens}
    q = raw["q"] if "q" in raw else x[t] @ p["w_q"]["kernel"]
    k, v = raw["k"], raw["v"]
    if conv == "after":
      k, v, q = convolve("k", k), convolve("v", v), convolve("q", q)
    elif "q" in p["convs"]:
      q = convolve("q", q)
    dh = D // HEADS
    head = lambda z, h: z[h * dh:(h + 1) * dh]
    etas = [rule.eta_max * jax.nn.sigmoid(jnp.mean(head(raw["eta"], h)) + p["eta_bias"][h])
            for h in range(HEADS)]
    alphas = [jax.nn.sigmoid(jnp.mean(head(raw["alpha"], h)) + p["alpha_bias"][h])
              for h in range(HEADS)]
    if not rule.weight_decay:
      alphas = [1.0] * HEADS
    outs.append(jnp.concatenate([mlp_ref(mem0[h], unit(head(q, h))) for h in range(HEADS)]))
    eta_bar = sum(etas) / HEADS
    alpha_bar = jnp.exp(sum(jnp.log(a) for a in alphas) / HEADS)
    for n in gens:
      gens[n], gen_s[n] = dgd_token(gen0[n], gens[n], gen_s[n], unit(k), unit(v), eta_bar,
                                    alpha_bar, **kw)
    for h in range(HEADS):
      mem[h], mem_s[h] = dgd_token(mem0[h], mem[h], mem_s[h], unit(head(k, h)),
                                   unit(head(v, h)), etas[h], alphas[h], **kw)
  out = jnp.stack(outs)
  out = out / jnp.sqrt(jnp.mean(out * out, -1, keepdims=True) + 1e-6) * p["out_norm"]["scale"]
  return out @ p["w_o"]["kernel"], gens, mem


CASES = [  # (conv, gen_chunk, mem_chunk, adaptive_q, rule fields)
    ("after", 1, 1, False, dict()),                                  # the token recurrence
    ("after", 4, 16, False, dict(momentum=0.9)),
    ("after", 16, 4, True, dict(dgd=False, clip_norm=0.3)),
    ("before", 8, 8, False, dict(weight_decay=False)),
    ("before", 16, 16, True, dict(momentum=0.5, clip_norm=0.5)),
]


@pytest.mark.parametrize("conv,gen_chunk,mem_chunk,adaptive_q,fields", CASES)
def test_mixer_equals_the_token_recurrence(conv, gen_chunk, mem_chunk, adaptive_q, fields):
  rng = np.random.default_rng(gen_chunk * 100 + mem_chunk)
  module = selfmod.SelfModParams(D, HEADS, mem_hidden=HID, gen_hidden=HID, adaptive_q=adaptive_q,
                                 conv=conv, conv_width=W, out_stddev=0.2, dtype=jnp.float32,
                                 rngs=nnx.Rngs(0))
  p = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  # Random gates, conv taps and memories: nothing sits at its initial value.
  p = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape), jnp.float32), p)
  p["eta_bias"] = jnp.asarray(rng.uniform(-2.0, 0.0, HEADS), jnp.float32)
  p["alpha_bias"] = jnp.asarray(rng.uniform(1.0, 4.0, HEADS), jnp.float32)
  rule = selfmod.Rule(**{**dict(eta_max=0.5, clip_norm=0.0, momentum=0.0, dgd=True,
                                weight_decay=True), **fields})
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  state = selfmod.init_state(p, B, rule=rule, conv_width=W)
  y, final = jax.jit(functools.partial(selfmod.mixer, n_heads=HEADS, rule=rule, conv=conv,
                                       gen_chunk=gen_chunk, mem_chunk=mem_chunk,
                                       write_gradient=True))(p, state, x)
  for b in range(B):
    ref_y, ref_gens, ref_mem = reference(p, x[b], rule=rule, conv=conv, gen_chunk=gen_chunk,
                                         mem_chunk=mem_chunk)
    np.testing.assert_allclose(y[b], ref_y, rtol=2e-4, atol=2e-5)
    for i, n in enumerate(selfmod.generator_names(p)):
      for part, w in ref_gens[n].items():
        np.testing.assert_allclose(final["generators"][part][b, i], w, rtol=2e-4, atol=2e-5,
                                   err_msg=f"{n}/{part}")
    for h, w in enumerate(ref_mem):
      for part in w:
        np.testing.assert_allclose(final["mem"][part][b, h], w[part], rtol=2e-4, atol=2e-5,
                                   err_msg=f"mem/{part}/head {h}")
