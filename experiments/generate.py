"""`--mode=generate`: samples from the latest checkpoint, or from its compressed copy.

Sampling works the same for every model, because each is causal: the context is a fixed
window of `config.train.seq_len` tokens, the prompt left-aligned in it; each new token is
drawn from the logits at the last filled position, written after it, and once the window is
full it slides by one. Every token re-runs the forward pass over the window (O(seq_len) per
token, no cache): simple, model-agnostic, and with a compressed copy
(`config.compression.codec`) the weights are decoded inside that forward pass each time.
The whole loop is one jitted `fori_loop`.

Writes `samples.json` next to what it sampled from (the workdir, or the compressed copy's
directory), and logs each sample.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax import lax

from experiments import checkpoint, compress, state as state_lib
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


def make_sampler(apply: Callable[[Any, jax.Array], jax.Array], *, new_tokens: int,
                 temperature: float, top_k: int) -> Callable:
  """`(params, window [S, T] int32, filled, key) -> new tokens [S, new_tokens]`, jitted.

  `filled` (>= 1) is how many leading positions of `window` hold the prompt.
  """

  def sample(params, window, filled, key):
    seq_len = window.shape[1]

    def step(i, carry):
      window, filled, out = carry
      logits = apply(params, window)
      last = lax.dynamic_index_in_dim(logits, filled - 1, axis=1, keepdims=False)
      token = pick(last, jax.random.fold_in(key, i), temperature, top_k)
      slid = jnp.concatenate([window[:, 1:], token[:, None]], axis=1)
      written = lax.dynamic_update_index_in_dim(window, token, jnp.minimum(filled, seq_len - 1),
                                                axis=1)
      window = jnp.where(filled == seq_len, slid, written)
      return window, jnp.minimum(filled + 1, seq_len), out.at[:, i].set(token)

    out = jnp.zeros((window.shape[0], new_tokens), jnp.int32)
    return lax.fori_loop(0, new_tokens, step, (window, filled, out))[2]

  return jax.jit(sample)


def prompt_window(prompt_ids: np.ndarray, seq_len: int, samples: int) -> tuple[np.ndarray, int]:
  """The last `seq_len` prompt tokens, left-aligned in a [samples, seq_len] window."""
  ids = np.asarray(prompt_ids, np.int32)[-seq_len:]
  window = np.zeros((samples, seq_len), np.int32)
  window[:, :len(ids)] = ids
  return window, len(ids)


def check_config(g: ml_collections.ConfigDict) -> None:
  if g.max_new_tokens < 1 or g.num_samples < 1:
    raise UserError(f"config.generate.max_new_tokens={g.max_new_tokens} and num_samples="
                    f"{g.num_samples} must both be at least 1.")
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
  window, filled = prompt_window(prompt_ids, config.train.seq_len, g.num_samples)
  sampler = make_sampler(exp.apply, new_tokens=g.max_new_tokens, temperature=g.temperature,
                         top_k=g.top_k)
  tokens = np.asarray(sampler(params, jnp.asarray(window), jnp.int32(filled),
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
