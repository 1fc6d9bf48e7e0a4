"""One command that measures on a GPU (or TPU) everything the project claims there.

  python3 experiments/device_check.py --out=device_check.json --markdown=device_check.md
  python3 experiments/device_check.py --smoke           # CPU, tiny shapes, under a minute
  python3 experiments/device_check.py --override=hope:train.grad_accum=8

Parts, each independent (one that raises is recorded with its error and the next one runs;
the JSON is rewritten after every part, so a crash keeps what was measured before it):

* kernels_correctness: JIT-Delta decode and fused decode-matmul (exact bf16, int4), compiled
  for this device, against references that do not use the kernels: the exact decode must give
  back the input's bits, the int4 decode the numpy codec's bits; the matmul must agree with a
  float64 numpy product of the numpy-decoded W within 1e-3 of sum|x||W| per output. Weights:
  random (N(0, 0.02)), heavy-tailed (Student-t, df 3) and special values (±0, subnormals,
  extreme normals, ±inf, NaN payloads; the matmul and int4 take the finite ones).
* kernels_decode: decode time against the device's measured copy bandwidth (goal ≥ 80%).
* kernels_matmul: fused decode-matmul against XLA's bf16 `x @ W` (goals at batch 1: exact
  ≤ 0.8×, int4 ≤ 0.35×), and XLA's own decode-then-dot, for W of 4096² and 8192², batch
  1, 8, 32, 128. Kernel times are many iterations inside one jitted lax.fori_loop, each
  depending on the last (experiments/timing.py).
* train_<model>: tokens/s of Transformer++, Titans, HOPE-Attention and HOPE at the `small`
  preset's batch (mean of --train_steps after --train_warmup), the step's planned bytes
  (XLA memory analysis) and the device's peak bytes in use (a process-wide high-water mark:
  it only grows from one model to the next); MFU for Transformer++ against the datasheet
  peak of the device (timing.DATASHEET_TFLOPS). A model that runs out of memory is retried
  with twice the micro-batches (train.grad_accum), the batch unchanged.

At the end it prints one markdown block (device, JAX version, date, command, every number)
and writes it to --markdown; the JSON goes to --out. `--smoke` runs every part at tiny
shapes (kernels in interpret mode on CPU, micro versions of the `tiny` presets) so that
tests/test_device_check.py keeps the script from rotting between GPU runs.
"""

from __future__ import annotations

import datetime
import gc
import importlib
import math
import os
import sys
import time
import traceback
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import compression  # noqa: E402
from compression import codecs, kernels  # noqa: E402
from experiments import checkpoint, sweep, timing  # noqa: E402
from experiments.timing import BF16  # noqa: E402
from nested.errors import UserError  # noqa: E402

MODELS = ("transformer", "titans", "hope_attention", "hope")
PARTS = ("kernels_correctness", "kernels_decode", "kernels_matmul",
         *(f"train_{m}" for m in MODELS))
CODECS = ("exact", "int4")
MATMUL_TOLERANCE = 1e-3       # of sum_k |x_k| |W_kn|, per output
DECODE_GOAL = 0.8             # of the copy bandwidth
MATMUL_GOALS = {"exact": 0.8, "int4": 0.35}   # time / XLA bf16 time, at batch 1

flags.DEFINE_bool("smoke", False, "Tiny shapes, interpret-mode kernels on CPU, micro presets.")
flags.DEFINE_string("out", "device_check.json", "Where the JSON report goes.")
flags.DEFINE_string("markdown", "", "Where the markdown block goes ('' = only printed).")
flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {', '.join(PARTS)}.")
flags.DEFINE_multi_string("override", [], "model:section.field=value, e.g. "
                          "hope:train.grad_accum=8; may be repeated.")
flags.DEFINE_string("preset", "small", "Preset of every model's config file.")
flags.DEFINE_list("sizes", ["4096", "8192"], "W is [size, size] for the kernel timings.")
flags.DEFINE_list("batches", ["1", "8", "32", "128"], "Rows of x for the matmul timings.")
flags.DEFINE_list("block_ns", [], "Column tiles to sweep; empty = each kernel's default.")
flags.DEFINE_list("gpu_backends", ["mosaic", "triton"], "On GPU: Pallas backends to check.")
flags.DEFINE_integer("iters", 200, "Iterations per timed kernel loop.")
flags.DEFINE_list("check_shape", ["1024", "768"], "W of the correctness checks.")
flags.DEFINE_list("check_batches", ["1", "32"], "Rows of x in the matmul correctness checks.")
flags.DEFINE_integer("train_steps", 10, "Timed train steps per model.")
flags.DEFINE_integer("train_warmup", 2, "Untimed train steps first (compilation).")
flags.DEFINE_integer("max_grad_accum", 16, "Out of memory: double grad_accum up to this.")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU; 0 = the datasheet table.")
flags.DEFINE_float("deadline_s", 480.0, "Parts not started by then are skipped (recorded).")
flags.DEFINE_float("train_reserve_s", 240.0, "Kernel timing loops stop this long before the "
                   "deadline, leaving the time to the training parts.")
flags.DEFINE_list("inject_failure", [], "Parts that raise at their start (tests error reports).")
flags.DEFINE_integer("seed", 0, "Random seed of the synthetic weights and inputs.")
FLAGS = flags.FLAGS

# --smoke: every part, at shapes CPU interpret mode runs in seconds.
SMOKE_FLAGS = dict(sizes=[256], batches=[2], iters=2, check_shape=(256, 128),
                   check_batches=[2], train_steps=1, train_warmup=0, preset="tiny")
# --smoke: the `tiny` presets shrunk (as tests/conftest.py's MICRO), per model.
SMOKE_TRAIN = {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 2,
               "train.seq_len": 32, "train.batch_size": 2}
SMOKE_MODEL = {
    "transformer": {"model.d_ff": 64},
    "titans": {"model.d_ff": 64, "model.mem_hidden": 16, "model.chunk_size": 8},
    "hope": {"model.cms_hidden": "32,32,32", "model.mem_hidden": 16, "model.chunk_size": 8,
             "model.mem_chunk_size": 8, "model.gen_chunk_size": 8, "model.context": 32,
             "model.cms_periods": "8,16,2048"},
    "hope_attention": {"model.cms_hidden": "32,32,32", "model.chunk_size": 8,
                       "model.context": 32, "model.cms_periods": "8,16,2048"},
}


class Settings:
  """What the parts measure: the flags, or SMOKE_FLAGS under --smoke."""

  def __init__(self, flag_values):
    f = flag_values
    self.sizes = [int(s) for s in f.sizes]
    self.batches = [int(b) for b in f.batches]
    self.block_ns = [int(b) for b in f.block_ns] or [None]
    self.iters = f.iters
    self.check_shape = tuple(int(s) for s in f.check_shape)
    self.check_batches = [int(b) for b in f.check_batches]
    self.train_steps, self.train_warmup = f.train_steps, f.train_warmup
    self.preset = f.preset
    if f.smoke:
      for key, value in SMOKE_FLAGS.items():
        setattr(self, key, value)
    self.smoke = f.smoke
    self.seed = f.seed
    self.gpu_backends = list(f.gpu_backends)
    self.overrides = parse_overrides(f.override)
    self.max_grad_accum = f.max_grad_accum
    self.peak_tflops = f.peak_tflops


# ----------------------------------------------------------------------------- overrides


def parse_overrides(specs) -> dict[str, dict[str, Any]]:
  """['hope:train.grad_accum=8', ...] -> {'hope': {'train.grad_accum': 8}}."""
  out: dict[str, dict[str, Any]] = {}
  for spec in specs:
    model, colon, rest = spec.partition(":")
    path, equals, value = rest.partition("=")
    if not (colon and equals and path) or model not in MODELS:
      raise UserError(f"--override={spec!r} is not model:section.field=value with a model of "
                      f"{', '.join(MODELS)}; write e.g. --override=hope:train.grad_accum=8.")
    out.setdefault(model, {})[path] = sweep.parse_value(value)
  return out


def model_config(model: str, s: Settings):
  """configs/<model>.py:<preset>, shrunk under --smoke, with the model's --override fields."""
  config = importlib.import_module(f"configs.{model}").get_config(s.preset)
  fields = dict(SMOKE_TRAIN, **SMOKE_MODEL[model]) if s.smoke else {}
  fields = {k: v for k, v in fields.items() if k.split(".", 1)[1] in config[k.split(".")[0]]}
  fields.update(s.overrides.get(model, {}))
  return sweep.override(config, fields, where="--override", base=f"configs/{model}.py:"
                        f"{s.preset}", owner="device_check's")


# ----------------------------------------------------------------------------- kernels


def kernel_forms(s: Settings) -> dict[str, dict[str, Any]]:
  """The kernel forms of this device: Mosaic GPU and Triton on GPU, Pallas' one elsewhere."""
  if jax.default_backend() == "gpu":
    return {gb: dict(gpu_backend=gb) for gb in s.gpu_backends}
  return {"interpret" if jax.default_backend() == "cpu" else "pallas": {}}


def error_text(e: BaseException) -> str:
  first = str(e).splitlines()[0][:400] if str(e) else ""
  return f"{type(e).__name__}: {first}"


def guarded(row: dict, fn: Callable[[], dict]) -> dict:
  """row updated with fn()'s results, or with the error fn raised (a kernel that does not
  compile on this device is a result, and the next row still runs)."""
  try:
    row.update(fn())
  except Exception as e:  # noqa: BLE001
    row.update(error=error_text(e), passed=False)
  return row


def decode_mismatches(t, expected_bits: np.ndarray, form: dict) -> dict:
  got = np.asarray(jax.jit(lambda tt: kernels.decode(tt, **form))(t))
  got_bits = got.view(codecs.uint_dtype(got.dtype))
  mismatches = int(np.sum(got_bits != expected_bits))
  return {"mismatches": mismatches, "passed": mismatches == 0}


def matmul_error(t, x: np.ndarray, form: dict) -> dict:
  """Worst |y - ref| / sum|x||W| over the outputs, against float64 numpy on the numpy decode."""
  w = compression.decode(t).astype(np.float64)
  xw = x.astype(BF16).astype(np.float64)         # the kernel casts x to W's dtype
  ref, scale = xw @ w, np.abs(xw) @ np.abs(w)
  y = np.asarray(jax.jit(lambda xx, tt: kernels.matmul(xx, tt, out_dtype=jnp.float32, **form))(
      jnp.asarray(x, BF16), t)).astype(np.float64)
  finite = np.isfinite(ref)
  same_nonfinite = bool(np.array_equal(np.isfinite(y), finite))
  err = float(np.max(np.abs(y - ref)[finite] / np.maximum(scale[finite], 1e-30)))
  return {"max_rel_err": err, "passed": same_nonfinite and err <= MATMUL_TOLERANCE}


def kernels_correctness(s: Settings, deadline) -> dict:
  del deadline   # a few seconds of kernels: always run in full
  rows = []
  shape, rng = s.check_shape, np.random.default_rng(s.seed)
  for codec in CODECS:
    for kind in ("normal", "student_t", "specials"):
      w = timing.synthetic(kind if codec == "exact" else kind.replace("specials",
                           "finite_specials"), shape, BF16, s.seed)
      t = compression.encode(w, codec)
      expected = (w if codec == "exact" else compression.decode(t)).view(np.uint16)
      wm = timing.synthetic(kind.replace("specials", "finite_specials"), shape, BF16, s.seed)
      tm = compression.encode(wm, codec)
      for form_name, form in kernel_forms(s).items():
        base = dict(codec=codec, weights=kind, form=form_name, shape=list(shape))
        rows.append(guarded(dict(base, kernel="decode"),
                            lambda: decode_mismatches(t, expected, form)))
        for b in s.check_batches:
          x = rng.normal(size=(b, shape[0])).astype(np.float32)
          rows.append(guarded(dict(base, kernel="matmul", batch=b),
                              lambda: matmul_error(tm, x, form)))
  return {"rows": rows, "passed": all(r["passed"] for r in rows)}


_TENSORS: dict[tuple[int, int], tuple] = {}


def weights_for(n: int, seed: int):
  """(dense bf16 W, {codec: compressed W}) on the device, built once per size."""
  if (n, seed) not in _TENSORS:
    w_host = timing.synthetic("normal", (n, n), BF16, seed)
    _TENSORS[(n, seed)] = (jnp.asarray(w_host), {c: jax.device_put(compression.encode(w_host, c))
                                                for c in CODECS})
  return _TENSORS[(n, seed)]


def kernels_decode(s: Settings, deadline) -> dict:
  rows = []
  for n in s.sizes:
    if deadline():
      rows.append({"size": n, "skipped": "kernel time budget spent"})
      continue
    w, tensors = weights_for(n, s.seed)
    copy_s = timing.time_copy(w, s.iters)
    copy_bw = 2 * w.nbytes / copy_s
    rows.append({"size": n, "kernel": "copy", "us": copy_s * 1e6, "gb_s": copy_bw / 1e9,
                 "of_copy": 1.0})
    for form_name, form in kernel_forms(s).items():
      for codec, t in tensors.items():
        errors: list = []
        sec, bn = timing.best(lambda bn, t=t, form=form: timing.time_decode(
            t, s.iters, **form, **({} if bn is None else dict(block_n=bn))),
            timing.tiles_for(form.get("gpu_backend", ""), s.block_ns), errors)
        bw = (t.nbytes + w.nbytes) / sec
        rows.append({"size": n, "kernel": f"decode {codec}", "form": form_name, "block_n": bn,
                     "bits_per_weight": compression.bits_per_weight(t), "us": sec * 1e6,
                     "gb_s": bw / 1e9, "of_copy": bw / copy_bw,
                     "goal_met": bool(bw / copy_bw >= DECODE_GOAL),
                     **({"errors": [f"block_n={b}: {m}" for b, m in errors]} if errors else {})})
  return {"rows": rows, "goal": f"decode >= {DECODE_GOAL:.0%} of copy bandwidth"}


def xla_dot(x, w):
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def kernels_matmul(s: Settings, deadline) -> dict:
  rows = []
  for n in s.sizes:
    w, tensors = weights_for(n, s.seed)
    for b in s.batches:
      if deadline():
        rows.append({"size": n, "batch": b, "skipped": "kernel time budget spent"})
        continue
      x = jnp.asarray(np.random.default_rng(s.seed).normal(size=(b, n)), jnp.bfloat16)
      xla = timing.time_matmul(xla_dot, x, w, s.iters)
      rows.append({"size": n, "batch": b, "kernel": "XLA bf16 x @ W", "us": xla * 1e6,
                   "vs_xla": 1.0})
      for codec, t in tensors.items():
        for form_name, form in kernel_forms(s).items():
          errors: list = []
          sec, bn = timing.best(lambda bn, t=t, form=form: timing.time_matmul(
              lambda xx, tt: kernels.matmul(xx, tt, out_dtype=jnp.float32, **form,
                                            **({} if bn is None else dict(block_n=bn))),
              x, t, s.iters), timing.tiles_for(form.get("gpu_backend", ""), s.block_ns), errors)
          row = {"size": n, "batch": b, "kernel": f"fused {codec}", "form": form_name,
                 "block_n": bn, "us": sec * 1e6, "vs_xla": sec / xla}
          if b == 1:
            row["goal_met"] = bool(sec / xla <= MATMUL_GOALS[codec])
          if errors:
            row["errors"] = [f"block_n={bb}: {m}" for bb, m in errors]
          rows.append(row)
        ref = timing.time_matmul(
            lambda xx, tt: kernels.matmul_reference(xx, tt, out_dtype=jnp.float32), x, t, s.iters)
        rows.append({"size": n, "batch": b, "kernel": f"XLA decode-then-dot {codec}",
                     "us": ref * 1e6, "vs_xla": ref / xla})
  return {"rows": rows, "goal": "at batch 1: fused exact <= 0.8x, int4 <= 0.35x XLA bf16"}


# ----------------------------------------------------------------------------- training


def out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def train_model(model: str, s: Settings) -> dict:
  """tokens/s (and MFU for Transformer++) at the preset's batch; out of memory -> twice the
  micro-batches, the batch unchanged, up to --max_grad_accum."""
  config = model_config(model, s)
  attempts = []
  while True:
    try:
      r = timing.train_throughput(config, s.train_steps, s.train_warmup)
      break
    except Exception as e:  # noqa: BLE001 -- retried only when it is memory
      accum = config.train.grad_accum
      if not out_of_memory(e) or 2 * accum > s.max_grad_accum or config.train.batch_size % (
          2 * accum):
        raise
      attempts.append({"grad_accum": accum, "error": error_text(e)})
      del e
      gc.collect()
      jax.clear_caches()
      config.train.grad_accum = 2 * accum
  result = {"model": config.model.name, "batch_size": config.train.batch_size,
            "seq_len": config.train.seq_len, "grad_accum": config.train.grad_accum,
            "dtype": config.model.dtype, "steps": s.train_steps, **r}
  if attempts:
    result["out_of_memory_attempts"] = attempts
  if model == "transformer":
    peak, source = timing.peak_tflops(s.peak_tflops, n=256 if s.smoke else 2048)
    flops = timing.model_flops_per_token(config, r["params"]) * r["tokens_per_step"]
    result.update(model_flops_per_step=flops, achieved_tflops=flops / r["step_s"] / 1e12,
                  peak_tflops=peak, peak_source=source,
                  mfu=flops / r["step_s"] / 1e12 / peak)
  return result


# ----------------------------------------------------------------------------- the run


def run_parts(s: Settings, parts, inject_failure, deadline_s: float, train_reserve_s: float,
              write: Callable[[dict], None], report: dict) -> dict:
  """Runs each part under its own try/except; the report is written after every part."""
  start = time.perf_counter()
  elapsed = lambda: time.perf_counter() - start  # noqa: E731
  kernel_deadline = lambda: elapsed() > deadline_s - train_reserve_s  # noqa: E731
  table = {"kernels_correctness": kernels_correctness, "kernels_decode": kernels_decode,
           "kernels_matmul": kernels_matmul}
  for part in parts:
    if elapsed() > deadline_s:
      report["parts"][part] = {"status": "skipped",
                               "error": f"not started: {deadline_s:.0f} s deadline passed"}
      continue
    print(f"[{elapsed():6.1f} s] {part}", flush=True)
    t0 = time.perf_counter()
    try:
      if part in inject_failure:
        raise RuntimeError(f"failure injected into {part} by --inject_failure")
      if part.startswith("train_"):
        result = train_model(part[len("train_"):], s)
      else:
        result = table[part](s, kernel_deadline)
      report["parts"][part] = {"status": "ok", **result}
    except Exception as e:  # noqa: BLE001 -- each part is independent
      traceback.print_exc()
      report["parts"][part] = {"status": "error", "error": error_text(e),
                               "traceback": traceback.format_exc()[-4000:]}
    report["parts"][part]["seconds"] = time.perf_counter() - t0
    gc.collect()
    write(report)
  report["seconds"] = elapsed()
  return report


def header(command: str, smoke: bool) -> dict:
  device = jax.devices()[0]
  return {"device_kind": device.device_kind, "platform": device.platform,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__,
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
          "command": command, "smoke": smoke}


# ----------------------------------------------------------------------------- markdown


def _num(v, fmt: str = ".4g") -> str:
  if v is None:
    return "—"
  if isinstance(v, bool):
    return "yes" if v else "**no**"
  if isinstance(v, float):
    return "nan" if math.isnan(v) else format(v, fmt)
  return str(v)


def _table(header_row, rows) -> list[str]:
  return (["| " + " | ".join(header_row) + " |", "|" + "---|" * len(header_row)]
          + ["| " + " | ".join(rows_i) + " |" for rows_i in rows])


def _bytes(v) -> str:
  if v is None:
    return "—"
  return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.2f} MiB"


def markdown(report: dict) -> str:
  h, parts = report["header"], report["parts"]
  lines = [f"### Device check: {h['device_count']}× {h['device_kind']} ({h['platform']}), "
           f"JAX {h['jax']}, {h['date']}" + (" — SMOKE (tiny shapes)" if h["smoke"] else ""),
           "", "```bash", h["command"], "```", ""]
  status = ", ".join(f"{p} {v['status']} ({v.get('seconds', 0):.0f} s)" for p, v in parts.items())
  lines += [f"Parts: {status}; total {report.get('seconds', 0):.0f} s.", ""]

  part = parts.get("kernels_correctness", {})
  if part.get("status") == "ok":
    lines += [f"Kernel correctness (matmul: max |y - ref| / Σ|x||W| ≤ {MATMUL_TOLERANCE}; "
              "decode: bits that differ):", ""]
    lines += _table(["codec", "weights", "form", "kernel", "W", "batch", "result", "pass"], [
        [r["codec"], r["weights"], r["form"], r["kernel"], "×".join(map(str, r["shape"])),
         _num(r.get("batch")),
         r.get("error") or (f"{r['mismatches']} bits differ" if r["kernel"] == "decode"
                            else f"{r['max_rel_err']:.2e}"), _num(r["passed"])]
        for r in part["rows"]]) + [""]

  part = parts.get("kernels_decode", {})
  if part.get("status") == "ok":
    lines += [f"Decode ({part['goal']}); GB/s = (compressed read + dense write) / time:", ""]
    lines += _table(["W", "kernel", "form", "block_n", "bits/weight", "µs", "GB/s", "of copy",
                     "goal"], [
        [f"{r['size']}²", r.get("kernel", ""), r.get("form", ""), _num(r.get("block_n")),
         _num(r.get("bits_per_weight"), ".3f"), _num(r.get("us"), ".1f"),
         _num(r.get("gb_s"), ".4g"), _num(r.get("of_copy"), ".2f"),
         _num(r.get("goal_met")) if "goal_met" in r else
         (r.get("skipped", "") + "; ".join(r.get("errors", [])))] for r in part["rows"]]) + [""]

  part = parts.get("kernels_matmul", {})
  if part.get("status") == "ok":
    lines += [f"x @ W ({part['goal']}):", ""]
    lines += _table(["W", "batch", "kernel", "form", "block_n", "µs", "× XLA bf16", "goal"], [
        [f"{r['size']}²", str(r["batch"]), r.get("kernel", r.get("skipped", "")),
         r.get("form", ""), _num(r.get("block_n")), _num(r.get("us"), ".1f"),
         _num(r.get("vs_xla"), ".3f"),
         (_num(r["goal_met"]) if "goal_met" in r else "") + "; ".join(r.get("errors", []))]
        for r in part["rows"]]) + [""]

  trained = [(p, v) for p, v in parts.items() if p.startswith("train_") and v["status"] == "ok"]
  if trained:
    lines += ["Training (mean step time after warm-up; peak bytes: the process's high-water "
              "mark so far; planned: XLA's memory analysis of the step):", ""]
    lines += _table(["model", "params", "batch (micro-batches)", "step ms", "tokens/s",
                     "MFU", "peak bytes in use", "planned step bytes", "GFLOP/step*"], [
        [v["model"], f"{v['params'] / 1e6:.1f}M",
         f"{v['batch_size']} × {v['seq_len']} ({v['grad_accum']})", f"{v['step_s'] * 1e3:.1f}",
         f"{v['tokens_per_s']:,.0f}",
         (f"{100 * v['mfu']:.1f}% ({v['achieved_tflops']:.3g} of {v['peak_tflops']:.3g} "
          f"TFLOP/s)") if "mfu" in v else "n/a",
         _bytes(v["peak_bytes_in_use"]), _bytes(v["compiled_bytes"]),
         _num(v["flops_per_step"] / 1e9)] for p, v in trained]) + [""]
    lines += ["*Counted through the chunk loops (experiments/flops.py); XLA's own count "
              "takes a loop body once.", ""]

  failed = [(p, v) for p, v in parts.items() if v["status"] != "ok"]
  if failed:
    lines += ["Parts that did not finish:", ""]
    lines += [f"* `{p}` {v['status']}: {v['error']}" for p, v in failed] + [""]
  return "\n".join(lines)


def main(argv):
  del argv
  try:
    s = Settings(FLAGS)
    unknown = [p for p in FLAGS.parts if p not in PARTS]
    if unknown:
      raise UserError(f"--parts names {', '.join(unknown)}; the parts are {', '.join(PARTS)}.")
  except UserError as e:
    sys.exit(f"Error: {e}")
  command = "python3 " + " ".join(sys.argv)
  report = {"header": header(command, s.smoke), "parts": {}}
  write = lambda r: checkpoint.write_json_atomic(FLAGS.out, r)  # noqa: E731
  if os.path.dirname(FLAGS.out):
    os.makedirs(os.path.dirname(FLAGS.out), exist_ok=True)
  run_parts(s, FLAGS.parts, set(FLAGS.inject_failure), FLAGS.deadline_s, FLAGS.train_reserve_s,
            write, report)
  write(report)
  text = markdown(report)
  print(text, flush=True)
  if FLAGS.markdown:
    with open(FLAGS.markdown, "w") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
