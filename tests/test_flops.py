"""The loop-aware FLOP counter (experiments/flops.py) against hand counts and against XLA's
own count of the same program with its loop unrolled."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from experiments import flops

B, D, STEPS = 4, 8, 10
# Per step: h @ W is 2·B·D·D multiply-adds, tanh one per element.
HAND = STEPS * (2 * B * D * D + B * D)


def step(h, w):
  return jnp.tanh(h @ w)


def args(b=B, d=D):
  return jnp.ones((b, d)), jnp.ones((d, d))


def test_a_scan_counts_its_body_times_its_length():
  def f(h, w):
    return lax.scan(lambda h, _: (step(h, w), None), h, None, length=STEPS)[0]
  assert flops.count(f, *args()) == HAND


def test_fori_loop_and_a_literal_while_count_their_trips():
  fori = lambda h, w: lax.fori_loop(0, STEPS, lambda i, h: step(h, w), h)
  assert flops.count(fori, *args()) == HAND + STEPS   # + the loop counter's increment
  # A while loop of fori's form, written out (the counter compare costs one FLOP a trip).
  def loop(h, w):
    return lax.while_loop(lambda c: c[0] < STEPS, lambda c: (c[0] + 1, step(c[1], w)),
                          (0, h))[1]
  assert flops.count(loop, *args()) == HAND + 2 * STEPS   # + the counter's add and compare


def test_cond_counts_its_costliest_branch_and_jit_its_inner_program():
  def f(h, w):
    return lax.cond(h[0, 0] > 0, lambda: jax.jit(step)(h, w), lambda: h + 1.0)
  assert flops.count(f, *args()) == 1 + HAND // STEPS   # the comparison, then the matmul branch


def test_a_data_dependent_loop_is_refused():
  def f(h, w):
    return lax.while_loop(lambda h: jnp.sum(h) < 100.0, lambda h: step(h, w) + 1.0, h)
  with pytest.raises(flops.UncountedLoop, match="trip count"):
    flops.count(f, *args())


def test_gradient_of_a_scan_matches_xla_on_the_unrolled_loop():
  """XLA counts a loop body once; unrolled, it counts every step: the reference."""
  h, w = args(16, 64)

  def loss(w, h, unroll):
    out = lax.scan(lambda h, _: (step(h, w), None), h, None, length=STEPS, unroll=unroll)[0]
    return jnp.sum(out ** 2)

  def xla(unroll):
    grad = jax.grad(loss, argnums=(0, 1))   # both: no cotangent is dead code once unrolled
    cost = jax.jit(grad, static_argnums=2).lower(w, h, unroll).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

  counted = flops.count(jax.grad(functools.partial(loss, unroll=1), argnums=(0, 1)), w, h)
  np.testing.assert_allclose(counted, xla(True), rtol=0.03)
  assert xla(1) < 0.3 * counted   # the rolled loop's body, counted once by XLA


def test_a_transformer_train_step_counts_what_the_palm_closed_form_gives(cache_dir):
  """6·N + 12·L·d·T per token (PaLM App. B), from the parameter shapes, is the step's matmul
  work; the count adds the elementwise ops and the optimizer, a few percent at this size. A
  step of two micro-batches (a scan) counts the same per token."""
  import math  # pylint: disable=g-import-not-at-top
  from conftest import micro_config  # pylint: disable=g-import-not-at-top
  from experiments import state as state_lib  # pylint: disable=g-import-not-at-top
  config = micro_config(cache_dir)
  counted = flops.train_step(config)
  params = state_lib.build(config).abstract_params
  n = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
  m = config.model
  palm = 6 * (n - m.vocab_size * m.d_model) + 12 * m.n_layers * m.d_model * config.train.seq_len
  assert 1.0 < counted["per_token"] / palm < 1.1
  assert counted["step"] == counted["per_token"] * config.train.batch_size * config.train.seq_len
  accumulated = flops.train_step(micro_config(cache_dir, **{"train.grad_accum": 2}))
  np.testing.assert_allclose(accumulated["per_token"], counted["per_token"], rtol=0.01)


def test_the_product_benchmark_states_the_flops_each_product_does():
  """experiments/bench_products.py reports GFLOP/s from the FLOPs it states for each product;
  the counter must agree, but for the write's scale and add of W (2 |W|), which it leaves out."""
  from experiments import bench_products
  for case in bench_products.cases():
    x = jax.ShapeDtypeStruct(case.x, "float32")
    w = tuple(jax.ShapeDtypeStruct(s, "float32") for s in case.w)
    elementwise = 2 * np.prod(case.w[0]) if case.product is bench_products.write else 0
    assert flops.count(case.product, x, w) == case.flops + elementwise, case.name
