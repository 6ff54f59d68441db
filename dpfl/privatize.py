"""One private run, one object: ``make_private`` plans it, ``PrivateState`` carries it.

``make_private`` is the one assembler for every kind of private run —
example-level DP-SGD, user-level ELS and ULS (with or without local steps,
i.e. DP-FedAvg), and DP-FTRL with any matrix factorization, at either level.
It makes every decision once:

1. builds the sampler (``dpfl.sampling``) and, for DP-FTRL, the strategy for
   the participation that sampler gives (``dpfl.ftrl``);
2. asks the one planner, ``accounting.plan.plan_run``, for the
   ``PrivacyPlan``: the frozen, JSON-serialisable description of the run,
   with σ calibrated for a target ε over all the planned steps. The plan is
   the only place a configuration becomes an ``accounting`` mechanism;
3. picks the clipping (``dpfl.clipped_grad``, or ``dpfl.federated`` local
   steps through the same clipping back-ends, ``method=clip_method``) and the
   noise (one streaming privatizer: ``gaussian_noise`` for DP-SGD,
   ``dpfl.mf.matrix_noise`` for a matrix factorization).

The returned ``dpfl.private_training.PrivateTraining`` runs it (``init``,
``make_step``, ``batches``, ``save`` / ``restore``, ``epsilon``) on one
``PrivateState``; see that module. The ``(params, opt_state)`` pieces —
``clipped_grad`` and ``optimizer`` — stay for wrapping an existing loop
(README); they account through the same journal.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np
import optax

import accounting
from accounting import plan as planning
from accounting.adaptive import AdaptiveClip
from accounting import validate as check
from accounting.journal import RUN_FILE, RunJournal, key_digest
from dpfl import _rng, ftrl, noise, sampling
from dpfl.clipping import METHODS as CLIP_METHODS
from dpfl.clipping import clipped_grad as make_clipped_grad
from dpfl.data import UserDataset
from dpfl.federated import clipped_user_updates, shared_secret_seed
# The run object lives in its own module; its names are re-exported here.
from dpfl.private_training import (PrivateState, PrivateTraining, noise_then,  # noqa: F401
                                  recorded_noise)

PRIVACY_UNITS = ("example", "user")
SAMPLING_UNITS = ("user", "example")


# --- the one assembler -------------------------------------------------------------------


def _sampling_scheme(sampling_scheme, *, privacy_unit: str, sampling_unit: str,
                     strategy) -> str:
  """The sampler family the arguments ask for (one decision for every entry point)."""
  if privacy_unit == "user":
    if strategy is not None:
      if sampling_unit != "user":
        raise ValueError("strategy (DP-FTRL) needs sampling_unit='user' (federated DP-FTRL "
                         "over users); ELS samples examples, which its accounting does not "
                         "cover")
      if sampling_scheme not in (None, "cyclic"):
        raise ValueError(f"sampling_scheme must be 'cyclic' for user-level DP-FTRL, got "
                         f"{sampling_scheme!r}")
      return "cyclic"
    if sampling_scheme not in (None, "poisson"):
      raise ValueError(f"sampling_scheme must be 'poisson' for user-level DP-SGD, got "
                       f"{sampling_scheme!r} ('cyclic' needs a strategy); user-level training "
                       "Poisson-samples users (ULS) or examples (ELS)")
    return "poisson"
  if strategy is None:
    if sampling_scheme not in (None, "poisson", "shuffle"):
      raise ValueError(f"sampling_scheme must be 'poisson' or 'shuffle' for DP-SGD, got "
                       f"{sampling_scheme!r} ('cyclic' needs a strategy, e.g. 'identity')")
    return sampling_scheme or "poisson"
  if sampling_scheme not in (None, "cyclic", "poisson"):
    raise ValueError(f"sampling_scheme must be 'cyclic' or 'poisson' with a strategy "
                     f"(DP-FTRL), got {sampling_scheme!r} (a reshuffle per epoch would break "
                     "the participation pattern its sensitivity assumes)")
  return "cyclic_poisson" if sampling_scheme == "poisson" else "cyclic"


def _build_sampler(scheme: str, *, privacy_unit: str, sampling_unit: str, dataset_size: int,
                   batch_size: int, num_steps: int, max_batch_size, accountant: str,
                   examples_per_user, multiple_of: int, seed, strategy, strategy_options):
  if scheme == "cyclic":
    if max_batch_size is not None:
      raise ValueError("max_batch_size applies to Poisson sampling only (cyclic batches "
                       "have the fixed batch_size)")
    return sampling.CyclicSampler(dataset_size, batch_size=batch_size, unit=sampling_unit,
                                  multiple_of=multiple_of, seed=seed)
  if scheme == "cyclic_poisson":
    bands = ftrl.amplified_bands(strategy, strategy_options, num_steps)
    rate = ftrl.cyclic_poisson_rate(dataset_size=dataset_size, batch_size=batch_size,
                                    bands=bands)
    return sampling.CyclicPoissonSampler(dataset_size, num_groups=bands,
                                         sampling_prob=rate,
                                         max_batch_size=max_batch_size,
                                         multiple_of=multiple_of, seed=seed)
  if scheme == "shuffle":
    if max_batch_size is not None:
      raise ValueError("max_batch_size applies to sampling_scheme='poisson' only")
    return sampling.ShuffledSampler(dataset_size, batch_size=batch_size,
                                    multiple_of=multiple_of, seed=seed)
  q = batch_size / dataset_size
  if privacy_unit == "example":
    # dp-accounting's RDP back end has no event for truncated Poisson sampling,
    # and untruncated-Poisson ε is not an upper bound for truncated batches; so
    # under RDP a rare oversized draw gets a longer padded shape instead.
    return sampling.PoissonSampler(dataset_size, sampling_prob=q, max_batch_size=max_batch_size,
                                   truncate=accountant == "pld", multiple_of=multiple_of,
                                   seed=seed)
  if sampling_unit == "user":
    return sampling.UserSampler(dataset_size, sampling_prob=q, max_batch_size=max_batch_size,
                                multiple_of=multiple_of, seed=seed)
  return sampling.ElsSampler(dataset_size, sampling_prob=q, examples_per_user=examples_per_user,
                             max_batch_size=max_batch_size, multiple_of=multiple_of, seed=seed)


def _sampling_plan(sampler, *, batch_size: int, examples_per_user) -> planning.SamplingPlan:
  fields = {f.name for f in dataclasses.fields(planning.SamplingPlan)}
  described = {k: v for k, v in sampler.describe().items() if k in fields}
  described.setdefault("batch_size", batch_size)
  if examples_per_user is not None:
    described["examples_per_user"] = examples_per_user
  return planning.SamplingPlan(**described)


def _user_dataset_size(dataset, *, sampling_unit: str, dataset_size, examples_per_user):
  """(dataset_size, examples_per_user) of a user-level run, from the dataset if given."""
  if examples_per_user is not None:
    examples_per_user = check.positive_int("examples_per_user", examples_per_user)
  if dataset is None:
    return dataset_size, examples_per_user
  if not isinstance(dataset, UserDataset):
    raise ValueError(f"dataset must be a dpfl.data.UserDataset, got {type(dataset).__name__}")
  size = dataset.num_users if sampling_unit == "user" else dataset.num_examples
  if dataset_size is not None and check.positive_int("dataset_size", dataset_size) != size:
    raise ValueError(f"dataset_size ({dataset_size!r}) disagrees with the dataset ({size} "
                     f"{sampling_unit}s); give one of them")
  if examples_per_user is None:
    examples_per_user = dataset.examples_per_user
  elif dataset.examples_per_user > examples_per_user:
    # ELS accounts for the cap k: a dataset with more examples per user would
    # be under-accounted.
    raise ValueError(f"examples_per_user must be >= the dataset's cap "
                     f"({dataset.examples_per_user}) that the privacy guarantee has to "
                     f"cover, got {examples_per_user}")
  return size, examples_per_user


def make_private(loss_fn: Callable[..., Any], optimizer: optax.GradientTransformation, *,
                 l2_clip_norm: float, batch_size: int, delta: float,
                 dataset_size: int | None = None, num_steps: int | None = None,
                 epochs: float | None = None,
                 noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 sampling_scheme: str | None = None, max_batch_size: int | None = None,
                 has_aux: bool = False, microbatch_size: int | None = None,
                 accountant: str = "pld", key: Any = None, seed: Any = None,
                 ledger: accounting.Ledger | None = None, privacy_unit: str = "example",
                 sampling_unit: str | None = None, examples_per_user: int | None = None,
                 dataset: Any = None, local_steps: int | None = None,
                 local_learning_rate: float | None = None,
                 local_optimizer: optax.GradientTransformation | None = None,
                 local_batch_size: int | None = None, mesh: Any = None,
                 strategy: Any = None, strategy_options: dict | None = None,
                 clip_method: str = "auto",
                 checkpoint_dir: str | os.PathLike | None = None,
                 ledger_sync_steps: int = 1) -> PrivateTraining:
  """Makes a loss and an optax optimizer into a private run: DP-SGD, ELS, ULS or DP-FTRL.

  Args:
    loss_fn: ``loss_fn(params, batch)``, the mean loss over a batch whose
      leaves have a leading example axis (``(loss, aux)`` with ``has_aux``).
    optimizer: any optax optimizer; it receives the noisy mean gradient (ULS
      with local steps: the noisy mean pseudo-gradient θ − θ_u, so
      ``optax.sgd(1.0)`` is FedAvg).
    l2_clip_norm: C, per sampling unit (example; user for ULS); or
      ``dpfl.adaptive_clip(...)``: adaptive (quantile) clipping, C in the
      state, moved each step towards a quantile of the units' norms, the
      count query accounted with the gradient sum (``dpfl.adaptive``). Not
      with amplified banded MF (``sampling_scheme="poisson"`` + strategy).
    batch_size: the expected batch (Poisson: q = batch_size / N), or the
      fixed batch (``"shuffle"``, cyclic).
    delta: δ for reporting and calibration.
    dataset_size: N, the number of sampling units (examples; users for ULS;
      kept examples for ELS). User level: or give ``dataset``.
    num_steps / epochs: the run's length (exactly one); epochs become
      ceil(epochs * N / batch_size) steps (shuffle and cyclic: whole passes
      of N // batch_size batches).
    noise_multiplier / target_epsilon: σ, or a target ε to calibrate σ for
      over all the planned steps (``accounting.calibrate_noise_multiplier``;
      never above the target). With a target no step past it is ever run.
    sampling_scheme: example level: ``"poisson"`` (default for DP-SGD:
      amplified, padded to ``max_batch_size``, truncation accounted under
      ``"pld"``), ``"shuffle"`` (fixed batches, no amplification claimed);
      with a ``strategy``: ``"cyclic"`` (default: one fixed order repeated
      every epoch) or ``"poisson"`` (banded: amplified banded MF). User level:
      ``"poisson"`` (ULS / ELS), ``"cyclic"`` (with a strategy).
    max_batch_size: static batch length for Poisson sampling (default: a size
      exceeded with probability <= 1e-9 per step, 1e-4 at user level).
    has_aux, microbatch_size: as for ``dpfl.clipped_grad``.
    accountant: ``"pld"`` or ``"rdp"`` (ELS and truncated Poisson: PLD only).
    key: noise PRNG key (default: OS entropy; an int keeps all its bits).
    seed: sampling seed (default: OS entropy; an int keeps up to 128 bits).
      In a multi-process run both defaults are one secret drawn on process 0
      and broadcast (``dpfl.shared_secret_seed``), so every process draws the
      same sample and the same noise.
    ledger: an earlier ledger this run extends (its entries are composed
      before this run's; calibration covers the whole).
    privacy_unit: ``"example"`` or ``"user"``.
    sampling_unit: user level: ``"user"`` (ULS, default) or ``"example"`` (ELS).
    examples_per_user: the cap k (ELS: required, ε depends on it; ULS: a check).
    dataset: user level: the ``dpfl.UserDataset`` (fixes ``dataset_size``).
    local_steps, local_learning_rate, local_optimizer, local_batch_size: ULS
      with local steps (DP-FedAvg): see ``dpfl.federated.clipped_user_updates``.
    mesh: a ``jax.sharding.Mesh`` whose first axis is the data axis: every
      batch is sharded over it (padded to a multiple of its size) and
      replicated over the others. The other axes (e.g. ``"model"`` of a
      ``(data, model)`` mesh) are for the parameters: place your params with
      ``NamedSharding``s on this mesh before ``init``; the optimizer state,
      MF noise buffers and noise draws follow each leaf's sharding, and the
      step keeps them (noise is drawn shard-locally, never whole on one
      device). Auto and Explicit axis types both work.
    strategy, strategy_options: DP-FTRL's matrix factorization (a name from
      ``dpfl.ftrl.STRATEGIES`` or a ``dpfl.mf`` strategy) and its options
      (``buffers``, ``bands``, ``objective``, ``momentum``); see ``dpfl.ftrl``.
    clip_method: the clipping back-end (``"auto"``, ``"materialize"``,
      ``"reweight"``, ``"ghost"``); see ``dpfl.clipped_grad``'s ``method``.
    checkpoint_dir: keep the run's ledger in this directory from the first
      step (write-ahead, durable); ``save`` / ``restore`` use it.
    ledger_sync_steps: write the on-disk ledger once per this many steps,
      ahead (default 1: every step, ~10 ms of fsync each on a plain disk). A
      crash then over-counts by fewer than this many steps; checkpoint saves
      and the run's end write the exact count.

  Returns:
    A ``PrivateTraining``.

  Privacy guarantee: each step releases the clipped sum (sensitivity C per
  sampling unit; ELS: J·C with J ~ Binomial(k, q) of a user's examples) plus
  the plan's Gaussian noise, on a batch drawn by the plan's sampler;
  ``epsilon()`` is the ε of the steps recorded so far for add/remove-one
  neighbours of the privacy unit, computed by ``accounting`` from
  ``plan.mechanism`` — the number ``dpfl epsilon`` prints for the same plan.
  DP-FTRL releases ``G + σ C sens(C) C^{-1} Z``, post-processing of one
  Gaussian mechanism (``accounting.MatrixMechanism``; amplified banded:
  ``accounting.AmplifiedBandedMatrixMechanism``).
  """
  check.choice("privacy_unit", privacy_unit, PRIVACY_UNITS)
  check.choice("clip_method", clip_method, CLIP_METHODS)
  adaptive = l2_clip_norm if isinstance(l2_clip_norm, AdaptiveClip) else None
  if adaptive is not None:
    l2_clip_norm = adaptive.initial
    if strategy is not None and sampling_scheme == "poisson":
      raise ValueError("l2_clip_norm=dpfl.adaptive_clip(...) is not supported with "
                       "sampling_scheme='poisson' and a strategy (amplified banded MF): the "
                       "count query's amplified accounting is not derived; use "
                       "sampling_scheme='cyclic' or a fixed l2_clip_norm")
  if strategy is not None:
    ftrl.check_strategy(strategy)
    strategy_options = ftrl.check_options(strategy_options)
  elif strategy_options is not None:
    raise ValueError("strategy_options apply with a strategy (DP-FTRL) only")
  local = dict(local_learning_rate=local_learning_rate, local_optimizer=local_optimizer,
               local_batch_size=local_batch_size)
  if privacy_unit == "example":
    user_only = dict(examples_per_user=examples_per_user, dataset=dataset,
                     local_steps=local_steps, **local)
    given = sorted(name for name, value in user_only.items() if value is not None)
    if given:
      raise ValueError(f"{', '.join(given)} apply to privacy_unit='user' only (user-level DP)")
    if sampling_unit not in (None, "example"):
      raise ValueError(f"sampling_unit={sampling_unit!r} needs privacy_unit='user' (ULS); "
                       "example-level DP samples examples")
    sampling_unit = "example"
  else:
    sampling_unit = "user" if sampling_unit is None else sampling_unit
    check.choice("sampling_unit", sampling_unit, SAMPLING_UNITS)
    dataset_size, examples_per_user = _user_dataset_size(
        dataset, sampling_unit=sampling_unit, dataset_size=dataset_size,
        examples_per_user=examples_per_user)
    if sampling_unit == "example":
      if local_steps is not None or any(v is not None for v in local.values()):
        raise ValueError("local_steps / local_learning_rate / local_optimizer / "
                         "local_batch_size apply to ULS (sampling_unit='user') only")
      if examples_per_user is None:
        raise ValueError("examples_per_user (the cap k) is required for ELS "
                         "(sampling_unit='example'): its user-level ε depends on k")
    elif local_steps is None and any(v is not None for v in local.values()):
      raise ValueError("local_learning_rate / local_optimizer / local_batch_size need "
                       "local_steps >= 1")
  scheme = _sampling_scheme(sampling_scheme, privacy_unit=privacy_unit,
                            sampling_unit=sampling_unit, strategy=strategy)
  if ledger is not None:
    if not isinstance(ledger, accounting.Ledger):
      raise ValueError(f"ledger must be an accounting.Ledger, got {type(ledger).__name__}")
    ledger.check_compatible(privacy_unit=privacy_unit, accountant=accountant)
  check.choice("accountant", accountant, accounting.accountants.ACCOUNTANTS)
  what = "examples" if sampling_unit == "example" else "users"
  dataset_size = check.positive_int(
      "dataset_size" if privacy_unit == "example" else f"dataset_size (the number of {what})",
      dataset_size)
  batch_size = check.integer("batch_size", batch_size, low=1, high=dataset_size)
  # The run's length, from epochs of the scheme (cyclic Poisson passes like Poisson).
  length_scheme = {"cyclic_poisson": "poisson", "truncated_poisson": "poisson"}.get(scheme,
                                                                                   scheme)
  provisional = planning.SamplingPlan(scheme=length_scheme, unit=sampling_unit,
                                      population_size=dataset_size, batch_size=batch_size,
                                      sampling_prob=batch_size / dataset_size)
  planning.check_noise_or_target(noise_multiplier, target_epsilon)  # before any strategy is built
  num_steps = planning.run_length(provisional, num_steps=num_steps, epochs=epochs)
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (first axis: the data axis batches "
                     f"are sharded over) or None, got {type(mesh).__name__} {mesh!r}")
  # Batches are split over the first (data) axis: pad them to a multiple of it.
  multiple_of = 1 if mesh is None else int(mesh.shape[mesh.axis_names[0]])
  if jax.process_count() > 1:
    # One run over several processes: every process must draw the same
    # sample and the same noise. OS entropy drawn on each process would give
    # each its own — one global batch made of different samples (a unit
    # could sit in it twice: sensitivity 2C, not the C accounted) — so the
    # defaults become one secret drawn on process 0 and broadcast.
    seed = shared_secret_seed() if seed is None else seed
    key = shared_secret_seed() if key is None else key
  sampler = _build_sampler(scheme, privacy_unit=privacy_unit, sampling_unit=sampling_unit,
                           dataset_size=dataset_size, batch_size=batch_size,
                           num_steps=num_steps, max_batch_size=max_batch_size,
                           accountant=accountant, examples_per_user=examples_per_user,
                           multiple_of=multiple_of, seed=sampling.sampler_seed(seed),
                           strategy=strategy, strategy_options=strategy_options)
  sampling_plan = _sampling_plan(sampler, batch_size=batch_size,
                                 examples_per_user=examples_per_user)
  mf = None
  if strategy is not None:
    mf = ftrl.plan(strategy, strategy_options, sampling=sampling_plan, num_steps=num_steps)
  if adaptive is not None:
    adaptive = adaptive.resolved(sampler.expected_batch_size)
  plan = planning.plan_run(
      privacy_unit=privacy_unit, sampling=sampling_plan, l2_clip_norm=l2_clip_norm,
      adaptive=adaptive,
      delta=delta, num_steps=num_steps, noise_multiplier=noise_multiplier,
      target_epsilon=target_epsilon, noise=None if mf is None else mf.noise,
      accountant=accountant, clip_method=clip_method,
      local_steps=local_steps if sampling_unit == "user" and privacy_unit == "user" else None,
      prior=() if ledger is None else ledger.entries)
  def clipped_grad_for(loss_fn):
    if privacy_unit == "user" and sampling_unit == "user" and local_steps is not None:
      fn = clipped_user_updates(
          loss_fn, l2_clip_norm=l2_clip_norm, local_steps=local_steps,
          local_learning_rate=local_learning_rate, local_optimizer=local_optimizer,
          local_batch_size=local_batch_size, has_aux=has_aux,
          microbatch_size=microbatch_size, method=clip_method)
    else:
      fn = make_clipped_grad(loss_fn, l2_clip_norm=l2_clip_norm, has_aux=has_aux,
                             unit=sampling_unit, microbatch_size=microbatch_size,
                             method=clip_method)
    # An adaptive run's C lives in the state: every call must be given it.
    return fn if adaptive is None else _needs_clip_norm(fn)

  grad_fn = clipped_grad_for(loss_fn)
  noise_args = dict(noise_multiplier=plan.noise_multiplier, l2_clip_norm=plan.l2_clip_norm,
                    expected_batch_size=sampler.expected_batch_size, key=key,
                    adaptive=plan.adaptive)
  transform = (noise.gaussian_noise(**noise_args) if mf is None
               else mf.noise_transform(**noise_args))
  journal = RunJournal(plan, prior=() if ledger is None else ledger.entries,
                       sync_steps=ledger_sync_steps)
  if key is not None:
    journal.used_keys.append(key_digest(np.asarray(_rng.key_data(key)).ravel()))
  private = PrivateTraining(plan=plan, clipped_grad=grad_fn, optimizer=optimizer,
                            sampler=sampler, journal=journal, noise_transform=transform,
                            ftrl=mf, mesh=mesh, clipped_grad_for=clipped_grad_for)
  private.optimizer = noise_then(recorded_noise(transform, private._on_release), optimizer)
  if checkpoint_dir is not None:
    checkpoint_dir = os.fspath(checkpoint_dir)
    private.checkpoint_dir = checkpoint_dir
    if _on_process_0(os.path.exists(os.path.join(checkpoint_dir, RUN_FILE))):
      private.resume_from = checkpoint_dir  # init refuses; restore continues it
    elif jax.process_index() == 0:  # one writer: every process records the same steps
      journal.attach(checkpoint_dir)
  return private


def _needs_clip_norm(grad_fn):
  """Adaptive clipping: ``grad_fn`` that refuses calls without the state's clip norm."""

  def fun(params, batch, *, mask=None, l2_clip_norm=None):
    if l2_clip_norm is None:
      raise ValueError(
          "l2_clip_norm must be given with adaptive clipping: clip with the state's C, "
          "private.clipped_grad(params, batch, mask=mask, "
          "l2_clip_norm=dpfl.adaptive.clip_norm(opt_state)), then "
          "private.optimizer.update(grads, opt_state, params, clip_stats=aux)")
    return grad_fn(params, batch, mask=mask, l2_clip_norm=l2_clip_norm)

  return dataclasses.replace(grad_fn, fun=fun)


def _on_process_0(flag: bool) -> bool:
  """Process 0's ``flag``, on every process: one decision for all of a multi-process run.

  Process 0 writes the run's files, so another process that looked later
  could see them and decide otherwise.
  """
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(flag)))


def make_private_user_level(loss_fn: Callable[..., Any],
                            optimizer: optax.GradientTransformation, *,
                            sampling_unit: str = "user", **kwargs) -> PrivateTraining:
  """``make_private(..., privacy_unit="user")``: user-level DP (ULS or ELS).

  The same assembler and the same arguments as ``make_private``; kept as the
  name the user-level documentation uses.

  Args:
    loss_fn: ``loss_fn(params, batch)``, the mean loss over a batch.
    optimizer: any optax optimizer (the server optimizer for ULS).
    sampling_unit: ``"user"`` (ULS, default) or ``"example"`` (ELS).
    **kwargs: every other argument of ``make_private``.

  Returns:
    A ``PrivateTraining`` whose unit of privacy is the user.

  Privacy guarantee:
    That of ``make_private`` with ``privacy_unit="user"``: ``epsilon()`` is
    the ε for adding or removing one user with all of their examples
    (``accounting.UlsDpSgd``, ``ElsDpSgd`` or ``UserMatrixMechanism``).
  """
  if "privacy_unit" in kwargs and kwargs.pop("privacy_unit") != "user":
    raise ValueError("make_private_user_level makes user-level runs (privacy_unit='user')")
  return make_private(loss_fn, optimizer, privacy_unit="user", sampling_unit=sampling_unit,
                      **kwargs)


# The same entry point under the name the literature uses.
dp_sgd = make_private
# One class for every privacy unit; the user-level name stays for readers.
UserLevelPrivateTraining = PrivateTraining
