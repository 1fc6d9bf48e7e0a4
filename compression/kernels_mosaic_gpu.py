"""Mosaic GPU (Hopper) forms of the JIT-Delta kernels: decode, and decode fused into `x @ W`.

The tile decoding is kernels.py's (`_exact_rows`, `_int4_rows`: static ref slices, shifts,
masks, one add, a same-width bitcast); this module adds what Mosaic GPU needs around it.

Layouts. Pallas lowers these kernels with Lane semantics: every value is a register array
whose layout is fixed where it is loaded. Plane words are loaded in a row-major tiled layout
(4 rows x 64 columns per warpgroup, two adjacent columns per thread): a warp reads 256
contiguous bytes of a word row, free of SMEM bank conflicts, and the decoded 16-bit values
leave as 128-byte rows, which a swizzled wgmma operand tile accepts. The shifts, masks and
selects keep that layout. The per-block base / scale is loaded as one row in the matching
row layout and broadcast explicitly: Mosaic GPU has no implicit [1, n] -> [m, n] broadcast.
Column tiles are therefore multiples of 64.

Fused matmul: tensor cores, batch as the narrow side. Each K tile of W is decoded into a
swizzled SMEM tile and multiplied by wgmma as y^T[bn, bb] += W^T[bn, bk] @ x^T[bk, bb], both
operands read transposed from SMEM. wgmma needs M >= 64 but allows N = 8, so the batch is
the N side, rounded up to 8: batch 1-32 costs no padding to 64 rows, and x's copies stay
bb x bk instead of 64 x bk per tile. At small batch the kernel is bound by reading W (12
bits per weight for the exact tier, ~4.1 for int4) and by the ~15 integer ops per weight of
the decode; a CUDA-core multiply-reduce would add B FMAs per weight on the same cores, while
the tensor core does the products for free. float32 weights have no exact tensor-core path
(tf32 rounds), so their matmul is this decode followed by XLA's dot at HIGHEST precision.

Grid: (batch blocks, column tiles, K splits) are the CUDA grid of a plgpu.kernel, the K
tiles of a split a plgpu.emit_pipeline inside it, which copies tile k + 1 (TMA) while tile k
is decoded. (JAX 0.12 no longer lowers pl.pallas_call with Mosaic GPU parameters, so
`_launch` builds that form itself.) N / bn column tiles alone would leave most of an H100's
132 SMs idle at small batch, so K is split and XLA sums the splits (splits x N x batch
floats). The decode kernel is one tile per CTA.

TMA copies need 16-byte row strides: tensors whose columns are not a multiple of 8 (decode)
or 4 (matmul) take the pure-jnp reference instead. Escapes are applied after the kernel, as
in kernels.py.

Testing without a GPU, three ways. `interpret=True` runs the same grid, BlockSpecs and tile
decoding in Pallas' generic interpreter, with a jnp.dot into a float32 scratch for wgmma.
`interpret=gpu_interpreter()` runs the kernels themselves (plgpu.kernel, TMA pipeline, wgmma
on transposed SMEM operands) in Mosaic GPU's CPU interpreter; JAX 0.10's interpreter runs the
decode but has no transposed wgmma operands, JAX 0.12's runs both. Neither interpreter takes
the layout hints, so those, the swizzles and the SMEM budget are checked by lowering for
"cuda" (kernels.lowering_check). Nothing here has run on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from compression import codecs
from compression import kernels

# H100: 227 KiB of SMEM per block; leave room for Mosaic's own barriers and scratch.
SMEM_BUDGET = 216 * 1024
# Enough CTAs to keep two resident on each of an H100's 132 SMs.
TARGET_CTAS = 264
LANES = 64                 # columns per layout tile, so per column tile
SWIZZLE = 128              # bytes: a 64-column row of 16-bit values


# ----------------------------------------------------------------------------- Mosaic GPU API


def _plgpu():
  from jax.experimental.pallas import mosaic_gpu as plgpu
  return plgpu


@functools.cache
def _layouts():
  """{"tile": layout of [rows, cols] values, "row": layout of the [cols] rows broadcast
  into them (the tile layout with its row dimension reduced)}."""
  plgpu = _plgpu()
  tile = plgpu.Layout.TILED(plgpu.Tiling(((4, LANES), (2,))), warp_dims=(-3,),
                            lane_dims=(-2,), vector_dim=-1)
  row = plgpu.Layout.TILED(plgpu.Tiling(((LANES,), (2,))), warp_dims=(plgpu.Replicated(4),),
                           lane_dims=(-2,), vector_dim=-1)
  return {"tile": tile, "row": row}


def _layout(value, kind: str):
  return _plgpu().layout_cast(value, _layouts()[kind])


def _compiler_params():
  plgpu = _plgpu()
  # Lane semantics by name: JAX 0.12 made Warpgroup the default, and these kernels choose
  # a layout per value, which only Lane semantics allows.
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane)


def gpu_interpreter():
  """Parameters that run the Mosaic GPU kernels themselves in Mosaic GPU's CPU interpreter,
  or None where this JAX has none: public in JAX 0.12, private in 0.10."""
  plgpu = _plgpu()
  if hasattr(plgpu, "InterpretGPUParams"):
    return plgpu.InterpretGPUParams()
  try:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  except ImportError:
    return None
  return InterpretGPUParams()


def _hints(interpret):
  """Layout hints for the hardware lowering only: both interpreters run without them."""
  return kernels._no_layout if interpret else _layout


def _swizzled():
  """Transforms of a 16-bit SMEM tile that wgmma reads: 8 x 64 tiles, 128-byte swizzle."""
  plgpu = _plgpu()
  return (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))


# ----------------------------------------------------------------------------- tile sizes


def _round_up(n: int, k: int) -> int:
  return -(-n // k) * k


def _column_tile(cols: int, block_n: int) -> int:
  if block_n % LANES:
    raise ValueError(f"block_n={block_n}: Mosaic GPU column tiles are multiples of {LANES}.")
  return min(block_n, _round_up(cols, LANES))


def _fit(bn: int, steps: int, smem_bytes) -> tuple[int, int]:
  """Largest (column tile, pipeline depth) within SMEM_BUDGET, halving bn first."""
  while smem_bytes(bn, steps) > SMEM_BUDGET:
    if bn > LANES:
      bn = max(LANES, bn // 2 // LANES * LANES)
    elif steps > 1:
      steps -= 1
    else:
      raise ValueError(f"a {bn}-column tile needs {smem_bytes(bn, steps)} bytes of SMEM, more "
                       f"than {SMEM_BUDGET}; lower block_k (or block_b for the matmul).")
  return bn, steps


def _split_k(k_tiles: int, ctas: int) -> int:
  """The largest divisor of k_tiles that brings ctas * splits up to about TARGET_CTAS."""
  want = max(1, -(-TARGET_CTAS // ctas))
  return max(d for d in range(1, min(want, k_tiles) + 1) if k_tiles % d == 0)


def _geometry(rows: int, block: int, widths, fields: int, block_k: int):
  """(blocks per row tile m, rows per sub-slab, metadata word rows per tile)."""
  m = kernels._row_tile(codecs.padded_rows(rows, block) // block, block, block_k)
  return m, block * min(widths) // 32, max(1, m // fields)


def _meta_2d(meta):
  """kernels._operands' [n, 1, cols] metadata -> [n, cols]: one row loads as [cols]."""
  return meta.reshape(meta.shape[0], meta.shape[2])


# ----------------------------------------------------------------------------- launching


def _launch(body, out_shape, *, grid, sequential, in_specs, out_spec, scratch, steps,
            interpret, name):
  """pallas_call semantics on either path: body(ids, *in_refs, out_ref, *scratch_refs) runs
  for every grid point, ids in grid order, refs holding the BlockSpecs' blocks.

  On the GPU: plgpu.kernel over the parallel axes (the CUDA grid, ids from lax.axis_index)
  and plgpu.emit_pipeline over the `sequential` ones (TMA copies `steps` deep). JAX 0.12 no
  longer lowers pl.pallas_call with Mosaic GPU parameters and deprecates pl.program_id there;
  JAX 0.10's pallas_call cannot give the body program ids of a grid with three parallel axes
  before a sequential one. This form means the same on 0.10 to 0.12. `interpret`: False, True
  (pl.pallas_call in Pallas' generic interpreter, which visits the grid in row-major order,
  so sequential axes must be innermost) or GPU interpreter parameters (this kernel in Mosaic
  GPU's interpreter).
  """
  if interpret is True:
    def interpreted(*refs):
      body(tuple(pl.program_id(i) for i in range(len(grid))), *refs)
    return pl.pallas_call(interpreted, out_shape=out_shape, grid=grid, in_specs=in_specs,
                          out_specs=out_spec, scratch_shapes=scratch, interpret=True,
                          name=name)

  plgpu = _plgpu()
  parallel = [i for i in range(len(grid)) if i not in sequential]
  names = tuple(f"{name}_{i}" for i in parallel)

  def kernel(*gmem):
    parallel_ids = [lax.axis_index(n) for n in names]

    def ids(sequential_ids):
      full = dict(zip(parallel, parallel_ids)) | dict(zip(sequential, sequential_ids))
      return tuple(full[i] for i in range(len(grid)))

    def step(spec):
      return dataclasses.replace(spec, index_map=lambda *seq: spec.index_map(*ids(seq)))

    def pipeline(*scratch_refs):
      plgpu.emit_pipeline(
          lambda seq, *blocks: body(ids(seq), *blocks, *scratch_refs),
          grid=tuple(grid[i] for i in sequential), in_specs=[step(s) for s in in_specs],
          out_specs=[step(out_spec)], max_concurrent_steps=steps)(*gmem)

    _scoped(pipeline, scratch)

  return plgpu.kernel(kernel, out_type=out_shape, grid=tuple(grid[i] for i in parallel),
                      grid_names=names, compiler_params=_compiler_params(),
                      **({"interpret": interpret} if interpret else {}))


def _scoped(fn, types, *refs):
  """fn(*refs, *scratch) with one run_scoped per scratch buffer: Mosaic GPU's interpreter
  does not take register (accumulator) and SMEM allocations in one scope."""
  if not types:
    return fn(*refs)
  return pl.run_scoped(lambda ref: _scoped(fn, types[1:], *refs, ref), types[0])


# ----------------------------------------------------------------------------- decode


def _decode_kernel(ids, *refs, rows_fn, widths, dtype, block, m, slab, fields, layout):
  """kernels._decode_kernel with layout hints, writing a [bk / R, R, bn] output block."""
  *in_refs, o_ref = refs
  k = ids[0]
  meta_rows = max(1, m // fields)
  tile = kernels._Tile(block, m, 0, k * m,
                       kernels._div(k * m, fields * meta_rows) * meta_rows, layout)
  r = o_ref.shape[1]
  for t in range(block * m // slab):
    row = t * slab
    o_ref[row // r, pl.ds(row % r, slab), :] = rows_fn(in_refs, widths, dtype, tile, row, slab)


def decode(t, *, block_k: int = 256, block_n: int = 128, interpret=False):
  """Mosaic GPU decode of an ExactTensor (bit-exact) or Int4Tensor to its dense array.

  One (block_k x block_n) tile per CTA; block_n is a multiple of 64 and shrinks until the
  tile's planes and output fit in SMEM. `interpret`: False (GPU), True (Pallas' generic
  interpreter) or `gpu_interpreter()` (this kernel in Mosaic GPU's interpreter).
  """
  rows, cols = codecs.matrix_shape(t.shape)
  dtype = jnp.dtype(t.dtype)
  if rows * cols == 0:
    return jnp.zeros(t.shape, dtype)
  exact = isinstance(t, codecs.ExactTensor)
  out_dtype = kernels._uint_like(dtype) if exact else dtype
  if cols * out_dtype.itemsize % 16:
    return kernels.decode_reference(t)
  rows_fn, meta, planes, widths, block, fields = kernels._operands(t)
  # The exact kernel emits unsigned bits; the bitcast comes after the escape scatter.
  rows_fn = kernels._exact_uint_rows if exact else rows_fn
  m, slab, meta_rows = _geometry(rows, block, widths, fields, block_k)
  bk = block * m
  bits = sum(widths)
  bn, _ = _fit(_column_tile(cols, block_n), 1,
               lambda bn, _: bk * bn * bits // 8 + bk * bn * out_dtype.itemsize
               + meta_rows * bn * 4)
  kernel = functools.partial(
      _decode_kernel, rows_fn=rows_fn, widths=widths, dtype=dtype, block=block, m=m,
      slab=slab, fields=fields, layout=_hints(interpret))
  in_specs = [pl.BlockSpec((meta_rows, bn),
                           lambda k, j: (kernels._div(k * m, fields * meta_rows), j))]
  in_specs += [pl.BlockSpec((bk * w // 32, bn), lambda k, j: (k, j)) for w in widths]
  # A TMA copy moves at most 256 rows: the output is [rows_p / R, R, cols], R <= 256.
  rows_p, r = codecs.padded_rows(rows, block), min(bk, 256)
  out = _launch(
      kernel, jax.ShapeDtypeStruct((rows_p // r, r, cols), out_dtype),
      grid=(rows_p // bk, pl.cdiv(cols, bn)), sequential=(), in_specs=in_specs,
      out_spec=pl.BlockSpec((bk // r, r, bn), lambda k, j: (k, 0, j)), scratch=(), steps=1,
      interpret=interpret, name=f"jitdelta_decode_{t.codec}")(_meta_2d(meta), *planes)
  return kernels._finish_decode(out.reshape(rows_p, cols)[:rows], t)


# ----------------------------------------------------------------------------- fused matmul


def _product(acc_ref, w_ref, x_ref, wgmma: bool, first):
  """acc[bn, bb] += W^T @ x^T for the decoded tile w_ref [bk, bn] and x_ref [bb, bk]."""
  if wgmma:                        # the accumulator starts at zero
    plgpu = _plgpu()
    plgpu.commit_smem()            # the decoded tile's stores, visible to the tensor core
    plgpu.wgmma(acc_ref, w_ref.T, x_ref.T)
    plgpu.wgmma_wait(0)            # the next K tile overwrites w_ref
    return

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros(acc_ref.shape, acc_ref.dtype)

  acc_ref[...] += lax.dot_general(w_ref[...], x_ref[...], (((0,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)


def _matmul_kernel(ids, x_ref, *refs, rows_fn, widths, dtype, block, m, slab, fields,
                   k_per_split, layout, wgmma):
  """Grid (batch block, column tile, split, K tile of the split); out is y^T's block
  [1, bn, bb], written once the split's last K tile is in."""
  *in_refs, o_ref, w_ref, acc_ref = refs
  _, _, split, k = ids
  k_tile = split * k_per_split + k
  meta_rows = max(1, m // fields)
  tile = kernels._Tile(block, m, 0, k_tile * m,
                       kernels._div(k_tile * m, fields * meta_rows) * meta_rows, layout)
  for t in range(block * m // slab):
    w_ref[pl.ds(t * slab, slab), :] = rows_fn(in_refs, widths, dtype, tile, t * slab, slab)
  _product(acc_ref, w_ref, x_ref, wgmma, k == 0)

  @pl.when(k == k_per_split - 1)
  def _():
    o_ref[0] = acc_ref[...]


def matmul(x, t, *, block_b: int = 64, block_k: int = 256, block_n: int = 128,
           split_k: int | None = None, out_dtype=None, interpret=False):
  """y = x @ decode(t) on Mosaic GPU: W decoded tile by tile into SMEM and fed to wgmma.

  x: [..., K]; t: a compressed [K, N] weight (as kernels.matmul). The batch is cut into
  blocks of block_b rows (rounded up to 8; at most 256, wgmma's N); block_n (a multiple of
  64: wgmma's M) shrinks, then the pipeline depth, until SMEM fits. `split_k` (a divisor of
  the number of K tiles; default: enough CTAs for an H100) splits the reduction.
  `interpret`: as in `decode`.
  """
  x2, lead, out_dtype = kernels._matmul_rows(x, t, out_dtype)
  if x2.size * t.shape[1] == 0:
    return jnp.zeros((*lead, t.shape[1]), out_dtype)
  dtype = jnp.dtype(t.dtype)
  (B, K), N = x2.shape, t.shape[1]
  if dtype.itemsize == 4:
    w = decode(t, block_k=block_k, block_n=block_n, interpret=interpret)
    y = jnp.dot(x2, w, preferred_element_type=jnp.float32, precision=lax.Precision.HIGHEST)
    return y.astype(out_dtype).reshape(*lead, N)
  if N % 4:
    return kernels.matmul_reference(x, t, out_dtype=out_dtype)
  if not 8 <= _round_up(block_b, 8) <= 256:
    raise ValueError(f"block_b={block_b}: wgmma's N side takes 8 to 256 rows.")
  rows_fn, meta, planes, widths, block, fields = kernels._operands(t)
  m, slab, meta_rows = _geometry(K, block, widths, fields, block_k)
  bk = block * m
  k_tiles = codecs.padded_rows(K, block) // bk
  bb = min(_round_up(block_b, 8), _round_up(B, 8))
  B_p = _round_up(B, bb)
  itemsize = dtype.itemsize
  bits = sum(widths)
  bn, steps = _fit(
      _column_tile(N, block_n), 2,
      lambda bn, steps: steps * (bb * bk * itemsize + bk * bn * bits // 8 + meta_rows * bn * 4)
      + bk * bn * itemsize + bn * bb * 4)
  ctas = (B_p // bb) * pl.cdiv(N, bn)
  splits = _split_k(k_tiles, ctas) if split_k is None else split_k
  if k_tiles % splits:
    raise ValueError(f"split_k={splits} must divide the {k_tiles} K tiles of {bk} rows.")
  kps = k_tiles // splits
  xs = jnp.zeros((B_p, codecs.padded_rows(K, block)), dtype).at[:B, :K].set(x2)

  wgmma = interpret is not True
  plgpu = _plgpu()
  x_block = (bb, bk), lambda b, j, s, k: (b, s * kps + k)
  in_specs = [plgpu.BlockSpec(*x_block, transforms=_swizzled()) if wgmma
              else pl.BlockSpec(*x_block)]
  in_specs += [pl.BlockSpec((meta_rows, bn), lambda b, j, s, k: (
      kernels._div((s * kps + k) * m, fields * meta_rows), j))]
  in_specs += [pl.BlockSpec((bk * w // 32, bn), lambda b, j, s, k: (s * kps + k, j))
               for w in widths]
  scratch = [plgpu.SMEM((bk, bn), dtype, transforms=_swizzled() if wgmma else ()),
             plgpu.ACC((bn, bb), jnp.float32) if wgmma
             else plgpu.SMEM((bn, bb), jnp.float32)]
  kernel = functools.partial(_matmul_kernel, rows_fn=rows_fn, widths=widths, dtype=dtype,
                             block=block, m=m, slab=slab, fields=fields, k_per_split=kps,
                             layout=_hints(interpret), wgmma=wgmma)
  y_t = _launch(
      kernel, jax.ShapeDtypeStruct((splits, N, B_p), jnp.float32),
      grid=(B_p // bb, pl.cdiv(N, bn), splits, kps), sequential=(3,), in_specs=in_specs,
      out_spec=pl.BlockSpec((1, bn, bb), lambda b, j, s, k: (s, j, b)), scratch=scratch,
      steps=steps, interpret=interpret,
      name=f"jitdelta_matmul_{t.codec}")(xs, _meta_2d(meta), *planes)
  y = y_t.sum(axis=0).T[:B]
  if isinstance(t, codecs.ExactTensor) and t.escape_index.shape[0]:
    y = kernels._add_escape_products(y, x2, t)
  return y.astype(out_dtype).reshape(*lead, N)
