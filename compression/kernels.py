"""Pallas kernels for JIT-Delta: decode to a dense matrix, and decode fused into `x @ W`.

Each family has a pure-jnp reference next to it (`*_reference`), usable under jit on any
backend; the kernels are tested against it and against the numpy codecs.

Layout reminders (see codecs.py): W is viewed as [rows, cols] = [K, N] for `x @ W`; planes
are uint32 words, slab-packed per block of G rows, so field s of a run of word rows is a run
of consecutive matrix rows. A kernel tile holds m = bk / G blocks; it is decoded in
*sub-slabs* of S = G * min(width) / 32 rows (16 or 32 rows with the default blocks), each
read with static ref slices, a shift and a mask on uint32: no interleaving, no concatenate.
The fused kernel multiplies each sub-slab by the matching S columns of x (x is passed as
[K / S, B, S] so that those columns are a leading-axis index), accumulating in float32.

Escapes: the kernels write +0 where the code is 15; the wrapper applies the sparse
corrections after the kernel: a scatter of the raw bits for the dense decode (bit-exact),
and y[:, c] += x[:, r] * v for the fused matmul (same math as the dot, other order).
The exact decode kernel emits unsigned bits; the same-width bitcast to the float type comes
after the scatter, so no value ever passes through a float op (on CPU, XLA's bfloat16
handling inside interpret mode quiets NaN payloads; the bits path is exact everywhere).

Backends: on CPU the kernels run with `interpret=True` (the default there). On TPU the
reduction over K is the last grid axis ("arbitrary"). On GPU the default is Pallas' Mosaic GPU
backend (Hopper), in kernels_mosaic_gpu.py: the same tile decoding, fed to wgmma for the fused
matmul. `gpu_backend="triton"` keeps the Triton form (deprecated in JAX from 0.11), which loops
over K inside each program because its grid programs run concurrently. Neither GPU nor TPU has
been run here; see `lowering_check` for what is verified without hardware.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from compression import codecs

U32 = jnp.uint32


# ----------------------------------------------------------------------------- helpers


def _platform(backend: str | None, interpret: bool | None) -> tuple[str, bool]:
  """(backend the kernel is built for, interpret): interpret by default only on CPU."""
  backend = jax.default_backend() if backend is None else backend
  return backend, (backend == "cpu") if interpret is None else interpret


def _div(a, b: int):
  """a // b for non-negative traced ints, without the sign fix-ups of jnp's floor division
  (which the TPU and Triton lowerings reject or would pay for)."""
  return a if b == 1 else lax.div(a, jnp.int32(b))


def _rem(a, b: int):
  return lax.rem(a, jnp.int32(b))


def _mask(width: int):
  return U32((1 << width) - 1)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _lane_block(n: int, block_n: int, gpu: bool) -> int:
  """Column tile: block_n, or the whole width when narrower (a power of two for Triton)."""
  if n >= block_n:
    return block_n
  return _next_pow2(n) if gpu else n


def _row_tile(nb: int, block: int, block_k: int) -> int:
  """Blocks per row tile: the largest power of two <= block_k / block that divides nb."""
  m = _next_pow2(max(1, block_k // block) + 1) // 2
  while m > 1 and nb % m:
    m //= 2
  return m


GPU_BACKENDS = ("mosaic", "triton")


def _use_mosaic_gpu(backend: str, gpu_backend: str) -> bool:
  if gpu_backend not in GPU_BACKENDS:
    raise ValueError(f"gpu_backend must be one of {GPU_BACKENDS}, got {gpu_backend!r}")
  return backend == "gpu" and gpu_backend == "mosaic"


def _backend_params(backend: str, interpret: bool, semantics: tuple[str, ...]):
  if interpret:
    return None
  if backend == "gpu":
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=4, num_stages=2)
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=semantics)
  return None


def _meta_3d(words: jax.Array) -> jax.Array:
  """[n, cols] -> [n, 1, cols]: a (1, bn) block is then legal on every backend."""
  return words.reshape(words.shape[0], 1, words.shape[1])


def _uint_like(dtype):
  return jnp.dtype(f"uint{8 * jnp.dtype(dtype).itemsize}")


def _bitcast_to(bits: jax.Array, dtype) -> jax.Array:
  """uint32 bits -> dtype by truncation to its width and a same-width bitcast."""
  dtype = jnp.dtype(dtype)
  if dtype.itemsize == 4:
    return lax.bitcast_convert_type(bits, dtype)
  return lax.bitcast_convert_type(bits.astype(_uint_like(dtype)), dtype)


# ----------------------------------------------------------------------------- tile decoding


def _no_layout(value, kind):
  del kind
  return value


class _Tile(NamedTuple):
  """Where a row tile of m blocks sits: static geometry plus the traced tile indices.

  `local` is the tile's index relative to the start of the refs (0 when the BlockSpec
  already offsets them, the K-loop index when a ref spans all of K); `first_block` is the
  global index of the tile's first block and `meta_row0` the first metadata word row held
  by the metadata ref. `layout(value, kind)` pins the register layout of a freshly loaded
  "tile" ([rows, cols]) or "row" ([cols]) value: Mosaic GPU picks layouts at loads and
  broadcasts, the other backends need no hint.
  """
  block: int
  m: int
  local: Any
  first_block: Any
  meta_row0: Any
  layout: Callable[[Any, str], Any] = _no_layout


def _field(ref, width: int, tile: _Tile, row: int, rows: int):
  """w-bit fields of `rows` consecutive tile rows starting at static `row` -> uint32."""
  fields = 32 // width
  words_per_block = tile.block // fields
  group, in_block = divmod(row, tile.block)
  s, r = divmod(in_block, words_per_block)
  start = tile.local * (tile.m * words_per_block) + group * words_per_block + r
  words = tile.layout(ref[pl.ds(start, rows), :], "tile")
  return (words >> U32(width * s)) & _mask(width)


def _meta(ref, width: int, tile: _Tile, group: int, rows: int):
  """The `width`-bit metadata field of block `group` of the tile, as uint32 [rows, bn].

  The ref is [n, 1, bn] (one row is [1, bn]) or [n, bn] (one row is [bn]); the field is
  cut from the one row and then broadcast, explicitly, as Mosaic GPU requires.
  """
  fields = 32 // width
  global_block = tile.first_block + group
  word = tile.layout(ref[_div(global_block, fields) - tile.meta_row0], "row")
  shift = (_rem(global_block, fields) * width).astype(U32)
  field = (word >> shift) & _mask(width)
  return tile.layout(jnp.broadcast_to(field, (rows, field.shape[-1])), "tile")


def _exact_bits(refs, widths, dtype, tile: _Tile, row: int, rows: int):
  """Raw bits (uint32) of tile rows [row, row + rows) of an exact-tier tile."""
  base_ref, code_ref, hi_ref, *lo_refs = refs
  e_bits, m_bits = codecs.float_format(dtype)
  low = m_bits - codecs.HI_MANTISSA_BITS
  code = _field(code_ref, codecs.CODE_BITS, tile, row, rows)
  hi = _field(hi_ref, 8, tile, row, rows)
  lo = jnp.zeros_like(code)
  for w, ref in zip(widths[2:], lo_refs):
    lo = ((lo << U32(w)) & _mask(low)) | _field(ref, w, tile, row, rows)
  base = _meta(base_ref, 8, tile, row // tile.block, rows)
  exponent = (base + code) & _mask(e_bits)
  bits = (((hi >> U32(7)) & U32(1)) << U32(e_bits + m_bits)) | (exponent << U32(m_bits))
  bits = bits | ((hi & U32(0x7F)) << U32(low)) | lo
  return jnp.where(code == U32(codecs.ESCAPE), U32(0), bits)


def _exact_rows(refs, widths, dtype, tile: _Tile, row: int, rows: int):
  """Decoded values of tile rows [row, row + rows) of an exact-tier tile."""
  return _bitcast_to(_exact_bits(refs, widths, dtype, tile, row, rows), dtype)


def _exact_uint_rows(refs, widths, dtype, tile: _Tile, row: int, rows: int):
  """Bits of tile rows [row, row + rows) as the unsigned type of the tensor's width."""
  return _exact_bits(refs, widths, dtype, tile, row, rows).astype(_uint_like(dtype))


def _int4_rows(refs, widths, dtype, tile: _Tile, row: int, rows: int):
  """Decoded values of tile rows [row, row + rows) of an int4 tile: (q * s) in f32 -> dtype."""
  del widths
  scale_ref, code_ref = refs
  nibble = _field(code_ref, codecs.CODE_BITS, tile, row, rows)
  q = lax.bitcast_convert_type(nibble ^ U32(8), jnp.int32) - 8
  scale_bits = _meta(scale_ref, 16, tile, row // tile.block, rows)
  scale = lax.bitcast_convert_type(scale_bits << U32(16), jnp.float32)   # bf16 -> f32, exact
  return (q.astype(jnp.float32) * scale).astype(dtype)


# ----------------------------------------------------------------------------- kernel bodies


def _decode_kernel(*refs, rows_fn, widths, dtype, block, m, slab, fields):
  *in_refs, o_ref = refs
  k = pl.program_id(0)
  meta_rows = max(1, m // fields)
  tile = _Tile(block, m, 0, k * m, _div(k * m, fields * meta_rows) * meta_rows)
  for t in range(block * m // slab):
    o_ref[pl.ds(t * slab, slab), :] = rows_fn(in_refs, widths, dtype, tile, t * slab, slab)


def _tile_product(x_ref, in_refs, rows_fn, widths, dtype, tile, slab, x_row0, precision):
  acc = None
  for t in range(tile.block * tile.m // slab):
    w = rows_fn(in_refs, widths, dtype, tile, t * slab, slab)
    part = jnp.dot(x_ref[x_row0 + t], w, preferred_element_type=jnp.float32,
                   precision=precision)
    acc = part if acc is None else acc + part
  return acc


def _matmul_grid_k_kernel(x_ref, *refs, rows_fn, widths, dtype, block, m, slab, fields,
                          precision):
  """Grid (batch, n, k): the K tiles are visited in order and summed into o_ref."""
  *in_refs, o_ref = refs
  k = pl.program_id(2)
  meta_rows = max(1, m // fields)
  tile = _Tile(block, m, 0, k * m, _div(k * m, fields * meta_rows) * meta_rows)

  @pl.when(k == 0)
  def _():
    o_ref[...] = jnp.zeros_like(o_ref)

  o_ref[...] += _tile_product(x_ref, in_refs, rows_fn, widths, dtype, tile, slab, 0, precision)


def _matmul_loop_k_kernel(x_ref, *refs, rows_fn, widths, dtype, block, m, slab, fields,
                          n_tiles, precision):
  """Grid (batch, n): each program loops over all K tiles (GPU programs run concurrently)."""
  del fields
  *in_refs, o_ref = refs
  per_tile = block * m // slab

  def body(k, acc):
    tile = _Tile(block, m, k, k * m, 0)
    return acc + _tile_product(x_ref, in_refs, rows_fn, widths, dtype, tile, slab,
                               k * per_tile, precision)

  o_ref[...] = lax.fori_loop(0, n_tiles, body, jnp.zeros(o_ref.shape, jnp.float32))


# ----------------------------------------------------------------------------- operands


def _operands(t):
  """(rows_fn, metadata words [n, 1, cols], planes, widths, block, metadata fields per word)."""
  if isinstance(t, codecs.ExactTensor):
    widths = codecs.plane_widths(t.dtype)
    planes = [jnp.asarray(p, U32) for p in t.planes]
    return _exact_rows, _meta_3d(jnp.asarray(t.bases, U32)), planes, widths, t.block, 4
  if isinstance(t, codecs.Int4Tensor):
    widths = (codecs.CODE_BITS,)
    return (_int4_rows, _meta_3d(jnp.asarray(t.scales, U32)), [jnp.asarray(t.codes, U32)],
            widths, t.group, 2)
  raise TypeError(f"not a compressed tensor: {type(t).__name__}")


def _escape_values(t):
  bits = jnp.asarray(t.escape_bits).astype(_uint_like(t.dtype))
  return lax.bitcast_convert_type(bits, jnp.dtype(t.dtype))


# ----------------------------------------------------------------------------- decode


def decode(t, *, block_k: int | None = None, block_n: int | None = None,
           backend: str | None = None, gpu_backend: str = "mosaic",
           interpret: bool | None = None):
  """Pallas decode of an ExactTensor (bit-exact) or Int4Tensor to its dense array.

  `backend` ("cpu", "gpu", "tpu"; default: JAX's) is the platform the kernel is built for;
  on "gpu", `gpu_backend` picks Mosaic GPU (default) or Triton. `interpret` defaults to True
  on CPU. Block sizes default per form: 512 x 512 here, kernels_mosaic_gpu.decode's there.
  """
  backend, interpret = _platform(backend, interpret)
  if _use_mosaic_gpu(backend, gpu_backend):
    from compression import kernels_mosaic_gpu
    blocks = {k: v for k, v in (("block_k", block_k), ("block_n", block_n)) if v is not None}
    return kernels_mosaic_gpu.decode(t, interpret=interpret, **blocks)
  block_k = 512 if block_k is None else block_k
  block_n = 512 if block_n is None else block_n
  gpu = backend == "gpu" and not interpret
  rows_fn, meta, planes, widths, block, fields = _operands(t)
  rows, cols = codecs.matrix_shape(t.shape)
  dtype = jnp.dtype(t.dtype)
  rows_p = codecs.padded_rows(rows, block)
  if rows * cols == 0:
    return jnp.zeros(t.shape, dtype)
  exact = isinstance(t, codecs.ExactTensor)
  # The exact kernel emits unsigned bits and the bitcast happens outside: values never pass
  # through a float op, which on CPU (interpret mode) would quiet NaN payloads.
  rows_fn, out_dtype = (_exact_uint_rows, _uint_like(dtype)) if exact else (rows_fn, dtype)
  nb = rows_p // block
  m = _row_tile(nb, block, block_k)
  bk, bn = block * m, _lane_block(cols, block_n, gpu)
  slab = block * min(widths) // 32
  meta_rows = max(1, m // fields)
  kernel = functools.partial(_decode_kernel, rows_fn=rows_fn, widths=widths, dtype=dtype,
                             block=block, m=m, slab=slab, fields=fields)
  in_specs = [pl.BlockSpec((meta_rows, 1, bn),
                           lambda k, j: (_div(k * m, fields * meta_rows), 0, j))]
  in_specs += [pl.BlockSpec((bk * w // 32, bn), lambda k, j: (k, j)) for w in widths]
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((rows_p, cols), out_dtype),
      grid=(rows_p // bk, pl.cdiv(cols, bn)), in_specs=in_specs,
      out_specs=pl.BlockSpec((bk, bn), lambda k, j: (k, j)),
      compiler_params=_backend_params(backend, interpret, ("parallel", "parallel")),
      interpret=interpret, name=f"jitdelta_decode_{t.codec}")(meta, *planes)
  return _finish_decode(out[:rows], t)


def _finish_decode(out, t):
  """Kernel output [rows, cols] -> the tensor: for the exact tier (unsigned bits) the escape
  scatter, then the same-width bitcast."""
  if isinstance(t, codecs.Int4Tensor):
    return out.reshape(t.shape)
  out = out.reshape(-1)
  if t.escape_index.shape[0]:
    out = out.at[jnp.asarray(t.escape_index)].set(jnp.asarray(t.escape_bits).astype(out.dtype))
  return lax.bitcast_convert_type(out, jnp.dtype(t.dtype)).reshape(t.shape)


def decode_reference(t) -> jax.Array:
  """Pure-jnp decode (any backend, traceable): the same integer recipe as the kernel."""
  rows, cols = codecs.matrix_shape(t.shape)
  dtype = jnp.dtype(t.dtype)
  _, meta, planes, widths, block, _ = _operands(t)
  rows_p = codecs.padded_rows(rows, block)
  if rows * cols == 0:
    return jnp.zeros(t.shape, dtype)

  def unpack(words, width):
    f = 32 // width
    w = words.reshape(-1, 1, block // f, cols)
    shifts = (jnp.arange(f, dtype=U32) * U32(width)).reshape(1, f, 1, 1)
    return ((w >> shifts) & _mask(width)).reshape(-1, cols)

  def metadata(width):
    f = 32 // width
    words = meta.reshape(-1, 1, cols)
    shifts = (jnp.arange(f, dtype=U32) * U32(width)).reshape(1, f, 1)
    per_block = ((words >> shifts) & _mask(width)).reshape(-1, cols)[:rows_p // block]
    return jnp.repeat(per_block, block, axis=0)

  if isinstance(t, codecs.Int4Tensor):
    q = lax.bitcast_convert_type(unpack(planes[0], 4) ^ U32(8), jnp.int32) - 8
    scale = lax.bitcast_convert_type(metadata(16) << U32(16), jnp.float32)
    return (q.astype(jnp.float32) * scale).astype(dtype)[:rows].reshape(t.shape)

  e_bits, m_bits = codecs.float_format(dtype)
  low = m_bits - codecs.HI_MANTISSA_BITS
  code, hi = unpack(planes[0], 4), unpack(planes[1], 8)
  lo = jnp.zeros_like(code)
  for w, p in zip(widths[2:], planes[2:]):
    lo = ((lo << U32(w)) & _mask(low)) | unpack(p, w)
  exponent = (metadata(8) + code) & _mask(e_bits)
  bits = (((hi >> U32(7)) & U32(1)) << U32(e_bits + m_bits)) | (exponent << U32(m_bits))
  bits = bits | ((hi & U32(0x7F)) << U32(low)) | lo
  bits = jnp.where(code == U32(codecs.ESCAPE), U32(0), bits)
  out = bits.astype(_uint_like(dtype))[:rows].reshape(-1)
  if t.escape_index.shape[0]:
    out = out.at[jnp.asarray(t.escape_index)].set(jnp.asarray(t.escape_bits).astype(out.dtype))
  return lax.bitcast_convert_type(out, dtype).reshape(t.shape)


# ----------------------------------------------------------------------------- fused matmul


def _check_matmul(x, t):
  if len(t.shape) != 2:
    raise ValueError(f"matmul needs a 2-D weight [in, out], got shape {t.shape}")
  if x.shape[-1] != t.shape[0]:
    raise ValueError(f"x[..., {x.shape[-1]}] @ W{list(t.shape)}: inner dims differ")


def _matmul_rows(x, t, out_dtype):
  """(x as [B, K] in the weight's dtype, as in weight-only quantization; x's leading dims;
  the output dtype), after checking the shapes: what every backend's `x @ W` starts with."""
  _check_matmul(x, t)
  return (x.reshape(-1, t.shape[0]).astype(jnp.dtype(t.dtype)), x.shape[:-1],
          x.dtype if out_dtype is None else out_dtype)


def _precision(dtype):
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def matmul(x, t, *, block_b: int | None = None, block_k: int | None = None,
           block_n: int | None = None, out_dtype=None, k_loop: bool | None = None,
           backend: str | None = None, gpu_backend: str = "mosaic",
           interpret: bool | None = None):
  """y = x @ decode(t) with t decoded tile by tile inside the kernel.

  x: [..., K]; t: a compressed [K, N] weight. x is cast to the weight's dtype (as in
  weight-only quantization); products accumulate in float32; y has x's dtype unless
  `out_dtype`. `backend`, `gpu_backend`, `interpret`: as in `decode`; block sizes default
  per form (128 x 512 x 256 here, kernels_mosaic_gpu.matmul's there). `k_loop` picks between
  the TPU / CPU-interpret form (False: K is a grid axis) and the Triton form (True: a loop
  over K inside each program, the default for Triton); the Mosaic GPU kernel has its own
  grid and takes no `k_loop`.
  """
  backend, interpret = _platform(backend, interpret)
  if _use_mosaic_gpu(backend, gpu_backend):
    if k_loop is not None:
      raise ValueError("k_loop selects the TPU or Triton form; the Mosaic GPU matmul pipelines "
                       "K itself. Drop k_loop, or pass gpu_backend='triton'.")
    from compression import kernels_mosaic_gpu
    blocks = {k: v for k, v in (("block_b", block_b), ("block_k", block_k),
                                ("block_n", block_n)) if v is not None}
    return kernels_mosaic_gpu.matmul(x, t, out_dtype=out_dtype, interpret=interpret, **blocks)
  block_b = 128 if block_b is None else block_b
  block_k = 512 if block_k is None else block_k
  block_n = 256 if block_n is None else block_n
  gpu = backend == "gpu" and not interpret
  k_loop = gpu if k_loop is None else k_loop
  if gpu and not k_loop:
    raise ValueError("k_loop=False sums K tiles across grid steps, which GPU programs do not "
                     "run in order; use k_loop=True on GPU.")
  x2, lead, out_dtype = _matmul_rows(x, t, out_dtype)
  if x2.size * t.shape[1] == 0:
    return jnp.zeros((*lead, t.shape[1]), out_dtype)
  rows_fn, meta, planes, widths, block, fields = _operands(t)
  dtype = jnp.dtype(t.dtype)
  (B, K), N = x2.shape, t.shape[1]
  K_p = codecs.padded_rows(K, block)
  nb = K_p // block
  m = _row_tile(nb, block, block_k)
  bk, bn = block * m, _lane_block(N, block_n, gpu)
  bm = min(block_b, _next_pow2(max(B, 16)))
  B_p = codecs.padded_rows(B, bm)
  slab = block * min(widths) // 32
  # x as [K_p / slab, B_p, slab]: the columns matching a decoded sub-slab are one index.
  xs = jnp.zeros((B_p, K_p), dtype).at[:B, :K].set(x2)
  xs = xs.reshape(B_p, K_p // slab, slab).transpose(1, 0, 2)
  static = dict(rows_fn=rows_fn, widths=widths, dtype=dtype, block=block, m=m, slab=slab,
                fields=fields, precision=_precision(dtype))
  out_shape = jax.ShapeDtypeStruct((B_p, N), jnp.float32)
  if k_loop:
    kernel = functools.partial(_matmul_loop_k_kernel, n_tiles=K_p // bk, **static)
    in_specs = [pl.BlockSpec((K_p // slab, bm, slab), lambda b, j: (0, b, 0)),
                pl.BlockSpec((meta.shape[0], 1, bn), lambda b, j: (0, 0, j))]
    in_specs += [pl.BlockSpec((K_p * w // 32, bn), lambda b, j: (0, j)) for w in widths]
    grid, out_spec = (B_p // bm, pl.cdiv(N, bn)), pl.BlockSpec((bm, bn), lambda b, j: (b, j))
    semantics = ("parallel", "parallel")
  else:
    meta_rows = max(1, m // fields)
    kernel = functools.partial(_matmul_grid_k_kernel, **static)
    in_specs = [pl.BlockSpec((bk // slab, bm, slab), lambda b, j, k: (k, b, 0)),
                pl.BlockSpec((meta_rows, 1, bn),
                             lambda b, j, k: (_div(k * m, fields * meta_rows), 0, j))]
    in_specs += [pl.BlockSpec((bk * w // 32, bn), lambda b, j, k: (k, j)) for w in widths]
    grid = (B_p // bm, pl.cdiv(N, bn), K_p // bk)
    out_spec = pl.BlockSpec((bm, bn), lambda b, j, k: (b, j))
    semantics = ("parallel", "parallel", "arbitrary")
  y = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_spec,
      compiler_params=_backend_params(backend, interpret, semantics), interpret=interpret,
      name=f"jitdelta_matmul_{t.codec}")(xs, meta, *planes)[:B]
  if isinstance(t, codecs.ExactTensor) and t.escape_index.shape[0]:
    y = _add_escape_products(y, x2, t)
  return y.astype(out_dtype).reshape(*lead, N)


def _add_escape_products(y, x2, t):
  """y[:, c] += x[:, r] * v for every escape (r, c, v): the entries the kernel saw as 0."""
  index = jnp.asarray(t.escape_index).astype(jnp.int32)
  cols = t.shape[1]
  values = _escape_values(t).astype(jnp.float32)
  products = x2[:, index // cols].astype(jnp.float32) * values[None, :]
  return y.at[:, index % cols].add(products)


def matmul_reference(x, t, *, out_dtype=None) -> jax.Array:
  """x @ decode_reference(t) with the same casts and float32 accumulation as `matmul`."""
  _check_matmul(x, t)
  w = decode_reference(t)
  y = jnp.dot(x.astype(w.dtype), w, preferred_element_type=jnp.float32,
              precision=_precision(w.dtype))
  return y.astype(x.dtype if out_dtype is None else out_dtype)


# ----------------------------------------------------------------------------- lowering


# target -> (lowering platform, backend, gpu_backend, matmul k_loop, custom call in the module)
LOWERING_TARGETS = {
    "tpu": ("tpu", "tpu", "mosaic", False, "tpu_custom_call"),
    "cuda": ("cuda", "gpu", "mosaic", None, "mosaic_gpu"),
    "triton": ("cuda", "gpu", "triton", True, "triton"),
}


def lowering_check(t, batch: int = 8, targets=("tpu", "cuda")) -> dict[str, str]:
  """Lowers decode and the fused matmul for other platforms, without their hardware.

  Targets: "tpu" (Mosaic TPU, grid-K matmul), "cuda" (Mosaic GPU), "triton" (Pallas' Triton
  backend for CUDA, K-loop matmul). This runs Pallas' own lowering, which rejects unsupported
  ops, layouts and block shapes (for Mosaic GPU: register layouts, SMEM transfers and its
  shared-memory budget); it does not run the later compiler passes, let alone the kernel.
  A lowering without the target's kernel call (an XLA fallback) counts as an error.
  Returns {"<target>/<kernel>": "ok" | "error: ..."}.
  """
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
  x = jax.ShapeDtypeStruct((batch, t.shape[0]), jnp.dtype(t.dtype))
  report = {}
  for target in targets:
    platform, backend, gpu_backend, k_loop, call = LOWERING_TARGETS[target]
    common = dict(backend=backend, gpu_backend=gpu_backend, interpret=False)
    forms = {"decode": (lambda tt: decode(tt, **common), (shapes,)),
             "matmul": (lambda xx, tt: matmul(xx, tt, k_loop=k_loop, **common), (x, shapes))}
    for name, (fn, args) in forms.items():
      try:
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        ok = call in text
        report[f"{target}/{name}"] = "ok" if ok else f"error: no {call} call in the module"
      except Exception as e:  # noqa: BLE001 -- a report of what fails, not error handling
        first = str(e).splitlines()[0][:200] if str(e) else ""
        report[f"{target}/{name}"] = f"error: {type(e).__name__}: {first}"
  return report
