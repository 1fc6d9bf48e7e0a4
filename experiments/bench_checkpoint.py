"""What the checkpoint checksums (issue 17) cost, beside the save they protect.

  python experiments/bench_checkpoint.py --config=configs/transformer.py:small
  python experiments/bench_checkpoint.py --config=configs/transformer.py:tiny --train_steps=5

On the freshly initialised train state of the config (parameters, optimizer state, level
accumulators) it times, each as the median of `--reps`:
  checksum   the on-device fingerprint of every array (checkpoint._fingerprint: a checksum and
             a finiteness flag per array), already compiled;
  save call  checkpoint.save, the part the train loop waits for: the fingerprint, copying the
             arrays off the device, and starting orbax's async write;
  save total until the write has committed (checkpoint.finish), which the next steps overlap.
With `--train_steps`, one train step of the config is timed beside them, so the checksum can be
read as a fraction of a step (training waits for it once per `train.checkpoint_every` steps).
"""

import datetime
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import checkpoint, state as state_lib, timing  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/transformer.py:small", "Config whose train "
                                "state to checksum and save.", lock_config=True)
flags.DEFINE_integer("reps", 5, "Timed repetitions of each measurement (median reported).")
flags.DEFINE_integer("train_steps", 0, "Train steps to time beside them (0: none; a CPU "
                     "`small` step takes minutes).")
FLAGS = flags.FLAGS


def median_seconds(fn, reps: int) -> float:
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  config = FLAGS.config
  exp = state_lib.build(config, load_data=FLAGS.train_steps > 0)
  state = state_lib.init_state(exp)
  leaves = jax.tree.leaves(state)
  nbytes = sum(x.size * x.dtype.itemsize for x in leaves)
  jax.block_until_ready(checkpoint._fingerprint(state))  # compile once
  checksum_s = median_seconds(
      lambda: jax.block_until_ready(checkpoint._fingerprint(state)), FLAGS.reps)

  call, total = [], []
  with tempfile.TemporaryDirectory() as workdir:
    mngr = checkpoint.manager(workdir, keep=1)
    for step in range(1, FLAGS.reps + 1):
      start = time.perf_counter()
      checkpoint.save(mngr, step, state, {"model": config.model.name}, workdir)
      call.append(time.perf_counter() - start)
      checkpoint.finish(mngr, workdir)
      total.append(time.perf_counter() - start)
    mngr.close()

  print(f"date          {datetime.date.today()}")
  print(f"jax           {jax.__version__} on {jax.device_count()}× {jax.devices()[0].device_kind}")
  print(f"state         {config.model.name}, {len(leaves)} arrays, {nbytes / 1e9:.3f} GB")
  print(f"checksum      {checksum_s * 1e3:.1f} ms ({nbytes / checksum_s / 1e9:.2f} GB/s)")
  print(f"save call     {statistics.median(call) * 1e3:.1f} ms (checksum included)")
  print(f"save total    {statistics.median(total) * 1e3:.1f} ms (until committed)")
  if FLAGS.train_steps:
    step_s = timing.train_throughput(config, FLAGS.train_steps, warmup=2)["step_s"]
    print(f"train step    {step_s * 1e3:.1f} ms (mean of {FLAGS.train_steps}); checksum = "
          f"{checksum_s / step_s:.3f} steps, once per {config.train.checkpoint_every} steps")


if __name__ == "__main__":
  app.run(main)
