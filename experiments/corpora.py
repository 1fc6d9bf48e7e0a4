"""Real text that every Python installation carries, written out as a corpus directory.

  python -m experiments.corpora python_reference runs/corpora/python_reference

`python_reference`: the Python language reference and library topics that `help()` shows
(the standard library's `pydoc_data.topics`, ~0.47 MB of English technical prose with code),
one `<topic>.txt` per topic. It is as far from the bundled plays as offline text gets here, so
`--mode=continual` can train on a corpus that shares little with Shakespeare
(configs/continual.py:<variant>,reference).
"""

from __future__ import annotations

import os
import re
import sys

from nested.errors import UserError


def python_reference() -> dict[str, str]:
  """{topic: text} of the installed Python's `pydoc_data.topics`."""
  try:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError("This Python has no pydoc_data module (some distributions split it into "
                    "a python3-doc package): install it, or pass another corpus path.") from e
  return dict(topics.topics)


CORPORA = {"python_reference": python_reference}


def write(name: str, out_dir: str) -> list[str]:
  """Writes corpus `name` as one .txt per document under `out_dir`; returns the paths."""
  if name not in CORPORA:
    raise UserError(f"Unknown corpus {name!r}; choose one of {sorted(CORPORA)}.")
  documents = CORPORA[name]()
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    raise UserError(f"{out_dir} is not empty: give a new directory (an existing corpus is "
                    f"never overwritten, since datasets cached from it would go stale).")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for topic, text in sorted(documents.items()):
    path = os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_.-]", "_", topic) + ".txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write(text.strip() + "\n")
    paths.append(path)
  return paths


def main(argv: list[str]) -> None:
  if len(argv) != 3:
    sys.exit(f"usage: python -m experiments.corpora <{'|'.join(CORPORA)}> <output directory>")
  try:
    paths = write(argv[1], argv[2])
  except UserError as e:
    sys.exit(f"error: {e}")
  size = sum(os.path.getsize(p) for p in paths)
  print(f"{argv[1]}: {len(paths)} documents, {size / 1e6:.2f} MB → {argv[2]}")


if __name__ == "__main__":
  main(sys.argv)
