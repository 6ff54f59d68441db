"""The ledger: append-only, merges repeated steps, ε recomputed from JSON."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import dp_accounting as dpa
import pytest
from dp_accounting import dp_event as dpe

import accounting as A


def test_records_merge_and_epsilon_matches_dp_accounting(tmp_path):
  ledger = A.Ledger()
  assert ledger.epsilon(delta=1e-5) == 0.0
  for _ in range(300):
    ledger.record(A.PoissonDpSgd(1.1, 0.01, 1))
  for _ in range(200):
    ledger.record(A.PoissonDpSgd(2.0, 0.02, 1))
  assert len(ledger) == 2 and ledger.num_steps == 500
  acc = dpa.pld.PLDAccountant()
  acc.compose(dpe.PoissonSampledDpEvent(0.01, dpe.GaussianDpEvent(1.1)), 300)
  acc.compose(dpe.PoissonSampledDpEvent(0.02, dpe.GaussianDpEvent(2.0)), 200)
  assert ledger.epsilon(delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)

  path = tmp_path / "ledger.json"
  ledger.save(path)
  assert json.loads(path.read_text())["format"] == "dpfl-ledger"
  resumed = A.Ledger.load(path)
  assert resumed == ledger
  assert resumed.epsilon(delta=1e-5) == ledger.epsilon(delta=1e-5)
  resumed.record(A.PoissonDpSgd(2.0, 0.02, 50))  # resume and go on: a new entry
  resumed.record(A.PoissonDpSgd(2.0, 0.02, 50))  # ... which later steps extend
  assert resumed.num_steps == 600 and len(resumed) == 3
  acc.compose(dpe.PoissonSampledDpEvent(0.02, dpe.GaussianDpEvent(2.0)), 100)
  assert resumed.epsilon(delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_resume_never_merges_shuffled_epochs(tmp_path):
  # 10 steps per epoch. One run of 10 steps: each example once. A run of 5
  # steps, then a resumed run of 5 steps that reshuffles: an example can be in
  # both halves, so 2 participations. The sealed ledger must say 2, not 1.
  ledger = A.Ledger()
  for _ in range(5):
    ledger.record(A.ShuffledDpSgd(2.0, 100, 10, 1))
  assert ledger.entries == (A.ShuffledDpSgd(2.0, 100, 10, 5),)
  ledger.save(tmp_path / "l.json")
  resumed = A.Ledger.load(tmp_path / "l.json")
  for _ in range(5):
    resumed.record(A.ShuffledDpSgd(2.0, 100, 10, 1))
  two = dpe.SelfComposedDpEvent(dpe.GaussianDpEvent(2.0), 2)
  acc = dpa.pld.PLDAccountant()
  acc.compose(two)
  # (Two composed grids vs one exact σ/√2 Gaussian: equal up to discretisation.)
  assert resumed.epsilon(delta=1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-6)
  assert resumed.epsilon(delta=1e-5) > A.epsilon(A.ShuffledDpSgd(2.0, 100, 10, 10), delta=1e-5)


def test_entries_are_read_only_history():
  ledger = A.Ledger([A.PoissonDpSgd(1.0, 0.1, 5)])
  entries = ledger.entries
  assert isinstance(entries, tuple)
  ledger.record(A.PoissonDpSgd(1.0, 0.2, 5))
  assert len(entries) == 1 and len(ledger.entries) == 2


def test_ledger_refuses_mixed_privacy_units():
  ledger = A.Ledger([A.ElsDpSgd(1.0, 0.01, 10, 4)])
  ledger.record(A.UlsDpSgd(1.0, 0.1, 10))  # both user-level: fine
  with pytest.raises(ValueError, match="privacy"):
    ledger.record(A.PoissonDpSgd(1.0, 0.1, 10))
  with pytest.raises(ValueError, match="Mechanism"):
    ledger.record("poisson")


def test_ledger_epsilon_equals_mechanism_epsilon():
  m = A.ElsDpSgd(2.0, 0.01, 400, 4)
  ledger = A.Ledger()
  ledger.record(m.with_steps(150))
  ledger.record(m.with_steps(250))
  assert ledger.entries == (m,)
  assert ledger.epsilon(delta=1e-6) == A.epsilon(m, delta=1e-6)


def test_bad_ledger_json():
  with pytest.raises(ValueError, match="not a dpfl ledger"):
    A.Ledger.from_json('{"entries": []}')
  with pytest.raises(ValueError, match="version"):
    A.Ledger.from_json('{"format": "dpfl-ledger", "version": 99, "entries": []}')


# --- bad ledger files (issue 11) ------------------------------------------------------

def _write(tmp_path, data) -> str:
  path = tmp_path / "ledger.json"
  path.write_text(data if isinstance(data, str) else json.dumps(data))
  return str(path)


def _header(**changes):
  entry = A.PoissonDpSgd(1.0, 0.01, 10).to_dict()
  data = {"format": "dpfl-ledger", "version": 1, "privacy_unit": "example", "entries": [entry]}
  data.update(changes)
  return {k: v for k, v in data.items() if v is not _DROP}


_DROP = object()


@pytest.mark.parametrize("data,match", [
    (_header(entries=_DROP), "'entries' must be a list"),
    (_header(entries={"a": 1}), "'entries' must be a list"),
    (_header(entries=[{"type": "poisson_dp_sgd", "noise_multiplier": 1.0}]),
     "entry 0 is not a valid mechanism"),
    (_header(entries=[{"type": "poisson_dp_sgd", "noise_multiplier": -1.0,
                       "sampling_prob": 0.1, "num_steps": 3}]), "entry 0 .*noise_multiplier"),
    (_header(privacy_unit="user"), "header privacy_unit='user' does not match"),
    (_header(privacy_unit=_DROP), "header privacy_unit='<missing>'"),
    (_header(entries=[A.PoissonDpSgd(1.0, 0.01, 10).to_dict(),
                      A.UlsDpSgd(1.0, 0.01, 10).to_dict()]), "mix privacy units"),
    (_header(extra=1), "unknown ledger field"),
    (_header(version=2), "version must be 1"),
    ('{"format": "dpfl-ledger", "version": 1, "entr', "not valid JSON"),
    ("", "not valid JSON"),
])
def test_bad_ledger_files_raise_value_error_naming_the_file(tmp_path, data, match):
  # Was: KeyError (no "entries"), raw JSONDecodeError (truncated), and a
  # header privacy_unit that nothing read.
  path = _write(tmp_path, data)
  with pytest.raises(ValueError, match=match) as info:
    A.Ledger.load(path)
  assert path in str(info.value)


def test_empty_ledger_round_trips(tmp_path):
  A.Ledger().save(tmp_path / "l.json")
  assert len(A.Ledger.load(tmp_path / "l.json")) == 0


def test_check_compatible_names_the_mismatch():
  example = A.Ledger([A.PoissonDpSgd(1.0, 0.01, 10)])
  example.check_compatible(privacy_unit="example", accountant="rdp")
  with pytest.raises(ValueError, match="privacy_unit='user' does not match"):
    example.check_compatible(privacy_unit="user")
  els = A.Ledger([A.ElsDpSgd(1.0, 0.01, 10, 4)])
  els.check_compatible(privacy_unit="user", accountant="pld")
  with pytest.raises(ValueError, match="accountant must be 'pld'.*els_dp_sgd"):
    els.check_compatible(privacy_unit="user", accountant="rdp")
  A.Ledger().check_compatible(privacy_unit="user", accountant="rdp")  # empty: anything
  with pytest.raises(ValueError, match="privacy_unit must be one of"):
    example.check_compatible(privacy_unit="household")


def test_a_save_killed_midway_leaves_nothing_behind_after_the_next_save(tmp_path):
  # Was: each killed save left an orphan ".ledger-XXXX.json" for ever.
  path = tmp_path / "ledger.json"
  code = textwrap.dedent(f"""
      import os, signal
      import accounting as A
      os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # dies before the rename
      A.Ledger([A.PoissonDpSgd(1.0, 0.01, 10)]).save({str(path)!r})
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert proc.returncode == -signal.SIGKILL, proc.stderr
  assert os.listdir(tmp_path)  # the killed save left its temp file
  ledger = A.Ledger([A.PoissonDpSgd(1.0, 0.01, 20)])
  ledger.save(path)
  assert os.listdir(tmp_path) == ["ledger.json"]
  assert A.Ledger.load(path) == ledger
