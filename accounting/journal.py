"""Write-ahead accounting of one planned run: its steps are recorded before they run.

A ``RunJournal`` holds a ``PrivacyPlan``, the ledger entries of earlier runs
the plan extends (``prior``), and the number of steps this run has recorded.
Training asks it for every step *before* the step's noise is drawn
(``record_step``): the journal refuses a step the budget does not cover
(``BudgetExhaustedError``), and otherwise counts it — durably, when it is
attached to a directory, by rewriting ``ledger.json`` atomically (fsynced)
before returning. A crash can therefore only over-count: a step is on disk
before anything computed from its noise exists.

The run's own accounting is always ``plan.mechanism(steps)``, one entry, so a
resumed run is the same mechanism as an uninterrupted one (a matrix
mechanism stays ONE Gaussian release across restarts). Files in the
directory: ``run.json`` (the plan, the prior entries, explicit extensions,
digests of explicit resume keys) and ``ledger.json`` (an ordinary
``accounting.Ledger``: ``Ledger.load`` and ``dpfl`` tools read it).

Cost. Each write is an atomic rewrite with two fsyncs (~10 ms on a plain
disk). ``sync_steps`` > 1 writes the count that many steps ahead (capped at
the limit), once per that many steps: a crash then over-counts by fewer than
``sync_steps`` steps, never under-counts; ``flush`` (called by checkpoint
saves and at the end of the run) writes the exact count.

Budget. With a target ε the plan was calibrated so that its planned steps
stay within it; steps past the plan need ``extend`` and are checked against
the target. Without a target the planned steps are the limit; ``extend``
raises it and is recorded in ``run.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from accounting import mechanisms as mech
from accounting.ledger import Ledger, check_header, parse_json, write_atomically
from accounting.plan import BudgetExhaustedError, PrivacyPlan, compose_after
from accounting import validate as check

RUN_FILE = "run.json"
LEDGER_FILE = "ledger.json"
_FORMAT = "dpfl-run"
_VERSION = 1


class RunJournal:
  """The write-ahead record of one planned run (see the module docstring).

  Args:
    plan: the run's ``PrivacyPlan``.
    prior: entries of a ledger the run extends (earlier runs on the same data).
    directory: where to keep ``run.json`` / ``ledger.json`` (None: in memory
      until ``attach``).
  """

  def __init__(self, plan: PrivacyPlan, *, prior: tuple[mech.Mechanism, ...] = (),
               directory: str | os.PathLike | None = None, sync_steps: int = 1):
    if not isinstance(plan, PrivacyPlan):
      raise ValueError(f"plan must be an accounting.plan.PrivacyPlan, got {plan!r:.80}")
    self.plan = plan
    self.prior = tuple(prior)
    self.sync_steps = check.positive_int("ledger_sync_steps", sync_steps)
    self.steps = 0
    self.written = 0  # steps the file on disk counts (>= steps once attached)
    self.extra_steps = 0
    self.used_keys: list[str] = []
    self.directory: str | None = None
    if directory is not None:
      self.attach(directory)

  # --- budget ------------------------------------------------------------------

  @property
  def limit(self) -> int:
    """How many steps the run may take, the planned ones plus explicit extensions."""
    return self.plan.num_steps + self.extra_steps

  @property
  def remaining(self) -> int:
    return max(0, self.limit - self.steps)

  def mechanism(self, steps: int | None = None) -> mech.Mechanism | None:
    """Prior entries and this run's first ``steps`` (default: recorded) steps, composed."""
    steps = self.steps if steps is None else steps
    if steps == 0:
      return mech.Composed(self.prior) if len(self.prior) > 1 else (
          self.prior[0] if self.prior else None)
    return compose_after(self.prior, self.plan.mechanism(steps))

  def epsilon(self, steps: int | None = None, *, delta: float | None = None) -> float:
    """ε of the prior entries and ``steps`` (default: the recorded) steps of the run."""
    from accounting import accountants
    mechanism = self.mechanism(steps)
    if mechanism is None:
      return 0.0
    return accountants.epsilon(mechanism, delta=self.plan.delta if delta is None else delta,
                               accountant=self.plan.accountant)

  def check_step(self, count: int = 1) -> None:
    """Raises ``BudgetExhaustedError`` unless ``count`` more steps fit the budget."""
    count = check.positive_int("count", count)
    if self.steps + count <= self.limit:
      return
    spent = self.epsilon()
    target = self.plan.target_epsilon
    if target is not None:
      budget = f"the target epsilon={target:g}"
      advice = ("it would take epsilon past the target; a larger target needs a new "
                "plan (make_private again)")
    else:
      budget = f"the {self.limit} planned steps"
      advice = ("the run has no target epsilon, so its planned steps are its limit; "
                "call extend(num_steps) to go past them (recorded)")
    raise BudgetExhaustedError(
        f"privacy budget exhausted: {self.steps} of {self.limit} steps done, epsilon spent "
        f"= {spent:.6g} (delta={self.plan.delta:g}); one more step is not covered by "
        f"{budget}: {advice}", spent=spent, target=target, steps=self.steps,
        limit=self.limit)

  def record_step(self) -> int:
    """Counts one step, durably, before it runs; returns its 1-based index.

    Raises:
      BudgetExhaustedError: the step is past the budget (nothing recorded).
    """
    self.check_step(1)
    self.steps += 1
    if self.directory is not None and self.steps > self.written:
      # Written ahead: the file counts this step, and (with sync_steps > 1)
      # the next ones up to the limit, before any of them runs.
      try:
        self._write_ledger(min(self.limit, self.steps + self.sync_steps - 1))
      except BaseException:
        self.steps -= 1
        raise
    return self.steps

  def flush(self) -> None:
    """Writes the exact step count (steps written ahead but not taken were never run)."""
    if self.directory is not None and self.written != self.steps:
      self._write_ledger(self.steps)

  def extend(self, num_steps: int) -> None:
    """Allows ``num_steps`` more steps than planned (recorded in ``run.json``).

    With a target ε the extended run must still meet it
    (``BudgetExhaustedError`` otherwise); a matrix mechanism cannot extend
    past its planned rows (``ValueError``).
    """
    num_steps = check.positive_int("num_steps", num_steps)
    new_limit = self.limit + num_steps
    noise = self.plan.noise
    if noise.is_matrix and not noise.amplified and new_limit > noise.planned_steps:
      raise ValueError(
          f"num_steps: a {noise.strategy!r} matrix mechanism has {noise.planned_steps} "
          f"planned rows; it cannot run {new_limit} steps (plan a new run instead)")
    target = self.plan.target_epsilon
    if target is not None:
      eps = self.epsilon(new_limit)
      if eps > target:
        raise BudgetExhaustedError(
            f"privacy budget exhausted: extending to {new_limit} steps would spend "
            f"epsilon={eps:.6g} > the target epsilon={target:g}", spent=self.epsilon(),
            target=target, steps=self.steps, limit=self.limit)
    self.extra_steps += num_steps
    self._write_run()

  def note_resume_key(self, key_digest: str) -> None:
    """Refuses a resume key already used by this run (its noise would repeat)."""
    if key_digest in self.used_keys:
      raise ValueError("key: this explicit noise key was already used by this run (to start "
                       "or resume it); its noise would repeat. Pass a new key, or None "
                       "for fresh OS entropy")
    self.used_keys.append(key_digest)
    self._write_run()

  # --- files ---------------------------------------------------------------------

  @property
  def ledger(self) -> Ledger:
    """An ``accounting.Ledger`` of the prior entries and this run's recorded steps."""
    return self._ledger(self.steps)

  def _ledger(self, steps: int) -> Ledger:
    entries = list(self.prior)
    if steps:
      entries.append(self.plan.mechanism(steps))
    units = {e.privacy_unit for e in entries}
    data = {"format": "dpfl-ledger", "version": 1, "privacy_unit": units.pop() if units else None,
            "entries": [e.to_dict() for e in entries]}
    return Ledger.from_dict(data)

  def attach(self, directory: str | os.PathLike) -> None:
    """Keeps the journal in ``directory`` from now on (writes both files now)."""
    directory = os.fspath(directory)
    if self.directory is not None and os.path.abspath(self.directory) == os.path.abspath(
        directory):
      return
    if os.path.exists(os.path.join(directory, RUN_FILE)):
      # Never overwrite another run's record: that would erase steps it released.
      raise ValueError(f"directory {directory!r} already holds a dpfl run ({RUN_FILE}); "
                       "restore it (private.restore), or use a new directory")
    os.makedirs(directory, exist_ok=True)
    self.directory = directory
    self._write_run()
    self._write_ledger()

  def _write_run(self) -> None:
    if self.directory is None:
      return
    data = {"format": _FORMAT, "version": _VERSION, "plan": self.plan.to_dict(),
            "prior": [e.to_dict() for e in self.prior], "extra_steps": self.extra_steps,
            "used_keys": self.used_keys}
    write_atomically(os.path.join(self.directory, RUN_FILE), json.dumps(data, sort_keys=True))

  def _write_ledger(self, steps: int | None = None) -> None:
    if self.directory is None:
      return
    steps = self.steps if steps is None else steps
    self._ledger(steps).save(os.path.join(self.directory, LEDGER_FILE))
    self.written = steps

  @classmethod
  def load(cls, directory: str | os.PathLike) -> "RunJournal":
    """The journal kept in ``directory`` (``ValueError`` naming the file if it is not one)."""
    directory = os.fspath(directory)
    run_path = os.path.join(directory, RUN_FILE)
    try:
      with open(run_path) as f:
        text = f.read()
    except FileNotFoundError:
      raise ValueError(f"directory {directory!r} holds no dpfl run ({RUN_FILE} is missing)") \
          from None
    try:
      data = parse_json(text)
      check_header(data, format=_FORMAT, version=_VERSION, what="run")
    except ValueError as e:
      raise ValueError(f"run file {run_path!r}: {e}") from None
    plan = PrivacyPlan.from_dict(data["plan"])
    prior = tuple(mech.from_dict(e) for e in data.get("prior", []))
    journal = cls(plan, prior=prior)
    journal.extra_steps = check.integer("extra_steps", data.get("extra_steps", 0), low=0)
    journal.used_keys = list(data.get("used_keys", []))
    ledger = Ledger.load(os.path.join(directory, LEDGER_FILE))
    entries = ledger.entries
    if tuple(entries[:len(prior)]) != prior or len(entries) > len(prior) + 1:
      raise ValueError(f"ledger {os.path.join(directory, LEDGER_FILE)!r} does not match "
                       f"{run_path!r}: its entries are not the run's prior entries plus one")
    if len(entries) == len(prior) + 1:
      run_entry = entries[-1]
      steps = run_entry.num_steps
      if run_entry != plan.mechanism(steps):
        raise ValueError(f"ledger {os.path.join(directory, LEDGER_FILE)!r}: its last entry is "
                         "not this run's plan")
      journal.steps = steps
    journal.written = journal.steps
    journal.directory = directory
    return journal


def key_digest(key_words: Any) -> str:
  """A digest of an explicit key's words (to refuse its reuse without storing it)."""
  return hashlib.sha256(repr([int(w) for w in key_words]).encode()).hexdigest()[:32]
