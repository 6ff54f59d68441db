"""MatrixMechanism's participation kind: recorded, validated, same Gaussian ε."""

import json

import dp_accounting as dpa
import pytest

import accounting as A
from accounting import mechanisms
from accounting import plan as planning
from accounting.matrix import PARTICIPATIONS, MatrixMechanism, UserMatrixMechanism

DELTA = 1e-6


def test_default_is_min_separation_and_old_records_load():
  m = MatrixMechanism(1.0, 2.0, 256, "dense", 4, 64)
  assert m.participation == "min-sep"
  old = {k: v for k, v in m.to_dict().items() if k != "participation"}  # before issue 15
  assert mechanisms.from_dict(old) == m


@pytest.mark.parametrize("cls", [MatrixMechanism, UserMatrixMechanism])
def test_fixed_epoch_round_trips_and_is_one_gaussian(cls):
  m = cls(1.3, 0.9, 250, "dense", 4, 64, participation="fixed-epoch")  # ceil(250/64) = 4
  data = json.loads(json.dumps(m.to_dict()))
  assert data["participation"] == "fixed-epoch"
  again = mechanisms.from_dict(data)
  assert again == m and again != cls(1.3, 0.9, 250, "dense", 4, 64)
  acc = dpa.pld.PLDAccountant()
  acc.compose(dpa.GaussianDpEvent(1.3))
  assert A.epsilon(m, delta=DELTA) == pytest.approx(acc.get_epsilon(DELTA), rel=1e-3)


def test_ledger_records_the_pattern(tmp_path):
  ledger = A.Ledger()
  step = MatrixMechanism(1.1, 1.0, 8, "dense", 2, 4, num_steps=1, participation="fixed-epoch")
  for _ in range(3):
    ledger.record(step)
  ledger.save(tmp_path / "l.json")
  loaded = A.Ledger.load(tmp_path / "l.json")
  assert loaded.entries[0].participation == "fixed-epoch"
  assert "fixed-epoch" in (tmp_path / "l.json").read_text()


@pytest.mark.parametrize("kwargs,match", [
    (dict(participation="fixed"), "participation must be one of min-sep, fixed-epoch"),
    (dict(max_participations=3, min_separation=64, participation="fixed-epoch"),
     r"max_participations must be ceil\(planned_steps / min_separation\) = 4"),
])
def test_bad_participation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MatrixMechanism(1.0, 1.0, 256, "dense", **kwargs)


def test_plan_passes_the_pattern_to_the_mechanism():
  assert PARTICIPATIONS == ("min-sep", "fixed-epoch")
  noise = planning.NoisePlan(strategy="dense", planned_steps=256, sensitivity=1.0,
                             max_participations=4, min_separation=64,
                             participation="fixed-epoch")
  sampling = planning.SamplingPlan(scheme="cyclic", unit="example", population_size=64,
                                   batch_size=1)
  plan = planning.plan_run(privacy_unit="example", sampling=sampling, l2_clip_norm=1.0,
                           delta=DELTA, num_steps=256, noise=noise, noise_multiplier=2.0)
  assert plan.mechanism(256).participation == "fixed-epoch"
  assert planning.PrivacyPlan.from_json(plan.to_json()) == plan
  with pytest.raises(ValueError, match="participation must be one of"):
    planning.NoisePlan(strategy="dense", planned_steps=8, participation="epoch")
