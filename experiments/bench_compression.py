"""JIT-Delta measurements: sizes and quality everywhere, kernel timings on an accelerator.

  python experiments/bench_compression.py                    # CPU: tables + interpret check
  python experiments/bench_compression.py --mode=time        # GPU/TPU: kernel timings
  python experiments/bench_compression.py --mode=time --sizes=4096 --batches=1,8

`check` (the default on CPU) prints, for synthetic trained-like weights (Gaussian and
Student-t df=3, std 0.02): bits per weight and escape rate of the exact tier per dtype and
block, bits and SQNR of the int4 tier, the progressive layouts measured to choose a codec
(compression/progressive.py), an interpret-mode correctness pass of the Pallas kernels
(the TPU/CPU forms and the Mosaic GPU form) against the references, and which kernels lower
for TPU, Mosaic GPU and Triton without their hardware.

`time` (the default on GPU/TPU) times, for random W of each size and many iterations inside
ONE jitted lax.fori_loop (time per iteration = wall time / iterations), on GPU for each of
--gpu_backends (Mosaic GPU, the default backend, and the opt-in Triton form):
  * a device copy of the bf16 W (read + write) against the decode kernels, as bandwidth;
  * XLA's bf16 `x @ W`, the fused decode-matmul kernels (sweeping the column tile), and
    XLA's own decode-then-dot of the same compressed W (kernels.matmul_reference),
for each batch. Each iteration's input depends on the loop index or the previous output,
so XLA cannot hoist the work out of the loop. Nothing here is a test; numbers go to
BENCHMARKS.md by hand.
"""

import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import compression  # noqa: E402
from compression import codecs, kernels, progressive  # noqa: E402
from experiments.timing import (best, synthetic, tiles_for, time_copy, time_decode,  # noqa: E402
                                time_matmul)

flags.DEFINE_enum("mode", "auto", ["auto", "check", "time"],
                  "check: tables + interpret-mode correctness; time: kernel timings; auto: "
                  "check on CPU, time elsewhere.")
flags.DEFINE_list("sizes", ["4096", "8192"], "time: W is [size, size].")
flags.DEFINE_list("batches", ["1", "8", "32", "128"], "time: rows of x.")
flags.DEFINE_list("block_ns", ["32", "64", "128", "256"],
                  "time: column tiles to sweep (Mosaic GPU takes the multiples of 64).")
flags.DEFINE_list("gpu_backends", ["mosaic", "triton"], "time, on GPU: Pallas backends to time.")
flags.DEFINE_integer("iters", 200, "time: iterations per timed loop.")
flags.DEFINE_integer("check_size", 1024, "check: tables use [size, size] weights.")
flags.DEFINE_integer("seed", 0, "Random seed for the synthetic weights.")
FLAGS = flags.FLAGS

BF16 = ml_dtypes.bfloat16
DTYPES = {"bfloat16": BF16, "float16": np.float16, "float32": np.float32}


def table(header: list[str], rows: list[list]) -> None:
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |")
  print(flush=True)


# ----------------------------------------------------------------------------- check mode


def size_tables(n: int, seed: int) -> None:
  rows = []
  for name, dtype in DTYPES.items():
    for kind in ("normal", "student_t"):
      x = synthetic(kind, (n, n), dtype, seed)
      for block in (128, 256, 512):
        t = codecs.encode_exact(x, block)
        default = " (default)" if block == codecs.DEFAULT_EXACT_BLOCK[name] else ""
        rows.append([name, kind, f"{block}{default}", compression.bits_per_weight(t),
                     f"{100 * compression.escape_rate(t):.4f}%"])
  print(f"## Exact tier, [{n}, {n}] synthetic weights, std 0.02")
  table(["dtype", "weights", "block (rows)", "bits/weight", "escape rate"], rows)

  rows = []
  for name, dtype in DTYPES.items():
    for kind in ("normal", "student_t"):
      x = synthetic(kind, (n, n), dtype, seed)
      t = compression.encode(x, "int4")
      rows.append([name, kind, compression.bits_per_weight(t),
                   progressive.sqnr_db(x, compression.decode(t))])
  print(f"## Int4 tier (group {codecs.DEFAULT_INT4_GROUP}, bfloat16 scales)")
  table(["dtype", "weights", "bits/weight", "SQNR dB"], rows)

  rows = []
  for kind in ("normal", "student_t"):
    x = synthetic(kind, (n, n), BF16, seed)
    cheap = progressive.measure(x, 128, escape_bits=32)
    for layout, r in progressive.measure(x, 128).items():
      rows.append([kind, layout, r["base_bits"], r["base_sqnr_db"], r["delta_bits"],
                   r["escape_window"], f"{100 * r['escape_rate']:.3f}%", r["exact_bits"],
                   cheap[layout]["exact_bits"]])
  print("## Progressive layouts, bfloat16, block 128 (targets: base <= 4.25, exact <= 12.1)")
  table(["weights", "layout", "base bits", "base SQNR dB", "delta bits", "escape window",
         "escapes", "exact bits (48-bit escapes)", "exact bits (32-bit escapes)"], rows)


def kernel_check(seed: int) -> None:
  rows = []
  for name, dtype in DTYPES.items():
    for codec in ("exact", "int4"):
      w = synthetic("student_t", (384, 200), dtype, seed)
      t = compression.encode(w, codec)
      expected = np.asarray(compression.decode(t)).view(codecs.uint_dtype(dtype))
      x = np.random.default_rng(seed).normal(size=(4, 384)).astype(np.float32)
      ref = np.asarray(kernels.matmul_reference(x, t, out_dtype=jnp.float32))
      exact, errs = [], []
      for backend in ("cpu", "gpu"):        # the TPU/CPU form, the Mosaic GPU form
        got = np.asarray(kernels.decode(t, block_k=256, block_n=128, backend=backend,
                                        interpret=True))
        exact.append("yes" if np.array_equal(got.view(codecs.uint_dtype(dtype)), expected)
                     else "NO")
      forms = [dict(k_loop=False), dict(k_loop=True), dict(backend="gpu")]
      for form in forms:
        y = np.asarray(kernels.matmul(x, t, block_n=128, out_dtype=jnp.float32, interpret=True,
                                      **form))
        errs.append(float(np.max(np.abs(y - ref)) / np.max(np.abs(ref))))
      rows.append([codec, name, "384x200", *exact, *errs])
  print("## Pallas kernels in interpret mode vs the references")
  table(["codec", "dtype", "W", "decode bit-identical", "Mosaic GPU decode bit-identical",
         "matmul rel. err (grid-K)", "matmul rel. err (K-loop)",
         "matmul rel. err (Mosaic GPU)"], rows)

  rows = []
  w = synthetic("normal", (1024, 1024), BF16, seed)
  for codec in ("exact", "int4"):
    report = kernels.lowering_check(compression.encode(w, codec),
                                    targets=("tpu", "cuda", "triton"))
    for key, status in report.items():
      rows.append([codec, key, status])
  print("## Lowering without hardware (Pallas -> Mosaic TPU, Mosaic GPU (\"cuda\"), Triton; "
        "not compiled or run)")
  table(["codec", "target/kernel", "status"], rows)


# ----------------------------------------------------------------------------- time mode


def timings(sizes, batches, block_ns, iters, seed, gpu_backends) -> None:
  device = jax.devices()[0]
  print(f"# {datetime.date.today()}, jax {jax.__version__}, {device.platform} "
        f"{device.device_kind}, {iters} iterations per loop, synthetic N(0, 0.02) weights")
  # gpu_backend only matters on GPU; elsewhere the one form is timed once.
  backends = gpu_backends if device.platform == "gpu" else gpu_backends[:1]
  label = (lambda gb: f" [{gb}]") if device.platform == "gpu" else (lambda gb: "")
  for n in sizes:
    w_host = synthetic("normal", (n, n), BF16, seed)
    w = jnp.asarray(w_host)
    tensors = {c: jax.device_put(compression.encode(w_host, c)) for c in ("exact", "int4")}
    copy_s = time_copy(w, iters)
    dense_bytes = w.nbytes
    copy_bw = 2 * dense_bytes / copy_s
    rows = [["copy (bf16 read + write)", "", copy_s * 1e6, copy_bw / 1e9, 1.0]]
    for gb in backends:
      for codec, t in tensors.items():
        s, bn = best(lambda bn, t=t, gb=gb: time_decode(
            t, iters, block_k=256, block_n=bn, gpu_backend=gb), tiles_for(gb, block_ns))
        bw = (t.nbytes + dense_bytes) / s
        rows.append([f"decode {codec}{label(gb)} ({compression.bits_per_weight(t):.3f} "
                     "bits/weight)", bn, s * 1e6, bw / 1e9, bw / copy_bw])
    print(f"## Decode, W [{n}, {n}] (target: >= 80% of copy bandwidth)")
    table(["kernel", "block_n", "us", "GB/s (compressed read + dense write)", "of copy"], rows)

    rows = []
    for b in batches:
      x = jnp.asarray(np.random.default_rng(seed).normal(size=(b, n)), jnp.bfloat16)
      xla = time_matmul(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32),
                        x, w, iters)
      rows.append([b, "XLA bf16 x @ W", "", xla * 1e6, 1.0])
      for codec, t in tensors.items():
        for gb in backends:
          s, bn = best(lambda bn, t=t, gb=gb: time_matmul(
              lambda x, tt: kernels.matmul(x, tt, block_n=bn, out_dtype=jnp.float32,
                                           gpu_backend=gb),
              x, t, iters), tiles_for(gb, block_ns))
          rows.append([b, f"fused {codec}{label(gb)}", bn, s * 1e6, s / xla])
        ref = time_matmul(lambda x, tt: kernels.matmul_reference(x, tt, out_dtype=jnp.float32),
                          x, t, iters)
        rows.append([b, f"XLA decode-then-dot {codec}", "", ref * 1e6, ref / xla])
    print(f"## x @ W, W [{n}, {n}] (targets at batch 1: exact <= 0.8x, int4 <= 0.35x)")
    table(["batch", "kernel", "block_n", "us", "x XLA bf16"], rows)


def main(argv):
  del argv
  mode = FLAGS.mode
  if mode == "auto":
    mode = "check" if jax.default_backend() == "cpu" else "time"
  if mode == "check":
    print(f"# {datetime.date.today()}, jax {jax.__version__}, {jax.default_backend()}, "
          f"seed {FLAGS.seed}")
    size_tables(FLAGS.check_size, FLAGS.seed)
    kernel_check(FLAGS.seed)
  else:
    timings(list(map(int, FLAGS.sizes)), list(map(int, FLAGS.batches)),
            list(map(int, FLAGS.block_ns)), FLAGS.iters, FLAGS.seed, FLAGS.gpu_backends)


if __name__ == "__main__":
  app.run(main)
