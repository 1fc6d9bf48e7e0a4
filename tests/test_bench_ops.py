"""experiments/bench_ops.py: a traced step's ops attributed to the loop they run in."""

import re

import jax
import jax.numpy as jnp

from experiments import bench_ops

LENGTH = 7


def _scanned(w, x):
  def body(c, _):
    return jnp.tanh(c @ w), None
  c, _ = jax.lax.scan(body, x @ w, None, length=LENGTH)
  return c.sum()


def _compiled(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  return compiled


def test_kinds_by_what_an_op_is_made_of():
  names = ("dot.3", "ynn_fusion", "ynn_fusion.2", "copy_bitcast_fusion.12",
           "bitcast_dynamic-update-slice_fusion.4", "copy_add_fusion", "wrapped_broadcast.69",
           "multiply_add_fusion")
  products = {"dot.3", "ynn_fusion"}    # ynn_fusion.2 holds no dot (a reduction, say)
  assert [bench_ops.kind(op, products) for op in names] == [
      "products", "products", "other", "copies and slices", "copies and slices", "other",
      "broadcasts", "other"]


def test_products_are_counted_per_executed_iteration_and_placed_in_their_loop():
  w, x = jnp.full((32, 32), 0.01), jnp.ones((4, 32))
  compiled = _compiled(_scanned, w, x)
  where, _ = bench_ops.ops(compiled.as_text())
  # The loop op itself spans its body's ops: counting it would count them twice.
  loops = re.findall(r"%([\w.\-]+) = [^=]* while\(", compiled.as_text())
  assert loops and not set(loops) & set(where)
  # Two executions in one trace: only the last is attributed.
  twice = lambda *args: (compiled(*args), compiled(*args))
  table = bench_ops.attribute(bench_ops.traced_events(twice, w, x), compiled.as_text())
  assert table[("entry", "products")][0] == 1               # x @ w, before the loop
  assert table[("while body", "products")][0] == LENGTH     # c @ w, once per iteration
  # The gradient's loops are told apart by their source: the scan's forward and its transpose.
  grad = _compiled(jax.grad(_scanned), w, x)
  table = bench_ops.attribute(bench_ops.traced_events(grad, w, x), grad.as_text())
  for loop in ("jvp()/while body", "transpose(jvp())/while body"):
    count = table[(loop, "products")][0]
    assert count and count % LENGTH == 0, (loop, count)
  text = bench_ops.markdown(table)
  assert "| `transpose(jvp())/while body` |" in text and text.splitlines()[-1].startswith("| all")


def test_the_table_keeps_small_computations_in_one_row_and_sums_every_kind():
  table = {("entry", "products"): [1, 10.0], ("loop body", "other"): [3, 5.0],
           ("branch a", "other"): [1, 0.01], ("branch b", "copies and slices"): [2, 0.02]}
  lines = bench_ops.markdown(table).splitlines()
  assert [line.split(" | ")[0] for line in lines[2:]] == [
      "| `entry`", "| `loop body`", "| 2 computations under 1% each", "| all"]
  assert lines[-1].endswith("| 15 ms |") and "(67%)" in lines[-1]
