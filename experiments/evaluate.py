"""Validation loss, perplexity and bits-per-byte; `--mode=eval` on the latest checkpoint.

With `config.compression.codec` set, `--mode=eval` evaluates the checkpoint's compressed
copy (experiments/compress.py) beside the dense checkpoint and reports the difference.

bits-per-byte = (mean next-token loss in nats) / ln 2 / (UTF-8 bytes per token of the
validation text), so it compares models across tokenizers. Results go to
`<workdir>/eval.json`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import checkpoint, compress, data, generate, mesh as mesh_lib, state as state_lib
from nested import fields, models
from nested.errors import UserError


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood in nats, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  """The mean of `values`, or their `weights`-weighted mean (0 where nothing is weighted)."""
  if weights is None:
    return values.mean()
  return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _sums(logits: jax.Array, batch: jax.Array, weights) -> tuple[jax.Array, ...]:
  """(weighted NLL sum, weight sum, weighted count of argmax hits) of `logits` for batch[:, 1:]."""
  targets = batch[:, 1:]
  nll = token_nll(logits, targets)
  w = jnp.ones(nll.shape, jnp.float32) if weights is None else weights(batch)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return (nll * w).sum(), w.sum(), (correct * w).sum()


@functools.lru_cache(maxsize=16)
def make_eval_step(apply, mesh: jax.sharding.Mesh, weights=None):
  """The jitted `(params, batch) -> (nll sum, count, correct)`, one per (apply, mesh,
  weights): evaluating every `eval.every` steps traces and compiles once per Experiment
  (`Experiment.apply` is cached). With `weights` (`Experiment.loss_weights`) only the
  weighted targets count; `correct` counts those the argmax predicts."""
  def eval_step(params, batch):
    return _sums(apply(params, batch[:, :-1]), batch, weights)
  return jax.jit(mesh_lib.with_rules(eval_step, mesh))


def make_streamed_eval_step(exp: state_lib.Experiment):
  """`make_eval_step`'s sums with the model reading each sequence as a stream: segments of
  its stream chunk (one token for Transformer++), the state carried between them
  (`generate.decoder`) and attention caches holding `train.seq_len` tokens. Up to the
  training length this is the model's ordinary forward; beyond it, attention becomes a
  sliding window of the training length and the memories keep learning in context. One
  jitted step per model, length and mesh: evaluating every `eval.every` steps compiles once."""
  return _streamed_eval_step(exp.graphdef, models.model_config(exp.config.model),
                             exp.config.train.seq_len, exp.mesh, exp.loss_weights)


@functools.lru_cache(maxsize=16)
def _streamed_eval_step(graphdef, hparams, seq_len: int, mesh: jax.sharding.Mesh, weights):
  dec = generate.model_decoder(graphdef, hparams, seq_len)

  def eval_step(params, batch):
    logits = generate.stream_logits(dec, params, batch[:, :-1], batch[:, -1])
    return _sums(logits, batch, weights)

  return jax.jit(mesh_lib.with_rules(eval_step, mesh))


def eval_lengths(exp: state_lib.Experiment) -> tuple[int, ...]:
  """`config.eval.lengths` as ints, each checked to be a whole number of stream chunks."""
  lengths = fields.ints(exp.config.eval.get("lengths"), field="config.eval.lengths",
                       example="128,256,512")
  chunk = models.stream_chunk(models.model_config(exp.config.model))
  for length in lengths:
    if length < 1 or length % chunk:
      raise UserError(f"config.eval.lengths holds {length}: each length must be a positive "
                      f"multiple of the model's chunk_size={chunk} (the model reads the "
                      f"sequence in chunks).")
  return lengths


def validation_batches(exp: state_lib.Experiment, seq_len: int | None = None):
  cfg = exp.config
  return data.eval_batches(exp.dataset, batch_size=cfg.eval.batch_size,
                           seq_len=seq_len or cfg.train.seq_len,
                           max_batches=cfg.eval.max_batches or None,
                           process_index=jax.process_index(), process_count=jax.process_count())


def _results(exp: state_lib.Experiment, params, eval_step, seq_len: int) -> dict[str, Any]:
  """Loss, perplexity, bits/byte (and a task's answer accuracy) of `eval_step` summed over the
  validation batches of `seq_len` tokens."""
  cfg = exp.config
  total, count, correct = 0.0, 0, 0.0
  for batch in validation_batches(exp, seq_len):
    nll_sum, n, right = eval_step(params, mesh_lib.put_batch(batch, exp.mesh))
    total, count, correct = total + float(nll_sum), count + int(n), correct + float(right)
  if count == 0:
    raise UserError(
        f"The validation split holds fewer than one batch of {cfg.eval.batch_size} sequences "
        f"of {seq_len + 1} tokens. Lower --config.eval.batch_size, --config.train.seq_len or "
        f"--config.eval.lengths, or raise --config.data.val_fraction.")
  loss = total / count
  bpt = exp.dataset.val_bytes_per_token
  results = {"loss": loss, "perplexity": math.exp(loss), "tokens": count,
             "bits_per_byte": loss / math.log(2) / bpt if bpt else None}
  if exp.loss_weights is not None:
    results["accuracy"] = correct / count      # of a synthetic task's answers
  return results


def evaluate(exp: state_lib.Experiment, params) -> dict[str, Any]:
  """Mean loss over `config.eval.max_batches` validation batches (0 = all of them); `params`
  may hold compressed leaves (decoded inside the jitted step). For each of
  `config.eval.lengths`, the same over sequences of that length read as a stream
  (`make_streamed_eval_step`), under keys suffixed with the length (`loss_512`, ...)."""
  results = _results(exp, params, make_eval_step(exp.apply, exp.mesh, exp.loss_weights),
                     exp.config.train.seq_len)
  lengths = eval_lengths(exp)
  streamed = make_streamed_eval_step(exp) if lengths else None
  for length in lengths:
    at = _results(exp, params, streamed, length)
    results.update({f"{key}_{length}": value for key, value in at.items()})
  return results


def log_results(results: dict[str, Any]) -> None:
  """One line for the training length and one per `config.eval.lengths` entry."""
  suffixes = [""] + sorted({k[len("loss_"):] for k in results if k.startswith("loss_")}, key=int)
  for suffix in suffixes:
    get = lambda key: results[key + (f"_{suffix}" if suffix else "")]
    where = f"at {suffix} tokens, streamed" if suffix else f"at step {results['step']}"
    if "accuracy" in results:
      logging.info("validation %s: answer loss %.4f | answer accuracy %.4f | %d answers",
                   where, get("loss"), get("accuracy"), get("tokens"))
      continue
    bpb = get("bits_per_byte")
    logging.info("validation %s: loss %.4f | perplexity %.3f | bits/byte %s | %d tokens",
                 where, get("loss"), get("perplexity"),
                 f"{bpb:.4f}" if bpb is not None else "n/a (no tokenizer)", get("tokens"))


def same_bits(a: jax.Array, b: jax.Array) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def compare_compressed(exp: state_lib.Experiment, workdir: str) -> dict[str, Any]:
  """The compressed copy of the latest checkpoint (config.compression) against the dense
  checkpoint: both validation losses, and whether the logits of the first validation batch
  are bitwise identical."""
  step, params = state_lib.restore_latest(exp, workdir)
  tree, where = compress.load(exp, workdir, step)
  dense, compressed = evaluate(exp, params), evaluate(exp, tree)
  first = mesh_lib.put_batch(next(iter(validation_batches(exp))), exp.mesh)[:, :-1]
  logits = jax.jit(mesh_lib.with_rules(exp.apply, exp.mesh))
  logits_dense, logits_compressed = logits(params, first), logits(tree, first)
  return {"step": step, "directory": where, "codec": exp.config.compression.codec,
          "dense": dense, "compressed": compressed,
          "delta_loss": compressed["loss"] - dense["loss"],
          "delta_perplexity": compressed["perplexity"] - dense["perplexity"],
          "logits_bitwise_identical": same_bits(logits_dense, logits_compressed),
          "logits_max_abs_diff": float(jnp.max(jnp.abs(logits_dense - logits_compressed)))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  exp = state_lib.build(config)
  if config.compression.codec:
    results = compare_compressed(exp, workdir)
    if jax.process_index() == 0:
      checkpoint.write_json_atomic(os.path.join(results["directory"], "eval.json"), results)
      log_results({"step": results["step"], **results["compressed"]})
      logging.info("%s compressed vs dense: loss %+.6f, perplexity %+.6f, logits of the first "
                   "batch bitwise identical: %s (max |diff| %.3g) → %s", results["codec"],
                   results["delta_loss"], results["delta_perplexity"],
                   results["logits_bitwise_identical"], results["logits_max_abs_diff"],
                   os.path.join(results["directory"], "eval.json"))
    return results
  step, params = state_lib.restore_latest(exp, workdir)
  results = {"step": step, **evaluate(exp, params)}
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(workdir, "eval.json"), results)
    log_results(results)
  return results
