"""A known DP scaling law at the paper's scale, and the point rows it generates.

McKenna et al. 2025 measure BERT models of 4.5M-778M parameters up to 128K
steps at noise-batch ratios σ̄ = 2^-23 ... 2^-6 plus a non-private curve,
several learning rates each. ``point_rows`` generates such a table from
``known_loss`` (a function of params, steps and σ̄ that has the paper's
parametric form ``exp(m log T + b) + E`` for every model and σ̄, with E the
model's non-private asymptote, monotone in steps and σ̄), so a fit of the
table can be checked against the truth, and a planner against a brute-force
optimum of the truth.

Shared by test_fit.py (fit round trip) and the planner's tests.
"""

from __future__ import annotations

import numpy as np

MODELS = {"BertTiny": 4_500_000, "BertMini": 11_400_000, "BertSmall": 29_000_000,
          "BertMedium": 41_000_000, "BertBase": 109_000_000, "BertLarge": 335_000_000,
          "BertMega": 778_000_000}
#: Measured steps: 1000 ... 128000, half-octave apart (after the paper's 1000-step warm-up).
STEPS = tuple(int(round(1000 * 2 ** (k / 2))) for k in range(15))
#: Private ratios 2^-23 ... 2^-6 and the non-private 0.
RATIOS = (0.0,) + tuple(2.0 ** -k for k in range(23, 5, -1))
#: Learning rates and how much worse than the best each is (the best: offset 0).
LEARNING_RATES = {1e-4: 0.06, 3e-4: 0.0, 1e-3: 0.15}
_N0 = 4_500_000
_RATIO_HALF = 2.0 ** -11  # σ̄ where the noise has half its full effect


def known_E(params) -> np.ndarray:
  """The irreducible (non-private, T → ∞) loss of a model of ``params``."""
  return 1.5 + 2.0 * (np.asarray(params, float) / _N0) ** -0.3


def _noise_level(ratio) -> np.ndarray:
  r = np.asarray(ratio, float)
  return r / (r + _RATIO_HALF)


def known_mb(params, ratio) -> tuple[np.ndarray, np.ndarray]:
  """The (m, b) of ``exp(m log T + b) + E`` at (params, σ̄): noise flattens and raises the curve."""
  s = _noise_level(ratio)
  m = -0.35 + 0.2 * s
  b = 1.0 + 1.2 * s + 0.2 * s * np.log(np.asarray(params, float) / _N0)
  return m, b


def known_loss(params, steps, ratio) -> np.ndarray:
  """The true loss (arrays broadcast): non-increasing in steps, non-decreasing in σ̄."""
  m, b = known_mb(params, ratio)
  return np.exp(m * np.log(np.asarray(steps, float)) + b) + known_E(params)


def point_rows(*, models=None, steps=STEPS, ratios=RATIOS, learning_rates=None,
               noise: float = 0.0, seed: int = 0) -> list[dict]:
  """Point rows (``model, params, learning_rate, steps, noise_batch_ratio, loss``) of the known law.

  Args:
    models: ``{name: params}`` (default: the paper's seven).
    steps, ratios: the measured grid.
    learning_rates: ``{lr: loss offset}``; the best has offset 0 and gives
      ``known_loss`` (plus noise).
    noise: relative Gaussian noise on each loss.
    seed: of the noise.
  """
  models = MODELS if models is None else models
  learning_rates = LEARNING_RATES if learning_rates is None else learning_rates
  rng = np.random.default_rng(seed)
  rows = []
  for name, params in models.items():
    for ratio in ratios:
      truth = known_loss(params, np.asarray(steps, float), ratio)
      for lr, offset in learning_rates.items():
        loss = (truth + offset) * (1 + noise * rng.standard_normal(len(steps)))
        rows += [{"model": name, "params": params, "learning_rate": lr, "steps": int(t),
                  "noise_batch_ratio": float(ratio), "loss": float(v)}
                 for t, v in zip(steps, loss)]
  return rows
