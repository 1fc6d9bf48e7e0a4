"""Multi-query associative recall (Zoology's MQAR, experiments/synthetic.py) for each model.

  python main.py --config=configs/mqar.py:hope --workdir=runs/mqar_hope
  python main.py --config=configs/mqar.py:transformer --config.data.mqar.num_pairs=16 ...

`get_config(model)` is configs/<model>.py:tiny at the scale of a recall probe: width 64, 2
blocks, 2 heads, 140k parameters each (±1.4%: each model's own memory and CMS sizes set to
match), vocabulary 256
(keys below 128, values from 128), 8 key-value pairs in sequences of 64 tokens, 2000 steps of
32 sequences. Loss and accuracy count the answers only; `eval.json` reports `accuracy`.
"""

import importlib

import ml_collections

MODELS = ("transformer", "titans", "hope", "hope_attention")
WIDTH = dict(d_model=64, n_layers=2, n_heads=2, vocab_size=256)
# Each model's own sizes at width 64 (chunks of 8 tokens).
OWN = {
    "transformer": dict(d_ff=192),
    "titans": dict(d_ff=144, mem_hidden=32, chunk_size=8),
    "hope": dict(cms_hidden="48,48,32", mem_hidden=32, gen_hidden=32, chunk_size=8,
                 mem_chunk_size=8, gen_chunk_size=8, context=64),
    "hope_attention": dict(cms_hidden="64,64,64", chunk_size=8, context=64),
}


def get_config(model: str = "transformer") -> ml_collections.ConfigDict:
  if model not in MODELS:
    raise ValueError(f"Unknown model {model!r} for configs/mqar.py; choose one of {MODELS}, "
                     f"e.g. configs/mqar.py:hope")
  c = importlib.import_module(f"configs.{model}").get_config("tiny")
  c.model.update({**WIDTH, **OWN[model]})
  c.data.synthetic = "mqar"
  c.data.mqar.update(dict(vocab_size=256, num_pairs=8, query_fraction=1.0, power_a=0.01,
                          eval_examples=512))
  c.train.update(dict(steps=2000, seq_len=64, batch_size=32, lr=1e-3, warmup_steps=100,
                      log_every=100, checkpoint_every=1000))
  # Beyond the training length: 2x, 4x, 8x, read as a stream (experiments/evaluate.py).
  c.eval.update(dict(batch_size=32, max_batches=0, lengths="128,256,512"))
  if "cms_slow" in c.levels:
    # CMS levels every 8 and 16 tokens in context; the slowest, trained as a level, every 4
    # steps of this batch (its period, in tokens, in both places).
    slow = 4 * c.train.batch_size * c.train.seq_len
    c.model.cms_periods = f"8,16,{slow}"
    c.levels.cms_slow.period = slow
  return c
