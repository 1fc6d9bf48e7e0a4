"""Zero-shot tasks: one local JSONL format, the task registry, and converters from each
task's public release.

Local format: `<data_dir>/<task>.jsonl`, one JSON object per line, holding exactly the strings
that are scored (the converters apply lm-evaluation-harness's prompt formatting), so the scorer
is task-agnostic:

  multiple choice   {"context": str, "choices": [str, ...], "label": int}
                    choice i is scored as the continuation " " + choices[i] of `context`.
                    WinoGrande adds "continuation": str (the harness's "multiple input"
                    form): choice i is scored as " " + continuation given context + choices[i].
  lambada           {"context": str, "target": str}: the last word `target` is scored as
                    " " + target given `context`.
  wikitext          {"page": str}: one raw WikiText document; it is detokenized as the harness
                    does before scoring, and its words are counted before detokenization.

Prompt formats (lm-evaluation-harness v0.4 task configs, zero-shot, target delimiter " "):

  piqa            "Question: {goal}\\nAnswer:"  → [sol1, sol2]                 acc, acc_norm, acc_bytes
  hellaswag       preprocess("{activity_label}: {ctx_a} {ctx_b.capitalize()}")
                  → [preprocess(ending) ...]; preprocess strips, turns " [title]" into ". ",
                  drops every "[...]" tag and collapses double spaces          acc, acc_norm, acc_bytes
  winogrande      for each option: sentence[:blank] + option, scored on the part after
                  the blank (sentence[blank+1:].strip()); label = answer - 1   acc
  arc_easy/_challenge "Question: {question}\\nAnswer:" → choice texts;
                  label = index of answerKey among the choice labels          acc, acc_norm, acc_bytes
  siqa            "Q: {context} {question}\\nA:" → [answerA, answerB, answerC];
                  label = label - 1                                            acc
  boolq           "{passage}\\nQuestion: {question}?\\nAnswer:" → ["no", "yes"]  acc
  lambada_openai  context = text.split(" ")[:-1] joined by " ", target = the last piece;
                  acc = greedy match of the whole target, perplexity = exp(−mean ll)
  wikitext        whole documents, rolling windows; word/byte perplexity, bits per byte

Converters read the public release files (JSON lines, or a JSON list) or a Hugging Face split
exported with `datasets.load_dataset(...)[split].to_json(path)`; a label file (`*-labels.lst`,
one label per line) is given with --labels where the release keeps labels apart:

  python -m experiments.tasks convert piqa --src=dev.jsonl --labels=dev-labels.lst \\
      --out=~/.cache/nested/zeroshot/piqa.jsonl
  python -m experiments.tasks list        # the tasks, their sources and the expected paths
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from typing import Callable, Iterable, Iterator

from nested import fields
from nested.errors import UserError

# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  kind: str                   # "choice", "lastword" or "rolling": the local row format
  metrics: tuple[str, ...]    # what zeroshot.json reports for it
  table_metric: str           # the metric SPEC §4's Table 1 uses
  source: str                 # what to download, for the message when the file is missing
  convert: Callable[[dict, str | None], dict]  # one public row (+ separate label) → local row
  needs_labels: bool = False  # the original release keeps labels in a separate .lst file


def _arc_source(config: str, name: str) -> str:
  return (f"the Hugging Face dataset allenai/ai2_arc, config {config}, split test; or "
          f"{config}/{name}-Test.jsonl from AI2's ARC-V1-Feb2018 release")


# Filled below, after the converters; the order is SPEC §4's column order.
TASKS: dict[str, Task] = {}

# ----------------------------------------------------------------------------- converters


def _label(row: dict, separate: str | None, field: str = "label"):
  value = separate if separate is not None else row.get(field)
  if value is None or value == "" or value == -1:
    raise ValueError(f"the row has no label (field {field!r}; an unlabelled test split?)")
  return value


def piqa_row(row: dict, label: str | None = None) -> dict:
  return {"context": f"Question: {row['goal']}\nAnswer:", "choices": [row["sol1"], row["sol2"]],
          "label": int(_label(row, label))}


def hellaswag_preprocess(text: str) -> str:
  """lm-evaluation-harness's `hellaswag/utils.py:preprocess`: the brackets are WikiHow
  artifacts ("[title]", "[step]", ...)."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def hellaswag_row(row: dict, label: str | None = None) -> dict:
  ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
  return {"context": hellaswag_preprocess(row["activity_label"] + ": " + ctx),
          "choices": [hellaswag_preprocess(e) for e in row["endings"]],
          "label": int(_label(row, label))}


def winogrande_row(row: dict, label: str | None = None) -> dict:
  """Partial evaluation (Trinh & Le 2018), as the harness does: each option fills the blank
  and ends its context; the shared rest of the sentence is what gets scored."""
  sentence = row["sentence"]
  blank = sentence.index("_")
  return {"context": "",
          "choices": [sentence[:blank] + row["option1"], sentence[:blank] + row["option2"]],
          "continuation": sentence[blank + 1:].strip(),
          "label": {"1": 0, "2": 1}[str(_label(row, label, "answer"))]}


def arc_row(row: dict, label: str | None = None) -> dict:
  """AI2's release nests {"question": {"stem", "choices": [{"text", "label"}]}}; the Hugging
  Face export flattens it to {"question": str, "choices": {"text": [...], "label": [...]}}."""
  question = row["question"]
  if isinstance(question, dict):
    stem = question["stem"]
    texts = [c["text"] for c in question["choices"]]
    labels = [c["label"] for c in question["choices"]]
  else:
    stem, texts, labels = question, row["choices"]["text"], row["choices"]["label"]
  return {"context": f"Question: {stem}\nAnswer:", "choices": texts,
          "label": labels.index(str(_label(row, label, "answerKey")))}


def siqa_row(row: dict, label: str | None = None) -> dict:
  return {"context": f"Q: {row['context']} {row['question']}\nA:",
          "choices": [row["answerA"], row["answerB"], row["answerC"]],
          "label": int(_label(row, label)) - 1}


def boolq_row(row: dict, label: str | None = None) -> dict:
  """SuperGLUE's BoolQ (the harness's source; passages read "Title -- text") labels with
  0/1 or false/true; Google's original release names the field "answer"."""
  value = _label(row, label, "label" if "label" in row else "answer")
  if isinstance(value, str):
    value = {"true": 1, "false": 0, "1": 1, "0": 0}[value.strip().lower()]
  return {"context": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
          "choices": ["no", "yes"], "label": int(value)}


def lambada_row(row: dict, label: str | None = None) -> dict:
  """OpenAI's LAMBADA: the target is the last space-separated piece of `text`."""
  words = row["text"].split(" ")
  return {"context": " ".join(words[:-1]), "target": words[-1]}


def wikitext_pages(text: str) -> Iterator[str]:
  """Splits a raw WikiText file (wiki.test.raw) into documents at its top-level headings
  (" = Title = "), exactly as EleutherAI/wikitext_document_level does."""
  page: list[str] = []
  lines = text.split("\n")
  for line in lines:
    heading = line.replace("= = =", "===").replace("= =", "==").strip()
    if heading.startswith("= ") and heading.endswith(" ="):
      joined = "\n".join(page)
      if joined.strip():
        yield joined
      page = []
    page.append(line)
  yield "\n".join(page)


def wikitext_detokenize(page: str) -> str:
  """lm-evaluation-harness's `wikitext_detokenizer`: undoes WikiText's tokenization."""
  s = page.replace("s '", "s'")
  s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
  s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
  for p in (":", ";", ".", "!", "?", ","):
    s = s.replace(f" {p} ", f"{p} ")
  s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
  s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
  s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
  s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
  s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
  s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
  s = s.replace(" " + chr(176) + " ", chr(176))
  s = s.replace(" \n", "\n").replace("\n ", "\n")
  s = s.replace(" N ", " 1 ").replace(" 's", "'s")
  return s


def wikitext_words(page: str) -> int:
  """The harness counts words of the page *before* detokenization, splitting on whitespace
  runs (so a leading or trailing space counts as an empty word, as there)."""
  return len(re.split(r"\s+", page))


TASKS.update({t.name: t for t in [
    Task("wikitext", "rolling", ("word_perplexity", "byte_perplexity", "bits_per_byte"),
         "word_perplexity",
         "the Hugging Face dataset EleutherAI/wikitext_document_level, config "
         "wikitext-2-raw-v1, split test; or wiki.test.raw from wikitext-2-raw-v1.zip or "
         "wikitext-103-raw-v1.zip (WikiText-2 and -103 share their test set)",
         lambda row, label=None: {"page": row["page"]}),
    Task("lambada_openai", "lastword", ("perplexity", "acc"), "acc",
         "the Hugging Face dataset EleutherAI/lambada_openai, config default (English), split "
         "test; or OpenAI's lambada_test.jsonl", lambada_row),
    Task("piqa", "choice", ("acc", "acc_norm", "acc_bytes"), "acc",
         "the Hugging Face dataset ybisk/piqa, split validation; or dev.jsonl + dev-labels.lst "
         "(--labels) from physicaliqa-train-dev.zip", piqa_row, needs_labels=True),
    Task("hellaswag", "choice", ("acc", "acc_norm", "acc_bytes"), "acc_norm",
         "the Hugging Face dataset Rowan/hellaswag, split validation; or "
         "data/hellaswag_val.jsonl from github.com/rowanz/hellaswag", hellaswag_row),
    Task("winogrande", "choice", ("acc",), "acc",
         "the Hugging Face dataset allenai/winogrande, config winogrande_xl, split "
         "validation; or dev.jsonl from winogrande_1.1.zip", winogrande_row),
    Task("arc_easy", "choice", ("acc", "acc_norm", "acc_bytes"), "acc", _arc_source("ARC-Easy", "ARC-Easy"),
         arc_row),
    Task("arc_challenge", "choice", ("acc", "acc_norm", "acc_bytes"), "acc_norm",
         _arc_source("ARC-Challenge", "ARC-Challenge"), arc_row),
    Task("siqa", "choice", ("acc",), "acc",
         "the Hugging Face dataset allenai/social_i_qa, split validation; or dev.jsonl + "
         "dev-labels.lst (--labels) from socialiqa-train-dev.zip", siqa_row, needs_labels=True),
    Task("boolq", "choice", ("acc",), "acc",
         "the Hugging Face dataset super_glue (aps/super_glue), config boolq, split "
         "validation; or BoolQ/val.jsonl from SuperGLUE's release", boolq_row),
]})

# ----------------------------------------------------------------------------- files


def default_data_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "nested", "zeroshot")


def resolve_data_dir(data_dir: str) -> str:
  return os.path.abspath(os.path.expanduser(data_dir)) if data_dir else default_data_dir()


def task_path(name: str, data_dir: str) -> str:
  return os.path.join(resolve_data_dir(data_dir), f"{name}.jsonl")


def missing_message(name: str, data_dir: str) -> str:
  task = TASKS[name]
  labels = " --labels=<the .lst label file>" if task.needs_labels else ""
  return (f"skipped {name}: {task_path(name, data_dir)} does not exist. Download {task.source}, "
          f"then run `python -m experiments.tasks convert {name} --src=<downloaded file>{labels} "
          f"--out={task_path(name, data_dir)}`.")


def parse_tasks(spec: str) -> list[str]:
  """`config.zeroshot.tasks`: a comma list of task names; '' or 'all' = every task."""
  names = fields.names(spec)
  if not names or names == ("all",):
    return list(TASKS)
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise UserError(f"Unknown zero-shot task(s) {unknown} in --config.zeroshot.tasks. Known "
                    f"tasks: {','.join(TASKS)} (or leave it empty for all of them).")
  return list(names)


def _read_records(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) from JSON lines, or from a file holding one JSON list."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    yield from enumerate(json.loads(text), start=1)
    return
  for i, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      yield i, json.loads(line)


def _check_row(kind: str, row: dict) -> None:
  """The local format, so a bad file fails on its first bad line, not inside the scorer."""
  if kind == "rolling":
    ok = isinstance(row.get("page"), str)
  elif kind == "lastword":
    ok = isinstance(row.get("context"), str) and isinstance(row.get("target"), str) \
        and bool(row["target"])
  else:
    choices = row.get("choices")
    ok = (isinstance(row.get("context"), str) and isinstance(choices, list)
          and len(choices) >= 2 and all(isinstance(c, str) for c in choices)
          and isinstance(row.get("label"), int) and 0 <= row["label"] < len(choices)
          and isinstance(row.get("continuation", ""), str))
  if not ok:
    raise ValueError(f"not a {kind!r} row of the local format (see experiments/tasks.py)")


def load(name: str, path: str, limit: int = 0) -> list[dict]:
  """The first `limit` rows (0 = all) of a local task file, checked."""
  kind = TASKS[name].kind
  rows = []
  try:
    for lineno, row in _read_records(path):
      try:
        _check_row(kind, row)
      except ValueError as e:
        raise UserError(f"{path}:{lineno}: {e}. Regenerate it with `python -m experiments.tasks "
                        f"convert {name} ...`.") from e
      rows.append(row)
      if limit and len(rows) >= limit:
        break
  except json.JSONDecodeError as e:
    raise UserError(f"{path} is not JSON lines ({e}). Regenerate it with `python -m "
                    f"experiments.tasks convert {name} ...`.") from e
  if not rows:
    raise UserError(f"{path} holds no rows.")
  return rows


def convert_rows(name: str, src: str, labels: str | None = None) -> Iterator[dict]:
  """Local rows from a public release file (for wikitext also a raw wiki.*.raw file)."""
  task = TASKS[name]
  if name == "wikitext":
    yield from _wikitext_rows(src)
    return
  label_list = None
  if labels:
    with open(labels, encoding="utf-8") as f:
      label_list = [line.strip() for line in f if line.strip()]
  records = list(_read_records(src))
  if label_list is not None and len(label_list) != len(records):
    raise UserError(f"{labels} holds {len(label_list)} labels but {src} holds {len(records)} "
                    f"rows: pass the label file of the same split.")
  for i, (lineno, row) in enumerate(records):
    try:
      yield task.convert(row, label_list[i] if label_list is not None else None)
    except (KeyError, ValueError, TypeError, AttributeError) as e:
      hint = " Pass the split's label file with --labels." if task.needs_labels else ""
      raise UserError(f"{src}:{lineno}: not a {name} row of a known release format "
                      f"({type(e).__name__}: {e}).{hint}") from e


def _wikitext_rows(src: str) -> Iterator[dict]:
  """Documents from a raw wiki.*.raw file, from an export of EleutherAI/wikitext_document_level
  ({"page": ...} rows), or from an export of the line-level Salesforce/wikitext ({"text": line}
  rows, which join back into the raw file)."""
  if src.endswith((".jsonl", ".json")):
    records = [row for _, row in _read_records(src)]
    if records and "page" in records[0]:
      yield from ({"page": r["page"]} for r in records)
      return
    try:
      raw = "".join(r["text"] for r in records)
    except (KeyError, TypeError) as e:
      raise UserError(f"{src}: wikitext rows need a 'page' (one document) or a 'text' (one line "
                      f"of the raw file) field.") from e
  else:
    with open(src, encoding="utf-8") as f:
      raw = f.read()
  yield from ({"page": p} for p in wikitext_pages(raw))


def write_jsonl(rows: Iterable[dict], out: str) -> int:
  """Writes to a temporary file and renames it, so a failed conversion leaves no task file."""
  out = os.path.abspath(os.path.expanduser(out))
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f"{out}.tmp.{os.getpid()}"
  n = 0
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        n += 1
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return n


def convert(name: str, src: str, out: str, labels: str | None = None) -> int:
  if name not in TASKS:
    raise UserError(f"Unknown task {name!r}; known tasks: {', '.join(TASKS)}.")
  if not os.path.isfile(src):
    raise UserError(f"--src={src} does not exist. Download {TASKS[name].source}.")
  return write_jsonl(convert_rows(name, src, labels), out)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.tasks", description=(
      "Convert zero-shot tasks from their public release into the local JSONL format."))
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert", help="public release file → <data_dir>/<task>.jsonl")
  conv.add_argument("task", choices=list(TASKS))
  conv.add_argument("--src", required=True, help="the downloaded file (.jsonl/.json; "
                    "for wikitext also wiki.test.raw)")
  conv.add_argument("--out", default="", help="default: <data_dir>/<task>.jsonl")
  conv.add_argument("--labels", default=None, help="label file (*-labels.lst), for releases "
                    "that keep labels apart (PIQA, SIQA)")
  conv.add_argument("--data_dir", default="", help=f"default: {default_data_dir()}")
  lister = sub.add_parser("list", help="the tasks, their public sources and expected paths")
  lister.add_argument("--data_dir", default="")
  args = parser.parse_args(argv)
  try:
    if args.command == "list":
      for task in TASKS.values():
        path = task_path(task.name, args.data_dir)
        state = "present" if os.path.exists(path) else "missing"
        print(f"{task.name:15s} {state:8s} {path}\n{'':15s} source: {task.source}")
      return 0
    out = args.out or task_path(args.task, args.data_dir)
    n = convert(args.task, args.src, out, args.labels)
    print(f"wrote {n} {args.task} rows to {out}")
    return 0
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
