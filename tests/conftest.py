"""Shared fixtures: very small configs (Transformer++ by default) on the bundled corpus."""

import importlib
import os
import subprocess
import sys
import tempfile

# Every test compiles its own small programs, many of them the same HLO (the same micro
# config built again, and main.py in subprocesses): JAX's persistent compilation cache,
# shared by the xdist workers and the subprocesses (they inherit the environment), compiles
# each once. XLA's key is the HLO and the compile options, so a hit is the same executable.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"nested-tests-jax-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `configs` is a directory of config files, not an installed package

from configs import transformer  # noqa: E402

# Small enough that a step takes milliseconds on one CPU core.
MICRO = {
    "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.d_ff": 64,
    "train.seq_len": 32, "train.batch_size": 8, "train.steps": 6, "train.warmup_steps": 2,
    "train.log_every": 1, "train.checkpoint_every": 3, "eval.batch_size": 8,
    "eval.max_batches": 2,
}


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
  """Under pytest-xdist (`-n auto`, with `--dist loadgroup` from pyproject.toml) the tests
  that share a module-scoped fixture run on one worker, so each such fixture is built once."""
  del config
  for item in items:
    fixtures = getattr(item, "_fixtureinfo", None)
    defs = fixtures.name2fixturedefs.values() if fixtures else ()
    if any(d and d[-1].scope == "module" for d in defs):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """One tokenized-corpus cache for the whole session, so the corpus is tokenized once."""
  return str(tmp_path_factory.mktemp("cache"))


# MICRO's model fields for the other models (their own dimensions, same scale).
MICRO_MODEL = {
    "titans": {"model.d_ff": 64, "model.mem_hidden": 16, "model.chunk_size": 8},
    "hope": {"model.cms_hidden": "32,32,32", "model.mem_hidden": 16, "model.chunk_size": 8,
             "model.mem_chunk_size": 8, "model.gen_chunk_size": 8, "model.context": 32,
             "model.cms_periods": "8,16,2048"},
    "hope_attention": {"model.cms_hidden": "32,32,32", "model.chunk_size": 8,
                       "model.context": 32, "model.cms_periods": "8,16,2048"},
}


def micro_config(cache_dir, preset="tiny", model="transformer", **overrides):
  """`overrides` use flattened keys, e.g. micro_config(d, **{"train.steps": 3}).

  `model` names the config module (configs/<model>.py); for models other than the
  Transformer++ the model fields of MICRO that the model lacks (d_ff) are replaced by
  MICRO_MODEL[model].
  """
  c = (transformer if model == "transformer" else
       importlib.import_module(f"configs.{model}")).get_config(preset)
  micro = {k: v for k, v in MICRO.items() if not k.startswith("model.") or k[6:] in c.model}
  c.update_from_flattened_dict({**micro, **MICRO_MODEL.get(model, {}),
                                "data.cache_dir": cache_dir, **overrides})
  return c


def cli_flags(cache_dir, preset="tiny", **overrides):
  items = {**MICRO, "data.cache_dir": cache_dir, **overrides}
  return [f"--config=configs/transformer.py:{preset}"] + [
      f"--config.{k}={v}" for k, v in items.items()]


def run_main(args, timeout=300, env=None):
  """Runs main.py in a fresh interpreter, as a user would."""
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def forget_checkpoints_after(workdir, step):
  """Simulates a run interrupted right after its checkpoint at `step`."""
  import shutil
  root = os.path.join(workdir, "checkpoints")
  for name in os.listdir(root):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(root, name))
