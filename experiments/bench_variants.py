"""Compile time and step time of model variants side by side, in one process, against a
baseline: the ratios are what a shared machine can measure.

  python experiments/bench_variants.py --config=configs/hope.py:tiny \\
      --variants=remat=chunk --variants=remat=none --variants=remat=none,scan_unroll=8

Each variant is the config with its `--variants` model fields set (`field=value,...`). Every
step is compiled ahead of time and run once; then, `--reps` times, each runs `--steps` steps
on real batches with one host sync, the variants in turn, so that a neighbour's load falls on
all of them alike. The step time reported is each variant's fastest rep.
"""

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import flops, state as state_lib, train  # noqa: E402
from experiments.sweep import load_config, override, parse_assignments  # noqa: E402
from nested.errors import UserError  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/hope.py:tiny", "The variants' base config.",
                                lock_config=False)
flags.DEFINE_string("baseline", "configs/transformer.py:tiny", "Config every ratio is against.")
flags.DEFINE_multi_string("variants", [], "Model fields of one variant: field=value,...")
flags.DEFINE_integer("steps", 11, "Timed train steps per rep.")
flags.DEFINE_integer("reps", 3, "Reps of every variant's timed steps, in turn.")
FLAGS = flags.FLAGS


def compiled_step(config):
  """(the compiled train step, its state after one step, batches, compile seconds, FLOPs)."""
  exp = state_lib.build(config)
  state = state_lib.init_state(exp)
  batches = train.device_batches(exp, FLAGS.steps + 1)
  step_fn = train.jit_train_step(exp)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batches[0]).compile()
  seconds = time.perf_counter() - start
  counted = flops.count(step_fn, state, batches[0])
  state, _ = compiled(state, batches[0])
  jax.block_until_ready(state)
  return compiled, state, batches[1:], seconds, counted


def main(argv):
  del argv
  configs = [("baseline " + FLAGS.baseline, load_config(FLAGS.baseline))]
  for spec in FLAGS.variants or [""]:
    try:
      fields = parse_assignments(list(filter(None, spec.split(","))), flag="--variants",
                                 example="remat=none,scan_unroll=8", prefix="model.")
      configs.append((spec or "as configured", override(
          FLAGS.config, fields, where="--variants", base="--config", owner="bench_variants'")))
    except UserError as e:
      sys.exit(f"error: {e}")
  runs = []
  for label, config in configs:
    runs.append([label, *compiled_step(config)])
    print(f"compiled {label}: {runs[-1][4]:.0f} s", flush=True)
  best = {label: float("inf") for label, _ in configs}
  for _ in range(FLAGS.reps):
    for run in runs:
      label, compiled, state, batches = run[:4]
      start = time.perf_counter()
      for batch in batches:
        state, metrics = compiled(state, batch)   # the state is donated: keep the new one
      jax.block_until_ready(metrics)
      run[2] = state
      best[label] = min(best[label], (time.perf_counter() - start) / len(batches))
  print(f"\n{datetime.date.today()}, jax {jax.__version__} on {jax.devices()[0].device_kind}; "
        f"fastest of {FLAGS.reps} reps of {FLAGS.steps} steps")
  print("| variant | compile | step | × baseline | FLOPs / step (counted) |")
  print("|---|---:|---:|---:|---:|")
  base = best[runs[0][0]]
  for label, _, _, _, compile_s, counted in runs:
    print(f"| {label} | {compile_s:.0f} s | {best[label] * 1e3:.0f} ms | "
          f"{best[label] / base:.2f}× | {counted / 1e9:.2f} G |")


if __name__ == "__main__":
  app.run(main)
