"""This project's models inside lm-evaluation-harness (`pip install -e '.[lmeval]'`).

  python -m experiments.lmeval --model nested --model_args workdir=runs/tiny --tasks lambada_openai

The module registers the harness model "nested" (a `TemplateLM`) and then runs the harness's
own command line, so every harness flag works; from Python, `NestedLM(workdir=...)` can be
passed to `lm_eval.simple_evaluate(model=...)`. The model is the workdir's latest checkpoint,
built from the run's `config.json`; model_args: `workdir` (required), `batch_size` (rows per
scoring call, default 16), `max_gen_toks` (default 256).

  loglikelihood          the harness tokenizes (its `_encode_pair`), our zero-shot scorer
                         (experiments/zeroshot.py: bucketed, jitted, sharded) scores;
  loglikelihood_rolling  the harness's rolling windows of `train.seq_len` (context_len 1),
                         summed;
  generate_until         greedy, through the state-carrying decoder of experiments/generate.py
                         (`generate.max_len` of the run's config, 0 = its
                         `train.seq_len`), cut at the first stop string.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from experiments import generate, state as state_lib, zeroshot
from nested.errors import UserError


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"lm_eval's model_args workdir={workdir} holds no config.json, so it is not "
                    f"a training run of this project: pass the --workdir of a finished "
                    f"`python main.py` run, e.g. --model_args workdir=runs/tiny.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


@register_model("nested")
class NestedLM(TemplateLM):
  """The latest checkpoint of a workdir as an lm-evaluation-harness model."""

  def __init__(self, workdir: str = "", batch_size: int | str = 16, max_gen_toks: int = 256,
               **kwargs):
    super().__init__()
    if not workdir:
      raise UserError("lm_eval needs the run to evaluate: --model_args workdir=<the --workdir "
                      "of a finished `python main.py` run>.")
    del kwargs   # the harness passes device/dtype options meant for torch models
    config = load_run_config(workdir)
    try:
      self._exp = state_lib.build(config)
    except AttributeError as e:
      raise UserError(f"{workdir}/config.json predates this version's config field {e}; "
                      f"retrain, or add the field to that file with its default from "
                      f"configs/base.py.") from e
    self._tokenizer = self._exp.dataset.tokenizer
    if self._tokenizer is None:
      raise UserError(f"The run in {workdir} trained on pre-tokenized data (no tokenizer): "
                      f"lm-evaluation-harness requests are text.")
    self.step, self._params = state_lib.restore_latest(self._exp, workdir)
    self._prefix = zeroshot.prefix_token(self._tokenizer)
    self._seq_len = config.train.seq_len
    self._max_gen_toks = int(max_gen_toks)
    # The harness's --batch_size may be "auto" (a torch memory probe): keep the default then.
    rows = int(batch_size) if str(batch_size).isdigit() else 16
    self._score = zeroshot.Scorer(zeroshot.make_score_fn(self._exp.apply, self._exp.mesh),
                                  self._params, self._seq_len, rows,
                                  config.zeroshot.min_bucket, self._exp.mesh)
    self._max_len = generate.max_len(config)
    self._decoder = generate.decoder(self._exp, self._max_len)
    self._samplers = {}

  @property
  def eot_token_id(self) -> int:
    return self._prefix

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    del add_special_tokens, kwargs
    return list(self._tokenizer.encode(string))

  def tok_decode(self, tokens) -> str:
    return self._tokenizer.decode(np.asarray(tokens, np.int32))

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
    del disable_tqdm, kwargs
    ll, greedy = self._score([zeroshot.Request(np.asarray(ctx, np.int32),
                                               np.asarray(cont, np.int32))
                              for _, ctx, cont in requests])
    return [(float(a), bool(b)) for a, b in zip(ll, greedy)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    del disable_tqdm
    out = []
    for request in requests:
      tokens = np.asarray(self.tok_encode(request.args[0]), np.int32)
      windows = zeroshot.rolling_requests(tokens, self._prefix, self._seq_len)
      out.append(float(self._score(windows)[0].sum()) if windows else 0.0)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    del disable_tqdm
    out = []
    for request in requests:
      context, kwargs = request.args
      until = kwargs.get("until", [])
      until = [until] if isinstance(until, str) else list(until)
      new = int(kwargs.get("max_gen_toks", self._max_gen_toks))
      prompt = self.tok_encode(context)[-self._max_len:] or [self._prefix]
      tokens = self._sampler(new)(self._params, jnp.asarray([prompt], jnp.int32),
                                  jax.random.key(0))
      text = self.tok_decode(np.asarray(tokens)[0])
      cuts = [text.index(stop) for stop in until if stop and stop in text]
      out.append(text[:min(cuts)] if cuts else text)
    return out

  def _sampler(self, new_tokens: int):
    """One compiled greedy sampler per generation length (kept on this model, not in a
    module-level cache that would hold the model and its parameters alive)."""
    if new_tokens not in self._samplers:
      self._samplers[new_tokens] = generate.make_sampler(self._decoder, new_tokens=new_tokens,
                                                         temperature=0.0, top_k=0)
    return self._samplers[new_tokens]


def main() -> None:
  from lm_eval.__main__ import cli_evaluate
  try:
    cli_evaluate()
  except UserError as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
