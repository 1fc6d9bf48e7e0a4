"""Tokens/s of Titans, HOPE and HOPE-Attention against Transformer++, and where HOPE's time goes.

  python experiments/bench_models.py                       # preset tiny, every model + breakdown
  python experiments/bench_models.py --preset=small --steps=5 --breakdown=false

For each model: the fastest of `--steps` jitted train steps (forward, backward, optimizer)
and of as many forward passes, after `--warmup` untimed ones, on real batches of the bundled
corpus at the preset's batch size and context; tokens/s = batch · seq_len / time. The
breakdown times HOPE variants that each remove one mechanism; the differences attribute the
step time to: the teach signal (the in-context next-token gradient of the CMS), the CMS
in-context levels' optimizers, the memories' inner scans (sequential steps), and the
self-modifying memories themselves (vs attention). XLA's FLOP count of each compiled step is
printed beside it; XLA counts a loop body once, so it undercounts the scanned models
(Titans, HOPE) by about the number of chunks — compare wall time, not that column. Numbers are wall time on whatever this machine is doing: quote them
with the device, the JAX version and the command.
"""

import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import evaluate, state as state_lib, timing, train  # noqa: E402
from nested import models  # noqa: E402

flags.DEFINE_string("preset", "tiny", "Preset of every config file.")
flags.DEFINE_list("models", ["transformer", "titans", "hope", "hope_attention"], "Config files.")
flags.DEFINE_integer("steps", 10, "Timed steps (the fastest is reported).")
flags.DEFINE_integer("warmup", 2, "Untimed steps first (compilation).")
flags.DEFINE_bool("breakdown", True, "Also time the HOPE variants that attribute its time.")
FLAGS = flags.FLAGS

# (label, config file, model overrides): each removes one mechanism from the row above it.
BREAKDOWN = [
    ("HOPE (full)", "hope", {}),
    ("- teach signal (local L2 CMS objective)", "hope", {"cms_objective": "local_l2"}),
    ("- in-context CMS updates (all levels static)", "hope", {"context": 0}),
    ("- self-modifying memories (attention instead)", "hope_attention", {"context": 0}),
]
# Off the chain: the price of the memories' sequential inner steps (smaller chunks).
FINER_CHUNKS = ("HOPE, no in-context CMS, memory chunks of 4 tokens", "hope",
                {"context": 0, "gen_chunk_size": 4, "mem_chunk_size": 4})


def _config(name: str, overrides: dict):
  config = importlib.import_module(f"configs.{name}").get_config(FLAGS.preset)
  for key, value in overrides.items():
    config.model[key] = config.model[value] if value in config.model else value
  return config


def _best_seconds(fn, args_list) -> float:
  times = []
  for i, args in enumerate(args_list):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if i >= FLAGS.warmup:
      times.append(time.perf_counter() - start)
  # The fastest step: on a shared machine the others measure the neighbours' load.
  return min(times)


def time_config(config) -> dict:
  exp = state_lib.build(config)
  state = state_lib.init_state(exp)
  step_fn = train.jit_train_step(exp)
  n = FLAGS.warmup + FLAGS.steps
  batches = train.device_batches(exp, n)
  flops = timing.compiled_flops(step_fn.lower(state, batches[0]).compile())
  forward = jax.jit(lambda p, b: evaluate.token_nll(exp.apply(p, b[:, :-1]), b[:, 1:]).mean())
  params = state.params
  fwd = _best_seconds(forward, [(params, b) for b in batches])

  def step(batch):
    nonlocal state
    state, metrics = step_fn(state, batch)
    return metrics["loss"]

  train_s = _best_seconds(step, [(b,) for b in batches])
  tokens = config.train.batch_size * config.train.seq_len
  return {"params": models.count_params(params), "train_s": train_s, "fwd_s": fwd,
          "train_tok_s": tokens / train_s, "fwd_tok_s": tokens / fwd, "gflops": flops / 1e9}


def _row(label, r) -> str:
  return (f"| {label} | {r['params'] / 1e6:.2f}M | {r['train_tok_s']:,.0f} | {r['train_s']:.3f} "
          f"| {r['fwd_tok_s']:,.0f} | {r['gflops']:.1f} |")


def main(argv):
  del argv
  header = ("| model | params | train tok/s | train step s | forward tok/s | XLA GFLOP/step* |\n"
            "|---|---|---|---|---|---|")
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__},"
        f" preset {FLAGS.preset}, best of {FLAGS.steps} steps after {FLAGS.warmup} warmup")
  print(header)
  for name in FLAGS.models:
    print(_row(name, time_config(_config(name, {}))), flush=True)
  if FLAGS.breakdown:
    print("\nWhere HOPE's time goes (each row removes one mechanism from the row above):")
    print(header)
    previous = None
    for label, name, overrides in BREAKDOWN:
      r = time_config(_config(name, overrides))
      delta = "" if previous is None else f" (saves {previous - r['train_s']:.3f} s/step)"
      print(_row(label + delta, r), flush=True)
      previous = r["train_s"]
    print(_row(FINER_CHUNKS[0], time_config(_config(*FINER_CHUNKS[1:]))), flush=True)


if __name__ == "__main__":
  app.run(main)
