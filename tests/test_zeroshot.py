"""experiments.zeroshot: the scorer against hand-computed log-likelihoods of a bigram "model",
truncation, batching and padding invariance on real models, and --mode=zeroshot end to end."""

import json
import math
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from conftest import cli_flags, micro_config, run_main
from experiments import data, mesh as mesh_lib, state as state_lib, tasks, train, zeroshot

TESTS = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(TESTS, "data", "zeroshot")
BYTES = data.ByteTokenizer()
NEWLINE = ord("\n")  # the byte tokenizer's prefix token: the last byte of its "\n\n" separator


def bigram_apply(params, tokens):
  """A fixed "model" whose logits at each position are a table row picked by the token."""
  return params["table"][tokens]


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_ll(table, tokens, n_scored):
  """Numpy: summed log p(token_i | token_{i-1}) over the last n_scored tokens."""
  logp = log_softmax(np.asarray(table, np.float64))
  return sum(logp[tokens[i - 1], tokens[i]] for i in range(len(tokens) - n_scored, len(tokens)))


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def scorer(apply, params, mesh, *, max_len=64, batch_size=4, min_bucket=16):
  return zeroshot.Scorer(zeroshot.make_score_fn(apply, mesh), params, max_len, batch_size,
                         min_bucket, mesh)


def random_table(seed=0, scale=3.0):
  return np.random.default_rng(seed).normal(size=(256, 256)).astype(np.float32) * scale


def test_uniform_model_by_hand(mesh):
  # With equal logits every byte costs ln 256, so ll = -(1 + len(choice)) ln 256 (the "+ 1" is
  # the delimiter " "): acc prefers the shortest choice, acc_norm the longest, since
  # ll / len = -(1 + 1/len) ln 256.
  row = {"context": "Question: pick\nAnswer:", "choices": ["abc", "a", "abcdefgh"], "label": 2}
  score = scorer(bigram_apply, {"table": np.zeros((256, 256), np.float32)}, mesh)
  ll, greedy = score(zeroshot.choice_requests(BYTES, NEWLINE, row))
  np.testing.assert_allclose(ll, [-4 * math.log(256), -2 * math.log(256), -9 * math.log(256)],
                             rtol=1e-6)
  assert zeroshot.choice_metrics([ll], [row]) == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}


def test_acc_norm_divides_by_characters_and_acc_bytes_by_utf8_bytes(mesh):
  # "ééé" is 3 characters and 6 bytes: under equal logits ll = -7 ln 256 against -5 ln 256 for
  # "abcd", so -7/3 < -5/4 (acc_norm picks "abcd") but -7/6 > -5/4 (acc_bytes picks "ééé").
  row = {"context": "Pick:", "choices": ["ééé", "abcd"], "label": 0}
  score = scorer(bigram_apply, {"table": np.zeros((256, 256), np.float32)}, mesh)
  ll, _ = score(zeroshot.choice_requests(BYTES, NEWLINE, row))
  np.testing.assert_allclose(ll, [-7 * math.log(256), -5 * math.log(256)], rtol=1e-6)
  assert zeroshot.choice_metrics([ll], [row]) == {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 1.0}


def test_choice_scores_match_numpy_on_real_piqa_and_winogrande_rows(mesh):
  table = random_table()
  # A window longer than every request: truncation has its own test.
  score = scorer(bigram_apply, {"table": table}, mesh, max_len=512, batch_size=4, min_bucket=64)
  for name, filename in (("piqa", "piqa.jsonl"), ("winogrande", "winogrande.jsonl"),
                         ("arc_easy", "arc_easy.jsonl")):
    rows = list(tasks.convert_rows(name, os.path.join(DATA, filename)))
    expected, lens = [], []
    for row in rows:
      lls = []
      for choice in row["choices"]:
        if "continuation" in row:  # WinoGrande: the choice ends the context
          ctx, cont = choice, " " + row["continuation"]
        else:
          ctx, cont = row["context"], " " + choice
        tokens = list((ctx + cont).encode())
        lls.append(reference_ll(table, tokens, len(cont.encode())))
      expected.append(np.asarray(lls))
      lens.append(np.asarray([[len(c), len(c.encode())] for c in row["choices"]], np.float64))
    labels = np.asarray([r["label"] for r in rows])
    want = {"acc": np.mean([np.argmax(e) for e in expected] == labels),
            "acc_norm": np.mean([np.argmax(e / n[:, 0]) for e, n in zip(expected, lens)] == labels),
            "acc_bytes": np.mean([np.argmax(e / n[:, 1]) for e, n in zip(expected, lens)] == labels)}
    got = zeroshot.evaluate_task(name, rows, score, BYTES, 512)
    for metric, value in got.items():
      assert value == pytest.approx(want[metric]), (name, metric)
    requests = [r for row in rows for r in zeroshot.choice_requests(BYTES, NEWLINE, row)]
    np.testing.assert_allclose(score(requests)[0], np.concatenate(expected), rtol=1e-5)


def test_lambada_greedy_match_and_perplexity_by_hand(mesh):
  rows = list(tasks.convert_rows("lambada_openai", os.path.join(DATA, "lambada_openai.jsonl")))
  table = random_table(1)
  # Make every transition of "t signs" (the passage ends "...care about signs") the row's
  # argmax, so the first passage is matched greedily; in the second ("... with bob") the
  # transition "o" → "b" is made the least likely, so it is not.
  for prev, nxt in zip("t sign", " signs"):
    table[ord(prev), ord(nxt)] = 50.0
  table[ord("o"), ord("b")] = -50.0
  score = scorer(bigram_apply, {"table": table}, mesh, max_len=32)
  ll = [reference_ll(table, list((r["context"] + " " + r["target"]).encode()),
                     1 + len(r["target"])) for r in rows]
  got = zeroshot.evaluate_task("lambada_openai", rows, score, BYTES, 32)
  assert got["acc"] == 0.5
  assert got["perplexity"] == pytest.approx(math.exp(-np.mean(ll)), rel=1e-5)


def test_wikitext_rolling_windows_cover_every_token_once(mesh):
  rows = list(tasks.convert_rows("wikitext", os.path.join(DATA, "wiki.raw")))
  table = random_table(2, scale=1.0)
  # A bigram's loss does not depend on the window, so the rolling total must equal the
  # per-token sum over each detokenized document preceded by the prefix token.
  nll = 0.0
  for row in rows:
    tokens = [NEWLINE] + list(tasks.wikitext_detokenize(row["page"]).encode())
    nll -= reference_ll(table, tokens, len(tokens) - 1)
  words = sum(len(re.split(r"\s+", r["page"])) for r in rows)
  n_bytes = sum(len(r["page"].encode()) for r in rows)
  for max_len in (48, 512):  # many windows (the last one extended backwards), and few
    score = scorer(bigram_apply, {"table": table}, mesh, max_len=max_len, batch_size=8)
    got = zeroshot.evaluate_task("wikitext", rows, score, BYTES, max_len)
    assert got["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert got["byte_perplexity"] == pytest.approx(math.exp(nll / n_bytes), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)


def test_rolling_windows_follow_the_harness():
  windows = zeroshot.rolling_requests(np.arange(10), prefix=-1, max_len=4)
  assert [(w.context.tolist(), w.continuation.tolist()) for w in windows] == [
      ([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
  assert zeroshot.rolling_requests(np.arange(0), prefix=-1, max_len=4) == []


def test_encode_pair_moves_trailing_spaces_and_prefixes_empty_contexts():
  req = zeroshot.encode_pair(BYTES, NEWLINE, "Answer: ", "yes")
  assert bytes(req.context.tolist()) == b"Answer:" and bytes(req.continuation.tolist()) == b" yes"
  req = zeroshot.encode_pair(BYTES, NEWLINE, "", " yes")
  assert req.context.tolist() == [NEWLINE] and bytes(req.continuation.tolist()) == b" yes"
  assert zeroshot.bucket_lengths(128, 16) == [16, 32, 64, 128]
  assert zeroshot.bucket_lengths(100, 64) == [64, 100] and zeroshot.bucket_lengths(32, 64) == [32]


def test_truncation_keeps_the_last_max_len_plus_one_tokens(mesh):
  table = random_table(3)
  score = scorer(bigram_apply, {"table": table}, mesh, max_len=16, batch_size=2, min_bucket=8)
  context, cont = "x" * 5 + "the long context that no longer fits", " continuation!!"
  tokens = list((context + cont).encode())
  ll, _ = score([zeroshot.encode_pair(BYTES, NEWLINE, context, cont)])
  # 15 continuation tokens and one context token fill the 16 inputs.
  np.testing.assert_allclose(ll, [reference_ll(table, tokens[-17:], 15)], rtol=1e-6)
  long_cont = " " + "y" * 40  # longer than the window: only its last 16 tokens are scored
  ll, _ = score([zeroshot.encode_pair(BYTES, NEWLINE, "ctx", long_cont)])
  np.testing.assert_allclose(ll, [reference_ll(table, list(long_cont.encode())[-17:], 16)],
                             rtol=1e-6)


def short_requests():
  """Requests cut from real rows (the last 8 bytes of each context, the first 7 of each
  continuation), so each scorer below compiles a single shape."""
  rows = list(tasks.convert_rows("siqa", os.path.join(DATA, "siqa.jsonl")))
  rows += list(tasks.convert_rows("winogrande", os.path.join(DATA, "winogrande.jsonl")))
  pairs = [(row["context"] + c, " " + row["continuation"]) if "continuation" in row
           else (row["context"], " " + c) for row in rows for c in row["choices"]]
  return [zeroshot.encode_pair(BYTES, NEWLINE, ctx[-8:], cont[:7]) for ctx, cont in pairs]


@pytest.mark.parametrize("model", ["transformer", "titans", "hope"])
def test_batching_and_padding_do_not_change_scores(cache_dir, mesh, model):
  # One layer keeps HOPE's compile short; random weights (not the model's init, which takes
  # seconds to build) are as good for comparing two ways of computing the same function.
  exp = state_lib.build(micro_config(cache_dir, model=model, **{"model.n_layers": 1}))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype),
                        exp.abstract_params)
  requests = short_requests()
  max_len = exp.config.train.seq_len
  assert max_len == 32 and max(r.context.size + r.continuation.size for r in requests) <= 17
  # One request per call in the full-length shape [1, 32], against four per call right-padded
  # to [4, 16] (with padding rows in the last call).
  one_at_a_time = scorer(exp.apply, params, mesh, max_len=max_len, batch_size=1,
                         min_bucket=max_len)
  batched_and_bucketed = scorer(exp.apply, params, mesh, max_len=max_len, batch_size=4,
                                min_bucket=16)
  ll_a, greedy_a = one_at_a_time(requests)
  ll_b, greedy_b = batched_and_bucketed(requests)
  np.testing.assert_allclose(ll_a, ll_b, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(greedy_a, greedy_b)
  assert len(requests) % 4 and np.all(np.isfinite(ll_a)) and np.all(ll_a < 0)


_SHARDED = """
import sys
sys.path.insert(0, {tests!r})
import ml_collections, numpy as np
import test_zeroshot as t
from experiments import mesh as mesh_lib, zeroshot
mesh = mesh_lib.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1)))
score = t.scorer(t.bigram_apply, {{"table": t.random_table()}}, mesh, max_len=64, batch_size=8)
ll, greedy = score(t.piqa_requests())
np.save({out!r}, ll)
"""


def piqa_requests():
  rows = list(tasks.convert_rows("piqa", os.path.join(DATA, "piqa.jsonl")))
  return [r for row in rows for r in zeroshot.choice_requests(BYTES, NEWLINE, row)]


def test_batches_sharded_over_eight_devices_score_the_same(mesh, tmp_path):
  out = str(tmp_path / "ll.npy")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _SHARDED.format(tests=TESTS, out=out)],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  one_device = scorer(bigram_apply, {"table": random_table()}, mesh, max_len=64, batch_size=8)
  np.testing.assert_allclose(np.load(out), one_device(piqa_requests())[0], rtol=1e-6)


def test_zeroshot_mode_end_to_end(cache_dir, tmp_path):
  workdir, data_dir = str(tmp_path / "run"), str(tmp_path / "zeroshot")
  for name, src in (("piqa", "piqa.jsonl"), ("lambada_openai", "lambada_openai.jsonl"),
                    ("wikitext", "wiki.raw"), ("winogrande", "winogrande.jsonl")):
    tasks.convert(name, os.path.join(DATA, src), os.path.join(data_dir, f"{name}.jsonl"))
  overrides = {"train.steps": 3, "zeroshot.data_dir": data_dir, "zeroshot.batch_size": 8,
               "zeroshot.min_bucket": 16}
  train.train(state_lib.build(micro_config(cache_dir, **overrides)), workdir)
  selected = {"zeroshot.tasks": "piqa,lambada_openai,wikitext,hellaswag", "zeroshot.limit": 3}
  results = zeroshot.run(micro_config(cache_dir, **overrides, **selected), workdir)
  saved = json.load(open(os.path.join(workdir, "zeroshot.json")))
  assert saved == json.loads(json.dumps(results))
  assert saved["step"] == 3 and sorted(saved["tasks"]) == ["hellaswag", "lambada_openai", "piqa",
                                                           "wikitext"]
  piqa = saved["tasks"]["piqa"]
  assert piqa["n"] == 3 and 0 <= piqa["acc"] <= 1 and 0 <= piqa["acc_norm"] <= 1
  assert piqa["table_metric"] == "acc"
  assert saved["tasks"]["lambada_openai"]["perplexity"] > 1
  assert saved["tasks"]["wikitext"]["n"] == 2 and saved["tasks"]["wikitext"]["word_perplexity"] > 1
  skipped = saved["tasks"]["hellaswag"]["skipped"]
  assert "Rowan/hellaswag" in skipped and "python -m experiments.tasks convert hellaswag" in skipped

  # The same through main.py, as a user runs it: a missing file is a warning, not a failure.
  cli = run_main(cli_flags(cache_dir, **overrides, **{"zeroshot.tasks": "winogrande,boolq"})
                 + [f"--workdir={workdir}", "--mode=zeroshot"])
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert f"skipped boolq: {data_dir}/boolq.jsonl does not exist" in cli.stderr
  assert "zero-shot winogrande" in cli.stderr
  saved = json.load(open(os.path.join(workdir, "zeroshot.json")))
  assert saved["tasks"]["winogrande"]["n"] == 3 and "skipped" in saved["tasks"]["boolq"]
