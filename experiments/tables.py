"""`--mode=tables`: the paper's Table 1 (or its ablation table), our rows beside the paper's.

    python main.py --mode=tables --config=configs/tables.py:mini --workdir=runs/tables
    python main.py --mode=tables --config=configs/tables.py:ablation --workdir=runs/ablation

`--config` is a tables config (configs/tables.py): the paper size to compare with and a list
of runs `(label, config spec, workdir)`. For each run the table reads `eval.json` (validation
perplexity) and `zeroshot.json` (the lm-evaluation-harness tasks); a run with a checkpoint but
no `zeroshot.json` is evaluated first (`--mode=zeroshot` with its own config). Missing numbers
are shown as "—" with a footnote saying why, never guessed. Runs that share a label (seeds)
are combined into one row, "mean ± sample standard deviation". The table goes to
`<workdir>/table1.md`.

The ablation config names a sweep instead (configs/sweeps/hope_ablation.py, run with
`--mode=sweep` into the same workdir): every finished point's validation perplexity, seeds
combined per label, beside the arXiv version's Table 6 → `<workdir>/ablation.md`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import ml_collections
from absl import logging

from experiments import checkpoint, sweep, zeroshot
from nested.errors import UserError

# (header, task, metric); the last 8 are the accuracies that make the paper's "Avg".
COLUMNS = (("Wiki ppl↓", "wikitext", "word_perplexity"),
           ("LMB ppl↓", "lambada_openai", "perplexity"),
           ("LMB acc", "lambada_openai", "acc"),
           ("PIQA acc", "piqa", "acc"),
           ("Hella acc_n", "hellaswag", "acc_norm"),
           ("Wino acc", "winogrande", "acc"),
           ("ARC-e acc", "arc_easy", "acc"),
           ("ARC-c acc_n", "arc_challenge", "acc_norm"),
           ("SIQA acc", "siqa", "acc"),
           ("BoolQ acc", "boolq", "acc"))
ACCURACIES = COLUMNS[2:]

# SPEC §4: NeurIPS 2025 Table 1, accuracies in percent.
PAPER_NEURIPS = {
    "1.3B": {
        "Transformer++": (18.53, 18.32, 42.60, 70.02, 50.23, 53.51, 68.83, 35.10, 40.66, 57.09, 52.25),
        "Titans (LMM)": (15.60, 11.41, 49.14, 73.09, 56.31, 59.81, 72.43, 40.82, 42.05, 60.97, 56.82),
        "HOPE": (15.11, 11.63, 50.01, 73.29, 56.84, 60.19, 72.30, 41.24, 42.52, 61.46, 57.23),
    },
    "760M": {
        "Transformer++": (25.21, 27.64, 35.78, 66.92, 42.19, 51.95, 60.38, 32.46, 39.51, 60.37, 48.69),
        "Titans (LMM)": (20.04, 21.96, 37.40, 69.28, 48.46, 52.27, 66.31, 35.84, 40.13, 62.76, 51.56),
        "HOPE": (20.53, 20.47, 39.02, 70.13, 49.21, 52.70, 66.89, 36.05, 40.71, 63.29, 52.26),
    },
}
# SPEC §4: the arXiv version (2512.24695) reports only these columns of the 1.3B rows.
PAPER_ARXIV_1P3B = {"Transformer++": {"Wiki ppl↓": 17.92, "LMB ppl↓": 17.73, "Avg": 53.38},
                    "HOPE": {"Wiki ppl↓": 14.39, "LMB ppl↓": 10.08, "Avg": 58.04}}


# The arXiv version's ablation of HOPE (Table 6), perplexity, keyed by the row labels of
# configs/sweeps/hope_ablation.py.
PAPER_ABLATION = {"HOPE (full)": 12.24, "w/o DGD": 13.41, "w/o momentum": 13.58,
                  "w/o weight decay": 13.71, "w/o CMS": 13.04,
                  "w/o inner projection of k": 13.77, "w/o inner projection of v": 13.90,
                  "w/o inner projection of q": 12.19}


def read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def run_row(label: str, zeroshot_results: dict[str, Any] | None,
            eval_results: dict[str, Any] | None) -> tuple[dict[str, float | None], list[str]]:
  """One row of values (accuracies in percent) and the reasons for its gaps."""
  notes, row = [], {}
  tasks = (zeroshot_results or {}).get("tasks", {})
  if zeroshot_results is None:
    notes.append(f"{label}: no zeroshot.json (no checkpoint to evaluate?)")
  for header, task, metric in COLUMNS:
    entry = tasks.get(task, {})
    value = entry.get(metric)
    row[header] = None if value is None else (100 * value if (header, task, metric) in ACCURACIES
                                              else value)
    if zeroshot_results is not None and value is None:
      notes.append(f"{task}: {entry.get('skipped', 'not evaluated')}")
  accuracies = [row[h] for h, _, _ in ACCURACIES]
  row["Avg"] = sum(accuracies) / len(accuracies) if None not in accuracies else None
  row["val ppl↓"] = (eval_results or {}).get("perplexity")
  return row, notes


def fmt(value: float | None) -> str:
  return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def combine(rows: list[dict[str, float | None]]) -> dict[str, str]:
  """Seeds of one label → "mean ± sample std" per column (a column missing in any run: —)."""
  combined = {}
  for header in rows[0]:
    values = [r[header] for r in rows]
    if None in values:
      combined[header] = "—"
    elif len(values) == 1:
      combined[header] = fmt(values[0])
    else:
      mean = sum(values) / len(values)
      std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
      combined[header] = f"{mean:.2f} ± {std:.2f}"
  return combined


def markdown(size: str, ours: dict[str, list[dict[str, float | None]]], notes: list[str]) -> str:
  headers = ["Model", "source"] + [h for h, _, _ in COLUMNS] + ["Avg", "val ppl↓"]
  lines = [f"Table 1 ({size}): paper rows (NeurIPS 2025 Table 1; arXiv 2512.24695 where it "
           f"reports the column) beside ours. Accuracies in %.", "",
           "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for model, values in PAPER_NEURIPS.get(size, {}).items():
    lines.append(f"| {model} | paper (NeurIPS) | " + " | ".join(f"{v:.2f}" for v in values)
                 + " | — |")
    if size == "1.3B" and model in PAPER_ARXIV_1P3B:
      arxiv = PAPER_ARXIV_1P3B[model]
      lines.append(f"| {model} | paper (arXiv) | "
                   + " | ".join(fmt(arxiv.get(h)) for h, _, _ in COLUMNS)
                   + f" | {fmt(arxiv.get('Avg'))} | — |")
  for label, rows in ours.items():
    source = f"ours ({len(rows)} runs)" if len(rows) > 1 else "ours"
    row = combine(rows)
    lines.append(f"| {label} | {source} | " + " | ".join(row[h] for h in headers[2:]) + " |")
  if notes:
    lines += ["", "Gaps:"] + [f"* {n}" for n in dict.fromkeys(notes)]
  return "\n".join(lines) + "\n"


def ablation_markdown(ours: dict[str, list[float]],
                      diverged: dict[str, list[int]] | None = None) -> str:
  """The paper's ablation column beside ours (validation perplexity, mean ± std over seeds);
  `diverged` maps a label to the steps at which its seeds' runs stopped at a NaN or inf."""
  diverged = diverged or {}
  lines = ["HOPE ablation: the paper's perplexity (arXiv 2512.24695 Table 6) beside our "
           "validation perplexity (HOPE `tiny`, mini protocol).", "",
           "| variant | paper ppl↓ | ours val ppl↓ | seeds | per seed |",
           "|---|---:|---:|---:|---|"]
  gaps = []
  for label in dict.fromkeys([*PAPER_ABLATION, *ours]):
    values, lost = ours.get(label, []), diverged.get(label, [])
    paper = fmt(PAPER_ABLATION.get(label))
    if not values and not lost:
      gaps.append(label)
    mean = combine([{"ppl": v} for v in values])["ppl"] if values else "—"
    per_seed = [f"{v:.2f}" for v in values] + [f"diverged at step {s}" for s in lost]
    lines.append(f"| {label} | {paper} | {mean} | {len(values)} | {', '.join(per_seed)} |")
  if gaps:
    lines += ["", "No runs of: " + "; ".join(gaps) + " (a row the sweep does not define has no "
              "switch in our model; one it defines has not finished)."]
  if any(diverged.values()):
    lines += ["", "A diverged seed (its run stopped at a NaN or inf) is left out of the mean."]
  return "\n".join(lines) + "\n"


def run_ablation(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Reads each point of the ablation sweep (its workdir under `workdir`) into the table."""
  spec = sweep.load_config(config.sweep)
  ours: dict[str, list[float]] = {}
  diverged: dict[str, list[int]] = {}
  for point in sweep.expand(spec):
    point_dir = os.path.join(workdir, point.name)
    label = point.axes[sweep.LABEL]
    values, lost = ours.setdefault(label, []), diverged.setdefault(label, [])
    if sweep.is_finished(point_dir, sweep.point_config(spec, point)):
      values.append(read_json(os.path.join(point_dir, "eval.json"))["perplexity"])
    elif (step := sweep.diverged_at(point_dir)) is not None:
      lost.append(step)
  table = ablation_markdown(ours, diverged)
  with open(os.path.join(workdir, "ablation.md"), "w") as f:
    f.write(table)
  logging.info("Ablation table written to %s:\n%s", os.path.join(workdir, "ablation.md"), table)
  return table


def evaluate_if_needed(spec: str, workdir: str) -> None:
  """Runs the zero-shot tasks on a run that has a checkpoint but no zeroshot.json yet."""
  if os.path.exists(os.path.join(workdir, "zeroshot.json")):
    return
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    logging.warning("%s has no checkpoints: its row stays empty.", workdir)
    return
  logging.info("zero-shot evaluation of %s (%s)", workdir, spec)
  zeroshot.run(sweep.load_config(spec), workdir)


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  if "sweep" in config:
    return run_ablation(config, workdir)
  if "runs" not in config or "size" not in config:
    raise UserError("--mode=tables takes a tables config (configs/tables.py:<name>) with `size` "
                    "and `runs`, e.g. --config=configs/tables.py:mini.")
  if config.size not in PAPER_NEURIPS:
    raise UserError(f"config.size={config.size!r}; the paper's tables are {sorted(PAPER_NEURIPS)}.")
  ours: dict[str, list] = {}
  notes = []
  for label, spec, run_dir in config.runs:
    if config.evaluate:
      evaluate_if_needed(spec, run_dir)
    row, row_notes = run_row(label, read_json(os.path.join(run_dir, "zeroshot.json")),
                             read_json(os.path.join(run_dir, "eval.json")))
    ours.setdefault(label, []).append(row)  # runs sharing a label (seeds) are combined
    notes += row_notes
  table = markdown(config.size, ours, notes)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "table1.md"), "w") as f:
    f.write(table)
  logging.info("Table 1 written to %s:\n%s", os.path.join(workdir, "table1.md"), table)
  return table
