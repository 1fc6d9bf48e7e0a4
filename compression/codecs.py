"""Reference codecs in numpy: the ground truth every kernel is tested against.

Every tensor is viewed as a matrix [rows, cols]: rank >= 2 as [prod(shape[:-1]), shape[-1]]
(for a kernel stored [in, out] the rows are the reduction dim), rank <= 1 as a column
[size, 1], so that a vector is grouped along its length rather than one element per group.
Rows are padded to a multiple of the block; padded entries decode to +0 and are dropped.

**Exact tier** (bit-exact for bfloat16, float16, float32). Rows are cut into blocks of
`block` rows per column; each block has a base exponent b (uint8) chosen as the 15-exponent
window [b, b + 14] that holds the most of the block's exponents. Per element:
  code plane  4 bits: exponent - b in 0..14, or 15 = escape;
  hi plane    8 bits: sign << 7 | the top 7 mantissa bits;
  lo planes   the remaining M - 7 mantissa bits (bf16: none; fp16: 3 bits as a 2-bit and a
              1-bit plane; fp32: one 16-bit plane).
Anything outside the window (zeros and subnormals under a normal-valued window, inf/NaN
under a finite one, far outliers) is an escape: its flat index (uint32) and raw bits are kept
in a sparse list. Decoding is integer ops only:
  bits = (hi >> 7) << (E + M) | (b + code) << M | (hi & 0x7F) << L | lo
then a same-width bitcast; escapes are written over the result (a scatter).
Cost for bf16: 12 bits + 8 / block for the base + 48 bits per escape.

**Int4 tier** (lossy). Groups of `group` rows per column share one bfloat16 scale
s = max(max / 7, -min / 8) (symmetric, but a group whose peak is negative uses code -8);
q = clip(rint(x / s), -8, 7) with s the stored (rounded) scale. Rounding s to bfloat16 moves
x / s by at most 8 * 2**-8, so rint already lands in [-8, 7] and |x - q s| <= s / 2 (a group
whose scale is under bfloat16's smallest subnormal flushes to 0). Decoding is (q * s in
float32) cast to the tensor's dtype; q * s is exact in float32. Cost: 4 bits + 16 / group
(4.125 at group 128).

**Packing.** A plane of w-bit fields (w in 1, 2, 4, 8, 16) is stored as uint32 words,
F = 32 / w fields per word. Within each block of G rows, the plane has R = G / F word rows and
field s of word row r holds block row s * R + r ("slab packing"): unpacking field s of a
slab of word rows yields a contiguous run of rows, so a kernel never interleaves. Per-block
metadata (base exponents, scales) uses the same packing with G = F: word row i holds blocks
F * i .. F * i + F - 1 of each column.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_dtypes
import numpy as np

from nested.errors import UserError

# dtype name -> (exponent bits E, mantissa bits M)
FLOAT_FORMATS = {"bfloat16": (8, 7), "float16": (5, 10), "float32": (8, 23)}
HI_MANTISSA_BITS = 7            # mantissa bits that share the byte plane with the sign
WINDOW = 15                     # exponents per window; code WINDOW marks an escape
ESCAPE = WINDOW
CODE_BITS = 4
# Exact-tier block (rows per base exponent). fp16 uses 512 so that its 1-bit plane still
# gives 16-row slabs, the smallest K a GPU dot accepts.
DEFAULT_EXACT_BLOCK = {"bfloat16": 256, "float16": 512, "float32": 256}
# Blocks are fitted to a tensor's rows (default_exact_block, default_int4_group), down to
# 8-row slabs of the 4-bit plane (a TPU sublane tile: 64 rows). The GPU fused matmul wants
# 16-row slabs: blocks >= 128.
MIN_SLAB_ROWS = 8
DEFAULT_INT4_GROUP = 128
SCALE_DTYPE = ml_dtypes.bfloat16


def float_format(dtype) -> tuple[int, int]:
  name = np.dtype(dtype).name
  if name not in FLOAT_FORMATS:
    raise UserError(f"compression supports {sorted(FLOAT_FORMATS)}, got dtype {name}; "
                    "cast the tensor to one of them first.")
  return FLOAT_FORMATS[name]


def uint_dtype(dtype) -> np.dtype:
  return np.dtype(f"uint{np.dtype(dtype).itemsize * 8}")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  if len(shape) <= 1:
    return math.prod(shape), 1
  return math.prod(shape[:-1]), shape[-1]


def padded_rows(rows: int, block: int) -> int:
  return -(-rows // block) * block


def lo_widths(dtype) -> tuple[int, ...]:
  """Widths of the low-mantissa planes: M - 7 bits split into powers of two, widest first."""
  _, m = float_format(dtype)
  rest, widths = m - HI_MANTISSA_BITS, []
  for w in (16, 8, 4, 2, 1):
    if rest >= w:
      widths.append(w)
      rest -= w
  return tuple(widths)


def plane_widths(dtype) -> tuple[int, ...]:
  return (CODE_BITS, 8) + lo_widths(dtype)


def _fitted_block(rows: int, smallest: int, largest: int, payload_bits: int,
                  meta_bits: int) -> int:
  """The power-of-two block in [smallest, largest] that costs the fewest bits per column
  (padding rows + per-block metadata): 384 rows take blocks of 128, not 256 (padded to 512)."""
  sizes = [smallest << i for i in range((largest // smallest).bit_length())]
  return min(sizes, key=lambda b: (padded_rows(max(rows, 1), b) * (payload_bits + meta_bits / b),
                                   -b))


def default_exact_block(dtype, rows: int) -> int:
  """Rows per base exponent for a tensor of `rows` rows: at most DEFAULT_EXACT_BLOCK, and no
  slab under MIN_SLAB_ROWS rows."""
  widths = plane_widths(dtype)
  return _fitted_block(rows, MIN_SLAB_ROWS * 32 // min(widths),
                       DEFAULT_EXACT_BLOCK[np.dtype(dtype).name], sum(widths), 8)


def default_int4_group(rows: int) -> int:
  """Rows per int4 scale: at most DEFAULT_INT4_GROUP, fitted to the rows like the exact tier."""
  return _fitted_block(rows, MIN_SLAB_ROWS * 32 // CODE_BITS, DEFAULT_INT4_GROUP, CODE_BITS, 16)


def check_block(block: int, widths: tuple[int, ...]) -> None:
  """Each plane needs whole word rows per block: block % (32 / w) == 0 for every width."""
  need = max(32 // w for w in widths)
  if block <= 0 or block % need:
    raise UserError(f"block/group size {block} must be a positive multiple of {need} "
                    f"for plane widths {widths}.")


# ----------------------------------------------------------------------------- packing


def pack(values: np.ndarray, width: int, block: int) -> np.ndarray:
  """[rows, cols] fields < 2**width -> uint32 [rows * width / 32, cols], slab-packed per block."""
  rows, cols = values.shape
  fields = 32 // width
  v = values.astype(np.uint32).reshape(rows // block, fields, block // fields, cols)
  shifts = (np.arange(fields, dtype=np.uint32) * width).reshape(1, fields, 1, 1)
  return np.bitwise_or.reduce(v << shifts, axis=1).reshape(rows // fields, cols)


def unpack(words: np.ndarray, width: int, block: int) -> np.ndarray:
  """Inverse of `pack`: uint32 [rows * width / 32, cols] -> uint32 [rows, cols]."""
  wrows, cols = words.shape
  fields = 32 // width
  w = words.astype(np.uint32).reshape(wrows * fields // block, 1, block // fields, cols)
  shifts = (np.arange(fields, dtype=np.uint32) * width).reshape(1, fields, 1, 1)
  return ((w >> shifts) & np.uint32((1 << width) - 1)).reshape(wrows * fields, cols)


def pack_meta(values: np.ndarray, width: int) -> np.ndarray:
  """Per-block metadata [nb, cols] -> uint32 [ceil(nb * width / 32), cols], consecutive blocks."""
  fields = 32 // width
  nb, cols = values.shape
  padded = np.zeros((padded_rows(nb, fields), cols), np.uint32)
  padded[:nb] = values
  return pack(padded, width, fields)


def unpack_meta(words: np.ndarray, width: int, nb: int) -> np.ndarray:
  return unpack(words, width, 32 // width)[:nb]


# ----------------------------------------------------------------------------- containers


@dataclasses.dataclass(frozen=True, eq=False)
class ExactTensor:
  """Exact-tier tensor. Arrays may be numpy (host) or jax (device) arrays."""
  bases: np.ndarray          # uint32 [ceil(nb / 4), cols]: byte j of row i = base of block 4i+j
  planes: tuple              # uint32 [rows_p * w / 32, cols] for w in plane_widths(dtype)
  escape_index: np.ndarray   # uint32 [n]: ascending flat indices into the [rows, cols] view
  escape_bits: np.ndarray    # uint16/uint32 [n]: raw bits of the escaped values
  shape: tuple
  dtype: str
  block: int

  codec = "exact"

  @property
  def nbytes(self) -> int:
    from compression import format as fmt  # the format module owns the byte layout
    return fmt.nbytes(self)


@dataclasses.dataclass(frozen=True, eq=False)
class Int4Tensor:
  """Lossy int4 tensor. Arrays may be numpy (host) or jax (device) arrays."""
  scales: np.ndarray   # uint32 [ceil(nb / 2), cols]: half j of row i = bf16 scale of group 2i+j
  codes: np.ndarray    # uint32 [rows_p / 8, cols]: two's-complement int4, slab-packed per group
  shape: tuple
  dtype: str
  group: int

  codec = "int4"

  @property
  def nbytes(self) -> int:
    from compression import format as fmt
    return fmt.nbytes(self)


jax.tree_util.register_dataclass(
    ExactTensor, data_fields=["bases", "planes", "escape_index", "escape_bits"],
    meta_fields=["shape", "dtype", "block"])
jax.tree_util.register_dataclass(
    Int4Tensor, data_fields=["scales", "codes"], meta_fields=["shape", "dtype", "group"])


# ----------------------------------------------------------------------------- exact tier


def choose_bases(exponents: np.ndarray, valid_rows: int, block: int, exp_bits: int) -> np.ndarray:
  """Per (block, column): the base b whose window [b, b + 14] holds the most exponents.

  exponents: [rows_p, cols]; rows >= valid_rows are padding and are not counted.
  Returns uint8 [rows_p / block, cols]; ties go to the smallest b.
  """
  rows_p, cols = exponents.shape
  nbins = 1 << exp_bits
  bases = np.zeros((rows_p // block, cols), np.uint8)
  col_offset = np.arange(cols, dtype=np.int64) * (nbins + 1)
  for i in range(rows_p // block):
    e = exponents[i * block:(i + 1) * block].astype(np.int64)
    e[max(0, valid_rows - i * block):] = nbins      # padding falls in a bin nobody reads
    counts = np.bincount((e + col_offset).ravel(), minlength=cols * (nbins + 1))
    counts = counts.reshape(cols, nbins + 1)[:, :nbins]
    cum = np.concatenate([np.zeros((cols, 1), np.int64), np.cumsum(counts, axis=1)], axis=1)
    in_window = cum[:, WINDOW:] - cum[:, :-WINDOW]
    bases[i] = np.argmax(in_window, axis=1)
  return bases


def encode_exact(x, block: int | None = None) -> ExactTensor:
  x = np.asarray(x)
  e_bits, m_bits = float_format(x.dtype)
  widths = plane_widths(x.dtype)
  block = default_exact_block(x.dtype, matrix_shape(x.shape)[0]) if block is None else block
  check_block(block, widths)
  rows, cols = matrix_shape(x.shape)
  if rows * cols >= 2**32:
    raise UserError(f"tensor of {rows * cols} elements is too large for uint32 escape "
                    "indices; split it into tensors of fewer than 2**32 elements.")
  rows_p = padded_rows(rows, block)
  bits = np.zeros((rows_p, cols), np.uint32)
  bits[:rows] = x.reshape(rows, cols).view(uint_dtype(x.dtype))
  exponent = (bits >> m_bits) & np.uint32((1 << e_bits) - 1)
  bases = choose_bases(exponent, rows, block, e_bits)
  base = np.repeat(bases.astype(np.uint32), block, axis=0)
  valid = (np.arange(rows_p) < rows)[:, None]
  in_window = (exponent >= base) & (exponent < base + WINDOW) & valid

  low = m_bits - HI_MANTISSA_BITS
  mantissa = bits & np.uint32((1 << m_bits) - 1)
  code = np.where(in_window, exponent - base, ESCAPE)
  hi = np.where(in_window, (bits >> (e_bits + m_bits)) << 7 | mantissa >> low, 0)
  planes = [pack(code, CODE_BITS, block), pack(hi, 8, block)]
  shift = low
  for w in lo_widths(x.dtype):
    shift -= w
    lo = np.where(in_window, (mantissa >> shift) & np.uint32((1 << w) - 1), 0)
    planes.append(pack(lo, w, block))

  escape_index = np.flatnonzero(~in_window[:rows]).astype(np.uint32)
  escape_bits = bits[:rows].ravel()[escape_index].astype(uint_dtype(x.dtype))
  return ExactTensor(bases=pack_meta(bases, 8), planes=tuple(planes),
                     escape_index=escape_index, escape_bits=escape_bits,
                     shape=tuple(x.shape), dtype=x.dtype.name, block=block)


def exact_bits(t: ExactTensor) -> np.ndarray:
  """Reconstructed raw bits as uint32 [rows, cols] (before the final bitcast)."""
  e_bits, m_bits = float_format(t.dtype)
  rows, cols = matrix_shape(t.shape)
  rows_p = padded_rows(rows, t.block)
  planes = [np.asarray(p) for p in t.planes]
  code = unpack(planes[0], CODE_BITS, t.block)
  hi = unpack(planes[1], 8, t.block)
  lo = np.zeros_like(code)
  for w, p in zip(lo_widths(t.dtype), planes[2:]):
    lo = lo << w | unpack(p, w, t.block)
  base = np.repeat(unpack_meta(np.asarray(t.bases), 8, rows_p // t.block), t.block, axis=0)
  low = m_bits - HI_MANTISSA_BITS
  exponent = (base + code) & np.uint32((1 << e_bits) - 1)
  bits = ((hi >> 7) & 1) << (e_bits + m_bits) | exponent << m_bits | (hi & 0x7F) << low | lo
  bits = np.where(code == ESCAPE, 0, bits)[:rows].ravel()
  bits[np.asarray(t.escape_index)] = np.asarray(t.escape_bits)
  return bits.reshape(rows, cols)


def decode_exact(t: ExactTensor) -> np.ndarray:
  dtype = np.dtype(t.dtype)
  return exact_bits(t).astype(uint_dtype(dtype)).view(dtype).reshape(t.shape)


# ----------------------------------------------------------------------------- int4 tier


def scale_values(bits: np.ndarray) -> np.ndarray:
  return bits.astype(np.uint16).view(SCALE_DTYPE).astype(np.float32)


def encode_int4(x, group: int | None = None) -> Int4Tensor:
  x = np.asarray(x)
  float_format(x.dtype)
  group = default_int4_group(matrix_shape(x.shape)[0]) if group is None else group
  check_block(group, (CODE_BITS, 16))
  if not np.all(np.isfinite(x)):
    raise UserError("the int4 codec cannot represent inf or NaN; use codec='exact' for "
                    "tensors with non-finite values.")
  rows, cols = matrix_shape(x.shape)
  rows_p = padded_rows(rows, group)
  v = np.zeros((rows_p, cols), np.float64)
  v[:rows] = x.reshape(rows, cols)
  g = v.reshape(rows_p // group, group, cols)
  scale = np.maximum(g.max(axis=1) / 7, -g.min(axis=1) / 8)
  scale_bits = scale.astype(np.float32).astype(SCALE_DTYPE).view(np.uint16)
  if not np.all(np.isfinite(scale_values(scale_bits))):
    raise UserError("int4 scale overflows bfloat16; the tensor is too large for codec='int4'.")
  s = scale_values(scale_bits).astype(np.float64)[:, None, :]
  q = np.where(s > 0, np.rint(g / np.where(s > 0, s, 1)), 0)
  q = np.clip(q, -8, 7).astype(np.int64).reshape(rows_p, cols)
  return Int4Tensor(scales=pack_meta(scale_bits, 16), codes=pack(q & 0xF, CODE_BITS, group),
                    shape=tuple(x.shape), dtype=x.dtype.name, group=group)


def int4_values(t: Int4Tensor) -> tuple[np.ndarray, np.ndarray]:
  """(q as int32 [rows_p, cols], scale as float32 [rows_p / group, cols])."""
  rows, _ = matrix_shape(t.shape)
  nb = padded_rows(rows, t.group) // t.group
  nibbles = unpack(np.asarray(t.codes), CODE_BITS, t.group).astype(np.int32)
  q = (nibbles ^ 8) - 8
  return q, scale_values(unpack_meta(np.asarray(t.scales), 16, nb))


def decode_int4(t: Int4Tensor) -> np.ndarray:
  rows, cols = matrix_shape(t.shape)
  q, scale = int4_values(t)
  v = q.astype(np.float32) * np.repeat(scale, t.group, axis=0)
  return v[:rows].astype(np.dtype(t.dtype)).reshape(t.shape)


# ----------------------------------------------------------------------------- dispatch


def encode(x, codec: str, *, block: int | None = None):
  """Compresses `x` with codec "exact" or "int4"; `block` overrides the block / group size."""
  if codec == "exact":
    return encode_exact(x, block)
  if codec == "int4":
    return encode_int4(x, block)
  raise UserError(f"unknown codec {codec!r}; use 'exact' or 'int4'.")


def decode(t) -> np.ndarray:
  """Reference decoder: the array `encode` was given (exact) or its int4 approximation."""
  if isinstance(t, ExactTensor):
    return decode_exact(t)
  if isinstance(t, Int4Tensor):
    return decode_int4(t)
  raise TypeError(f"not a compressed tensor: {type(t).__name__}")


def bits_per_weight(t) -> float:
  return 8 * t.nbytes / max(1, math.prod(t.shape))


def escape_rate(t) -> float:
  if not isinstance(t, ExactTensor):
    return 0.0
  return len(t.escape_index) / max(1, math.prod(t.shape))
