"""User-level DP for an existing loop: ELS and ULS (with or without local steps).

``make_private_user_level`` (also reached as ``make_private(...,
privacy_unit="user")``) returns the same things ``dpfl.make_private`` does
— a clipped-gradient function, an optimizer with the noise step in front,
batches with static shapes and masks, a ledger and ``epsilon()`` — for the
two algorithms of Charles et al. 2024 ("Fine-Tuning Large Language Models
with User-Level Differential Privacy", arXiv 2407.07737). Data comes as a
``dpfl.data.UserDataset`` (users capped at k examples).

* ``sampling_unit="example"`` — **ELS**: Poisson-sample the capped examples
  at rate q, clip each example's gradient to C, add N(0, (σC)²) to the sum.
  Batches are ``(batch [B, ...], mask [B])`` like example-level DP-SGD, but
  the ledger records ``accounting.ElsDpSgd(σ, q, T, k)``: ε protects a user
  (all their ≤ k examples), via a mixture of Gaussians per step.
* ``sampling_unit="user"`` — **ULS**: Poisson-sample users at rate q; each
  sampled user contributes one vector clipped to C — the gradient of their
  mean loss (``local_steps=None``), or their pseudo-gradient θ − θ_u after
  ``local_steps`` of local SGD (DP-FedAvg, ``dpfl.federated``). Batches are
  ``(batch [U, k, ...], mask [U, k])``; the ledger records
  ``accounting.UlsDpSgd(σ, q, T)``. The ``optimizer`` you pass is the server
  optimizer (any optax optimizer: SGD, DiLoCo's Nesterov momentum, Adam).

Sharding: pass ``mesh=dpfl.federated.user_mesh()`` and every batch comes
sharded over its leading (user or example) axis, padded to a multiple of the
device count; see ``dpfl.federated`` for running across hosts with
``jax.distributed.initialize``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax
import optax

import accounting
from accounting import validate as check
from dpfl import cyclic_sampling, ftrl, noise, sampling
from dpfl.clipping import clipped_grad as _clipped_grad
from dpfl.data import UserDataset
from dpfl.federated import clipped_user_updates, shard_users
from dpfl.privatize import PrivateTraining, check_run
from dpfl.user_level_sampling import ElsSampler, UserSampler

SAMPLING_UNITS = ("user", "example")


@dataclasses.dataclass
class UserLevelPrivateTraining(PrivateTraining):
  """What ``make_private_user_level`` returns (a ``PrivateTraining`` for users).

  Attributes (besides ``PrivateTraining``'s):
    sampling_unit: ``"user"`` (ULS) or ``"example"`` (ELS).
    examples_per_user: the cap k (ELS accounts for it; for ULS, the largest
      cap a dataset may have, or None for any).
    local_steps: ULS local steps per user (None: one clipped gradient).
    mesh: the device mesh batches are sharded over, or None.
  """

  sampling_unit: str = "user"
  examples_per_user: int | None = None
  local_steps: int | None = None
  mesh: Any = None

  def _check_dataset(self, dataset: UserDataset) -> None:
    if not isinstance(dataset, UserDataset):
      raise ValueError(f"dataset must be a dpfl.data.UserDataset, got {type(dataset).__name__}")
    k = self.examples_per_user
    if k is not None and dataset.examples_per_user > k:
      raise ValueError(f"dataset caps users at {dataset.examples_per_user} examples, above "
                       f"examples_per_user={k} that the privacy guarantee assumes")
    size = dataset.num_users if self.sampling_unit == "user" else dataset.num_examples
    if size != self.sampler.population_size:
      what = "num_users" if self.sampling_unit == "user" else "num_examples"
      raise ValueError(f"dataset.{what} ({size}) must equal dataset_size "
                       f"({self.sampler.population_size}) given to make_private_user_level")

  def batches(self, dataset: UserDataset,
              num_steps: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Yields ``(batch, mask)`` for ``num_steps`` steps, each recorded before use.

    ULS: ``batch`` leaves ``[U, k, ...]`` and ``mask [U, k]`` (padding users
    have an all-False row). ELS: ``batch`` leaves ``[B, ...]`` of capped
    examples and ``mask [B]``. With a ``mesh``, both come sharded over their
    leading axis.
    """
    self._check_dataset(dataset)
    steps = self.num_steps if num_steps is None else check.positive_int("num_steps", num_steps)
    flat = dataset.examples()[0] if self.sampling_unit == "example" else None
    for _ in range(steps):
      draw = self.sampler()
      self.record_step()
      if flat is None:
        out = dataset.gather_users(draw.indices, draw.mask)
      else:
        out = sampling.gather(flat, draw.indices, draw.mask), draw.mask
      yield out if self.mesh is None else shard_users(out, self.mesh)

  def make_step(self, *, jit: bool = True, donate: bool = False) -> Callable[..., Any]:
    """``(params, opt_state, batch, mask) -> (params, opt_state, aux)``.

    Under an ``Explicit`` mesh the step runs inside ``jax.set_mesh(mesh)``.
    ``donate``: see ``PrivateTraining.make_step``.
    """
    step = super().make_step(jit=jit, donate=donate)
    explicit = self.mesh is not None and jax.sharding.AxisType.Explicit in self.mesh.axis_types
    if not explicit:
      return step

    def run(*args):
      with jax.set_mesh(self.mesh):
        return step(*args)

    return run


def make_private_user_level(
    loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation, *,
    sampling_unit: str = "user", l2_clip_norm: float, batch_size: int, delta: float,
    dataset: UserDataset | None = None, dataset_size: int | None = None,
    examples_per_user: int | None = None, num_steps: int | None = None,
    epochs: float | None = None, noise_multiplier: float | None = None,
    target_epsilon: float | None = None, local_steps: int | None = None,
    local_learning_rate: float | None = None,
    local_optimizer: optax.GradientTransformation | None = None,
    local_batch_size: int | None = None, max_batch_size: int | None = None,
    has_aux: bool = False, microbatch_size: int | None = None, mesh: Any = None,
    accountant: str = "pld", key: Any = None, seed: Any = None,
    ledger: accounting.Ledger | None = None, strategy: Any = None,
    strategy_options: dict | None = None,
    sampling_scheme: str | None = None) -> UserLevelPrivateTraining:
  """Makes a loss and an optax optimizer into user-level DP training (ELS or ULS).

  Args:
    loss_fn: ``loss_fn(params, batch)``, the mean loss over a batch with a
      leading example axis (``(loss, aux)`` with ``has_aux``).
    optimizer: any optax optimizer. ELS and ULS without local steps: it gets
      the noisy mean clipped gradient. ULS with local steps: the server
      optimizer, fed the noisy mean pseudo-gradient θ − θ_u (see
      ``dpfl.federated``; ``optax.sgd(1.0)`` is FedAvg).
    sampling_unit: ``"user"`` (ULS) or ``"example"`` (ELS).
    l2_clip_norm: C: per user (ULS) or per example (ELS).
    batch_size: expected number of sampled units per step: users (ULS) or
      examples (ELS); q = batch_size / dataset_size.
    delta: δ for reporting and calibration.
    dataset: optionally the ``UserDataset`` to train on; it fixes
      ``dataset_size`` (users for ULS, kept examples for ELS) and, if not
      given, ``examples_per_user``.
    dataset_size: the number of sampling units, when ``dataset`` is not given.
    examples_per_user: the cap k. Required for ELS (its ε grows with k);
      for ULS an optional check on datasets (ε does not depend on k).
    num_steps / epochs: the run's length (give one); epochs are passes over
      the sampling units, T = ceil(epochs * dataset_size / batch_size)
      (DP-FTRL: ceil(epochs * (dataset_size // batch_size))).
    noise_multiplier / target_epsilon: give σ, or a target user-level ε to
      calibrate σ for (``accounting.calibrate_noise_multiplier``; never above).
    local_steps: ULS only. None: each user's clipped gradient of their mean
      loss. An integer >= 1: DP-FedAvg with that many local steps, of plain
      SGD at ``local_learning_rate`` or of ``local_optimizer`` (give one),
      on local batches of ``local_batch_size`` (None: all the user's examples).
    max_batch_size: usual static batch length (default: exceeded with
      probability <= 1e-4 per step; a larger draw is padded to a multiple of
      it, never truncated: see ``dpfl.user_level_sampling``).
    has_aux, microbatch_size: as for ``dpfl.clipped_grad``.
    mesh: a ``jax.sharding.Mesh`` whose first axis the batches' leading axis
      is sharded over (e.g. ``dpfl.federated.user_mesh()``), or None.
    accountant: ``"pld"``, or ``"rdp"`` for ULS (ELS is PLD only).
    key: noise PRNG key (default: OS entropy). seed: sampler seed (default:
      OS entropy).
    ledger: an existing user-level ledger to extend (resuming a run).
    strategy, strategy_options: ULS only: federated DP-FTRL (Kairouz et al.
      2021; Choquette-Choo et al. 2023) with the matrix factorization
      ``strategy`` instead of independent noise, as in ``dpfl.make_private``.
      Users are then taken in one fixed order repeated every pass
      (``sampling_scheme="cyclic"``, the only scheme for it): ``batch_size``
      users per round, each user in at most ``ceil(T / b)`` rounds ``b =
      num_users // batch_size`` apart, accounted as
      ``accounting.UserMatrixMechanism``.
    sampling_scheme: None or ``"poisson"`` (ULS / ELS), ``"cyclic"``
      (with a strategy; its default).

  Returns:
    A ``UserLevelPrivateTraining``.

  Formal guarantee: every step releases a clipped sum whose sensitivity to
  adding or removing one user is C (ULS) or J·C with J ~ Binomial(k, q) of
  the user's examples sampled (ELS), plus N(0, (σC)²I), on a Poisson sample
  drawn by the returned sampler; ``epsilon()`` is the user-level ε of the
  steps drawn so far, recomputed by ``accounting`` from the ledger — the
  number ``dpfl epsilon --privacy-unit user --sampling-unit user|example``
  prints for the same settings.
  """
  if sampling_unit not in SAMPLING_UNITS:
    raise ValueError(f"sampling_unit must be one of {SAMPLING_UNITS} (ULS or ELS), got "
                     f"{sampling_unit!r}")
  if strategy is not None:
    ftrl.check_strategy(strategy)
    strategy_options = ftrl.check_options(strategy_options)
    if sampling_unit != "user":
      raise ValueError("strategy (DP-FTRL) needs sampling_unit='user' (federated DP-FTRL over "
                       "users); ELS samples examples, which its accounting does not cover")
    if sampling_scheme not in (None, "cyclic"):
      raise ValueError(f"sampling_scheme must be 'cyclic' for user-level DP-FTRL, got "
                       f"{sampling_scheme!r}")
    if max_batch_size is not None:
      raise ValueError("max_batch_size applies to Poisson sampling only (cyclic rounds have "
                       "batch_size users)")
  elif strategy_options is not None:
    raise ValueError("strategy_options apply with a strategy (DP-FTRL) only")
  elif sampling_scheme not in (None, "poisson"):
    raise ValueError(f"sampling_scheme must be 'poisson' for user-level DP-SGD, got "
                     f"{sampling_scheme!r} ('cyclic' needs a strategy)")
  delta, noise_multiplier, target_epsilon, num_steps = check_run(
      delta=delta, accountant=accountant, noise_multiplier=noise_multiplier,
      target_epsilon=target_epsilon, num_steps=num_steps, epochs=epochs, ledger=ledger,
      privacy_unit="user")
  if examples_per_user is not None:
    examples_per_user = check.positive_int("examples_per_user", examples_per_user)
  if dataset is not None:
    if not isinstance(dataset, UserDataset):
      raise ValueError(f"dataset must be a dpfl.data.UserDataset, got {type(dataset).__name__}")
    size = dataset.num_users if sampling_unit == "user" else dataset.num_examples
    if dataset_size is not None and check.positive_int("dataset_size", dataset_size) != size:
      raise ValueError(f"dataset_size ({dataset_size!r}) disagrees with the dataset ({size} "
                       f"{sampling_unit}s); give one of them")
    dataset_size = size
    if examples_per_user is None:
      examples_per_user = dataset.examples_per_user
    elif dataset.examples_per_user > examples_per_user:
      # ELS accounts for the cap k: a dataset with more examples per user
      # would be under-accounted (batches() refuses it, but planned_epsilon()
      # would already have reported the smaller ε).
      raise ValueError(f"examples_per_user must be >= the dataset's cap "
                       f"({dataset.examples_per_user}) that the privacy guarantee has to "
                       f"cover, got {examples_per_user}")
  dataset_size = check.positive_int(f"dataset_size (the number of {sampling_unit}s)",
                                    dataset_size)
  batch_size = check.integer("batch_size", batch_size, low=1, high=dataset_size)
  local = (local_learning_rate, local_optimizer, local_batch_size)
  if sampling_unit == "example":
    if examples_per_user is None:
      raise ValueError("examples_per_user (the cap k) is required for ELS "
                       "(sampling_unit='example'): its user-level ε depends on k")
    if accountant != "pld":
      raise ValueError("accountant must be 'pld' for ELS (its mixture-of-Gaussians event has "
                       f"no RDP back end), got {accountant!r}")
    if local_steps is not None or any(v is not None for v in local):
      raise ValueError("local_steps / local_learning_rate / local_optimizer / "
                       "local_batch_size apply to ULS (sampling_unit='user') only")
  elif local_steps is None and any(v is not None for v in local):
    raise ValueError("local_learning_rate / local_optimizer / local_batch_size need "
                     "local_steps >= 1")
  if epochs is not None:
    _, num_steps = accounting.sampling_from_epochs(dataset_size=dataset_size,
                                                   batch_size=batch_size, epochs=epochs)
    num_steps = check.num_steps(f"num_steps (from epochs={epochs!r})", num_steps)
  multiple_of = 1 if mesh is None else int(mesh.shape[mesh.axis_names[0]])
  q = batch_size / dataset_size
  plan = None
  if strategy is not None:
    sampler = cyclic_sampling.CyclicSampler(dataset_size, batch_size=batch_size,
                                     multiple_of=multiple_of, seed=seed)
    if epochs is not None:  # passes over the cyclic order: b = N // B rounds each
      num_steps = check.num_steps(f"num_steps (from epochs={epochs!r})",
                                  ftrl.cyclic_steps(epochs, sampler.steps_per_epoch))
    plan = ftrl.plan(strategy, strategy_options, sampler=sampler, num_steps=num_steps,
                     privacy_unit="user")
  elif sampling_unit == "user":
    sampler = UserSampler(dataset_size, sampling_prob=q, max_batch_size=max_batch_size,
                          multiple_of=multiple_of, seed=seed)
  else:
    sampler = ElsSampler(dataset_size, sampling_prob=q, examples_per_user=examples_per_user,
                         max_batch_size=max_batch_size, multiple_of=multiple_of, seed=seed)
  describe = sampler.mechanism if plan is None else plan.mechanism
  if target_epsilon is not None:
    calibration = accounting.calibrate_noise_multiplier(
        lambda s: describe(noise_multiplier=s, num_steps=num_steps),
        target_epsilon=target_epsilon, delta=delta, accountant=accountant)
    noise_multiplier = calibration.value
  # Validate σ and the step count the way the accountant will, before any step runs.
  describe(noise_multiplier=noise_multiplier, num_steps=num_steps)
  if sampling_unit == "user" and local_steps is not None:
    grad_fn = clipped_user_updates(
        loss_fn, l2_clip_norm=l2_clip_norm, local_steps=local_steps,
        local_learning_rate=local_learning_rate, local_optimizer=local_optimizer,
        local_batch_size=local_batch_size, has_aux=has_aux, microbatch_size=microbatch_size)
  else:
    grad_fn = _clipped_grad(loss_fn, l2_clip_norm=l2_clip_norm, has_aux=has_aux,
                            unit=sampling_unit, microbatch_size=microbatch_size)
  # DP-SGD's noise or the plan's correlated noise: both dpfl.noise.privatizer.
  noisy = (noise.gaussian_noise if plan is None else plan.noise)(
      noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
      expected_batch_size=sampler.expected_batch_size, key=key)
  return UserLevelPrivateTraining(
      clipped_grad=grad_fn, optimizer=optax.chain(noisy, optimizer), sampler=sampler,
      ledger=accounting.Ledger() if ledger is None else ledger,
      noise_multiplier=float(noise_multiplier), l2_clip_norm=grad_fn.l2_clip_norm,
      delta=delta, num_steps=int(num_steps), accountant=accountant,
      sampling_unit=sampling_unit, examples_per_user=examples_per_user,
      local_steps=local_steps, mesh=mesh, ftrl=plan)
