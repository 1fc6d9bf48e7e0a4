"""Config fields that hold a list, written as one comma-separated string ("16,64,8192").

Config files and `--config.a.b=` overrides use the string form: it survives the JSON round
trip of a checkpoint's or a sweep point's record unchanged (a tuple would come back as a
list). Spaces and empty entries are ignored ("16, 64," is (16, 64)).
"""

from __future__ import annotations

from nested.errors import UserError


def names(value) -> tuple[str, ...]:
  """"comedies, tragedies" → ('comedies', 'tragedies'); '' or None → ()."""
  return tuple(n.strip() for n in str(value or "").split(",") if n.strip())


def ints(value, *, field: str, example: str) -> tuple[int, ...]:
  """"16,64,8192" (or a sequence of ints) → (16, 64, 8192); a UserError naming `field` and an
  `example` of a good value if an entry is not a whole number."""
  entries = names(value) if isinstance(value, str) or value is None else tuple(value)
  try:
    return tuple(int(v) for v in entries)
  except ValueError:
    raise UserError(f"{field}={value!r} must be comma-separated whole numbers, e.g. "
                    f"{field}={example!r}.") from None

