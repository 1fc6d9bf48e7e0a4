"""`--mode=compress`: a JIT-Delta copy of a checkpoint's rarely written parameters (SPEC §5).

Which parameters: those owned by the levels in `config.compression.levels` — by default the
slowest levels (the longest period, if it is longer than one step: HOPE's `cms_slow`, the
CMS level written once every few optimizer steps) — in tensors of at least
`config.compression.min_size` elements. The rest of the parameters stay dense.

Where: `<workdir>/compressed/step_<N>-<codec>[-<dtype>]/` (the format of compression/tree.py),
with `report.md` (its rows are also in `manifest.json`'s metadata): bits per weight, bytes
before and after, and the escape rate of every tensor. A directory is written once; a rerun
with the same settings reports it again (without restoring the checkpoint), one with other
settings is refused rather than overwriting it.

With `config.compression.codec` set, `--mode=eval` and `--mode=generate` read the compressed
copy of the latest checkpoint (`load_latest`); the model's apply (state.Experiment.apply)
decodes compressed leaves inside the jitted step, so the dense weights are temporaries of
each forward pass.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax import lax

from compression import codecs, jit_encode, tree as ctree
from experiments import checkpoint, state as state_lib
from nested import fields, levels as levels_lib
from nested.errors import UserError

CODECS = ("exact", "int4")


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """`config.compression`, checked, with the level names resolved."""
  c = config.compression
  if c.codec not in CODECS:
    raise UserError(f"config.compression.codec={c.codec!r}: set --config.compression.codec="
                    f"exact (bit-exact) or int4 (lossy) to compress.")
  if c.dtype and c.dtype not in codecs.FLOAT_FORMATS:
    raise UserError(f"config.compression.dtype={c.dtype!r}: use '' (the parameters' own dtype) "
                    f"or one of {sorted(codecs.FLOAT_FORMATS)}.")
  if c.min_size < 1:
    raise UserError(f"config.compression.min_size={c.min_size} must be at least 1.")
  return {"codec": c.codec, "levels": chosen_levels(config), "dtype": c.dtype,
          "min_size": c.min_size}


def _levels(config: ml_collections.ConfigDict) -> list[levels_lib.Level]:
  # Only names, patterns and periods matter here, not the optimizers.
  return levels_lib.levels_from_config(
      config.levels, tokens_per_step=state_lib.tokens_per_step(config), schedule=0.0,
      make_transform=lambda cfg, lr: optax.identity())


def chosen_levels(config: ml_collections.ConfigDict) -> list[str]:
  levels = _levels(config)
  periods = {level.name: level.period for level in levels}
  if config.compression.levels:
    names = fields.names(config.compression.levels)
    unknown = [n for n in names if n not in periods]
    if unknown:
      raise UserError(f"config.compression.levels names {unknown}, which are not levels of "
                      f"this config; its levels are {sorted(periods)}.")
    return list(names)
  slowest = max(periods.values())
  if slowest <= 1:
    raise UserError(
        f"No level of this config is slower than one step (levels {periods}, periods in "
        f"steps), so there is no rarely written level to compress by default. Name the levels "
        f"to compress, e.g. --config.compression.levels={next(iter(periods))}.")
  return [name for name, period in periods.items() if period == slowest]


def level_owners(config: ml_collections.ConfigDict, params: Any) -> dict[str, str]:
  """Parameter path -> the name of the level that owns (writes) it."""
  labels = levels_lib.label_params(_levels(config), params)
  return {levels_lib.param_path(kp): name
          for kp, name in jax.tree_util.tree_flatten_with_path(labels)[0]}


def selected_paths(config: ml_collections.ConfigDict, params: Any, chosen: list[str],
                   min_size: int) -> list[str]:
  owners = level_owners(config, params)
  paths = ctree.select(params, lambda path: owners[path] in chosen, min_size=min_size)
  if not paths:
    raise UserError(f"Levels {chosen} own no floating-point tensor of at least "
                    f"config.compression.min_size={min_size} elements: nothing to compress. "
                    f"Lower min_size or choose other levels.")
  return paths


def directory(workdir: str, step: int, s: dict[str, Any]) -> str:
  name = f"step_{step}-{s['codec']}" + (f"-{s['dtype']}" if s["dtype"] else "")
  return os.path.join(os.path.abspath(workdir), "compressed", name)


def totals(rows: list[dict[str, Any]], params: Any) -> dict[str, Any]:
  dense = ctree.array_bytes(params)
  before = sum(r["bytes_before"] for r in rows)
  after = sum(r["bytes_after"] for r in rows)
  weights = sum(int(np.prod(r["shape"])) for r in rows)
  escapes = sum(r["escape_rate"] * int(np.prod(r["shape"])) for r in rows)
  return {"tensors": len(rows), "weights": weights, "bytes_before": before,
          "bytes_after": after, "bits_per_weight": 8 * after / weights,
          "escape_rate": escapes / weights, "params_bytes_before": dense,
          "params_bytes_after": dense - before + after}


def report_markdown(rows: list[dict[str, Any]], total: dict[str, Any], meta: dict[str, Any]) -> str:
  s = meta["settings"]
  lines = [f"# JIT-Delta compression of step {meta['step']} ({s['codec']}"
           + (f", cast to {s['dtype']}" if s["dtype"] else "") + ")", "",
           f"Levels: {', '.join(s['levels'])}; tensors of at least {s['min_size']} elements.", "",
           "| tensor | shape | dtype | bytes before | bytes after | bits/weight | escapes |",
           "|---|---|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['path']} | {'×'.join(map(str, r['shape']))} | {r['dtype']}→"
                 f"{r['stored_dtype']} | {r['bytes_before']:,} | {r['bytes_after']:,} | "
                 f"{r['bits_per_weight']:.3f} | {100 * r['escape_rate']:.4f}% |")
  lines += [f"| **all {total['tensors']}** | {total['weights']:,} weights | | "
            f"{total['bytes_before']:,} | {total['bytes_after']:,} | "
            f"{total['bits_per_weight']:.3f} | {100 * total['escape_rate']:.4f}% |", "",
            f"All parameters: {total['params_bytes_before']:,} bytes dense → "
            f"{total['params_bytes_after']:,} bytes with these tensors compressed "
            f"({total['params_bytes_after'] / total['params_bytes_before']:.3f}×).", ""]
  return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  s = settings(config)
  if jax.process_count() > 1:
    raise UserError("--mode=compress gathers the parameters on one host: run it as a single "
                    "process (without --distributed); the checkpoint restores onto any mesh.")
  exp = state_lib.build(config)
  mngr, step = state_lib.latest_step(exp, workdir)
  out = directory(workdir, step, s)
  if os.path.exists(out):
    meta = ctree.read_manifest(out)["metadata"]
    if meta.get("settings") != s:
      raise UserError(f"{out} already holds a compressed copy made with other settings "
                      f"({meta.get('settings')}, now {s}). Nothing was overwritten: remove "
                      f"that directory to write it again with the new settings.")
    logging.info("%s already holds this compressed checkpoint; its report:", out)
  else:
    params = jax.device_get(checkpoint.restore(mngr, step, state_lib.abstract_state(exp),
                                               workdir, params_only=True)["params"])
    paths = selected_paths(config, params, s["levels"], s["min_size"])
    logging.info("Compressing %d tensors of levels %s with codec %s...", len(paths),
                 s["levels"], s["codec"])
    compressed = ctree.compress(params, paths, s["codec"], dtype=s["dtype"] or None)
    rows = ctree.report(params, compressed)
    meta = {"step": step, "settings": s, "record": exp.record, "rows": rows,
            "totals": totals(rows, params)}
    if jax.process_index() == 0:
      ctree.save(out, compressed, meta)
      with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(rows, meta["totals"], meta))
  t = meta["totals"]
  logging.info("Wrote %s: %d tensors, %s → %s bytes (%.3f bits/weight, escapes %.4f%%); all "
               "parameters %s → %s bytes. Per-tensor report: %s", out, t["tensors"],
               f"{t['bytes_before']:,}", f"{t['bytes_after']:,}", t["bits_per_weight"],
               100 * t["escape_rate"], f"{t['params_bytes_before']:,}",
               f"{t['params_bytes_after']:,}", os.path.join(out, "report.md"))
  return {"directory": out, **meta}


# ----------------------------------------------------------------------------- reading


def load_latest(exp: state_lib.Experiment, workdir: str) -> tuple[int, Any, str]:
  """(step, compressed tree placed on the mesh, its directory) for the latest checkpoint."""
  _, step = state_lib.latest_step(exp, workdir)
  return (step, *load(exp, workdir, step))


def load(exp: state_lib.Experiment, workdir: str, step: int) -> tuple[Any, str]:
  """(compressed tree of checkpoint `step` placed on the mesh, its directory)."""
  s = settings(exp.config)
  where = directory(workdir, step, s)
  if not os.path.isdir(where):
    raise UserError(f"No {s['codec']} compressed copy of step {step} in {workdir} "
                    f"({where} does not exist). Write it first: the same command with "
                    f"--mode=compress.")
  tree, meta = ctree.load(where, exp.abstract_params)
  if meta.get("settings") != s:
    raise UserError(f"{where} was compressed with settings {meta.get('settings')}, but the "
                    f"config asks for {s}. Pass the settings it was made with, or remove it "
                    f"and run --mode=compress again.")
  checkpoint.check_compatible(meta["record"], exp.record, where)
  return jax.device_put(tree, state_lib.tree_shardings(tree, exp.mesh)), where




# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class OnDevice:
  """`config.compression.train`: the chosen levels' weights stay exact-compressed on the
  device between their updates, and are re-encoded (jit_encode) on the steps they fire.

  The train state then holds ExactTensors for those leaves; the step decodes them for the
  forward pass like any compressed tree. Checkpoints stay dense (`decompress` before a
  save), so a run can resume with or without this switch, and with another capacity.
  """
  owners: dict[str, str]       # path -> the level that writes it
  capacity: dict[str, int]     # path -> escape slots

  @property
  def levels(self) -> frozenset[str]:
    """The levels whose weights are kept compressed (re-encoded on the steps they fire)."""
    return frozenset(self.owners.values())

  def _map(self, fn, tree):
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: fn(levels_lib.param_path(kp), leaf), tree, is_leaf=ctree.is_compressed)

  def _encode(self, path: str, leaf) -> tuple[Any, jax.Array]:
    """(the encoded leaf, whether its escapes overflowed their slots)."""
    t, n = jit_encode.encode_exact(leaf, self.capacity[path])
    return t, n > self.capacity[path]

  def compress(self, params) -> tuple[Any, jax.Array]:
    """(params with the chosen leaves encoded, number of leaves that overflowed); traceable."""
    overflow = []

    def encode(path, leaf):
      if path not in self.owners:
        return leaf
      t, over = self._encode(path, leaf)
      overflow.append(over)
      return t

    tree = self._map(encode, params)
    return tree, jnp.sum(jnp.stack(overflow)).astype(jnp.int32)

  def update(self, old, new, fired: dict[str, jax.Array]) -> tuple[Any, jax.Array]:
    """`new` (dense) with each chosen leaf re-encoded if its level fired, else the old
    encoding kept (a skipped step leaves the weights unchanged, bit for bit); traceable."""
    overflow = []
    old_leaves = dict(ctree.leaves_with_paths(old))

    def reencode(path, leaf):
      if path not in self.owners:
        return leaf
      kept = old_leaves[path]
      t, over = lax.cond(fired[self.owners[path]], lambda: self._encode(path, leaf),
                         lambda: (kept, jnp.bool_(False)))
      overflow.append(over)
      return t

    tree = self._map(reencode, new)
    return tree, jnp.sum(jnp.stack(overflow)).astype(jnp.int32)


def on_device(config: ml_collections.ConfigDict, abstract_params: Any) -> OnDevice | None:
  """The `config.compression.train` plan for these parameters, or None when it is off."""
  c = config.compression
  if not c.train:
    return None
  s = settings(config)
  if s["codec"] != "exact" or s["dtype"]:
    raise UserError(
        f"config.compression.train keeps weights compressed between updates, which needs "
        f"the exact codec in the parameters' own dtype (codec={s['codec']!r}, dtype="
        f"{s['dtype']!r}): an int4 or down-cast copy would round every update away. Use "
        f"--config.compression.codec=exact --config.compression.dtype=''.")
  if not 0 < c.escape_capacity <= 1:
    raise UserError(f"config.compression.escape_capacity={c.escape_capacity} must be a "
                    f"fraction of each tensor's weights in (0, 1], e.g. 0.01.")
  owner = level_owners(config, abstract_params)
  paths = selected_paths(config, abstract_params, s["levels"], s["min_size"])
  sizes = {path: math.prod(leaf.shape) for path, leaf in ctree.leaves_with_paths(abstract_params)}
  return OnDevice(owners={p: owner[p] for p in paths},
                  capacity={p: max(64, math.ceil(c.escape_capacity * sizes[p])) for p in paths})
