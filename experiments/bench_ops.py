"""Where a train step's time goes, by kind of op and by loop.

  python experiments/bench_ops.py --config=configs/hope.py:tiny
  python experiments/bench_ops.py --config=configs/transformer.py:tiny

One step (after a warm-up step) is traced with `jax.profiler`; every op the runtime executes is
attributed, through the compiled HLO, to the computation it runs in (the entry computation, or
the body of one loop, named by the loop's source op, e.g. `jvp()/while` for a scan's forward and
`transpose(jvp())/while` for its backward) and to a kind: products (dots and the fusions that
hold one), copies, broadcasts (the zero-filling of stacked buffers), or the other ops. Times
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

KINDS = ("products", "copies", "broadcasts", "other")
_PRODUCT_OPS = ("dot", "convolution")


def kind(op: str, products: set[str] = frozenset()) -> str:
  """The kind of an executed HLO op: a product if it is in `products` (the dots and the
  fusions holding one, `ops`), else by its name (`copy_bitcast_fusion.12` → copies)."""
  base = re.sub(r"\.\d+$", "", op)
  if op in products:
    return "products"
  if "copy" in base:
    return "copies"
  if base in ("wrapped_broadcast", "broadcast"):
    return "broadcasts"
  return "other"


def module_name(hlo: str) -> str:
  """The name of the module of compiled HLO text (`HloModule jit_train_step, ...`)."""
  return re.match(r"HloModule ([\w.\-]+)", hlo).group(1)


def ops(hlo: str) -> tuple[dict[str, str], set[str]]:
  """Of compiled HLO text: each instruction → a label of the computation it runs in ("entry",
  "<source op of the loop> body" for a loop body, "<source op> branch i" for a branch of a
  conditional, else the computation's own name); and the instructions that are products (a dot,
  or a fusion whose computation holds one: XLA:CPU's XNNPACK fusions also hold elementwise
  work and reductions alone)."""
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
    owner[name] = comp
    if opcode in _PRODUCT_OPS:
      with_product.add(comp)
      direct.add(name)
    called = re.search(r"\bcalls=%?([\w.\-]+)", line)
    if opcode == "fusion" and called:
      calls[name] = called.group(1)
    body = re.search(r"\bbody=%?([\w.\-]+)", line) if opcode == "while" else None
    branches = re.search(r"branch_computations=\{([^}]*)\}", line)
    for sub, role in ([(body.group(1), "body")] if body else []) + [
        (b.strip().lstrip("%"), f"branch {i}")
        for i, b in enumerate(branches.group(1).split(",") if branches else [])]:
      source = re.search(r'op_name="([^"]*)"', line)
      labels[sub] = f"{re.sub(r'^jit[(][^)]*[)]/', '', source.group(1) if source else name)} {role}"
  products = direct | {op for op, c in calls.items() if c in with_product}
  return {op: labels.get(c, c) for op, c in owner.items()}, products


def attribute(events: list[dict], hlo: str) -> dict[tuple[str, str], list]:
  """(computation label, kind) → [ops executed, milliseconds] over the trace's events of the
  ops of compiled HLO text `hlo`."""
  (where, products), module = ops(hlo), module_name(hlo)
  table = collections.defaultdict(lambda: [0, 0.0])
  for event in events:
    args = event.get("args", {})
    op = args.get("hlo_op", "")
    if event.get("ph") == "X" and args.get("hlo_module") == module and op in where:
      row = table[(where[op], kind(op, products))]
      row[0] += 1
      row[1] += event.get("dur", 0) / 1e3
  return dict(table)


def traced_events(compiled, *args) -> list[dict]:
  """The trace events of one call of `compiled(*args)`."""
  jax.block_until_ready(args)   # nothing dispatched earlier may run inside the trace
  with tempfile.TemporaryDirectory() as directory:
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    path, = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      return json.load(f)["traceEvents"]


def markdown(table: dict[tuple[str, str], list]) -> str:
  """One row per computation (most time first): ms and ops of each kind."""
  labels = collections.defaultdict(float)
  for (label, _), (_, ms) in table.items():
    labels[label] += ms
  total = sum(labels.values())
  lines = ["| computation | " + " | ".join(KINDS) + " | all |",
           "|---|" + "---:|" * (len(KINDS) + 1)]
  for label in sorted(labels, key=labels.get, reverse=True):
    cells = [table.get((label, k), [0, 0.0]) for k in KINDS]
    lines.append(f"| `{label}` | " + " | ".join(f"{ms:.0f} ms ({n})" for n, ms in cells)
                 + f" | {labels[label]:.0f} ms |")
  sums = [sum(v[1] for (_, k), v in table.items() if k == kind_) for kind_ in KINDS]
  lines.append("| all | " + " | ".join(f"{ms:.0f} ms ({ms / total:.0%})" for ms in sums)
               + f" | {total:.0f} ms |")
  return "\n".join(lines)


def main(argv):
  del argv
  from experiments import mesh as mesh_lib, state as state_lib, train

  exp = state_lib.build(FLAGS.config)
  state = state_lib.init_state(exp)
  batches = [mesh_lib.put_batch(train.host_batch(exp, s), exp.mesh) for s in range(3)]
  compiled = train.jit_train_step(exp).lower(state, batches[0]).compile()
  state, _ = compiled(state, batches[0])
  jax.block_until_ready(state)
  start = time.perf_counter()
  state, _ = compiled(state, batches[1])
  jax.block_until_ready(state)
  wall = time.perf_counter() - start
  events = traced_events(compiled, state, batches[2])   # the state is donated: used up here
  print(f"{FLAGS.config.model.name}: one train step ({wall * 1e3:.0f} ms of wall time "
        f"untraced), ops summed per computation (jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}); ms (ops executed)\n")
  print(markdown(attribute(events, compiled.as_text())))


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", "configs/hope.py:tiny", "The train step's config.",
                                  lock_config=False)
  FLAGS = flags.FLAGS
  app.run(main)
