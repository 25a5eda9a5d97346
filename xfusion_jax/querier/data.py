"""MQDialog records: one dialogue window per record, read and written as JSON.

A dataset is a JSON list (or JSONL, one record per line) of records

  {"conversations": [{"from": NAME, "value": TEXT}, ...],
   "target_role": RESPONDER, "input_role": QUERIER, "role_pair_id": INT,
   "cluster_id": INT}        # cluster_id is optional

The last turn is the responder's and is the target response. The query is
the querier's last turn before it, and the turns before the target are the
context. Keys this module does not know are kept and written back, at the
record and at the turn level, so that a file read and written again keeps
its content.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile
from typing import Any, Iterable

from absl import logging

_RECORD_KEYS = ("conversations", "target_role", "input_role", "role_pair_id",
                "cluster_id")
_TURN_KEYS = ("from", "value")


class InvalidRecordError(ValueError):
  """A record that does not follow the MQDialog format.

  Attributes:
    path: the file the record came from.
    index: 0-based position of the record in the file.
    field: the offending field, such as "conversations[3].value".
  """

  def __init__(self, path: str, index: int, field: str, problem: str):
    super().__init__(
        f"{path}: record {index}, field {field!r}: {problem}. Fix or remove "
        "the record, or read with skip_invalid=True to skip it.")
    self.path = path
    self.index = index
    self.field = field


@dataclasses.dataclass(frozen=True)
class Turn:
  """One utterance: `{"from": speaker, "value": text}` in the JSON."""

  speaker: str
  text: str
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    return {"from": self.speaker, "value": self.text, **self.extra}


@dataclasses.dataclass(frozen=True)
class DialogueRecord:
  """One dialogue window that ends in the responder's turn.

  Attributes:
    conversations: the turns in order; the last is the target response.
    target_role: name of the responder.
    input_role: name of the querier.
    role_pair_id: id of the (responder, querier) pair within its dataset.
    cluster_id: query cluster, or None before clustering.
    extra: record keys outside the format, kept for writing back.
  """

  conversations: tuple[Turn, ...]
  target_role: str
  input_role: str
  role_pair_id: int
  cluster_id: int | None = None
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    record = {
        "conversations": [turn.to_json() for turn in self.conversations],
        "target_role": self.target_role,
        "input_role": self.input_role,
        "role_pair_id": self.role_pair_id,
    }
    if self.cluster_id is not None:
      record["cluster_id"] = self.cluster_id
    record.update(self.extra)
    return record


def _is_int(value: Any) -> bool:
  # bool is a subclass of int, but `true` is not a valid id.
  return isinstance(value, int) and not isinstance(value, bool)


def _parse_turn(raw: Any, path: str, index: int, position: int) -> Turn:
  field = f"conversations[{position}]"
  if not isinstance(raw, dict):
    raise InvalidRecordError(path, index, field,
                             f"expected an object, got {type(raw).__name__}")
  for key in _TURN_KEYS:
    if key not in raw:
      raise InvalidRecordError(path, index, f"{field}.{key}", "missing")
    if not isinstance(raw[key], str):
      raise InvalidRecordError(
          path, index, f"{field}.{key}",
          f"expected a string, got {type(raw[key]).__name__}")
  if not raw["from"]:
    raise InvalidRecordError(path, index, f"{field}.from", "empty speaker")
  extra = {k: v for k, v in raw.items() if k not in _TURN_KEYS}
  return Turn(speaker=raw["from"], text=raw["value"], extra=extra)


def parse_record(raw: Any, path: str = "<memory>",
                 index: int = 0) -> DialogueRecord:
  """Validate one decoded JSON record and return it as a `DialogueRecord`.

  Raises:
    InvalidRecordError: naming the file, the record index and the field.
  """
  if not isinstance(raw, dict):
    raise InvalidRecordError(path, index, "<record>",
                             f"expected an object, got {type(raw).__name__}")
  for key in ("conversations", "target_role", "input_role", "role_pair_id"):
    if key not in raw:
      raise InvalidRecordError(path, index, key, "missing")
  for key in ("target_role", "input_role"):
    if not isinstance(raw[key], str) or not raw[key]:
      raise InvalidRecordError(path, index, key,
                               f"expected a non-empty string, got {raw[key]!r}")
  if raw["target_role"] == raw["input_role"]:
    raise InvalidRecordError(path, index, "input_role",
                             "equals target_role; the querier must differ")
  if not _is_int(raw["role_pair_id"]):
    raise InvalidRecordError(path, index, "role_pair_id",
                             f"expected an integer, got {raw['role_pair_id']!r}")
  # A JSON null reads as "not clustered yet", like a missing key.
  cluster_id = raw.get("cluster_id")
  if cluster_id is not None and not _is_int(cluster_id):
    raise InvalidRecordError(path, index, "cluster_id",
                             f"expected an integer or null, got {cluster_id!r}")

  raw_turns = raw["conversations"]
  if not isinstance(raw_turns, list) or not raw_turns:
    raise InvalidRecordError(path, index, "conversations",
                             "expected a non-empty list of turns")
  turns = tuple(
      _parse_turn(t, path, index, i) for i, t in enumerate(raw_turns))
  last = len(turns) - 1
  if turns[-1].speaker != raw["target_role"]:
    raise InvalidRecordError(
        path, index, f"conversations[{last}].from",
        f"the last turn is by {turns[-1].speaker!r}, but it must be the "
        f"target response by target_role {raw['target_role']!r}")
  if not any(t.speaker == raw["input_role"] for t in turns[:-1]):
    raise InvalidRecordError(
        path, index, "conversations",
        f"no turn by input_role {raw['input_role']!r} before the response, "
        "so the record has no query")

  extra = {k: v for k, v in raw.items() if k not in _RECORD_KEYS}
  return DialogueRecord(
      conversations=turns,
      target_role=raw["target_role"],
      input_role=raw["input_role"],
      role_pair_id=raw["role_pair_id"],
      cluster_id=cluster_id,
      extra=extra)


def _decode_file(path: pathlib.Path,
                 skipped: list[InvalidRecordError] | None
                 ) -> list[tuple[int, Any]]:
  """Return `(index, decoded JSON)` per record of a JSON list or JSONL file."""
  text = path.read_text(encoding="utf-8")
  if text.lstrip().startswith("["):
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e}). Expected a JSON list of "
                       "MQDialog records or JSONL.") from e
    if not isinstance(items, list):
      raise ValueError(f"{path}: expected a JSON list of MQDialog records.")
    return list(enumerate(items))

  items = []
  index = 0
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      items.append((index, json.loads(line)))
    except json.JSONDecodeError as e:
      error = InvalidRecordError(str(path), index, "<record>",
                                 f"invalid JSON on line {line_number} ({e})")
      if skipped is None:
        raise error from e
      skipped.append(error)
    index += 1
  return items


def read_mqdialog(path: str | os.PathLike[str], *,
                  skip_invalid: bool = False,
                  skipped: list[InvalidRecordError] | None = None
                  ) -> list[DialogueRecord]:
  """Read and validate an MQDialog JSON list or JSONL file.

  Args:
    path: the file; UTF-8, a JSON list when its first non-blank character is
      "[", else one JSON record per line.
    skip_invalid: skip invalid records instead of raising on the first.
    skipped: when given (with skip_invalid), receives the error of each
      skipped record, which names its index and field.

  Raises:
    InvalidRecordError: for an invalid record unless skip_invalid is set.
    ValueError: when a file starting with "[" is not a valid JSON list.
  """
  path = pathlib.Path(path)
  # None makes the first invalid record raise.
  errors: list[InvalidRecordError] | None = None
  if skip_invalid:
    errors = skipped if skipped is not None else []
  decoded = _decode_file(path, errors)
  records = []
  for index, raw in decoded:
    try:
      records.append(parse_record(raw, str(path), index))
    except InvalidRecordError as error:
      if errors is None:
        raise
      errors.append(error)
  if errors:
    logging.warning("Skipped %d invalid records of %d in %s; first: %s",
                    len(errors), len(records) + len(errors), path, errors[0])
  return records


def write_mqdialog(records: Iterable[DialogueRecord],
                   path: str | os.PathLike[str]) -> None:
  """Write records as UTF-8 JSON (JSONL when the name ends in .jsonl).

  The file is written to a temporary name and renamed into place, so readers
  never see a partial file. Reading it back gives equal records, and
  writing those again gives the same bytes.
  """
  path = pathlib.Path(path)
  items = [record.to_json() for record in records]
  if path.suffix == ".jsonl":
    text = "".join(json.dumps(item, ensure_ascii=False) + "\n"
                   for item in items)
  else:
    text = json.dumps(items, ensure_ascii=False, indent=1) + "\n"
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent,
                                   suffix=".tmp", delete=False) as f:
    f.write(text)
  os.replace(f.name, path)


def response_of(record: DialogueRecord) -> str:
  """Return the target response: the text of the last turn."""
  return record.conversations[-1].text


def query_of(record: DialogueRecord) -> str:
  """Return the querier's last turn before the response."""
  for turn in reversed(record.conversations[:-1]):
    if turn.speaker == record.input_role:
      return turn.text
  raise ValueError(
      f"Record of pair {record.role_pair_id} has no turn by input_role "
      f"{record.input_role!r} before the response; parse_record rejects such "
      "records.")


def context_of(record: DialogueRecord) -> tuple[Turn, ...]:
  """Return the turns before the response, the query included."""
  return record.conversations[:-1]
