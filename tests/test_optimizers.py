"""Tests for nested.optimizers: each transform against a hand-written numpy reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nested import levels, optimizers
from nested.errors import UserError

# Both orientations of a kernel (in < out and in > out) and a leaf that is not 2-D.
SHAPES = {"w": (4, 6), "v": (7, 3), "b": (5,)}
NS = (3.4445, -4.7750, 2.0315)


def _rng():
  return np.random.default_rng()


def _tree(rng, shapes=SHAPES):
  return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def _maybe_jit(fn, jit):
  return jax.jit(fn) if jit else fn


def _assert_tree_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert set(actual) == set(expected)
  for k in expected:
    np.testing.assert_allclose(np.asarray(actual[k], np.float64), expected[k], rtol=rtol,
                               atol=atol, err_msg=k)


def _assert_close_to_matrix_scale(actual, expected, rel=2e-5, scale=None):
  """Compares actual·scale to expected·scale within `rel` of the leaf's largest entry.

  Float32 Newton–Schulz is accurate to ~5e-6 of a matrix's largest entry, not per entry:
  entries near zero carry the same absolute error.
  """
  assert set(actual) == set(expected)
  for k in expected:
    s = 1.0 if scale is None else scale[k]
    a, e = np.asarray(actual[k], np.float64) * s, np.asarray(expected[k], np.float64) * s
    np.testing.assert_allclose(a, e, rtol=0, atol=rel * np.abs(e).max(), err_msg=k)


def _np_newton_schulz(g, steps=5, eps=1e-7):
  x = np.asarray(g, np.float64)
  tall = x.shape[0] > x.shape[1]
  x = x.T if tall else x
  x = x / (np.linalg.norm(x) + eps)
  a, b, c = NS
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if tall else x


# ----------------------------------------------------------------------------- momentum


@pytest.mark.parametrize("jit", [False, True])
def test_momentum_equals_optax_sgd_with_momentum(jit):
  rng = _rng()
  lr, alpha = rng.uniform(0.01, 0.2), rng.uniform(0.5, 0.95)
  ours, ref = optimizers.momentum(lr, alpha), optax.sgd(lr, momentum=alpha)
  params = _tree(rng)
  state, ref_state = ours.init(params), ref.init(params)
  update, ref_update = _maybe_jit(ours.update, jit), _maybe_jit(ref.update, jit)
  for _ in range(6):
    grads = _tree(rng)
    updates, state = update(grads, state, params)
    expected, ref_state = ref_update(grads, ref_state, params)
    _assert_tree_close(updates, {k: np.asarray(v, np.float64) for k, v in expected.items()})


def test_momentum_keeps_each_gradients_scheduled_rate():
  rng = _rng()
  alpha = rng.uniform(0.5, 0.95)
  schedule = lambda count: 0.1 / (1.0 + count)
  tx = optimizers.momentum(schedule, alpha)
  params = _tree(rng)
  state = tx.init(params)
  m = {k: np.zeros(v.shape) for k, v in params.items()}
  for t in range(5):
    grads = _tree(rng)
    updates, state = jax.jit(tx.update)(grads, state)
    m = {k: alpha * m[k] - 0.1 / (1.0 + t) * grads[k] for k in m}
    _assert_tree_close(updates, m)


def test_preconditioned_momentum_matches_numpy():
  rng = _rng()
  lr, alpha, b2, eps = 0.05, rng.uniform(0.5, 0.95), rng.uniform(0.9, 0.999), 1e-8
  tx = optimizers.preconditioned_momentum(lr, alpha, b2=b2, eps=eps)
  params = _tree(rng)
  state = tx.init(params)
  m = {k: np.zeros(v.shape) for k, v in params.items()}
  v = {k: np.zeros(p.shape) for k, p in params.items()}
  for t in range(1, 6):
    grads = _tree(rng)
    updates, state = jax.jit(tx.update)(grads, state)
    for k, g in grads.items():
      v[k] = b2 * v[k] + (1 - b2) * np.float64(g) ** 2
      m[k] = alpha * m[k] - lr * g / (np.sqrt(v[k] / (1 - b2**t)) + eps)
    _assert_tree_close(updates, m, rtol=1e-4)


def test_delta_momentum_matches_numpy():
  rng = _rng()
  lr, alpha = 0.05, rng.uniform(0.5, 0.95)
  tx = optimizers.delta_momentum(lr, alpha)
  params = _tree(rng)
  state = tx.init(params)
  m = {k: np.zeros(v.shape) for k, v in params.items()}
  for _ in range(6):
    grads = _tree(rng)
    updates, state = jax.jit(tx.update)(grads, state)
    for k, g in grads.items():
      g = np.float64(g)
      if g.ndim == 2:
        decay = alpha * np.eye(g.shape[0]) - g @ g.T / np.sum(g * g)   # [in, in]
        m[k] = decay @ m[k] - lr * g
      else:
        m[k] = alpha * m[k] - lr * g
    _assert_tree_close(updates, m, rtol=1e-4, atol=1e-6)


def test_delta_momentum_zero_gradient_only_decays():
  params = {"w": np.ones((3, 5), np.float32)}
  tx = optimizers.delta_momentum(0.1, 0.5)
  state = tx.init(params)
  _, state = tx.update({"w": np.ones((3, 5), np.float32)}, state)
  updates, _ = tx.update({"w": np.zeros((3, 5), np.float32)}, state)
  np.testing.assert_allclose(updates["w"], 0.5 * np.asarray(state.momentum["w"]))


# ----------------------------------------------------------------------------- DMGD


def _np_dmgd_step(g, b, mlp, lr, alpha, inner_lr):
  w_in, bias, w_out = mlp
  g = np.float64(g)
  rms = np.sqrt(np.mean(g * g))
  z = (g / rms).reshape(-1, 1)
  h = np.tanh(z * w_in + bias)                           # [size, hidden]
  sech2 = 1 - h**2
  d_w_out = np.mean(h * z, axis=0)
  d_w_in = np.mean(w_out * sech2 * z * z, axis=0)
  d_bias = np.mean(w_out * sech2 * z, axis=0)
  w_in, bias, w_out = (alpha * w_in - inner_lr * d_w_in, alpha * bias - inner_lr * d_bias,
                       alpha * w_out - inner_lr * d_w_out)
  b = alpha * b - lr * g
  s = (np.tanh(z * w_in + bias) @ w_out).reshape(g.shape)
  return b + lr * rms * s, b, (w_in, bias, w_out)


def test_deep_momentum_matches_numpy_inner_update():
  rng = _rng()
  lr, alpha, hidden, inner_lr = 0.05, rng.uniform(0.5, 0.95), 3, 0.5
  tx = optimizers.deep_momentum(lr, alpha, hidden=hidden, inner_lr=inner_lr)
  params = _tree(rng)
  state = tx.init(params)
  bias = (np.arange(hidden) + 0.5) * 2 / hidden - 1
  mlp = {k: (2.0**bias, bias, np.zeros(hidden)) for k in params}
  b = {k: np.zeros(v.shape) for k, v in params.items()}
  for _ in range(5):
    grads = _tree(rng)
    updates, state = jax.jit(tx.update)(grads, state)
    expected = {}
    for k, g in grads.items():
      expected[k], b[k], mlp[k] = _np_dmgd_step(g, b[k], mlp[k], lr, alpha, inner_lr)
    _assert_tree_close(updates, expected, rtol=1e-4, atol=1e-6)
  # The shared MLP did learn something: DMGD is not plain momentum here.
  assert all(np.abs(np.asarray(state.mlp[k].w_out)).max() > 1e-3 for k in params)


# ----------------------------------------------------------------------------- Newton–Schulz


def test_newton_schulz_orthogonalises_and_scales():
  rng = _rng()
  g = rng.normal(size=(8, 32)).astype(np.float32)
  out = optimizers.newton_schulz()
  orth, _ = out.update({"w": g, "t": g.T, "b": g[0]}, out.init(None))
  for x in (orth["w"], orth["t"].T):
    singular = np.linalg.svd(np.asarray(x), compute_uv=False)
    assert singular.min() > 0.6 and singular.max() < 1.25, singular
  np.testing.assert_array_equal(orth["b"], g[0])
  scaled, _ = optimizers.newton_schulz(update_rms=0.2).update({"w": g}, optax.EmptyState())
  np.testing.assert_allclose(scaled["w"], orth["w"] * 0.2 * np.sqrt(32), rtol=1e-6)


@pytest.mark.parametrize("nesterov,weight_decay", [(False, 0.0), (True, 0.1)])
def test_muon_matches_numpy_newton_schulz(nesterov, weight_decay):
  rng = _rng()
  lr, mu, b1, b2, eps = 0.02, rng.uniform(0.8, 0.95), 0.9, 0.95, 1e-8
  tx = optimizers.muon(lr, momentum=mu, nesterov=nesterov, weight_decay=weight_decay)
  params = _tree(rng)
  state = tx.init(params)
  update = jax.jit(tx.update)
  ref_params = {k: np.float64(v) for k, v in params.items()}
  m = {k: np.zeros(v.shape) for k, v in params.items()}
  nu = {k: np.zeros(v.shape) for k, v in params.items()}
  for t in range(1, 5):
    grads = _tree(rng)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    expected = {}
    for k, g in grads.items():
      g = np.float64(g)
      if g.ndim == 2:
        m[k] = mu * m[k] + g
        direction = _np_newton_schulz(g + mu * m[k] if nesterov else m[k])
        direction = direction * 0.2 * np.sqrt(max(g.shape))
      else:   # Adam for leaves that are not matrices
        m[k] = b1 * m[k] + (1 - b1) * g
        nu[k] = b2 * nu[k] + (1 - b2) * g**2
        direction = (m[k] / (1 - b1**t)) / (np.sqrt(nu[k] / (1 - b2**t)) + eps)
      expected[k] = -lr * (direction + weight_decay * ref_params[k])
      ref_params[k] = ref_params[k] + expected[k]
    _assert_close_to_matrix_scale(updates, expected)


# ----------------------------------------------------------------------------- DGD


def test_dgd_step_is_the_spec_update_for_unit_inputs():
  rng = _rng()
  d_in, d_out, lr = 5, 3, rng.uniform(0.1, 2.0)
  w = rng.normal(size=(d_in, d_out)).astype(np.float32)
  x = rng.normal(size=d_in)
  x = (x / np.linalg.norm(x)).astype(np.float32)
  grad_y = rng.normal(size=d_out).astype(np.float32)
  ours = jax.jit(optimizers.dgd_step)(w, x, grad_y, lr)
  # SPEC, in the paper's [out, in] orientation: W ← W (I − η' x xᵀ) − η' ∇_y L ⊗ x.
  eta = lr / (1 + lr)
  w_paper = np.float64(w).T
  expected = w_paper @ (np.eye(d_in) - eta * np.outer(x, x)) - eta * np.outer(grad_y, x)
  np.testing.assert_allclose(np.asarray(ours).T, expected, rtol=1e-5, atol=1e-6)


def test_dgd_step_is_the_proximal_regression_step():
  rng = _rng()
  d_in, d_out, lr = 6, 4, rng.uniform(0.1, 2.0)
  w = rng.normal(size=(d_in, d_out))
  x = 3.0 * rng.normal(size=d_in)            # not unit-norm
  grad_y = rng.normal(size=d_out)
  ours = optimizers.dgd_step(*(a.astype(np.float32) for a in (w, x, grad_y)), lr)
  # argmin_V ½‖Vᵀx + ∇_y L‖² + ‖V − W‖²/(2η)  ⇔  (x xᵀ + I/η) V = W/η − x ∇_y Lᵀ.
  expected = np.linalg.solve(np.outer(x, x) + np.eye(d_in) / lr, w / lr - np.outer(x, grad_y))
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-5)


def test_delta_gradient_descent_equals_dgd_step_for_rank_one_gradients():
  rng = _rng()
  lr = rng.uniform(0.1, 1.0)
  w = rng.normal(size=(5, 3)).astype(np.float32)
  x = rng.normal(size=5)
  x = (x / np.linalg.norm(x)).astype(np.float32)
  delta = rng.normal(size=3).astype(np.float32)
  tx = optimizers.delta_gradient_descent(lr)
  updates, _ = tx.update({"w": np.outer(x, delta)}, tx.init({"w": w}), {"w": w})
  expected = optimizers.dgd_step(w, x, delta, lr) - w
  np.testing.assert_allclose(updates["w"], expected, rtol=1e-4, atol=1e-6)


def test_delta_gradient_descent_matches_numpy_loop():
  rng = _rng()
  schedule = lambda count: 0.3 * 0.8**count
  tx = optimizers.delta_gradient_descent(schedule)
  params = _tree(rng)
  state = tx.init(params)
  ref = {k: np.float64(v) for k, v in params.items()}
  for t in range(5):
    grads = _tree(rng)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    lr = 0.3 * 0.8**t
    expected = {}
    for k, g in grads.items():
      g = np.float64(g)
      if g.ndim == 2:
        eta = lr / (1 + lr)
        expected[k] = -eta * ((g @ g.T / np.sum(g * g)) @ ref[k] + g)
      else:
        expected[k] = -lr * g
      ref[k] = ref[k] + expected[k]
    _assert_tree_close(updates, expected, rtol=1e-4, atol=1e-6)


def test_delta_gradient_descent_needs_params():
  tx = optimizers.delta_gradient_descent(0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update({"w": np.ones((2, 2), np.float32)}, tx.init(None))


# ----------------------------------------------------------------------------- M3


def test_m3_matches_numpy_algorithm_1_and_holds_the_slow_momentum():
  rng = _rng()
  f = int(rng.integers(2, 5))
  lr, b1, b2, b3, alpha, eps = 0.01, 0.9, 0.99, rng.uniform(0.5, 0.9), rng.uniform(0.2, 1.0), 1e-8
  tx = optimizers.m3(lr, b1=b1, b2=b2, b3=b3, alpha=alpha, slow_period=f, eps=eps)
  params = _tree(rng)
  state = tx.init(params)
  update = jax.jit(tx.update)
  zeros = lambda: {k: np.zeros(v.shape) for k, v in params.items()}
  m1, v, m2, o2, block = zeros(), zeros(), zeros(), zeros(), zeros()
  sigma = lambda m: _np_newton_schulz(m) if m.ndim == 2 else m
  for t in range(1, 3 * f + 1):
    grads = _tree(rng)
    held_output, held_m2 = state.slow_output, state.slow.inner_state.momentum
    updates, state = update(grads, state, params)
    expected, denominator = {}, {}
    for k, g in grads.items():
      g = np.float64(g)
      m1[k] = b1 * m1[k] + (1 - b1) * g
      v[k] = b2 * v[k] + (1 - b2) * g**2
      o1 = sigma(m1[k] / (1 - b1**t))
      denominator[k] = np.sqrt(v[k] / (1 - b2**t)) + eps
      expected[k] = -lr * (o1 + alpha * o2[k]) / denominator[k]
      block[k] = block[k] + g
    # Compared before the division by sqrt(V̂), where Newton–Schulz's error is uniform.
    _assert_close_to_matrix_scale(updates, expected, scale=denominator)
    if t % f == 0:    # the slow level fires: its momentum and output move, then are held
      for k in grads:
        m2[k] = b3 * m2[k] + (1 - b3) * block[k]
        o2[k] = sigma(m2[k])
      block = zeros()
    for k in grads:
      changed = not np.array_equal(np.asarray(state.slow_output[k]), np.asarray(held_output[k]))
      m2_changed = not np.array_equal(np.asarray(state.slow.inner_state.momentum[k]),
                                      np.asarray(held_m2[k]))
      assert changed == m2_changed == (t % f == 0), (t, k)
    _assert_close_to_matrix_scale(state.slow_output, o2)


# ----------------------------------------------------------------------------- all of them

# A learning rate per registered optimizer, for the regression below.
_REGRESSION_LR = {
    "adamw": 0.05, "adam": 0.05, "sgd": 0.05, "momentum": 0.02,
    "preconditioned_momentum": 0.005, "delta_momentum": 0.02, "deep_momentum": 0.02,
    "muon": 0.05, "dgd": 0.05, "m3": 0.01,
}


def test_every_registered_optimizer_has_a_regression_check():
  assert set(_REGRESSION_LR) == set(optimizers.OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(_REGRESSION_LR))
def test_registered_optimizer_lowers_least_squares_loss(name):
  rng = np.random.default_rng(0)   # a fixed problem: m3 at its lr misses 0.25x on some draws
  x = rng.normal(size=(64, 8)).astype(np.float32)
  y = x @ rng.normal(size=(8, 4)) + 0.1 * rng.normal(size=(64, 4)) + 1.0
  params = {"w1": rng.normal(size=(8, 16)) / np.sqrt(8), "w2": rng.normal(size=(16, 4)) / 4,
            "b": np.zeros(4)}
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  loss = lambda p: jnp.mean((x @ p["w1"] @ p["w2"] + p["b"] - y) ** 2)
  tx = optimizers.from_config(ml_collections.ConfigDict(dict(name=name)), _REGRESSION_LR[name])

  @jax.jit
  def train(params):
    def step(carry, _):
      params, state = carry
      grads = jax.grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=100)
    return params

  initial, final = float(loss(params)), float(loss(train(params)))
  assert np.isfinite(final) and final < 0.25 * initial, (initial, final)


def test_optimizers_inside_a_nested_learner_equal_them_alone():
  rng = _rng()
  params = {"a": _tree(rng, {"w": (4, 6), "b": (6,)}), "c": _tree(rng, {"w": (6, 3)})}
  learner = levels.nested_learner([
      levels.Level("slow", "^a/", optimizers.m3(0.01, slow_period=2), period=2),
      levels.Level("muon", "^c/", optimizers.muon(0.02), period=1)])
  alone = {"a": levels.every(optimizers.m3(0.01, slow_period=2), 2), "c": optimizers.muon(0.02)}
  state = learner.init(params)
  alone_states = {k: tx.init(params[k]) for k, tx in alone.items()}
  for _ in range(5):
    grads = {"a": _tree(rng, {"w": (4, 6), "b": (6,)}), "c": _tree(rng, {"w": (6, 3)})}
    updates, state = jax.jit(learner.update)(grads, state, params)
    for k, tx in alone.items():
      expected, alone_states[k] = jax.jit(tx.update)(grads[k], alone_states[k], params[k])
      for leaf in expected:
        np.testing.assert_allclose(updates[k][leaf], expected[leaf], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- from_config


def test_from_config_passes_hyperparameters():
  rng = _rng()
  cfg = ml_collections.ConfigDict(dict(name="momentum", alpha=0.5))
  tx = optimizers.from_config(cfg, 0.1)
  grads = _tree(rng)
  state = tx.init(grads)
  _, state = tx.update(grads, state)
  updates, _ = tx.update(grads, state)
  _assert_tree_close(updates, {k: -0.1 * 1.5 * np.float64(g) for k, g in grads.items()})


def test_from_config_unknown_name_lists_the_valid_ones():
  with pytest.raises(UserError, match="'adamx'") as e:
    optimizers.from_config(ml_collections.ConfigDict(dict(name="adamx")), 1e-3)
  assert all(name in str(e.value) for name in optimizers.OPTIMIZERS)
  with pytest.raises(UserError, match="'name'"):
    optimizers.from_config(ml_collections.ConfigDict(dict(b1=0.9)), 1e-3)


def test_from_config_unknown_hyperparameter_lists_the_valid_ones():
  with pytest.raises(UserError, match="'beta1'") as e:
    optimizers.from_config(ml_collections.ConfigDict(dict(name="m3", beta1=0.9)), 1e-3)
  assert all(key in str(e.value) for key in optimizers.hyperparameters("m3"))


@pytest.mark.parametrize("key", ["learning_rate", "lr"])
def test_from_config_rejects_a_learning_rate_field(key):
  cfg = ml_collections.ConfigDict(dict(name="adamw", weight_decay=0.1, **{key: 1e-3}))
  with pytest.raises(UserError, match=f"'{key}'.*config.train.lr.*lr_scale"):
    optimizers.from_config(cfg, 1e-3)


def test_from_config_bad_value_is_a_user_error():
  with pytest.raises(UserError, match="slow_period"):
    optimizers.from_config(ml_collections.ConfigDict(dict(name="m3", slow_period=0)), 1e-3)


def test_adamw_decays_matrices_and_spares_vectors_unless_asked():
  rng = np.random.default_rng()
  params = {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  zeros = jax.tree.map(jnp.zeros_like, params)
  for decay_vectors in (False, True):
    opt = optimizers.from_config(
        ml_collections.ConfigDict(dict(name="adamw", weight_decay=0.5,
                                       decay_vectors=decay_vectors)), 0.1)
    updates, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.05 * np.asarray(params["kernel"]), rtol=1e-6)
    expected_scale = -0.05 * np.asarray(params["scale"]) if decay_vectors else 0.0
    np.testing.assert_allclose(updates["scale"], expected_scale, rtol=1e-6, atol=0)
