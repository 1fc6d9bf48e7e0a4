"""Where a train step's time goes, by kind of op and by loop.

  python experiments/bench_ops.py --config=configs/hope.py:tiny
  python experiments/bench_ops.py --config=configs/transformer.py:tiny

One step (after a warm-up step) is traced with `jax.profiler`; every op the runtime executes is
attributed, through the compiled HLO, to the computation it runs in (the entry computation, or
the body of one loop, named by the loop's source op, e.g. `jvp()/while` for a scan's forward and
`transpose(jvp())/while` for its backward) and to a kind: products (dots and the fusions that
hold one), copies and slices (ops that only move data), broadcasts (mostly the zero-filling of
a scan's stacked buffers), or the other ops (elementwise work and reductions). Times
are summed per op, so they add up the work of both threads, not the wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from typing import AbstractSet

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import flags  # noqa: E402

KINDS = ("products", "copies and slices", "broadcasts", "other")
_PRODUCT_OPS = ("dot", "convolution")
# Ops whose trace event spans the ops they run (a loop's, a branch's): no work of their own.
_CONTROL_OPS = ("while", "conditional", "call")
# What an op (or a fusion, named by XLA after the ops it fuses) that only moves data is made of.
_MOVEMENT = ("copy", "bitcast", "transpose", "slice", "dynamic-slice", "dynamic-update-slice",
             "concatenate", "pad", "reshape")


def kind(op: str, products: AbstractSet[str] = frozenset()) -> str:
  """The kind of an executed HLO op: a product if `products` (from `ops`) holds it, else by
  what its name says it is made of: `copy_bitcast_fusion.12` moves data, `copy_add_fusion`
  also adds (other), `wrapped_broadcast.69` fills a buffer."""
  if op in products:
    return "products"
  base = re.sub(r"\.\d+$", "", op)
  parts = re.sub(r"_fusion$", "", re.sub(r"^wrapped_", "", base)).split("_")
  if parts == ["broadcast"]:
    return "broadcasts"
  if all(part in _MOVEMENT for part in parts):
    return "copies and slices"
  return "other"


def module_name(hlo: str) -> str:
  """The name of the module of compiled HLO text (`HloModule jit_train_step, ...`)."""
  return re.match(r"HloModule ([\w.\-]+)", hlo).group(1)


def _called(line: str, opcode: str) -> list[tuple[str, str]]:
  """(computation, role) of a loop's body or each branch of a conditional on this line."""
  if opcode == "while":
    return [(re.search(r"\bbody=%?([\w.\-]+)", line).group(1), "body")]
  branches = re.search(r"branch_computations=\{([^}]*)\}", line)
  if opcode == "conditional" and branches:
    return [(b.strip().lstrip("%"), f"branch {i}")
            for i, b in enumerate(branches.group(1).split(","))]
  return []


def ops(hlo: str) -> tuple[dict[str, str], set[str]]:
  """Of compiled HLO text: each instruction that does work (not a loop or a conditional
  itself) → a label of the computation it runs in ("entry", "<source op of the loop> body"
  for a loop body, "<source op> branch i" for a branch of a conditional, else the
  computation's own name); and the instructions that are products (a dot, or a fusion whose
  computation holds one: XLA:CPU's XNNPACK fusions also hold reductions and elementwise work
  alone)."""
  owner, labels, calls, with_product, direct, comp = {}, {}, {}, set(), set(), None
  for line in hlo.splitlines():
    header = re.match(r"^(ENTRY )?%?([\w.\-]+) ", line)
    if header and not line.startswith(" "):
      comp = header.group(2)
      if header.group(1):
        labels[comp] = "entry"
      continue
    instruction = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = ", line)
    # The opcode is the first word before "(" after the shape (which may be a tuple's).
    opcode = re.search(r"\s([a-z][\w\-]*)\(", line[instruction.end() - 1:]) if instruction else None
    if not (opcode and comp):
      continue
    name, opcode = instruction.group(1), opcode.group(1)
    if opcode not in _CONTROL_OPS:
      owner[name] = comp
    if opcode in _PRODUCT_OPS:
      with_product.add(comp)
      direct.add(name)
    called = re.search(r"\bcalls=%?([\w.\-]+)", line)
    if opcode == "fusion" and called:
      calls[name] = called.group(1)
    for sub, role in _called(line, opcode):
      source = re.search(r'op_name="([^"]*)"', line)
      label = f"{re.sub(r'^jit[(][^)]*[)]/', '', source.group(1) if source else name)} {role}"
      # Two loops of one source op stay two rows.
      labels[sub] = label if label not in labels.values() else f"{label} ({name})"
  products = direct | {op for op, c in calls.items() if c in with_product}
  return {op: labels.get(c, c) for op, c in owner.items()}, products


def attribute(events: list[dict], hlo: str) -> dict[tuple[str, str], list]:
  """(computation label, kind) → [ops executed, milliseconds] over the trace's events of the
  ops of compiled HLO text `hlo`, in its last execution in the trace."""
  (where, products), module = ops(hlo), module_name(hlo)
  mine = [e for e in events if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == module
          and e["args"].get("hlo_op") in where]
  starts = collections.defaultdict(lambda: float("inf"))
  for event in mine:
    run = event["args"].get("run_id")
    starts[run] = min(starts[run], event["ts"])
  last = max(starts, key=starts.get, default=None)
  table = collections.defaultdict(lambda: [0, 0.0])
  for event in mine:
    if event["args"].get("run_id") == last:
      op = event["args"]["hlo_op"]
      row = table[(where[op], kind(op, products))]
      row[0] += 1
      row[1] += event.get("dur", 0) / 1e3
  return dict(table)


def traced_events(compiled, *args) -> list[dict]:
  """The trace events of a call of `compiled(*args)` (`attribute` reads its last execution:
  work dispatched earlier and still running may be in the trace too)."""
  jax.block_until_ready(args)
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    path, = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      return json.load(f)["traceEvents"]


def markdown(table: dict[tuple[str, str], list], smallest: float = 0.01) -> str:
  """One row per computation (most time first; those under `smallest` of the total in one
  row): ms and ops executed of each kind."""
  total_of = collections.defaultdict(float)
  for (label, _), (_, ms) in table.items():
    total_of[label] += ms
  total = sum(total_of.values())
  small = {label for label, ms in total_of.items() if ms < smallest * total}
  rows = collections.defaultdict(lambda: [0, 0.0])
  for (label, kind_), (n, ms) in table.items():
    row = rows[(f"{len(small)} computations under {smallest:.0%} each" if label in small
                else f"`{label}`", kind_)]
    row[0] += n
    row[1] += ms
  names = sorted({name for name, _ in rows},
                 key=lambda name: -sum(rows[(name, k)][1] for k in KINDS if (name, k) in rows))
  lines = ["| computation | " + " | ".join(KINDS) + " | all |",
           "|---|" + "---:|" * (len(KINDS) + 1)]
  for name in names:
    cells = [rows.get((name, k), [0, 0.0]) for k in KINDS]
    lines.append(f"| {name} | " + " | ".join(f"{ms:.0f} ms ({n})" for n, ms in cells)
                 + f" | {sum(ms for _, ms in cells):.0f} ms |")
  sums = [sum(v[1] for (_, k), v in table.items() if k == kind_) for kind_ in KINDS]
  lines.append("| all | " + " | ".join(f"{ms:.0f} ms ({ms / total:.0%})" for ms in sums)
               + f" | {total:.0f} ms |")
  return "\n".join(lines)


def main(argv):
  del argv
  from experiments import state as state_lib, train

  config = flags.FLAGS.config
  exp = state_lib.build(config)
  state = state_lib.init_state(exp)
  batches = train.device_batches(exp, 3)
  compiled = train.jit_train_step(exp).lower(state, batches[0]).compile()
  state, _ = compiled(state, batches[0])
  jax.block_until_ready(state)
  start = time.perf_counter()
  state, _ = compiled(state, batches[1])
  jax.block_until_ready(state)
  wall = time.perf_counter() - start
  events = traced_events(compiled, state, batches[2])   # the state is donated: used up here
  print(f"{config.model.name}: one train step ({wall * 1e3:.0f} ms of wall time "
        f"untraced), ops summed per computation (jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}); ms (ops executed)\n")
  print(markdown(attribute(events, compiled.as_text())))


if __name__ == "__main__":
  from absl import app
  from ml_collections import config_flags

  # Defined here, not at import, so that tests can import this module beside other scripts.
  config_flags.DEFINE_config_file("config", "configs/hope.py:tiny", "The train step's config.",
                                  lock_config=False)
  app.run(main)
