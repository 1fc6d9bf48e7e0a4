"""Device memory and compile time of each preset's train step, from XLA, without running it.

  python experiments/bench_memory.py --preset=small                      # one device
  python experiments/bench_memory.py --preset=760m --devices=8   # 8 devices, the preset's mesh
  python experiments/bench_memory.py --preset=small --models=hope --set=model.remat=nested

For each model the real train step (`experiments.train.jit_train_step`) is lowered at the
preset's global batch and compiled for `--devices` CPU devices standing in for GPUs
(`--xla_force_host_platform_device_count`); nothing is allocated. Bytes are per device, from
`compiled.memory_analysis()`: arguments (train state + batch), temporaries (activations and
what the backward pass keeps), and the total against a budget (70 GB by default, the
headroom of an 80 GB GPU). The printed table goes to BENCHMARKS.md.
"""

import os
import sys


def _devices_from_argv() -> int:
  for arg in sys.argv[1:]:
    if arg.startswith("--devices="):
      return int(arg.split("=", 1)[1])
  return 1


# The CPU device count is read when jax initialises its backend: set it first.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={_devices_from_argv()}")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datetime  # noqa: E402
import importlib  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import footprint, mesh as mesh_lib, state as state_lib, sweep, train  # noqa: E402
from nested.errors import UserError  # noqa: E402

flags.DEFINE_string("preset", "small", "Preset of every config file.")
flags.DEFINE_list("models", ["transformer", "titans", "hope", "hope_attention"], "Config files.")
flags.DEFINE_integer("devices", 1, "CPU devices standing in for accelerators.")
flags.DEFINE_integer("fsdp", 0, "config.mesh.fsdp (the rest of the devices go to data); "
                     "0 keeps the preset's mesh.")
flags.DEFINE_float("budget_gb", 70.0, "Per-device budget the table compares against.")
flags.DEFINE_multi_string("set", [], "Config overrides, e.g. --set=model.remat=nested.")
FLAGS = flags.FLAGS


def preset_config(name: str):
  config = importlib.import_module(f"configs.{name}").get_config(FLAGS.preset)
  if FLAGS.fsdp:
    config.mesh.fsdp, config.mesh.data = FLAGS.fsdp, -1
  overrides = sweep.parse_assignments(FLAGS.set, flag="--set", example="model.remat=nested")
  return sweep.override(config, overrides, where="--set", base=f"configs/{name}.py:{FLAGS.preset}",
                        owner="bench_memory's")


def measure(config) -> tuple[footprint.Footprint, jax.sharding.Mesh]:
  """The step's footprint and the mesh it was compiled for (its -1 axes resolved)."""
  exp = state_lib.build(config, load_data=False)
  return train.step_footprint(exp), exp.mesh


def fits(f: footprint.Footprint, config, budget: float, batch_shards: int) -> str:
  if f.total <= budget:
    return "yes"
  accum = footprint.fitting_grad_accum(f, config, budget, batch_shards)
  return f"no: grad_accum={accum} would (est.)" if accum else "no"


def main(argv):
  del argv
  print(f"{datetime.date.today()}, jax {jax.__version__}, {jax.device_count()} × "
        f"{jax.devices()[0].device_kind} devices; overrides {FLAGS.set}")
  print("| model | preset | mesh | batch × context | grad_accum | arguments | temporaries "
        f"| total | fits {FLAGS.budget_gb:.0f} GB | compile |")
  print("|---|---|---|---|---:|---:|---:|---:|---|---:|")
  budget = FLAGS.budget_gb * 2**30
  for name in FLAGS.models:
    try:
      config = preset_config(name)
    except UserError as e:
      sys.exit(f"error: {e}")
    f, mesh = measure(config)
    batch_shards = mesh_lib.batch_divisor(mesh)
    t = config.train
    axes = " × ".join(f"{k} {n}" for k, n in mesh.shape.items() if n != 1) or "1 device"
    print(f"| {config.model.name} | {FLAGS.preset} | {axes} | {t.batch_size} × {t.seq_len} | "
          f"{t.grad_accum} | {footprint.gb(f.arguments)} | {footprint.gb(f.temporaries)} | "
          f"{footprint.gb(f.total)} | {fits(f, config, budget, batch_shards)} | "
          f"{f.compile_seconds:.0f} s |", flush=True)


if __name__ == "__main__":
  app.run(main)
