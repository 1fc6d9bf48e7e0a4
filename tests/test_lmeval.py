"""The lm-evaluation-harness adapter (experiments/lmeval.py) on synthetic requests, against the
harness's own windowing and this project's scorer and decoder."""

import glob
import json
import math
import subprocess
import sys

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from conftest import REPO, micro_config  # noqa: E402
from experiments import lmeval, state as state_lib, train, zeroshot  # noqa: E402
from nested.errors import UserError  # noqa: E402

PAIRS = [("To be, or not", " to be"), ("ROMEO: ", "Good morrow"), ("", "Enter the king"),
         ("Is this a dagger", " which I see before me")]


@pytest.fixture(scope="module")
def model(cache_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("lmeval"))
  train.train(state_lib.build(micro_config(cache_dir)), workdir)
  lm = lmeval.NestedLM(workdir=workdir, batch_size=4, max_gen_toks=12)
  lm.workdir = workdir
  return lm


def requests(kind, args):
  return [Instance(kind, doc={}, arguments=a, idx=0) for a in args]


def test_loglikelihoods_equal_the_zero_shot_scorer(model):
  got = model.loglikelihood(requests("loglikelihood", PAIRS))
  tokenizer, prefix = model._tokenizer, zeroshot.prefix_token(model._tokenizer)
  ll, greedy = model._score([zeroshot.encode_pair(tokenizer, prefix, c, x) for c, x in PAIRS])
  assert got == [(float(a), bool(b)) for a, b in zip(ll, greedy)]
  assert all(a < 0 for a, _ in got)


def test_rolling_loglikelihood_sums_the_harness_windows(model):
  text = "Now is the winter of our discontent made glorious summer by this sun of York. " * 2
  tokens = model.tok_encode(text)
  assert len(tokens) > model._seq_len   # more than one window
  windows = [make_disjoint_window(w) for w in
             get_rolling_token_windows(tokens, model.eot_token_id, model._seq_len, 1)]
  want = sum(ll for ll, _ in model._loglikelihood_tokens([(None, c, x) for c, x in windows]))
  (got,) = model.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
  assert got == pytest.approx(want, rel=1e-9)


def test_generate_until_is_greedy_and_stops_at_the_stop_string(model):
  context = "KING:"
  (free,) = model.generate_until(requests("generate_until", [(context, {"until": []})]))
  assert len(model.tok_encode(free)) == 12
  # Greedy by full forward passes over the text so far (padded on the right to one length,
  # which causality leaves out of the logits read, so the pass compiles once).
  text = model.tok_encode(context)
  apply = jax.jit(model._exp.apply)
  for _ in range(12):
    window = np.zeros((1, 32), np.int32)
    window[0, :len(text)] = text
    text.append(int(np.argmax(np.asarray(apply(model._params, window))[0, len(text) - 1])))
  assert free == model.tok_decode(text[len(model.tok_encode(context)):])
  stop = free[3:5]
  (cut,) = model.generate_until(requests("generate_until", [(context, {"until": [stop]})]))
  assert cut == free[:free.index(stop)]


def test_a_workdir_without_a_run_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="holds no config.json"):
    lmeval.NestedLM(workdir=str(tmp_path))
  with pytest.raises(UserError, match="model_args workdir="):
    lmeval.NestedLM()


LOCAL_TASK = """task: local_pairs
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


def test_the_harness_command_line_runs_a_task_on_the_model(model, tmp_path):
  """`python -m experiments.lmeval` registers "nested" and runs the harness's own CLI on a
  task read from local files (the harness's tasks download their data)."""
  pairs = [p for p in PAIRS if p[0]]
  rows = tmp_path / "rows.jsonl"
  rows.write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in pairs))
  (tmp_path / "local_pairs.yaml").write_text(LOCAL_TASK.format(rows=rows))
  done = subprocess.run(
      [sys.executable, "-m", "experiments.lmeval", "--model", "nested", "--model_args",
       f"workdir={model.workdir}", "--tasks", "local_pairs", "--include_path", str(tmp_path),
       "--batch_size", "4", "--output_path", str(tmp_path / "out")],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  (path,) = glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)
  got = json.load(open(path))["results"]["local_pairs"]["perplexity,none"]
  ll = [a for a, _ in model.loglikelihood(requests("loglikelihood", pairs))]
  assert math.log(got) == pytest.approx(-np.mean(ll), abs=1e-5)   # perplexity = exp(-mean ll)
