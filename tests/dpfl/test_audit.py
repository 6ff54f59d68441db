"""``dpfl.audit.one_run`` and ``dpfl audit``: a correct run's bound stays below its claim,
a broken one's goes above it.

False-alarm rate: the bound of a correct run exceeds its true ε with
probability at most 5% (its 95% confidence); the claim is at least the
true ε, so each correct-run check below fails spuriously for at most 5% of
seeds. The seeds are fixed (and the bound of these runs sits far below the
claim: 0.5-0.8 against 2). The broken runs are far above it (≈4 against 2).
"""

import json

import numpy as np
import optax
import pytest

import dpfl
from dpfl import cli
from dpfl.audit import bound, builtin, one_run
from dpfl.audit.one_run import canary_inclusion

N, BATCH, STEPS, M = 1000, 100, 100, 1000


# σ for ε ≈ 2 at δ = 1e-5 over these 100 steps at q = 0.1 (RDP: the fast accountant;
# calibration and PLD would cost the default suite seconds without testing more of the audit).
SIGMA = 2.4


def _run(**kwargs):
  private = builtin.make_run(noise_multiplier=SIGMA, accountant="rdp", delta=1e-5,
                             dataset_size=N, batch_size=BATCH,
                             num_steps=kwargs.pop("num_steps", STEPS), key=11, seed=12)
  return private, one_run(private, builtin.init_params(), builtin.dataset(N), num_canaries=M,
                          seed=13, **kwargs)


def test_a_correct_run_stays_below_its_claim():
  private, result = _run()
  assert result.claimed_epsilon == pytest.approx(private.epsilon())
  assert result.claimed_epsilon == pytest.approx(2.0, rel=0.05)
  assert 0 < result.epsilon_lower_bound <= result.claimed_epsilon
  assert not result.violated
  assert result.num_steps == STEPS and result.num_canaries == M
  assert result.num_guesses + result.num_abstentions == M
  assert result.guess_pairs_tested == len(bound.default_guess_grid(M))
  # The inclusion comes from the audit's seed alone (not the run's noise key).
  np.testing.assert_array_equal(result.included, canary_inclusion(M, 13))
  assert result.num_included == canary_inclusion(M, 13).sum()
  assert result.seed == 13 and result.score == "sum"


def test_ten_times_less_noise_than_claimed_is_caught():
  # With the likelihood score (the default suite's one run of it; both scores: slow tests).
  private, result = _run(inject="low-noise", score="likelihood")
  # The ledger's ε, unchanged by the injected fault.
  assert result.claimed_epsilon == pytest.approx(private.epsilon())
  assert result.claimed_epsilon == pytest.approx(2.0, rel=0.05)
  assert result.epsilon_lower_bound > result.claimed_epsilon
  assert result.violated and result.inject == "low-noise"


def test_cli_no_clipping_is_caught(capsys):
  assert cli.main(["audit", "--inject", "no-clipping", "--seed", "5", "--json",
                   "--noise-multiplier", str(SIGMA), "--accountant", "rdp"]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  for key in ("epsilon_lower_bound", "claimed_epsilon", "confidence", "num_canaries"):
    assert key in out
  assert out["num_canaries"] == 1000 and out["confidence"] == 0.95
  assert out["epsilon_lower_bound"] > out["claimed_epsilon"] and out["violated"]


@pytest.mark.parametrize("argv", [
    ["audit", "--inject", "off"], ["audit", "--canaries", "0"], ["audit", "--confidence", "1"],
    ["audit", "--mode", "grey-box"], ["audit", "--target-epsilon", "-1"],
])
def test_cli_bad_flags_exit_2_with_one_line(argv, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("dpfl"), err


@pytest.fixture(scope="module")
def fresh():
  def make():
    return builtin.make_run(noise_multiplier=SIGMA, accountant="rdp", delta=1e-5,
                            dataset_size=N, batch_size=BATCH, num_steps=5, key=1, seed=2)
  return make


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_canaries=0), "num_canaries"),
    (dict(num_canaries=10, mode="grey-box"), "mode"),
    (dict(num_canaries=10, inject="off"), "inject"),
    (dict(num_canaries=10, canaries="random"), "canaries"),
    (dict(num_canaries=10, confidence=1.5), "confidence"),
    (dict(num_canaries=10, canary_norm=0.5), "canary_norm"),
    (dict(num_canaries=10, mode="black-box"), "canary_examples"),
    (dict(num_canaries=10, seed=-1), "seed"),
    (dict(num_canaries=10, guesses=[(8, 8)]), "k_plus \\+ k_minus"),
    (dict(num_canaries=10, guesses=[(-1, 0)]), "k_plus"),
    (dict(num_canaries=10, score="max"), "score"),
])
def test_bad_arguments_name_themselves(fresh, kwargs, match):
  private = fresh()
  with pytest.raises(ValueError, match=match):
    one_run(private, builtin.init_params(), builtin.dataset(N), **kwargs)
  assert private.steps_done == 0  # refused before any step was spent


def test_runs_it_cannot_audit_are_refused():
  with pytest.raises(ValueError, match="make_private"):
    one_run(object(), builtin.init_params(), builtin.dataset(N), num_canaries=10)
  shuffled = dpfl.make_private(builtin.loss_fn, optax.sgd(0.1), l2_clip_norm=1.0,
                               batch_size=100, dataset_size=N, num_steps=5,
                               noise_multiplier=1.0, delta=1e-5, sampling_scheme="shuffle",
                               accountant="rdp")
  with pytest.raises(ValueError, match="Poisson"):
    one_run(shuffled, builtin.init_params(), builtin.dataset(N), num_canaries=10)
  adaptive = dpfl.make_private(builtin.loss_fn, optax.sgd(0.1),
                               l2_clip_norm=dpfl.adaptive_clip(initial=1.0), batch_size=100,
                               dataset_size=N, num_steps=5, noise_multiplier=1.0, delta=1e-5,
                               accountant="rdp")
  with pytest.raises(ValueError, match="adaptive_clip"):
    one_run(adaptive, builtin.init_params(), builtin.dataset(N), num_canaries=10)
  assert adaptive.steps_done == 0


def test_black_box_runs_and_stays_below_its_claim():
  _, result = _run(mode="black-box", num_steps=20, canary_examples=builtin.canary_examples(M),
                   loss_fn=builtin.loss_fn)
  assert result.mode == "black-box" and result.canaries is None
  assert 0 <= result.epsilon_lower_bound <= result.claimed_epsilon


@pytest.mark.slow
@pytest.mark.parametrize("target", [1.0, 2.0, 4.0])
def test_correct_runs_over_many_seeds(target):
  """20 seeds per ε: each false alarm has probability <= 5%; 4 or more of 20
  would have probability < 1.6% if the bound held, so the test allows 3."""
  alarms = 0
  sigma = None  # calibrated (PLD) once; the same σ's ε is then cached
  for seed in range(20):
    private = builtin.make_run(target_epsilon=None if sigma else target, noise_multiplier=sigma,
                               delta=1e-5, dataset_size=N, batch_size=BATCH, num_steps=STEPS,
                               key=100 + seed, seed=seed)
    sigma = private.noise_multiplier
    result = one_run(private, builtin.init_params(), builtin.dataset(N), num_canaries=M,
                     seed=1000 + seed)
    alarms += result.violated
  assert alarms <= 3


@pytest.mark.slow
@pytest.mark.parametrize("inject", [None, "low-noise", "no-clipping"])
@pytest.mark.parametrize("score", ["sum", "likelihood"])
def test_larger_run(inject, score):
  """3000 examples, 2000 canaries, 300 steps at ε = 1 (PLD, calibrated), both scores."""
  private = builtin.make_run(target_epsilon=1.0, delta=1e-6, dataset_size=3000,
                             batch_size=150, num_steps=300, key=7, seed=8)
  result = one_run(private, builtin.init_params(), builtin.dataset(3000), num_canaries=2000,
                   score=score, seed=9, inject=inject)
  assert result.violated == (inject is not None)


@pytest.mark.slow
@pytest.mark.parametrize("inject", [None, "no-clipping"])
def test_canaries_along_the_model_parameters(inject):
  """Random directions in the built-in model's own 84 parameters, 40 canaries, ε = 0.5.

  Real gradients project onto every direction and the directions overlap, so
  at this size only a gross fault shows: canaries of norm 1000·C let in
  unclipped (10× less noise is not caught here; the Dirac canaries catch it).
  """
  private = builtin.make_run(target_epsilon=0.5, accountant="rdp", delta=1e-5,
                             dataset_size=N, batch_size=BATCH, num_steps=STEPS, key=3, seed=4)
  result = one_run(private, builtin.init_params(), builtin.dataset(N), num_canaries=40,
                   canaries="params", canary_norm=1000.0, seed=5, inject=inject)
  assert result.violated == (inject is not None)
