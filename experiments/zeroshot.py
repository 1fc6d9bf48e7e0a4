"""Zero-shot evaluation as lm-evaluation-harness scores it; `--mode=zeroshot`.

Every task reduces to log-likelihood requests (context, continuation): the summed log-probability
of the continuation's tokens given the context, and whether greedy decoding would have produced
them. Scoring follows the harness's `HFLM`:

  * tokens: context and continuation are encoded together and split where the context's own
    encoding ends (trailing spaces of the context move into the continuation); an empty context
    is replaced by one prefix token (the tokenizer's EOS, else the last token of its document
    separator: "\\n" for bytes, what the model saw between training documents).
  * truncation: context + continuation keeps its last `train.seq_len + 1` tokens; the model sees
    all but the last, and scores the continuation's tokens inside that window.
  * multiple choice: acc = argmax of the summed log-likelihoods; acc_norm = argmax of
    log-likelihood / characters of the choice, acc_bytes = argmax of log-likelihood / its UTF-8
    bytes (the harness's names and lengths: the choice string, without the delimiter; SPEC §4's
    byte length is acc_bytes, the same number for ASCII text).
  * LAMBADA: acc = greedy match of every token of " " + last word; perplexity =
    exp(−mean over passages of its log-likelihood).
  * WikiText: each detokenized document is cut into rolling windows of `seq_len` predicted
    tokens (the harness's `get_rolling_token_windows` with context_len=1: consecutive windows,
    the last one extended backwards to a full window); word perplexity = exp(total NLL / words of
    the raw documents), byte perplexity and bits per byte likewise per UTF-8 byte.

Batching: requests are sorted by length, padded on the right to the smallest of a few bucket
lengths (`zeroshot.min_bucket` doubling up to `seq_len`) and scored `zeroshot.batch_size` at a
time by one jitted function per bucket shape; padded positions are masked out. Right padding
cannot change a causal model's outputs at earlier positions, and every model (Titans and HOPE
included: their in-context state is carried inside the forward pass) is used only through
`exp.apply`, so results do not depend on batching or padding.

Results go to `<workdir>/zeroshot.json`: per task its metrics, the number of rows, the metric
SPEC §4's table uses, or the reason it was skipped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import checkpoint, evaluate, mesh as mesh_lib, state as state_lib, tasks
from nested.errors import UserError

# lm-evaluation-harness's HFLM scores rolling windows with context_len=1: windows do not
# overlap except to keep the last one full.
ROLLING_CONTEXT = 1


@dataclasses.dataclass(frozen=True)
class Request:
  context: np.ndarray       # int32 token ids, at least one
  continuation: np.ndarray  # int32 token ids to score, at least one


# ----------------------------------------------------------------------------- tokens


def prefix_token(tokenizer) -> int:
  """What stands for an empty context and precedes a document's first window."""
  eos = getattr(tokenizer, "eos_id", -1)
  if eos is not None and eos >= 0:
    return int(eos)
  return int(tokenizer.doc_separator()[1][-1])


def encode_pair(tokenizer, prefix: int, context: str, continuation: str) -> Request:
  """The harness's `_encode_pair`: a tokenizer may merge the boundary differently when the
  strings are encoded apart, so the pair is encoded whole and split at the context's length."""
  if not context:
    return Request(np.asarray([prefix], np.int32), np.asarray(tokenizer.encode(continuation),
                                                              np.int32))
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  whole = np.asarray(tokenizer.encode(context + continuation), np.int32)
  ctx = np.asarray(tokenizer.encode(context), np.int32)
  if not ctx.size:  # a context of spaces only
    ctx = np.asarray([prefix], np.int32)
    return Request(ctx, whole)
  return Request(ctx, whole[ctx.size:])


def rolling_requests(tokens: np.ndarray, prefix: int, max_len: int,
                     context_len: int = ROLLING_CONTEXT) -> list[Request]:
  """`get_rolling_token_windows` + `make_disjoint_window` of lm-evaluation-harness: every token
  is predicted exactly once, each from at most `max_len` tokens of context."""
  n = len(tokens)
  if n == 0:
    return []
  pred_len = max_len - context_len + 1
  first = min(max_len, n)
  out = [Request(np.asarray([prefix], np.int32), tokens[:first].astype(np.int32))]
  predicted = first
  while predicted < n:
    length = min(n - predicted, pred_len)
    end = predicted + length
    # The window's inputs are tokens[end - max_len - 1: end - 1]; the part before the
    # predicted tokens is context (disjoint from them).
    out.append(Request(tokens[end - max_len - 1:end - length].astype(np.int32),
                       tokens[end - length:end].astype(np.int32)))
    predicted = end
  return out


def window(request: Request, max_len: int) -> tuple[np.ndarray, np.ndarray, int]:
  """(inputs, targets, n): the last max_len + 1 tokens of context + continuation, shifted; the
  last `n` targets are the continuation's tokens that fit."""
  full = np.concatenate([request.context, request.continuation])[-(max_len + 1):]
  return full[:-1], full[1:], min(request.continuation.size, full.size - 1)


def bucket_lengths(max_len: int, min_bucket: int) -> list[int]:
  """Padded lengths: min_bucket, 2·min_bucket, ... below max_len, then max_len."""
  lengths, b = [], max(1, min(min_bucket, max_len))
  while b < max_len:
    lengths.append(b)
    b *= 2
  return lengths + [max_len]


# ----------------------------------------------------------------------------- scoring


def make_score_fn(apply: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """(params, inputs, targets, mask) → (summed log-likelihood [B], all-greedy [B]), jitted; jit
  compiles once per (batch, bucket) shape. Outputs are replicated so every host can read them."""
  def score(params, inputs, targets, mask):
    logits = apply(params, inputs).astype(jnp.float32)
    ll = -(evaluate.token_nll(logits, targets) * mask).sum(-1)
    greedy = jnp.all((jnp.argmax(logits, -1) == targets) | (mask == 0), axis=-1)
    return ll, greedy
  return jax.jit(mesh_lib.with_rules(score, mesh), out_shardings=mesh_lib.replicated(mesh))


@dataclasses.dataclass(frozen=True)
class Scorer:
  """Scores requests with fixed shapes: `batch_size` rows padded to a bucket length."""
  score_fn: Callable
  params: Any
  max_len: int
  batch_size: int
  min_bucket: int
  mesh: jax.sharding.Mesh

  def __call__(self, requests: Sequence[Request]) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood float64 [N], greedy bool [N]) in the order of `requests`."""
    windows = [window(r, self.max_len) for r in requests]
    buckets = bucket_lengths(self.max_len, self.min_bucket)
    ll = np.zeros(len(requests), np.float64)
    greedy = np.zeros(len(requests), bool)
    # Longest first, as the harness does, so running out of memory shows in the first call.
    order = sorted(range(len(windows)), key=lambda i: -windows[i][0].size)
    for length, idx in _batches(order, windows, buckets, self.batch_size):
      inputs, targets, mask = _pack([windows[i] for i in idx], self.batch_size, length)
      out_ll, out_greedy = self.score_fn(self.params, *(self._put(a) for a in
                                                        (inputs, targets, mask)))
      ll[idx] = np.asarray(out_ll)[:len(idx)]
      greedy[idx] = np.asarray(out_greedy)[:len(idx)]
    return ll, greedy

  def _put(self, batch: np.ndarray) -> jax.Array:
    rows = self.batch_size // jax.process_count()
    start = jax.process_index() * rows
    return mesh_lib.put_batch(batch[start:start + rows], self.mesh)


def _batches(order: Sequence[int], windows, buckets: Sequence[int],
             batch_size: int) -> Iterator[tuple[int, list[int]]]:
  """(bucket length, request indices) groups of at most batch_size, one bucket each."""
  by_bucket: dict[int, list[int]] = {}
  for i in order:
    length = next(b for b in buckets if b >= windows[i][0].size)
    by_bucket.setdefault(length, []).append(i)
  for length in sorted(by_bucket, reverse=True):
    idx = by_bucket[length]
    for start in range(0, len(idx), batch_size):
      yield length, idx[start:start + batch_size]


def _pack(windows, batch_size: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-padded int32 inputs/targets and a float32 mask of the scored targets; rows past
  len(windows) are all padding (mask 0) so every call has the same shape."""
  inputs = np.zeros((batch_size, length), np.int32)
  targets = np.zeros((batch_size, length), np.int32)
  mask = np.zeros((batch_size, length), np.float32)
  for row, (x, y, n) in enumerate(windows):
    inputs[row, :x.size] = x
    targets[row, :y.size] = y
    mask[row, y.size - n:y.size] = 1.0
  return inputs, targets, mask


# ----------------------------------------------------------------------------- tasks


def choice_requests(tokenizer, prefix: int, row: dict) -> list[Request]:
  """One request per choice; target delimiter " " as in the harness's task configs."""
  if "continuation" in row:  # WinoGrande: the choice completes the context
    pairs = [(row["context"] + c, " " + row["continuation"]) for c in row["choices"]]
  else:
    pairs = [(row["context"], " " + c) for c in row["choices"]]
  return [encode_pair(tokenizer, prefix, ctx, cont) for ctx, cont in pairs]


def choice_metrics(lls: Sequence[np.ndarray], rows: Sequence[dict]) -> dict[str, float]:
  """acc, acc_norm (argmax of ll / characters of the choice) and acc_bytes (/ its UTF-8 bytes);
  ties go to the first choice, as with np.argmax in the harness."""

  def accuracy(length: Callable[[str], int] | None) -> float:
    norm = (lambda r: 1.0) if length is None else (
        lambda r: np.asarray([length(c) for c in r["choices"]], np.float64))
    return float(np.mean([int(np.argmax(ll / norm(r))) == r["label"] for ll, r in zip(lls, rows)]))

  return {"acc": accuracy(None), "acc_norm": accuracy(len),
          "acc_bytes": accuracy(lambda c: len(c.encode("utf-8")))}


def eval_choice(score: Callable, tokenizer, prefix: int, rows: Sequence[dict]) -> dict[str, float]:
  per_row = [choice_requests(tokenizer, prefix, r) for r in rows]
  ll, _ = score([req for reqs in per_row for req in reqs])
  splits = np.cumsum([len(reqs) for reqs in per_row])[:-1]
  return choice_metrics(np.split(ll, splits), rows)


def lastword_metrics(ll: np.ndarray, greedy: np.ndarray) -> dict[str, float]:
  return {"perplexity": float(math.exp(-np.mean(ll))), "acc": float(np.mean(greedy))}


def eval_lastword(score: Callable, tokenizer, prefix: int, rows: Sequence[dict]) -> dict[str, float]:
  ll, greedy = score([encode_pair(tokenizer, prefix, r["context"], " " + r["target"])
                      for r in rows])
  return lastword_metrics(ll, greedy)


def rolling_metrics(nll: float, words: int, n_bytes: int) -> dict[str, float]:
  return {"word_perplexity": math.exp(nll / words), "byte_perplexity": math.exp(nll / n_bytes),
          "bits_per_byte": nll / n_bytes / math.log(2)}


def eval_rolling(score: Callable, tokenizer, prefix: int, rows: Sequence[dict],
                 max_len: int) -> dict[str, float]:
  requests = [rolling_requests(np.asarray(tokenizer.encode(tasks.wikitext_detokenize(r["page"])),
                                          np.int32), prefix, max_len) for r in rows]
  ll, _ = score([req for reqs in requests for req in reqs])
  words = sum(tasks.wikitext_words(r["page"]) for r in rows)
  n_bytes = sum(len(r["page"].encode("utf-8")) for r in rows)
  return rolling_metrics(-float(ll.sum()), words, n_bytes)


def evaluate_task(name: str, rows: Sequence[dict], score: Callable, tokenizer,
                  max_len: int) -> dict[str, float]:
  """The metrics SPEC §4 and zeroshot.json report for one task."""
  task, prefix = tasks.TASKS[name], prefix_token(tokenizer)
  if task.kind == "choice":
    metrics = eval_choice(score, tokenizer, prefix, rows)
  elif task.kind == "lastword":
    metrics = eval_lastword(score, tokenizer, prefix, rows)
  else:
    metrics = eval_rolling(score, tokenizer, prefix, rows, max_len)
  return {k: metrics[k] for k in task.metrics}


# ----------------------------------------------------------------------------- the mode


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> list[str]:
  """The task names; fails before any checkpoint is read."""
  z = config.zeroshot
  for field in ("batch_size", "min_bucket"):
    if z[field] < 1:
      raise UserError(f"config.zeroshot.{field}={z[field]} must be at least 1.")
  if z.limit < 0:
    raise UserError(f"config.zeroshot.limit={z.limit} must be 0 (all rows) or positive.")
  mesh_lib.check_divisible(z.batch_size, mesh, "config.zeroshot.batch_size")
  if z.batch_size % jax.process_count():
    raise UserError(f"config.zeroshot.batch_size={z.batch_size} must be divisible by the "
                    f"{jax.process_count()} processes.")
  return tasks.parse_tasks(z.tasks)


def log_table(results: dict[str, Any]) -> None:
  for name, entry in results["tasks"].items():
    if "skipped" in entry:  # the reason was logged when the task was reached
      logging.info("zero-shot %-15s skipped", name)
    else:
      values = " | ".join(f"{k} {entry[k]:.4f}" for k in tasks.TASKS[name].metrics)
      logging.info("zero-shot %-15s %s | %d rows", name, values, entry["n"])


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  exp = state_lib.build(config)
  names = check_config(config, exp.mesh)
  tokenizer = exp.dataset.tokenizer
  if tokenizer is None:
    raise UserError("Zero-shot tasks are text, but this run's data has no tokenizer "
                    "(pre-tokenized input with --config.data.tokenizer=''): pass the tokenizer "
                    "the model was trained with (--config.data.tokenizer, --config.data.spm_model).")
  step, params = state_lib.restore_latest(exp, workdir)
  z = config.zeroshot
  score = Scorer(make_score_fn(exp.apply, exp.mesh), params, config.train.seq_len,
                 z.batch_size, z.min_bucket, exp.mesh)
  results: dict[str, Any] = {"step": step, "data_dir": tasks.resolve_data_dir(z.data_dir),
                             "seq_len": config.train.seq_len, "tasks": {}}
  for name in names:
    results["tasks"][name] = run_task(name, z, score, tokenizer, config.train.seq_len)
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(workdir, "zeroshot.json"), results)
    log_table(results)
  return results


def run_task(name: str, z: ml_collections.ConfigDict, score: Callable, tokenizer,
             max_len: int) -> dict[str, Any]:
  """One task's zeroshot.json entry; a missing or malformed file is skipped, not fatal, so a
  table is never lost halfway."""
  path = tasks.task_path(name, z.data_dir)
  if not os.path.exists(path):
    message = tasks.missing_message(name, z.data_dir)
    logging.warning("%s", message)
    return {"skipped": message}
  try:
    rows = tasks.load(name, path, z.limit)
  except UserError as e:
    logging.warning("skipped %s: %s", name, e)
    return {"skipped": f"skipped {name}: {e}"}
  logging.info("zero-shot %s: scoring %d rows of %s", name, len(rows), path)
  start = time.time()
  metrics = evaluate_task(name, rows, score, tokenizer, max_len)
  return {**metrics, "n": len(rows), "table_metric": tasks.TASKS[name].table_metric,
          "path": path, "seconds": round(time.time() - start, 2)}
