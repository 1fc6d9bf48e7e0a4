"""Synthetic data: multi-query associative recall (MQAR; Arora et al., 2023, "Zoology").

`config.data.synthetic="mqar"` trains and evaluates on it instead of a corpus. A sequence of
seq_len + 1 tokens holds N key-value pairs, then queries of earlier keys, each followed by
its value:

  k1 v1 k2 v2 ... kN vN | 0 0 k2 v2 0 0 0 0 k1 v1 0 ...
                          <------- query section ------->

Keys are distinct draws from [1, V/2), values from [V/2, V) (V = `vocab_size`); 0 fills the
query section. Each of the `round(query_fraction · N)` queries asks a key drawn uniformly
from the N, with replacement, and sits at offset 2·g_i of the query section, the gaps g_i
distinct draws from p(g) ∝ (g + 1)^(power_a - 1), Zoology's power law (small gaps more likely:
power_a = 1 is uniform). Loss and accuracy count only the answers: the targets that follow a
query key. This is Zoology's `multiquery_ar` (`random_non_queries=False`) written as one token
stream, so that any language model trains on it unchanged: the answer comes after its key as
the next token. That reveals each answer to the later queries, so Zoology's distinct queried
keys would let a model that recalls nothing score H_N / N (0.52 at N = 4: guess among the
values not yet revealed); with keys asked independently, such a model scores 1 / N, and a
key asked twice is recalled from the context either way.

Batches are pure functions of (seed, step), like the corpus's; evaluation uses
`eval_examples` sequences drawn from a seed-independent stream, the same for every run.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from nested.errors import UserError

_TRAIN_TAG, _EVAL_TAG = 0x6D716172, 0x65766171    # keep the train and eval streams apart


@dataclasses.dataclass(frozen=True)
class MQAR:
  vocab_size: int
  num_pairs: int
  query_fraction: float = 1.0
  power_a: float = 0.01
  eval_examples: int = 512

  @property
  def context_size(self) -> int:
    """Tokens of the key-value section."""
    return 2 * self.num_pairs

  @property
  def num_queries(self) -> int:
    return max(1, round(self.query_fraction * self.num_pairs))

  def check(self, seq_len: int) -> None:
    """A UserError naming the field to change if these settings cannot fill `seq_len`."""
    if self.vocab_size < 4:
      raise UserError(f"config.data.mqar.vocab_size={self.vocab_size}: MQAR needs at least 4 "
                      f"tokens (0 for filler, keys below V/2, values from V/2).")
    if not 1 <= self.num_pairs < self.vocab_size // 2:
      raise UserError(f"config.data.mqar.num_pairs={self.num_pairs} must be from 1 to "
                      f"vocab_size // 2 - 1 = {self.vocab_size // 2 - 1} (keys are distinct "
                      f"tokens below vocab_size / 2).")
    if not 0 < self.query_fraction <= 1:
      raise UserError(f"config.data.mqar.query_fraction={self.query_fraction} must be in "
                      f"(0, 1]: the share of the keys that are queried.")
    if self.power_a <= 0:
      raise UserError(f"config.data.mqar.power_a={self.power_a} must be positive (1 = gaps "
                      f"uniform; Zoology uses 0.01).")
    room = (seq_len - self.context_size) // 2
    if room < self.num_queries:
      need = self.context_size + 2 * self.num_queries
      raise UserError(
          f"MQAR with {self.num_pairs} pairs and {self.num_queries} queries needs "
          f"config.train.seq_len >= {need} (2 tokens per pair and per query), got {seq_len}. "
          f"Raise --config.train.seq_len or lower --config.data.mqar.num_pairs.")

  def sequences(self, rng: np.random.Generator, rows: int, seq_len: int) -> np.ndarray:
    """int32 [rows, seq_len + 1] MQAR sequences."""
    self.check(seq_len)
    half = self.vocab_size // 2
    space = (seq_len - self.context_size) // 2
    p = (np.arange(1, space + 1) ** (self.power_a - 1)).astype(np.float64)
    p /= p.sum()
    out = np.zeros((rows, seq_len + 1), np.int32)
    for r in range(rows):
      keys = rng.choice(np.arange(1, half), size=self.num_pairs, replace=False)
      values = rng.choice(np.arange(half, self.vocab_size), size=self.num_pairs, replace=False)
      out[r, 0:self.context_size:2], out[r, 1:self.context_size:2] = keys, values
      asked = rng.integers(0, self.num_pairs, size=self.num_queries)
      gaps = rng.choice(space, size=self.num_queries, replace=False, p=p)
      at = self.context_size + 2 * gaps
      out[r, at], out[r, at + 1] = keys[asked], values[asked]
    return out

  def train_batch(self, *, seed: int, step: int, batch_size: int, seq_len: int,
                  rows: slice) -> np.ndarray:
    rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, int(step), _TRAIN_TAG])
    return self.sequences(rng, batch_size, seq_len)[rows]

  def eval_batch(self, index: int, *, batch_size: int, seq_len: int, rows: slice) -> np.ndarray:
    rng = np.random.default_rng([int(index), seq_len, _EVAL_TAG])
    return self.sequences(rng, batch_size, seq_len)[rows]

  def num_eval_batches(self, batch_size: int, max_batches: int | None) -> int:
    n = max(self.eval_examples // batch_size, 1)
    return n if max_batches is None else min(n, max_batches)

  def loss_weights(self, batch: jax.Array) -> jax.Array:
    """float32 [rows, seq_len]: 1 where the target (batch[:, 1:]) is an answer, else 0.

    An answer follows a key in the query section; keys are the only tokens in [1, V/2) there.
    """
    inputs = batch[:, :-1]
    position = jnp.arange(inputs.shape[1])
    is_key = (inputs >= 1) & (inputs < self.vocab_size // 2)
    return (is_key & (position >= self.context_size)).astype(jnp.float32)


def from_config(data_cfg) -> MQAR | None:
  """The synthetic task `config.data` names, or None for a corpus."""
  kind = data_cfg.get("synthetic", "")
  if not kind:
    return None
  if kind != "mqar":
    raise UserError(f"config.data.synthetic={kind!r}; the synthetic tasks are 'mqar' (or '' "
                    f"for the corpus in config.data.path).")
  m = data_cfg.mqar
  return MQAR(vocab_size=int(m.vocab_size), num_pairs=int(m.num_pairs),
              query_fraction=float(m.query_fraction), power_a=float(m.power_a),
              eval_examples=int(m.eval_examples))


def chance_accuracy(task: MQAR) -> float:
  """What guessing a value uniformly scores: 1 / (number of value tokens)."""
  return 1.0 / (task.vocab_size - task.vocab_size // 2)


def no_recall_accuracy(task: MQAR) -> float:
  """What a model that knows the sequence's values but binds none to its key scores."""
  return 1.0 / task.num_pairs
