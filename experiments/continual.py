"""Continual learning (`--mode=continual`): train on corpus A, then on corpus B, and measure how
much of A the model forgets.

  python main.py --mode=continual --config=configs/continual.py:hope --workdir=runs/cl/hope
  python -m experiments.continual runs/cl          # the table and plot of every run under it

`config.continual.phases` names the corpora in order, each a genre of the bundled plays
(`config.data.plays`: "comedies", "tragedies", ...) or a path to text (a `config.data.path`:
a file or a directory, e.g. the Python language reference that `python -m
experiments.corpora python_reference <dir>` writes); `config.continual.steps` the optimizer
steps of each. The phases are one run in one workdir: phase i trains (`train.train`, the
ordinary loop) up to the sum of the first i phases' steps on its corpus, resuming from the
previous phase's last checkpoint with its optimizer and level states, so the switch changes
the data and nothing else (use a constant learning rate, `train.min_lr_ratio=1`, so that the
schedule does not change at the switch either). Every `eval_every` steps a checkpoint is kept;
afterwards each kept checkpoint (and the initial parameters) is evaluated on every phase's
validation plays → `<workdir>/continual.json` and `continual.png`:

  forgetting = A's validation loss at the end − A's loss at the switch (when A was learnt)

and B's final loss. Rerunning the command resumes an interrupted run and re-evaluates.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

import ml_collections
from absl import logging

from experiments import checkpoint, evaluate, state as state_lib, train
from nested import fields
from nested.errors import UserError


def phase_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The train config of each phase: its corpus, and train.steps at the phase's end."""
  c = config.continual
  phases = fields.names(c.phases)
  steps = fields.ints(c.steps, field="config.continual.steps", example="150,150")
  if len(phases) < 2 or len(steps) != len(phases) or min(steps) < 1:
    raise UserError(f"config.continual.phases={c.phases!r} and steps={c.steps!r} must name two "
                    f"or more corpora and as many positive step counts, e.g. "
                    f"phases='comedies,tragedies' steps='150,150'.")
  if c.eval_every < 1 or any(s % c.eval_every for s in steps):
    raise UserError(f"config.continual.eval_every={c.eval_every} must divide every phase's "
                    f"steps ({c.steps}), so that each switch is evaluated.")
  if config.data.path:
    raise UserError("--mode=continual takes its corpora from config.continual.phases (genres "
                    "of the bundled plays, or paths); leave config.data.path ''.")
  out, end = [], 0
  for phase, n in zip(phases, steps):
    end += n
    p = ml_collections.ConfigDict(config.to_dict())
    if is_path(phase):
      p.data.update(dict(path=phase, plays=""))
    else:
      p.data.plays = phase
    p.train.update(dict(steps=end, checkpoint_every=c.eval_every, keep_every=c.eval_every))
    out.append(p)
  return out


def is_path(phase: str) -> bool:
  """A phase names a text file or directory (any `config.data.path`) rather than a genre:
  it has a `/` or a file extension, which no genre has."""
  return os.sep in phase or "/" in phase or bool(os.path.splitext(phase)[1])


def corpus_name(config: ml_collections.ConfigDict) -> str:
  """A phase's corpus as the results name it: its genre, or its path's last component."""
  return config.data.plays or os.path.basename(os.path.normpath(config.data.path))


def evaluate_history(configs, workdir: str) -> dict[str, list[dict[str, float]]]:
  """Each phase corpus's validation loss at step 0 and at every kept checkpoint."""
  corpora = {corpus_name(c): c for c in configs}      # a corpus met twice is evaluated once
  exps = [state_lib.build(c) for c in corpora.values()]
  mngr = checkpoint.manager(workdir, read_only=True)
  every = configs[0].continual.eval_every
  steps = [0] + [s for s in sorted(mngr.all_steps()) if s % every == 0]
  history = {corpus: [] for corpus in corpora}
  abstract = state_lib.abstract_state(exps[0])
  for i, step in enumerate(steps):
    params = (state_lib.init_state(exps[0]).params if step == 0 else checkpoint.restore(
        mngr, step, abstract, workdir, params_only=True)["params"])
    for exp in exps:
      loss = evaluate.evaluate(exp, params)["loss"]
      history[corpus_name(exp.config)].append({"step": step, "loss": loss})
    logging.info("evaluated step %d (%d/%d): %s", step, i + 1, len(steps),
                 ", ".join(f"{k} {v[-1]['loss']:.4f}" for k, v in history.items()))
  return history


def summary(history: dict[str, list[dict[str, float]]], phases: list[str],
            switches: list[int]) -> dict[str, Any]:
  """Each corpus's forgetting (its loss at the end minus its loss when its last phase before
  the final one ended), the loss after each phase, and every corpus's final loss."""
  loss = {corpus: {r["step"]: r["loss"] for r in records} for corpus, records in history.items()}
  out = {"phases": phases, "switches": switches, "forgetting": {},
         "loss_after_phase": [loss[p][s] for p, s in zip(phases, switches)]}
  for corpus, switch in zip(phases[:-1], switches[:-1]):
    if corpus != phases[-1]:
      out["forgetting"][corpus] = loss[corpus][switches[-1]] - loss[corpus][switch]
  out["final_loss"] = {corpus: loss[corpus][switches[-1]] for corpus in loss}
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  configs = phase_configs(config)
  checkpoint.check_workdir(workdir)
  for i, c in enumerate(configs):
    logging.info("continual phase %d/%d: %s, steps up to %d", i + 1, len(configs),
                 corpus_name(c), c.train.steps)
    train.train(state_lib.build(c), workdir)
  history = evaluate_history(configs, workdir)
  results = {"model": config.model.name, "label": config.continual.label or config.model.name,
             **summary(history, [corpus_name(c) for c in configs],
                       [c.train.steps for c in configs]), "history": history}
  if train.is_lead_process():
    checkpoint.write_json_atomic(os.path.join(workdir, "continual.json"), results)
    plot([results], os.path.join(workdir, "continual.png"))
    logging.info("forgetting %s; final loss %s → %s", results["forgetting"],
                 results["final_loss"], os.path.join(workdir, "continual.json"))
  return results


def plot(runs: list[dict[str, Any]], path: str) -> None:
  """Each run's validation loss on every phase's corpus over training, the switches marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the plot needs it)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(runs), figsize=(4.4 * len(runs), 3.6), sharey=True,
                           squeeze=False)
  for ax, r in zip(axes[0], runs):
    for i, (phase, records) in enumerate(r["history"].items()):
      ax.plot([x["step"] for x in records], [x["loss"] for x in records], "o-", ms=3,
              color=f"C{i}", label=f"{phase} (validation)")
    for s in r["switches"][:-1]:
      ax.axvline(s, color="grey", ls=":", lw=1)
    # The untrained model's loss (step 0) would flatten everything after it: zoom past it.
    later = [x["loss"] for records in r["history"].values() for x in records if x["step"]]
    if later:
      spread = max(later) - min(later)
      ax.set_ylim(min(later) - 0.1 * spread, max(later) + 0.3 * spread)
    ax.set(title=r["label"], xlabel="step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("loss (nats / byte)")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown(runs: list[dict[str, Any]]) -> str:
  """A row per run: the first corpus's loss after its phase and at the end, the difference
  (forgetting), and the second corpus's final loss (runs over the same two corpora)."""
  first, second = runs[0]["phases"][:2]
  lines = [f"| model | {first} loss after {first} | {first} loss at the end | forgetting | "
           f"{second} final loss |", "|---|---:|---:|---:|---:|"]
  for r in runs:
    lines.append(f"| {r['label']} | {r['loss_after_phase'][0]:.4f} | "
                 f"{r['final_loss'][first]:.4f} | {r['forgetting'][first]:+.4f} | "
                 f"{r['final_loss'][second]:.4f} |")
  return "\n".join(lines) + "\n"


def main(argv) -> None:
  if len(argv) != 2:
    raise SystemExit("usage: python -m experiments.continual <directory of continual runs>")
  root = argv[1]
  runs = []
  for path in sorted(glob.glob(os.path.join(root, "*", "continual.json"))):
    with open(path) as f:
      runs.append(json.load(f))
  if not runs:
    raise SystemExit(f"No {root}/<run>/continual.json; run --mode=continual first.")
  table = markdown(runs)
  with open(os.path.join(root, "continual.md"), "w") as f:
    f.write(table)
  plot(runs, os.path.join(root, "continual.png"))
  print(table)
  print(f"→ {os.path.join(root, 'continual.md')}, {os.path.join(root, 'continual.png')}")


if __name__ == "__main__":
  main(sys.argv)
