"""Device memory of training with `config.compression.train` (slow levels kept compressed).

  python experiments/bench_compressed_training.py --config=configs/hope.py:tiny
  python experiments/bench_compressed_training.py --config=configs/hope.py:small --time_steps=0

For the config as given and with `compression.train=True, codec=exact`, prints
* the train state's resident bytes between steps (parameters, optimizer state), from its
  shapes: what the switch saves for as long as training runs;
* XLA's memory analysis of the compiled train step (arguments, outputs, temporaries): the
  step's own footprint, which includes the dense weights decoded for its forward pass;
* with --time_steps > 0, the measured time per step of both, after one compiled step.
Nothing is allocated for the memory columns, so `small` and larger can be measured on a
machine that could not train them.
"""

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from compression import tree as ctree  # noqa: E402
from experiments import compress, state as state_lib, train  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/hope.py:tiny", "Config to measure.",
                                lock_config=False)
flags.DEFINE_integer("time_steps", 5, "Timed train steps of each variant; 0 = memory only.")
FLAGS = flags.FLAGS


def step_memory(exp, on_device) -> dict[str, int]:
  shapes = state_lib.state_shapes(exp, on_device)
  batch = jax.ShapeDtypeStruct((exp.config.train.batch_size, exp.config.train.seq_len + 1),
                               np.int32)
  compiled = train.jit_train_step(exp, on_device).lower(shapes, batch).compile()
  m = compiled.memory_analysis()
  return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
          "temporaries": m.temp_size_in_bytes, "aliased": m.alias_size_in_bytes}


def seconds_per_step(exp, on_device, steps: int) -> float:
  state = state_lib.init_state(exp)
  if on_device is not None:
    state = train.compress_state(exp, on_device, state)
  step = train.jit_train_step(exp, on_device)
  batches = train.device_batches(exp, steps + 1)
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[1:]:
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  config = FLAGS.config
  config.compression.codec, config.compression.dtype, config.compression.train = "exact", "", True
  exp = state_lib.build(config)
  on_device = compress.on_device(config, exp.abstract_params)
  print(f"# {datetime.date.today()} | jax {jax.__version__} | {jax.devices()[0].device_kind} | "
        f"{' '.join(sys.argv)}")
  print(f"compressed on device: {len(on_device.owners)} tensors of levels "
        f"{sorted(set(on_device.owners.values()))}")
  rows = {}
  for name, plan in (("dense", None), ("compressed", on_device)):
    shapes = state_lib.state_shapes(exp, plan)
    kept = {p: leaf for p, leaf in ctree.leaves_with_paths(shapes.params) if p in on_device.owners}
    rows[name] = {"state": ctree.array_bytes(shapes),
                  "params": ctree.array_bytes(shapes.params),
                  "chosen": ctree.array_bytes(kept), **step_memory(exp, plan)}
    if FLAGS.time_steps:
      rows[name]["ms/step"] = 1e3 * seconds_per_step(exp, plan, FLAGS.time_steps)
  columns = ["chosen", "params", "state", "arguments", "outputs", "temporaries", "aliased"]
  print("| | " + " | ".join(columns + (["ms/step"] if FLAGS.time_steps else [])) + " |")
  print("|---" * (len(columns) + 1 + bool(FLAGS.time_steps)) + "|")
  for name, r in rows.items():
    cells = [f"{r[c]:,}" for c in columns] + ([f"{r['ms/step']:.1f}"] if FLAGS.time_steps else [])
    print(f"| {name} | " + " | ".join(cells) + " |")
  saved = rows["dense"]["state"] - rows["compressed"]["state"]
  print(f"resident train state saved: {saved:,} bytes ({100 * saved / rows['dense']['state']:.2f}%"
        f" of the state; {100 * saved / rows['dense']['chosen']:.1f}% of the chosen tensors)")


if __name__ == "__main__":
  app.run(main)
