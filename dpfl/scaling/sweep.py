"""Scaling-law sweeps: train a grid of configurations, one results line per run.

A run trains one member of the model family (``dpfl.scaling.models``) on the
standard-library corpus (``dpfl.scaling.corpus``) with Adam, either

* **privately**: example-level DP-SGD through ``dpfl.make_private`` (Poisson
  sampling with a static padded batch, per-example clipping to
  ``l2_clip_norm``, Gaussian noise σ·C, division by the expected batch size);
  ε at δ is recomputed from the run's ledger by ``accounting``; or
* **non-privately** (``noise_multiplier == 0``): the plain optimizer on the
  mean loss of fixed-size shuffled batches, no clipping, ε = ∞ (null). These
  runs give the irreducible term E of the fitted law.

The learning rate warms up linearly for ``warmup_steps`` and is then
constant, independent of the run length, so each point of a run's eval curve
estimates the loss of a shorter run with the same settings (the curves are
what ``dpfl fit`` smooths over steps; McKenna et al. 2025, arXiv 2501.18914).

Every run appends one line to a results file (schema: ``dpfl.scaling.results``)
and is identified by ``run_id``, a hash of its configuration and of the
corpus; ``run_sweep`` skips runs whose id is already in the file, so an
interrupted sweep resumes where it stopped.

Seeds: model init, batch sampling and noise all derive from one seed. By
default (``seed=None``) every run draws its own from OS entropy (64 bits,
``secrets``) and records it in its results line (``seed``), so the run can be
reproduced with ``seed=<that value>``, and no two runs share noise: runs that
differ only in σ and shared the noise ``z`` would let anyone who sees both
models solve for the gradients. The run id of an entropy-seeded run does not
include the seed, so re-running a sweep skips the runs already in the file;
an explicit seed is part of the id (a different request), and ``seed=0``
keeps the ids runs had when 0 was the default. A fixed seed gives every run
the same init and data order (common random numbers make losses comparable):
fine for a study whose models are thrown away; a model meant for release must
be trained with an OS-entropy seed, or its ε does not hold.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import secrets
import sys
import time
from typing import Any, Iterable, Sequence

import numpy as np

from accounting import validate as check
from dpfl.scaling import corpus as corpus_lib
from dpfl.scaling import models, results

# PLD grid for the ε recorded per run: "auto" refines Δ until ε is stable to
# 1e-3 relative and stays a pessimistic upper bound (see accounting.epsilon).
# dp-accounting's fixed Δ = 1e-4 takes minutes per run at the small σ a
# sweep explores (σ = 0.06: ~90 s), "auto" a few seconds.
EPSILON_DISCRETIZATION = "auto"
EVAL_CHUNK = 128  # eval sequences per forward pass (bounds eval memory)
PLAIN_MICROBATCH = 32  # largest accumulation block of the non-private step


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One training run of a sweep (all fields enter the run_id).

  Attributes:
    model: family name, e.g. ``"s200k"``.
    batch_size: B, expected batch size (fixed batch size when not private).
    noise_multiplier: σ; 0 means a non-private run.
    steps: T, optimizer steps.
    learning_rate: peak Adam learning rate.
    seq_len: tokens per example, in [2, ``models.MAX_SEQ_LEN``] (1024); the
      corpus is cut into windows of this many bytes (``dpfl.scaling.corpus``).
    delta: δ for the reported ε.
    l2_clip_norm: C, per-example clip norm (private runs).
    warmup_steps: linear learning-rate warm-up length (0: none).
    eval_every: eval (and train-loss) points every this many steps; the
      first eval is at step 0 and the last at step T.
    eval_examples: held-out sequences evaluated (an evenly spaced subset).
    seed: seed of init, sampling and noise, an int >= 0 (all its bits are
      used); None (default): each run draws one from OS entropy and records
      it in its results line (see the module docstring for run ids).
    examples_per_user: corpus cap on sequences per file.
    max_users: corpus cap on files (None: all).
    privacy_unit: ``"example"`` (DP-SGD, issue 3) or ``"user"``: ULS over
      the corpus's users (source files), ``batch_size`` = expected users per
      step, each user's clipped gradient of the mean loss over their
      sequences (``dpfl.make_private(privacy_unit="user")``); σ/B is then
      per user.
  """

  model: str
  batch_size: int
  noise_multiplier: float
  steps: int
  learning_rate: float
  seq_len: int = 64
  delta: float = 1e-6
  l2_clip_norm: float = 1.0
  warmup_steps: int = 10
  eval_every: int = 25
  eval_examples: int = 512
  seed: int | None = None
  examples_per_user: int = 32
  max_users: int | None = None
  privacy_unit: str = "example"

  def __post_init__(self):
    if self.privacy_unit not in ("example", "user"):
      raise ValueError(f"privacy_unit must be 'example' or 'user', got {self.privacy_unit!r}")
    models.get_config(self.model)  # raises on an unknown name
    for name in ("batch_size", "steps", "eval_every", "eval_examples", "examples_per_user"):
      _check_int(name, getattr(self, name), 1)
    check.integer("seq_len", self.seq_len, low=2, high=models.MAX_SEQ_LEN)
    _check_int("warmup_steps", self.warmup_steps, 0)
    if self.seed is not None:
      _check_int("seed", self.seed, 0)
    if self.max_users is not None:
      _check_int("max_users", self.max_users, 2)
    _check_real("noise_multiplier", self.noise_multiplier, minimum=0.0)
    _check_real("learning_rate", self.learning_rate, minimum=0.0, strict=True)
    _check_real("l2_clip_norm", self.l2_clip_norm, minimum=0.0, strict=True)
    check.open_unit("delta", self.delta)
    # Floats as floats, so that σ = 1 and σ = 1.0 are one run (one run_id);
    # numpy integers as ints (they are not JSON).
    for name in ("noise_multiplier", "learning_rate", "l2_clip_norm", "delta"):
      object.__setattr__(self, name, check.real(name, getattr(self, name)))
    for name in ("batch_size", "steps", "seq_len", "eval_every", "eval_examples",
                 "examples_per_user", "warmup_steps", "max_users"):
      if getattr(self, name) is not None:
        object.__setattr__(self, name, check.integer(name, getattr(self, name), low=0))

  @property
  def private(self) -> bool:
    return self.noise_multiplier > 0

  @property
  def noise_batch_ratio(self) -> float:
    """σ / B, the quantity that governs utility (0 when not private)."""
    return self.noise_multiplier / self.batch_size

  def key(self) -> dict[str, Any]:
    """The configuration as a JSON-ready dict (what ``run_id`` hashes).

    ``privacy_unit`` enters only when it is ``"user"``, so example-level runs
    keep the ids they had before user-level sweeps existed (resume works).
    ``seed`` enters only when given: an OS-entropy run (``seed=None``) is
    identified by the rest of its configuration, so re-running the same
    sweep skips it instead of drawing a new seed and training it again.
    """
    key = dataclasses.asdict(self)
    if key["privacy_unit"] == "example":
      del key["privacy_unit"]
    if key["seed"] is None:
      del key["seed"]
    return key


def _check_int(name: str, value: Any, minimum: int) -> None:
  check.integer(name, value, low=minimum)


def _check_real(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
  check.real(name, value, low=minimum, low_open=strict)


def run_id(config: RunConfig, corpus_fingerprint: str) -> str:
  """Stable id of a run: 16 hex digits of SHA-256 over its config and corpus."""
  text = json.dumps({"config": config.key(), "corpus": corpus_fingerprint,
                     "schema": results.SCHEMA_VERSION}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def make_grid(*, models: Sequence[str], batch_sizes: Sequence[int], steps: Sequence[int],
              learning_rates: Sequence[float], noise_multipliers: Sequence[float] | None = None,
              noise_batch_ratios: Sequence[float] | None = None,
              **common: Any) -> list[RunConfig]:
  """The Cartesian product model × batch × noise × steps × learning rate.

  Give the noise either as ``noise_multipliers`` (σ) or as
  ``noise_batch_ratios`` (σ/B, so σ = ratio · B); 0 in either means a
  non-private run. Duplicates are dropped; order is model (as given), batch
  size, noise, steps, learning rate. ``common`` holds the other
  ``RunConfig`` fields.
  """
  if (noise_multipliers is None) == (noise_batch_ratios is None):
    raise ValueError("give exactly one of noise_multipliers and noise_batch_ratios")
  configs: dict[RunConfig, None] = {}
  for model in models:
    for batch in batch_sizes:
      noises = (noise_multipliers if noise_multipliers is not None
                else [ratio * batch for ratio in noise_batch_ratios])
      for sigma in noises:
        for num_steps in steps:
          for lr in learning_rates:
            configs[RunConfig(model=model, batch_size=batch, noise_multiplier=float(sigma),
                              steps=num_steps, learning_rate=float(lr), **common)] = None
  return list(configs)


def corpus_for(config: RunConfig) -> corpus_lib.Corpus:
  """The (cached) corpus a run trains on."""
  return corpus_lib.load_corpus(seq_len=config.seq_len,
                                examples_per_user=config.examples_per_user,
                                max_users=config.max_users)


# --- training ------------------------------------------------------------------

def _schedule(learning_rate: float, warmup_steps: int):
  """Linear warm-up to ``learning_rate`` over ``warmup_steps`` steps, then constant."""
  import optax
  if warmup_steps <= 1:
    return optax.constant_schedule(learning_rate)
  return optax.join_schedules([
      optax.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps - 1),
      optax.constant_schedule(learning_rate)], [warmup_steps - 1])


def plain_microbatch_size(batch_size: int, multiple_of: int = 1) -> int:
  """Examples per gradient-accumulation block of the non-private step.

  The largest divisor of ``batch_size`` that is a multiple of ``multiple_of``
  (the devices a block is split over) and at most ``PLAIN_MICROBATCH`` per
  device: on CPU a single backward pass over a whole batch of 256 sequences
  runs ~4x slower than the same gradient accumulated over blocks of 16-32
  (activations stop fitting in cache), so the non-private baseline
  accumulates. ``batch_size`` must be a multiple of ``multiple_of``.
  """
  limit = min(batch_size, PLAIN_MICROBATCH * multiple_of)
  return max(d for d in range(multiple_of, limit + 1, multiple_of) if batch_size % d == 0)


def resolve_devices(devices: int | str) -> int:
  """The number of local devices a run uses: ``"all"`` or an integer in [1, local devices]."""
  import jax
  available = jax.local_device_count()
  if devices == "all":
    return available
  return check.integer("devices", devices, low=1, high=available)


def data_mesh(devices: int):
  """A 1-D ``("data",)`` mesh over the first ``devices`` devices (None for one device).

  ``dpfl.federated.user_mesh``'s Auto mesh: jitted steps need no
  ``jax.set_mesh`` and XLA places the cross-device sums itself.
  """
  if devices == 1:
    return None
  from dpfl.federated import user_mesh
  return user_mesh(devices, axis_name="data")


@functools.lru_cache(maxsize=16)
def plain_step(model: str, learning_rate: float, warmup_steps: int, devices: int = 1):
  """The non-private Adam step of a sweep: ``(optimizer, step)``, jitted, cached.

  ``step(params, opt_state, tokens, weights=None) -> (params, opt_state,
  loss)`` takes the gradient of ``Σ_i weights_i · loss_i`` (``loss_i``: row
  i's mean next-token loss; ``weights`` default ``1/batch`` each, the mean)
  over ``tokens`` [batch, seq_len + 1], accumulated over blocks of
  ``plain_microbatch_size(batch, devices)`` examples (the same gradient as
  one pass, faster on CPU). With ``devices > 1`` each block is split over
  the ``data_mesh(devices)`` (data parallel: every device takes its rows,
  XLA sums the gradients) and the batch must be a multiple of ``devices``
  (pad it with rows of weight 0). No clipping, no noise.
  """
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec
  optimizer = optax.adam(_schedule(learning_rate, warmup_steps))
  loss_fn = models.make_loss_fn(model)
  mesh = data_mesh(devices)

  def weighted_loss(params, rows, weights):
    losses = jax.vmap(lambda row: loss_fn(params, row[None]))(rows)
    return jnp.sum(losses * weights)

  grad_fn = jax.value_and_grad(weighted_loss)

  @jax.jit
  def step(params, opt_state, tokens, weights=None):
    batch = tokens.shape[0]
    if weights is None:
      weights = jnp.full((batch,), 1.0 / batch, jnp.float32)
    block = plain_microbatch_size(batch, devices)
    blocks = tokens.reshape(batch // block, block, *tokens.shape[1:])
    weight_blocks = weights.reshape(batch // block, block)
    if mesh is not None:
      blocks, weight_blocks = jax.lax.with_sharding_constraint(
          (blocks, weight_blocks), NamedSharding(mesh, PartitionSpec(None, "data")))

    def accumulate(total, block_and_weights):
      loss, grads = grad_fn(params, *block_and_weights)
      return jax.tree.map(jnp.add, total, (loss, grads)), None

    zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (loss, grads), _ = jax.lax.scan(accumulate, zero, (blocks, weight_blocks))
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return optimizer, step


@functools.lru_cache(maxsize=16)
def _row_losses(model: str):
  import jax
  loss_fn = models.make_loss_fn(model)
  return jax.jit(jax.vmap(lambda params, row: loss_fn(params, row[None]), in_axes=(None, 0)))


def eval_subset(corpus: corpus_lib.Corpus, count: int) -> np.ndarray:
  """``count`` held-out sequences spread evenly over all eval users (deterministic)."""
  n = corpus.num_eval_examples
  if count >= n:
    return np.asarray(corpus.eval_tokens)
  return np.asarray(corpus.eval_tokens[np.linspace(0, n - 1, count).round().astype(int)])


def evaluate(model: str, params, tokens: np.ndarray) -> float:
  """Mean per-token loss of ``params`` on ``tokens``, EVAL_CHUNK rows per forward pass."""
  row_losses = _row_losses(model)
  size = min(EVAL_CHUNK, len(tokens))
  total = 0.0
  for start in range(0, len(tokens), size):
    chunk = tokens[start:start + size]
    real = len(chunk)
    if real < size:  # pad the last chunk: one compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - real, 0)])
    total += float(np.asarray(row_losses(params, chunk))[:real].sum())
  return total / len(tokens)


def _log_points(config: RunConfig) -> set[int]:
  return set(range(config.eval_every, config.steps, config.eval_every)) | {config.steps}


def train_run(config: RunConfig, *, corpus: corpus_lib.Corpus | None = None,
              progress: bool = False, devices: int | str = 1) -> results.ResultRow:
  """Trains one configuration and returns its results row (not written).

  Args:
    config: the run.
    corpus: the corpus (default: ``corpus_for(config)``).
    progress: show a tqdm bar over steps on stderr.
    devices: local devices to train on, data parallel (an int, or ``"all"``).
      Each batch is split over a ``("data",)`` mesh (``make_private(mesh=...)``
      for private runs; ``plain_step(devices=...)`` otherwise) and padded to
      a multiple of ``devices`` with masked rows. The run is the same run
      (same seed, batches, noise and run id); its losses agree with one
      device's to float rounding (sums in another order). A Poisson batch's
      static length is rounded up to a multiple of ``devices``, so a private
      row records that ``max_batch_size`` and ε of that (truncated Poisson)
      mechanism, a hair below one device's (truncation is rarer). Rows of
      runs on several devices record ``devices``.

  Returns:
    A ``results.ResultRow``.
  """
  import jax
  import optax

  import dpfl
  from dpfl import __version__, _rng

  start = time.perf_counter()
  devices = resolve_devices(devices)
  mesh = data_mesh(devices)
  corpus = corpus_for(config) if corpus is None else corpus
  train = np.asarray(corpus.train_tokens)
  dataset_size = len(train)
  if config.batch_size > dataset_size:
    raise ValueError(f"batch_size {config.batch_size} exceeds the {dataset_size} training "
                     "sequences of the corpus")
  evals = eval_subset(corpus, config.eval_examples)
  n_params = models.params_count(config.model)
  # The seed used, drawn now when not given, is recorded in the row. Its key
  # keeps all 64 bits (jax.random.key(seed) would keep 32 without x64).
  seed = secrets.randbits(64) if config.seed is None else config.seed
  root = jax.random.wrap_key_data(_rng.key_data(seed, name="seed"))
  params = models.init_params(config.model, jax.random.fold_in(root, 0),
                              seq_len=config.seq_len)

  private = None
  user_level = config.privacy_unit == "user"
  examples_per_step = config.batch_size
  if user_level:
    if not config.private:
      raise ValueError("privacy_unit='user' needs noise_multiplier > 0 (a non-private run "
                       "has no privacy unit; use the example-level baseline)")
    users = dpfl.UserDataset.from_arrays(train, corpus.train_user_ids,
                                         examples_per_user=config.examples_per_user)
    if config.batch_size > users.num_users:
      raise ValueError(f"batch_size {config.batch_size} exceeds the {users.num_users} training "
                       "users of the corpus")
    dataset_size = users.num_users
    examples_per_step = config.batch_size * users.num_examples / users.num_users
    optimizer = optax.adam(_schedule(config.learning_rate, config.warmup_steps))
    private = dpfl.make_private(
        models.make_loss_fn(config.model), optimizer, privacy_unit="user",
        sampling_unit="user", dataset=users, l2_clip_norm=config.l2_clip_norm,
        batch_size=config.batch_size, delta=config.delta, num_steps=config.steps,
        noise_multiplier=config.noise_multiplier, seed=seed,
        key=jax.random.fold_in(root, 1), mesh=mesh)
    step_fn = private.make_step()
    state = private.init(params)
    draws = private.batches(users, state)
  elif config.private:
    optimizer = optax.adam(_schedule(config.learning_rate, config.warmup_steps))
    private = dpfl.make_private(
        models.make_loss_fn(config.model), optimizer,
        l2_clip_norm=config.l2_clip_norm, dataset_size=dataset_size,
        batch_size=config.batch_size, delta=config.delta, num_steps=config.steps,
        noise_multiplier=config.noise_multiplier, seed=seed,
        key=jax.random.fold_in(root, 1), mesh=mesh)
    step_fn = private.make_step()
    state = private.init(params)
    draws = private.batches(train, state)
  else:
    optimizer, step_fn = plain_step(config.model, config.learning_rate, config.warmup_steps,
                                    devices)
    if mesh is not None:  # replicated over the data axis
      from jax.sharding import NamedSharding, PartitionSpec
      params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
    opt_state = optimizer.init(params)
    # Padded (weight 0) to a multiple of the devices; the real rows are the
    # one-device batch's.
    sampler = dpfl.ShuffledSampler(dataset_size, batch_size=config.batch_size,
                                   seed=seed, multiple_of=devices)
    draws = ((train[b.indices], b.mask / np.float32(config.batch_size))
             for b in (sampler() for _ in range(config.steps)))

  eval_curve = [[0, evaluate(config.model, params, evals)]]
  train_curve, pending = [], []
  log_at = _log_points(config)
  train_seconds = 0.0
  bar = _steps_bar(config, progress)
  try:
    t_step = time.perf_counter()
    for step in range(1, config.steps + 1):
      if private is not None:
        batch, mask = next(draws)
        state, aux = step_fn(state, batch, mask)
        params = state.params
        values = np.asarray(aux.values)[mask.any(axis=1) if user_level else mask]
        pending.append(float(values.mean()) if values.size else math.nan)
      else:
        params, opt_state, loss = step_fn(params, opt_state, *next(draws))
        pending.append(float(loss))
      now = time.perf_counter()
      if step > 1 or config.steps == 1:  # step 1 compiles
        train_seconds += now - t_step
      if step in log_at:
        train_curve.append([step, float(np.nanmean(pending)) if pending else math.nan])
        pending = []
        eval_curve.append([step, evaluate(config.model, params, evals)])
        if bar is not None:
          bar.set_postfix(train=f"{train_curve[-1][1]:.3f}", eval=f"{eval_curve[-1][1]:.3f}")
      if bar is not None:
        bar.update(1)
      t_step = time.perf_counter()
  finally:
    if bar is not None:
      bar.close()

  tokens_per_step = examples_per_step * config.seq_len
  timed_steps = max(config.steps - 1, 1)
  epsilon = mechanism = accountant = max_batch = None
  if private is not None:
    accountant = private.accountant
    epsilon = private.ledger.epsilon(delta=config.delta, accountant=accountant,
                                     discretization=EPSILON_DISCRETIZATION)
    mechanism = private.ledger.mechanism().to_dict()
    max_batch = private.sampler.max_batch_size
  row = results.ResultRow(
      schema_version=results.SCHEMA_VERSION, run_id=run_id(config, corpus.fingerprint),
      model=config.model, params=n_params, private=config.private,
      batch_size=config.batch_size, noise_multiplier=float(config.noise_multiplier),
      noise_batch_ratio=config.noise_batch_ratio, steps=config.steps,
      learning_rate=config.learning_rate, warmup_steps=config.warmup_steps,
      l2_clip_norm=config.l2_clip_norm if config.private else None, seq_len=config.seq_len,
      dataset_size=dataset_size, sampling_prob=config.batch_size / dataset_size,
      max_batch_size=max_batch, delta=config.delta,
      epsilon=None if epsilon is None else float(epsilon), accountant=accountant,
      mechanism=mechanism,
      flops=models.training_flops(params=n_params, num_steps=config.steps,
                                  batch_size=examples_per_step, seq_len=config.seq_len),
      tokens=round(config.steps * tokens_per_step), train_loss=train_curve, eval_loss=eval_curve,
      final_eval_loss=eval_curve[-1][1], eval_examples=len(evals), seed=seed,
      corpus=corpus.summary(), seconds=time.perf_counter() - start,
      tokens_per_second=timed_steps * tokens_per_step / max(train_seconds, 1e-9),
      dpfl_version=__version__)
  if user_level:
    row["privacy_unit"] = "user"
  if devices > 1:
    row["devices"] = devices
  return row


def _steps_bar(config: RunConfig, progress: bool):
  if not progress:
    return None
  from tqdm.auto import tqdm
  noise = f"σ={config.noise_multiplier:g}" if config.private else "non-private"
  return tqdm(total=config.steps, desc=f"{config.model} B={config.batch_size} {noise} "
              f"lr={config.learning_rate:g}", unit="step", leave=False, file=sys.stderr)


# --- sweeps --------------------------------------------------------------------

@dataclasses.dataclass
class SweepSummary:
  """What ``run_sweep`` did.

  Attributes:
    rows: the results row of every configuration, in grid order (rows of
      skipped runs are read back from the file).
    trained: run_ids trained now.
    skipped: run_ids already in the file.
    results_path: the file appended to.
  """

  rows: list[dict[str, Any]]
  trained: list[str]
  skipped: list[str]
  results_path: str


def run_sweep(configs: Iterable[RunConfig], results_path: str, *,
              progress: bool = True, devices: int | str = 1) -> SweepSummary:
  """Trains every configuration not yet in ``results_path``; appends one line per run.

  Args:
    configs: the runs (e.g. ``make_grid(...)``, or one part of it:
      ``shards.shard_configs``); duplicates are run once.
    results_path: JSON-lines results file (created if absent).
    progress: tqdm bars over runs and steps on stderr.
    devices: local devices each run uses, data parallel (``train_run``).

  Returns:
    A ``SweepSummary``.
  """
  configs = list(dict.fromkeys(configs))
  done = {row["run_id"]: row for row in results.read_results(results_path)
          if "run_id" in row}
  ids = [run_id(c, corpus_for(c).fingerprint) for c in configs]
  todo = [i for i, rid in enumerate(ids) if rid not in done]
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(configs), initial=len(configs) - len(todo), desc="runs", unit="run",
               file=sys.stderr)
  trained = []
  try:
    for i in todo:
      row = train_run(configs[i], progress=progress, devices=devices)
      results.append_result(results_path, row)
      done[ids[i]] = row
      trained.append(ids[i])
      if bar is not None:
        bar.update(1)
  finally:
    if bar is not None:
      bar.close()
  pending = set(todo)
  return SweepSummary(rows=[done[rid] for rid in ids], trained=trained,
                      skipped=[rid for i, rid in enumerate(ids) if i not in pending],
                      results_path=results_path)
