"""Mechanism descriptions: validation, serialisation, inputs from epochs."""

import json
import math

import pytest
import scipy.stats

import accounting as A
from accounting import mechanisms


ALL = [
    A.PoissonDpSgd(1.1, 0.01, 1000),
    A.UlsDpSgd(1.1, 0.01, 1000),
    A.ElsDpSgd(1.0, 0.01, 100, 8),
    A.ShuffledDpSgd(1.0, 60000, 256, 700),
    A.TruncatedPoissonDpSgd(1.0, 0.01, 10000, 150, 30),
    A.Composed((A.PoissonDpSgd(1.0, 0.01, 10), A.PoissonDpSgd(2.0, 0.02, 5))),
]


@pytest.mark.parametrize("m", ALL, ids=lambda m: m.kind)
def test_json_round_trip(m):
  again = A.from_dict(json.loads(json.dumps(m.to_dict())))
  assert again == m and type(again) is type(m)
  assert repr(again.dp_event()) == repr(m.dp_event())


def test_binomial_weights_match_scipy():
  for k, q in [(1, 0.3), (8, 0.01), (50, 0.2), (400, 0.001)]:
    ours = mechanisms.binomial_pmf(k, q)
    ref = scipy.stats.binom.pmf(range(k + 1), k, q)
    assert ours == pytest.approx(list(ref), rel=1e-9, abs=1e-300)
    assert math.fsum(ours) == pytest.approx(1.0, abs=1e-12)


def test_els_event_is_the_binomial_mixture():
  m = A.ElsDpSgd(1.5, 0.05, 7, 4)
  event = m.dp_event()
  assert event.count == 7
  mog = event.event
  assert mog.standard_deviation == 1.5
  assert list(mog.sensitivities) == [0, 1, 2, 3, 4]
  assert mog.sampling_probs == pytest.approx(list(scipy.stats.binom.pmf(range(5), 4, 0.05)))


@pytest.mark.parametrize("ctor,match", [
    (lambda: A.PoissonDpSgd(0.0, 0.1, 10), "noise_multiplier must be a finite number > 0"),
    (lambda: A.PoissonDpSgd(-1.0, 0.1, 10), "noise_multiplier"),
    (lambda: A.PoissonDpSgd(float("nan"), 0.1, 10), "noise_multiplier"),
    (lambda: A.PoissonDpSgd(1.0, 0.0, 10), r"sampling_prob must be in \(0, 1\]"),
    (lambda: A.PoissonDpSgd(1.0, 1.5, 10), "sampling_prob"),
    (lambda: A.PoissonDpSgd(1.0, 0.1, 0), r"num_steps must be an integer in \[1, 100000000\]"),
    (lambda: A.PoissonDpSgd(1.0, 0.1, 2.5), "num_steps"),
    (lambda: A.ElsDpSgd(1.0, 0.1, 10, 0), "examples_per_user must be an integer >= 1"),
    (lambda: A.ShuffledDpSgd(1.0, 10, 20, 5), "batch_size must be <= dataset_size"),
    (lambda: A.Composed(()), "phases"),
    (lambda: A.from_dict({"type": "moments"}), "mechanism type must be one of"),
])
def test_validation_names_the_argument(ctor, match):
  with pytest.raises(ValueError, match=match):
    ctor()


def test_sampling_from_epochs():
  assert A.sampling_from_epochs(dataset_size=60000, batch_size=150, epochs=15) == (0.0025, 6000)
  # Rounds up: 2.5 batches' worth of data needs 3 steps; float noise never drops one.
  assert A.sampling_from_epochs(dataset_size=1000, batch_size=400, epochs=1)[1] == 3
  assert A.sampling_from_epochs(dataset_size=10, batch_size=3, epochs=0.3)[1] == 1
  assert A.sampling_from_epochs(dataset_size=100, batch_size=10, epochs=0.7)[1] == 7
  with pytest.raises(ValueError, match="epochs"):
    A.sampling_from_epochs(dataset_size=10, batch_size=3, epochs=0)
  with pytest.raises(ValueError, match="batch_size must be <= dataset_size"):
    A.sampling_from_epochs(dataset_size=10, batch_size=30, epochs=1)
