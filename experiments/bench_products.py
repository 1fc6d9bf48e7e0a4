"""How fast this device runs HOPE's per-sequence matrix products against a Transformer's
shared ones, at the `tiny` presets' shapes: the rate fast weights leave HOPE's step.

  python experiments/bench_products.py

A Transformer multiplies every token of the batch by one weight matrix. HOPE's memories and
in-context CMS levels hold matrices per sequence (M_mem per head too), so each chunk
multiplies its C tokens by their own matrices, and each write adds a sum of C outer products
(a product with inner dimension C). Each case is a read through a two-layer MLP's matrices
(or one write) at the shapes of configs/transformer.py:tiny and configs/hope.py:tiny, run in
one jitted loop over a sequence's worth of chunks, its output fed back as its next input so
nothing is hoisted; the rate is the fastest of `--reps` timed calls.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import Callable, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from nested import fields  # noqa: E402


def read(x, w):
  """Through an MLP's two matrices (the nonlinearity left out): x W₁ W₂, batched over
  whatever leads W (sequences, heads)."""
  return x @ w[0] @ w[1]


def write(x, w):
  """A chunk's write of its first matrix: W₁ + kᵀ(k W₁), C outer products summed."""
  return (w[0] + jnp.swapaxes(x, -1, -2) @ (x @ w[0]) * 1e-3, w[1])


class Case(NamedTuple):
  name: str
  product: Callable
  x: tuple          # input shape
  w: tuple          # the two matrices' shapes
  flops: int        # of one product
  calls: int        # products per timed sequence of the batch


def cases() -> tuple[Case, ...]:
  """The products at the tiny presets' shapes, read from their config files."""
  from experiments.sweep import load_config  # pylint: disable=g-import-not-at-top
  transformer = load_config("configs/transformer.py:tiny")
  hope = load_config("configs/hope.py:tiny")
  b, t = hope.train.batch_size, hope.train.seq_len
  d, f, m = hope.model.d_model, transformer.model.d_ff, hope.model
  c, heads = m.chunk_size, m.n_heads
  cms = fields.ints(m.cms_hidden, field="config.model.cms_hidden", example="96,96,64")[0]
  d_head = d // heads
  per_chunk = t // c
  return (
      Case(f"shared: [B·T, {d}] @ [{d}, {f}] @ [{f}, {d}] (Transformer++'s MLP)", read,
           (b * t, d), ((d, f), (f, d)), 4 * b * t * d * f, 1),
      Case(f"per sequence: [B, C, {d}] @ [B, {d}, {m.gen_hidden}] @ … (a generator)", read,
           (b, c, d), ((b, d, m.gen_hidden), (b, m.gen_hidden, d)),
           4 * b * c * d * m.gen_hidden, per_chunk),
      Case(f"per sequence: [B, C, {d}] @ [B, {d}, {cms}] @ … (an in-context CMS level)", read,
           (b, c, d), ((b, d, cms), (b, cms, d)), 4 * b * c * d * cms, per_chunk),
      Case(f"per head: [B, H, C, {d_head}] @ [B, H, {d_head}, {m.mem_hidden}] @ … (M_mem)",
           read, (b, heads, c, d_head),
           ((b, heads, d_head, m.mem_hidden), (b, heads, m.mem_hidden, d_head)),
           4 * b * heads * c * d_head * m.mem_hidden, per_chunk),
      Case(f"write: W + kᵀ(k W), W [B, {d}, {m.gen_hidden}] (a generator's)", write,
           (b, c, d), ((b, d, m.gen_hidden), (b, m.gen_hidden, d)),
           4 * b * c * d * m.gen_hidden, per_chunk),
  )


def timed(case: Case, sequences: int) -> Callable[[], None]:
  """A compiled loop of `sequences` × `case.calls` products, each feeding the next."""
  x = jax.random.normal(jax.random.key(0), case.x)
  x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  # Projections onto the first coordinates: a read maps x to a fixed point, so the values
  # stay put (no overflow, no denormals) however long the loop.
  w = tuple(jnp.broadcast_to(jnp.eye(*s[-2:]), s) for s in case.w)

  @jax.jit
  def loop(x, w):
    def body(_, xw):
      x, w = xw
      return (x, case.product(x, w)) if case.product is write else (case.product(x, w), w)
    return jax.lax.fori_loop(0, sequences * case.calls, body, (x, w))

  jax.block_until_ready(loop(x, w))
  return lambda: jax.block_until_ready(loop(x, w))


def main(argv):
  del argv
  flags_ = flags.FLAGS
  rows = []
  for case in cases():
    run = timed(case, flags_.sequences)
    best = float("inf")
    for _ in range(flags_.reps):
      start = time.perf_counter()
      run()
      best = min(best, time.perf_counter() - start)
    rows.append((case.name, case.flops * case.calls * flags_.sequences / best / 1e9))
  print(f"{datetime.date.today()}, jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({os.cpu_count()} cores), fastest of {flags_.reps} calls of {flags_.sequences} "
        f"batches each")
  print("| product | GFLOP/s | × shared |\n|---|---:|---:|")
  for name, rate in rows:
    print(f"| {name} | {rate:.1f} | {rate / rows[0][1]:.2f} |")


if __name__ == "__main__":
  # Defined here, not at import: the test imports `cases` beside other scripts' flags.
  flags.DEFINE_integer("sequences", 32, "Batches of sequences per timed call.")
  flags.DEFINE_integer("reps", 5, "Timed calls; the fastest counts.")
  app.run(main)
