"""Config fields that hold a list, written as one comma-separated string ("16,64,8192").

Config files and `--config.a.b=` overrides use the string form: it survives the JSON round
trip of a checkpoint's or a sweep point's record unchanged (a tuple would come back as a
list). Spaces around entries and empty entries are ignored ("16, 64," is (16, 64)); a list
or tuple, as code may pass, is read entry by entry.
"""

from __future__ import annotations

from nested.errors import UserError


def _entries(value) -> tuple:
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return tuple(n.strip() for n in str("" if value is None else value).split(",") if n.strip())


def names(value) -> tuple[str, ...]:
  """"comedies, tragedies" → ('comedies', 'tragedies'); '' or None → ()."""
  return tuple(str(n).strip() for n in _entries(value))


def ints(value, *, field: str, example: str) -> tuple[int, ...]:
  """"16,64,8192" (or 2048, or a sequence of ints) → (16, 64, 8192); a UserError naming
  `field` and an `example` of a good value if an entry is not a whole number."""
  try:
    return tuple(_whole(v) for v in _entries(value))
  except ValueError:
    raise UserError(f"{field}={value!r} must be comma-separated whole numbers, e.g. "
                    f"--{field}={example}.") from None


def _whole(entry) -> int:
  """An int from "16" or 16; ValueError for anything else (1.5, "x", True)."""
  if isinstance(entry, bool) or (isinstance(entry, float) and not entry.is_integer()):
    raise ValueError(entry)
  return int(entry)
