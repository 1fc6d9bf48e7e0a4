"""`--mode=burn_rate`: what a step costs, per level, over a run (SPEC §6).

The claim under test: a nested model's compute is "almost flat" because slow levels are
*written* rarely. Writes amortise; reads do not — every parameter is read in every forward
pass and its gradient is computed (and accumulated) every step. This mode measures it.

For the config (and, with `burn_rate.baseline`, for a baseline config such as the
Transformer++ of the same size) it records:

* FLOPs of the pieces of a step, counted through their loops (experiments/flops.py; XLA's
  cost analysis would count a scanned chunk loop's body once): forward, backward, gradient
  clipping, and for each level its accumulation (every step, periods > 1) and its optimizer
  update (only on the steps where it fires);
* the measured wall time of every real train step over `burn_rate.steps` steps;

and writes `burn_rate.json`, `burn_rate.md` (amortised totals) and `burn_rate.png` (FLOPs
and time per step: the spikes are the steps where slow levels fire) to the workdir.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import checkpoint, evaluate, flops, mesh as mesh_lib, state as state_lib
from experiments import sweep, train
from nested import levels, optimizers


def subtree(tree: Any, labels: Any, name: str) -> Any:
  """The leaves of `tree` that level `name` owns (the others dropped)."""
  return jax.tree.map(lambda leaf, label: leaf if label == name else None, tree, labels)


def step_components(exp: state_lib.Experiment, params: Any, batch: jax.Array) -> dict[str, Any]:
  """FLOPs of each compiled piece of one train step, and each level's period."""
  cfg = exp.config

  def loss(p, b):
    return evaluate.token_nll(exp.apply(p, b[:, :-1]), b[:, 1:]).mean()

  forward = flops.count(loss, params, batch)
  forward_backward = flops.count(jax.value_and_grad(loss), params, batch)
  clip = optax.clip_by_global_norm(max(cfg.train.clip_norm, 1e-6))
  level_list = levels.levels_from_config(
      cfg.levels, tokens_per_step=state_lib.tokens_per_step(cfg),
      schedule=state_lib.learning_rate_schedule(cfg.train), make_transform=optimizers.from_config)
  labels = levels.label_params(level_list, params)
  per_level = {}
  for level in level_list:
    owned = subtree(params, labels, level.name)
    update = flops.count(lambda g, s, p, t=level.transform: t.update(g, s, p),
                       owned, level.transform.init(owned), owned)
    accumulate = (flops.count(lambda a, g: jax.tree.map(jnp.add, a, g), owned, owned)
                  if level.period > 1 else 0.0)
    per_level[level.name] = {"period": level.period, "update": update, "accumulate": accumulate,
                             "params": sum(int(x.size) for x in jax.tree.leaves(owned))}
  return {"forward": forward, "backward": forward_backward - forward,
          "clip": flops.count(lambda g, s: clip.update(g, s), params, clip.init(params)),
          "levels": per_level}


def flops_per_step(components: dict[str, Any], steps: int) -> dict[str, np.ndarray]:
  """Per-step FLOPs of each component over steps 1..steps (a level fires when step % p == 0)."""
  t = np.arange(1, steps + 1)
  series = {"forward": np.full(steps, components["forward"]),
            "backward": np.full(steps, components["backward"]),
            "clip": np.full(steps, components["clip"])}
  for name, level in components["levels"].items():
    series[f"accumulate/{name}"] = np.full(steps, level["accumulate"])
    series[f"update/{name}"] = np.where(t % level["period"] == 0, level["update"], 0.0)
  return series


def timed_steps(exp: state_lib.Experiment, steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Wall time of each of `steps` real train steps (after two compiled warm-up steps),
  and which levels fired at each."""
  step_fn = train.jit_train_step(exp)
  state = state_lib.init_state(exp)
  for s in range(2):
    state, metrics = step_fn(state, mesh_lib.put_batch(train.host_batch(exp, s), exp.mesh))
  jax.block_until_ready(metrics)
  # Restart the step count so that firing steps line up with those of the FLOPs series.
  state = state_lib.init_state(exp)
  seconds, fired = [], []
  for s in range(steps):
    batch = mesh_lib.put_batch(train.host_batch(exp, s), exp.mesh)
    start = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
    fired.append({k[len("fired/"):]: bool(v) for k, v in metrics.items() if k.startswith("fired/")})
  return np.array(seconds), fired


def measure(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  exp = state_lib.build(config)
  params = state_lib.init_state(exp).params
  batch = mesh_lib.put_batch(train.host_batch(exp, 0), exp.mesh)
  components = step_components(exp, params, batch)
  series = flops_per_step(components, steps)
  seconds, fired = timed_steps(exp, steps)
  total = sum(series.values())
  reads = components["forward"] + components["backward"]
  return {
      "model": config.model.name, "steps": steps,
      "params": sum(level["params"] for level in components["levels"].values()),
      "components": components,
      "flops_per_step": {k: v.tolist() for k, v in series.items()},
      "seconds_per_step": seconds.tolist(), "fired": fired,
      "amortised": {
          "flops_per_step": float(total.mean()),
          "forward_backward_share": float(reads / total.mean()),
          "update_share": float(sum(series[k].mean() for k in series if k.startswith("update/"))
                                / total.mean()),
          "peak_to_mean_flops": float(total.max() / total.mean()),
          "seconds_per_step": float(np.median(seconds)),
          "peak_to_median_seconds": float(seconds.max() / np.median(seconds)),
      },
  }


def default_steps(config: ml_collections.ConfigDict) -> int:
  tokens = state_lib.tokens_per_step(config)
  longest = max((lv.period // tokens for lv in config.levels.values() if lv.period), default=1)
  return max(16, 2 * longest)


def markdown(results: dict[str, dict[str, Any]]) -> str:
  lines = ["| run | model | params | FLOPs/step (amortised) | forward+backward share | "
           "optimizer-update share | peak/mean FLOPs | median s/step | peak/median time |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    a = r["amortised"]
    lines.append(f"| {name} | {r['model']} | {r['params'] / 1e6:.2f}M | "
                 f"{a['flops_per_step'] / 1e9:.3f} G | {100 * a['forward_backward_share']:.1f}% | "
                 f"{100 * a['update_share']:.2f}% | {a['peak_to_mean_flops']:.3f} | "
                 f"{a['seconds_per_step']:.4f} | {a['peak_to_median_seconds']:.2f} |")
  for name, r in results.items():
    lines += ["", f"Per level, {name}:", "",
              "| level | period (steps) | params | update FLOPs when it fires | "
              "accumulate FLOPs every step |", "|---|---|---|---|---|"]
    for level, c in r["components"]["levels"].items():
      lines.append(f"| {level} | {c['period']} | {c['params'] / 1e6:.3f}M | "
                   f"{c['update'] / 1e6:.2f} M | {c['accumulate'] / 1e6:.2f} M |")
  return "\n".join(lines) + "\n"


def plot(results: dict[str, dict[str, Any]], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(len(results), 2, figsize=(13, 3.6 * len(results)), squeeze=False)
  for row, (name, r) in enumerate(results.items()):
    steps = np.arange(1, r["steps"] + 1)
    ax = axes[row, 0]
    bottom = np.zeros(r["steps"])
    for component, values in r["flops_per_step"].items():
      values = np.asarray(values) / 1e9
      if values.any():
        ax.bar(steps, values, bottom=bottom, label=component, width=1.0)
        bottom += values
    ax.set(title=f"{name}: FLOPs per step (loops counted)", xlabel="step", ylabel="GFLOP")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[row, 1]
    ax.plot(steps, 1e3 * np.asarray(r["seconds_per_step"]), marker=".", lw=0.8)
    for level in r["components"]["levels"]:
      fired = [s for s, f in zip(steps, r["fired"]) if f.get(level)]
      if r["components"]["levels"][level]["period"] > 1 and fired:
        ax.vlines(fired, *ax.get_ylim(), colors="tab:red", alpha=0.25, label=f"{level} fires")
    ax.set(title=f"{name}: measured time per step", xlabel="step", ylabel="ms")
    if ax.get_legend_handles_labels()[1]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Measures the config (and `burn_rate.baseline`, if set) and writes the report."""
  configs = {"this config": config}
  if config.burn_rate.baseline:
    configs["baseline"] = sweep.load_config(config.burn_rate.baseline)
  steps = config.burn_rate.steps or max(default_steps(c) for c in configs.values())
  os.makedirs(workdir, exist_ok=True)
  results = {}
  for name, c in configs.items():
    logging.info("burn rate of %s (%s): %d steps", name, c.model.name, steps)
    results[name] = measure(c, steps)
  checkpoint.write_json_atomic(os.path.join(workdir, "burn_rate.json"), results)
  with open(os.path.join(workdir, "burn_rate.md"), "w") as f:
    f.write(markdown(results))
  plot(results, os.path.join(workdir, "burn_rate.png"))
  logging.info("burn rate:\n%s", markdown(results))
  return results
