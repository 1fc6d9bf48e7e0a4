"""A `jax.profiler` trace of a window of train steps: `--config.train.profile_steps=10,15`.

The window is given in the log's step numbers: "10,15" traces the five steps after step 10
(the log's steps 11..15), so compilation (step 1) and warm-up stay out of the trace unless the
window starts at 0. The trace goes to `<workdir>/profile/` in the layout TensorBoard's profile
plugin and xprof read (`plugins/profile/<run>/*.xplane.pb`).
"""

from __future__ import annotations

import os

import jax
from absl import logging

from nested.errors import UserError


def parse_window(spec: str, steps: int) -> tuple[int, int] | None:
  """(first, last) step numbers of `spec` ("first,last"), None for ''; a UserError otherwise."""
  if not spec:
    return None
  try:
    first, last = (int(s) for s in spec.split(","))
  except ValueError:
    first = last = None
  if first is None or not 0 <= first < last:
    raise UserError(f"config.train.profile_steps={spec!r} is not a window of steps: pass two "
                    f"step numbers 'first,last' with 0 <= first < last, e.g. "
                    f"--config.train.profile_steps=10,15 traces the log's steps 11..15.")
  if last > steps:
    raise UserError(f"config.train.profile_steps={spec!r} ends past the run "
                    f"(config.train.steps={steps}): the trace would never be written. Pass a "
                    f"window that ends by step {steps}, e.g. "
                    f"--config.train.profile_steps={max(0, steps - 5)},{steps}.")
  return first, last


class ProfileWindow:
  """Starts the trace before step `first + 1` and writes it after step `last` (waiting for that
  step's results, so the trace holds the device work of every step in the window)."""

  def __init__(self, spec: str, steps: int, workdir: str):
    self.window = parse_window(spec, steps)
    self.directory = os.path.join(workdir, "profile")
    self.active = False

  def before_step(self, step: int) -> None:
    """`step` is the loop's index (the log names it step + 1). A run resumed inside the window
    traces what is left of it."""
    if self.window and not self.active and self.window[0] <= step < self.window[1]:
      jax.profiler.start_trace(self.directory)
      self.active, self.first = True, step

  def after_step(self, done: int, state) -> None:
    if self.active and done == self.window[1]:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("Wrote the profile of steps %d..%d to %s (tensorboard --logdir %s, or "
                   "xprof).", self.first + 1, self.window[1], self.directory,
                   self.directory)
