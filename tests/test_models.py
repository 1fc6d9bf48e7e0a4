"""Transformer++ against independent numpy references, causality, and preset sizes."""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import transformer
from nested import layers, models
from nested.errors import UserError


def tiny_model_cfg(**kw):
  return ml_collections.ConfigDict(dict(name="transformer", vocab_size=61, d_model=32,
                                        n_layers=2, n_heads=4, d_ff=48, **kw))


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng().normal(size=(3, 5, 16)).astype(np.float32)
  norm = layers.RMSNorm(16)
  norm.scale[...] = np.random.default_rng().normal(size=16).astype(np.float32)
  expected = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(norm.scale[...])
  np.testing.assert_allclose(norm(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng()
  q, k = rng.normal(size=(2, 1, 1, 8)).astype(np.float32)
  score = lambda m, n: float(jnp.sum(layers.rope(jnp.asarray(q), jnp.array([m]), theta=100.0)
                                     * layers.rope(jnp.asarray(k), jnp.array([n]), theta=100.0)))
  # A sum of +-terms can land near 0: tolerances scale with the terms, not with the sum.
  scale = float(np.sum(np.abs(q * k)))
  np.testing.assert_allclose(score(3, 1), score(9, 7), rtol=1e-4, atol=1e-5 * scale)
  np.testing.assert_allclose(score(0, 0), float(np.sum(q * k)), rtol=1e-5, atol=1e-6 * scale)
  assert abs(score(3, 1) - score(3, 2)) > 1e-4


def test_attention_matches_numpy_causal_softmax():
  rng = np.random.default_rng()
  attn = layers.CausalSelfAttention(16, 2, out_stddev=0.1, rope_theta=10_000.0,
                                    dtype=jnp.float32, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  x = rng.normal(size=(2, 7, 16)).astype(np.float32)
  pos = jnp.arange(7)
  w = {n: np.asarray(getattr(attn, n).kernel[...]) for n in ("wq", "wk", "wv", "wo")}
  heads = lambda t: t.reshape(2, 7, 2, 8)
  q = np.asarray(layers.rope(jnp.asarray(heads(x @ w["wq"])), pos, theta=10_000.0))
  k = np.asarray(layers.rope(jnp.asarray(heads(x @ w["wk"])), pos, theta=10_000.0))
  v = heads(x @ w["wv"])
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
  scores = np.where(np.tril(np.ones((7, 7), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expected = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 7, 16) @ w["wo"]
  np.testing.assert_allclose(attn(jnp.asarray(x), pos), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_model_is_causal(tie):
  rng = np.random.default_rng()
  graphdef, params = models.build(tiny_model_cfg(tie_embeddings=tie), int(rng.integers(1 << 30)))
  apply = jax.jit(models.apply_fn(graphdef))
  tokens = rng.integers(0, 61, size=(2, 12))
  t = int(rng.integers(0, 11))
  changed = tokens.copy()
  changed[:, t + 1:] = (changed[:, t + 1:] + rng.integers(1, 60, size=changed[:, t + 1:].shape)) % 61
  a, b = apply(params, tokens), apply(params, changed)
  # XLA may reduce a different batch in another order: causal means equal to float noise.
  np.testing.assert_allclose(np.asarray(a[:, :t + 1]), np.asarray(b[:, :t + 1]), rtol=0,
                             atol=1e-5)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


def test_tied_embeddings_share_the_table():
  _, untied = models.abstract(tiny_model_cfg())
  _, tied = models.abstract(tiny_model_cfg(tie_embeddings=True))
  assert "unembed" in untied and "unembed" not in tied
  assert models.count_params(untied) - models.count_params(tied) == 61 * 32


def test_bfloat16_compute_tracks_float32():
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  tokens = rng.integers(0, 61, size=(2, 16))
  g32, p32 = models.build(tiny_model_cfg(), seed)
  g16, p16 = models.build(tiny_model_cfg(dtype="bfloat16"), seed)
  l32 = models.apply_fn(g32)(p32, tokens)
  l16 = models.apply_fn(g16)(p16, tokens)
  assert l16.dtype == jnp.float32 and jax.tree.leaves(p16)[0].dtype == jnp.float32
  rel = float(jnp.linalg.norm(l16 - l32) / jnp.linalg.norm(l32))
  assert 0 < rel < 3e-2


@pytest.mark.parametrize("preset", sorted(transformer.PRESETS))
def test_preset_parameter_count_matches_its_name(preset):
  config = transformer.get_config(preset)
  n = models.count_params(jax.eval_shape(lambda: models.init_params(config.model, 0)))
  expected = {"tiny": None, "small": 125e6, "760m": 760e6, "1p3b": 1.3e9}[preset]
  if expected is None:
    assert 0.5e6 < n < 2e6
  else:
    assert abs(n - expected) / expected <= 0.10, f"{preset}: {n / 1e6:.1f}M parameters"


def test_unknown_model_field_is_a_user_error():
  cfg = tiny_model_cfg()
  cfg.n_experts = 4
  with pytest.raises(UserError, match=re.escape("['n_experts']")):
    models.model_config(cfg)
  cfg = tiny_model_cfg()
  cfg.name = "mamba"
  with pytest.raises(UserError, match="transformer"):
    models.model_config(cfg)
