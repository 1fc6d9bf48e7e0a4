"""`--mode=burn_rate`: what a step costs, per level, over a run (SPEC §6).

The claim under test: a nested model's compute is "almost flat" because slow levels are
*written* rarely. Writes amortise; reads do not — every parameter is read in every forward
pass and its gradient is computed (and accumulated) every step. This mode measures it.

For the config (and, with `burn_rate.baseline`, for a baseline config such as the
Transformer++ of the same size) it records:

* FLOPs of the pieces of a step, counted through their loops (experiments/flops.py; XLA's
  cost analysis would count a scanned chunk loop's body once): forward, backward, gradient
  clipping, and for each level its accumulation (every step, periods > 1, unless the level
  is frozen between firings: accumulate="none") and its optimizer update (only on the steps
  where it fires). The backward pass is counted for each train-step variant that runs: on
  a step where levels are frozen (`levels.plan_step`), their weight gradients are not
  computed;
* the measured wall time of every real train step over `burn_rate.steps` steps, each step
  running the variant the train loop runs;

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

from experiments import checkpoint, flops, mesh as mesh_lib, state as state_lib, sweep, train
from nested import levels


def subtree(tree: Any, labels: Any, name: str) -> Any:
  """The leaves of `tree` that level `name` owns (the others dropped)."""
  return jax.tree.map(lambda leaf, label: leaf if label == name else None, tree, labels)


def variant_name(frozen: frozenset[str]) -> str:
  """A train-step variant's name in the report: its frozen levels, or "all" (none frozen)."""
  return "frozen:" + ",".join(sorted(frozen)) if frozen else "all"


def variants(exp: state_lib.Experiment, steps: int) -> list[frozenset[str]]:
  """The distinct frozen-level sets of steps 0..steps-1, in order of first use."""
  return list(dict.fromkeys(levels.plan_step(exp.levels, s).frozen for s in range(steps)))


def step_components(exp: state_lib.Experiment, params: Any, batch: jax.Array,
                    steps: int = 1) -> dict[str, Any]:
  """FLOPs of each compiled piece of one train step (the backward pass for each variant run
  in `steps` steps), and each level's period."""
  cfg = exp.config
  labels = levels.label_params(exp.levels, params)
  forward = flops.count(train.loss_fn(exp.apply), params, batch)
  backward = {variant_name(frozen): flops.count(jax.value_and_grad(
      train.loss_fn(exp.apply, labels, frozen)), params, batch) - forward
              for frozen in variants(exp, steps)}
  clip = optax.clip_by_global_norm(max(cfg.train.clip_norm, 1e-6))
  per_level = {}
  for level in exp.levels:
    owned = subtree(params, labels, level.name)
    update = flops.count(lambda g, s, p, t=level.transform: t.update(g, s, p),
                       owned, level.transform.init(owned), owned)
    keeps_sum = level.period > 1 and not (level.accumulate == "none"
                                          and level.accumulate_last == 1)
    accumulate = (flops.count(lambda a, g: jax.tree.map(jnp.add, a, g), owned, owned)
                  if keeps_sum else 0.0)
    per_level[level.name] = {"period": level.period, "accumulate_mode": level.accumulate,
                             "update": update, "accumulate": accumulate,
                             "params": sum(int(x.size) for x in jax.tree.leaves(owned))}
  return {"forward": forward, "backward": backward,
          "clip": flops.count(lambda g, s: clip.update(g, s), params, clip.init(params)),
          "levels": per_level}


def flops_per_step(components: dict[str, Any],
                   plans: list[levels.StepPlan]) -> dict[str, np.ndarray]:
  """Per-step FLOPs of each component over the steps of `plans` (`levels.plan_step`)."""
  steps = len(plans)
  series = {"forward": np.full(steps, components["forward"]),
            "backward": np.array([components["backward"][variant_name(p.frozen)] for p in plans]),
            "clip": np.full(steps, components["clip"])}
  for name, level in components["levels"].items():
    series[f"accumulate/{name}"] = np.full(steps, level["accumulate"])
    series[f"update/{name}"] = np.array([level["update"] if name in p.fires else 0.0
                                         for p in plans])
  return series


def timed_steps(exp: state_lib.Experiment, steps: int) -> tuple[np.ndarray, list, list]:
  """Wall time of each of `steps` real train steps, each the variant the train loop runs
  (every variant compiled and run once first), which levels fired at each, and its variant."""
  step_fn = train.jit_train_step(exp)
  batch = mesh_lib.put_batch(train.host_batch(exp, 0), exp.mesh)
  for frozen in variants(exp, steps):
    jax.block_until_ready(step_fn(state_lib.init_state(exp), batch, frozen))
  state = state_lib.init_state(exp)
  seconds, fired, ran = [], [], []
  for s in range(steps):
    batch = mesh_lib.put_batch(train.host_batch(exp, s), exp.mesh)
    frozen = levels.plan_step(exp.levels, s).frozen
    start = time.perf_counter()
    state, metrics = step_fn(state, batch, frozen)
    jax.block_until_ready(metrics)
    seconds.append(time.perf_counter() - start)
    fired.append({k[len("fired/"):]: bool(v) for k, v in metrics.items() if k.startswith("fired/")})
    ran.append(variant_name(frozen))
  return np.array(seconds), fired, ran


def measure(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  exp = state_lib.build(config)
  params = state_lib.init_state(exp).params
  batch = mesh_lib.put_batch(train.host_batch(exp, 0), exp.mesh)
  components = step_components(exp, params, batch, steps)
  plans = [levels.plan_step(exp.levels, s) for s in range(steps)]
  series = flops_per_step(components, plans)
  seconds, fired, ran = timed_steps(exp, steps)
  total = sum(series.values())
  reads = series["forward"] + series["backward"]
  return {
      "model": config.model.name, "steps": steps,
      "params": sum(level["params"] for level in components["levels"].values()),
      "components": components,
      "flops_per_step": {k: v.tolist() for k, v in series.items()},
      "seconds_per_step": seconds.tolist(), "fired": fired, "variant": ran,
      "by_kind": by_kind(total, seconds, [step_kind(p, exp.levels) for p in plans]),
      "amortised": {
          "flops_per_step": float(total.mean()),
          "forward_backward_share": float(reads.mean() / total.mean()),
          "update_share": float(sum(series[k].mean() for k in series if k.startswith("update/"))
                                / total.mean()),
          "peak_to_mean_flops": float(total.max() / total.mean()),
          "seconds_per_step": float(np.median(seconds)),
          "peak_to_median_seconds": float(seconds.max() / np.median(seconds)),
      },
  }


def step_kind(plan: levels.StepPlan, level_list) -> str:
  """A step's kind in the report: which slow levels (period > 1) fire and which are frozen."""
  slow = [lv.name for lv in level_list if lv.period > 1]
  fires = [n for n in slow if n in plan.fires] or ["-"]
  return f"fires {','.join(fires)}; frozen {','.join(sorted(plan.frozen)) or '-'}"


def by_kind(total: np.ndarray, seconds: np.ndarray, kinds: list[str]) -> dict[str, Any]:
  """Per kind of step: steps run, FLOPs per step, median wall time per step, and both as
  fractions of the heaviest kind's."""
  out = {}
  for kind in dict.fromkeys(kinds):
    mask = np.array([k == kind for k in kinds])
    out[kind] = {"steps": int(mask.sum()), "flops_per_step": float(total[mask].mean()),
                 "median_seconds": float(np.median(seconds[mask]))}
  heaviest = max(out.values(), key=lambda v: v["flops_per_step"])
  for v in out.values():
    v["flops_vs_heaviest"] = v["flops_per_step"] / heaviest["flops_per_step"]
    v["seconds_vs_heaviest"] = v["median_seconds"] / heaviest["median_seconds"]
  return out


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
    lines += ["", f"Per kind of step, {name} (fractions of the heaviest kind):", "",
              "| step | steps | FLOPs/step | FLOPs fraction | median ms/step | time fraction |",
              "|---|---|---|---|---|---|"]
    for kind, k in r["by_kind"].items():
      lines.append(f"| {kind} | {k['steps']} | {k['flops_per_step'] / 1e9:.3f} G | "
                   f"{k['flops_vs_heaviest']:.3f} | {1e3 * k['median_seconds']:.1f} | "
                   f"{k['seconds_vs_heaviest']:.3f} |")
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
    # A fixed order and colour per component: the JSON report stores its keys sorted.
    order = ["forward", "backward", "clip"]
    components = order + sorted(set(r["flops_per_step"]) - set(order))
    for i, component in enumerate(components):
      values = np.asarray(r["flops_per_step"][component]) / 1e9
      if values.any():
        ax.bar(steps, values, bottom=bottom, label=component, width=1.0, color=f"C{i}")
        bottom += values
    ax.set(title=f"{name}: FLOPs per step (loops counted)", xlabel="step", ylabel="GFLOP")
    ax.legend(fontsize=7, loc="lower right")
    ax = axes[row, 1]
    ms = 1e3 * np.asarray(r["seconds_per_step"])
    ax.plot(steps, ms, marker=".", lw=0.8)
    ax.set_ylim(0, 1.1 * ms.max())     # from zero: a spike's size reads as a fraction of a step
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
