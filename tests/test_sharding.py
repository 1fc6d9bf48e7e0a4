"""Data, FSDP and tensor sharding on 8 forced CPU devices (in a subprocess) against one device;
checkpoints that move between meshes; two processes over jax.distributed."""

import json
import os
import re
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO, forget_checkpoints_after, micro_config
from experiments import mesh as mesh_lib, state as state_lib, train

MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "tensor2_fsdp4": (1, 4, 2),
          "mixed222": (2, 2, 2), "data4_fsdp2": (4, 2, 1)}
HOPE_MESHES = ("fsdp8", "mixed222")
# Adam's first steps are ~sign(g): eps damps the round-off amplification in near-zero
# gradients, so that reduction-order differences between meshes stay at float level.
EQUIVALENCE = {"levels.outer.optimizer.eps": 1e-3}
# HOPE's inner chunks differ from the batch's 8 rows, so that a loop-invariant [chunk, chunk]
# mask in a scan's carry is not mistaken for an array of the whole batch. One layer: its 81
# shardable arrays (parameters and optimizer state) cover every kind, at half the compile.
HOPE_CHUNKS = {"model.mem_chunk_size": 4, "model.gen_chunk_size": 4, "model.n_layers": 1}


def mesh_overrides(shape):
  return dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), shape))


def train_steps(config, n):
  exp = state_lib.build(config)
  step, state = train.jit_train_step(exp), state_lib.init_state(exp)
  for s in range(n):
    state, _ = step(state, train.host_batch(exp, s))
  return exp, step, state


def run_steps(config, n):
  exp, _, state = train_steps(config, n)
  return exp, state


def compiled_text(exp, step, state):
  """The per-device HLO of a train step that has run (its compilation is cached)."""
  return step.lower(state, train.host_batch(exp, 0)).compile().as_text()


_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_COLLECTIVE = re.compile(
    r"= (.+?) (?:all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_WHILE = re.compile(r"= \((.*)\) while\(")


def whole_batch_arrays(hlo, instruction, rows):
  """Float arrays of rank >= 2 that hold all `rows` sequences of the batch, among the results
  of the `instruction`s of a per-device HLO module: under pure FSDP each device should hold
  its own rows only."""
  found = set()
  for match in filter(None, map(instruction.search, hlo.splitlines())):
    for dtype, dims in _ARRAY.findall(match.group(1)):
      dims = [int(d) for d in dims.split(",") if d]
      if dtype.startswith(("f", "bf")) and len(dims) >= 2 and dims[0] == rows:
        found.add(f"{dtype}{dims}")
  return sorted(found)


def whole_batch_report(hlo, rows):
  return {"collectives": whole_batch_arrays(hlo, _COLLECTIVE, rows),
          "carry": whole_batch_arrays(hlo, _WHILE, rows),
          "loops": len([line for line in hlo.splitlines() if _WHILE.search(line)])}


def in_context_shards(config):
  """path → [shape, per-device shard shape] of a fresh in-context state (HOPE or Titans),
  from `init_state` jitted under the mesh's rules."""
  from nested import models
  from nested.levels import param_path
  from nested.models import hope, titans
  mesh = mesh_lib.make_mesh(config.mesh)
  hparams = models.model_config(config.model)
  module = titans if config.model.name == "titans" else hope
  rows = config.train.batch_size
  init = jax.jit(mesh_lib.with_rules(lambda p: module.init_state(hparams, p, rows), mesh))
  state = init(models.init_params(config.model, 0))
  return {param_path(kp): [list(x.shape), list(x.sharding.shard_shape(x.shape))]
          for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def spec_table(state):
  """path → (PartitionSpec as lists, shape) of every leaf of a train state."""
  from nested.levels import param_path
  return {param_path(kp): ([a if isinstance(a, (str, type(None))) else list(a)
                            for a in leaf.sharding.spec], list(leaf.shape))
          for kp, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def flat_params(state):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


_EIGHT_DEVICES = textwrap.dedent("""
    import json, sys, numpy as np, jax
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_sharding import (MESHES, HOPE_MESHES, EQUIVALENCE, HOPE_CHUNKS, mesh_overrides, train_steps,
                               flat_params, spec_table, compiled_text, whole_batch_report,
                               in_context_shards)
    from conftest import forget_checkpoints_after, micro_config
    from experiments import state as state_lib, train
    assert jax.device_count() == 8, jax.devices()
    specs, whole_batch, shards = {{}}, {{}}, {{}}
    for name, shape in MESHES.items():
      exp, step, state = train_steps(
          micro_config({cache!r}, **EQUIVALENCE, **mesh_overrides(shape)), 3)
      np.savez({out!r} + f"/{{name}}.npz", *flat_params(state))
      specs[name] = spec_table(state)
      if name == "fsdp8":
        whole_batch["transformer"] = whole_batch_report(compiled_text(exp, step, state),
                                                        exp.config.train.batch_size)
    for name in HOPE_MESHES:
      exp, step, state = train_steps(micro_config({cache!r}, model="hope", **EQUIVALENCE, **HOPE_CHUNKS,
                                                  **mesh_overrides(MESHES[name])), 2)
      np.savez({out!r} + f"/hope_{{name}}.npz", *flat_params(state))
      specs["hope_" + name] = spec_table(state)
      if name == "fsdp8":
        whole_batch["hope"] = whole_batch_report(compiled_text(exp, step, state),
                                                 exp.config.train.batch_size)
    for model, name in (("hope", "fsdp8"), ("hope", "mixed222"), ("hope_attention", "mixed222"),
                        ("titans", "fsdp8")):
      shards[f"{{model}}_{{name}}"] = in_context_shards(
          micro_config({cache!r}, model=model, **mesh_overrides(MESHES[name])))
    json.dump(specs, open({out!r} + "/specs.json", "w"))
    json.dump(whole_batch, open({out!r} + "/whole_batch.json", "w"))
    json.dump(shards, open({out!r} + "/in_context_shards.json", "w"))
    # Save on a 4x2 mesh at step 2, resume on 8x1 and continue to 5 (saving at 4 and 5).
    workdir = {out!r} + "/moved"
    cfg = lambda shape: micro_config({cache!r}, **EQUIVALENCE, **mesh_overrides(shape),
                                     **{{"train.steps": 5, "train.checkpoint_every": 2}})
    train.train(state_lib.build(cfg((4, 2, 1))), workdir)
    forget_checkpoints_after(workdir, 2)
    resumed = train.train(state_lib.build(cfg((8, 1, 1))), workdir)
    np.savez({out!r} + "/moved.npz", *flat_params(resumed))
""")


@pytest.fixture(scope="module")
def eight_device_run(cache_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("eight"))
  script = _EIGHT_DEVICES.format(repo=REPO, tests=os.path.join(REPO, "tests"), cache=cache_dir,
                                 out=out)
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return out


def assert_close(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


@pytest.fixture(scope="module")
def one_device_three_steps(cache_dir):
  return flat_params(run_steps(micro_config(cache_dir, **EQUIVALENCE), 3)[1])


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_training_matches_one_device(eight_device_run, one_device_three_steps, mesh_name):
  saved = np.load(os.path.join(eight_device_run, f"{mesh_name}.npz"))
  assert_close([saved[f"arr_{i}"] for i in range(len(saved.files))], one_device_three_steps)


@pytest.fixture(scope="module")
def hope_one_device_two_steps(cache_dir):
  config = micro_config(cache_dir, model="hope", **EQUIVALENCE, **HOPE_CHUNKS)
  return flat_params(run_steps(config, 2)[1])


@pytest.mark.parametrize("mesh_name", HOPE_MESHES)
def test_sharded_hope_training_matches_one_device(eight_device_run, hope_one_device_two_steps,
                                                  mesh_name):
  saved = np.load(os.path.join(eight_device_run, f"hope_{mesh_name}.npz"))
  assert_close([saved[f"arr_{i}"] for i in range(len(saved.files))], hope_one_device_two_steps)


def test_hope_matrices_are_sharded_not_replicated(eight_device_run):
  """Under pure FSDP every parameter (and optimizer-state twin) with two or more dimensions,
  one of them divisible by 8, is split: nothing big is silently replicated."""
  table = json.load(open(os.path.join(eight_device_run, "specs.json")))["hope_fsdp8"]
  shardable = [p for p, (_, shape) in table.items()
               if len(shape) >= 2 and any(d % 8 == 0 for d in shape)]
  assert len(shardable) > 20
  assert all("fsdp" in table[p][0] for p in shardable), \
      [p for p in shardable if "fsdp" not in table[p][0]]


def test_parameters_and_optimizer_state_are_sharded_by_the_rules(eight_device_run):
  specs = json.load(open(os.path.join(eight_device_run, "specs.json")))
  mixed = {p: spec for p, (spec, _) in specs["mixed222"].items()}
  w_up = [p for p in mixed if p.endswith("layers/0/mlp/w_up/kernel")]
  w_down = [p for p in mixed if p.endswith("layers/0/mlp/w_down/kernel")]
  # the parameter, and Adam's mu and nu (its optimizer-state twins)
  assert len(w_up) == 3 and all(mixed[p] == ["fsdp", "tensor"] for p in w_up), w_up
  assert len(w_down) == 3 and all(mixed[p] == ["tensor", "fsdp"] for p in w_down)
  assert all(mixed[p] == [] for p in mixed if p.endswith("attn_norm/scale"))
  # Under pure FSDP nothing two-dimensional is left whole on every device.
  fsdp = {p: spec for p, (spec, _) in specs["fsdp8"].items()}
  matrices = [p for p in fsdp if "kernel" in p or "embedding" in p]
  assert matrices and all("fsdp" in fsdp[p] for p in matrices), \
      [p for p in matrices if "fsdp" not in fsdp[p]]


@pytest.mark.parametrize("model", ["transformer", "hope"])
def test_fsdp_keeps_activations_and_in_context_state_split_over_the_batch(eight_device_run,
                                                                         model):
  """Under pure FSDP no collective gathers the activations of the whole batch (the embedding
  lookup would otherwise inherit the table's split of d), and HOPE's scan carries only
  its own rows of the in-context state."""
  found = json.load(open(os.path.join(eight_device_run, "whole_batch.json")))[model]
  assert found["collectives"] == [], found["collectives"]
  assert found["carry"] == [], found["carry"]
  assert model == "transformer" or found["loops"] > 0


# data × fsdp shards of each mesh the in-context state was placed on.
BATCH_SHARDS = {"fsdp8": 8, "mixed222": 4}


@pytest.mark.parametrize("key", ["hope_fsdp8", "hope_mixed222", "hope_attention_mixed222",
                                 "titans_fsdp8"])
def test_in_context_state_is_placed_by_rule(eight_device_run, key):
  """Memories, fast weights, their inner optimizer states and caches: rows over data × fsdp,
  the KV cache's heads over tensor (like wk/wv's outputs), everything else whole."""
  table = json.load(open(os.path.join(eight_device_run, "in_context_shards.json")))[key]
  rows, shards = 8, BATCH_SHARDS[key.rsplit("_", 1)[1]]
  tensor = MESHES[key.rsplit("_", 1)[1]][2]
  per_row = [path for path, (shape, _) in table.items() if shape[:1] == [rows]]
  assert len(per_row) >= 10, sorted(table)
  for path, (shape, shard) in table.items():
    if path in per_row and re.search(r"mixers/\d+/[kv]$", path):
      want = [rows // shards, shape[1], shape[2] // tensor, shape[3]]
    elif path in per_row:
      want = [rows // shards] + shape[1:]
    else:
      want = shape
    assert shard == want, (path, shape, shard, want)


def test_checkpoint_moves_between_meshes_and_to_one_device(eight_device_run, cache_dir):
  config = micro_config(cache_dir, **EQUIVALENCE, **{"train.steps": 5,
                                                     "train.checkpoint_every": 2})
  _, uninterrupted = run_steps(config, 5)
  moved = np.load(os.path.join(eight_device_run, "moved.npz"))
  assert_close([moved[f"arr_{i}"] for i in range(len(moved.files))], flat_params(uninterrupted))
  # The checkpoint saved at step 4 on the 8x1 mesh restores onto this one device.
  workdir = os.path.join(eight_device_run, "moved")
  forget_checkpoints_after(workdir, 4)
  resumed = train.train(state_lib.build(config), workdir)
  assert int(resumed.step) == 5
  assert_close(flat_params(resumed), flat_params(uninterrupted))


def test_spec_rules_fall_back_to_fsdp_and_respect_divisibility():
  mesh = jax.make_mesh((1, 1, 1), mesh_lib.AXES)
  fake = type("FakeMesh", (), {"shape": {"data": 2, "fsdp": 4, "tensor": 2}})()
  assert mesh_lib.spec_for("layers/3/mlp/w_up/kernel", (64, 96), fake) == P("fsdp", "tensor")
  assert mesh_lib.spec_for("layers/3/mlp/w_up/kernel", (64, 95), fake) == P("fsdp", None)
  assert mesh_lib.spec_for("memory/unknown/w", (12, 40), fake) == P(None, "fsdp")
  assert mesh_lib.spec_for("memory/unknown/w", (7, 9), fake) == P()
  assert mesh_lib.spec_for("layers/0/attn_norm/scale", (64,), fake) == P()
  del mesh


def test_state_rules_split_rows_and_cache_heads():
  fake = type("FakeMesh", (), {"shape": {"data": 2, "fsdp": 4, "tensor": 2}})()
  rows = ("data", "fsdp")
  assert mesh_lib.state_spec("fast/0/1/w_up/kernel", (16, 32, 64), fake) == P(rows, None, None)
  assert mesh_lib.state_spec("mixers/1/k", (16, 32, 4, 8), fake) == P(rows, None, "tensor", None)
  assert mesh_lib.state_spec("mixers/1/slot_position", (32,), fake) == P()
  assert mesh_lib.state_spec("opt/0/1/count", (), fake) == P()
  assert mesh_lib.state_spec("", (4, 32, 64), fake) == P(None, None, None)  # 4 rows, 8 shards


def test_place_is_the_identity_without_rules():
  from nested import layers
  tree = {"h": jax.numpy.ones((2, 3))}
  assert layers.place(tree) is tree
  with layers.placement(lambda t: "placed"):
    assert layers.place(tree) == "placed"
  assert layers.place(tree) is tree


@pytest.mark.parametrize("sizes, n, expected", [
    ((-1, 1, 1), 8, (8, 1, 1)), ((2, -1, 2), 8, (2, 2, 2)), ((1, 1, -1), 4, (1, 1, 4))])
def test_mesh_shape_fills_the_rest(sizes, n, expected):
  cfg = ml_collections.ConfigDict(dict(zip(mesh_lib.AXES, sizes)))
  assert mesh_lib.mesh_shape(cfg, n) == expected


@pytest.mark.parametrize("sizes", [(-1, -1, 1), (3, 1, 1), (0, 1, 1), (3, -1, 1)])
def test_bad_mesh_shapes_are_user_errors(sizes):
  from nested.errors import UserError
  with pytest.raises(UserError, match="config.mesh"):
    mesh_lib.mesh_shape(ml_collections.ConfigDict(dict(zip(mesh_lib.AXES, sizes))), 8)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_over_jax_distributed(cache_dir, tmp_path):
  """Two processes on loopback train together: each loads only its half of every batch."""
  workdir = str(tmp_path / "run")
  port = free_port()
  overrides = {"train.steps": 3, "train.checkpoint_every": 3, "eval.max_batches": 1,
               **EQUIVALENCE}
  args = [f"--config.{k}={v}" for k, v in {**overrides, "data.cache_dir": cache_dir}.items()]
  from conftest import MICRO
  args = [f"--config.{k}={v}" for k, v in MICRO.items() if k not in overrides] + args
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, "main.py"), "--config=configs/transformer.py:tiny",
       *args, f"--workdir={workdir}", "--distributed", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  if any("gloo" in o.lower() and "not" in o.lower() and p.returncode for p, o in
         zip(procs, outputs)):
    pytest.skip("this jaxlib's CPU backend has no cross-process collectives (gloo)")
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  results = json.load(open(os.path.join(workdir, "eval.json")))
  assert results["step"] == 3
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m["step"] for m in metrics] == [1, 2, 3]  # written once, by process 0
  _, state = run_steps(micro_config(cache_dir, **overrides), 3)
  exp = state_lib.build(micro_config(cache_dir, **overrides))
  from experiments import checkpoint
  restored = checkpoint.restore(checkpoint.manager(workdir, read_only=True), 3,
                                state_lib.abstract_state(exp), workdir)
  assert_close(flat_params(restored), flat_params(state))
