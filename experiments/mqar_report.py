"""The MQAR table and plot of the four models (configs/sweeps/mqar.py, one sweep per model).

  python -m experiments.mqar_report runs/mqar            # → runs/mqar/mqar.md, mqar.png

Reads every finished run under `<root>/<model>/<point>/` (its config.json and eval.json) and
reports answer accuracy against the number of key-value pairs at the training length, and
against the evaluation length (`config.eval.lengths`: the model reads longer sequences as a
stream, attention over a window of the training length). Two baselines: chance, 1 / (number of
values), and no recall, 1 / (number of pairs): a model that knows which values the sequence
holds but binds none to its key.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from typing import Any

from experiments import synthetic

ORDER = ("transformer", "titans", "hope", "hope_attention")
LABELS = {"transformer": "Transformer++", "titans": "Titans", "hope": "HOPE",
          "hope_attention": "HOPE-Attention"}


def read_runs(root: str) -> list[dict[str, Any]]:
  """One record per finished run: model, num_pairs, training length, {length: accuracy}."""
  runs = []
  for eval_path in sorted(glob.glob(os.path.join(root, "*", "*", "eval.json"))):
    point = os.path.dirname(eval_path)
    with open(os.path.join(point, "config.json")) as f:
      config = json.load(f)
    with open(eval_path) as f:
      results = json.load(f)
    if config["data"].get("synthetic") != "mqar" or "accuracy" not in results:
      continue
    length = config["train"]["seq_len"]
    accuracy = {length: results["accuracy"]}
    accuracy.update({int(k[len("accuracy_"):]): v for k, v in results.items()
                     if k.startswith("accuracy_")})
    mqar = config["data"]["mqar"]
    runs.append({"model": config["model"]["name"], "num_pairs": mqar["num_pairs"],
                 "seq_len": length, "seed": config["seed"], "step": results["step"],
                 "accuracy": accuracy, "vocab_size": mqar["vocab_size"]})
  if not runs:
    raise SystemExit(f"No finished MQAR runs under {root}/<model>/<point>/eval.json; run the "
                     f"sweeps in configs/sweeps/mqar.py first.")
  return sorted(runs, key=lambda r: (rank(r["model"]), r["num_pairs"], r["seed"]))


def rank(model: str) -> int:
  return ORDER.index(model) if model in ORDER else len(ORDER)


def chance(runs) -> float:
  return synthetic.chance_accuracy(synthetic.MQAR(runs[0]["vocab_size"], 1))


def no_recall(num_pairs: int) -> float:
  return synthetic.no_recall_accuracy(synthetic.MQAR(2 * num_pairs + 2, num_pairs))


def markdown(runs) -> str:
  lengths = sorted({n for r in runs for n in r["accuracy"]})
  train_len = runs[0]["seq_len"]
  head = [f"{n}" + (" (train)" if n == train_len else f" ({n // train_len}×)")
          for n in lengths]
  lines = [f"MQAR answer accuracy (vocabulary {runs[0]['vocab_size']}, chance "
           f"{chance(runs):.4f}), by the length each sequence is evaluated at:", "",
           "| model | pairs | no recall | " + " | ".join(head) + " |",
           "|---|---:|---:|" + "---:|" * len(lengths)]
  for r in runs:
    cells = [f"{r['accuracy'][n]:.3f}" if n in r["accuracy"] else "" for n in lengths]
    lines.append(f"| {LABELS.get(r['model'], r['model'])} | {r['num_pairs']} | "
                 f"{no_recall(r['num_pairs']):.3f} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(runs, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the report needs it)
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  train_len = runs[0]["seq_len"]
  models = sorted({r["model"] for r in runs}, key=rank)
  pairs = sorted({r["num_pairs"] for r in runs})
  fig, axes = plt.subplots(1, 1 + len(pairs), figsize=(4.2 * (1 + len(pairs)), 3.8),
                           sharey=True)
  for i, model in enumerate(models):
    mine = [r for r in runs if r["model"] == model]
    colour = f"C{i}"
    axes[0].plot([r["num_pairs"] for r in mine], [r["accuracy"][train_len] for r in mine],
                 "o-", color=colour, label=LABELS.get(model, model))
    for ax, n in zip(axes[1:], pairs):
      for r in (r for r in mine if r["num_pairs"] == n):
        lengths = sorted(r["accuracy"])
        ax.plot(lengths, [r["accuracy"][k] for k in lengths], "o-", color=colour)
  axes[0].plot(pairs, [no_recall(n) for n in pairs], "k:", lw=1, label="no recall (1 / pairs)")
  for ax, n in zip(axes[1:], pairs):
    ax.axhline(no_recall(n), color="black", ls=":", lw=1)
  axes[0].set(xscale="log", xlabel="key-value pairs", ylabel="answer accuracy",
              title=f"at the training length ({train_len})")
  axes[0].set_xticks(pairs, [str(n) for n in pairs])
  axes[0].minorticks_off()
  axes[0].legend(fontsize=8)
  for ax, n in zip(axes[1:], pairs):
    lengths = sorted({k for r in runs for k in r["accuracy"]})
    ax.axvline(train_len, color="grey", ls=":", lw=1)
    ax.set(xscale="log", xlabel="evaluated length (tokens, streamed)", title=f"{n} pairs")
    ax.set_xticks(lengths, [str(k) for k in lengths])
    ax.minorticks_off()
  for ax in axes:
    ax.axhline(chance(runs), color="black", ls="--", lw=0.8)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
  axes[0].text(axes[0].get_xlim()[0], chance(runs), " chance", va="bottom", ha="left", fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv) -> None:
  if len(argv) != 2:
    raise SystemExit("usage: python -m experiments.mqar_report <root of the MQAR sweeps>")
  root = argv[1]
  runs = read_runs(root)
  table = markdown(runs)
  with open(os.path.join(root, "mqar.md"), "w") as f:
    f.write(table)
  plot(runs, os.path.join(root, "mqar.png"))
  print(table)
  print(f"→ {os.path.join(root, 'mqar.md')}, {os.path.join(root, 'mqar.png')}")


if __name__ == "__main__":
  main(sys.argv)
