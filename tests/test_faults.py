"""Fault injection (issue 17): a damaged checkpoint is an error naming what is damaged and the
newest intact checkpoint, never garbage weights; a NaN never replaces a good checkpoint.

One micro run (checkpoints at steps 3 and 6) is trained once; each test damages a copy.
"""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
import tensorstore as ts

from conftest import REPO, micro_config
from experiments import checkpoint, state as state_lib, train
from nested.errors import UserError


def params_of(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def assert_trees_bitwise_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x.view(np.uint32), y.view(np.uint32))


@pytest.fixture(scope="module")
def trained(cache_dir, tmp_path_factory):
  """(workdir with checkpoints 3 and 6, the params at step 6)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  state = train.train(state_lib.build(micro_config(cache_dir)), workdir)
  return workdir, params_of(state)


@pytest.fixture
def copy(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained[0], workdir)
  return workdir


def chunk_location(workdir, step, key_prefix):
  """(data file, offset, length) of the first stored chunk whose OCDBT key starts with
  `key_prefix` (e.g. b"params.unembed"), read from the b-tree."""
  ocdbt = os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0")
  kv = ts.KvStore.open(f"file://{ocdbt}/").result()
  root = ts.ocdbt.dump(kv).result()["versions"][-1]["root"]["location"]
  for entry in ts.ocdbt.dump(kv, root).result()["entries"]:
    if entry["key"].startswith(key_prefix) and "indirect_value" in entry:
      name, offset, length = _parse(entry)
      return os.path.join(ocdbt, name), int(offset), int(length)
  raise AssertionError(f"no stored chunk for {key_prefix}")


def _parse(entry):
  location = entry["indirect_value"][len("value::"):]
  name, offset, length = location.rsplit(":", 2)
  return name, offset, length


def flip_bytes(path, offset, count):
  with open(path, "r+b") as f:
    f.seek(offset)
    data = f.read(count)
    f.seek(offset)
    f.write(bytes(b ^ 0xFF for b in data))


def config(cache_dir, **overrides):
  return micro_config(cache_dir, **{"train.steps": 9, **overrides})


def test_flipped_parameter_bytes_are_named_and_resume_step_resumes_bitwise(cache_dir, copy,
                                                                           trained):
  path, offset, length = chunk_location(copy, 6, b"params.unembed")
  flip_bytes(path, offset + length // 2, 64)
  with pytest.raises(UserError) as e:
    train.train(state_lib.build(config(cache_dir)), copy)
  message = str(e.value)
  assert "step 6" in message and "damaged" in message and "params/unembed" in message, message
  assert "--config.train.resume_step=3" in message, message
  # Resuming from 3 rewrites step 6 bit for bit, and goes on.
  resumed = train.train(state_lib.build(micro_config(cache_dir, **{"train.resume_step": 3})), copy)
  assert_trees_bitwise_equal(trained[1], params_of(resumed))
  assert os.listdir(checkpoint.set_aside_dir(copy)) == ["6"]


def test_flipped_optimizer_state_bytes_are_named_and_parameter_restores_do_not_read_them(
    cache_dir, copy, trained):
  path, offset, length = chunk_location(copy, 6, b"opt_state.1.inner_states.outer")
  flip_bytes(path, offset + length // 2, 64)
  exp = state_lib.build(config(cache_dir))
  with pytest.raises(UserError, match=r"step 6 .* damaged: .*opt_state/.*resume_step=3"):
    train.restore_or_init(exp, checkpoint.manager(copy), copy)
  # eval, generate, zeroshot and compress restore the parameters alone (orbax's partial
  # restore): the damaged optimizer state is never read, and the parameters verify.
  step, params = state_lib.restore_latest(exp, copy)
  assert step == 6
  assert_trees_bitwise_equal(trained[1], jax.tree.map(np.asarray, jax.device_get(params)))


def test_flipped_record_bytes_say_damaged_with_the_file(cache_dir, copy):
  record = os.path.join(copy, "checkpoints", "6", "record", "metadata")
  text = open(record).read()
  position = text.index('"transformer"') + 3  # inside the model name: still valid JSON
  flip_bytes(record, position, 1)
  with pytest.raises(UserError) as e:
    train.train(state_lib.build(config(cache_dir)), copy)
  message = str(e.value)
  assert "damaged" in message and record in message and "resume_step=3" in message, message
  assert "different model" not in message


def test_truncated_array_file_is_damage(cache_dir, copy):
  path, offset, length = chunk_location(copy, 6, b"params.embed")
  os.truncate(path, offset + length // 2)
  with pytest.raises(UserError, match=r"step 6 .* is damaged: .*resume_step=3"):
    state_lib.restore_latest(state_lib.build(config(cache_dir)), copy)


def test_missing_commit_marker_still_restores_the_verified_arrays(cache_dir, copy, trained):
  # Orbax commits by renaming a complete temporary directory; its marker file is redundant
  # there, and every array is checked against its checksum anyway.
  os.remove(os.path.join(copy, "checkpoints", "6", "commit_success.txt"))
  step, params = state_lib.restore_latest(state_lib.build(config(cache_dir)), copy)
  assert step == 6
  assert_trees_bitwise_equal(trained[1], jax.tree.map(np.asarray, jax.device_get(params)))


def test_nan_from_a_huge_learning_rate_stops_and_keeps_the_good_checkpoints(cache_dir, copy):
  with pytest.raises(checkpoint.Diverged, match=r"At step [789] the loss .*Last good "
                                               r"checkpoint: the latest is step 6") as stopped:
    train.train(state_lib.build(config(cache_dir, **{"train.lr": 1e9})), copy)
  assert stopped.value.step in (7, 8, 9) and isinstance(stopped.value, UserError)
  mngr = checkpoint.manager(copy, read_only=True)
  assert list(mngr.all_steps()) == [3, 6]


def test_skip_nonfinite_keeps_the_state_and_stop_does_not(cache_dir):
  exp = state_lib.build(micro_config(cache_dir))
  params = jax.device_get(state_lib.init_state(exp).params)
  # A NaN among the output weights makes every position's log-softmax, so the loss, NaN.
  params["unembed"]["kernel"] = params["unembed"]["kernel"].copy()
  params["unembed"]["kernel"][0, 0] = np.nan
  sgd = optax.sgd(0.1)
  batch = train.host_batch(exp, 0)
  results = {}
  for skip in (False, True):
    step = jax.jit(train.make_train_step(exp.apply, sgd, 1, skip_nonfinite=skip))
    state, metrics = step(state_lib.TrainState(np.int32(0), params, sgd.init(params)), batch)
    assert bool(metrics["nonfinite"])
    results[skip] = params_of(state)
  assert_trees_bitwise_equal(params, results[True])
  assert np.isnan(results[False]["embed"]["embedding"]).any()  # the NaN spread


def test_workdir_that_is_a_file_is_a_user_error(cache_dir, tmp_path):
  path = tmp_path / "a_file"
  path.write_text("x")
  with pytest.raises(UserError, match="is a file, not a directory"):
    train.run(micro_config(cache_dir), str(path))



def test_workdir_that_cannot_be_written_is_a_user_error(cache_dir):
  # sysfs refuses new entries even to root, who can write through any permission bits.
  with pytest.raises(UserError, match=r"--workdir=/sys/nested-run cannot be written \(.+\)"):
    train.run(micro_config(cache_dir), "/sys/nested-run")


DISK_FULL = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
import jax
from conftest import micro_config
from experiments import train
from nested.errors import UserError

# Every file write past 20 kB fails with EFBIG, as on a full disk: the config and metrics
# fit, the step-9 checkpoint's array data does not (nor would the compilation cache's).
jax.config.update("jax_enable_compilation_cache", False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
try:
  train.run(micro_config({cache!r}, **{{"train.steps": 9}}), {workdir!r})
except UserError as e:
  print(e)
  sys.exit(3)
"""


def test_disk_full_during_a_save_is_a_user_error_and_keeps_the_checkpoints(cache_dir, copy,
                                                                            trained):
  script = DISK_FULL.format(tests=os.path.join(REPO, "tests"), cache=cache_dir, workdir=copy)
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 3, done.stderr[-2000:]
  assert "failed (File too large)" in done.stdout, done.stdout
  assert "the latest is step 6" in done.stdout, done.stdout
  assert checkpoint.manager(copy, read_only=True).all_steps() == [3, 6]
  step, params = state_lib.restore_latest(state_lib.build(config(cache_dir)), copy)
  assert step == 6
  assert_trees_bitwise_equal(trained[1], jax.tree.map(np.asarray, jax.device_get(params)))
  # With space again, the same command goes on from step 6 past the half-written step 9.
  train.run(config(cache_dir), copy)
  assert checkpoint.manager(copy, read_only=True).all_steps() == [3, 6, 9]

KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from orbax.checkpoint._src.path import atomicity
from conftest import micro_config
from experiments import state as state_lib, train

finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def killing_finalize(self, *args, **kwargs):
  if self._final_path.name == "6":  # step 6 is written but not committed yet
    os.kill(os.getpid(), signal.SIGKILL)
  return await finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = killing_finalize
train.train(state_lib.build(micro_config({cache!r})), {workdir!r})
"""


def test_sigkill_during_async_save_resumes_bitwise_from_the_last_commit(cache_dir, tmp_path,
                                                                        trained):
  workdir = str(tmp_path / "run")
  script = KILL_DURING_SAVE.format(tests=os.path.join(REPO, "tests"), cache=cache_dir,
                                   workdir=workdir)
  done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == -9, done.stderr[-2000:]
  assert checkpoint.manager(workdir, read_only=True).all_steps() == [3]
  resumed = train.train(state_lib.build(micro_config(cache_dir)), workdir)
  assert_trees_bitwise_equal(trained[1], params_of(resumed))
