"""A planned private run: ``PrivateTraining`` and its one state, ``PrivateState``.

``dpfl.make_private`` (``dpfl.privatize``) plans a run and returns a
``PrivateTraining``, which runs it:

* ``init(params)`` -> ``PrivateState``: params, optimizer state (noise keys,
  MF buffers), the sampler's seed, the step count — one pytree;
* ``make_step()`` -> ``(state, batch, mask) -> (state, aux)``;
* ``batches(dataset, state)`` yields the batches of the steps that remain;
* ``save(directory, state)`` / ``restore(directory, params)``: orbax
  checkpoints of the state next to the plan and the ledger; a restored run
  gets fresh noise keys and continues the same plan to its planned end;
* ``epsilon()``: ε spent so far; ``BudgetExhaustedError`` before any step the
  budget does not cover.

Write-ahead accounting: every step is recorded in the run's journal
(``accounting.journal``; on disk once a checkpoint directory is set) before
its noise is drawn — ``batches`` records a step when it hands out its batch,
and the noise transform itself records (``recorded_noise``: a host callback
the noise key depends on) any step that did not come from ``batches``. A
crash can only over-count.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import io_callback

import accounting
from accounting import validate as check
from accounting.journal import RunJournal, key_digest
from accounting.plan import PrivacyPlan
from dpfl import _rng, _sharding, adaptive, noise, sampling
from dpfl.data import UserDataset
from dpfl.federated import local_slots, shard_users

DEFAULT_KEEP = 3


class PrivateState(NamedTuple):
  """The whole state of a private run, as one pytree (jit, shard and checkpoint it).

  Attributes:
    params: the model parameters.
    opt_state: the optimizer state: ``(noise state, your optimizer's state)``;
      the noise state holds the noise key and, for DP-FTRL, the MF buffers.
    sampler_seed: ``uint32[4]``, the seed of the run's batch sampling (with
      ``step`` it fixes every batch: a cyclic order survives a restart).
    step: int32 scalar, the number of steps taken.
  """

  params: Any
  opt_state: Any
  sampler_seed: jax.Array
  step: jax.Array


def recorded_noise(transform: optax.GradientTransformation,
                   on_release: Callable[[Any], Any]) -> optax.GradientTransformation:
  """``transform`` whose update first calls ``on_release(count)`` on the host.

  The noise key depends on the callback's result (XOR with the zero it
  returns), so the callback has run — and the step is in the ledger — before
  any noise of the step exists. It need not be an ordered effect: successive
  steps are ordered by their state already (and unordered is cheaper).
  """

  def update_fn(updates, state, params=None, **extra_args):
    token = io_callback(on_release, jax.ShapeDtypeStruct((), jnp.uint32), state.count,
                        ordered=False)
    state = state._replace(key=jnp.bitwise_xor(jnp.asarray(state.key), token))
    return transform.update(updates, state, params, **extra_args)

  if isinstance(transform, optax.GradientTransformationExtraArgs):
    return optax.GradientTransformationExtraArgs(transform.init, update_fn)
  return optax.GradientTransformation(transform.init, update_fn)


def noise_then(noise_transform: optax.GradientTransformation,
               optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
  """``optax.chain(noise_transform, optimizer)``, the noise alone taking ``clip_stats``.

  The state is the chain's, ``(noise state, optimizer state)``. Adaptive
  clipping's noise needs the step's clipping statistics (``clip_stats=``);
  your optimizer never sees them (it may take extra arguments of its own).
  """
  if not isinstance(noise_transform, optax.GradientTransformationExtraArgs):
    return optax.chain(noise_transform, optimizer)

  def init_fn(params):
    return (noise_transform.init(params), optimizer.init(params))

  def update_fn(updates, state, params=None, *, clip_stats=None, **extra_args):
    updates, noise_state = noise_transform.update(updates, state[0], params,
                                                  clip_stats=clip_stats)
    updates, opt_state = optax.with_extra_args_support(optimizer).update(
        updates, state[1], params, **extra_args)
    return updates, (noise_state, opt_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@dataclasses.dataclass(eq=False)
class PrivateTraining:
  """A planned private run (what ``make_private`` returns).

  Attributes:
    plan: the ``accounting.plan.PrivacyPlan`` (σ, sampling, clipping, noise,
      accountant, δ, target ε, planned steps).
    clipped_grad: ``(params, batch, mask=...) -> (clipped_sum, aux)``: per-unit
      gradients (or ULS local-step updates) clipped to C and summed.
    optimizer: ``optax.chain(noise, your_optimizer)``; the noise step adds the
      plan's noise to the clipped sum and divides by the expected batch size.
    sampler: the ``dpfl.sampling.Sampler`` of the plan.
    journal: the write-ahead ``accounting.journal.RunJournal``.
    ftrl: DP-FTRL only: the ``dpfl.ftrl.FtrlPlan`` (strategy ``C``).
    mesh: user level: the mesh batches are sharded over, or None.
    clipped_grad_for: ``loss_fn -> clipped_grad`` with this run's clipping
      (clip norm, unit, local steps, method) for another loss: what
      ``dpfl.nnx`` builds its model-taking clipped gradient from.
  """

  plan: PrivacyPlan
  clipped_grad: Callable[..., Any]
  optimizer: optax.GradientTransformation
  sampler: Any
  journal: RunJournal
  noise_transform: optax.GradientTransformation
  ftrl: Any = None
  mesh: Any = None
  clipped_grad_for: Callable[..., Any] | None = None
  checkpoint_dir: str | None = None
  resume_from: str | None = None
  _last_release: int = -1
  _pending: int = 0
  _managers: dict = dataclasses.field(default_factory=dict)

  # --- the plan's numbers -------------------------------------------------------

  @property
  def noise_multiplier(self) -> float:
    return self.plan.noise_multiplier

  @property
  def l2_clip_norm(self) -> float:
    """C; with adaptive clipping the initial C (the state holds the current one)."""
    return self.plan.l2_clip_norm

  def clip_norm(self, state: PrivateState) -> float:
    """The clip norm of ``state``'s next step (adaptive: the state's C_t; else the plan's)."""
    value = adaptive.clip_norm(state.opt_state)
    return self.plan.l2_clip_norm if value is None else float(jax.device_get(value))

  @property
  def delta(self) -> float:
    return self.plan.delta

  @property
  def num_steps(self) -> int:
    """The planned steps (what a target ε was calibrated for)."""
    return self.plan.num_steps

  @property
  def accountant(self) -> str:
    return self.plan.accountant

  @property
  def privacy_unit(self) -> str:
    return self.plan.privacy_unit

  @property
  def sampling_unit(self) -> str:
    return self.plan.sampling.unit

  @property
  def examples_per_user(self) -> int | None:
    return self.plan.sampling.examples_per_user

  @property
  def local_steps(self) -> int | None:
    return self.plan.local_steps

  @property
  def ledger(self) -> accounting.Ledger:
    """A copy of the ledger, with earlier runs' entries and this run's recorded steps."""
    return self.journal.ledger

  @property
  def steps_done(self) -> int:
    """Steps recorded so far (released, or about to be)."""
    return self.journal.steps

  @property
  def mechanism(self) -> accounting.Mechanism:
    """The planned run (all ``num_steps`` steps) as an accounting description."""
    return self.plan.mechanism()

  def planned_epsilon(self) -> float:
    """ε after all planned steps (composed after any earlier ledger entries)."""
    return self.journal.epsilon(self.plan.num_steps)

  def epsilon(self, delta: float | None = None) -> float:
    """ε spent so far: every step recorded (write-ahead), at ``delta`` (default: the plan's)."""
    return self.journal.epsilon(delta=delta)

  def extend(self, num_steps: int) -> None:
    """Allows ``num_steps`` steps past the plan (recorded; with a target, checked against it)."""
    self.journal.extend(num_steps)

  # --- write-ahead accounting -----------------------------------------------------

  def _on_release(self, count) -> np.ndarray:
    count = int(count)
    if count <= self._last_release:
      raise ValueError(
          f"this noise state is at step {count + 1}, but this run already released noise "
          f"for step {self._last_release + 1}: an earlier state is being stepped again, "
          "which would release its noise twice. Continue from the latest state (or "
          "private.restore a checkpoint)")
    if self._pending:
      self._pending -= 1
    else:
      self.journal.record_step()
    self._last_release = count
    return np.zeros((), np.uint32)

  def _check_next_step(self) -> None:
    if not self._pending:
      self.journal.check_step(1)

  # --- the state --------------------------------------------------------------------

  def init(self, params) -> PrivateState:
    """The ``PrivateState`` at step 0 (fresh noise keys unless ``make_private(key=...)``)."""
    if self.journal.steps:
      raise ValueError(
          f"this run has already recorded {self.journal.steps} steps; continue from its "
          "latest state, or private.restore(directory, params) after a restart")
    if self.resume_from is not None:
      raise ValueError(
          f"checkpoint_dir {self.resume_from!r} already holds a run: continue it with "
          "private.restore(checkpoint_dir, params), or give a new directory")
    state = self._initial_state(params)
    if self.checkpoint_dir is not None:
      # The step-0 checkpoint: a crash before the first save can then resume
      # (correlated noise needs the state its released steps started from).
      self.save(self.checkpoint_dir, state)
    return state

  def _initial_state(self, params) -> PrivateState:
    seed = jnp.asarray(self.sampler.seed, jnp.uint32)

    def initial(params):
      return PrivateState(params=params, opt_state=self.optimizer.init(params),
                          sampler_seed=seed, step=jnp.zeros((), jnp.int32))

    mesh = _sharding.params_mesh(params)
    if mesh is None:
      return initial(params)
    _sharding.check_data_axis_free(params, self.mesh or mesh)
    # Placed params: every state leaf is made where it lives (optimizer
    # moments and MF buffers sharded like their parameter, keys and counts
    # replicated), never whole on one device first.
    shardings = _sharding.follow_params(jax.eval_shape(initial, params), params, mesh)
    return jax.jit(initial, out_shardings=shardings)(params)

  def make_step(self, *, jit: bool = True, donate: bool = False) -> Callable[..., Any]:
    """A train step ``(state, batch, mask) -> (state, aux)``.

    The step is recorded before its noise is drawn, and refused
    (``BudgetExhaustedError``) if the budget does not cover it.

    Args:
      jit: compile the step with ``jax.jit``.
      donate: donate the state to the step (``jit`` only): its memory is reused
        for the new one (use the returned state). Recommended for DP-FTRL,
        whose noise state holds model-sized buffers.
    """
    # The shardings of the first state stepped (None for leaves not placed
    # on a mesh): the clipped sum is laid out like the params, so the noise
    # added to it is drawn shard by shard, and every new state keeps them.
    layout: dict = {}

    def step(state: PrivateState, batch, mask):
      shardings = layout["state"]
      clip_norm = adaptive.clip_norm(state.opt_state)
      grads, aux = self.clipped_grad(state.params, batch, mask=mask, l2_clip_norm=clip_norm)
      grads = _sharding.constrain_tree(grads, shardings.params)
      # Adaptive clipping: the noise moves C from the same units' counts.
      extra = {} if clip_norm is None else {"clip_stats": aux}
      updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **extra)
      params = optax.apply_updates(state.params, updates)
      new = PrivateState(params=params, opt_state=opt_state, sampler_seed=state.sampler_seed,
                         step=state.step + 1)
      return _sharding.constrain_tree(new, shardings), aux

    if not jit and donate:
      raise ValueError("donate=True needs jit=True (donation is a jax.jit feature)")
    run = jax.jit(step, donate_argnums=(0,) if donate else ()) if jit else step
    explicit = self.mesh is not None and jax.sharding.AxisType.Explicit in self.mesh.axis_types

    def checked(state, batch, mask):
      self._check_next_step()
      if "state" not in layout:
        if self.mesh is not None:
          _sharding.check_data_axis_free(state.params, self.mesh)
        layout["state"] = _sharding.tree_shardings(state)
      if explicit:
        with jax.set_mesh(self.mesh):
          return run(state, batch, mask)
      return run(state, batch, mask)

    return checked

  def _check_dataset(self, dataset) -> None:
    """Checks that ``dataset`` is the one the run was planned for."""
    planned = self.plan.sampling.population_size
    if self.plan.privacy_unit == "example":
      size = sampling.num_examples(dataset)
      if size != planned:
        raise ValueError(f"dataset has {size} examples but the run was planned (and is "
                         f"accounted) for dataset_size={planned}; pass the dataset the "
                         "sampling rate was computed for, or make_private again with its size")
      return
    if not isinstance(dataset, UserDataset):
      raise ValueError(f"dataset must be a dpfl.data.UserDataset, got {type(dataset).__name__}")
    k = self.plan.sampling.examples_per_user
    if k is not None and dataset.examples_per_user > k:
      raise ValueError(f"dataset caps users at {dataset.examples_per_user} examples, above "
                       f"examples_per_user={k} that the privacy guarantee assumes")
    unit = self.plan.sampling.unit
    size = dataset.num_users if unit == "user" else dataset.num_examples
    if size != planned:
      what = "num_users" if unit == "user" else "num_examples"
      raise ValueError(f"dataset.{what} ({size}) must equal dataset_size ({planned}) the run "
                       "was planned for")

  def _gather(self, dataset, draw) -> tuple[Any, Any]:
    if self.plan.privacy_unit == "example":
      out = sampling.gather(dataset, draw.indices, draw.mask), draw.mask
    else:
      # Under a mesh each process reads only the slots its own devices hold
      # (shard_users reads no others): an on-disk dataset reads only its rows.
      mask = draw.mask if self.mesh is None else draw.mask & local_slots(draw.mask.size, self.mesh)
      gather = dataset.gather_users if self.sampling_unit == "user" else dataset.gather_examples
      out = gather(draw.indices, mask)
    return out if self.mesh is None else shard_users(out, self.mesh)

  def batches(self, dataset: Any, state: PrivateState | None = None,
              num_steps: int | None = None) -> Iterator[tuple[Any, Any]]:
    """Yields ``(batch, mask)`` for the steps that remain, each recorded before it is used.

    Args:
      dataset: example level: a pytree of arrays with a leading example axis,
        or an indexable sequence of examples (``dpfl.sampling.gather``). User
        level: the ``dpfl.UserDataset`` (ULS batches ``[U, k, ...]`` with mask
        ``[U, k]``; ELS ``[B, ...]`` with mask ``[B]``).
      state: the ``PrivateState`` to continue (its seed and step fix the
        batches). None: the sampler of this object, from the steps recorded
        (the ``(params, opt_state)`` loop).
      num_steps: how many batches (default: every step the budget has left).
        Asking for more than remain raises ``BudgetExhaustedError`` when the
        budget runs out, before that batch is handed out.

    Raises:
      BudgetExhaustedError: no step remains (e.g. iterating a finished run
        again), raised at the first ``next``.
    """
    self._check_dataset(dataset)
    requested = None if num_steps is None else check.positive_int("num_steps", num_steps)
    if state is None:
      seed, position = self.sampler.seed, self.journal.steps
    else:
      seed = np.asarray(jax.device_get(state.sampler_seed), np.uint32)
      position = int(jax.device_get(state.step))
    handed = 0
    while requested is None or handed < requested:
      if requested is None and handed and self.journal.remaining == 0:
        return
      self.journal.record_step()  # BudgetExhaustedError past the budget: nothing handed out
      self._pending += 1
      draw = self.sampler.draw(seed, position)
      position += 1
      handed += 1
      yield self._gather(dataset, draw)

  # --- checkpoints ----------------------------------------------------------------------

  def _manager(self, directory: str, keep: int | None = None):
    import orbax.checkpoint as ocp  # deferred: only checkpointing needs it
    key = os.path.abspath(directory)
    if key not in self._managers or (keep is not None and self._managers[key][1] != keep):
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep or DEFAULT_KEEP, enable_async_checkpointing=False,
          cleanup_tmp_directories=True)
      self._managers[key] = (ocp.CheckpointManager(key, options=options), keep)
    return self._managers[key][0]

  def save(self, directory: str | os.PathLike, state: PrivateState, *,
           keep: int = DEFAULT_KEEP) -> None:
    """Writes an atomic checkpoint of ``state`` (orbax) next to the run's plan and ledger.

    The first ``save`` attaches the run's journal to ``directory``: from then
    on every step is written to ``directory/ledger.json`` before its noise
    is drawn (give ``make_private(checkpoint_dir=...)`` to do so from the
    first step). Keeps the last ``keep`` checkpoints.
    """
    import orbax.checkpoint as ocp
    directory = os.fspath(directory)
    keep = check.positive_int("keep", keep)
    if self.checkpoint_dir is None:
      self.checkpoint_dir = directory
      if jax.process_index() == 0:  # one writer: every process records the same steps
        self.journal.attach(directory)
    elif os.path.abspath(self.checkpoint_dir) != os.path.abspath(directory):
      raise ValueError(f"directory: this run's ledger is kept in {self.checkpoint_dir!r}; "
                       f"save its checkpoints there, not in {directory!r}")
    step = int(jax.device_get(state.step))
    if step > self.journal.steps:
      raise ValueError(f"state is at step {step} but the run recorded only "
                       f"{self.journal.steps}: not a state of this run")
    self.journal.flush()
    manager = self._manager(directory, keep)
    if step in manager.all_steps():
      # The same step again (e.g. a second init): the newest state of that
      # step is the one whose noise key the run goes on with.
      manager.delete(step)
    manager.save(step, args=ocp.args.StandardSave(_sharding.global_arrays(state, self.mesh)), force=True)
    manager.wait_until_finished()

  def restore(self, directory: str | os.PathLike, params, *, key: Any = None) -> PrivateState:
    """The latest ``PrivateState`` saved in ``directory``, ready to continue the run.

    The checkpoint must be of this plan (same configuration, hence the same
    σ): another plan is refused with the first field that differs. The
    returned state continues the *same* run: steps recorded after the last
    checkpoint (released, or about to be, before a crash) count as done —
    the state skips past them, rolling the MF noise buffers over them so the
    run stays one matrix mechanism — and the remaining steps are the planned
    ones minus those done. The noise key is fresh OS entropy, never a saved
    one; ``key`` (an int or ``jax.random.key``) replaces it instead, for tests
    that replay a run, and is refused if this run used it before.

    Args:
      directory: the checkpoint directory (``save``'s).
      params: parameters with the shapes of the saved ones (e.g. the model's
        initial parameters), placed as the run goes on: the checkpoint is
        read into their shardings, whatever mesh or number of processes
        wrote it.
      key: None (OS entropy), or an explicit noise key (see above).
    """
    import orbax.checkpoint as ocp
    directory = os.fspath(directory)
    journal = RunJournal.load(directory)
    if jax.process_index() != 0:
      journal.directory = None  # one writer (process 0), from the first write on
    journal.sync_steps = self.journal.sync_steps
    if journal.plan != self.plan:
      raise ValueError(f"directory {directory!r} holds a checkpoint of a different plan: "
                       f"{plan_difference(journal.plan, self.plan)}; restore it with the "
                       "make_private arguments it was made with")
    manager = self._manager(directory)
    latest = manager.latest_step()
    seed = jnp.asarray(self.sampler.seed, jnp.uint32)
    if latest is None:
      # No checkpoint yet: correlated noise cannot be continued without the
      # state its released steps left behind (``init`` saves one at step 0
      # when ``checkpoint_dir`` is given, so this needs a run without it).
      if journal.steps and self.ftrl is not None:
        raise ValueError(
            f"directory {directory!r} has no checkpoint but its ledger records "
            f"{journal.steps} DP-FTRL steps: their noise buffers are lost, so the run cannot "
            "continue as one matrix mechanism. Plan a new run (pass "
            "ledger=accounting.Ledger.load(<directory>/ledger.json) to compose it after "
            "these steps)")
      state = self._initial_state(params)
    else:
      template = self._template(params, seed)
      state = manager.restore(latest, args=ocp.args.StandardRestore(template))
    saved = int(jax.device_get(state.step))
    if saved > journal.steps:
      raise ValueError(f"checkpoint {latest} in {directory!r} is ahead of its ledger "
                       f"({journal.steps} steps): the ledger was not written ahead")
    saved_key = np.asarray(jax.device_get(state.opt_state[0].key))
    noise_state = self._roll_forward(state.opt_state[0], state.params, journal.steps - saved)
    if key is None:
      new_key = _rng.fresh_key_data(like=noise_state.key)
    else:
      new_key = jnp.asarray(_rng.key_data(key), jnp.uint32).reshape(noise_state.key.shape)
      if journal.steps > saved and np.array_equal(np.asarray(new_key), saved_key):
        raise ValueError(
            f"key: this is the checkpoint's own noise key, which already drew the noise of "
            f"the {journal.steps - saved} step(s) released after it; resuming with it would "
            "release that noise again. Pass None (fresh OS entropy) or a new key")
      journal.note_resume_key(key_digest(np.asarray(new_key).ravel()))
    opt_state = (noise_state._replace(key=new_key),) + tuple(state.opt_state[1:])
    self.journal = journal
    self.checkpoint_dir = directory
    self.resume_from = None
    self._last_release = journal.steps - 1
    self._pending = 0
    self.sampler.position = journal.steps
    restored = PrivateState(params=state.params, opt_state=opt_state,
                            sampler_seed=state.sampler_seed,
                            step=jnp.asarray(journal.steps, jnp.int32))
    if latest is None:
      # A crash between starting the run and its first checkpoint: take the
      # step-0 checkpoint now (as init does), or the next crash could not
      # continue correlated noise.
      self.save(directory, restored)
    return restored

  def _template(self, params, seed) -> PrivateState:
    """The state ``init(params)`` makes, as shapes with shardings: what a checkpoint is read into.

    The parameters keep the shardings they are given (the checkpoint may come
    from another mesh or process count: orbax reshards); the other leaves take
    those the compiled ``init`` computation gives them (optimizer state
    follows the parameters it mirrors; counters and keys are replicated).
    """
    def build(p):
      return PrivateState(params=p, opt_state=self.optimizer.init(p), sampler_seed=seed,
                          step=jnp.zeros((), jnp.int32))

    shapes = jax.eval_shape(build, params)
    mesh = _sharding.params_mesh(params)
    if mesh is None:
      return shapes  # unsharded parameters: orbax places the leaves itself
    # As ``init`` lays the state out: optimizer moments and MF buffers like
    # their parameter, keys and counters replicated (a compiled init's own
    # output shardings would replicate model-sized leaves on an Auto mesh).
    shardings = _sharding.follow_params(shapes, params, mesh)
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                 sharding=sharding),
                        shapes, shardings)

  def _roll_forward(self, noise_state, params, num_steps: int):
    """The noise state ``num_steps`` steps on: the noise drawn, never released.

    Independent noise has nothing to roll (only the count moves); correlated
    noise replays the steps' draws from the saved key so its buffers are
    those the released steps left behind.
    """
    if num_steps <= 0:
      return noise_state
    if self.ftrl is None:
      return noise_state._replace(count=noise_state.count + num_steps)
    return noise.advance(self.noise_transform, noise_state, params, num_steps)

  # --- the (params, opt_state) loop -----------------------------------------------------

  def reseed(self, opt_state: optax.OptState, *, key: Any = None) -> optax.OptState:
    """Fresh noise keys for an optimizer state restored by your own checkpointing.

    ``save`` / ``restore`` do this for you. See ``dpfl.noise.reseed``.
    """
    return noise.reseed(opt_state, key=key)


def plan_difference(saved: PrivacyPlan, new: PrivacyPlan) -> str:
  a, b = saved.to_dict(), new.to_dict()
  for name in a:
    if a[name] != b.get(name):
      if isinstance(a[name], dict) and isinstance(b.get(name), dict):
        for sub in a[name]:
          if a[name][sub] != b[name].get(sub):
            return f"{name}.{sub} is {a[name][sub]!r} in the checkpoint, {b[name].get(sub)!r} now"
      return f"{name} is {a[name]!r} in the checkpoint, {b.get(name)!r} now"
  return "they differ"
