"""Table 1: paper rows verbatim, our rows from zeroshot.json / eval.json, seeds combined."""

import json

import ml_collections
import pytest

from experiments import tables
from nested.errors import UserError

ALL_TASKS = {"wikitext": {"word_perplexity": 30.0}, "lambada_openai": {"perplexity": 40.0, "acc": 0.25},
             "piqa": {"acc": 0.6, "acc_norm": 0.61}, "hellaswag": {"acc": 0.3, "acc_norm": 0.35},
             "winogrande": {"acc": 0.5}, "arc_easy": {"acc": 0.45, "acc_norm": 0.4},
             "arc_challenge": {"acc": 0.2, "acc_norm": 0.25}, "siqa": {"acc": 0.4},
             "boolq": {"acc": 0.55}}


def write_run(path, tasks, perplexity):
  path.mkdir(parents=True)
  (path / "zeroshot.json").write_text(json.dumps({"tasks": tasks}))
  (path / "eval.json").write_text(json.dumps({"perplexity": perplexity}))


def test_row_uses_the_papers_metric_per_column_and_averages_the_eight_accuracies():
  row, notes = tables.run_row("m", {"tasks": ALL_TASKS}, {"perplexity": 7.5})
  assert row["Wiki ppl↓"] == 30.0 and row["LMB ppl↓"] == 40.0
  assert row["Hella acc_n"] == pytest.approx(35.0) and row["ARC-c acc_n"] == pytest.approx(25.0)
  accuracies = [25, 60, 35, 50, 45, 25, 40, 55]
  assert row["Avg"] == pytest.approx(sum(accuracies) / 8)
  assert row["val ppl↓"] == 7.5 and notes == []


def test_a_skipped_task_leaves_a_gap_and_a_note_not_a_guess():
  tasks = {**ALL_TASKS, "piqa": {"skipped": "piqa.jsonl is missing: download ybisk/piqa"}}
  row, notes = tables.run_row("m", {"tasks": tasks}, None)
  assert row["PIQA acc"] is None and row["Avg"] is None and row["val ppl↓"] is None
  assert notes == ["piqa: piqa.jsonl is missing: download ybisk/piqa"]


def test_seeds_combine_into_mean_and_sample_std():
  rows = [{"a": 1.0, "b": None}, {"a": 3.0, "b": 2.0}]
  assert tables.combine(rows) == {"a": "2.00 ± 1.41", "b": "—"}
  assert tables.combine(rows[:1]) == {"a": "1.00", "b": "—"}


def test_mode_writes_paper_rows_verbatim_and_ours_beside_them(tmp_path):
  write_run(tmp_path / "hope0", ALL_TASKS, 6.0)
  write_run(tmp_path / "hope1", ALL_TASKS, 8.0)
  config = ml_collections.ConfigDict(dict(size="1.3B", evaluate=False, runs=[
      ("HOPE tiny", "configs/hope.py:tiny", str(tmp_path / "hope0")),
      ("HOPE tiny", "configs/hope.py:tiny", str(tmp_path / "hope1")),
      ("Titans tiny", "configs/titans.py:tiny", str(tmp_path / "missing"))]))
  table = tables.run(config, str(tmp_path / "out"))
  assert table == (tmp_path / "out" / "table1.md").read_text()
  assert ("| HOPE | paper (NeurIPS) | 15.11 | 11.63 | 50.01 | 73.29 | 56.84 | 60.19 | 72.30 | "
          "41.24 | 42.52 | 61.46 | 57.23 | — |") in table
  assert "| HOPE | paper (arXiv) | 14.39 | 10.08 | — |" in table
  assert "| HOPE tiny | ours (2 runs) | 30.00 ± 0.00 |" in table and "| 7.00 ± 1.41 |" in table
  assert "| Titans tiny | ours | — |" in table and "Titans tiny: no zeroshot.json" in table


def test_a_bad_tables_config_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="configs/tables.py"):
    tables.run(ml_collections.ConfigDict(dict(model=1)), str(tmp_path))
  with pytest.raises(UserError, match="1.3B"):
    tables.run(ml_collections.ConfigDict(dict(size="7B", runs=[], evaluate=False)), str(tmp_path))


def test_ablation_table_reads_finished_sweep_points_beside_the_papers_column(tmp_path):
  from configs import tables as tables_config
  from experiments import sweep
  config = tables_config.get_config("ablation")
  points = {(p.axes[sweep.LABEL], p.seed): p.name
            for p in sweep.expand(sweep.load_config(config.sweep))}

  def finish(label, seed, perplexity, step=200):
    point_dir = tmp_path / points[label, seed]
    point_dir.mkdir()
    (point_dir / "eval.json").write_text(json.dumps({"step": step, "perplexity": perplexity}))

  finish("HOPE (full)", 0, 9.0)
  finish("HOPE (full)", 1, 10.0)
  finish("w/o DGD", 0, 11.0, step=100)  # interrupted: not a result
  (tmp_path / points["w/o momentum", 1]).mkdir()
  (tmp_path / points["w/o momentum", 1] / "diverged.json").write_text(json.dumps({"step": 59}))
  finish("w/o momentum", 2, 9.25)
  rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
          for line in tables.run(config, str(tmp_path)).splitlines() if line.startswith("| ")}
  assert rows["HOPE (full)"][1:4] == ["12.24", "9.50 ± 0.71", "2"]
  assert rows["w/o DGD"][1:4] == ["13.41", "—", "0"]
  assert rows["w/o momentum"][1:] == ["13.58", "9.25", "1", "9.25, diverged at step 59 |"]
  # The paper's rows without a switch here stay, with no number of ours.
  assert rows["w/o inner projection of k"][1:3] == ["13.77", "—"]
  assert (tmp_path / "ablation.md").read_text().startswith("HOPE ablation")


def test_mini_tuned_reads_each_models_seeds_at_its_best_rate(tmp_path, monkeypatch):
  """The tuned table's runs are the points of configs/sweeps/mini_seeds.py:<model>, in the
  workdirs its README command gives them: three seeds per model at that model's rate."""
  from configs import tables as tables_config
  from experiments import sweep
  config = tables_config.get_config("mini_tuned")
  config.evaluate = False
  monkeypatch.chdir(tmp_path)
  for label, model in tables_config.MODELS:
    points = sweep.expand(sweep.load_config(f"{tables_config.MINI_SEEDS}:{model}"))
    assert [p.seed for p in points] == [0, 1, 2]
    assert len({p.axes["train.lr"] for p in points}) == 1
    for point in points:
      point_dir = tmp_path / "runs" / "mini_seeds" / model / point.name
      point_dir.mkdir(parents=True)
      (point_dir / "eval.json").write_text(
          json.dumps({"step": 200, "perplexity": 8.0 + point.seed}))
  table = tables.run(config, str(tmp_path / "out"))
  for label, _ in tables_config.MODELS:
    assert f"| {label} | ours (3 runs) |" in table and "| 9.00 ± 1.00 |" in table


def test_the_tuned_ablations_run_every_row_at_hopes_tuned_rate_and_stable_at_lower_momentum():
  from configs import tables as tables_config
  from configs.sweeps import hope_ablation, mini_seeds
  from experiments import sweep
  rows = {}
  for name in ("ablation", "ablation_tuned", "ablation_stable"):
    spec = sweep.load_config(tables_config.get_config(name).sweep)
    rows[name] = {p.axes[sweep.LABEL]: sweep.point_config(spec, p) for p in sweep.expand(spec)}
  assert rows["ablation"].keys() == rows["ablation_tuned"].keys() == rows["ablation_stable"].keys()
  rate = {name: {c.train.lr for c in configs.values()} for name, configs in rows.items()}
  assert rate == {"ablation": {2e-3}, "ablation_tuned": {mini_seeds.BEST_LR["hope"]},
                  "ablation_stable": {mini_seeds.BEST_LR["hope"]}}
  momentum = {name: {label: c.model.mem_momentum for label, c in configs.items()}
              for name, configs in rows.items()}
  assert momentum["ablation"] == momentum["ablation_tuned"]
  assert momentum["ablation_stable"] == {
      label: 0.0 if label == "w/o momentum" else hope_ablation.STABLE_MOMENTUM
      for label in momentum["ablation"]}
  # Only the momentum and the rate differ from the paper-rate table.
  for label, config in rows["ablation_stable"].items():
    paper_rate = rows["ablation"][label]
    config.train.lr, config.model.mem_momentum = paper_rate.train.lr, paper_rate.model.mem_momentum
    assert config.to_dict() == paper_rate.to_dict()
