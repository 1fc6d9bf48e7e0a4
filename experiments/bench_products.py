"""How fast this device multiplies HOPE's per-sequence matrices against a Transformer's
shared ones, at `tiny`'s shapes: the bound that fast weights put on HOPE's step time.

  python experiments/bench_products.py

A Transformer multiplies every token of the batch by one weight matrix. HOPE's memories and
in-context CMS levels hold a matrix per sequence (and per head), so each chunk multiplies
C = 16 tokens by its own matrix, and each write adds a sum of C outer products (a product
with inner dimension C). Each product below runs `--iters` times in one jitted loop, its
output fed back as its next input so nothing is hoisted; the rate is the fastest of
`--reps` timed calls.
"""

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_integer("iters", 64, "Products per timed call (times 8 for the per-chunk ones).")
flags.DEFINE_integer("reps", 5, "Timed calls; the fastest counts.")
FLAGS = flags.FLAGS

B, T, C, D, H = 16, 128, 16, 128, 4     # tiny: batch, sequence, chunk, width, heads


def _shared(x, w):               # [B·T, D] @ [D, D]: one matrix for every token
  return x @ w


def _per_sequence(x, w):         # [B, C, D] @ [B, D, D]: a chunk of each sequence, its matrix
  return jnp.einsum("bcd,bde->bce", x, w)


def _per_head(x, w):             # [B, H, C, d] @ [B, H, d, d]: M_mem, a matrix per head
  return jnp.einsum("bhcd,bhde->bhce", x, w)


def _write(x, w):                # W + kᵀδ: [B, D, C] @ [B, C, D], C outer products summed
  return w + jnp.einsum("bcd,bce->bde", x, jnp.einsum("bcd,bde->bce", x, w)) * 1e-3


# (name, product, input shape, matrix shape, FLOPs of one product, products per shared one)
CASES = (
    ("shared: [B·T, D] @ [D, D]", _shared, (B * T, D), (D, D), 2 * B * T * D * D, 1),
    ("per sequence: [B, C, D] @ [B, D, D]", _per_sequence, (B, C, D), (B, D, D),
     2 * B * C * D * D, T // C),
    ("per head: [B, H, C, D/H] @ [B, H, D/H, D/H]", _per_head, (B, H, C, D // H),
     (B, H, D // H, D // H), 2 * B * C * D * D // H, T // C),
    ("write: W + kᵀ(k W), inner dimension C", _write, (B, C, D), (B, D, D),
     4 * B * C * D * D, T // C),
)


def timed_loop(product, x_shape, w_shape, iters: int):
  """A jitted loop of `iters` products, each feeding the next (x, or W for a write)."""
  feeds_matrix = product is _write
  x = jax.random.normal(jax.random.key(0), x_shape) / jnp.sqrt(x_shape[-1])
  w = jnp.broadcast_to(jnp.eye(w_shape[-1]), w_shape)

  @jax.jit
  def loop(x, w):
    def body(_, xw):
      x, w = xw
      return (x, product(x, w)) if feeds_matrix else (product(x, w), w)
    return jax.lax.fori_loop(0, iters, body, (x, w))

  jax.block_until_ready(loop(x, w))
  return lambda: jax.block_until_ready(loop(x, w))


def main(argv):
  del argv
  rows = []
  for name, product, x_shape, w_shape, flops, per_shared in CASES:
    iters = FLAGS.iters * per_shared
    run = timed_loop(product, x_shape, w_shape, iters)
    best = float("inf")
    for _ in range(FLAGS.reps):
      start = time.perf_counter()
      run()
      best = min(best, time.perf_counter() - start)
    rows.append((name, flops * iters / best / 1e9))
  print(f"{datetime.date.today()}, jax {jax.__version__} on {jax.devices()[0].device_kind} "
        f"({os.cpu_count()} cores); B={B} T={T} C={C} D={D} H={H}, fastest of {FLAGS.reps}")
  print("| product | GFLOP/s | × shared |\n|---|---:|---:|")
  for name, rate in rows:
    print(f"| {name} | {rate:.1f} | {rate / rows[0][1]:.2f} |")


if __name__ == "__main__":
  app.run(main)
