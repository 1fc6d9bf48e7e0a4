"""Continuum Memory System: in-context levels fire only at multiples of their period (in
tokens), the teach signal is the gradient of the chunk's next-token loss, η = 0 is a plain
MLP, and the per-level pieces match direct references."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from nested import cms, models
from nested.errors import UserError

CHUNK = 8


def micro_hope(**kw):
  """HOPE-Attention (the cheapest mixer) with levels of period 8 and 16 tokens in context
  and one of 64 tokens beyond the 32-token context."""
  fields = dict(name="hope_attention", vocab_size=64, d_model=32, n_layers=2, n_heads=2,
                cms_hidden="16,16,16", cms_periods="8,16,64", context=32, chunk_size=CHUNK,
                cms_lr=0.1)
  return ml_collections.ConfigDict({**fields, **kw})


def test_level_optimizer_fires_every_period_on_the_summed_gradients():
  lr, period = 0.1, 4
  tx = cms.level_optimizer(lr, period)
  w = {"kernel": jnp.zeros((3,))}
  state = tx.init(w)
  update = jax.jit(tx.update)
  grads = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
  for step, g in enumerate(grads, start=1):
    u, state = update({"kernel": jnp.asarray(g)}, state, w)
    expected = -lr * grads[step - period:step].sum(0) if step % period == 0 else np.zeros(3)
    np.testing.assert_allclose(u["kernel"], expected, rtol=1e-5, atol=1e-7)


def test_clip_per_sequence_clips_each_sequence_on_its_own():
  rng = np.random.default_rng(1)
  g = {"a": jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float32),
       "b": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)}
  clipped = cms.clip_per_sequence(g, 1.5)
  tx = optax.clip_by_global_norm(1.5)
  for b in range(3):
    one = jax.tree.map(lambda x: x[b], g)
    expected, _ = tx.update(one, tx.init(one))
    for n in g:
      np.testing.assert_allclose(clipped[n][b], expected[n], rtol=1e-5, atol=1e-6)


def test_local_l2_gradient_matches_per_sequence_reference():
  rng = np.random.default_rng(2)
  d, f, b, c = 6, 5, 2, 4
  mlp = {n: {"kernel": jnp.asarray(rng.normal(size=(b, *s)) * 0.3, jnp.float32)}
         for n, s in (("w_gate", (d, f)), ("w_up", (d, f)), ("w_down", (f, d)))}
  scale = jnp.asarray(rng.normal(size=d), jnp.float32)
  h = jnp.asarray(rng.normal(size=(b, c, d)), jnp.float32)
  got = cms.local_l2_gradient(scale, mlp, h)

  def ref_loss(w, hb):  # one sequence, shared [d, f] kernels
    k = lambda n: w[n]["kernel"]
    n_ = hb / jnp.sqrt(jnp.mean(hb * hb, -1, keepdims=True) + 1e-6) * scale
    y = (jax.nn.silu(n_ @ k("w_gate")) * (n_ @ k("w_up"))) @ k("w_down")
    return jnp.mean(jnp.sum((y[:-1] - hb[1:]) ** 2, -1))

  for i in range(b):
    expected = jax.grad(ref_loss)(jax.tree.map(lambda x: x[i], mlp), h[i])
    for n in mlp:
      np.testing.assert_allclose(got[n]["kernel"][i], expected[n]["kernel"], rtol=1e-4,
                                 atol=1e-6)


def _model(cfg):
  graphdef, params = models.build(cfg, 0)
  return graphdef, params


def test_levels_change_only_at_multiples_of_their_period():
  graphdef, params = _model(micro_hope())
  model = nnx_merge(graphdef, params)
  tokens = np.random.default_rng(3).integers(0, 64, size=(2, 48))
  state = model.init_state(2)
  stream = jax.jit(lambda p, t, s: nnx_merge(graphdef, p).stream(t, s))
  assert len(state["fast"][0]) == 2  # the 64-token level is not updated in context
  previous = state["fast"]
  for end in range(CHUNK, 49, CHUNK):
    _, state = stream(params, tokens[:, end - CHUNK:end], state)
    for layer in range(2):
      for slot, period in enumerate((8, 16)):
        changed = any(not np.array_equal(a, b) for a, b in zip(
            jax.tree.leaves(previous[layer][slot]), jax.tree.leaves(state["fast"][layer][slot])))
        assert changed == (end % period == 0), (end, layer, period)
    previous = state["fast"]


def test_zero_inner_learning_rate_is_a_plain_mlp():
  tokens = np.random.default_rng(4).integers(0, 64, size=(2, 32))
  g0, p0 = _model(micro_hope(cms_lr=0.0))
  g1, p1 = _model(micro_hope(cms_lr=0.0, context=4))   # no level in context: plain MLPs
  a = models.apply_fn(g0)(p0, tokens)
  b = models.apply_fn(g1)(p1, tokens)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lookahead", [True, False])
def test_teach_signal_is_the_gradient_of_the_chunk_next_token_loss(lookahead):
  """After the first chunk, level 1 (period 8) holds W − η clip(∇_W L(W)), L the chunk's
  next-token loss Σ_t NLL(target_t) / C over its C positions: with the next chunk's first
  token known (lookahead) that includes the boundary pair, else it has C − 1 terms."""
  lr, clip = 0.1, 1.0
  cfg = micro_hope(cms_lr=lr, inner_clip=clip, cms_periods="8,64,64")
  graphdef, params = _model(cfg)
  tokens = np.random.default_rng(5).integers(0, 64, size=(1, CHUNK + 1))
  model = nnx_merge(graphdef, params)
  _, state = model.stream(jnp.asarray(tokens[:, :CHUNK]), model.init_state(1),
                          jnp.asarray(tokens[:, CHUNK]) if lookahead else None)

  static_graph, _ = _model(micro_hope(cms_lr=lr, inner_clip=clip, cms_periods="64,64,64"))
  apply = models.apply_fn(static_graph)
  pairs = CHUNK if lookahead else CHUNK - 1

  def chunk_nll(level_weights, layer):
    p = jax.tree.map(lambda x: x, params)
    p["layers"][layer]["cms"][0]["mlp"] = level_weights
    logits = apply(p, tokens[:, :CHUNK])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[0, :pairs]),
                               jnp.asarray(tokens[0, 1:pairs + 1])[:, None], axis=-1)
    return jnp.sum(nll) / CHUNK

  for layer in range(2):
    w = params["layers"][layer]["cms"][0]["mlp"]
    g = jax.grad(chunk_nll)(w, layer)
    norm = jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g)))
    g = jax.tree.map(lambda x: x * jnp.minimum(1.0, clip / norm), g)
    expected = jax.tree.map(lambda x, y: x - lr * y, w, g)
    got = jax.tree.map(lambda x: x[0], state["fast"][layer][0])
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(w)[0])


def nnx_merge(graphdef, params):
  return nnx.merge(graphdef, params)


@pytest.mark.parametrize("bad", [dict(cms_periods="8,12,64"), dict(cms_hidden="16,16")])
def test_bad_cms_config_is_a_user_error(bad):
  with pytest.raises(UserError):
    models.model_config(micro_hope(**bad))
