"""`<workdir>/metrics.jsonl` (one JSON object per logged step), the same scalars as TensorBoard
events in `<workdir>/tensorboard/`, and progress lines with ETA and `perf/*` throughput."""

from __future__ import annotations

import json
import os
import time
from typing import Any


class MetricsWriter:
  """Appends one JSON line per logged step, and its numbers as TensorBoard scalars.

  On resume from step s, lines for steps after s are dropped first: they came from
  the part of the interrupted run that the checkpoint does not contain and that
  will be recomputed. TensorBoard's event files are append-only; its `purge_step` marker
  makes TensorBoard drop the earlier files' events from step s + 1 on, to the same effect.
  """

  def __init__(self, workdir: str, resume_step: int):
    from tensorboardX import SummaryWriter  # imports no TensorFlow, unlike clu's writers

    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a")
    # tensorboardX names a file by the second it opens it and truncates one of the same name:
    # the suffix keeps a resume within the same second from erasing the run's first events.
    self._events = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=resume_step + 1, flush_secs=30,
                                 filename_suffix=f".{time.time_ns()}.{os.getpid()}")

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record, sort_keys=True) + "\n")
    self._file.flush()
    for name, value in record.items():
      if name != "step" and isinstance(value, (bool, int, float)):
        self._events.add_scalar(name, float(value), record["step"])

  def close(self) -> None:
    self._file.close()
    self._events.close()


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Throughput and ETA over the steps since the last report (compile time excluded
  after the first report, so the ETA settles quickly), and MaxText's `perf/*` figures:
  tokens/s per device, and model FLOP utilisation where the model's FLOPs per token and the
  device's peak are known (`flops_per_token`, `peak_flops`; 0 = not known)."""

  def __init__(self, start_step: int, total_steps: int, tokens_per_step: int, *,
               devices: int = 1, flops_per_token: float = 0.0, peak_flops: float = 0.0):
    self.total, self.tokens_per_step = total_steps, tokens_per_step
    self.devices, self.flops_per_token, self.peak_flops = devices, flops_per_token, peak_flops
    self._step, self._time = start_step, time.perf_counter()

  def report(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    steps = max(step - self._step, 1)
    sec_per_step = (now - self._time) / steps
    self._step, self._time = step, now
    tokens_per_sec = self.tokens_per_step / sec_per_step
    report = {"tokens_per_sec": tokens_per_sec, "eta_sec": sec_per_step * (self.total - step),
              "perf/tokens_per_sec_per_device": tokens_per_sec / self.devices}
    if self.flops_per_token and self.peak_flops:
      report["perf/mfu"] = tokens_per_sec * self.flops_per_token / (self.devices * self.peak_flops)
    return report
