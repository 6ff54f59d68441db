"""The ledger: an append-only record of the mechanisms a run has executed.

Training code records each private step (or a block of identical steps) as a
mechanism description; ε is recomputed from the record at any time, by the
same ``accounting.epsilon`` the CLI uses. Consecutive records that differ
only in their step count are merged, so a million-step run is one entry.

Merging is sound only within one uninterrupted run: for shuffled batches,
steps 1..T of one shuffle sequence touch an example ceil(T/steps_per_epoch)
times, but a resumed run reshuffles, so an example may appear once more. A
ledger loaded from disk is therefore *sealed*: the first record after a
resume starts a new entry, never merging into the history it resumed from.

The JSON form is ``{"format": "dpfl-ledger", "version": 1, "privacy_unit":
..., "entries": [<mechanism dict>, ...]}``; ``Ledger.load`` resumes it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from accounting import accountants
from accounting import mechanisms as mech
from accounting import validate as check

_FORMAT = "dpfl-ledger"
_VERSION = 1
_KEYS = frozenset({"format", "version", "privacy_unit", "entries"})
_UNITS = ("example", "user")


class Ledger:
  """Append-only record of mechanisms; ε is always recomputed from it.

  Args:
    entries: mechanisms already run (e.g. earlier runs on the same data), in
      the order they ran.
  """

  def __init__(self, entries: Iterable[mech.Mechanism] = ()):
    self._entries: list[mech.Mechanism] = []
    self._sealed = 0  # entries before this index never absorb new records
    for entry in entries:
      self.record(entry)

  @property
  def entries(self) -> tuple[mech.Mechanism, ...]:
    """The recorded mechanisms, oldest first (read-only)."""
    return tuple(self._entries)

  @property
  def privacy_unit(self) -> str | None:
    return self._entries[0].privacy_unit if self._entries else None

  @property
  def num_steps(self) -> int:
    return sum(e.num_steps for e in self._entries)

  def record(self, mechanism: mech.Mechanism) -> None:
    """Appends what was just run. Never rewrites history, only extends it."""
    if not isinstance(mechanism, mech.Mechanism):
      raise ValueError(f"mechanism must be an accounting Mechanism, got {mechanism!r}")
    for phase in mech.flatten(mechanism):
      if self._entries and phase.privacy_unit != self.privacy_unit:
        raise ValueError(
            f"mechanism protects a {phase.privacy_unit!r} but this ledger records "
            f"{self.privacy_unit!r}-level privacy; use a separate ledger")
      merged = self._merged(phase)
      if merged is None:
        self._entries.append(phase)
      else:
        self._entries[-1] = merged

  def _merged(self, phase: mech.Mechanism) -> mech.Mechanism | None:
    """The last entry extended by ``phase``, or None if they are separate runs."""
    last = self._entries[-1] if len(self._entries) > self._sealed else None
    if last is None or type(last) is not type(phase):
      return None
    try:
      if last.with_steps(1) != phase.with_steps(1):
        return None
      return last.with_steps(last.num_steps + phase.num_steps)
    except ValueError:
      # The mechanism has no room for more steps (a matrix mechanism's n is
      # used up): what follows is a new run, composed after this one.
      return None

  def mechanism(self) -> mech.Mechanism:
    """Everything recorded, as one (composed) mechanism."""
    if not self._entries:
      raise ValueError("the ledger is empty: nothing has been run yet")
    if len(self._entries) == 1:
      return self._entries[0]
    return mech.Composed(tuple(self._entries))

  def epsilon(self, *, delta: float, accountant: str = "pld", discretization=None) -> float:
    """ε spent so far at ``delta`` (0 if nothing has been run)."""
    if not self._entries:
      return 0.0
    return accountants.epsilon(self.mechanism(), delta=delta, accountant=accountant,
                               discretization=discretization)

  # --- serialisation -------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    return {"format": _FORMAT, "version": _VERSION, "privacy_unit": self.privacy_unit,
            "entries": [e.to_dict() for e in self._entries]}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True)

  def check_compatible(self, *, privacy_unit: str | None = None,
                       accountant: str | None = None) -> None:
    """Raises ``ValueError`` unless a run with this unit and accountant can extend it.

    Args:
      privacy_unit: ``"example"`` or ``"user"``: what the new run protects.
        An empty ledger accepts either.
      accountant: ``"pld"`` or ``"rdp"``: the back end ε will be computed
        with. RDP cannot account mechanisms dp-accounting supports with the
        PLD only (ELS, truncated Poisson).
    """
    if privacy_unit is not None:
      check.choice("privacy_unit", privacy_unit, _UNITS)
      if self._entries and privacy_unit != self.privacy_unit:
        raise ValueError(
            f"privacy_unit={privacy_unit!r} does not match this ledger, which records "
            f"{self.privacy_unit!r}-level privacy; use a separate ledger")
    if accountant is not None:
      check.choice("accountant", accountant, accountants.ACCOUNTANTS)
      pld_only = sorted({e.kind for e in self._entries if e.pld_only})
      if accountant == "rdp" and pld_only:
        raise ValueError(
            f"accountant must be 'pld' for this ledger: it records {', '.join(pld_only)}, "
            "which the RDP back end does not support")

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "Ledger":
    """Rebuilds a ledger from ``to_dict``'s form, checking every header field."""
    check_header(data, format=_FORMAT, version=_VERSION, what="ledger")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
      raise ValueError(f"unknown ledger field(s) {', '.join(map(repr, unknown))}; a version "
                       f"{_VERSION} ledger has {', '.join(sorted(_KEYS))}")
    if not isinstance(data.get("entries"), list):
      raise ValueError("ledger 'entries' must be a list of mechanisms, got "
                       f"{data.get('entries', '<missing>')!r:.80}")
    entries = []
    for i, entry in enumerate(data["entries"]):
      try:
        entries.append(mech.from_dict(entry))
      except (TypeError, ValueError) as e:
        raise ValueError(f"ledger entry {i} is not a valid mechanism: {e}") from None
    units = {e.privacy_unit for e in entries}
    if len(units) > 1:
      raise ValueError(f"ledger entries mix privacy units {sorted(units)}; a ledger records one")
    unit = units.pop() if units else None
    if "privacy_unit" not in data or data["privacy_unit"] != unit:
      raise ValueError(f"ledger header privacy_unit={data.get('privacy_unit', '<missing>')!r} "
                       f"does not match its entries ({unit!r})")
    ledger = cls()
    ledger._entries = entries  # kept exactly as saved
    ledger._sealed = len(ledger._entries)
    return ledger

  @classmethod
  def from_json(cls, text: str) -> "Ledger":
    return cls.from_dict(parse_json(text))

  def save(self, path: str | os.PathLike) -> None:
    """Writes atomically: a crash never truncates a ledger, nor leaves litter.

    See ``write_atomically``.
    """
    write_atomically(path, self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike) -> "Ledger":
    """Reads a ledger written by ``save``; ``ValueError`` naming the file if it is not one."""
    with open(path) as f:
      text = f.read()
    try:
      return cls.from_json(text)
    except ValueError as e:
      raise ValueError(f"ledger file {os.fspath(path)!r}: {e}") from None

  def __len__(self) -> int:
    return len(self._entries)

  def __eq__(self, other) -> bool:
    return isinstance(other, Ledger) and self._entries == other._entries

  def __repr__(self) -> str:
    return f"Ledger({self._entries!r})"


def parse_json(text: str) -> Any:
  """The value of the JSON ``text`` of a saved file (ledger, plan, run).

  Raises:
    ValueError: saying the text is not valid JSON (a truncated or corrupted
      file, typically), with the parser's position.
  """
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f"not valid JSON (truncated or corrupted?): {e}") from None


def check_header(data: Any, *, format: str, version: int, what: str) -> None:
  """Checks that ``data`` is a dict saved as ``format`` at ``version``.

  Args:
    data: the parsed file (``parse_json``).
    format: the ``"format"`` field it must have, e.g. ``"dpfl-ledger"``.
    version: the ``"version"`` field it must have.
    what: the kind of file, for the message, e.g. ``"ledger"``.

  Raises:
    ValueError: ``not a dpfl {what}`` for another format (or not a dict),
      ``{what} version must be ...`` for another version.
  """
  if not isinstance(data, dict) or data.get("format") != format:
    raise ValueError(f"not a dpfl {what} (format must be {format!r})")
  if data.get("version") != version:
    raise ValueError(f"{what} version must be {version}, got {data.get('version')!r}")


def write_atomically(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` so that a crash leaves the old file or the new one.

  The data goes to ``path + ".tmp"`` (one fixed name, so a write killed half
  way leaves at most that file, which the next write overwrites), is fsynced,
  and replaces ``path`` in one rename; the directory is fsynced too, so the
  rename itself survives a power loss.
  """
  path = os.fspath(path)
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  try:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
