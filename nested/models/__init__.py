"""Model registry: `config.model.name` → (hyper-parameter dataclass, Flax NNX module).

Every model maps int tokens [..., T] to float32 logits [..., T, vocab]. Parameters
travel as plain nested dicts (`nnx.split(...)` then `to_pure_dict()`), so optax,
orbax and the sharding rules see ordinary pytrees with paths like
`layers/0/mlp/w_up/kernel`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
from flax import nnx

from nested.errors import UserError
from nested.models import hope, titans, transformer

MODELS: dict[str, tuple[type, type[nnx.Module]]] = {
    "transformer": (transformer.TransformerConfig, transformer.Transformer),
    "titans": (titans.TitansConfig, titans.Titans),
    "hope": (hope.HopeConfig, hope.Hope),
    "hope_attention": (hope.HopeAttentionConfig, hope.Hope),
}

# Model fields that choose how a step is computed (what the backward pass keeps, how far the
# chunk loop is unrolled), never its values: a checkpoint or a finished sweep point may be
# continued under others, e.g. a run resumed with less memory.
EXECUTION_FIELDS = frozenset({"remat", "scan_unroll"})


def field_defaults(name: str) -> dict[str, Any]:
  """The defaults of model `name`'s hyper-parameters: what a config that leaves a field out
  (one written before the field existed) runs with. {} for an unknown name."""
  if name not in MODELS:
    return {}
  return {f.name: f.default for f in dataclasses.fields(MODELS[name][0])
          if f.default is not dataclasses.MISSING}


def model_config(model_cfg: ml_collections.ConfigDict):
  """`config.model` → the model's frozen hyper-parameter dataclass."""
  fields = dict(model_cfg)
  name = fields.pop("name", None)
  if name not in MODELS:
    raise UserError(
        f"config.model.name={name!r} is not a known model. Choose one of {sorted(MODELS)} "
        f"(e.g. --config.model.name=transformer), or load a config file that sets it.")
  cls, _ = MODELS[name]
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise UserError(
        f"config.model has field(s) {unknown} that model {name!r} does not take. "
        f"Its fields are {sorted(known)}: remove or rename the others in the config file.")
  missing = sorted(f.name for f in dataclasses.fields(cls)
                   if f.name not in fields and f.default is dataclasses.MISSING)
  if missing:
    raise UserError(f"config.model is missing {missing}, which model {name!r} needs: "
                    f"set them in the config file.")
  return cls(**fields)


def _construct(model_cfg: ml_collections.ConfigDict, seed: int) -> nnx.Module:
  hparams = model_config(model_cfg)
  return MODELS[model_cfg.name][1](hparams, rngs=nnx.Rngs(seed))


def build(model_cfg: ml_collections.ConfigDict, seed: int) -> tuple[nnx.GraphDef, dict]:
  """Builds the model; returns its graph definition and its parameters as a pure dict."""
  graphdef, params = nnx.split(_construct(model_cfg, seed), nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def abstract(model_cfg: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, dict]:
  """Like `build`, but parameters are shape/dtype structs and nothing is allocated."""
  graphdef, params = nnx.split(nnx.eval_shape(lambda: _construct(model_cfg, 0)), nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def init_params(model_cfg: ml_collections.ConfigDict, seed: int) -> dict:
  """Fresh parameters; traceable, so `jax.jit` can place them straight onto a mesh."""
  return build(model_cfg, seed)[1]


def apply_fn(graphdef: nnx.GraphDef) -> Callable[[Any, jax.Array], jax.Array]:
  """`(params, tokens) -> logits`, a pure function of its arguments."""
  return lambda params, tokens: nnx.merge(graphdef, params)(tokens)


def stream_fns(graphdef: nnx.GraphDef) -> tuple[Callable, Callable]:
  """`(init_state(params, batch, cache_len), stream(params, tokens, state, lookahead))`: the
  models' common streaming interface as pure functions (generation carries state with it)."""
  init = lambda params, batch, cache_len: nnx.merge(graphdef, params).init_state(batch, cache_len)
  stream = lambda params, tokens, state, lookahead=None: nnx.merge(graphdef, params).stream(
      tokens, state, lookahead)
  return init, stream


def stream_chunk(hparams) -> int:
  """`stream` takes segments of a multiple of this many tokens (1: any length)."""
  return getattr(hparams, "chunk_size", 1)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
