"""Device memory of a compiled train step, measured before anything is allocated.

`jax.jit(step).lower(shapes).compile().memory_analysis()` reports, per device, the bytes of
the step's arguments, outputs and temporaries as XLA's buffer assignment planned them. That
is what a run needs, known on any machine (a GPU-sized step compiles on a CPU), so whether a
preset fits, and with which `grad_accum`, is known before any device is.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import ml_collections

from nested.errors import UserError


@dataclasses.dataclass(frozen=True)
class Footprint:
  """Bytes per device of one compiled train step (XLA's memory analysis)."""
  arguments: int       # the train state and the batch
  outputs: int
  temporaries: int     # activations, the scan carries kept for the backward pass, ...
  aliased: int         # outputs written into donated arguments (counted once)
  compile_seconds: float

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries


def of_compiled(compiled, compile_seconds: float = math.nan) -> Footprint:
  m = compiled.memory_analysis()
  return Footprint(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                   int(m.temp_size_in_bytes), int(m.alias_size_in_bytes), compile_seconds)


def compile_step(jitted, *args):
  """(compiled executable, its Footprint) for the jitted step at `args` (arrays or shapes)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, of_compiled(compiled, time.perf_counter() - start)


def gb(n: float) -> str:
  return f"{n / 2**30:.1f} GB"


def fitting_grad_accum(footprint: Footprint, config: ml_collections.ConfigDict,
                       budget: float, batch_shards: int = 1) -> int | None:
  """The smallest grad_accum (dividing the batch) at which the step would fit, assuming the
  temporaries scale with the micro-batch (they are dominated by per-sequence activations and
  in-context state) and whose micro-batch still splits over the `batch_shards` devices the
  batch is sharded over (data × fsdp); None if even the smallest such micro-batch would not."""
  batch, accum = config.train.batch_size, config.train.grad_accum
  fixed = footprint.total - footprint.temporaries
  for candidate in range(accum, batch + 1):
    splits = batch % candidate == 0 and (batch // candidate) % batch_shards == 0
    if splits and fixed + footprint.temporaries * accum / candidate <= budget:
      return candidate
  return None


def device_budget(config: ml_collections.ConfigDict) -> tuple[int | None, str]:
  """(bytes per device a train step may plan, where that number comes from).

  `config.train.memory_budget_gb` when set, else the allocator's limit of this process's
  first device (`memory_stats()["bytes_limit"]`: what XLA may allocate on a GPU or TPU);
  None where no limit is known (a CPU)."""
  gb_set = config.train.get("memory_budget_gb", 0.0)
  if gb_set:
    return int(gb_set * 2**30), "config.train.memory_budget_gb"
  device = jax.local_devices()[0]
  limit = (device.memory_stats() or {}).get("bytes_limit")
  return (int(limit), f"the memory limit of {device.device_kind}") if limit else (None, "")


def check_fits(footprint: Footprint, config: ml_collections.ConfigDict,
               batch_shards: int = 1) -> None:
  """Raises a UserError, before anything is allocated, if the compiled step would not fit
  the device (`device_budget`); the message names the bytes, the budget and the fix."""
  budget, source = device_budget(config)
  if budget is None or footprint.total <= budget:
    return
  accum = fitting_grad_accum(footprint, config, budget, batch_shards)
  t = config.train
  if accum:
    fix = (f"Set --config.train.grad_accum={accum} (micro-batches of "
           f"{t.batch_size // accum} sequences; estimated from the temporaries, which scale "
           f"with the micro-batch)")
  else:
    fix = ("Even the smallest micro-batch that splits over the devices would not fit: shard "
           "the parameters over more devices (--config.mesh.fsdp=N), shorten train.seq_len "
           "or choose a smaller preset")
  raise UserError(
      f"The train step needs {gb(footprint.total)} per device (arguments "
      f"{gb(footprint.arguments)}, temporaries {gb(footprint.temporaries)} at batch "
      f"{t.batch_size} x {t.seq_len}, grad_accum={t.grad_accum}), over the budget of "
      f"{gb(budget)} ({source}). {fix}, or lower train.batch_size.")
