"""The write-ahead journal of a planned run (accounting.journal)."""

import json
import os

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from accounting import plan as planning
from accounting.journal import LEDGER_FILE, RUN_FILE, RunJournal
from accounting.ledger import Ledger

Q, SIGMA, DELTA = 0.05, 1.1, 1e-6


def _plan(num_steps=8, **kwargs):
  sampling = planning.SamplingPlan(scheme="poisson", population_size=1000, sampling_prob=Q,
                                   batch_size=50)
  args = dict(noise_multiplier=SIGMA) if "target_epsilon" not in kwargs else {}
  args.update(kwargs)
  return planning.plan_run(privacy_unit="example", sampling=sampling, l2_clip_norm=1.0,
                           delta=DELTA, num_steps=num_steps, **args)


def _reference(steps):
  acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  acc.compose(dp_event.SelfComposedDpEvent(
      dp_event.PoissonSampledDpEvent(Q, dp_event.GaussianDpEvent(SIGMA)), steps))
  return acc.get_epsilon(DELTA)


def test_each_step_is_on_disk_when_recorded(tmp_path):
  journal = RunJournal(_plan(), directory=tmp_path)
  for k in range(1, 6):
    assert journal.record_step() == k
    assert Ledger.load(tmp_path / LEDGER_FILE).num_steps == k
  loaded = RunJournal.load(tmp_path)
  assert loaded.steps == 5 and loaded.plan == journal.plan
  assert loaded.epsilon() == pytest.approx(_reference(5), rel=2e-3)


def test_written_ahead_over_counts_until_flushed(tmp_path):
  journal = RunJournal(_plan(10), directory=tmp_path, sync_steps=4)
  on_disk = []
  for _ in range(5):
    journal.record_step()
    on_disk.append(Ledger.load(tmp_path / LEDGER_FILE).num_steps)
  assert on_disk == [4, 4, 4, 4, 8]  # never below the steps recorded
  assert RunJournal.load(tmp_path).steps == 8  # a crash now: 3 never-run steps count as done
  journal.flush()
  assert RunJournal.load(tmp_path).steps == 5
  for _ in range(5):
    journal.record_step()
  assert Ledger.load(tmp_path / LEDGER_FILE).num_steps == 10  # capped at the limit


def test_budget_and_extension(tmp_path):
  journal = RunJournal(_plan(3), directory=tmp_path)
  for _ in range(3):
    journal.record_step()
  with pytest.raises(planning.BudgetExhaustedError, match="3 planned steps") as err:
    journal.record_step()
  assert journal.steps == 3 and err.value.steps == 3 and err.value.target is None
  journal.extend(2)
  assert json.loads((tmp_path / RUN_FILE).read_text())["extra_steps"] == 2
  journal.record_step()
  journal.record_step()
  assert RunJournal.load(tmp_path).limit == 5
  targeted = RunJournal(_plan(6, target_epsilon=1.0))
  for _ in range(6):
    targeted.record_step()
  assert targeted.epsilon() <= 1.0
  with pytest.raises(planning.BudgetExhaustedError, match="target epsilon=1"):
    targeted.record_step()
  with pytest.raises(planning.BudgetExhaustedError):
    targeted.extend(50)


def test_prior_entries_compose_before_the_run(tmp_path):
  prior = (_plan(4).mechanism(),)
  journal = RunJournal(_plan(3), prior=prior, directory=tmp_path)
  assert journal.epsilon() == pytest.approx(_reference(4), rel=2e-3)
  for _ in range(3):
    journal.record_step()
  assert journal.epsilon() == pytest.approx(_reference(7), rel=2e-3)
  assert Ledger.load(tmp_path / LEDGER_FILE).epsilon(delta=DELTA) == journal.epsilon()
  assert RunJournal.load(tmp_path).prior == prior


def test_another_run_is_never_overwritten_and_bad_files_are_refused(tmp_path):
  RunJournal(_plan(), directory=tmp_path).record_step()
  with pytest.raises(ValueError, match="already holds a dpfl run"):
    RunJournal(_plan(), directory=tmp_path)
  with pytest.raises(ValueError, match="holds no dpfl run"):
    RunJournal.load(tmp_path / "missing")
  (tmp_path / RUN_FILE).write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    RunJournal.load(tmp_path)


@pytest.mark.parametrize("header,message", [
    ({"format": "dpfl-ledger", "version": 1}, r"not a dpfl run \(format must be 'dpfl-run'\)"),
    ({"format": "dpfl-run", "version": 2}, "run version must be 1, got 2"),
    ([], "not a dpfl run"),
])
def test_a_run_file_of_another_format_or_version_is_refused(tmp_path, header, message):
  RunJournal(_plan(), directory=tmp_path).record_step()
  data = json.loads((tmp_path / RUN_FILE).read_text())
  data = {**data, **header} if isinstance(header, dict) else header
  (tmp_path / RUN_FILE).write_text(json.dumps(data))
  with pytest.raises(ValueError, match=r"^run file .*run\.json': " + message):
    RunJournal.load(tmp_path)


def test_a_ledger_of_another_plan_is_refused(tmp_path):
  RunJournal(_plan(), directory=tmp_path).record_step()
  Ledger([_plan(5, noise_multiplier=2.0).mechanism(2)]).save(tmp_path / LEDGER_FILE)
  with pytest.raises(ValueError, match="not this run's plan"):
    RunJournal.load(tmp_path)
  assert not os.path.exists(tmp_path / (LEDGER_FILE + ".tmp"))
