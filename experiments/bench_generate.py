"""Generation speed and state size against the length generated, for the four models.

  python experiments/bench_generate.py                        # tiny presets, 128 → 2048 tokens
  python experiments/bench_generate.py --lengths=128,4096 --models=hope,transformer

For each model (`configs/<model>.py:<preset>`, freshly initialised weights: speed does not
depend on what they learned) and each length N, the state-carrying sampler of
experiments/generate.py generates N tokens after a 16-token prompt, greedily, with
`generate.max_len` = 16 + N, so Transformer++'s and HOPE-Attention's KV caches hold the whole
text (no sliding window). Reported: tokens/s of the second run of the compiled sampler (the
first compiles), and the bytes of the decoding state it carries (the KV caches, or the
memories and fast weights at the last chunk boundary, twice: boundary and pending chunk).
"""

import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import generate, state as state_lib  # noqa: E402
from nested import models  # noqa: E402

flags.DEFINE_string("preset", "tiny", "Preset of every model's config file.")
flags.DEFINE_list("models", ["transformer", "titans", "hope", "hope_attention"], "Models.")
flags.DEFINE_list("lengths", ["128", "512", "2048"], "Tokens to generate.")
FLAGS = flags.FLAGS
PROMPT = 16


def state_bytes(dec, params, prompt) -> int:
  carry = jax.eval_shape(lambda p, t: generate.prefill(dec, p, t)[0], params, prompt)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(carry))


def main(argv):
  del argv
  print(f"date {datetime.date.today()} | jax {jax.__version__} on {jax.devices()[0].device_kind}"
        f" | preset {FLAGS.preset} | prompt {PROMPT} tokens, greedy")
  print("| model | generated | tokens/s | state bytes |")
  print("|---|---|---|---|")
  for name in FLAGS.models:
    config = importlib.import_module(f"configs.{name}").get_config(FLAGS.preset)
    exp = state_lib.build(config, load_data=False)
    params = models.init_params(config.model, seed=0)
    prompt = jnp.arange(PROMPT, dtype=jnp.int32)[None] % config.model.vocab_size
    for n in map(int, FLAGS.lengths):
      dec = generate.decoder(exp, PROMPT + n)
      sampler = generate.make_sampler(dec, new_tokens=n, temperature=0.0, top_k=0)
      jax.block_until_ready(sampler(params, prompt, jax.random.key(0)))
      start = time.perf_counter()
      jax.block_until_ready(sampler(params, prompt, jax.random.key(0)))
      seconds = time.perf_counter() - start
      print(f"| {name} | {n} | {n / seconds:,.0f} | {state_bytes(dec, params, prompt):,} |",
            flush=True)


if __name__ == "__main__":
  app.run(main)
