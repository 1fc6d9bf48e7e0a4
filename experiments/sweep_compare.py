"""Several sweeps of one field on one plot: e.g. every model's learning-rate sweep of the fair
mini protocol, with the seeds at each model's best rate.

  python -m experiments.sweep_compare runs/mini_lr runs/mini_seeds --out=docs/mini_lr.png

Each `<root>/<name>/results.csv` a sweep wrote (`--mode=sweep`) is one series, named by its
directory (`transformer`, `hope`, ...); series of the same name share a colour across roots.
The x-axis is the first numeric column the sweeps share; each point is the mean over its seeds
with their sample standard deviation as an error bar, and a point that diverged is a × in its
series' colour above every value. A markdown table of the same means is printed.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from typing import Any

from experiments import mqar_report, sweep
from nested.errors import UserError

FIXED_COLUMNS = ("point", "seed", "step", "diverged_at_step")


def read_series(root: str) -> dict[str, dict[str, Any]]:
  """{name: {"axes": [...], "metric": key, "rows": [{axis: value, seed, value, diverged}]}}."""
  series = {}
  paths = glob.glob(os.path.join(root, "*", "results.csv"))
  for path in sorted(paths, key=lambda p: (mqar_report.rank(_name(p)), _name(p))):
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      columns = list(reader.fieldnames or [])
      rows = list(reader)
    metric = columns[columns.index("diverged_at_step") - 1]
    axes = [c for c in columns if c not in FIXED_COLUMNS and c != metric]
    series[_name(path)] = {
        "axes": axes, "metric": metric,
        # The rows of the sweep that wrote them (sweep.gather), for sweep.summarize.
        "rows": [{"axes": {a: sweep.parse_value(r[a]) for a in axes},
                  "value": float(r[metric]) if r[metric] else None,
                  "diverged": int(r["diverged_at_step"]) if r["diverged_at_step"] else None}
                 for r in rows]}
  if not series:
    raise UserError(f"No sweep results under {root}/<name>/results.csv: run the sweeps "
                    f"(--mode=sweep --workdir={root}/<name>) first.")
  return series


def _name(results_csv: str) -> str:
  return os.path.basename(os.path.dirname(results_csv))


def shared_axis(all_series: list[dict[str, Any]]) -> str:
  common = set.intersection(*(set(s["axes"]) for s in all_series))
  for axis in all_series[0]["axes"]:
    if axis in common and all(sweep.is_number(r["axes"][axis])
                              for s in all_series for r in s["rows"]):
      return axis
  raise UserError(f"The sweeps share no numeric swept field (theirs: "
                  f"{sorted({a for s in all_series for a in s['axes']})}); compare sweeps of "
                  f"one field, e.g. train.lr.")


def summarize(series: dict[str, Any], axis: str) -> list[dict[str, Any]]:
  """`sweep.summarize` over `axis` alone, by its value: mean and sample sd ("spread") of the
  finished seeds, their number ("n") and the diverged seeds' steps, with "x" the value."""
  summary = sweep.summarize(series["rows"], [axis])
  return sorted(({**s, "x": s["axes"][axis]} for s in summary), key=lambda s: s["x"])


def label(name: str) -> str:
  return mqar_report.LABELS.get(name, name)


def summaries(every: list[dict[str, dict]], axis: str) -> list[dict[str, list[dict]]]:
  """`summarize` of every series of every root, computed once for the table and the plot."""
  return [{name: summarize(s, axis) for name, s in series.items()} for series in every]


def _tag(root: str) -> str:
  return os.path.basename(os.path.normpath(root))


def _xs(summed: list[dict[str, list[dict]]]) -> list:
  return sorted({e["x"] for series in summed for entries in series.values() for e in entries})


def markdown(roots: list[str], summed: list[dict[str, list[dict]]]) -> str:
  xs = _xs(summed)
  lines = [f"| series | {' | '.join(f'{x:g}' for x in xs)} |", "|---|" + "---:|" * len(xs)]
  for root, series in zip(roots, summed):
    for name, entries in series.items():
      by_x = {e["x"]: e for e in entries}
      cells = [_cell(by_x.get(x)) for x in xs]
      lines.append(f"| {label(name)} ({_tag(root)}) | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _cell(entry) -> str:
  if entry is None:
    return ""
  if entry["mean"] is None:
    return f"diverged (step {entry['diverged'][0]})" if entry["diverged"] else "not run"
  digits = 2 if abs(entry["mean"]) >= 1 else 3    # perplexities, and accuracies below 1
  spread = f" ± {entry['spread']:.{digits}f} ({entry['n']} seeds)" if entry["n"] > 1 else ""
  return f"{entry['mean']:.{digits}f}{spread}"


def plot(roots: list[str], summed: list[dict[str, list[dict]]], metric: str, axis: str,
         path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the plot needs it)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  names = list(dict.fromkeys(n for series in summed for n in series))
  colour = {n: f"C{i}" for i, n in enumerate(names)}
  fig, ax = plt.subplots(figsize=(7.5, 4.6))
  top = max(e["mean"] for series in summed for entries in series.values() for e in entries
            if e["mean"] is not None)
  for root, series in zip(roots, summed):
    for name, entries in series.items():
      done = [e for e in entries if e["mean"] is not None]
      many = len(done) > 1
      ax.errorbar([e["x"] for e in done], [e["mean"] for e in done],
                  yerr=[e["spread"] for e in done], color=colour[name], capsize=4,
                  marker="o" if many else "s", ms=5 if many else 8, ls="-" if many else "none",
                  mfc=None if many else "none", mew=1.5, label=f"{label(name)} ({_tag(root)})")
      lost = [e["x"] for e in entries if e["mean"] is None and e["diverged"]]
      # A diverged point has no value, but where it lies matters: above every value.
      ax.plot(lost, [1.04 * top] * len(lost), "x", color=colour[name], ms=10, mew=2.5,
              ls="none")
  xs = _xs(summed)
  if xs[0] > 0 and xs[-1] / xs[0] >= 8:
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.minorticks_off()
  ax.set(xlabel=axis, ylabel=metric,
         title=f"{metric} against {axis} (×: diverged, in its series' colour; "
               f"error bars: sd over seeds)")
  ax.title.set_fontsize(9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("roots", nargs="+", help="directories holding <name>/results.csv")
  parser.add_argument("--out", default=None,
                      help="the plot's path (default <first root>/compare.png)")
  args = parser.parse_args(argv[1:])
  try:
    every = [read_series(root) for root in args.roots]
    axis = shared_axis([s for series in every for s in series.values()])
  except UserError as e:
    sys.exit(f"error: {e}")
  out = args.out or os.path.join(args.roots[0], "compare.png")
  summed = summaries(every, axis)
  metric = next(iter(every[0].values()))["metric"]
  plot(args.roots, summed, metric, axis, out)
  print(markdown(args.roots, summed))
  print(f"→ {out}")


if __name__ == "__main__":
  main(sys.argv)
