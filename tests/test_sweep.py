"""--mode=sweep: point expansion and names, validation, dry run, an end-to-end sweep in a
fresh interpreter, resuming, and the cluster recipe (one plain main.py command per point)."""

import csv
import glob
import json
import os
import shlex
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import MICRO, REPO, run_main
from experiments import checkpoint, sweep
from nested.errors import UserError

SLOW_MLP = "configs/transformer.py:slow_mlp"


def names(points):
  return [p.name for p in points]


def test_grid_expands_seeds_outermost_then_first_axis_slowest():
  s = sweep.define(base=SLOW_MLP, seeds=[0, 1], fixed={"train.steps": 7},
                   grid={"levels.slow.period": [2048, 8192], "train.lr": [1e-3, 3e-3]})
  points = sweep.expand(s)
  assert names(points) == [
      "levels.slow.period=2048,train.lr=0.001,seed=0",
      "levels.slow.period=2048,train.lr=0.003,seed=0",
      "levels.slow.period=8192,train.lr=0.001,seed=0",
      "levels.slow.period=8192,train.lr=0.003,seed=0",
      "levels.slow.period=2048,train.lr=0.001,seed=1",
      "levels.slow.period=2048,train.lr=0.003,seed=1",
      "levels.slow.period=8192,train.lr=0.001,seed=1",
      "levels.slow.period=8192,train.lr=0.003,seed=1",
  ]
  config = sweep.point_config(s, points[6])
  assert (config.levels.slow.period, config.train.lr, config.seed) == (8192, 1e-3, 1)
  assert config.train.steps == 7 and s.fixed.train.steps == 7
  assert points[6].axes == {"levels.slow.period": 8192, "train.lr": 1e-3}


def test_points_form_with_labels_fields_and_a_grid():
  s = sweep.define(base=SLOW_MLP, seeds=[3], grid={"train.lr": [1e-3, 2e-3]},
                   points=[{"label": "wide mlp", "model.d_ff": 512, "model.d_model": 160},
                           {"model.n_layers": 2, "train.clip_norm": 0.5}])
  points = sweep.expand(s)
  assert names(points) == [
      "wide_mlp,train.lr=0.001,seed=3",
      "wide_mlp,train.lr=0.002,seed=3",
      "model.n_layers=2,train.clip_norm=0.5,train.lr=0.001,seed=3",
      "model.n_layers=2,train.clip_norm=0.5,train.lr=0.002,seed=3",
  ]
  wide = sweep.point_config(s, points[1])
  assert (wide.model.d_ff, wide.model.d_model, wide.train.lr, wide.seed) == (512, 160, 2e-3, 3)
  assert points[0].axes == {"label": "wide mlp", "train.lr": 1e-3}
  assert sweep.point_config(s, points[2]).model.n_layers == 2


def test_bad_fields_are_user_errors_that_name_them(tmp_path):
  with pytest.raises(UserError, match=r"'train\.stpes'.*Did you mean 'train\.steps'"):
    sweep.define(base=SLOW_MLP, fixed={"train.stpes": 3})
  s = sweep.define(base=SLOW_MLP, points=[{"model.d_modle": 64}])
  with pytest.raises(UserError, match=r"points names 'model\.d_modle'"):
    sweep.prepare(s, str(tmp_path))
  s = sweep.define(base=SLOW_MLP, grid={"levels.slow.period": ["fast"]})
  with pytest.raises(UserError, match=r"grid sets levels\.slow\.period='fast'"):
    sweep.prepare(s, str(tmp_path))
  with pytest.raises(UserError, match="same workdir name"):
    sweep.expand(sweep.define(base=SLOW_MLP, points=[{"label": "a b"}, {"label": "a/b"}]))
  assert os.listdir(tmp_path) == []


def test_every_shipped_sweep_names_real_fields_and_builds(tmp_path):
  files = sorted(glob.glob(os.path.join(REPO, "configs", "sweeps", "*.py")))
  assert any(f.endswith("levels_period.py") for f in files)
  for path in files:
    if os.path.basename(path).startswith("_"):
      continue
    s = sweep.load_config(path)
    points, configs, finished = sweep.prepare(s, str(tmp_path))  # builds every point
    assert len(points) == len(configs) >= 1 and not any(finished), path


def test_command_line_round_trips_every_field_type(tmp_path, monkeypatch):
  """A point's printed command, parsed by config_flags as main.py parses it, gives back
  exactly the point's config: ints, floats, bools, strings with commas, quotes, tuples."""
  base_file = tmp_path / "base.py"
  base_file.write_text(
      "import ml_collections\n"
      "def get_config():\n"
      "  return ml_collections.ConfigDict(dict(n=1, x=0.5, on=True, s='a', t=(1, 2),\n"
      "                                        sub=dict(periods='16,64')))\n")
  spec = f"{base_file}"
  base = sweep.load_config(spec)
  point = sweep.override(base, {"n": 7, "x": 1e-05, "on": False, "s": "it's a b/c", "t": (3, 4, 5),
                                "sub.periods": "16,256,4096"}, where="grid", base=spec)
  args = shlex.split(sweep.command_line(spec, base, point, "w/a=1,seed=0"))
  assert args[:3] == ["python", "main.py", f"--config={spec}"]
  assert args[-1] == "--workdir=w/a=1,seed=0"
  argv = ["prog", *args[2:-1]]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads its overrides from sys.argv
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
  values(argv)
  assert values.config.to_dict() == point.to_dict()
  assert sweep.command_line(spec, base, base, "w").count("--config.") == 0


def test_a_diverged_point_is_recorded_and_the_sweep_goes_on(cache_dir, tmp_path, monkeypatch):
  """A learning-rate sweep's largest rate may diverge: the sweep records the step, trains the
  points after it, reports the point as diverged, and does not retry it when rerun."""
  spec = sweep.define(base=SLOW_MLP, grid={"levels.slow.period": [512, 256]}, seeds=[0],
                      fixed={**MICRO, "train.steps": 2, "data.cache_dir": cache_dir})
  trained = []

  def fake_run(config, workdir):  # train.run stands in: the sweep's bookkeeping is the subject
    trained.append(os.path.basename(workdir))
    if config.levels.slow.period == 512:
      raise checkpoint.Diverged("At step 7 ...", step=7, loss=float("nan"), grad_norm=1e9)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump({"step": 2, "perplexity": 5.25}, f)

  monkeypatch.setattr(sweep.train, "run", fake_run)
  workdir = str(tmp_path / "sweep")
  sweep.run_sweep(spec, workdir)
  diverged, finished = "levels.slow.period=512,seed=0", "levels.slow.period=256,seed=0"
  assert trained == [diverged, finished]
  assert read_json(os.path.join(workdir, diverged, "diverged.json"))["step"] == 7
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = {r["point"]: r for r in csv.DictReader(f)}
  assert rows[diverged]["diverged_at_step"] == "7" and rows[diverged]["perplexity"] == ""
  assert rows[finished]["diverged_at_step"] == "" and float(rows[finished]["perplexity"]) == 5.25
  table = open(os.path.join(workdir, "results.md")).read()
  assert "1 of 2 points finished, 1 diverged" in table
  assert "| 512 | diverged | 0 |" in table and "| diverged at step 7 |" in table
  assert os.path.exists(os.path.join(workdir, "results.png"))

  sweep.run_sweep(spec, workdir)  # rerun: both points are done, nothing trains
  assert trained == [diverged, finished]


def test_a_recorded_point_must_match_but_for_new_fields_at_their_default_and_how_it_ran(tmp_path):
  base = sweep.load_config(SLOW_MLP)
  point = sweep.override(base, {"levels.slow.period": 512, "model.d_ff": 96}, where="grid",
                         base=SLOW_MLP)

  def recorded(**edits):
    """A point workdir whose config.json is the point's with `edits` (None: field absent)."""
    view = sweep.json_view(point)
    for path, value in edits.items():
      *sections, field = path.split(".")
      parent = view
      for section in sections:
        parent = parent[section]
      if value is None:
        del parent[field]
      else:
        parent[field] = value
    point_dir = tmp_path / f"point{len(list(tmp_path.iterdir()))}"
    point_dir.mkdir()
    (point_dir / "config.json").write_text(json.dumps(view))
    return str(point_dir)

  check = lambda point_dir: sweep.check_workdir_matches(point_dir, point, base)
  check(recorded())
  check(recorded(**{"train.steps": point.train.steps - 1}))        # training resumes
  check(recorded(**{"model.rope_theta": None}))  # a field added since, at its default
  check(recorded(**{"model.remat": "none"}))     # how a point computes, not what
  with pytest.raises(UserError, match=r"a different config: levels.slow.period \(256 there, "
                                      r"512 now\)"):
    check(recorded(**{"levels.slow.period": 256}))
  # Absent from the record but changed by the point: the run did not have it.
  with pytest.raises(UserError, match=r"model.d_ff \(absent there, 96 now\)"):
    check(recorded(**{"model.d_ff": None}))
  # In the record but gone from the config: what it selected no longer exists.
  with pytest.raises(UserError, match=r"model.retired \(True there, absent now\)"):
    check(recorded(**{"model.retired": True}))
  with pytest.raises(UserError, match=r"train.steps"):
    check(recorded(**{"train.steps": point.train.steps + 1}))
  # A model field the record lacks ran at the model's default (False), whatever the base
  # config says now: a base that ties the embeddings does not match that run.
  tied_base, tied_point = (sweep.override(c, {"model.tie_embeddings": True}, where="test",
                                          base=SLOW_MLP) for c in (base, point))
  with pytest.raises(UserError, match=r"model.tie_embeddings \(absent there, True now\)"):
    sweep.check_workdir_matches(recorded(**{"model.tie_embeddings": None}), tied_point,
                                tied_base)


# ------------------------------------------------------------------ end to end, in subprocesses

SWEEP_FILE = f"""
from experiments import sweep

def get_config():
  return sweep.define(base="{SLOW_MLP}", grid={{"levels.slow.period": [256, 512]}}, seeds=[0],
                      fixed={{"train.steps": 2}})
"""


@pytest.fixture(scope="module")
def sweep_args(cache_dir, tmp_path_factory):
  """A 2-point, 1-seed sweep of micro models (256 tokens a step, so the slow level fires
  every step or every other step), shortened through --config.fixed.* as a user would."""
  path = tmp_path_factory.mktemp("sweeps") / "tiny_sweep.py"
  path.write_text(SWEEP_FILE)
  fixed = {**MICRO, "train.steps": 2, "train.checkpoint_every": 2, "data.cache_dir": cache_dir}
  return ["--mode=sweep", f"--config={path}"] + [
      f"--config.fixed.{k}={v}" for k, v in fixed.items()]


@pytest.fixture(scope="module")
def finished_sweep(sweep_args, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("sweep"))
  result = run_main(sweep_args + [f"--workdir={workdir}"])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


POINTS = ["levels.slow.period=256,seed=0", "levels.slow.period=512,seed=0"]


def read_json(path):
  with open(path) as f:
    return json.load(f)


def test_sweep_end_to_end(finished_sweep):
  workdir, result = finished_sweep
  assert "point 1/2: levels.slow.period=256,seed=0 | ETA after the first point" in result.stderr
  assert "point 2/2: levels.slow.period=512,seed=0 | ETA" in result.stderr
  evals = [read_json(os.path.join(workdir, p, "eval.json")) for p in POINTS]
  assert [e["step"] for e in evals] == [2, 2]
  assert evals[0]["perplexity"] != evals[1]["perplexity"]  # the period reached the optimizer
  with open(os.path.join(workdir, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == POINTS
  assert [r["levels.slow.period"] for r in rows] == ["256", "512"]
  assert [float(r["perplexity"]) for r in rows] == [e["perplexity"] for e in evals]
  table = open(os.path.join(workdir, "results.md")).read()
  assert f"{evals[1]['perplexity']:.4f} ± 0.0000 | 1 |" in table and f"`{POINTS[0]}`" in table
  with open(os.path.join(workdir, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  recorded = read_json(os.path.join(workdir, POINTS[1], "config.json"))
  assert recorded["levels"]["slow"]["period"] == 512


def test_rerun_skips_finished_points_and_resumes_an_interrupted_one(sweep_args, finished_sweep):
  workdir, _ = finished_sweep
  evals = [os.path.join(workdir, p, "eval.json") for p in POINTS]
  mtimes = [os.stat(p).st_mtime_ns for p in evals]
  again = run_main(sweep_args + [f"--workdir={workdir}"])
  assert again.returncode == 0, again.stderr[-3000:]
  assert [os.stat(p).st_mtime_ns for p in evals] == mtimes
  assert again.stderr.count("finished, skipped") == 2 and "Resuming" not in again.stderr

  # Killed after its last checkpoint, before its evaluation: the point resumes, not restarts.
  before = read_json(evals[1])
  os.remove(evals[1])
  resumed = run_main(sweep_args + [f"--workdir={workdir}"])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"point 1/2: {POINTS[0]}: finished, skipped" in resumed.stderr
  assert "Resuming from the checkpoint at step 2" in resumed.stderr
  assert read_json(evals[1]) == before


def test_dry_run_prints_every_point_and_runs_nothing(sweep_args, tmp_path):
  workdir = str(tmp_path / "sweep")
  result = run_main(sweep_args + [f"--workdir={workdir}", "--dry_run"])
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert [shlex.split(line)[-1] for line in lines] == [
      f"--workdir={os.path.join(workdir, p)}" for p in POINTS]
  assert all(line.startswith(f"python main.py --config={SLOW_MLP} ") for line in lines)
  assert "--config.levels.slow.period=512" in lines[1] and "--config.train.steps=2" in lines[1]
  assert not os.path.exists(workdir)


def test_cluster_command_reproduces_the_point(sweep_args, finished_sweep, tmp_path):
  """The printed plain command for point 2, run on its own (as one task of a SLURM array),
  trains the same model as the sweep did, in the workdir the sweep would use for it."""
  workdir, _ = finished_sweep
  other = str(tmp_path / "cluster")
  dry = run_main(sweep_args + [f"--workdir={other}", "--dry_run"])
  assert dry.returncode == 0, dry.stderr[-3000:]
  command = shlex.split(dry.stdout.splitlines()[1])
  assert command[:2] == ["python", "main.py"]
  single = run_main(command[2:])
  assert single.returncode == 0, single.stderr[-3000:]
  assert (read_json(os.path.join(other, POINTS[1], "eval.json"))
          == read_json(os.path.join(workdir, POINTS[1], "eval.json")))
  assert (read_json(os.path.join(other, POINTS[1], "config.json"))
          == read_json(os.path.join(workdir, POINTS[1], "config.json")))


def test_bad_override_field_exits_2_before_any_point_runs(sweep_args, tmp_path):
  bad = tmp_path / "bad_sweep.py"
  bad.write_text(SWEEP_FILE.replace('"levels.slow.period": [256, 512]',
                                    '"levels.slow.period": [256], "levels.slow.perod": [1]'))
  workdir = str(tmp_path / "sweep")
  args = [a if not a.startswith("--config=") else f"--config={bad}" for a in sweep_args]
  result = run_main(args + [f"--workdir={workdir}"])
  assert result.returncode == 2, result.stderr[-3000:]
  assert "levels.slow.perod" in result.stderr
  assert "Did you mean 'levels.slow.period'" in result.stderr
  assert "Traceback" not in result.stderr and not os.path.exists(workdir)
