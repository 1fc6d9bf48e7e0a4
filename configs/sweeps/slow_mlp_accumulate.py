"""What freezing the slow level between its updates costs in quality. Transformer++
`slow_mlp` (MLP weights update every 4 steps, everything else every step) with the slow
level's update taken from the gradients summed over its 4 steps ("sum") or from the gradient
of its firing step alone, the MLPs frozen in between ("none": their weight gradients are not
computed on 3 steps of 4). Equal steps, 3 seeds.

  python main.py --mode=sweep --config=configs/sweeps/slow_mlp_accumulate.py --workdir=runs/accumulate
"""

from experiments import sweep


def get_config():
  return sweep.define(
      base="configs/transformer.py:slow_mlp",
      grid={"levels.slow.accumulate": ["sum", "none"]},
      seeds=[0, 1, 2],
      fixed={"train.steps": 300},
      metric="eval.json:perplexity")
