"""Independent reference computations shared by the dpfl.mf tests (not collected)."""

import itertools

import numpy as np


def patterns(num_steps, num_participations, min_separation):
  """Every 0/1 participation vector: at most k ones, any two at least b apart."""
  for bits in itertools.product((0, 1), repeat=num_steps):
    steps = [i for i, bit in enumerate(bits) if bit]
    if len(steps) <= num_participations and all(
        j - i >= min_separation for i, j in zip(steps, steps[1:])):
      yield np.array(bits, dtype=float)


def brute_sensitivity(C, num_participations, min_separation):
  """max ||C u||_2 over all allowed 0/1 vectors u (the definition, by enumeration)."""
  C = np.asarray(C, dtype=float)
  return max(np.linalg.norm(C @ u) for u in patterns(C.shape[1], num_participations,
                                                      min_separation))


def prefix_matrix(n):
  return np.tril(np.ones((n, n)))


def dense_losses(C, A, sens):
  """(max_loss, mean_loss) with the least-squares decoder B = A C^+."""
  B = A @ np.linalg.pinv(C)
  rows = np.sum(B * B, axis=1)
  return sens**2 * rows.max(), sens**2 * rows.sum() / A.shape[0]

