"""The memory footprint of a compiled train step (experiments/footprint.py)."""

import jax
import numpy as np

from conftest import micro_config
from experiments import footprint, state as state_lib, train


def test_footprint_of_the_micro_step_holds_the_state_it_is_given(cache_dir):
  config = micro_config(cache_dir)
  exp = state_lib.build(config, load_data=False)
  assert exp.dataset is None
  f = train.step_footprint(exp)
  param_bytes = sum(np.prod(x.shape) * x.dtype.itemsize
                    for x in jax.tree.leaves(exp.abstract_params))
  # The arguments are the train state (parameters and AdamW's two moments) and the batch.
  assert f.arguments >= 3 * param_bytes
  assert f.temporaries > 0 and f.total >= f.arguments and f.compile_seconds > 0


def test_fitting_grad_accum_scales_the_temporaries_by_the_micro_batch(cache_dir):
  config = micro_config(cache_dir, **{"train.batch_size": 8})
  f = footprint.Footprint(arguments=10, outputs=5, temporaries=100, aliased=5,
                          compile_seconds=1.0)
  # fixed 10 bytes + 100 / accum ≤ budget
  assert footprint.fitting_grad_accum(f, config, budget=60) == 2
  assert footprint.fitting_grad_accum(f, config, budget=36) == 4
  assert footprint.fitting_grad_accum(f, config, budget=10) is None
  # Over 4 devices a micro-batch must keep 4 sequences: 4 micro-batches of 2 cannot split.
  assert footprint.fitting_grad_accum(f, config, budget=36, batch_shards=4) is None
  assert footprint.fitting_grad_accum(f, config, budget=60, batch_shards=4) == 2
