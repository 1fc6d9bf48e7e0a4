"""What `main.py --mode=<name>` runs: name → (run(config, workdir), one-line description)."""

from experiments import (burn_rate, compress, continual, evaluate, generate, sweep, tables, train,
                         zeroshot)

MODES = {
    "train": (train.run, "train (resuming from the workdir's latest checkpoint), then evaluate → "
              "config.json, metrics.jsonl, checkpoints/, eval.json"),
    "sweep": (sweep.run, "train every point of a sweep config (configs/sweeps/) in its own "
              "sub-workdir, then write results.md, results.csv and results.png"),
    "continual": (continual.run, "train on each of config.continual.phases in turn (genres of the "
                  "bundled plays), evaluating every phase's corpus along the way → "
                  "continual.json/.png with the forgetting"),
    "burn_rate": (burn_rate.run, "FLOPs (XLA cost analysis) and measured time of every step, per "
                  "level, over a run → burn_rate.json/.md/.png"),
    "tables": (tables.run, "Table 1 of the paper with our runs beside it (a tables config, "
               "configs/tables.py) → table1.md"),
    "eval": (evaluate.run, "validation loss, perplexity and bits/byte of the workdir's latest "
             "checkpoint → eval.json (with config.compression.codec set: of its compressed copy, "
             "beside the dense one → compressed/<copy>/eval.json)"),
    "generate": (generate.run, "sample text from the latest checkpoint (config.generate; from its "
                 "compressed copy when config.compression.codec is set) → samples.json"),
    "compress": (compress.run, "JIT-Delta copy of the latest checkpoint's slow levels "
                 "(config.compression) → compressed/step_<N>-<codec>/ with report.md"),
    "zeroshot": (zeroshot.run, "lm-evaluation-harness zero-shot tasks (config.zeroshot) on the "
                 "workdir's latest checkpoint → zeroshot.json"),
}
