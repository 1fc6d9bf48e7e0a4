"""`--mode=generate`: samples from the latest checkpoint, or from its compressed copy.

Generation carries each model's state, through the models' common streaming interface
(`init_state`, `stream`; nested/models): Transformer++ keeps a KV cache of the last
`generate.max_len` tokens (prefill, then one token per step); Titans, HOPE and HOPE-Attention
keep their in-context state (memories, fast CMS weights, attention cache) at the last chunk
boundary and, per new token, re-run only the partial chunk after it. Memory and time per
token stay flat in the length generated. Within `max_len` tokens this is exactly a forward
pass over the whole text so far (tested); past it, Transformer++ and HOPE-Attention attend
to a sliding window of `max_len` cached keys while Titans and HOPE go on from their state.

A chunked model's state after a chunk is committed when the token after it is known: HOPE's
teach signal includes each chunk's boundary pair (`stream`'s lookahead), so the commit re-runs
the chunk with the sampled token; for the others the state from the last partial-chunk pass
is already the committed one. With a compressed copy (`config.compression.codec`) the weights
are decoded inside each jitted step. Prefill and the sampling loop are one jitted function.

Writes `samples.json` next to what it sampled from (the workdir, or the compressed copy's
directory), and logs each sample.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax import lax

from compression import tree as ctree
from experiments import checkpoint, compress, state as state_lib
from nested import models
from nested.errors import UserError


def pick(logits: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """Token ids [S] from logits [S, V]: greedy at temperature 0, else softmax sampling, over
  the `top_k` most likely tokens when top_k > 0."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """A model as generation sees it. `init_state(params, batch)` and `stream(params, tokens,
  state, lookahead) -> (logits, state)` over segments of a multiple of `chunk` tokens;
  `reads_lookahead`: whether a segment's state depends on the token after it."""
  init_state: Callable
  stream: Callable
  chunk: int
  reads_lookahead: bool


def decoder(exp: state_lib.Experiment, max_len: int) -> Decoder:
  """The Experiment's model as a Decoder whose attention caches (if any) hold `max_len`
  tokens (HOPE-Attention: its `attention_window` when set; a multiple of its chunk)."""
  return model_decoder(exp.graphdef, models.model_config(exp.config.model), max_len)


def model_decoder(graphdef, hparams, max_len: int) -> Decoder:
  """`decoder` of a model given by its graph definition and hyper-parameters."""
  chunk = models.stream_chunk(hparams)
  cache_len = getattr(hparams, "attention_window", 0) or -(-max_len // chunk) * chunk
  init, stream = models.stream_fns(graphdef)
  return Decoder(
      init_state=lambda params, batch: init(ctree.decompress(params), batch, cache_len),
      stream=lambda params, tokens, state, lookahead=None: stream(
          ctree.decompress(params), tokens, state, lookahead),
      chunk=chunk, reads_lookahead=getattr(hparams, "reads_lookahead", False))


def _pending_logits(dec: Decoder, params, carry):
  """Logits after the pending tokens, and the state after the (padded) pending chunk: the
  padding comes after the last real token, so causality leaves its logits alone."""
  state, _, pending, filled = carry
  logits, after = dec.stream(params, pending, state)
  return lax.dynamic_index_in_dim(logits, filled - 1, axis=1, keepdims=False), after


def prefill(dec: Decoder, params, prompt: jax.Array):
  """(decoding carry, logits [S, V] for the token after `prompt` [S, n], n >= 1). The carry:
  the state at the last chunk boundary, the state after the pending chunk, the pending chunk
  [S, chunk] and how many of its tokens are real (1..chunk)."""
  c = dec.chunk
  batch, n = prompt.shape
  committed = (n - 1) // c * c   # whole chunks; 1..c prompt tokens stay pending
  state = dec.init_state(params, batch)
  if committed:
    _, state = dec.stream(params, prompt[:, :committed], state, prompt[:, committed])
  pending = jnp.zeros((batch, c), jnp.int32).at[:, :n - committed].set(prompt[:, committed:])
  carry = (state, state, pending, jnp.int32(n - committed))
  logits, after = _pending_logits(dec, params, carry)
  return carry[:1] + (after,) + carry[2:], logits


def advance(dec: Decoder, params, carry, token: jax.Array):
  """Appends `token` [S] to the text: (carry, logits [S, V] for the token after it)."""
  state, after, pending, filled = carry

  def commit():   # the pending chunk is full: its state becomes the boundary state
    new = dec.stream(params, pending, state, token)[1] if dec.reads_lookahead else after
    return new, jnp.zeros_like(pending).at[:, 0].set(token), jnp.int32(1)

  def append():
    return state, lax.dynamic_update_index_in_dim(pending, token, filled, axis=1), filled + 1

  state, pending, filled = lax.cond(filled == dec.chunk, commit, append)
  logits, after = _pending_logits(dec, params, (state, after, pending, filled))
  return (state, after, pending, filled), logits


def make_sampler(dec: Decoder, *, new_tokens: int, temperature: float, top_k: int) -> Callable:
  """`(params, prompt [S, n] int32, key) -> new tokens [S, new_tokens]`, jitted (n >= 1)."""

  def sample(params, prompt, key):
    def step(carry, i):
      carry, logits = carry
      token = pick(logits, jax.random.fold_in(key, i), temperature, top_k)
      return advance(dec, params, carry, token), token

    _, tokens = lax.scan(step, prefill(dec, params, prompt), jnp.arange(new_tokens))
    return tokens.T

  return jax.jit(sample)


def forced_logits(dec: Decoder, params, tokens: jax.Array, n_prompt: int) -> jax.Array:
  """The decoder's logits [S, T - n_prompt + 1, V] after each of tokens[:, n_prompt - 1:],
  fed instead of sampled (teacher forcing): what generation computes, position by position."""
  carry, first = prefill(dec, params, tokens[:, :n_prompt])
  step = lambda carry, token: advance(dec, params, carry, token)
  _, rest = lax.scan(step, carry, tokens[:, n_prompt:].T)
  return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)


def stream_logits(dec: Decoder, params, tokens: jax.Array, after: jax.Array) -> jax.Array:
  """Logits [S, T, V] of `tokens` [S, T] (T a multiple of `dec.chunk`) read as one stream of
  segments of `dec.chunk` tokens from a fresh state; `after` [S] is the token that follows
  them (HOPE's last teach signal reads each segment's successor). Equal to one pass while
  attention caches hold the whole sequence; past them, attention is a sliding window."""
  rows, length = tokens.shape
  c = dec.chunk
  segments = tokens.reshape(rows, length // c, c).swapaxes(0, 1)
  successors = jnp.concatenate([tokens[:, c::c], after[:, None]], axis=1).T

  def read(state, xs):
    segment, lookahead = xs
    logits, state = dec.stream(params, segment, state, lookahead)
    return state, logits

  _, logits = lax.scan(read, dec.init_state(params, rows), (segments, successors))
  return logits.swapaxes(0, 1).reshape(rows, length, -1)


def prompt_tokens(prompt_ids: np.ndarray, max_len: int, samples: int) -> np.ndarray:
  """The last `max_len` prompt tokens, one row per sample: [samples, n]."""
  ids = np.asarray(prompt_ids, np.int32)[-max_len:]
  return np.tile(ids, (samples, 1))


def max_len(config: ml_collections.ConfigDict) -> int:
  """The tokens generation keeps in view: `generate.max_len`, or 0 = `train.seq_len`."""
  return config.generate.max_len or config.train.seq_len


def check_config(g: ml_collections.ConfigDict) -> None:
  if g.max_new_tokens < 1 or g.num_samples < 1:
    raise UserError(f"config.generate.max_new_tokens={g.max_new_tokens} and num_samples="
                    f"{g.num_samples} must both be at least 1.")
  if g.max_len < 0:
    raise UserError(f"config.generate.max_len={g.max_len} must be positive, or 0 for the "
                    f"training context (config.train.seq_len).")
  if g.temperature < 0 or g.top_k < 0:
    raise UserError(f"config.generate.temperature={g.temperature} and top_k={g.top_k} must "
                    f"not be negative (temperature 0 = greedy, top_k 0 = the whole vocabulary).")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  g = config.generate
  check_config(g)
  exp = state_lib.build(config)
  tokenizer = exp.dataset.tokenizer
  if tokenizer is None:
    raise UserError("This run's data has no tokenizer (pre-tokenized input), so there is no "
                    "text to prompt with: pass the tokenizer the model was trained with "
                    "(--config.data.tokenizer, --config.data.spm_model).")
  if g.top_k > config.model.vocab_size:
    raise UserError(f"config.generate.top_k={g.top_k} exceeds the vocabulary "
                    f"({config.model.vocab_size}).")
  if config.compression.codec:
    step, params, out_dir = compress.load_latest(exp, workdir)
  else:
    (step, params), out_dir = state_lib.restore_latest(exp, workdir), workdir
  prompt_ids = tokenizer.encode(g.prompt) if g.prompt else tokenizer.doc_separator()[1]
  sampler = make_sampler(decoder(exp, max_len(config)), new_tokens=g.max_new_tokens,
                         temperature=g.temperature, top_k=g.top_k)
  tokens = np.asarray(sampler(params, jnp.asarray(prompt_tokens(prompt_ids, max_len(config),
                                                                g.num_samples)),
                              jax.random.key(g.seed)))
  texts = [tokenizer.decode(row) for row in tokens]
  results = {"step": step, "prompt": g.prompt, "codec": config.compression.codec,
             "temperature": g.temperature, "top_k": g.top_k, "seed": g.seed,
             "tokens": tokens.tolist(), "samples": texts}
  if jax.process_index() == 0:
    checkpoint.write_json_atomic(os.path.join(out_dir, "samples.json"), results)
    for i, text in enumerate(texts):
      logging.info("sample %d (step %d%s):\n%s%s", i, step,
                   f", {config.compression.codec} compressed" if config.compression.codec else "",
                   g.prompt, text)
  return results
