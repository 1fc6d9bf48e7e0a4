"""Evaluation beyond the training length (`config.eval.lengths`): the model reads each sequence
as a stream, attention over a sliding window of `train.seq_len`, memories carried on."""

import jax
import numpy as np
import pytest

from conftest import micro_config
from experiments import evaluate, generate, state as state_lib
from nested.errors import UserError


def sharp(params, factor=6.0):
  """Scaled weights: attention at init is nearly uniform, so a window would hardly show."""
  return jax.tree.map(lambda x: x * factor, params)


def streamed(exp, params, batch):
  dec = generate.decoder(exp, exp.config.train.seq_len)
  return np.asarray(jax.jit(lambda p, b: generate.stream_logits(dec, p, b[:, :-1], b[:, -1]))(
      params, batch))


def test_transformer_beyond_its_length_attends_to_a_window_of_the_last_seq_len_tokens(
    cache_dir):
  # One block: with more, a window's outputs read earlier windows (receptive field grows).
  exp = state_lib.build(micro_config(cache_dir, **{"train.seq_len": 8, "model.n_layers": 1}))
  params = sharp(state_lib.init_state(exp).params)
  batch = next(iter(evaluate.validation_batches(exp, 24)))[:2]
  got = streamed(exp, params, batch)
  # Reference: the last logits of one ordinary forward over the 8 tokens ending at t.
  window = np.stack([np.asarray(exp.apply(params, batch[:, max(0, t - 7):t + 1]))[:, -1]
                     for t in range(24)], axis=1)
  np.testing.assert_allclose(got, window, atol=2e-4)
  everything = np.asarray(exp.apply(params, batch[:, :-1]))
  np.testing.assert_allclose(got[:, :8], everything[:, :8], atol=2e-4)
  assert np.abs(got[:, 8:] - everything[:, 8:]).max() > 1e-2     # the window is what differs


@pytest.mark.parametrize("model,times", [("titans", 2), ("hope", 2), ("hope_attention", 1)])
def test_recurrent_models_streamed_equal_one_pass(cache_dir, model, times):
  """Titans and HOPE carry their state across segments exactly (HOPE-Attention too while its
  attention cache holds the sequence), so the stream is their ordinary forward."""
  # A large in-context step, so that the state each segment hands on shows in the logits.
  fast = {"model.cms_lr": 1.0} if model.startswith("hope") else {}
  exp = state_lib.build(micro_config(cache_dir, model=model, **fast))
  params = state_lib.init_state(exp).params
  length = times * exp.config.train.seq_len
  batch = next(iter(evaluate.validation_batches(exp, length)))[:2]
  np.testing.assert_allclose(streamed(exp, params, batch),
                             np.asarray(exp.apply(params, batch[:, :-1])), atol=2e-4)


def test_eval_lengths_report_each_length_and_the_training_length_matches(cache_dir):
  config = micro_config(cache_dir, **{
      "data.synthetic": "mqar", "data.mqar.vocab_size": 64, "data.mqar.num_pairs": 4,
      "model.vocab_size": 64, "data.mqar.eval_examples": 16, "eval.lengths": "32,64"})
  exp = state_lib.build(config)
  results = evaluate.evaluate(exp, sharp(state_lib.init_state(exp).params, 3.0))
  assert {"accuracy_32", "accuracy_64", "loss_64", "tokens_64"} <= set(results)
  np.testing.assert_allclose(results["loss_32"], results["loss"], rtol=1e-5)
  assert results["tokens_32"] == results["tokens"] == 2 * 8 * 4     # 2 batches of 8, 4 asked
  assert results["loss_64"] != results["loss"]


def test_evaluating_again_reuses_the_compiled_streamed_steps(cache_dir, monkeypatch):
  """Training evaluates every `eval.every` steps: each length's streamed step is traced once."""
  config = micro_config(cache_dir, model="titans", **{"eval.lengths": "32,64",
                                                      "eval.max_batches": 1})
  traced = []
  stream_logits = generate.stream_logits
  monkeypatch.setattr(generate, "stream_logits",
                      lambda dec, p, tokens, after: traced.append(tokens.shape) or
                      stream_logits(dec, p, tokens, after))
  evaluate._streamed_eval_step.cache_clear()
  exp = state_lib.build(config)
  params = state_lib.init_state(exp).params
  first = evaluate.evaluate(exp, params)
  again = evaluate.evaluate(exp, params)
  assert [shape[1] for shape in traced] == [32, 64]
  assert first == again


@pytest.mark.parametrize("lengths,message", [
    ("12", r"holds 12: each length must be a positive multiple of the model's chunk_size=8"),
    ("64,x", r"config.eval.lengths='64,x' must be comma-separated whole numbers")])
def test_bad_eval_lengths_name_the_field(cache_dir, lengths, message):
  exp = state_lib.build(micro_config(cache_dir, model="titans", **{"eval.lengths": lengths}))
  with pytest.raises(UserError, match=message):
    evaluate.eval_lengths(exp)
