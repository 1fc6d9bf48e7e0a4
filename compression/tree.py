"""Parameter trees with some leaves compressed, and the directory that stores one.

A compressed tree is the parameter tree with chosen leaves replaced by `ExactTensor` /
`Int4Tensor` (registered pytrees), so it jits, shards and donates like any tree.
`decompress` runs inside the jitted forward pass: the dense weights exist only as
temporaries of the step that uses them (just-in-time decoding), and with the exact tier
they are bit for bit the weights that were compressed.

On disk a compressed tree is a directory written once:

  manifest.json   {"format": FORMAT, "version": 1, "metadata": {...caller's...},
                   "tensors": [{"path", "kind": "exact" | "int4" | "dense", "offset",
                                "nbytes", "shape", "dtype", "crc32" (dense only)}, ...]}
  tensors.bin     the leaves back to back: compressed ones as format-v1 blobs (each with its
                  own header and CRC32, see format.py), dense ones as raw C-order bytes

It is built in a temporary directory and renamed into place, so a reader sees all of it or
nothing; `load` checks every size and checksum, so a damaged file is an error, never
garbage weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from compression import codecs, format as fmt
from nested.errors import UserError
from nested.levels import param_path

FORMAT = "nested-jitdelta-tree"
VERSION = 1
MANIFEST, TENSORS = "manifest.json", "tensors.bin"


def is_compressed(x: Any) -> bool:
  return isinstance(x, (codecs.ExactTensor, codecs.Int4Tensor))


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
  """('/'-joined path, leaf) pairs, compressed tensors counted as single leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_compressed)
  return [(param_path(kp), leaf) for kp, leaf in flat]


def compress(params: Any, paths: Iterable[str], codec: str, *, dtype: str | None = None) -> Any:
  """`params` with the leaves at `paths` encoded with `codec` ("exact" or "int4").

  dtype: cast those leaves to this float type first (e.g. "bfloat16": the exact tier then
  reproduces the cast weights, not the originals); None keeps each leaf's own type.
  """
  chosen = set(paths)
  present = {path for path, _ in leaves_with_paths(params)}
  if chosen - present:
    raise UserError(f"no parameter at {sorted(chosen - present)[:5]}: paths must name leaves "
                    f"of the tree, e.g. {sorted(present)[:3]}.")

  def encode(keypath, leaf):
    if param_path(keypath) not in chosen:
      return leaf
    x = np.asarray(jax.device_get(leaf))
    return codecs.encode(x if dtype is None else x.astype(jnp.dtype(dtype)), codec)

  return jax.tree_util.tree_map_with_path(encode, params)


def decompress(tree: Any, decode: Callable[[Any], jax.Array] | None = None) -> Any:
  """The dense tree: every compressed leaf decoded (by default with the Pallas kernel, which
  runs in interpret mode on CPU); traceable, so it belongs inside the jitted step."""
  if decode is None:
    from compression import kernels
    decode = kernels.decode
  return jax.tree.map(lambda x: decode(x) if is_compressed(x) else x, tree,
                      is_leaf=is_compressed)


def select(params: Any, owner: Callable[[str], bool], *, min_size: int) -> list[str]:
  """Paths of the floating-point leaves that `owner(path)` claims and that hold at least
  `min_size` elements (small vectors such as norm scales cost more in headers than they save)."""
  return [path for path, leaf in leaves_with_paths(params)
          if owner(path) and jnp.issubdtype(leaf.dtype, jnp.floating)
          and math.prod(leaf.shape) >= min_size]


def array_bytes(tree: Any) -> int:
  """Bytes of every array (or ShapeDtypeStruct) in `tree`, compressed tensors' planes included."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def report(params: Any, tree: Any) -> list[dict[str, Any]]:
  """One row per compressed leaf: sizes before and after, bits per weight, escape rate."""
  dense = dict(leaves_with_paths(params))
  rows = []
  for path, t in leaves_with_paths(tree):
    if not is_compressed(t):
      continue
    before = dense[path]
    rows.append({"path": path, "codec": t.codec, "shape": list(t.shape),
                 "dtype": jnp.dtype(before.dtype).name, "stored_dtype": t.dtype,
                 "bytes_before": int(math.prod(before.shape) * jnp.dtype(before.dtype).itemsize),
                 "bytes_after": int(t.nbytes), "bits_per_weight": codecs.bits_per_weight(t),
                 "escape_rate": codecs.escape_rate(t)})
  return rows


# ----------------------------------------------------------------------------- storage


def _payload(leaf) -> tuple[str, bytes]:
  if is_compressed(leaf):
    return leaf.codec, fmt.to_bytes(leaf)
  return "dense", np.ascontiguousarray(np.asarray(jax.device_get(leaf))).tobytes()


def save(directory: str, tree: Any, metadata: dict[str, Any]) -> None:
  """Writes `tree` to `directory`, which must not exist yet (nothing is ever overwritten)."""
  if os.path.exists(directory):
    raise UserError(f"{directory} already exists; compressed trees are written once. Remove "
                    f"it to write it again.")
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
  try:
    entries, offset = [], 0
    with open(os.path.join(tmp, TENSORS), "wb") as f:
      for path, leaf in leaves_with_paths(tree):
        kind, blob = _payload(leaf)
        entry = {"path": path, "kind": kind, "offset": offset, "nbytes": len(blob),
                 "shape": list(leaf.shape), "dtype": jnp.dtype(leaf.dtype).name}
        if kind == "dense":
          entry["crc32"] = zlib.crc32(blob)
        entries.append(entry)
        f.write(blob)
        offset += len(blob)
    manifest = {"format": FORMAT, "version": VERSION, "metadata": metadata, "tensors": entries}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
      f.write("\n")
    os.rename(tmp, directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp)


def _damaged(directory: str, problem: str) -> UserError:
  return UserError(f"The compressed tree in {directory} is damaged or not ours ({problem}). "
                   f"Remove the directory and write it again with --mode=compress.")


def read_manifest(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise UserError(f"No compressed tree in {directory} (no {MANIFEST}). Write one with "
                    f"--mode=compress first.") from None
  except json.JSONDecodeError as e:
    raise _damaged(directory, f"{MANIFEST} is not JSON: {e}") from None
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise _damaged(directory, f"{MANIFEST} is not a {FORMAT} v{VERSION} manifest")
  return manifest


def _parse_entry(directory: str, entry: dict[str, Any], blob: bytes):
  if entry["kind"] == "dense":
    if zlib.crc32(blob) != entry.get("crc32"):
      raise _damaged(directory, f"CRC32 mismatch in dense tensor {entry['path']}")
    dtype = jnp.dtype(entry["dtype"])
    if len(blob) != math.prod(entry["shape"]) * dtype.itemsize:
      raise _damaged(directory, f"dense tensor {entry['path']} has the wrong size")
    return np.frombuffer(blob, dtype).reshape(entry["shape"]).copy()
  try:
    t = fmt.from_bytes(blob)
  except fmt.FormatError as e:
    raise _damaged(directory, f"tensor {entry['path']}: {e}") from None
  if t.codec != entry["kind"] or list(t.shape) != entry["shape"]:
    raise _damaged(directory, f"tensor {entry['path']} holds {t.codec} {list(t.shape)}, the "
                   f"manifest says {entry['kind']} {entry['shape']}")
  return t


def load(directory: str, like: Any) -> tuple[Any, dict[str, Any]]:
  """(tree, metadata): the tree saved in `directory`, in the structure of `like` (a tree with
  the same paths, e.g. the model's abstract parameters); leaves are numpy arrays."""
  manifest = read_manifest(directory)
  entries = {e["path"]: e for e in manifest["tensors"]}
  expected = [path for path, _ in leaves_with_paths(like)]
  if sorted(entries) != sorted(expected):
    missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    raise UserError(f"The compressed tree in {directory} holds other parameters than this model "
                    f"(missing {missing[:4]}, unexpected {extra[:4]}); it was written for "
                    f"another model. Compress this model's checkpoint instead.")
  leaves = []
  with open(os.path.join(directory, TENSORS), "rb") as f:
    for path in expected:
      entry = entries[path]
      f.seek(entry["offset"])
      blob = f.read(entry["nbytes"])
      if len(blob) != entry["nbytes"]:
        raise _damaged(directory, f"{TENSORS} is truncated at tensor {path}")
      leaves.append(_parse_entry(directory, entry, blob))
  treedef = jax.tree_util.tree_structure(like)
  return jax.tree_util.tree_unflatten(treedef, leaves), manifest["metadata"]
