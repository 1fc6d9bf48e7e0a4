"""Launcher: flags → config → `experiments.<mode>.run(config, workdir)`.

  python main.py --config=configs/transformer.py:tiny --workdir=runs/tiny
  python main.py --config=configs/transformer.py:tiny --workdir=runs/tiny --mode=eval
  python main.py --config=configs/transformer.py:tiny --config.train.steps=200 --workdir=...
  python main.py ... --jax_compilation_cache_dir=~/.cache/jax   # JAX's flags are accepted too
"""

import logging as py_logging
import sys
import textwrap

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import mesh, modes
from nested.errors import UserError

config_flags.DEFINE_config_file(
    "config", None, "Experiment config: configs/<model>.py:<preset>. Override any field "
    "with --config.<section>.<field>=<value>.", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl, config.json and "
                    "results go. Re-running with the same workdir resumes.")
flags.DEFINE_enum("mode", "train", sorted(modes.MODES), "What to do: "
                  + "; ".join(f"{name}: {doc}" for name, (_, doc) in sorted(modes.MODES.items())))
flags.DEFINE_bool("distributed", False, "Multi-process run: call jax.distributed.initialize "
                  "first (the cluster is detected on SLURM and TPU pods; elsewhere also pass "
                  "the three flags below, one process per host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for --distributed.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for --distributed.")
flags.DEFINE_integer("process_id", None, "This process's index, for --distributed.")
flags.DEFINE_bool("dry_run", False, "--mode=sweep: check the sweep, print each point's plain "
                  "main.py command line (one a line, in point order) and run nothing.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def fail(message: str) -> None:
  # Paths and flags stay whole (a long one gets a line of its own), so they can be copied.
  print("\nerror: " + textwrap.fill(message, width=100, subsequent_indent="       ",
                                    break_long_words=False, break_on_hyphens=False),
        file=sys.stderr)
  sys.exit(2)


def explain(error: BaseException, *, unquote: bool = False) -> str:
  """The informative part of an error: config_flags embeds whole tracebacks in its messages,
  and ml_collections quotes and escapes its KeyError texts."""
  lines = [line.strip() for line in str(error).replace("\\n", "\n").replace("\\'", "'").splitlines()]
  if unquote:
    lines = [line.strip("'\"") for line in lines]
  lines = [line for line in lines if line]
  if any(line.startswith("Traceback") for line in lines):
    lines = lines[-1:]
  return ": ".join(lines).rstrip(".") or type(error).__name__


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with config mistakes reported as one paragraph instead of a traceback."""
  overrides = " ".join(a for a in argv[1:] if a.startswith("--config.")) or "none"
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # config_flags defers a failure to load the file until its first use
    return rest
  except OSError as e:
    fail(f"Could not load the config file ({explain(e)}). Pass --config=configs/<model>.py:"
         f"<preset> with a path relative to where you run main.py, e.g. "
         f"--config=configs/transformer.py:tiny from the repository root.")
  except flags.Error as e:
    fail(f"{explain(e)}. See `python main.py --helpfull`.")
  except UserError as e:  # a config file that checks its own fields (e.g. configs/sweeps/)
    fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an unknown field or a value of the wrong type.
    fail(f"The config rejected the command line ({explain(e, unquote=True)}). Each --config.<section>."
         f"<field> must name a field defined in configs/base.py or in the model's config file, "
         f"with a value of that field's type; the overrides given were: {overrides}.")


def quiet_library_info(record: py_logging.LogRecord) -> bool:
  """Orbax logs every step of every save at INFO, and warns that a manager we opened
  read-only (to evaluate or compress) is read-only; keep its other warnings."""
  if "/orbax/" not in record.pathname:
    return True
  message = record.getMessage()
  return (record.levelno >= py_logging.WARNING and "read_only" not in message
          and "read only" not in message)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}: every option is a --flag.")
  logging.get_absl_handler().addFilter(quiet_library_info)
  run, _ = modes.MODES[FLAGS.mode]
  try:
    if FLAGS.distributed:
      mesh.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
    run(FLAGS.config, FLAGS.workdir)
  except UserError as e:
    logging.flush()
    fail(str(e))


if __name__ == "__main__":
  # JAX's own options as flags (--jax_compilation_cache_dir, --jax_log_compiles, ...), as
  # big_vision and MaxText accept them; set after parsing, before anything is compiled.
  jax.config.config_with_absl()
  app.run(main, flags_parser=parse_flags)
