"""State-carrying generation (experiments/generate.py) against forward passes over the whole
text: a KV cache for Transformer++, the chunk-boundary state plus the partial chunk for Titans,
HOPE and HOPE-Attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import micro_config
from experiments import generate, state as state_lib
from nested import models

PROMPT = [5, 17, 101, 3, 64]
NEW = 20
PADDED = 32   # every reference pass runs on this many tokens (one compile)

# (model, generate.max_len): within max_len the cached decoder is exact for every model; the
# recurrent ones are also exact past it (their state is not a window), so they get a short one.
CASES = [("transformer", 32), ("hope_attention", 32), ("titans", 8), ("hope", 8)]


def greedy_by_full_passes(apply, params, prompt, new_tokens):
  """Each next token: argmax of a forward pass over the whole text so far, from scratch
  (padded on the right to PADDED tokens, which causality leaves out of earlier logits)."""
  step = jax.jit(apply)
  text = list(prompt)
  for _ in range(new_tokens):
    window = np.zeros((1, PADDED), np.int32)
    window[0, :len(text)] = text
    text.append(int(np.argmax(np.asarray(step(params, jnp.asarray(window)))[0, len(text) - 1])))
  return text[len(prompt):]


@pytest.mark.parametrize("name, max_len", CASES)
def test_greedy_generation_equals_forward_passes_over_the_whole_text(name, max_len):
  overrides = {"model.n_layers": 1} if name != "transformer" else {}
  exp = state_lib.build(micro_config("", model=name, **overrides), load_data=False)
  params = models.init_params(exp.config.model, seed=3)
  sampler = generate.make_sampler(generate.decoder(exp, max_len), new_tokens=NEW,
                                  temperature=0.0, top_k=0)
  got = np.asarray(sampler(params, jnp.asarray([PROMPT], jnp.int32), jax.random.key(0)))
  assert got.shape == (1, NEW)
  assert len(PROMPT) + NEW <= PADDED
  assert got[0].tolist() == greedy_by_full_passes(exp.apply, params, PROMPT, NEW)


@pytest.mark.parametrize("name, max_len", CASES)
def test_forced_decoding_logits_equal_one_forward_pass(name, max_len):
  """Position by position, the decoder's logits (its state carried through chunk commits,
  teach-signal lookaheads and cache writes) equal one pass over the whole text."""
  overrides = {"model.n_layers": 1} if name != "transformer" else {}
  exp = state_lib.build(micro_config("", model=name, **overrides), load_data=False)
  params = models.init_params(exp.config.model, seed=3)
  tokens = jax.random.randint(jax.random.key(1), (2, PADDED - 1), 0, 256, jnp.int32)
  dec = generate.decoder(exp, max_len)
  got = jax.jit(lambda p, t: generate.forced_logits(dec, p, t, len(PROMPT)))(params, tokens)
  want = exp.apply(params, tokens)[:, len(PROMPT) - 1:]
  # Measured: HOPE and HOPE-Attention bitwise, the others within 1.2e-7; committing a HOPE
  # chunk without its lookahead token is off by 6e-6 (at these random initial weights).
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)


def test_prompt_keeps_its_last_max_len_tokens():
  rows = generate.prompt_tokens(np.arange(10), max_len=4, samples=3)
  assert rows.tolist() == [[6, 7, 8, 9]] * 3


def test_max_len_defaults_to_the_training_context():
  config = micro_config("")
  assert config.generate.max_len == 0 and generate.max_len(config) == config.train.seq_len == 32
  config.generate.max_len = 100
  assert generate.max_len(config) == 100
