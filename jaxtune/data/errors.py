"""DataError: the one exception for bad data, naming where it is and what was expected.

Bad input must stop a run before training with a message a person can act on. Every record
error says the file and line (or record index), the field and what was expected:

    data/chat.jsonl:7: field 'messages[2].role': unknown role 'bot'; expected one of
    'system', 'user', 'assistant'

Record-level errors carry a `reason` (a short snake_case key such as 'unknown_role') so that
`data.on_bad_record=skip` can count skipped records by reason. Errors about the setup
(no files found, a tokenizer without a chat template) have no record and are never skipped.
"""

from __future__ import annotations


class DataError(ValueError):
  """Bad data or data setup. `where` is 'file:line' or 'file record i' ('' for setup)."""

  def __init__(self, message: str, *, where: str = "", field: str = "", reason: str = ""):
    self.where = where
    self.field = field
    self.reason = reason or "invalid"
    prefix = where + ": " if where else ""
    if field:
      prefix += f"field {field!r}: "
    super().__init__(prefix + message)

  @property
  def skippable(self) -> bool:
    """True for errors about one record (skipped under data.on_bad_record=skip)."""
    return bool(self.where)


def bad_record(where: str, field: str, message: str, reason: str) -> DataError:
  """A record-level DataError; `message` says what is wrong and what was expected."""
  return DataError(message, where=where, field=field, reason=reason)
