"""main.py end to end in a fresh interpreter: train, resume, eval, SIGTERM, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import REPO, cli_flags, run_main


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_train_resume_and_eval(cache_dir, tmp_path):
  workdir = str(tmp_path / "run")
  first = run_main(cli_flags(cache_dir, **{"train.steps": 4}) + [f"--workdir={workdir}"])
  assert first.returncode == 0, first.stderr[-3000:]
  assert "ETA" in first.stderr and "tok/s" in first.stderr
  for name in ("config.json", "metrics.jsonl", "eval.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["steps"] == 4
  assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3, 4]
  results = json.load(open(os.path.join(workdir, "eval.json")))
  assert results["step"] == 4
  np.testing.assert_allclose(results["perplexity"], np.exp(results["loss"]), rtol=1e-9)
  # The byte tokenizer makes bits-per-byte = loss / ln 2, up to the validation text's bytes per token.
  np.testing.assert_allclose(results["bits_per_byte"], results["loss"] / np.log(2), rtol=1e-9)

  second = run_main(cli_flags(cache_dir, **{"train.steps": 6}) + [f"--workdir={workdir}"])
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming from the checkpoint at step 4" in second.stderr
  assert [r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == list(range(1, 7))

  # JAX's own flags are accepted: this one moves the compilation cache (conftest sets one).
  jax_cache = str(tmp_path / "jax_cache")
  evaluated = run_main(cli_flags(cache_dir, **{"train.steps": 6})
                       + [f"--workdir={workdir}", "--mode=eval",
                          f"--jax_compilation_cache_dir={jax_cache}"])
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert json.load(open(os.path.join(workdir, "eval.json")))["step"] == 6
  assert os.listdir(jax_cache)


def test_sigterm_saves_a_checkpoint_then_exits(cache_dir, tmp_path):
  workdir = str(tmp_path / "run")
  args = cli_flags(cache_dir, **{"train.steps": 100_000, "train.checkpoint_every": 100_000})
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), *args,
                           f"--workdir={workdir}"], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
    assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 143, stderr[-3000:]
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert len(saved) == 1 and saved[0] == read_jsonl(metrics)[-1]["step"]
  assert f"saved the checkpoint at step {saved[0]}" in stderr


def test_unknown_config_key_fails_with_its_name(cache_dir, tmp_path):
  result = run_main(cli_flags(cache_dir, **{"train.stpes": 3}) + [f"--workdir={tmp_path}"])
  assert result.returncode == 2
  assert "stpes" in result.stderr and 'Did you mean "steps"' in result.stderr
  assert "Traceback" not in result.stderr


def test_unknown_preset_and_missing_config_file_fail_with_the_fix(tmp_path):
  result = run_main(["--config=configs/transformer.py:huge", f"--workdir={tmp_path}"])
  assert result.returncode == 2 and "Unknown preset 'huge'" in result.stderr
  assert "configs/transformer.py:tiny" in result.stderr and "Traceback" not in result.stderr
  result = run_main(["--config=configs/nope.py:tiny", f"--workdir={tmp_path}"])
  assert result.returncode == 2 and "configs/nope.py" in result.stderr
  assert "Traceback" not in result.stderr


def test_missing_data_file_fails_with_the_fix(cache_dir, tmp_path):
  missing = tmp_path / "nope.txt"
  result = run_main(cli_flags(cache_dir, **{"data.path": str(missing)})
                    + [f"--workdir={tmp_path / 'run'}"])
  assert result.returncode == 2, result.stderr[-3000:]
  assert str(missing) in result.stderr and "--config.data.path" in result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "run")


def test_empty_corpus_fails_with_the_fix(cache_dir, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  result = run_main(cli_flags(cache_dir, **{"data.path": str(empty)})
                    + [f"--workdir={tmp_path / 'run'}"])
  assert result.returncode == 2, result.stderr[-3000:]
  assert "empty" in result.stderr.lower() and "Traceback" not in result.stderr


def test_workdir_of_another_model_is_refused_and_untouched(cache_dir, tmp_path):
  workdir = str(tmp_path / "run")
  assert run_main(cli_flags(cache_dir, **{"train.steps": 3})
                  + [f"--workdir={workdir}"]).returncode == 0
  # Every file but the lock, which names whichever process last held the workdir.
  files = lambda: {os.path.join(r, f): open(os.path.join(r, f), "rb").read()
                   for r, _, fs in os.walk(workdir) for f in fs if f != ".lock"}
  snapshot = files()
  result = run_main(cli_flags(cache_dir, **{"train.steps": 6, "model.n_layers": 3})
                    + [f"--workdir={workdir}"])
  assert result.returncode == 2, result.stderr[-3000:]
  assert "different model" in result.stderr and "n_layers" in result.stderr
  assert "--workdir" in result.stderr
  assert files() == snapshot
