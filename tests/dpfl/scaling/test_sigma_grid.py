"""The shipped σ grid (dpfl.scaling.sigma_grid) against accounting, called directly."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import accounting
from dpfl.scaling import sigma_grid

GRID = sigma_grid.load_grid()
AX = GRID["axes"]
RTOL = 1e-3  # accounting.calibrate_noise_multiplier's default bracket width
# Stated accuracy inside the grid (module docstring): never below the
# calibrated σ; above it by at most this factor at these interior points.
INTERIOR_OVERESTIMATE = 1.10

# Off-grid points (none on a node along ε, T or q), δ on a node: small T where
# integer steps bend σ(T), the sampling-rate transition, and large T.
OFF_GRID = [
    # epsilon, steps, sampling_prob, delta
    (1.3, 17, 0.0021, 1e-6),
    (3.0, 50, 0.05, 1e-5),
    (2.7, 700, 0.007, 1e-8),
    (6.5, 2_500, 0.0012, 1e-10),
    (0.8, 12_000, 0.02, 1e-7),
]


def calibrated(eps, steps, q, delta):
  return accounting.calibrate_noise_multiplier(
      lambda s: accounting.PoissonDpSgd(s, q, steps), target_epsilon=eps, delta=delta).value


@pytest.mark.parametrize("eps, steps, q, delta", OFF_GRID)
def test_off_grid_never_below_accounting_and_within_tolerance(eps, steps, q, delta):
  assert sigma_grid.inside(eps, steps, q, delta)
  ours = float(sigma_grid.noise_multiplier(eps, steps, q, delta))
  ref = calibrated(eps, steps, q, delta)
  assert ours >= ref / (1 + RTOL)        # calibrate returns at most RTOL above the least σ
  assert ours <= ref * INTERIOR_OVERESTIMATE
  # The guarantee itself: the interpolated σ spends at most ε (dp-accounting's
  # default grid, and the calibration grid Δ=1e-3 the nodes were verified on).
  mech = accounting.PoissonDpSgd(ours, q, steps)
  assert accounting.epsilon(mech, delta=delta) <= eps
  assert accounting.epsilon(mech, delta=delta, discretization=1e-3) <= eps


def test_build_uses_accountings_epsilon():
  """The builder's multi-δ PLD is accounting's PLD (same ε at every δ)."""
  sigma, q, steps = 0.9, 0.02, 300
  ours = sigma_grid._pld_epsilons(sigma, q, steps, [1e-8, 1e-5])
  mech = accounting.PoissonDpSgd(sigma, q, steps)
  for value, delta in zip(ours, [1e-8, 1e-5]):
    # Same PLD up to composition order (FFT round-off, ~1e-8 relative); the
    # grid's σ are separately checked against accounting.epsilon <= target.
    assert value == pytest.approx(
        accounting.epsilon(mech, delta=delta, discretization=sigma_grid.DISCRETIZATION), rel=1e-6)


def test_a_node_is_tight():
  eps, steps, q, delta = 2.0, 1000, 0.01, 1e-6
  assert steps in AX["steps"] and delta in AX["delta"]
  q = AX["sampling_prob"][int(np.argmin(np.abs(np.log(AX["sampling_prob"]) - np.log(q))))]
  ours = float(sigma_grid.noise_multiplier(eps, steps, q, delta))
  ref = calibrated(eps, steps, q, delta)
  assert ref / (1 + RTOL) <= ours <= ref * 1.01


def test_delta_between_nodes_uses_the_smaller_node():
  a = sigma_grid.noise_multiplier(2.0, 1000, 0.01, 3e-7)
  assert a == sigma_grid.noise_multiplier(2.0, 1000, 0.01, 1e-7)
  assert a > sigma_grid.noise_multiplier(2.0, 1000, 0.01, 1e-6)


def test_out_of_grid_calls_accounting():
  eps = AX["epsilon"][-1] * 1.5
  assert not sigma_grid.inside(eps, 20, 0.01, 1e-6)
  ours = float(sigma_grid.noise_multiplier(eps, 20, 0.01, 1e-6))
  assert ours == calibrated(eps, 20, 0.01, 1e-6)


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
       st.sampled_from(["epsilon", "steps", "sampling_prob", "delta"]), st.floats(1.001, 4.0))
def test_monotone_in_every_argument(ue, ut, uq, ud, axis, factor):
  """σ never decreases with T or q and never increases with ε or δ (so a plan's
  loss cannot improve by asking for less privacy... the other way round)."""
  def at(u, lo, hi):
    return float(np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo))))
  point = {"epsilon": at(ue, AX["epsilon"][0], AX["epsilon"][-1]),
           "steps": round(at(ut, AX["steps"][0], AX["steps"][-1])),
           "sampling_prob": at(uq, AX["sampling_prob"][0], AX["sampling_prob"][-1]),
           "delta": at(ud, AX["delta"][0], AX["delta"][-1])}
  moved = dict(point)
  moved[axis] = point[axis] * factor
  if axis == "steps":
    moved[axis] = round(moved[axis])
  if moved["sampling_prob"] > 1 or moved["delta"] >= 1:
    return
  if not (sigma_grid.inside(*point.values()) and sigma_grid.inside(*moved.values())):
    return  # (the grid's own edges, up to rounding: accounting answers there)
  before = sigma_grid.noise_multiplier(*point.values())
  after = sigma_grid.noise_multiplier(*moved.values())
  if axis in ("steps", "sampling_prob"):
    assert after >= before * (1 - 1e-12)
  else:
    assert after <= before * (1 + 1e-12)


def test_vectorised_queries_match_scalar_ones():
  eps = np.array([1.0, 3.0, 7.0])
  steps = np.array([10, 777, 50_000])
  q = np.array([1e-3, 0.05, 0.5])
  many = sigma_grid.noise_multiplier(eps, steps, q, 1e-6)
  assert many.shape == (3,)
  for i in range(3):
    assert many[i] == sigma_grid.noise_multiplier(eps[i], steps[i], q[i], 1e-6)


@pytest.mark.parametrize("kwargs, name", [
    (dict(epsilon=0.0), "epsilon"), (dict(steps=0), "steps"), (dict(steps=2.5), "steps"),
    (dict(sampling_prob=1.5), "sampling_prob"), (dict(delta=1.0), "delta")])
def test_bad_arguments(kwargs, name):
  args = dict(epsilon=1.0, steps=100, sampling_prob=0.01, delta=1e-6)
  args.update(kwargs)
  with pytest.raises(ValueError, match=name):
    sigma_grid.noise_multiplier(**args)


def test_build_grid_small(tmp_path):
  """A 2x2x2 grid built here agrees with accounting at its nodes."""
  grid = sigma_grid.build_grid(epsilons=(4.0, 8.0), steps=(10, 20), sampling_probs=(0.1, 0.2),
                               deltas=(1e-5,), processes=1, validation_points=0,
                               progress=False)
  sigma = np.asarray(grid["noise_multiplier"])
  for ie, eps in enumerate((4.0, 8.0)):
    for iq, q in enumerate((0.1, 0.2)):
      ours = sigma[0, ie, 1, iq]
      ref = calibrated(eps, 20, q, 1e-5)
      assert ref / (1 + RTOL) <= ours <= ref * 1.01
  sigma_grid.save_grid(grid, tmp_path / "g.json")
  node = sigma[0, 1, 1, 1]
  again = sigma_grid.noise_multiplier(8.0, 20, 0.2, 1e-5, grid=str(tmp_path / "g.json"))
  assert node <= again <= node * sigma_grid.INTERPOLATION_MARGIN * (1 + 1e-9)
