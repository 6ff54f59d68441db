"""A one-run privacy audit of a ``make_private`` run (Steinke, Nasr & Jagielski 2023).

``one_run(private, params, dataset, num_canaries=m)`` trains the planned run
once with ``m`` canaries, each in the training set with probability ½ (drawn
from the audit's own seed, independent of the run's noise key), scores
every canary from what training released, guesses the top-scored canaries
"in" and the bottom-scored "out" (abstaining on the rest), and turns the
right guesses into an ε lower bound at a stated confidence
(``dpfl.audit.bound``). A canary is a unit like any other: every step
samples each included canary with the plan's rate q, and its contribution
goes through the same clipping and the same noise as the real units.

Modes:

* ``"white-box"`` (default): gradient canaries. Canary i contributes the
  vector ``canary_norm · u_i`` (``canary_norm >= C``; clipped to C). With
  ``canaries="dirac"`` (default) ``u_i`` is the i-th coordinate of an extra
  parameter block of size m that the loss never reads: real gradients are
  zero there, so nothing masks the canaries (the auditor's best case, as the
  paper's Dirac canaries on a large model). With ``canaries="params"``
  ``u_i`` is a random unit direction in the model's own parameter space
  (real gradients interfere: a weaker, more realistic audit). The score of
  canary i is ``-Σ_t <Δθ_t, u_i>``, the paper's white-box score (with SGD,
  the sum over steps of the released noisy gradient along the canary).
* ``"black-box"``: input-space canaries (``canary_examples``, e.g.
  mislabeled inputs), appended to the batches they are sampled into; the
  score is minus the final model's loss on each.

Positive control (``inject``; only this audit's run is broken, never a
``make_private`` option, and ``claimed_epsilon`` stays the ledger's ε):
``"no-clipping"`` lets the canaries (norm ``canary_norm``, default 10·C)
into the sum unclipped; ``"low-noise"`` releases ``10·S + N(0, σ²C²)`` for
the clipped sum S — exactly the information of ``S + N(0, (σ/10)²C²)``, a
tenth of the noise the ledger claims — by scaling the sum ahead of the
run's own noise step (its keys and ledger untouched).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from accounting import validate as check
from dpfl.audit import bound as bounds

MODES = ("white-box", "black-box")
SCORES = ("sum", "likelihood")
CANARIES = ("dirac", "params")
INJECTIONS = ("no-clipping", "low-noise")
LOW_NOISE_FACTOR = 10.0
DEFAULT_CANARY_NORM_FACTOR = 10.0


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """What a one-run audit found.

  Attributes:
    epsilon_lower_bound: ε the guesses rule out at ``confidence``: the true ε
      of the run (at the plan's δ) is at least this, except with probability
      at most ``1 - confidence``.
    claimed_epsilon: the ledger's ε for the steps run (at ``delta``).
    confidence: the bound's confidence.
    num_canaries: m.
    delta: the δ of the claim tested.
    mode: ``"white-box"`` or ``"black-box"``.
    canaries: the white-box canary kind (``"dirac"`` / ``"params"``).
    score: the white-box score (``"sum"`` / ``"likelihood"``).
    inject: the positive control run (None: the real mechanism).
    seed: the audit's seed (reproduces the canaries).
    num_included: canaries that were in the training set.
    num_guesses: the best pair's guesses made (abstentions excluded).
    num_correct: of those, the right ones.
    num_abstentions: canaries not guessed.
    k_plus: the best pair's "in" guesses.
    k_minus: the best pair's "out" guesses.
    guess_pairs_tested: the number of pairs the confidence was split over
      (Bonferroni).
    num_steps: steps trained.
    noise_multiplier: the plan's σ (the claim is computed from it).
    l2_clip_norm: the plan's C.
    sampling_prob: the plan's q.
    scores: per-canary scores (not in ``to_dict``).
    included: per-canary true inclusion (not in ``to_dict``).
  """

  epsilon_lower_bound: float
  claimed_epsilon: float
  confidence: float
  num_canaries: int
  delta: float
  mode: str
  canaries: str | None
  score: str
  inject: str | None
  seed: int
  num_included: int
  num_guesses: int
  num_correct: int
  num_abstentions: int
  k_plus: int
  k_minus: int
  guess_pairs_tested: int
  num_steps: int
  noise_multiplier: float
  l2_clip_norm: float
  sampling_prob: float
  scores: np.ndarray = dataclasses.field(repr=False, compare=False, default=None)
  included: np.ndarray = dataclasses.field(repr=False, compare=False, default=None)

  @property
  def violated(self) -> bool:
    """Whether the audit contradicts the claim (``epsilon_lower_bound > claimed_epsilon``)."""
    return self.epsilon_lower_bound > self.claimed_epsilon

  def to_dict(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("scores", "included")}
    out["violated"] = self.violated
    return out


def _audit_rng(seed: int) -> np.random.Generator:
  """The audit's own stream (inclusion first, then sampling / directions): not the noise key's."""
  return np.random.default_rng(np.random.SeedSequence([check.integer("seed", seed, low=0),
                                                       0x417D17]))


def canary_inclusion(num_canaries: int, seed: int) -> np.ndarray:
  """Which canaries an audit with ``seed`` includes: each independently with probability ½."""
  return _audit_rng(seed).random(check.positive_int("num_canaries", num_canaries)) < 0.5


def _check_private(private) -> None:
  from dpfl.private_training import PrivateTraining
  if not isinstance(private, PrivateTraining):
    raise ValueError(f"private must be what dpfl.make_private returns (a PrivateTraining), "
                     f"got {type(private).__name__}")
  plan = private.plan
  if plan.privacy_unit != "example" or plan.sampling.scheme not in ("poisson",
                                                                   "truncated_poisson"):
    raise ValueError(
        f"one_run audits example-level DP-SGD with Poisson sampling (canaries are sampled "
        f"as Poisson units), got privacy_unit={plan.privacy_unit!r}, sampling scheme "
        f"{plan.sampling.scheme!r}")
  if private.ftrl is not None:
    raise ValueError("one_run audits DP-SGD (independent noise); this run is DP-FTRL")
  if private.mesh is not None:
    raise ValueError("one_run runs on one device: make_private without mesh")
  if getattr(plan, "adaptive", None) is not None:
    # Canaries are clipped to one fixed C; an adaptive run's C moves, so a
    # canary clipped to the starting C could exceed a smaller later one and
    # raise a false alarm.
    raise ValueError("one_run audits a fixed clip norm; this run uses l2_clip_norm="
                     "dpfl.adaptive_clip(...): audit it with a fixed l2_clip_norm")
  if private.steps_done:
    raise ValueError(f"private has already recorded {private.steps_done} steps: the audit "
                     "trains the whole planned run, so pass a fresh make_private(...)")


def one_run(private, params, dataset, *, num_canaries: int, mode: str = "white-box",
            canaries: str = "dirac", confidence: float = bounds.DEFAULT_CONFIDENCE,
            seed: int | None = None, canary_norm: float | None = None, guesses=None,
            canary_examples: Any = None, loss_fn: Callable[..., Any] | None = None,
            score: str = "sum", inject: str | None = None) -> AuditResult:
  """Audits ``private`` in one training run; returns an ``AuditResult``.

  Trains every planned step of ``private`` (a fresh ``dpfl.make_private``
  run: example level, DP-SGD, Poisson sampling) on ``dataset`` from
  ``params``, with ``num_canaries`` canaries inserted, and bounds ε from below.

  Args:
    private: the run to audit (consumed: its steps are spent and recorded).
    params: the initial model parameters.
    dataset: the run's dataset (as for ``private.batches``).
    num_canaries: m >= 1 (the bound can reach at most
      ``bound.max_epsilon_lower_bound(m)``: about 5.8 for m = 1000).
    mode: ``"white-box"`` (gradient canaries) or ``"black-box"`` (input
      canaries, scored by the final model's loss).
    canaries: white-box: ``"dirac"`` (an extra parameter block) or
      ``"params"`` (random directions in the model's parameters).
    confidence: in (0, 1); the probability that a correct mechanism's bound
      exceeds its true ε is at most ``1 - confidence``.
    seed: the audit's seed (canary inclusion, canary sampling, directions),
      an int >= 0; None (default): fresh OS entropy (recorded in the result).
      Either way independent of the run's noise key.
    canary_norm: white-box: the canaries' norm before clipping (default 10·C;
      must be >= C).
    guesses: ``(k⁺, k⁻)`` pairs fixed in advance (default
      ``bound.default_guess_grid(m)``); the confidence is split over them.
    canary_examples: black-box: a pytree of ``m`` examples (leading axis m)
      with the dataset's structure.
    loss_fn: black-box: ``loss_fn(params, batch)``, the run's loss (scores,
      and the unclipped canary gradients of ``inject="no-clipping"``).
    score: white-box: ``"sum"`` (the paper's: ``-Σ_t <Δθ_t, u_i>``) or
      ``"likelihood"``: ``Σ_t log(1 - q + q·exp(μ z_ti - μ²/2))``, the log
      likelihood ratio of "sampled with rate q" against "absent" for the
      step's movement along the canary, ``z_ti``, in units of that step's
      noise (estimated from all canaries' movements by their median absolute
      deviation), with ``μ = 1/σ`` the claimed signal-to-noise ratio. It
      weighs the few steps that sampled a canary above the many that did
      not: tighter at large ε. Any score keeps the bound valid; only its
      tightness depends on it.
    inject: None, or a positive control, ``"no-clipping"`` / ``"low-noise"``
      (see the module docstring): the audit's own run is broken on purpose.

  Returns:
    An ``AuditResult``: ``epsilon_lower_bound`` (at ``confidence``),
    ``claimed_epsilon`` (the ledger's ε at the plan's δ), ``confidence``,
    ``num_canaries``, the guesses made and right, and the run's plan numbers.
  """
  _check_private(private)
  m = check.positive_int("num_canaries", num_canaries)
  check.choice("mode", mode, MODES)
  check.choice("canaries", canaries, CANARIES)
  check.choice("score", score, SCORES)
  confidence = check.open_unit("confidence", confidence)
  if inject is not None:
    check.choice("inject", inject, INJECTIONS)
  clip = float(private.plan.l2_clip_norm)
  if canary_norm is None:
    canary_norm = DEFAULT_CANARY_NORM_FACTOR * clip
  canary_norm = check.real("canary_norm", canary_norm, low=clip)
  guesses = bounds.check_guesses(guesses, m)  # before the run is spent
  if mode == "black-box" and score != "sum":
    raise ValueError(f"score={score!r} is a white-box score; black-box canaries are scored "
                     "by the final model's loss")
  if seed is None:
    seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
  seed = check.integer("seed", seed, low=0)
  q = float(private.plan.sampling.sampling_prob)
  rng = _audit_rng(seed)
  included = rng.random(m) < 0.5
  if mode == "white-box":
    if canary_examples is not None or loss_fn is not None:
      raise ValueError("canary_examples / loss_fn are for mode='black-box'")
    scores = _white_box(private, params, dataset, included=included, rng=rng, q=q,
                        canaries=canaries, canary_norm=canary_norm, clip=clip, inject=inject,
                        score=score)
    kind = canaries
  else:
    if canary_examples is None or loss_fn is None:
      raise ValueError("mode='black-box' needs canary_examples (m input-space canaries) and "
                       "loss_fn (to score them)")
    scores = _black_box(private, params, dataset, included=included, rng=rng, q=q,
                        examples=canary_examples, loss_fn=loss_fn, inject=inject, m=m)
    kind = None
  delta = float(private.plan.delta)
  lower, best, tested = bounds.epsilon_lower_bound_from_scores(
      scores, included, delta=delta, confidence=confidence, guesses=guesses)
  return AuditResult(
      epsilon_lower_bound=float(lower), claimed_epsilon=float(private.epsilon()),
      confidence=confidence, num_canaries=m, delta=delta, mode=mode, canaries=kind,
      score=score if mode == "white-box" else "loss", inject=inject, seed=seed,
      num_included=int(included.sum()), num_guesses=best.num_guesses,
      num_correct=best.num_correct, num_abstentions=m - best.num_guesses,
      k_plus=best.k_plus, k_minus=best.k_minus, guess_pairs_tested=tested,
      num_steps=int(private.steps_done), noise_multiplier=float(private.plan.noise_multiplier),
      l2_clip_norm=clip, sampling_prob=q, scores=np.asarray(scores), included=included)


def _white_box(private, params, dataset, *, included, rng, q, canaries, canary_norm, clip,
               inject, score) -> np.ndarray:
  m = included.size
  # A canary's contribution after clipping (``inject="no-clipping"``: as it is).
  size = canary_norm if inject == "no-clipping" else min(canary_norm, clip)
  scale = LOW_NOISE_FACTOR if inject == "low-noise" else 1.0
  flat_params, _ = ravel_pytree(params)
  dtype = flat_params.dtype
  if canaries == "dirac":
    # The canary block: m coordinates the loss never reads.
    model = {"model": params, "canary": jnp.zeros((m,), dtype)}
    directions = None
  else:
    dim = flat_params.size
    directions = rng.standard_normal((m, dim))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    directions = jnp.asarray(directions, dtype)
    model = params
  state = private.init(model)
  snr = 1.0 / float(private.plan.noise_multiplier)  # the claim: a clipped unit over the noise

  def step(state, batch, mask, sampled, total):
    real_params = state.params["model"] if directions is None else state.params
    grads, _ = private.clipped_grad(real_params, batch, mask=mask)
    weights = sampled.astype(dtype) * size
    if directions is None:
      grads = {"model": grads, "canary": weights}
    else:
      flat, unravel = ravel_pytree(grads)
      grads = unravel(flat + weights @ directions)
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = private.optimizer.update(grads, state.opt_state, state.params)
    new = state._replace(params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state, step=state.step + 1)
    if directions is None:
      moved = -updates["canary"]
    else:
      moved = -(directions @ ravel_pytree(updates)[0])
    if score == "likelihood":
      moved = moved.astype(jnp.float32)
      # The step's noise scale, robustly: most canaries were not sampled.
      spread = 1.4826 * jnp.median(jnp.abs(moved - jnp.median(moved)))
      z = moved / jnp.maximum(spread, jnp.finfo(jnp.float32).tiny)
      moved = jnp.logaddexp(jnp.log1p(-q), jnp.log(q) + snr * z - snr ** 2 / 2)
    return new, total + moved

  step = jax.jit(step)
  total = jnp.zeros((m,), jnp.float32 if score == "likelihood" else dtype)
  for batch, mask in private.batches(dataset, state):
    sampled = jnp.asarray(included & (rng.random(m) < q))
    state, total = step(state, batch, mask, sampled, total)
  return np.asarray(jax.device_get(total), np.float64)


def _black_box(private, params, dataset, *, included, rng, q, examples, loss_fn, inject,
               m) -> np.ndarray:
  leaves = jax.tree.leaves(examples)
  if not leaves or any(np.shape(x)[:1] != (m,) for x in leaves):
    raise ValueError(f"canary_examples must be a pytree whose leaves have a leading axis of "
                     f"num_canaries ({m})")
  examples = jax.tree.map(jnp.asarray, examples)
  scale = LOW_NOISE_FACTOR if inject == "low-noise" else 1.0
  state = private.init(params)

  def one_loss(p, example):
    out = loss_fn(p, jax.tree.map(lambda x: x[None], example))
    return out[0] if isinstance(out, tuple) else out

  def step(state, batch, mask, sampled):
    if inject == "no-clipping":
      grads, _ = private.clipped_grad(state.params, batch, mask=mask)
      per_canary = jax.vmap(jax.grad(one_loss), in_axes=(None, 0))(state.params, examples)
      weights = sampled.astype(jnp.float32)
      grads = jax.tree.map(
          lambda g, c: g + jnp.tensordot(weights, c, axes=1).astype(g.dtype), grads,
          per_canary)
    else:
      both = jax.tree.map(lambda b, c: jnp.concatenate([b, c.astype(b.dtype)]), batch,
                          examples)
      grads, _ = private.clipped_grad(state.params, both,
                                      mask=jnp.concatenate([mask, sampled]))
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = private.optimizer.update(grads, state.opt_state, state.params)
    return state._replace(params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, step=state.step + 1)

  step = jax.jit(step)
  for batch, mask in private.batches(dataset, state):
    sampled = jnp.asarray(included & (rng.random(m) < q))
    state = step(state, batch, mask, sampled)
  losses = jax.jit(jax.vmap(one_loss, in_axes=(None, 0)))(state.params, examples)
  return -np.asarray(jax.device_get(losses), np.float64)
