"""experiments/bench_ops.py: a traced step's ops attributed to the loop they run in."""

import jax
import jax.numpy as jnp

from experiments import bench_ops

LENGTH = 7


def _scanned(w, x):
  def body(c, _):
    return jnp.tanh(c @ w), None
  c, _ = jax.lax.scan(body, x @ w, None, length=LENGTH)
  return c.sum()


def _table(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  return bench_ops.attribute(bench_ops.traced_events(compiled, *args), compiled.as_text())


def test_kinds_by_op_name_and_products_by_what_they_hold():
  names = ("dot.3", "ynn_fusion", "ynn_fusion.2", "copy_bitcast_fusion.12", "wrapped_broadcast.69",
           "multiply_add_fusion")
  products = {"dot.3", "ynn_fusion"}    # ynn_fusion.2 holds no dot (a reduction, say)
  assert [bench_ops.kind(op, products) for op in names] == [
      "products", "products", "other", "copies", "broadcasts", "other"]


def test_products_are_counted_per_executed_iteration_and_placed_in_their_loop():
  w, x = jnp.full((32, 32), 0.01), jnp.ones((4, 32))
  table = _table(_scanned, w, x)
  assert table[("entry", "products")][0] == 1               # x @ w, before the loop
  assert table[("while body", "products")][0] == LENGTH     # c @ w, once per iteration
  # The gradient's loops are told apart by their source: the scan's forward and its transpose.
  grad = _table(jax.grad(_scanned), w, x)
  for loop in ("jvp()/while body", "transpose(jvp())/while body"):
    count = grad[(loop, "products")][0]
    assert count and count % LENGTH == 0, (loop, count)
  text = bench_ops.markdown(grad)
  assert "| `transpose(jvp())/while body` |" in text and text.splitlines()[-1].startswith("| all")
