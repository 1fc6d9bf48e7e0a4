"""The exact-tier encoder as a traceable jnp function, so a weight can be re-encoded on the
device inside a jitted step (compressed slow levels during training, experiments/compress.py).

It makes the same choices as the numpy reference (codecs.encode_exact): the same base per
block and column (the window holding most exponents, ties to the smallest), the same planes,
the same escapes in the same order. One difference is forced by static shapes: the escape
list has a fixed `capacity`, padded with the index rows * cols, which lies past the tensor
(decoders drop it). The number of real escapes comes back beside the tensor; more than
`capacity` means the tensor did not fit and must not be used (those weights would decode
to +0), so the caller checks it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from compression import codecs

U32 = jnp.uint32


def _pack(values: jax.Array, width: int, block: int) -> jax.Array:
  """codecs.pack in jnp: fields are disjoint bit ranges, so their sum is their OR."""
  rows, cols = values.shape
  fields = 32 // width
  v = values.astype(U32).reshape(rows // block, fields, block // fields, cols)
  shifts = (jnp.arange(fields, dtype=U32) * U32(width)).reshape(1, fields, 1, 1)
  return (v << shifts).sum(axis=1, dtype=U32).reshape(rows // fields, cols)


def _pack_meta(values: jax.Array, width: int) -> jax.Array:
  fields = 32 // width
  nb = values.shape[0]
  padded = jnp.pad(values.astype(U32), ((0, codecs.padded_rows(nb, fields) - nb), (0, 0)))
  return _pack(padded, width, fields)


def _bases(exponent: jax.Array, rows: int, block: int, exp_bits: int) -> jax.Array:
  """codecs.choose_bases in jnp: per-(block, column) exponent histograms by scatter-add."""
  rows_p, cols = exponent.shape
  nbins = 1 << exp_bits
  e = jnp.where((jnp.arange(rows_p) < rows)[:, None], exponent.astype(jnp.int32), nbins)
  block_of = jnp.broadcast_to((jnp.arange(rows_p) // block)[:, None], e.shape)
  col_of = jnp.broadcast_to(jnp.arange(cols)[None, :], e.shape)
  counts = jnp.zeros((rows_p // block, cols, nbins + 1), jnp.int32).at[block_of, col_of, e].add(1)
  cum = jnp.cumsum(counts[..., :nbins], axis=-1)
  cum = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum], axis=-1)
  in_window = cum[..., codecs.WINDOW:] - cum[..., :-codecs.WINDOW]
  return jnp.argmax(in_window, axis=-1).astype(U32)          # first maximum: the smallest b


def encode_exact(x: jax.Array, capacity: int, block: int | None = None):
  """(ExactTensor with `capacity` escape slots, number of escapes) for a float array `x`."""
  dtype = jnp.dtype(x.dtype)
  e_bits, m_bits = codecs.float_format(dtype)
  widths = codecs.plane_widths(dtype)
  rows, cols = codecs.matrix_shape(x.shape)
  block = codecs.default_exact_block(dtype, rows) if block is None else block
  codecs.check_block(block, widths)
  rows_p = codecs.padded_rows(rows, block)
  raw = lax.bitcast_convert_type(x.reshape(rows, cols), codecs.uint_dtype(dtype)).astype(U32)
  bits = jnp.zeros((rows_p, cols), U32).at[:rows].set(raw)
  exponent = (bits >> U32(m_bits)) & U32((1 << e_bits) - 1)
  bases = _bases(exponent, rows, block, e_bits)
  base = jnp.repeat(bases, block, axis=0)
  valid = (jnp.arange(rows_p) < rows)[:, None]
  in_window = (exponent >= base) & (exponent < base + U32(codecs.WINDOW)) & valid

  low = m_bits - codecs.HI_MANTISSA_BITS
  mantissa = bits & U32((1 << m_bits) - 1)
  code = jnp.where(in_window, exponent - base, U32(codecs.ESCAPE))
  hi = jnp.where(in_window, (bits >> U32(e_bits + m_bits)) << U32(7) | mantissa >> U32(low), 0)
  planes = [_pack(code, codecs.CODE_BITS, block), _pack(hi, 8, block)]
  shift = low
  for w in codecs.lo_widths(dtype):
    shift -= w
    lo = jnp.where(in_window, (mantissa >> U32(shift)) & U32((1 << w) - 1), 0)
    planes.append(_pack(lo, w, block))

  escaped = ~in_window[:rows].reshape(-1)
  index = jnp.nonzero(escaped, size=capacity, fill_value=rows * cols)[0]
  escape_bits = jnp.where(index < rows * cols, raw.reshape(-1)[jnp.minimum(index, rows * cols - 1)],
                          0).astype(codecs.uint_dtype(dtype))
  tensor = codecs.ExactTensor(
      bases=_pack_meta(bases, 8), planes=tuple(planes), escape_index=index.astype(U32),
      escape_bits=escape_bits, shape=tuple(x.shape), dtype=dtype.name, block=block)
  return tensor, escaped.sum(dtype=jnp.int32)
