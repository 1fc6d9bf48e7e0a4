"""Pallas kernels against the numpy codecs and the jnp references (interpret mode on CPU).

Shapes are small because interpret mode is slow; block sizes are shrunk where that makes a
small shape cover several row and column tiles, including a partial last column tile. The
Mosaic GPU forms run here in Pallas' generic interpreter and, where this JAX has one, in
Mosaic GPU's own interpreter; lowering for "cuda" checks what neither can.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import compression
from compression import codecs, kernels, kernels_mosaic_gpu
from test_compression import BF16, DTYPES, bits_of, from_fields, special_values, weights

NAMES = lambda d: np.dtype(d).name  # noqa: E731


def matmul_weights(dtype, shape, seed):
  """Gaussian weights with finite specials sprinkled in, so that most outputs stay finite,
  plus a NaN-payload column and a zero column (decoded through the planes) and a lone inf
  and NaN (escapes)."""
  rng = np.random.default_rng(seed)
  w = weights("normal", shape, dtype, seed)
  e_bits, _ = codecs.float_format(dtype)
  bias = (1 << (e_bits - 1)) - 1
  finite = np.concatenate([special_values(dtype)[:7],
                           from_fields(dtype, [0, 1], [bias + bias // 2, bias - bias // 2 - 3],
                                       [5, 9])])
  flat = w.reshape(-1)
  where = rng.choice(flat.size, flat.size // 50, replace=False)
  flat[where] = finite[rng.integers(0, finite.size, where.size)]
  specials = special_values(dtype)
  w[:, 0] = specials[rng.integers(11, 16, shape[0])]
  w[:, 1] = 0
  w[5, 2], w[7, 3] = specials[9], specials[13]
  return w


DECODE_CASES = [(d, k, s) for d in (BF16, np.float32)
                for k, s in [("normal", (512, 384)), ("student_t", (96, 160)),
                             ("specials", (512, 160)), ("specials", (2, 50, 33))]]
# float16's kernel unrolls 32 sub-slabs per block and is the slowest in interpret mode.
DECODE_CASES += [(np.float16, "specials", (512, 160)), (np.float16, "student_t", (96, 160))]


@pytest.mark.parametrize(
    "dtype, kind, shape", DECODE_CASES,
    ids=[f"{NAMES(d)}-{k}-{'x'.join(map(str, s))}" for d, k, s in DECODE_CASES])
def test_exact_decode_kernel_is_bit_exact(dtype, kind, shape):
  x = weights(kind, shape, dtype, seed=len(shape) * 1000 + shape[-1])
  t = compression.encode(x, "exact")
  y = kernels.decode(t, block_k=256, block_n=128)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_array_equal(bits_of(y), bits_of(x))
  np.testing.assert_array_equal(bits_of(kernels.decode_reference(t)), bits_of(x))


def test_exact_decode_kernel_small_block_and_jit():
  x = weights("specials", (200, 300), BF16, seed=21)
  t = compression.encode(x, "exact", block=64)      # 8-row sub-slabs, 4 blocks per tile
  y = jax.jit(lambda tt: kernels.decode(tt, block_k=256, block_n=256))(t)
  np.testing.assert_array_equal(bits_of(y), bits_of(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=NAMES)
@pytest.mark.parametrize("shape", [(512, 384), (96, 160)])
def test_int4_decode_kernel_matches_reference(dtype, shape):
  x = weights("student_t", shape, dtype, seed=shape[0])
  t = compression.encode(x, "int4")
  expected = bits_of(compression.decode(t))
  np.testing.assert_array_equal(bits_of(kernels.decode(t, block_k=256, block_n=128)), expected)
  np.testing.assert_array_equal(bits_of(kernels.decode_reference(t)), expected)


def _assert_matmul_close(y, ref, x, w):
  """Equal non-finite outputs; finite ones within float32 summation error, which scales
  with sum |x| |w| rather than |y| (huge weights cancel in some columns)."""
  y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
  np.testing.assert_array_equal(np.isnan(y), np.isnan(ref))
  np.testing.assert_array_equal(np.isinf(y) * np.sign(y), np.isinf(ref) * np.sign(ref))
  finite = np.isfinite(ref)
  with np.errstate(invalid="ignore"):         # signalling NaNs in w raise the flag
    w = np.where(np.isfinite(w), w, 0).astype(np.float64)
  magnitude = np.abs(np.asarray(x, np.float64)) @ np.abs(w)
  assert np.all(np.abs(y[finite] - ref[finite]) <= 1e-5 * magnitude[finite] + 1e-30)


MATMUL_CASES = ([("exact", d, k) for d in DTYPES for k in (False, True)]
                + [("int4", BF16, False), ("int4", BF16, True), ("int4", np.float16, False),
                   ("int4", np.float32, True)])


@pytest.mark.parametrize(
    "codec, dtype, k_loop", MATMUL_CASES,
    ids=[f"{c}-{NAMES(d)}-{'loop_k' if k else 'grid_k'}" for c, d, k in MATMUL_CASES])
def test_fused_matmul_equals_x_at_decoded_w(codec, dtype, k_loop):
  w = (matmul_weights(dtype, (640, 160), seed=31) if codec == "exact"
       else weights("student_t", (640, 160), dtype, seed=31))
  t = compression.encode(w, codec)
  x = np.random.default_rng(32).normal(size=(5, 640)).astype(np.float32)
  y = kernels.matmul(x, t, block_k=256, block_n=128, k_loop=k_loop, out_dtype=jnp.float32)
  ref = jnp.dot(jnp.asarray(x).astype(dtype), jnp.asarray(compression.decode(t)),
                preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
  assert y.shape == (5, 160)
  assert np.isfinite(np.asarray(y)).mean() > 0.9
  w_decoded = compression.decode(t)
  _assert_matmul_close(y, ref, x.astype(dtype), w_decoded)
  _assert_matmul_close(y, kernels.matmul_reference(x, t, out_dtype=jnp.float32),
                       x.astype(dtype), w_decoded)


def test_fused_matmul_escapes_hit_the_right_outputs():
  w = weights("normal", (256, 128), BF16, seed=41)
  w[3, 7], w[200, 100], w[9, 100] = 0.0, np.inf, ml_dtypes.bfloat16(3.0e10)
  t = compression.encode(w, "exact")
  assert len(t.escape_index) >= 3
  x = np.random.default_rng(42).normal(size=(3, 256)).astype(np.float32)
  x[:, 200] = np.abs(x[:, 200]) + 0.5          # +inf * positive = +inf in column 100
  y = np.asarray(kernels.matmul(x, t, out_dtype=jnp.float32))
  assert np.all(np.isposinf(y[:, 100]))
  finite = np.isfinite(y).all(axis=0)
  ref = x.astype(BF16).astype(np.float64) @ w.astype(np.float64)
  np.testing.assert_allclose(y[:, finite], ref[:, finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_shape", [(1,), (2, 3), (17,)])
def test_fused_matmul_batch_shapes_and_dtype(batch_shape):
  w = weights("normal", (256, 96), BF16, seed=51)
  t = compression.encode(w, "int4")
  x = jnp.asarray(np.random.default_rng(52).normal(size=(*batch_shape, 256)), jnp.bfloat16)
  y = kernels.matmul(x, t)
  assert y.shape == (*batch_shape, 96) and y.dtype == jnp.bfloat16
  ref = kernels.matmul_reference(x, t)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                             rtol=1e-2, atol=1e-2)


def test_matmul_rejects_mismatched_shapes_and_misplaced_k_loop():
  t = compression.encode(weights("normal", (128, 32), BF16, seed=61), "int4")
  with pytest.raises(ValueError, match="inner dims"):
    kernels.matmul(jnp.ones((2, 64)), t)
  with pytest.raises(ValueError, match="k_loop=True"):
    kernels.matmul(jnp.ones((2, 128)), t, k_loop=False, backend="gpu", gpu_backend="triton",
                   interpret=False)
  with pytest.raises(ValueError, match="k_loop selects"):
    kernels.matmul(jnp.ones((2, 128)), t, k_loop=True, backend="gpu", interpret=False)
  with pytest.raises(ValueError, match="gpu_backend"):
    kernels.decode(t, backend="gpu", gpu_backend="cuda")


def test_interpret_is_the_default_on_cpu_only():
  assert kernels._platform("cpu", None) == ("cpu", True)
  assert kernels._platform("tpu", None) == ("tpu", False)
  assert kernels._platform("gpu", True) == ("gpu", True)


# ----------------------------------------------------------------------------- Mosaic GPU


MOSAIC_DECODE_CASES = [
    ("exact", BF16, "specials", (512, 384)), ("exact", BF16, "normal", (2, 50, 48)),
    ("exact", np.float16, "specials", (512, 160)), ("exact", np.float32, "student_t", (300, 136)),
    ("exact", BF16, "specials", (64, 33)),                     # odd columns: the jnp path
    ("int4", BF16, "student_t", (300, 200)), ("int4", np.float32, "normal", (256, 72))]


@pytest.mark.parametrize(
    "codec, dtype, kind, shape", MOSAIC_DECODE_CASES,
    ids=[f"{c}-{NAMES(d)}-{k}-{'x'.join(map(str, s))}" for c, d, k, s in MOSAIC_DECODE_CASES])
def test_mosaic_gpu_decode_matches_the_codec(codec, dtype, kind, shape):
  x = weights(kind, shape, dtype, seed=shape[-1])
  t = compression.encode(x, codec)
  y = kernels.decode(t, block_n=128, backend="gpu", interpret=True)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_array_equal(bits_of(y), bits_of(compression.decode(t)))


MOSAIC_MATMUL_CASES = [("exact", BF16, {}), ("exact", BF16, {"split_k": 1}),
                       ("exact", np.float16, {}), ("exact", np.float32, {}),
                       ("int4", BF16, {"split_k": 5}), ("int4", np.float16, {"split_k": 1})]


@pytest.mark.parametrize(
    "codec, dtype, blocks", MOSAIC_MATMUL_CASES,
    ids=[f"{c}-{NAMES(d)}-{b}" for c, d, b in MOSAIC_MATMUL_CASES])
def test_mosaic_gpu_matmul_equals_x_at_decoded_w(codec, dtype, blocks):
  """K 640 is not a multiple of the 256-row K tile; N 160 = a full and a partial column tile."""
  w = (matmul_weights(dtype, (640, 160), seed=33) if codec == "exact"
       else weights("student_t", (640, 160), dtype, seed=33))
  t = compression.encode(w, codec)
  x = np.random.default_rng(34).normal(size=(5, 640)).astype(np.float32)
  y = kernels_mosaic_gpu.matmul(x, t, block_n=128, out_dtype=jnp.float32, interpret=True,
                                **blocks)
  assert y.shape == (5, 160)
  w_decoded = compression.decode(t)
  _assert_matmul_close(y, kernels.matmul_reference(x, t, out_dtype=jnp.float32),
                       x.astype(dtype), w_decoded)


def test_mosaic_gpu_matmul_batch_blocks_and_dispatch():
  w = weights("normal", (256, 128), BF16, seed=53)
  t = compression.encode(w, "exact")
  x = jnp.asarray(np.random.default_rng(54).normal(size=(2, 20, 256)), jnp.bfloat16)
  y = kernels.matmul(x, t, block_b=16, backend="gpu", interpret=True)   # 3 batch blocks
  assert y.shape == (2, 20, 128) and y.dtype == jnp.bfloat16
  ref = kernels.matmul_reference(x, t)
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                             rtol=1e-2, atol=1e-2)


def test_mosaic_gpu_tile_sizes():
  assert kernels_mosaic_gpu._split_k(12, 32) == 6 and kernels_mosaic_gpu._split_k(12, 100) == 3
  assert kernels_mosaic_gpu._split_k(7, 264) == 1
  assert kernels_mosaic_gpu._fit(256, 2, lambda bn, steps: bn * steps * 1000) == (64, 2)
  assert kernels_mosaic_gpu._fit(64, 2, lambda bn, steps: steps * 200_000) == (64, 1)
  with pytest.raises(ValueError, match="SMEM"):
    kernels_mosaic_gpu._fit(64, 1, lambda bn, steps: 10**6)
  with pytest.raises(ValueError, match="multiples of 64"):
    kernels_mosaic_gpu._column_tile(500, 96)


def _gpu_interpreter_or_skip():
  params = kernels_mosaic_gpu.gpu_interpreter()
  if params is None:
    pytest.skip("this JAX has no Mosaic GPU interpreter")
  return params


def test_mosaic_gpu_decode_kernel_in_the_gpu_interpreter():
  """The kernel itself (plgpu.kernel, TMA copies), not the generic-interpreter form."""
  params = _gpu_interpreter_or_skip()
  x = weights("specials", (512, 256), BF16, seed=81)
  t = compression.encode(x, "exact")
  np.testing.assert_array_equal(bits_of(kernels_mosaic_gpu.decode(t, interpret=params)),
                                bits_of(x))


@pytest.mark.parametrize("codec", ["exact", "int4"])
def test_mosaic_gpu_matmul_kernel_in_the_gpu_interpreter(codec):
  """wgmma on transposed SMEM operands, the accumulator and the K pipeline, interpreted."""
  params = _gpu_interpreter_or_skip()
  if not hasattr(kernels_mosaic_gpu._plgpu(), "InterpretGPUParams"):
    pytest.skip("JAX 0.10's Mosaic GPU interpreter has no transposed wgmma operands")
  w = weights("normal", (640, 192), BF16, seed=82)
  t = compression.encode(w, codec)
  x = np.random.default_rng(83).normal(size=(5, 640)).astype(np.float32)
  y = kernels_mosaic_gpu.matmul(x, t, block_n=128, split_k=1, out_dtype=jnp.float32,
                                interpret=params)
  _assert_matmul_close(y, kernels.matmul_reference(x, t, out_dtype=jnp.float32),
                       x.astype(BF16), compression.decode(t))


# ----------------------------------------------------------------------------- lowering


LOWERING_CASES = [("exact", BF16), ("int4", BF16), ("exact", np.float16)]


@pytest.mark.parametrize("codec, dtype", LOWERING_CASES,
                         ids=[f"{c}-{NAMES(d)}" for c, d in LOWERING_CASES])
def test_kernels_lower_for_tpu_and_mosaic_gpu(codec, dtype):
  """768 x 1000: a partial last column tile; "cuda" must lower to a Mosaic GPU kernel."""
  w = weights("normal", (768, 1000), dtype, seed=71)
  report = kernels.lowering_check(compression.encode(w, codec))
  assert set(report) == {"tpu/decode", "tpu/matmul", "cuda/decode", "cuda/matmul"}
  assert all(v == "ok" for v in report.values()), report


def test_gpu_default_is_mosaic_and_triton_is_opt_in():
  t = compression.encode(weights("normal", (256, 128), BF16, seed=72), "exact")
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
  text = jax.jit(lambda tt: kernels.decode(tt, backend="gpu", interpret=False)).trace(
      shapes).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "triton" not in text
  report = kernels.lowering_check(t, targets=("triton",))
  if any("No supported GPU devices" in v for v in report.values()):
    pytest.skip("this JAX lowers Triton kernels only with a GPU present")
  assert report == {"triton/decode": "ok", "triton/matmul": "ok"}, report
