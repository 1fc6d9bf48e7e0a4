"""Training throughput and model FLOPs utilisation (MFU) of a preset.

  python experiments/bench_train.py --config=configs/transformer.py:tiny
  python experiments/bench_train.py --config=configs/transformer.py:small --steps=30

Times `--steps` train steps after `--warmup` compiled ones (one host sync at the end,
so dispatch overlaps compute), on real batches of the configured corpus.
For Transformer++, model FLOPs per token follow PaLM (Chowdhery et al. 2022, App. B): 6·N for the
matmuls of N non-embedding parameters (+ the unembedding) and 12·L·d·T for attention;
the step's FLOPs counted through its loops (experiments/flops.py) are printed beside it, and
for the other models instead. MFU = achieved model
FLOP/s over the device's peak: the datasheet dense bf16 peak for known GPUs and TPUs
(experiments/timing.py), else the measured rate of a large float32 matmul on this device
(printed, so it can be judged).
"""

import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import timing  # noqa: E402

config_flags.DEFINE_config_file("config", "configs/transformer.py:tiny", "Config to time.",
                                lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed train steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU; 0 = datasheet or measured.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  r = timing.train_throughput(config, FLAGS.steps, FLAGS.warmup)
  seconds, n_params, counted = r["step_s"], r["params"], r["flops_per_step"]
  tokens = r["tokens_per_step"]
  flops = timing.model_flops_per_token(config, n_params) * tokens
  peak, peak_source = timing.peak_tflops(FLAGS.peak_tflops)
  print(f"date          {datetime.date.today()}")
  print(f"jax           {jax.__version__} on {jax.device_count()}× {jax.devices()[0].device_kind}")
  print(f"model         {config.model.name}, {n_params / 1e6:.2f}M parameters, dtype {config.model.dtype}")
  print(f"batch         {config.train.batch_size} × {config.train.seq_len} tokens")
  print(f"step time     {seconds * 1e3:.1f} ms (mean of {FLAGS.steps})")
  print(f"throughput    {tokens / seconds:,.0f} tokens/s")
  if config.model.name != "transformer":
    # 6N + attention does not describe in-context learners: the FLOPs the step executes
    # (loops counted) are the honest figure, and MFU against them is hardware utilisation.
    print(f"step FLOPs    {counted / 1e9:.2f} GFLOP (counted through the chunk loops; XLA's "
          f"count, loop bodies once: {r['xla_flops_per_step'] / 1e9:.2f})")
    print(f"achieved      {counted / seconds / 1e12:.3f} TFLOP/s")
    return
  print(f"model FLOPs   {flops / 1e9:.2f} GFLOP/step (the step counted: {counted / 1e9:.2f})")
  print(f"achieved      {flops / seconds / 1e12:.3f} TFLOP/s")
  print(f"peak          {peak:.3f} TFLOP/s ({peak_source})")
  print(f"MFU           {100 * flops / seconds / 1e12 / peak:.1f}%")


if __name__ == "__main__":
  app.run(main)
