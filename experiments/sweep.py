"""`--mode=sweep`: train every point of a sweep config, one after another, each in its own
sub-workdir, and gather the metric into `results.md`, `results.csv` and `results.png`.

A sweep config is a file `configs/sweeps/<name>.py` whose `get_config()` returns `define(...)`:

  from experiments import sweep

  def get_config():
    return sweep.define(
        base="configs/transformer.py:slow_mlp",            # what every point starts from
        grid={"levels.slow.period": [2048, 8192, 32768]},  # cartesian product, first axis slowest
        seeds=[0, 1],                                      # sets config.seed
        fixed={"train.steps": 300},                        # the same for every point
        metric="eval.json:perplexity")                     # <file in a point's workdir>:<key>

`points=[{"label": "2 levels", "model.cms_periods": "16,8192", ...}, ...]` lists points
explicitly (for fields that must change together); with a grid as well, every point is
crossed with every grid combination. `label` (optional) names the point in the results.

The returned ConfigDict holds `base`, `grid`, `points`, `seeds`, `metric` and `fixed`, which is
the whole base config with `fixed` applied; so `--config.fixed.<field>=v` changes one field of
every point (e.g. `--config.fixed.train.steps=50`) and `--config.seeds='(0,)'` runs one seed.

Points run in the order seeds (outermost), points, grid; a point's sub-workdir is named from
its overrides, e.g. `levels.slow.period=8192,seed=0`. A point whose eval.json reports
`config.train.steps` steps is skipped; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import importlib.util
import itertools
import json
import math
import os
import re
import shlex
import time
from typing import Any, Mapping, Sequence

import ml_collections
from absl import flags, logging

from experiments import checkpoint, metrics as metrics_lib, state as state_lib, train
from nested import models
from nested.errors import UserError

DEFAULT_METRIC = "eval.json:perplexity"
LABEL = "label"  # the one key of a `points` entry that is not a config field
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- the sweep config


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:arg]` → that file's `get_config(arg)`, as `--config=path.py:arg` loads it.

  The path is taken relative to the current directory, then to the repository root, so a
  sweep's `base` works wherever main.py is run from.
  """
  path, _, arg = spec.partition(":")
  candidates = [path] if os.path.isabs(path) else [path, os.path.join(REPO, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise UserError(f"The sweep's base config {spec!r} names no file ({path} is neither in the "
                    f"current directory nor in {REPO}). Write it as configs/<model>.py:<preset>, "
                    f"e.g. configs/transformer.py:slow_mlp.")
  module_spec = importlib.util.spec_from_file_location(
      "_sweep_base_" + re.sub(r"\W", "_", path), found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg) if arg else module.get_config()
  except ValueError as e:  # the config files' way of rejecting a preset
    raise UserError(f"The sweep's base config {spec!r} could not be loaded: {e}") from e


def define(*, base: str, grid: Mapping[str, Sequence[Any]] | None = None,
           points: Sequence[Mapping[str, Any]] | None = None, seeds: Sequence[int] = (0,),
           fixed: Mapping[str, Any] | None = None,
           metric: str = DEFAULT_METRIC) -> ml_collections.ConfigDict:
  """The ConfigDict a sweep file's `get_config()` returns (see the module docstring)."""
  grid = dict(grid or {})
  for path, values in grid.items():
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
      raise UserError(f"The sweep's grid maps {path!r} to {values!r}; each grid field needs a "
                      f"non-empty list of values, e.g. {{{path!r}: [1, 2]}}.")
  c = ml_collections.ConfigDict()
  c.base = base
  c.fixed = override(load_config(base), dict(fixed or {}), where="fixed", base=base)
  # Pairs, not a dict: ConfigDict sorts its keys, and the first axis is the plot's x-axis.
  c.grid = tuple((path, tuple(values)) for path, values in grid.items())
  c.points = tuple(dict(p) for p in points or ())
  c.seeds = tuple(int(s) for s in seeds)
  c.metric = metric
  return c


def leaf_paths(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Every field of `config` as {"section.field": value}, in the config's own order."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(leaf_paths(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def parse_value(text: str) -> Any:
  """A value typed on a command line: '8' -> 8, '1e-3' -> 0.001, 'true' -> True; anything
  else stays a string."""
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_assignments(items: Sequence[str], *, flag: str, example: str,
                      prefix: str = "") -> dict[str, Any]:
  """['section.field=8', ...], as typed after `flag` -> {prefix + 'section.field': 8}."""
  out = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not (sep and key):
      raise UserError(f"{flag} item {item!r} is not field=value; write e.g. {flag}={example}.")
    out[prefix + key] = parse_value(value)
  return out


def override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any], *, where: str,
             base: str, owner: str = "The sweep's") -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` ({"section.field": value}) applied; a field the config
  lacks or a value of the wrong type is a UserError that names it (as `owner` `where`)."""
  config = config.copy_and_resolve_references()
  fields = leaf_paths(config)
  for path, value in overrides.items():
    if path not in fields:
      close = difflib.get_close_matches(path, fields, n=2)
      hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
      raise UserError(f"{owner} {where} names {path!r}, which is not a field of {base}.{hint} "
                      f"Fields are written section.field, as in --config.section.field.")
    try:
      config.update_from_flattened_dict({path: value})
    except (TypeError, ValueError) as e:
      raise UserError(f"{owner} {where} sets {path}={value!r}, but that field holds "
                      f"{type(fields[path]).__name__} values in {base} ({e}).") from e
  return config


# ---------------------------------------------------------------- points


@dataclasses.dataclass(frozen=True)
class Point:
  name: str                  # the sub-workdir's name
  axes: dict[str, Any]       # what varies apart from the seed: "label" and/or grid fields
  seed: int
  fields: dict[str, Any]     # set by the `points` entry
  combo: dict[str, Any]      # set by the grid

  @property
  def overrides(self) -> dict[str, Any]:
    return {**self.fields, **self.combo, "seed": self.seed}


def value_text(value: Any) -> str:
  """A value as it appears in a point's name: short, and safe as a directory name."""
  if isinstance(value, bool):
    text = str(value).lower()
  elif isinstance(value, (tuple, list)):
    text = "_".join(value_text(v) for v in value)
  else:
    text = repr(value) if isinstance(value, float) else str(value)
  # ',' separates a name's parts and '/' would nest directories: only these characters stay.
  return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def point_axes(entry: Mapping[str, Any]) -> dict[str, Any]:
  """What names a `points` entry: its label, or else its fields and values."""
  if LABEL in entry:
    return {LABEL: entry[LABEL]}
  return {path: value for path, value in entry.items()}


def expand(sweep: ml_collections.ConfigDict) -> list[Point]:
  """Every point of the sweep: seeds outermost, so a sweep cut short has already run every
  value once; then the `points` entries; then the grid, first axis slowest."""
  entries = [dict(p) for p in sweep.points] or [{}]
  grid_paths = [path for path, _ in sweep.grid]
  combos = [dict(zip(grid_paths, values)) for values in
            itertools.product(*(values for _, values in sweep.grid))]
  if "seed" in grid_paths or any("seed" in e for e in entries):
    raise UserError("The sweep sets `seed` in its grid or points; list the seeds in `seeds` "
                    "instead, so the results average over them.")
  out = []
  for seed in sweep.seeds:
    for entry in entries:
      shared = set(entry) & set(grid_paths)
      if shared:
        raise UserError(f"The sweep sets {sorted(shared)} in both its grid and its points; set "
                        f"each field in one of them.")
      for combo in combos:
        axes = {**(point_axes(entry) if entry else {}), **combo}
        fields = {k: v for k, v in entry.items() if k != LABEL}
        name = ",".join([f"{k}={value_text(v)}" if k != LABEL else value_text(v)
                         for k, v in axes.items()] + [f"seed={seed}"])
        out.append(Point(name, axes, seed, fields, combo))
  names = [p.name for p in out]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise UserError(f"Two points of the sweep get the same workdir name {duplicates[0]!r}; give "
                    f"the points distinct `label`s.")
  return out


def point_config(sweep: ml_collections.ConfigDict, point: Point) -> ml_collections.ConfigDict:
  """`fixed`, then the point's own fields; an error says which part of the sweep is wrong."""
  config = sweep.fixed
  for where, part in (("points", point.fields), ("grid", point.combo),
                      ("seeds", {"seed": point.seed})):
    config = override(config, part, where=where, base=sweep.base)
  return config


def check_not_fixed(sweep: ml_collections.ConfigDict, points: Sequence[Point]) -> None:
  """A swept field changed through --config.fixed would be silently overwritten: say so."""
  base = leaf_paths(load_config(sweep.base))
  fixed = leaf_paths(sweep.fixed)
  swept = {path for p in points for path in p.overrides if path != "seed"}
  both = sorted(path for path in swept if fixed[path] != base[path])
  if both:
    raise UserError(f"{both[0]} is both swept and fixed (--config.fixed.{both[0]} or the sweep "
                    f"file's `fixed`); the sweep's values would win. Drop one of them.")


# ---------------------------------------------------------------- point workdirs


def json_view(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as train.py's config.json records it (tuples become lists)."""
  return json.loads(json.dumps(config.to_dict()))


DIVERGED_FILE = "diverged.json"


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def is_finished(point_dir: str, config: ml_collections.ConfigDict) -> bool:
  path = os.path.join(point_dir, "eval.json")
  return os.path.exists(path) and read_json(path).get("step") == config.train.steps


def diverged_at(point_dir: str) -> int | None:
  """The step at which a point's run stopped at a NaN or inf (its diverged.json), else None."""
  path = os.path.join(point_dir, DIVERGED_FILE)
  return read_json(path)["step"] if os.path.exists(path) else None


def check_workdir_matches(point_dir: str, config: ml_collections.ConfigDict,
                          base: ml_collections.ConfigDict) -> None:
  """A point workdir left by a different config would be skipped with stale results or
  resumed into a mix: refuse it. More steps than before is fine (training resumes), and so is
  a field the record lacks (added to the code after the point ran) that the point sets to
  what the run had: a model field at the model's dataclass default (the rule a checkpoint
  resumes by, `checkpoint.check_compatible`), any other at the base config's value. The
  models' execution fields (`remat`, ...) may differ: they change how a point computes, not
  what."""
  path = os.path.join(point_dir, "config.json")
  if not os.path.exists(path):
    return
  recorded = leaf_paths(ml_collections.ConfigDict(read_json(path)))
  wanted = leaf_paths(ml_collections.ConfigDict(json_view(config)))
  ran_with = leaf_paths(ml_collections.ConfigDict(json_view(base)))
  ran_with.update({f"model.{k}": v for k, v in
                   models.field_defaults(wanted.get("model.name")).items()})
  added = [k for k in wanted if k not in recorded and wanted[k] == ran_with.get(k, _MISSING)]
  execution = {f"model.{k}" for k in models.EXECUTION_FIELDS}
  differ = [k for k in sorted(set(recorded) | set(wanted))
            if k not in added and k not in execution
            and recorded.get(k, _MISSING) != wanted.get(k, _MISSING)]
  if "train.steps" in differ and recorded["train.steps"] < wanted["train.steps"]:
    differ.remove("train.steps")
  if differ:
    shown = ", ".join(f"{k} ({_shown(recorded, k)} there, {_shown(wanted, k)} now)"
                      for k in differ[:3])
    raise UserError(f"{point_dir} holds a run of a different config: {shown}"
                    f"{' and more' if len(differ) > 3 else ''}. Give the sweep a new --workdir, "
                    f"or delete that directory to rerun the point.")
  if added:
    logging.info("%s was recorded before the config had %s; it runs at the default (%s).",
                 point_dir, ", ".join(added), ", ".join(repr(wanted[k]) for k in added))


_MISSING = object()


def _shown(fields: dict[str, Any], key: str) -> str:
  return repr(fields[key]) if key in fields else "absent"


def format_flag_value(value: Any) -> str:
  """A value as config_flags parses it back from --config.<field>=<text>."""
  if isinstance(value, bool):
    return str(value).lower()
  if isinstance(value, float):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value)


def command_line(base_spec: str, base: ml_collections.ConfigDict,
                 config: ml_collections.ConfigDict, point_dir: str) -> str:
  """The plain `main.py` invocation that trains this point: every field that differs from
  the base preset, as a --config override."""
  wanted, default = leaf_paths(config), leaf_paths(base)
  args = ["python", "main.py", f"--config={base_spec}"]
  args += [f"--config.{k}={format_flag_value(v)}" for k, v in wanted.items()
           if v != default[k] or type(v) is not type(default[k])]
  args.append(f"--workdir={point_dir}")
  return " ".join(shlex.quote(a) for a in args)


# ---------------------------------------------------------------- results


def parse_metric(metric: str) -> tuple[str, str]:
  file, _, key = metric.partition(":")
  if not key or not file.endswith((".json", ".jsonl")):
    raise UserError(f"The sweep's metric {metric!r} must be <file>.json:<key> or "
                    f"<file>.jsonl:<key> (the key's last value), e.g. {DEFAULT_METRIC}.")
  return file, key


def read_metric(point_dir: str, metric: str) -> float | None:
  """The metric of a point, or None while its file does not exist."""
  file, key = parse_metric(metric)
  path = os.path.join(point_dir, file)
  if not os.path.exists(path):
    return None
  if file.endswith(".jsonl"):
    with open(path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    values = [r[key] for r in records if key in r]
    if not values:
      raise UserError(f"No record of {path} has the sweep's metric key {key!r}.")
    return values[-1]
  record = read_json(path)
  if key not in record:
    raise UserError(f"{path} has no key {key!r} (the sweep's metric); it has "
                    f"{sorted(record)}. Set the sweep's `metric` to one of them.")
  return record[key]


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for a single seed)."""
  mean = sum(values) / len(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(rows: Sequence[dict[str, Any]], axes: Sequence[str]) -> list[dict[str, Any]]:
  """One entry per combination of the non-seed axes, over the seeds that have finished."""
  groups: dict[tuple, list[float]] = {}
  diverged: dict[tuple, list[int]] = {}   # the step at which each diverged seed stopped
  for row in rows:
    key = tuple(row["axes"][a] for a in axes)
    groups.setdefault(key, [])
    diverged.setdefault(key, [])
    if row["diverged"] is not None:
      diverged[key].append(row["diverged"])
    if row["value"] is not None:
      groups[key].append(row["value"])
  out = []
  for key, values in groups.items():
    mean, spread = mean_and_spread(values) if values else (None, None)
    out.append({"axes": dict(zip(axes, key)), "mean": mean, "spread": spread, "n": len(values),
                "diverged": diverged[key]})
  return out


def cell(value: Any) -> str:
  if value is None:
    return "—"
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def results_markdown(sweep: ml_collections.ConfigDict, rows, summary, axes) -> str:
  _, key = parse_metric(sweep.metric)
  done = sum(r["value"] is not None for r in rows)
  diverged = sum(r["diverged"] is not None for r in rows)
  lines = [f"# Sweep of {sweep.base}: {sweep.metric}", "",
           f"{done} of {len(rows)} points finished"
           f"{f', {diverged} diverged (NaN or inf; left out of the means)' if diverged else ''}"
           f"; seeds {list(sweep.seeds)}. Mean ± sample standard deviation over the finished "
           f"seeds (n).", "",
           "| " + " | ".join([*axes, f"{key} (mean ± sd)", "n"]) + " |",
           "|" + "---|" * (len(axes) + 2)]
  for s in summary:
    stat = "—" if s["mean"] is None else f"{s['mean']:.4f} ± {s['spread']:.4f}"
    if s["diverged"]:
      stat = "diverged" if s["mean"] is None else f"{stat} ({len(s['diverged'])} diverged)"
    lines.append("| " + " | ".join([*(cell(s["axes"][a]) for a in axes), stat, str(s["n"])])
                 + " |")
  lines += ["", "## Every point", "",
            "| " + " | ".join(["point", *axes, "seed", "step", key]) + " |",
            "|" + "---|" * (len(axes) + 4)]
  for r in rows:
    value = (f"diverged at step {r['diverged']}" if r["diverged"] is not None
             else cell(r["value"]))
    lines.append("| " + " | ".join([f"`{r['name']}`", *(cell(r["axes"][a]) for a in axes),
                                    str(r["seed"]), cell(r["step"]), value]) + " |")
  return "\n".join(lines) + "\n"


def write_csv(path: str, rows, axes, key: str) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["point", *axes, "seed", "step", key, "diverged_at_step"])
    for r in rows:
      # repr: the CSV holds exactly the value eval.json holds.
      value = "" if r["value"] is None else repr(r["value"])
      diverged = r["diverged"]
      writer.writerow([r["name"], *(r["axes"][a] for a in axes), r["seed"],
                       "" if r["step"] is None else r["step"], value,
                       "" if diverged is None else diverged])


def is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def plot_x_axis(summary, axes) -> str | None:
  """The first axis with two or more numeric values: the plot's x-axis (else bars)."""
  for a in axes:
    values = {s["axes"][a] for s in summary}
    if len(values) > 1 and all(is_number(v) for v in values):
      return a
  return None


def write_plot(path: str, sweep: ml_collections.ConfigDict, summary, axes) -> None:
  """Metric against the first numeric axis, one line per combination of the other axes,
  error bars = spread over seeds; a bar per combination when no axis is numeric."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the sweep needs it)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  _, key = parse_metric(sweep.metric)
  done = [s for s in summary if s["mean"] is not None]
  x = plot_x_axis(done, axes)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  if x is not None:
    others = [a for a in axes if a != x]
    lines: dict[tuple, list] = {}
    for s in done:
      lines.setdefault(tuple(s["axes"][a] for a in others), []).append(s)
    for group, entries in lines.items():
      entries.sort(key=lambda s: s["axes"][x])
      label = ", ".join(f"{a}={v}" for a, v in zip(others, group)) or None
      ax.errorbar([s["axes"][x] for s in entries], [s["mean"] for s in entries],
                  yerr=[s["spread"] for s in entries], marker="o", capsize=3, label=label)
    lost = [s for s in summary if s["mean"] is None and s["diverged"]
            and is_number(s["axes"][x])]
    if lost:  # a diverged point has no value to plot, but where it lies matters
      ax.plot([s["axes"][x] for s in lost], [max(s["mean"] for s in done)] * len(lost), "x",
              color="tab:red", markersize=10, mew=2, label="diverged", linestyle="none")
    xs = sorted({s["axes"][x] for s in [*done, *lost]})
    if xs[0] > 0 and xs[-1] / xs[0] >= 8:  # periods and learning rates span decades
      ax.set_xscale("log")
      ax.set_xticks(xs, [f"{v:g}" for v in xs])
      ax.minorticks_off()
    ax.set_xlabel(x)
    if others or lost:
      ax.legend(fontsize=8)
  else:
    labels = [", ".join(str(s["axes"][a]) for a in axes) or "base" for s in done]
    bars = ax.bar(range(len(done)), [s["mean"] for s in done], yerr=[s["spread"] for s in done],
                  capsize=3, color="tab:blue")
    # Bars start at 0, so a few percent between points is hard to see: print the means.
    ax.bar_label(bars, labels=[f"{s['mean']:.4g}" for s in done], label_type="center",
                 color="white", fontsize=8)
    ax.set_xticks(range(len(done)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_xlabel(", ".join(axes))
  ax.set_ylabel(key)
  ax.set_title(f"{sweep.base}: {key}, mean ± sd over seeds {list(sweep.seeds)}", fontsize=9)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def gather(sweep: ml_collections.ConfigDict, points: Sequence[Point], workdir: str) -> list[dict]:
  """Writes results.md, results.csv and (once a point has finished) results.png; on a
  multi-host run only process 0 writes, as for the points' own JSON files."""
  axes = list(dict.fromkeys(a for p in points for a in p.axes))
  rows = []
  for p in points:
    point_dir = os.path.join(workdir, p.name)
    eval_path = os.path.join(point_dir, "eval.json")
    step = read_json(eval_path).get("step") if os.path.exists(eval_path) else None
    rows.append({"name": p.name, "axes": {a: p.axes.get(a) for a in axes}, "seed": p.seed,
                 "step": step, "value": read_metric(point_dir, sweep.metric),
                 "diverged": diverged_at(point_dir)})
  if not train.is_lead_process():
    return rows
  summary = summarize(rows, axes)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results_markdown(sweep, rows, summary, axes))
  write_csv(os.path.join(workdir, "results.csv"), rows, axes, parse_metric(sweep.metric)[1])
  if any(s["mean"] is not None for s in summary):
    write_plot(os.path.join(workdir, "results.png"), sweep, summary, axes)
  return rows


# ---------------------------------------------------------------- the mode


def prepare(sweep: ml_collections.ConfigDict, workdir: str):
  """Every point, its config and whether it has finished, all checked before anything runs."""
  parse_metric(sweep.metric)
  if not sweep.seeds:
    raise UserError("The sweep lists no seeds; set e.g. seeds=[0] (or --config.seeds='(0,)').")
  points = expand(sweep)
  configs = [point_config(sweep, p) for p in points]
  check_not_fixed(sweep, points)
  base = load_config(sweep.base)
  finished, built = [], set()
  for p, c in zip(points, configs):
    point_dir = os.path.join(workdir, p.name)
    check_workdir_matches(point_dir, c, base)
    # A diverged point would diverge again: it is done until its diverged.json is deleted.
    finished.append(is_finished(point_dir, c) or diverged_at(point_dir) is not None)
    # build() checks model, levels, mesh and data in seconds, without compute; the seed
    # changes none of that, so each config is built once, not once per seed.
    unseeded = json.dumps({**json_view(c), "seed": None}, sort_keys=True)
    if not finished[-1] and unseeded not in built:
      state_lib.build(c)
      built.add(unseeded)
  return points, configs, finished


def record_divergence(point_dir: str, error: checkpoint.Diverged) -> None:
  if train.is_lead_process():
    os.makedirs(point_dir, exist_ok=True)
    checkpoint.write_json_atomic(
        os.path.join(point_dir, DIVERGED_FILE),
        {"step": error.step, "loss": error.loss, "grad_norm": error.grad_norm,
         "message": str(error)})


def run_sweep(sweep: ml_collections.ConfigDict, workdir: str, *, dry_run: bool = False):
  points, configs, finished = prepare(sweep, workdir)
  n = len(points)
  logging.info("Sweep of %s: %d points (%d finished) in %s.", sweep.base, n, sum(finished),
               workdir)
  if dry_run:
    base = load_config(sweep.base)
    for i, (p, c, done) in enumerate(zip(points, configs, finished)):
      logging.info("point %d/%d: %s%s", i + 1, n, p.name, " (finished)" if done else "")
      print(command_line(sweep.base, base, c, os.path.join(workdir, p.name)), flush=True)
    return None
  os.makedirs(workdir, exist_ok=True)
  durations, rows = [], None
  for i, (p, c) in enumerate(zip(points, configs)):
    point_dir = os.path.join(workdir, p.name)
    if finished[i]:
      step = diverged_at(point_dir)
      logging.info("point %d/%d: %s: %s, skipped.", i + 1, n, p.name,
                   "finished" if step is None else
                   f"diverged at step {step} (delete its {DIVERGED_FILE} to retry)")
      continue
    left = n - i - sum(finished[i:])
    eta = (metrics_lib.format_duration(sum(durations) / len(durations) * left) if durations
           else "after the first point")
    logging.info("point %d/%d: %s | ETA %s", i + 1, n, p.name, eta)
    start = time.time()
    try:
      train.run(c, point_dir)
    except checkpoint.Diverged as e:
      record_divergence(point_dir, e)
      logging.warning("point %d/%d: %s diverged at step %d (loss %s, gradient norm %s): "
                      "recorded in its %s; the sweep goes on.", i + 1, n, p.name, e.step,
                      e.loss, e.grad_norm, DIVERGED_FILE)
    durations.append(time.time() - start)
    rows = gather(sweep, points, workdir)  # after every point: a long sweep can be read as it runs
  if rows is None:  # every point had finished: gather once, e.g. after a cluster run
    rows = gather(sweep, points, workdir)
  logging.info("Sweep done: results in %s/results.{md,csv,png}.", workdir)
  return rows


def run(config: ml_collections.ConfigDict, workdir: str):
  """`--mode=sweep`; main.py defines --dry_run."""
  return run_sweep(config, workdir, dry_run=flags.FLAGS.dry_run)
