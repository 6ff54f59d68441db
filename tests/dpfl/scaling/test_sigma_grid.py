"""The shipped σ grid (dpfl.scaling.sigma_grid) against accounting's calibration, called directly."""

import json
import math
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import accounting
from accounting import sigma_grid as build
from dpfl.scaling import sigma_grid

GRID = sigma_grid.load_grid()
AX = GRID["axes"]
RTOL = 1e-3  # accounting.calibrate_noise_multiplier's default bracket width


def calibrated(eps, steps, q, delta):
  return accounting.calibrate_noise_multiplier(
      lambda s: accounting.PoissonDpSgd(s, q, steps), target_epsilon=eps, delta=delta).value


def rdp_epsilon(sigma, q, steps, delta):
  """ε by dp-accounting's RDP accountant, called directly (the grid's RDP orders)."""
  import dp_accounting as dpa
  from dp_accounting.rdp import rdp_privacy_accountant as rdp
  acc = rdp.RdpAccountant(list(rdp.DEFAULT_RDP_ORDERS) + list(build.EXTRA_RDP_ORDERS))
  acc.compose(dpa.SelfComposedDpEvent(
      dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps))
  return acc.get_epsilon(delta)


def check_against_calibration(eps, steps, q, delta):
  """Where PLD made the σ: >= the PLD calibration and <= RESOLUTION x max(it, σ floor).

  Where RDP made it: certified by dp-accounting's RDP accountant (an upper
  bound on the σ needed). It can sit below PLD's own calibration where PLD's
  pessimistic discretisation dominates (long runs), and far above it at tiny
  q: the grid's "validation" records both (see the module docstring).
  """
  assert sigma_grid.inside(eps, steps, q, delta)
  ours = float(sigma_grid.noise_multiplier(eps, steps, q, delta))
  which = sigma_grid.accountant(eps, steps, q, delta)
  if which == "rdp":
    assert rdp_epsilon(ours, q, steps, delta) <= eps
    return ours
  ref = calibrated(eps, steps, q, delta)
  assert ours >= ref / (1 + RTOL)        # calibrate returns at most RTOL above the least σ
  assert ours <= sigma_grid.RESOLUTION * max(ref, GRID["sigma_floor"])
  return ours


def test_the_grid_covers_the_papers_range_and_states_its_resolution():
  assert AX["epsilon"][0] == 2.0 ** -7 and AX["epsilon"][-1] == 2.0 ** 7
  assert AX["sampling_prob"][0] <= 1e-10 and AX["sampling_prob"][-1] == 1.0
  assert AX["steps"][0] == 1 and AX["steps"][-1] >= 10 ** 7
  assert AX["delta"][0] <= 1e-12
  assert GRID["resolution"]["factor"] == sigma_grid.RESOLUTION
  assert GRID["resolution"]["pld_steps"] == [1, 2 ** build.PLD_LEVELS]
  codes = np.asarray(GRID["accountant_used"])
  assert codes.shape == np.asarray(GRID["noise_multiplier"]).shape
  assert set(np.unique(codes)) <= {0, 1, 2}


def test_shipped_grid_is_small_and_loads_fast():
  path = sigma_grid.shipped_path()
  assert os.path.getsize(path) < 4 * 2 ** 20
  start = time.perf_counter()
  sigma_grid._as_table(sigma_grid.load_grid())
  assert time.perf_counter() - start < 2.0


# Off-grid points (none on a node along ε, T or q), δ on a node: cheap to calibrate.
OFF_GRID = [
    # epsilon, steps, sampling_prob, delta
    (1.3, 17, 0.0021, 1e-6),
    (3.0, 50, 0.05, 1e-5),
    (0.3, 700, 0.007, 1e-8),
]


# Off-grid points whose nodes PLD made (checked below): the stated resolution.
PLD_MADE = [
    (0.1611, 19, 0.0189, 1e-5),
    (0.0563, 6, 0.00319, 1e-9),
    (0.1187, 29, 0.642, 1e-7),
]


@pytest.mark.parametrize("eps, steps, q, delta", PLD_MADE)
def test_pld_made_points_within_resolution_of_calibration(eps, steps, q, delta):
  assert sigma_grid.accountant(eps, steps, q, delta) == "pld"
  check_against_calibration(eps, steps, q, delta)


@pytest.mark.parametrize("eps, steps, q, delta", OFF_GRID)
def test_off_grid_never_below_calibration_and_within_resolution(eps, steps, q, delta):
  ours = check_against_calibration(eps, steps, q, delta)
  # The guarantee itself: the interpolated σ spends at most ε.
  assert accounting.epsilon(accounting.PoissonDpSgd(ours, q, steps), delta=delta) <= eps


# The corners of the range (and points near them), against calibration.
CORNERS = [
    (2.0 ** 7, 1, 1.0, 1e-12),
    (2.0 ** -7, 1, 1.0, 1e-12),
    (2.0 ** -7, 1, 1e-10, 1e-12),
    (2.0 ** 7, 1, 1e-10, 1e-12),
    (2.0 ** 7, 10 ** 7, 1.0, 1e-12),
    (2.0 ** -7, 10 ** 7, 1.0, 1e-5),
    (2.0 ** -7, 10 ** 7, 1e-10, 1e-12),
    (2.0 ** 7, 10 ** 7, 1e-10, 1e-12),
    (1.0, 10 ** 7, 1e-4, 1e-12),
    (8.0, 10 ** 6, 3e-3, 1e-9),
    (0.05, 3, 0.5, 1e-7),
    (1.1115, 185, 3.01e-9, 1e-8),    # the worst PLD-made ratio measured (3.49)
]


@pytest.mark.parametrize("eps, steps, q, delta", CORNERS[:1])
def test_a_corner_against_calibration(eps, steps, q, delta):
  check_against_calibration(eps, steps, q, delta)


@pytest.mark.slow  # ~5-30 s each: PLD calibration at 1e7 steps or q = 1e-10
@pytest.mark.parametrize("eps, steps, q, delta", CORNERS[1:])
def test_corners_against_calibration(eps, steps, q, delta):
  check_against_calibration(eps, steps, q, delta)


@pytest.mark.parametrize("name, kwargs", [
    ("epsilon", dict(epsilon=2.0 ** -7.5)), ("epsilon", dict(epsilon=2.0 ** 7.5)),
    ("steps", dict(steps=2 ** 25)), ("sampling_prob", dict(sampling_prob=1e-11)),
    ("delta", dict(delta=1e-13)), ("delta", dict(delta=1e-4))])
def test_out_of_range_is_refused_naming_argument_value_and_range(name, kwargs):
  args = dict(epsilon=1.0, steps=100, sampling_prob=0.01, delta=1e-6) | kwargs
  axis = {"epsilon": "epsilon", "steps": "steps", "sampling_prob": "sampling_prob",
          "delta": "delta"}[name]
  with pytest.raises(ValueError) as err:
    sigma_grid.noise_multiplier(**args)
  message = str(err.value)
  assert message.startswith(f"{name}={args[name]:g} is outside the σ grid's range")
  assert f"[{AX[axis][0]:g}, {AX[axis][-1]:g}]" in message
  assert not sigma_grid.inside(**args)


def test_delta_between_nodes_uses_the_smaller_node():
  a = sigma_grid.noise_multiplier(2.0, 1000, 0.01, 3e-7)
  assert a == sigma_grid.noise_multiplier(2.0, 1000, 0.01, 1e-7)
  assert a > sigma_grid.noise_multiplier(2.0, 1000, 0.01, 1e-6)


@settings(max_examples=100, deadline=None)
@given(st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
       st.sampled_from(["epsilon", "steps", "sampling_prob", "delta"]), st.floats(1.001, 4.0))
def test_monotone_in_every_argument(ue, ut, uq, ud, axis, factor):
  """σ never decreases with T or q and never increases with ε or δ."""
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
    return
  before = sigma_grid.noise_multiplier(*point.values())
  after = sigma_grid.noise_multiplier(*moved.values())
  if axis in ("steps", "sampling_prob"):
    assert after >= before * (1 - 1e-12)
  else:
    assert after <= before * (1 + 1e-12)


def test_vectorised_queries_match_scalar_ones():
  eps = np.array([2.0 ** -7, 3.0, 100.0])
  steps = np.array([1, 777, 10 ** 7])
  q = np.array([1e-10, 0.05, 1.0])
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


def test_chain_equals_accountings_composition():
  """The builder's repeated squaring gives accounting.epsilons' ε at T = 2^k."""
  sigma, q, levels, deltas = 2.0, 0.02, 4, [1e-8, 1e-5]
  chain = build.chain_epsilons(sigma, q, levels, deltas)
  disc = build.chain_discretization(sigma, q)
  for k in (0, 2, 4):
    ref = accounting.epsilons(accounting.PoissonDpSgd(sigma, q, 2 ** k), deltas=deltas,
                              discretization=disc)
    # Same one-step PLD, same convolutions up to FFT round-off and tail bounds.
    np.testing.assert_allclose(chain[k], ref, rtol=1e-6)


def test_small_grid_build_and_cache(tmp_path, monkeypatch):
  """A tiny grid: nodes agree with calibration; built once, then read from the cache."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  axes = dict(epsilons=(2.0, 8.0), step_levels=3, sampling_probs=(0.1, 1.0), deltas=(1e-5,))
  builds = []
  real_build = build.build_grid
  monkeypatch.setattr(build, "build_grid", lambda **kw: builds.append(kw) or real_build(**kw))
  grid = build.cached_grid(processes=1, progress=False, **axes)
  path = build.cache_path(**axes)
  assert path.startswith(str(tmp_path / "dpfl")) and os.path.exists(path)
  again = build.cached_grid(processes=1, progress=False, **axes)
  assert len(builds) == 1 and again["noise_multiplier"] == json.load(open(path))["noise_multiplier"]
  sigma = np.asarray(grid["noise_multiplier"])
  code = np.asarray(grid["accountant_used"])
  for ie, eps in enumerate((2.0, 8.0)):
    for iq, q in enumerate((0.1, 1.0)):
      node = sigma[0, ie, 3, iq]
      ref = calibrated(eps, 8, q, 1e-5)
      assert node >= ref / (1 + RTOL)
      if code[0, ie, 3, iq] == 0:  # PLD: at most one ladder step above (a short ladder: no chord)
        assert node <= ref * build.LADDER_RATIO * build.NODE_MARGIN
      else:
        assert code[0, ie, 3, iq] == 1 and rdp_epsilon(node, q, 8, 1e-5) <= eps
  # A point outside the shipped grid's δ range, answered by the cached grid.
  assert float(sigma_grid.noise_multiplier(4.0, 5, 0.5, 1e-5, grid=path)) >= calibrated(
      4.0, 5, 0.5, 1e-5) / (1 + RTOL)


# --- the default table: the wide grid tightened by the finer one --------------------------

def test_the_default_table_is_the_wide_grid_tightened_and_still_monotone():
  """min(wide, fine at a point moved towards more noise) never exceeds the wide grid, and
  stays monotone across the fine box's edges (ε 16, T 1e5, q 1e-4, δ 1e-5 / 1e-10)."""
  wide = sigma_grid._as_table(sigma_grid.shipped_path())
  rng = np.random.default_rng(0)
  n = 400
  eps = np.exp(rng.uniform(math.log(2 ** -7), math.log(2 ** 7), n))
  t = np.round(np.exp(rng.uniform(0, math.log(1e7), n)))
  q = np.exp(rng.uniform(math.log(1e-10), 0, n))
  d = 10 ** rng.uniform(-12, -5, n)
  combined = sigma_grid.noise_multiplier(eps, t, q, d)
  assert np.all(combined <= sigma_grid.noise_multiplier(eps, t, q, d, grid=wide) * (1 + 1e-12))
  # Monotone along each axis, through the fine box's edges.
  for axis, values, rising in ((0, np.geomspace(0.3, 40, 60), False),
                               (1, np.round(np.geomspace(5, 3e5, 60)), True),
                               (2, np.geomspace(3e-6, 0.5, 60), True),
                               (3, np.geomspace(1e-12, 1e-5, 60), False)):
    point = [4.0, 1000.0, 1e-3, 1e-8]
    args = [np.full(60, v) for v in point]
    args[axis] = values
    sigma = sigma_grid.noise_multiplier(*args)
    steps = np.diff(sigma)
    assert np.all(steps >= -1e-12 * sigma[1:]) if rising else np.all(steps <= 1e-12 * sigma[1:])


@pytest.mark.parametrize("eps, steps, q, delta", [
    (4.0, 200, 0.00512, 1e-6),      # inside the fine box (the README's plan)
    (64.0, 50, 0.01, 1e-6),         # ε above it: read at ε = 16
    (2.0, 5, 3e-5, 1e-6),           # T and q below it: read at T = 10, q = 1e-4
])
def test_the_default_table_is_at_or_above_the_pld_calibration_and_tight(eps, steps, q, delta):
  exact = calibrated(eps, steps, q, delta)
  got = float(sigma_grid.noise_multiplier(eps, steps, q, delta))
  assert got >= exact * (1 - RTOL), (got, exact)
  if eps <= 16 and steps >= 10 and q >= 1e-4:  # inside the fine box: its stated resolution
    assert got <= exact * 1.15 and sigma_grid.accountant(eps, steps, q, delta) == "pld"
