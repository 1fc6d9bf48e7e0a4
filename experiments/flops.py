"""FLOPs of a JAX function counted through its loops.

XLA's cost analysis (`compiled.cost_analysis()["flops"]`) counts a while loop's body once, so
a scanned chunk loop of n chunks (HOPE, Titans) is undercounted about n-fold. This counts the
traced program instead: each `scan` body times its length, each counted `while` loop (what
`fori_loop` with static bounds becomes) times its trip count, each `cond` as its costliest
branch, and the inner programs of `jit`, `remat`, `custom_jvp` / `custom_vjp` calls once per
use (a rematerialised forward appears again inside the backward pass, and is counted there).

What is counted, per primitive, as XLA counts it: `dot_general` 2·M·N·K (over batch
dimensions too); `conv_general_dilated` 2 per multiply-add; elementwise arithmetic,
comparisons and transcendentals one per output element; reductions one per input element.
Data movement (reshape, transpose, slicing, gather/scatter, broadcast, convert, select) is free.

As a command, the train step of each model's preset, counted from shapes alone (traced, not
compiled, nothing allocated), per step and per token, against the first model's:

  python -m experiments.flops --preset=small --models=transformer,titans,hope,hope_attention
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
from jax.extend import core

# One FLOP per output element.
ELEMENTWISE = frozenset("""
    add sub mul div rem neg abs sign max min pow integer_pow square sqrt rsqrt cbrt exp exp2
    expm1 log log1p tanh logistic sin cos tan asin acos atan atan2 sinh cosh asinh acosh atanh
    erf erfc erf_inv lgamma digamma floor ceil round nextafter eq ne lt le gt ge
    and or xor not clamp add_any
""".split())
# One FLOP per input element.
REDUCTIONS = frozenset("""
    reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin
    cumsum cummax cummin cumprod cumlogsumexp
""".split())


class UncountedLoop(ValueError):
  """A while loop whose trip count is not known before it runs."""


def count(fn: Callable, *args, **kwargs) -> float:
  """FLOPs of one call `fn(*args, **kwargs)` (arrays or ShapeDtypeStructs), loops counted."""
  return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def jaxpr_flops(jaxpr: core.Jaxpr) -> float:
  return float(sum(_eqn_flops(eqn) for eqn in jaxpr.eqns))


def _size(var) -> int:
  return math.prod(getattr(var.aval, "shape", ()))


def _inner(value: Any) -> core.Jaxpr | None:
  if isinstance(value, core.ClosedJaxpr):
    return value.jaxpr
  return value if isinstance(value, core.Jaxpr) else None


def _eqn_flops(eqn) -> float:
  name, params = eqn.primitive.name, eqn.params
  if name == "scan":
    return params["length"] * jaxpr_flops(params["jaxpr"].jaxpr)
  if name == "while":
    trips = trip_count(eqn)
    return trips * (jaxpr_flops(params["body_jaxpr"].jaxpr)
                    + jaxpr_flops(params["cond_jaxpr"].jaxpr))
  if name == "cond":
    return max(jaxpr_flops(branch.jaxpr) for branch in params["branches"])
  inner = [j for j in map(_inner, params.values()) if j is not None]
  if inner:   # jit (pjit), remat, custom_jvp_call, custom_vjp_call, ...
    return sum(jaxpr_flops(j) for j in inner)
  if name == "dot_general":
    (contract, _), (batch, _) = params["dimension_numbers"]
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    k = math.prod(lhs[d] for d in contract)
    return 2.0 * _size(eqn.outvars[0]) * k
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    spec = params["dimension_numbers"].rhs_spec   # (out features, in features, *window)
    per_output = math.prod(rhs) // rhs[spec[0]]
    return 2.0 * _size(eqn.outvars[0]) * per_output
  if name in ELEMENTWISE:
    return float(_size(eqn.outvars[0]))
  if name in REDUCTIONS:
    return float(_size(eqn.invars[0]))
  return 0.0


def trip_count(eqn) -> int:
  """Iterations of a `while` loop of `fori_loop`'s form: `i < stop` with i starting at a
  literal and stepped by one in the body, stop a literal (in the condition or the carry);
  any other loop is an UncountedLoop."""
  params = eqn.params
  cond, body = params["cond_jaxpr"].jaxpr, params["body_jaxpr"].jaxpr
  inits = eqn.invars[params["cond_nconsts"] + params["body_nconsts"]:]
  carry = cond.invars[params["cond_nconsts"]:]
  literal = lambda v: (int(v.val) if isinstance(v, core.Literal) else
                       int(inits[carry.index(v)].val) if v in carry
                       and isinstance(inits[carry.index(v)], core.Literal) else None)
  if len(cond.eqns) == 1 and cond.eqns[0].primitive.name == "lt":
    counter, stop = cond.eqns[0].invars
    if counter in carry and literal(counter) is not None and literal(stop) is not None:
      position = carry.index(counter)
      if _steps_by_one(body, body.invars[params["body_nconsts"] + position],
                       body.outvars[position]):
        return max(literal(stop) - literal(counter), 0)
  raise UncountedLoop("a while loop whose trip count is not a literal bound (a data-dependent "
                      "loop): its FLOPs cannot be counted before it runs.")


def _steps_by_one(body: core.Jaxpr, counter_in, counter_out) -> bool:
  for eqn in body.eqns:
    if eqn.outvars[0] is counter_out and eqn.primitive.name == "add":
      a, b = eqn.invars
      other = b if a is counter_in else a if b is counter_in else None
      return isinstance(other, core.Literal) and int(other.val) == 1
  return False


def train_step(config) -> dict[str, float]:
  """FLOPs of one train step of `config` (at its batch, mesh and grad_accum) and per token."""
  from experiments import state as state_lib, train  # pylint: disable=g-import-not-at-top
  exp = state_lib.build(config)
  batch = jax.ShapeDtypeStruct((config.train.batch_size, config.train.seq_len + 1), "int32")
  step = count(train.jit_train_step(exp), state_lib.abstract_state(exp), batch)
  return {"step": step, "per_token": step / state_lib.tokens_per_step(config)}


def main(argv: list[str]) -> None:
  import argparse  # pylint: disable=g-import-not-at-top
  from experiments.sweep import load_config  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="FLOPs of each model's train step, counted.")
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--models", default="transformer,titans,hope,hope_attention")
  args = parser.parse_args(argv[1:])
  models = args.models.split(",")
  print(f"| model | preset | batch × context | FLOPs / step | FLOPs / token | × {models[0]} |")
  print("|---|---|---|---:|---:|---:|")
  first = None
  for model in models:
    config = load_config(f"configs/{model}.py:{args.preset}")
    counted = train_step(config)
    first = first or counted["per_token"]
    print(f"| {model} | {args.preset} | {config.train.batch_size} × {config.train.seq_len} | "
          f"{counted['step'] / 1e9:,.2f} G | {counted['per_token'] / 1e6:,.2f} M | "
          f"{counted['per_token'] / first:.2f}× |", flush=True)

if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  main(sys.argv)
