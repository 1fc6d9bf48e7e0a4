"""JIT-Delta in the model: compressed parameter trees, --mode=compress, evaluation and
generation from the compressed copy of a trained micro HOPE."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from compression import codecs, tree as ctree
from conftest import MICRO, MICRO_MODEL, micro_config, run_main
from experiments import compress, evaluate, generate, state as state_lib, train
from nested.errors import UserError
from nested.levels import param_path

# 1-layer micro HOPE: its slowest level (cms_slow, /cms/2/) holds three 32×32 matrices and
# fires every 2 steps (512 tokens).
SMALL = {"model.n_layers": 1, "compression.min_size": 256, "train.steps": 2,
         "train.checkpoint_every": 2,
         "eval.max_batches": 1, "levels.cms_slow.period": 512}


def hope_config(cache_dir, **overrides):
  return micro_config(cache_dir, model="hope", **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
  """A workdir holding a 2-step micro HOPE checkpoint."""
  workdir = str(tmp_path_factory.mktemp("hope"))
  train.train(state_lib.build(hope_config(cache_dir)), workdir)
  return workdir


def random_tree(seed):
  rng = np.random.default_rng(seed)
  return {"a": {"kernel": rng.standard_normal((300, 40)).astype(np.float32)},
          "b": {"scale": rng.standard_normal(40).astype(np.float32),
                "w": rng.standard_t(3, (64, 24)).astype(ml_dtypes.bfloat16)}}


def bits(x):
  x = np.asarray(x)
  return x.view(f"uint{8 * x.dtype.itemsize}")


# ----------------------------------------------------------------------------- trees


def test_compressed_tree_decodes_bit_for_bit_inside_jit():
  params = random_tree(np.random.SeedSequence().entropy % 2**32)
  tree = ctree.compress(params, ["a/kernel", "b/w"], "exact")
  assert ctree.is_compressed(tree["a"]["kernel"]) and not ctree.is_compressed(tree["b"]["scale"])
  dense = jax.jit(ctree.decompress)(tree)
  for path, leaf in ctree.leaves_with_paths(params):
    got = dict(ctree.leaves_with_paths(dense))[path]
    assert got.dtype == leaf.dtype and np.array_equal(bits(got), bits(leaf)), path


def test_int4_tree_equals_the_reference_decoder_and_dtype_cast():
  params = random_tree(1)
  tree = ctree.compress(params, ["a/kernel"], "int4")
  want = codecs.decode(codecs.encode(params["a"]["kernel"], "int4"))
  np.testing.assert_array_equal(np.asarray(jax.jit(ctree.decompress)(tree)["a"]["kernel"]), want)
  cast = ctree.compress(params, ["a/kernel"], "exact", dtype="bfloat16")
  got = np.asarray(ctree.decompress(cast)["a"]["kernel"])
  assert got.dtype == ml_dtypes.bfloat16
  assert np.array_equal(bits(got), bits(params["a"]["kernel"].astype(ml_dtypes.bfloat16)))


def test_select_skips_small_and_unclaimed_tensors():
  params = random_tree(2)
  assert ctree.select(params, lambda p: True, min_size=1000) == ["a/kernel", "b/w"]
  assert ctree.select(params, lambda p: p.startswith("b/"), min_size=1) == ["b/scale", "b/w"]
  with pytest.raises(UserError, match="no parameter at"):
    ctree.compress(params, ["a/nope"], "exact")


def test_saved_tree_round_trips_and_is_never_overwritten(tmp_path):
  params = random_tree(3)
  tree = ctree.compress(params, ["a/kernel"], "exact")
  where = str(tmp_path / "copy")
  ctree.save(where, tree, {"note": 1})
  loaded, meta = ctree.load(where, params)
  assert meta == {"note": 1} and ctree.is_compressed(loaded["a"]["kernel"])
  for (path, want), (_, got) in zip(ctree.leaves_with_paths(ctree.decompress(tree)),
                                    ctree.leaves_with_paths(ctree.decompress(loaded))):
    assert np.array_equal(bits(got), bits(want)), path
  assert os.path.getsize(os.path.join(where, ctree.TENSORS)) == sum(
      e["nbytes"] for e in json.load(open(os.path.join(where, ctree.MANIFEST)))["tensors"])
  before = open(os.path.join(where, ctree.TENSORS), "rb").read()
  with pytest.raises(UserError, match="already exists"):
    ctree.save(where, tree, {})
  assert open(os.path.join(where, ctree.TENSORS), "rb").read() == before
  with pytest.raises(UserError, match="other parameters"):
    ctree.load(where, {"a": params["a"]})


@pytest.mark.parametrize("victim", ["a/kernel", "b/scale"])
def test_a_damaged_tensor_is_an_error_not_garbage(tmp_path, victim):
  params = random_tree(4)
  where = str(tmp_path / "copy")
  ctree.save(where, ctree.compress(params, ["a/kernel"], "exact"), {})
  entry = next(e for e in ctree.read_manifest(where)["tensors"] if e["path"] == victim)
  path = os.path.join(where, ctree.TENSORS)
  data = bytearray(open(path, "rb").read())
  data[entry["offset"] + entry["nbytes"] // 2] ^= 0x10
  open(path, "wb").write(bytes(data))
  with pytest.raises(UserError, match="damaged"):
    ctree.load(where, params)


# ----------------------------------------------------------------------------- the mode


def test_compress_mode_writes_the_slowest_level_and_a_report(cache_dir, trained):
  config = hope_config(cache_dir, **{"compression.codec": "exact"})
  result = compress.run(config, trained)
  where = result["directory"]
  assert where.endswith(os.path.join("compressed", "step_2-exact"))
  rows = result["rows"]
  assert sorted(r["path"] for r in rows) == sorted(
      f"layers/0/cms/2/mlp/{w}/kernel" for w in ("w_down", "w_gate", "w_up"))
  for r in rows:
    assert r["bits_per_weight"] == pytest.approx(8 * r["bytes_after"] / np.prod(r["shape"]))
  manifest = ctree.read_manifest(where)
  kinds = {e["path"]: e["kind"] for e in manifest["tensors"]}
  assert {p for p, k in kinds.items() if k == "exact"} == {r["path"] for r in rows}
  report = open(os.path.join(where, "report.md")).read()
  assert "layers/0/cms/2/mlp/w_up/kernel" in report and "bits/weight" in report

  # Same settings: reported again, not rewritten. Other settings: refused.
  mtime = os.path.getmtime(os.path.join(where, ctree.TENSORS))
  assert compress.run(config, trained)["totals"] == result["totals"]
  assert os.path.getmtime(os.path.join(where, ctree.TENSORS)) == mtime
  with pytest.raises(UserError, match="other settings"):
    compress.run(hope_config(cache_dir, **{"compression.codec": "exact",
                                           "compression.min_size": 2048}), trained)


def test_exact_copy_gives_bitwise_identical_logits_and_loss(cache_dir, trained):
  config = hope_config(cache_dir, **{"compression.codec": "exact"})
  compress.run(config, trained)
  results = evaluate.run(config, trained)
  assert results["logits_bitwise_identical"] and results["logits_max_abs_diff"] == 0.0
  assert results["compressed"]["loss"] == results["dense"]["loss"]
  assert json.load(open(os.path.join(results["directory"], "eval.json")))["delta_loss"] == 0.0


def test_int4_copy_evaluates_like_a_reference_decoder_predicts(cache_dir, trained):
  config = hope_config(cache_dir, **{"compression.codec": "int4"})
  compress.run(config, trained)
  exp = state_lib.build(config)
  _, tree, _ = compress.load_latest(exp, trained)
  got = evaluate.evaluate(exp, tree)["loss"]
  # Independent reference: the numpy int4 round trip of each tensor, in the dense model.
  _, params = state_lib.restore_latest(exp, trained)
  paths = compress.selected_paths(config, jax.device_get(params), ["cms_slow"], 256)
  reference = jax.tree_util.tree_map_with_path(
      lambda kp, x: (codecs.decode(codecs.encode(np.asarray(x), "int4"))
                     if param_path(kp) in paths else x), jax.device_get(params))
  # The kernel decodes q * s in float32 like the reference: the same weights, the same loss.
  assert got == evaluate.evaluate(exp, jax.tree.map(jnp.asarray, reference))["loss"]
  path = "layers/0/cms/2/mlp/w_up/kernel"
  assert not np.array_equal(dict(ctree.leaves_with_paths(reference))[path],
                            dict(ctree.leaves_with_paths(params))[path])


def test_generation_from_the_exact_copy_equals_the_dense_model(cache_dir, trained):
  overrides = {"generate.max_new_tokens": 6, "generate.num_samples": 2,
               "generate.prompt": "To be", "generate.temperature": 1.0, "generate.seed": 7}
  dense = generate.run(hope_config(cache_dir, **overrides), trained)
  config = hope_config(cache_dir, **{**overrides, "compression.codec": "exact"})
  compress.run(config, trained)
  assert generate.run(config, trained)["tokens"] == dense["tokens"]
  assert len(dense["tokens"]) == 2 and all(len(t) == 6 for t in dense["tokens"])


def test_loading_needs_a_compress_first_and_matching_settings(cache_dir, trained):
  exp = state_lib.build(hope_config(cache_dir, **{"compression.codec": "int4",
                                                  "compression.dtype": "float16"}))
  with pytest.raises(UserError, match="--mode=compress"):
    compress.load_latest(exp, trained)


@pytest.mark.parametrize("overrides, message", [
    ({"compression.codec": "zstd"}, "exact .bit-exact. or int4"),
    ({"compression.codec": "exact", "compression.levels": "cms_fast"}, "not levels of"),
    ({"compression.codec": "exact", "compression.dtype": "int8"}, "dtype"),
])
def test_bad_compression_settings_are_user_errors(cache_dir, overrides, message):
  with pytest.raises(UserError, match=message):
    compress.settings(hope_config(cache_dir, **overrides))


def test_default_levels_need_a_level_slower_than_one_step(cache_dir):
  config = micro_config(cache_dir, **{"compression.codec": "exact"})
  with pytest.raises(UserError, match="compression.levels=outer"):
    compress.settings(config)
  config.compression.levels = "outer"
  assert compress.settings(config)["levels"] == ["outer"]


def test_compress_from_the_command_line(cache_dir, trained, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(trained, workdir, ignore=shutil.ignore_patterns("compressed"))
  micro = {k: v for k, v in MICRO.items() if k != "model.d_ff"}  # HOPE has no d_ff
  items = {**micro, **MICRO_MODEL["hope"], **SMALL, "data.cache_dir": cache_dir,
           "compression.codec": "int4"}
  args = (["--config=configs/hope.py:tiny"] + [f"--config.{k}={v}" for k, v in items.items()]
          + [f"--workdir={workdir}", "--mode=compress"])
  done = run_main(args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "bits/weight" in done.stderr and "report.md" in done.stderr
  assert "read_only" not in done.stderr        # orbax's read-only chatter is filtered
  assert os.path.exists(os.path.join(workdir, "compressed", "step_2-int4", "report.md"))


def test_training_with_the_slow_level_compressed_is_bit_identical(cache_dir, trained, tmp_path):
  """cms_slow stays exact-compressed between its updates; it fires on step 2 and is
  re-encoded. The run matches the dense run bit for bit, and its checkpoint is dense."""
  config = hope_config(cache_dir, **{"compression.codec": "exact", "compression.train": True})
  exp = state_lib.build(config)
  state = train.train(exp, str(tmp_path / "run"))
  kept = [p for p, leaf in ctree.leaves_with_paths(state.params) if ctree.is_compressed(leaf)]
  assert len(kept) == 3 and all("/cms/2/" in p for p in kept)
  _, want = state_lib.restore_latest(exp, trained)
  _, saved = state_lib.restore_latest(exp, str(tmp_path / "run"))
  got = train.dense_state(state).params
  for (path, w), (_, g), (_, c) in zip(*(ctree.leaves_with_paths(jax.device_get(t))
                                         for t in (want, got, saved))):
    assert np.array_equal(bits(g), bits(w)) and np.array_equal(bits(c), bits(w)), path


def test_escape_overflow_while_training_is_a_user_error(cache_dir):
  # Exponents spread over 100 binades: a 15-exponent window holds ~15% of each column.
  x = (2.0 ** -(np.arange(128 * 16) % 100)).reshape(128, 16).astype(np.float32)
  plan = compress.OnDevice(owners={"w": "slow"}, capacity={"w": 64})
  _, overflow = jax.jit(plan.compress)({"w": x})
  assert int(overflow) == 1
  with pytest.raises(UserError, match="escape_capacity"):
    train.check_overflow(int(overflow), 7, hope_config(cache_dir))
  assert plan.levels == {"slow"}


@pytest.mark.parametrize("overrides", [{"compression.codec": "int4"},
                                       {"compression.codec": "exact",
                                        "compression.dtype": "bfloat16"},
                                       {"compression.codec": "exact",
                                        "compression.escape_capacity": 0.0}])
def test_compressed_training_needs_the_exact_codec(cache_dir, overrides):
  config = hope_config(cache_dir, **{**overrides, "compression.train": True})
  with pytest.raises(UserError, match="compression"):
    compress.on_device(config, state_lib.build(config).abstract_params)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32, np.float16])
def test_short_tensors_get_short_blocks_that_the_kernels_decode(dtype):
  from compression import kernels
  rng = np.random.default_rng(np.random.SeedSequence().entropy)
  w = rng.standard_t(4, (40, 72)).astype(dtype)
  t = codecs.encode(w, "exact")
  assert t.block == codecs.default_exact_block(w.dtype, 40) < codecs.DEFAULT_EXACT_BLOCK[
      np.dtype(dtype).name]
  assert np.array_equal(bits(kernels.decode(t)), bits(w))
  x = rng.standard_normal((3, 40)).astype(dtype)
  np.testing.assert_allclose(np.asarray(kernels.matmul(x, t), np.float32),
                             np.asarray(kernels.matmul_reference(x, t), np.float32), rtol=2e-2,
                             atol=1e-2)
