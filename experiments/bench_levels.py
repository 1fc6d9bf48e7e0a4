"""Cost of one optimizer update per step for a level of period 1, 16, 256 (SPEC §1).

  python experiments/bench_levels.py                       # the 128M-parameter `small` tree
  python experiments/bench_levels.py --preset=tiny --steps=512

For each period p, one level (AdamW under `every(·, p)`) covers the whole parameter tree
of `configs/transformer.py:<preset>`. `--steps` updates run inside ONE jitted
`lax.fori_loop` (so dispatch does not hide the update's cost), on a fixed random
gradient, and the time per update is the loop's wall time / steps. Skipped steps still
add the gradient to the accumulator; firing steps run AdamW — the cost should fall
toward the accumulate-only cost as p grows.
"""

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from configs import transformer  # noqa: E402
from nested import levels, models, optimizers  # noqa: E402

flags.DEFINE_string("preset", "small", "Transformer++ preset whose parameter tree to update.")
flags.DEFINE_integer("steps", 256, "Updates per timed loop (a multiple of the largest period).")
flags.DEFINE_list("periods", ["1", "16", "256"], "Level periods, in steps.")
FLAGS = flags.FLAGS


def time_updates(params, grads, period: int, steps: int) -> float:
  opt = levels.every(optimizers.adamw(1e-4, weight_decay=0.1), period)

  @jax.jit
  def run(params, opt_state):
    def body(_, carry):
      params, opt_state = carry
      return levels.update_and_apply(opt, grads, opt_state, params)
    return jax.lax.fori_loop(0, steps, body, (params, opt_state))

  opt_state = opt.init(params)
  jax.block_until_ready(run(params, opt_state))  # compile, and warm the caches
  start = time.perf_counter()
  jax.block_until_ready(run(params, opt_state))
  return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  config = transformer.get_config(FLAGS.preset)
  shapes = jax.eval_shape(lambda: models.init_params(config.model, 0))
  keys = iter(jax.random.split(jax.random.key(0), 2 * len(jax.tree.leaves(shapes))))
  params = jax.tree.map(lambda s: 0.02 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
  grads = jax.tree.map(lambda s: 1e-3 * jax.random.normal(next(keys), s.shape, s.dtype), shapes)
  n = models.count_params(shapes)
  print(f"# {datetime.date.today()}, jax {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"{n / 1e6:.1f}M parameters ({FLAGS.preset}), {FLAGS.steps} updates per loop")
  print("| period (steps) | ms per update | relative to period 1 |")
  print("|---|---|---|")
  base = None
  for period in map(int, FLAGS.periods):
    ms = 1e3 * time_updates(params, grads, period, FLAGS.steps)
    base = base or ms
    print(f"| {period} | {ms:.2f} | {ms / base:.2f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
