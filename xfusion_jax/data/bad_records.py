"""Counting, logging and skipping of bad input records.

A bad record (corrupt image bytes, wrong channel count, empty or non-UTF-8
caption, caption longer than the token budget) is skipped, never passed on.
Each kind is logged once, with the id of the first record of that kind, and
counted. When the bad fraction passes a threshold the run stops with
`TooManyBadRecordsError`, because a mostly broken dataset usually means a
wrong path or format rather than a few damaged files.
"""

from __future__ import annotations

import collections
import enum
import threading

from absl import logging


class BadRecordKind(enum.Enum):
  """Reason a record is skipped."""

  MISSING_FILE = "missing_file"
  CORRUPT_IMAGE = "corrupt_image"
  WRONG_CHANNELS = "wrong_channels"
  WRONG_SHAPE = "wrong_shape"
  EMPTY_CAPTION = "empty_caption"
  INVALID_UTF8 = "invalid_utf8"
  CAPTION_TOO_LONG = "caption_too_long"


class BadRecordError(ValueError):
  """Raised by a check on one record; the caller counts and skips it."""

  def __init__(self, kind: BadRecordKind, detail: str):
    super().__init__(f"{kind.value}: {detail}")
    self.kind = kind
    self.detail = detail


class TooManyBadRecordsError(RuntimeError):
  """Raised when the fraction of bad records passes the threshold."""


class BadRecordCounter:
  """Thread-safe counts of good and bad records with a bad-fraction limit.

  Grain runs the decode step in several threads, so updates take a lock.

  Attributes:
    max_bad_fraction: the run fails once bad / seen exceeds this.
    min_records: the fraction is checked only after this many records, so
      that one bad record among the first few does not end the run.
    name: dataset name used in log lines and errors.
  """

  def __init__(self,
               max_bad_fraction: float = 0.01,
               min_records: int = 100,
               name: str = "dataset"):
    if not 0.0 <= max_bad_fraction <= 1.0:
      raise ValueError(
          f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}.")
    self.max_bad_fraction = max_bad_fraction
    self.min_records = min_records
    self.name = name
    self._lock = threading.Lock()
    self._seen = 0
    self._bad = collections.Counter()

  @property
  def seen(self) -> int:
    return self._seen

  @property
  def bad(self) -> dict[BadRecordKind, int]:
    with self._lock:
      return dict(self._bad)

  @property
  def bad_total(self) -> int:
    with self._lock:
      return sum(self._bad.values())

  def add_good(self) -> None:
    with self._lock:
      self._seen += 1

  def add_bad(self, record_id: str, error: BadRecordError) -> None:
    """Count one skipped record, log its kind once, and enforce the limit."""
    with self._lock:
      self._seen += 1
      first_of_kind = error.kind not in self._bad
      self._bad[error.kind] += 1
      bad_total = sum(self._bad.values())
      seen = self._seen
    if first_of_kind:
      logging.warning(
          "%s: skipping record %s (%s). Further records of this kind are "
          "counted but not logged.", self.name, record_id, error)
    if seen >= self.min_records and bad_total > self.max_bad_fraction * seen:
      raise TooManyBadRecordsError(
          f"{self.name}: {bad_total} of {seen} records are bad "
          f"({bad_total / seen:.1%}), more than the allowed "
          f"{self.max_bad_fraction:.1%}. Counts by kind: {self.summary()}. "
          f"Record {record_id} was the last ({error}). Check the source "
          "files, or raise max_bad_fraction if this rate is expected.")

  def summary(self) -> str:
    with self._lock:
      parts = [f"{kind.value}={n}" for kind, n in sorted(
          self._bad.items(), key=lambda item: item[0].value)]
    return ", ".join(parts) if parts else "none"
