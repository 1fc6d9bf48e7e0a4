"""Timing pieces shared by the benchmark scripts and experiments/device_check.py.

Kernel timings run many iterations inside ONE jitted lax.fori_loop (time per iteration = wall
time / iterations); each iteration's input depends on the loop index or on the previous
output, so XLA cannot hoist the work out of the loop. Train-step timings run the real
jitted step on real batches, one host sync at the end, so dispatch overlaps compute.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from compression import kernels

BF16 = ml_dtypes.bfloat16

# bfloat16 bit patterns a codec must carry: +-0, subnormals, the smallest and largest normals,
# +-inf, NaNs with payloads (quiet, signalling, negative), and finite outliers far outside a
# block's exponent window.
BF16_SPECIAL_BITS = (0x0000, 0x8000, 0x0001, 0x807F, 0x0080, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80,
                     0x7FC0, 0x7F81, 0xFFFF, 0x3F80, 0x4780, 0xC780, 0x2F80)
# The finite ones of moderate size, for matmuls whose outputs should stay finite.
BF16_FINITE_SPECIAL_BITS = (0x0000, 0x8000, 0x0001, 0x807F, 0x0080, 0x3F80, 0x4780, 0xC780,
                            0x2F80)

# Dense bf16 tensor-core / MXU peaks from the datasheets, TFLOP/s, matched as substrings of
# jax's device_kind in this order (so "H100 PCIe" is found before "H100").
DATASHEET_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
                    ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
                    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
                    ("TPU v5", 459.0), ("TPU v6 lite", 918.0), ("TPU v6e", 918.0))


# ----------------------------------------------------------------------------- weights


def synthetic(kind: str, shape, dtype, seed: int) -> np.ndarray:
  """Trained-like weights, std 0.02: "normal", "student_t" (3 degrees of freedom), or
  "specials" / "finite_specials": normal with 1 in 8 weights replaced by the bfloat16
  special values above (bfloat16 only)."""
  rng = np.random.default_rng(seed)
  if kind == "normal":
    return rng.normal(0, 0.02, shape).astype(dtype)
  if kind == "student_t":
    return (rng.standard_t(3, shape) * 0.02 / math.sqrt(3)).astype(dtype)
  if kind not in ("specials", "finite_specials") or np.dtype(dtype) != np.dtype(BF16):
    raise ValueError(f"synthetic({kind!r}, dtype={np.dtype(dtype).name}): unknown kind, or "
                     "special values asked for a dtype other than bfloat16")
  bits = BF16_SPECIAL_BITS if kind == "specials" else BF16_FINITE_SPECIAL_BITS
  x = rng.normal(0, 0.02, shape).astype(BF16)
  flat = x.reshape(-1).view(np.uint16)
  where = rng.choice(flat.size, size=flat.size // 8, replace=False)
  flat[where] = np.asarray(bits, np.uint16)[rng.integers(0, len(bits), where.size)]
  return x


# ----------------------------------------------------------------------------- kernel loops


def seconds_per_iteration(fn, *args, iters: int) -> float:
  """Seconds per iteration of fn(*args), a jitted loop of `iters` iterations."""
  jax.block_until_ready(fn(*args))          # compile and warm up
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / iters


def never(i, iters):
  """0 on every iteration, but XLA cannot know it: ties an operand to the loop index."""
  return (i >= iters).astype(jnp.uint32)


def time_copy(w, iters: int) -> float:
  """Seconds per read + write of the bf16 array w (an XOR with a loop-dependent zero)."""
  bits = jax.lax.bitcast_convert_type(w, jnp.uint16)

  @jax.jit
  def run(bits):
    return jax.lax.fori_loop(0, iters, lambda i, b: b ^ never(i, iters).astype(jnp.uint16),
                             bits)
  return seconds_per_iteration(run, bits, iters=iters)


def time_decode(t, iters: int, **kwargs) -> float:
  """Seconds per kernels.decode(t, **kwargs); the metadata is salted with the loop index."""
  meta = "bases" if t.codec == "exact" else "scales"

  @jax.jit
  def run(t):
    def body(i, out):
      salted = dataclasses.replace(t, **{meta: getattr(t, meta) ^ never(i, iters)})
      return kernels.decode(salted, **kwargs)
    return jax.lax.fori_loop(0, iters, body, jnp.zeros(t.shape, jnp.dtype(t.dtype)))
  return seconds_per_iteration(run, t, iters=iters)


def time_matmul(matmul, x, w, iters: int) -> float:
  """Seconds per matmul(x, w): each iteration multiplies the previous output, rescaled."""
  scale = 1.0 / (0.02 * math.sqrt(x.shape[-1]))     # keeps the iterated x at unit scale

  @jax.jit
  def run(x, w):
    def body(_, x):
      return (matmul(x, w).astype(jnp.float32) * scale).astype(x.dtype)
    return jax.lax.fori_loop(0, iters, body, x)
  return seconds_per_iteration(run, x, w, iters=iters)


def best(fn, block_ns, errors: list | None = None):
  """(seconds, block_n) of the fastest column tile; a tile that fails is printed and, with
  `errors`, appended to it as (block_n, message), never hidden."""
  results = []
  for bn in block_ns:
    try:
      results.append((fn(bn), bn))
    except Exception as e:  # noqa: BLE001 -- a tile that does not compile is data
      message = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
      print(f"  block_n={bn}: {message}")
      if errors is not None:
        errors.append((bn, message))
  return min(results, key=lambda r: r[0]) if results else (float("nan"), None)


def tiles_for(gpu_backend: str, block_ns):
  """The column tiles a backend takes: Mosaic GPU's are multiples of 64 (None = default)."""
  if jax.default_backend() == "gpu" and gpu_backend == "mosaic":
    return [bn for bn in block_ns if bn is None or bn % 64 == 0]
  return block_ns


# ----------------------------------------------------------------------------- peaks, FLOPs


def datasheet_tflops(device_kind: str) -> float | None:
  for name, tflops in DATASHEET_TFLOPS:
    if name in device_kind:
      return tflops
  return None


def measured_matmul_tflops(n: int = 2048, reps: int = 10) -> float:
  """TFLOP/s of a chain of n² float32 matmuls on the default device."""
  x = jnp.ones((n, n), jnp.float32) * 0.5

  @jax.jit
  def chain(x):
    return jax.lax.fori_loop(0, reps, lambda _, y: (y @ x) * (1.0 / n), x)

  chain(x).block_until_ready()
  start = time.perf_counter()
  chain(x).block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def peak_tflops(override: float = 0.0, n: int = 2048) -> tuple[float, str]:
  """(device peak TFLOP/s, where it comes from): the override, the datasheet, else measured."""
  if override:
    return override, "given on the command line"
  kind = jax.devices()[0].device_kind
  tflops = datasheet_tflops(kind)
  if tflops is not None:
    return tflops, f"datasheet dense bf16 peak of {kind}"
  return measured_matmul_tflops(n), f"measured float32 {n}² matmul on {kind}"


def model_flops_per_token(config, n_params: int) -> float:
  """Transformer++ training FLOPs per token (PaLM, Chowdhery et al. 2022, App. B): 6·N for the
  matmuls of the N non-embedding parameters (+ the unembedding), 12·L·d·T for attention."""
  m = config.model
  embedding = m.vocab_size * m.d_model
  return 6 * (n_params - embedding) + 12 * m.n_layers * m.d_model * config.train.seq_len


def compiled_flops(compiled) -> float:
  """XLA's FLOP count of a compiled computation (loop bodies counted once)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", math.nan))


def compiled_bytes(compiled) -> int | None:
  """Bytes XLA plans for a compiled computation: arguments + outputs + temporaries, less the
  donated buffers the outputs reuse; None where the backend does not say."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def device_memory() -> dict[str, Any] | None:
  """The default device's allocator statistics (None on backends without them, e.g. CPU)."""
  return jax.devices()[0].memory_stats()


# ----------------------------------------------------------------------------- train steps


def train_throughput(config, steps: int, warmup: int) -> dict[str, Any]:
  """Mean seconds of `steps` real train steps after `warmup` untimed ones, with the step's
  FLOPs (counted through its loops, and XLA's count, loop bodies once), planned bytes and the
  device's peak bytes in use after it."""
  from experiments import flops, state as state_lib, train
  from nested import models

  exp = state_lib.build(config)
  state = state_lib.init_state(exp)
  step_fn = train.jit_train_step(exp)
  batches = train.device_batches(exp, warmup + steps)
  # The compiled executable runs the steps: jit's own cache would compile the step again.
  compiled = step_fn.lower(state, batches[0]).compile()
  for b in batches[:warmup]:
    state, metrics = compiled(state, b)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for b in batches[warmup:]:
    state, metrics = compiled(state, b)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  tokens = state_lib.tokens_per_step(config)
  memory = device_memory() or {}
  return {"params": models.count_params(exp.abstract_params), "step_s": seconds,
          "tokens_per_step": tokens, "tokens_per_s": tokens / seconds,
          "flops_per_step": flops.count(step_fn, state, batches[0]),
          "xla_flops_per_step": compiled_flops(compiled),
          "compiled_bytes": compiled_bytes(compiled),
          "peak_bytes_in_use": memory.get("peak_bytes_in_use"),
          "loss": float(metrics["loss"])}
