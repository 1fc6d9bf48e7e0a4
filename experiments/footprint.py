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

import ml_collections


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
                       budget: float) -> int | None:
  """The smallest grad_accum (dividing the batch) at which the step would fit, assuming the
  temporaries scale with the micro-batch (they are dominated by per-sequence activations and
  in-context state); None if even one sequence per micro-batch would not."""
  batch, accum = config.train.batch_size, config.train.grad_accum
  fixed = footprint.total - footprint.temporaries
  for candidate in range(accum, batch + 1):
    if batch % candidate == 0 and fixed + footprint.temporaries * accum / candidate <= budget:
      return candidate
  return None
