"""One call that makes an existing JAX/optax training loop private.

``make_private`` takes what a loop already has — a mean loss and an optax
optimizer — plus the privacy settings, and returns what the loop needs:

* ``clipped_grad``: use it where the loop called ``jax.grad(loss_fn)``;
* ``optimizer``: the user's optimizer behind the Gaussian noise step;
* ``batches(dataset)``: Poisson (or shuffled) batches with static shapes and a
  mask, each draw recorded in the ledger *before* it is used;
* ``ledger`` / ``epsilon()``: the privacy spent so far, at any step — the same
  number ``dpfl epsilon`` prints for the same settings.

Everything is built from the public pieces (``dpfl.clipping``,
``dpfl.noise``, ``dpfl.sampling``, ``accounting``); nothing here computes a
gradient, draws noise or accounts on its own.
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


@dataclasses.dataclass
class PrivateTraining:
  """What ``make_private`` returns. Attributes are read by the training loop.

  Attributes:
    clipped_grad: ``(params, batch, mask=...) -> (clipped_sum, aux)``; the sum
      of per-unit gradients clipped to ``l2_clip_norm`` (see
      ``dpfl.clipped_grad``).
    optimizer: ``optax.chain(gaussian_noise(...), user_optimizer)``; feed it
      the clipped sum, it adds N(0, (σC)²) and divides by the expected batch
      size before the user's optimizer sees it.
    sampler: the batch sampler (``PoissonSampler`` or ``ShuffledSampler``).
    ledger: ``accounting.Ledger`` of the steps drawn so far.
    noise_multiplier: σ (given, or calibrated for the target).
    l2_clip_norm: C.
    delta: the δ at which ``epsilon()`` reports.
    num_steps: the planned number of steps (what a target ε was calibrated for).
    accountant: ``"pld"`` or ``"rdp"``.
    ftrl: DP-FTRL only: the ``dpfl.ftrl.FtrlPlan`` (strategy ``C``, its
      participation and accounting); None for DP-SGD.
  """

  clipped_grad: Callable[..., Any]
  optimizer: optax.GradientTransformation
  sampler: Any
  ledger: accounting.Ledger
  noise_multiplier: float
  l2_clip_norm: float
  delta: float
  num_steps: int
  accountant: str = "pld"
  ftrl: Any = None

  def _mechanism(self, num_steps: int) -> accounting.Mechanism:
    source = self.sampler if self.ftrl is None else self.ftrl
    return source.mechanism(noise_multiplier=self.noise_multiplier, num_steps=num_steps)

  @property
  def mechanism(self) -> accounting.Mechanism:
    """The planned run (``num_steps`` steps) as an accounting description."""
    return self._mechanism(self.num_steps)

  def planned_epsilon(self) -> float:
    """ε after all ``num_steps`` planned steps."""
    return accounting.epsilon(self.mechanism, delta=self.delta, accountant=self.accountant)

  def epsilon(self, delta: float | None = None) -> float:
    """ε spent so far (from the ledger) at ``delta`` (default: the run's δ)."""
    return self.ledger.epsilon(delta=self.delta if delta is None else delta,
                               accountant=self.accountant)

  def record_step(self) -> None:
    """Records one released step in the ledger (``batches`` does this for you)."""
    self.ledger.record(self._mechanism(1))

  def batches(self, dataset: Any, num_steps: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Yields ``(batch, mask)`` with static shapes for ``num_steps`` steps.

    Each draw is recorded in the ledger when it is handed out (before the
    step uses it), so ``epsilon()`` never lags behind what was released.
    ``dataset`` is a pytree of arrays with a leading example axis, or any
    indexable sequence of examples (``dpfl.sampling.gather``).
    """
    planned = self.sampler.dataset_size
    size = sampling.num_examples(dataset)
    if size != planned:
      raise ValueError(f"dataset has {size} examples but the run was planned (and is accounted) "
                       f"for dataset_size={planned}; pass the dataset the sampling rate was "
                       "computed for, or make_private again with its size")
    steps = self.num_steps if num_steps is None else check.positive_int("num_steps", num_steps)
    for _ in range(steps):
      draw = self.sampler()
      self.record_step()
      yield sampling.gather(dataset, draw.indices, draw.mask), draw.mask

  def init(self, params) -> optax.OptState:
    return self.optimizer.init(params)

  def reseed(self, opt_state: optax.OptState, *, key: Any = None) -> optax.OptState:
    """Fresh noise keys for an optimizer state restored from a checkpoint.

    Call it on every resume (with the saved ledger passed to
    ``make_private(ledger=...)``): a restored key would replay noise that a
    crashed run may already have released. See ``dpfl.noise.reseed``.
    """
    return noise.reseed(opt_state, key=key)

  def make_step(self, *, jit: bool = True, donate: bool = False) -> Callable[..., Any]:
    """A ready train step: ``(params, opt_state, batch, mask) -> (params, opt_state, aux)``.

    Args:
      jit: compile the step with ``jax.jit``.
      donate: donate ``params`` and ``opt_state`` to the step (``jit`` only):
        their memory is reused for the new ones, so the arrays passed in are
        deleted; use the returned ones (the usual
        ``params, opt_state, aux = step(params, opt_state, ...)`` loop does).
        Recommended for DP-FTRL: its noise state holds model-sized buffers
        (4 for a 4-buffer BLT), and without donation every step allocates
        them afresh (on a 2-core CPU, 10M parameters: ~2.8x slower noise).
    """
    def step(params, opt_state, batch, mask):
      grads, aux = self.clipped_grad(params, batch, mask=mask)
      updates, opt_state = self.optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, aux
    if not jit:
      if donate:
        raise ValueError("donate=True needs jit=True (donation is a jax.jit feature)")
      return step
    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


def check_run(*, delta: Any, accountant: Any, noise_multiplier: Any, target_epsilon: Any,
              num_steps: Any, epochs: Any, ledger: Any, privacy_unit: str) -> tuple:
  """The checks ``make_private`` and ``make_private_user_level`` share.

  Returns ``(delta, noise_multiplier, target_epsilon, num_steps)`` as plain
  numbers (the ones not given stay None). Each bound is the one in
  ``accounting.validate``: ``num_steps`` is at most ``MAX_STEPS`` (longer
  runs cannot be accounted within memory) and ``target_epsilon`` at most
  ``MAX_TARGET_EPSILON``. A ``ledger`` to extend must record the same privacy
  unit, and under ``accountant="rdp"`` hold no PLD-only steps: either would
  otherwise fail only at the first ``epsilon()``.
  """
  if (noise_multiplier is None) == (target_epsilon is None):
    raise ValueError("give exactly one of noise_multiplier and target_epsilon, got "
                     f"noise_multiplier={noise_multiplier!r}, target_epsilon={target_epsilon!r}")
  if (num_steps is None) == (epochs is None):
    raise ValueError(f"give exactly one of num_steps and epochs, got num_steps={num_steps!r}, "
                     f"epochs={epochs!r}")
  check.choice("accountant", accountant, accounting.accountants.ACCOUNTANTS)
  delta = check.open_unit("delta", delta)
  if noise_multiplier is not None:
    noise_multiplier = check.noise_multiplier("noise_multiplier", noise_multiplier)
  else:
    target_epsilon = check.target_epsilon("target_epsilon", target_epsilon)
  if num_steps is not None:
    num_steps = check.num_steps("num_steps", num_steps)
  else:
    check.positive("epochs", epochs)
  if ledger is not None:
    if not isinstance(ledger, accounting.Ledger):
      raise ValueError(f"ledger must be an accounting.Ledger, got {type(ledger).__name__}")
    ledger.check_compatible(privacy_unit=privacy_unit, accountant=accountant)
  return delta, noise_multiplier, target_epsilon, num_steps


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
                 strategy: Any = None, strategy_options: dict | None = None) -> PrivateTraining:
  """Makes a loss and an optax optimizer into example-level DP-SGD (or DP-FTRL).

  With ``privacy_unit="user"`` it makes user-level DP training instead and
  returns ``dpfl.user_level.make_private_user_level(...)``'s result: pass
  ``sampling_unit="user"`` (ULS, the default) or ``"example"`` (ELS),
  ``examples_per_user``, optionally ``dataset`` (a ``dpfl.data.UserDataset``),
  ``local_steps`` / ``local_learning_rate`` (DP-FedAvg) and ``mesh``; see
  that function for every user-level option.

  Args:
    loss_fn: ``loss_fn(params, batch)``, the mean loss over a batch whose
      leaves have a leading example axis (``(loss, aux)`` with ``has_aux``).
    optimizer: any optax optimizer; it receives the noisy mean gradient.
    l2_clip_norm: C, the per-example clip norm.
    dataset_size: N, the number of examples (user level: of sampling units).
    batch_size: the expected batch size; Poisson rate q = batch_size / N (or
      the fixed batch size for ``sampling_scheme="shuffle"``).
    delta: δ for reporting and calibration.
    num_steps / epochs: the length of the run (give one); epochs become
      ceil(epochs * N / batch_size) steps (cyclic DP-FTRL: ceil(epochs * (N //
      batch_size)), whole passes over its fixed batches).
    noise_multiplier / target_epsilon: give σ, or a target ε to calibrate σ
      for (through ``accounting.calibrate_noise_multiplier``, never above it).
    sampling_scheme: ``"poisson"`` (amplified; padded to ``max_batch_size``
      with truncation accounted; the default for DP-SGD), ``"shuffle"``
      (fixed batches, no amplification claimed) or, with a ``strategy``,
      ``"cyclic"`` (its default: one fixed order repeated every epoch) or
      ``"poisson"`` (banded strategies: amplified banded MF, cyclic Poisson
      sampling over ``bands`` groups, q = batch_size / (N // bands)).
    max_batch_size: static batch shape for Poisson sampling (default: a size
      exceeded with probability <= 1e-9 per step). A larger draw is truncated
      (accounted: ``TruncatedPoissonDpSgd``) under ``accountant="pld"``, and
      padded to the next multiple of it (one more compilation; exact Poisson,
      ``PoissonDpSgd``) under ``"rdp"``, which cannot account truncation.
    has_aux, microbatch_size: passed to ``dpfl.clipped_grad``.
    accountant: ``"pld"`` or ``"rdp"`` (see ``max_batch_size``; a ``ledger``
      with truncated-Poisson steps needs ``"pld"``).
    key: noise PRNG key (default: OS entropy; an int keeps all its bits, see
      ``dpfl.noise.gaussian_noise``). seed: sampler seed (default: OS entropy).
    ledger: an existing ledger to extend (e.g. one loaded to resume a run).
    privacy_unit: ``"example"`` (DP-SGD) or ``"user"`` (see above).
    sampling_unit, examples_per_user, dataset, local_steps,
      local_learning_rate, local_optimizer, local_batch_size, mesh: the
      user-level options (``privacy_unit="user"`` only).
    strategy: None (DP-SGD: independent noise) or DP-FTRL's matrix
      factorization: a name from ``dpfl.ftrl.STRATEGIES`` (``"identity"``,
      ``"tree"``, ``"sqrt"``, ``"banded"``, ``"blt"``, ``"dense"``; built or
      optimized for the run's participation) or a ``dpfl.mf`` strategy
      object. See ``dpfl.ftrl`` for how sampling, noise and accounting match.
    strategy_options: with a named strategy: ``buffers`` (blt, default 4),
      ``bands`` (banded, default min(16, steps per epoch)), ``objective``
      (``"mean"``, the default for every strategy in training, or ``"max"``)
      and ``momentum`` (optimize for the momentum workload of heavy-ball
      ``beta``: pair it with ``optax.sgd(lr, momentum=beta)``; default 0,
      prefix sums).

  Returns:
    A ``PrivateTraining`` (a ``dpfl.user_level.UserLevelPrivateTraining``
    for ``privacy_unit="user"``).

  Formal guarantee: each step releases the clipped sum (sensitivity C per
  example) plus N(0, (σC)²I), on a batch drawn by the returned sampler;
  ``epsilon()`` is the ε of the steps drawn so far for add/remove-one-example
  neighbours, computed by ``accounting`` from the ledger. DP-FTRL: the steps
  release ``G + σ C sens(C) C^{-1} Z``, a post-processing of one Gaussian
  mechanism ``C G + σ C sens(C) Z`` (``accounting.MatrixMechanism``; or
  amplified banded MF, ``accounting.AmplifiedBandedMatrixMechanism``).
  """
  if strategy is not None:
    ftrl.check_strategy(strategy)
    strategy_options = ftrl.check_options(strategy_options)
  elif strategy_options is not None:
    raise ValueError("strategy_options apply with a strategy (DP-FTRL) only")
  if privacy_unit == "user":
    if sampling_scheme not in (None, "poisson") and strategy is None:
      raise ValueError("sampling_scheme applies to privacy_unit='example' only; user-level "
                       "training Poisson-samples users (ULS) or examples (ELS)")
    from dpfl import user_level  # deferred: user_level imports this module
    return user_level.make_private_user_level(
        loss_fn, optimizer, l2_clip_norm=l2_clip_norm, dataset_size=dataset_size,
        batch_size=batch_size, delta=delta, num_steps=num_steps, epochs=epochs,
        noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
        max_batch_size=max_batch_size, has_aux=has_aux, microbatch_size=microbatch_size,
        accountant=accountant, key=key, seed=seed, ledger=ledger,
        sampling_unit="user" if sampling_unit is None else sampling_unit,
        examples_per_user=examples_per_user, dataset=dataset, local_steps=local_steps,
        local_learning_rate=local_learning_rate, local_optimizer=local_optimizer,
        local_batch_size=local_batch_size, mesh=mesh, strategy=strategy,
        strategy_options=strategy_options, sampling_scheme=sampling_scheme)
  if privacy_unit != "example":
    raise ValueError(f"privacy_unit must be 'example' or 'user', got {privacy_unit!r}")
  user_only = dict(examples_per_user=examples_per_user, dataset=dataset,
                   local_steps=local_steps, local_learning_rate=local_learning_rate,
                   local_optimizer=local_optimizer, local_batch_size=local_batch_size,
                   mesh=mesh)
  given = sorted(name for name, value in user_only.items() if value is not None)
  if given:
    raise ValueError(f"{', '.join(given)} apply to privacy_unit='user' only (user-level DP)")
  if sampling_unit not in (None, "example"):
    raise ValueError(f"sampling_unit={sampling_unit!r} needs privacy_unit='user' (ULS); "
                     "example-level DP samples examples")
  if sampling_scheme is None:
    sampling_scheme = "poisson" if strategy is None else "cyclic"
  if strategy is None and sampling_scheme not in ("poisson", "shuffle"):
    raise ValueError(f"sampling_scheme must be 'poisson' or 'shuffle' for DP-SGD, got "
                     f"{sampling_scheme!r} ('cyclic' needs a strategy, e.g. 'identity')")
  if strategy is not None and sampling_scheme not in ("cyclic", "poisson"):
    raise ValueError(f"sampling_scheme must be 'cyclic' or 'poisson' with a strategy "
                     f"(DP-FTRL), got {sampling_scheme!r} (a reshuffle per epoch would break "
                     "the participation pattern its sensitivity assumes)")
  delta, noise_multiplier, target_epsilon, num_steps = check_run(
      delta=delta, accountant=accountant, noise_multiplier=noise_multiplier,
      target_epsilon=target_epsilon, num_steps=num_steps, epochs=epochs, ledger=ledger,
      privacy_unit="example")
  dataset_size = check.positive_int("dataset_size", dataset_size)
  batch_size = check.integer("batch_size", batch_size, low=1, high=dataset_size)
  if epochs is not None:
    # An epoch of shuffled fixed-size batches is N // B batches (the sampler
    # drops the remainder); counting ceil(N / B) would account steps never run.
    _, num_steps = accounting.sampling_from_epochs(
        dataset_size=dataset_size, batch_size=batch_size, epochs=epochs,
        scheme="shuffle" if sampling_scheme == "shuffle" else "poisson")
    num_steps = check.num_steps(f"num_steps (from epochs={epochs!r})", num_steps)
  plan = None
  if strategy is not None:
    if sampling_scheme == "cyclic":
      if max_batch_size is not None:
        raise ValueError("max_batch_size applies to Poisson sampling only (cyclic batches "
                         "have the fixed batch_size)")
      sampler = cyclic_sampling.CyclicSampler(dataset_size, batch_size=batch_size, seed=seed)
      if epochs is not None:  # passes over the cyclic order: b = N // B steps each
        num_steps = check.num_steps(f"num_steps (from epochs={epochs!r})",
                                    ftrl.cyclic_steps(epochs, sampler.steps_per_epoch))
    else:
      bands = ftrl.amplified_bands(strategy, strategy_options, num_steps)
      group = dataset_size // bands
      if bands > dataset_size or not batch_size <= group:
        raise ValueError(f"batch_size must be in [1, dataset_size // bands = {group}] for "
                         f"amplified banded MF ({bands} bands), got {batch_size!r}")
      sampler = cyclic_sampling.CyclicPoissonSampler(dataset_size, num_groups=bands,
                                              sampling_prob=batch_size / group,
                                              max_batch_size=max_batch_size, seed=seed)
    plan = ftrl.plan(strategy, strategy_options, sampler=sampler, num_steps=num_steps,
                     privacy_unit="example")
  elif sampling_scheme == "poisson":
    # dp-accounting's RDP back end has no event for truncated Poisson sampling,
    # and untruncated-Poisson ε is not an upper bound for truncated batches; so
    # under RDP a rare oversized draw gets a longer padded shape instead.
    sampler = sampling.PoissonSampler(dataset_size, sampling_prob=batch_size / dataset_size,
                                      max_batch_size=max_batch_size,
                                      truncate=accountant == "pld", seed=seed)
  else:
    if max_batch_size is not None:
      raise ValueError("max_batch_size applies to sampling_scheme='poisson' only")
    sampler = sampling.ShuffledSampler(dataset_size, batch_size=batch_size, seed=seed)

  describe = sampler.mechanism if plan is None else plan.mechanism
  if target_epsilon is not None:
    calibration = accounting.calibrate_noise_multiplier(
        lambda s: describe(noise_multiplier=s, num_steps=num_steps),
        target_epsilon=target_epsilon, delta=delta, accountant=accountant)
    noise_multiplier = calibration.value
  # Validate σ and the step count the way the accountant will, before any step runs.
  describe(noise_multiplier=noise_multiplier, num_steps=num_steps)
  grad_fn = _clipped_grad(loss_fn, l2_clip_norm=l2_clip_norm, has_aux=has_aux,
                          microbatch_size=microbatch_size)
  # DP-SGD's noise or the plan's correlated noise: both dpfl.noise.privatizer.
  noisy = (noise.gaussian_noise if plan is None else plan.noise)(
      noise_multiplier=noise_multiplier, l2_clip_norm=l2_clip_norm,
      expected_batch_size=sampler.expected_batch_size, key=key)
  return PrivateTraining(clipped_grad=grad_fn, optimizer=optax.chain(noisy, optimizer),
                         sampler=sampler, ledger=accounting.Ledger() if ledger is None else ledger,
                         noise_multiplier=float(noise_multiplier),
                         l2_clip_norm=grad_fn.l2_clip_norm, delta=delta,
                         num_steps=int(num_steps), accountant=accountant, ftrl=plan)


# The same entry point under the name the literature uses.
dp_sgd = make_private
