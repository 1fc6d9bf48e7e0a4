"""The traceable exact encoder against the numpy reference: same bases, planes and escapes."""

import jax
import numpy as np
import pytest

from compression import codecs, jit_encode, kernels
from test_compression import BF16, DTYPES, bits_of, weights


def trimmed(t, n):
  return (np.asarray(t.escape_index)[:n], np.asarray(t.escape_bits)[:n])


CASES = ([(d, k, (300, 72)) for d in DTYPES for k in ("normal", "student_t", "specials")]
         + [(BF16, "specials", (64, 40)), (np.float32, "student_t", (1000,))])


@pytest.mark.parametrize("dtype, kind, shape", CASES,
                         ids=lambda v: getattr(v, "__name__", str(v)))
def test_jit_encoder_matches_the_reference_bit_for_bit(dtype, kind, shape):
  x = weights(kind, shape, dtype, seed=np.random.SeedSequence().entropy % 2**32)
  want = codecs.encode(x, "exact")
  n = len(want.escape_index)
  got, count = jax.jit(jit_encode.encode_exact, static_argnums=1)(x, n + 5)
  assert int(count) == n and got.block == want.block
  np.testing.assert_array_equal(np.asarray(got.bases), want.bases)
  for g, w in zip(got.planes, want.planes, strict=True):
    np.testing.assert_array_equal(np.asarray(g), w)
  index, raw = trimmed(got, n)
  np.testing.assert_array_equal(index, want.escape_index)
  np.testing.assert_array_equal(raw, want.escape_bits)
  # The padding slots point past the tensor, and the kernel's decode drops them.
  assert np.all(np.asarray(got.escape_index)[n:] == x.size)
  np.testing.assert_array_equal(bits_of(kernels.decode(got)), bits_of(x))


def test_escapes_beyond_capacity_are_counted():
  x = weights("specials", (128, 16), BF16, seed=0)
  n = len(codecs.encode(x, "exact").escape_index)
  assert n > 4
  _, count = jit_encode.encode_exact(x, capacity=4)
  assert int(count) == n
