"""MQAR (experiments/synthetic.py): the sequences Zoology defines, answer-only loss and accuracy."""

import numpy as np
import pytest

from conftest import micro_config
from experiments import evaluate, state as state_lib, synthetic, train
from nested.errors import UserError

TASK = synthetic.MQAR(vocab_size=64, num_pairs=6, query_fraction=0.5)


def parse(row, vocab_size, num_pairs):
  """Reads one sequence token by token: its pairs, and the positions whose target is an answer."""
  half = vocab_size // 2
  pairs = {}
  for i in range(num_pairs):
    key, value = int(row[2 * i]), int(row[2 * i + 1])
    assert 1 <= key < half and half <= value < vocab_size and key not in pairs
    pairs[key] = value
  answers, t = [], 2 * num_pairs
  while t < len(row):
    token = int(row[t])
    if token == 0:
      t += 1
      continue
    assert (t - 2 * num_pairs) % 2 == 0 and row[t + 1] == pairs[token], (t, row)
    answers.append(t)        # the target at input position t is the value row[t + 1]
    t += 2
  return answers


def test_sequences_are_pairs_then_queries_of_earlier_keys():
  batch = TASK.train_batch(seed=3, step=7, batch_size=16, seq_len=40, rows=slice(None))
  assert batch.shape == (16, 41) and batch.dtype == np.int32
  weights = np.asarray(TASK.loss_weights(batch))
  for row, w in zip(batch, weights):
    answers = parse(row, 64, 6)
    assert len(answers) == 3
    np.testing.assert_array_equal(np.flatnonzero(w), answers)


def test_revealed_answers_do_not_help_a_model_that_recalls_nothing():
  """Each answer is the next input token, so later queries see it. A model that knows the
  context's values but no key's value, guessing among the values not yet revealed, must not
  beat 1 / N (with distinct queried keys, as Zoology draws them, it would score H_N / N)."""
  task = synthetic.MQAR(vocab_size=64, num_pairs=4)
  batch = task.sequences(np.random.default_rng(1), 2000, 40)
  scores = []
  for row in batch:
    values, revealed = set(row[1:8:2].tolist()), set()
    for t in parse(row, 64, 4):
      left = values - revealed
      scores.append((row[t + 1] in left) / len(left))
      revealed.add(int(row[t + 1]))
  assert np.mean(scores) <= synthetic.no_recall_accuracy(task) + 0.01, np.mean(scores)
  keys = batch[:, 8::2][batch[:, 8::2] > 0].reshape(len(batch), -1)
  assert np.mean([len(set(k)) < len(k) for k in keys]) > 0.5      # keys asked twice are common


def test_batches_are_pure_in_seed_and_step_and_eval_is_shared_by_seeds():
  def draw(seed, step):
    return TASK.train_batch(seed=seed, step=step, batch_size=4, seq_len=32, rows=slice(None))
  np.testing.assert_array_equal(draw(1, 5), draw(1, 5))
  assert not np.array_equal(draw(1, 5), draw(1, 6))
  assert not np.array_equal(draw(1, 5), draw(2, 5))
  np.testing.assert_array_equal(TASK.eval_batch(0, batch_size=4, seq_len=32, rows=slice(2, 4)),
                                TASK.eval_batch(0, batch_size=4, seq_len=32, rows=slice(None))[2:])


@pytest.mark.parametrize("power_a", [0.01, 1.0])
def test_query_gaps_follow_zoologys_power_law(power_a):
  task = synthetic.MQAR(vocab_size=16, num_pairs=1, power_a=power_a)
  seq_len, rows = 22, 4000
  batch = task.sequences(np.random.default_rng(0), rows, seq_len)
  gaps = (np.argmax(batch[:, 2:] != 0, axis=1)) // 2
  space = (seq_len - 2) // 2
  p = np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
  p /= p.sum()
  seen = np.bincount(gaps, minlength=space) / rows
  tolerance = 4 * np.sqrt(p * (1 - p) / rows) + 1e-3      # 4 binomial standard deviations
  assert np.all(np.abs(seen - p) <= tolerance), (seen, p)


@pytest.mark.parametrize("fields,seq_len,message", [
    (dict(num_pairs=8), 20, r"needs config.train.seq_len >= 32 .* got 20"),
    (dict(num_pairs=40), 200, r"num_pairs=40 must be from 1 to vocab_size // 2 - 1 = 31"),
    (dict(query_fraction=0.0), 64, r"query_fraction=0.0 must be in \(0, 1\]")])
def test_bad_mqar_settings_name_the_field(fields, seq_len, message):
  task = synthetic.MQAR(**{"vocab_size": 64, "num_pairs": 4, **fields})
  with pytest.raises(UserError, match=message):
    task.check(seq_len)


def mqar_config(cache_dir, **overrides):
  return micro_config(cache_dir, **{"data.synthetic": "mqar", "data.mqar.vocab_size": 64,
                                    "data.mqar.num_pairs": 4, "model.vocab_size": 64,
                                    "data.mqar.eval_examples": 32, **overrides})


def test_loss_and_accuracy_count_only_the_answers(cache_dir):
  exp = state_lib.build(mqar_config(cache_dir))
  params = state_lib.init_state(exp).params
  batch = train.host_batch(exp, 0)
  logits = np.asarray(exp.apply(params, batch[:, :-1]), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  answers = [(r, t) for r, row in enumerate(batch) for t in parse(row, 64, 4)]
  want = -np.mean([logp[r, t, batch[r, t + 1]] for r, t in answers])
  loss = train.loss_fn(exp.apply, weights=exp.loss_weights)(params, batch)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  everything = float(train.loss_fn(exp.apply)(params, batch))
  assert abs(everything - want) > 1e-3          # the weights are what makes it answer-only

  results = evaluate.evaluate(exp, params)
  batches = list(evaluate.validation_batches(exp))
  assert len(batches) == 2             # MICRO's eval.max_batches, of the 32 // 8 there are
  assert results["tokens"] == sum(len(parse(row, 64, 4)) for b in batches for row in b) == 64
  predicted = [np.argmax(np.asarray(exp.apply(params, b[:, :-1])), -1) for b in batches]
  right = [p[r, t] == b[r, t + 1] for p, b in zip(predicted, batches)
           for r, row in enumerate(b) for t in parse(row, 64, 4)]
  np.testing.assert_allclose(results["accuracy"], np.mean(right))


def bigram_accuracy(exp, train_steps):
  """Answer accuracy of the best model that reads no context: each key's most frequent value
  over the training batches (a value is drawn afresh for every sequence, so ~1/32)."""
  counts = np.zeros((64, 64))
  for s in range(train_steps):
    for row in train.host_batch(exp, s):
      for t in parse(row, 64, 4):
        counts[row[t], row[t + 1]] += 1
  right = [np.argmax(counts[row[t]]) == row[t + 1]
           for b in evaluate.validation_batches(exp) for row in b for t in parse(row, 64, 4)]
  return float(np.mean(right))


def test_attention_learns_mqar_beyond_a_context_free_bigram(cache_dir):
  config = mqar_config(cache_dir, **{"train.steps": 250, "train.lr": 3e-3,
                                     "train.warmup_steps": 20, "eval.max_batches": 4,
                                     "data.mqar.eval_examples": 64})
  exp = state_lib.build(config)
  step, state = train.jit_train_step(exp), state_lib.init_state(exp)
  for s in range(config.train.steps):
    state, _ = step(state, train.host_batch(exp, s), frozenset())
  accuracy = evaluate.evaluate(exp, state.params)["accuracy"]
  baseline = bigram_accuracy(exp, config.train.steps)
  assert baseline < 2 * synthetic.chance_accuracy(exp.dataset.task)
  assert accuracy > 3 * max(baseline, synthetic.chance_accuracy(exp.dataset.task)), (accuracy,
                                                                                     baseline)
