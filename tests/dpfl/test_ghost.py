"""Ghost clipping (``method="ghost"``) against a brute-force loop over units.

A zoo of models (Flax Linen, Flax NNX and plain-function MLPs, a CNN, two
causal transformers, a LoRA-adapted transformer and a model whose parameters
must fall back) is run through ``clipped_grad`` with every explicit method;
the reference (``clip_reference.brute_force``) calls ``jax.grad`` of the
user's own loss on one unit at a time and clips and sums in float64 NumPy,
never touching dpfl. ``materialize`` and ``reweight`` run the same zoo, which
keeps the reference honest: three back-ends and one loop must agree.

``fn.explain`` must sort every parameter into exactly one of ``ghost`` (norm
from activations and output cotangents), ``per_unit`` (small per-unit
gradient of an elementwise use) and ``fallback`` (per-unit gradient formed,
with a reason), and ``method="ghost"`` warns about the fallbacks when traced.
"""

from __future__ import annotations

import functools
import importlib
import math
import re
import warnings
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from clip_reference import F32_RTOL, assert_sum_close, brute_force, flat, split_clip_norm
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import dpfl
from dpfl.clipping import clipped_grad, clipped_sum
from dpfl.federated import clipped_user_updates

METHODS = ["materialize", "reweight", "ghost"]
# The existing methods run here as a check of the reference only under
# -m slow (their compiles would double this file's time; test_clipping.py
# covers them), except on masked and non-finite units, where the zoo's
# grouped convolution caught their NaN leak across units.
_slow = lambda *methods: [pytest.param(m, marks=pytest.mark.slow) for m in methods]
CROSS_CHECKED = _slow("materialize", "reweight") + ["ghost"]
# reweight refuses half-precision parameters (tested in test_clipping.py).
HALF_METHODS = _slow("materialize") + ["ghost"]
# Per-unit statistics are float32 norms of float32 gradients computed by
# different programs (a Gram form, a vmapped gradient, a batch of one).
STATS_RTOL = 1e-4


def _ghost():
  """dpfl.ghost, imported when a ghost test runs (not at collection)."""
  return importlib.import_module("dpfl.ghost")


def _paths(tree) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _xent(logits, labels):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


# --------------------------------------------------------------------------
# The zoo. A Case holds a loss, its parameters, an example-level batch, a
# user-level batch and mask, and what explain() must say about each
# parameter: rules (regex on the keystr path, allowed categories, and for
# ghost parameters the primitive that carries them).

GHOST, PER_UNIT, FALLBACK = "ghost", "per_unit", "fallback"


class Rule(NamedTuple):
  pattern: str
  allowed: tuple[str, ...]
  primitive: str | None = None


class Case(NamedTuple):
  loss_fn: Callable[[Any, Any], Any]
  params: Any
  batch: Any
  rules: tuple[Rule, ...]
  user_batch: Any = None
  user_mask: np.ndarray | None = None
  nan_batch: Any = None  # batch with one unit's input made NaN (unit NAN_UNIT)


NAN_UNIT = 2
DENSE_RULES = (Rule(r"kernel|\['w\d'\]", (GHOST,), "dot_general"),
               Rule(r"bias|\['b\d'\]", (PER_UNIT,)))


def _with_nan(batch, key, index=(NAN_UNIT, 0)):
  x = np.array(batch[key])
  x[index] = np.nan
  return dict(batch, **{key: jnp.asarray(x)})


# Data and plain-function parameters come from NumPy: eager jax.random
# compiles one program per shape, seconds of this file's budget.
def _normal(rng, shape, scale=1.0):
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _classification(n, seed, dim=6, classes=3):
  rng = np.random.default_rng(seed)
  return {"x": _normal(rng, (n, dim), 2.0), "y": jnp.asarray(rng.integers(0, classes, n))}


def _user_mask():
  return np.array([[1, 1, 1],
                   [1, 0, 0],   # padding inside a user
                   [0, 0, 0],   # fully padded user
                   [1, 1, 0],
                   [0, 1, 1]],  # padding first
                  dtype=bool)


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def _linen_mlp() -> Case:
  model = _LinenMLP()
  batch = _classification(8, seed=1)
  variables = jax.jit(model.init)(jax.random.key(0), batch["x"][:1])

  def loss_fn(variables, batch):
    return jnp.mean(_xent(model.apply(variables, batch["x"]), batch["y"]))

  return Case(loss_fn, variables, batch, DENSE_RULES)


def _plain_mlp_params(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return {"w1": _normal(rng, (6, 8), 0.5), "b1": _normal(rng, (8,), 0.1),
          "w2": _normal(rng, (8, 3), 0.5), "b2": _normal(rng, (3,), 0.1)}


def _plain_mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  return jnp.mean(_xent(h @ params["w2"] + params["b2"], batch["y"]))


def _plain_mlp_loss_with_aux(params, batch):
  h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = h @ params["w2"] + params["b2"]
  return jnp.mean(_xent(logits, batch["y"])), {"logits": logits, "h_norm": jnp.linalg.norm(h)}


def _plain_mlp() -> Case:
  batch = _classification(8, seed=2)
  users = _classification(15, seed=3)
  users = jax.tree.map(lambda x: x.reshape((5, 3) + x.shape[1:]), users)
  mask = _user_mask()
  x = np.array(users["x"])
  x[~mask] = np.nan  # padded slots hold garbage that must not leak
  users = dict(users, x=jnp.asarray(x))
  return Case(_plain_mlp_loss, _plain_mlp_params(), batch, DENSE_RULES,
              user_batch=users, user_mask=mask, nan_batch=_with_nan(batch, "x"))


class _NNXMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(6, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.l1(x)))


def _nnx_mlp() -> Case:
  graphdef, state = nnx.split(_NNXMLP(nnx.Rngs(0)))

  def loss_fn(state, batch):
    return jnp.mean(_xent(nnx.merge(graphdef, state)(batch["x"]), batch["y"]))

  return Case(loss_fn, state, _classification(8, seed=4), DENSE_RULES)


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, 8, 8, 2]
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))                        # 8x8x4
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="VALID",
                        feature_group_count=2)(x))                            # 3x3x4
    x = nn.Conv(4, (2, 2), padding=((1, 0), (0, 1)), kernel_dilation=(1, 2))(x)  # 3x2x4
    x = nn.avg_pool(x, (2, 2), strides=(1, 1))                                 # 2x1x4
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def _cnn() -> Case:
  model = _CNN()
  rng = np.random.default_rng(5)
  batch = {"x": _normal(rng, (8, 8, 8, 2)), "y": jnp.asarray(rng.integers(0, 3, 8))}
  variables = jax.jit(model.init)(jax.random.key(6), batch["x"][:1])

  def loss_fn(variables, batch):
    return jnp.mean(_xent(model.apply(variables, batch["x"]), batch["y"]))

  rules = (Rule(r"Conv_\d+'\]\['kernel", (GHOST,), "conv_general_dilated"),
           Rule(r"Dense_0'\]\['kernel", (GHOST,), "dot_general"),
           Rule(r"bias", (PER_UNIT,)))
  return Case(loss_fn, variables, batch, rules, nan_batch=_with_nan(batch, "x", (NAN_UNIT, 3, 4, 1)))


VOCAB, DIM, HEADS, SEQ, MAX_SEQ = 13, 8, 2, 6, 8


def _tokens(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape))


def _lm_batch(n, seed):
  return {"tokens": _tokens((n, SEQ), seed), "weights": jnp.ones((n, SEQ - 1))}


def _lm_loss(logits, batch):
  """Mean over examples of the weighted next-token cross-entropy."""
  xent = _xent(logits[:, :-1], batch["tokens"][:, 1:])
  return jnp.mean(jnp.sum(batch["weights"] * xent, axis=1) / (SEQ - 1))


class _LinenLM(nn.Module):
  """Causal transformer block with tied input/output embeddings."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, DIM)
    pos = self.param("pos_embedding", nn.initializers.normal(0.5), (MAX_SEQ, DIM))
    x = embed(tokens) + pos[: tokens.shape[1]]
    attend = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=DIM)
    x = x + attend(nn.LayerNorm()(x), mask=nn.make_causal_mask(tokens))
    x = x + nn.Dense(DIM)(nn.gelu(nn.Dense(2 * DIM)(nn.LayerNorm()(x))))
    return embed.attend(nn.LayerNorm()(x))  # the embedding is used twice


def _linen_lm() -> Case:
  model = _LinenLM()
  batch = _lm_batch(6, seed=7)
  variables = jax.jit(model.init)(jax.random.key(8), batch["tokens"][:1])

  def loss_fn(variables, batch):
    return _lm_loss(model.apply(variables, batch["tokens"]), batch)

  users = _lm_batch(12, seed=9)
  users = jax.tree.map(lambda x: x.reshape((4, 3) + x.shape[1:]), users)
  mask = _user_mask()[[0, 1, 2, 4]]
  # Padded slots: out-of-range token ids, which Embed turns into NaN rows.
  users["tokens"] = jnp.where(mask[..., None], users["tokens"], VOCAB + 3)
  rules = (
      # Tied input/output embedding: a lookup and a projection, split
      # exactly (the two sites' Gram terms and their cross term).
      Rule(r"Embed_0'\]\['embedding", (GHOST,), "gather"),
      # A slice of a parameter added to the activations: an elementwise use.
      Rule(r"pos_embedding", (PER_UNIT, FALLBACK)),
      Rule(r"LayerNorm_\d+'\]\['(scale|bias)", (PER_UNIT,)),
      Rule(r"(query|key|value|out|Dense_\d+)'\]\['kernel", (GHOST,), "dot_general"),
      Rule(r"(query|key|value|out|Dense_\d+)'\]\['bias", (PER_UNIT,)),
  )
  return Case(loss_fn, variables, batch, rules, user_batch=users, user_mask=mask,
              nan_batch=_with_nan(batch, "weights"))


def _rms_norm(x, scale=None):
  x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + 1e-6)
  return x if scale is None else x * scale


def _causal_attention(q, k, v):
  """[B, T, H, K] queries, keys and values -> [B, T, H, K]."""
  scores = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
  causal = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))
  weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
  return jnp.einsum("bhts,bshk->bthk", weights, v)


def _plain_lm_loss(params, batch):
  """Untied embedding (a gather), RMSNorm scale, per-head einsum weights."""
  x = jnp.take(params["emb"], batch["tokens"], axis=0)
  h = _rms_norm(x, params["rms_scale"])
  q, k, v = (jnp.einsum("btd,hdk->bthk", h, params[name]) for name in ("wq", "wk", "wv"))
  x = x + jnp.einsum("bthk,hkd->btd", _causal_attention(q, k, v), params["wo"])
  return _lm_loss(_rms_norm(x) @ params["w_out"], batch)


def _plain_lm() -> Case:
  rng = np.random.default_rng(10)
  head_dim, scale = DIM // HEADS, 1 / math.sqrt(DIM)
  params = {"emb": _normal(rng, (VOCAB, DIM)),
            "rms_scale": 1.0 + _normal(rng, (DIM,), 0.1),
            "wq": _normal(rng, (HEADS, DIM, head_dim), scale),
            "wk": _normal(rng, (HEADS, DIM, head_dim), scale),
            "wv": _normal(rng, (HEADS, DIM, head_dim), scale),
            "wo": _normal(rng, (HEADS, head_dim, DIM), scale),
            "w_out": _normal(rng, (DIM, VOCAB), scale)}
  rules = (Rule(r"\['emb'\]", (GHOST,), "gather"),
           Rule(r"rms_scale", (PER_UNIT,)),
           Rule(r"\['(wq|wk|wv|wo|w_out)'\]", (GHOST,), "dot_general"))
  return Case(_plain_lm_loss, params, _lm_batch(6, seed=11), rules)


LORA_RANK = 2


def _lora_lm() -> Case:
  """A frozen causal transformer (closed over) with trainable low-rank adapters."""
  rng = np.random.default_rng(12)
  shapes = {"q": (DIM, DIM), "k": (DIM, DIM), "v": (DIM, DIM), "o": (DIM, DIM),
            "up": (DIM, 2 * DIM), "down": (2 * DIM, DIM)}
  base = {"emb": _normal(rng, (VOCAB, DIM)), "pos": _normal(rng, (MAX_SEQ, DIM), 0.5)}
  adapters = {}
  for name, (fan_in, fan_out) in shapes.items():
    base[name] = _normal(rng, (fan_in, fan_out), 1 / math.sqrt(fan_in))
    # B is random, not LoRA's zero init, so that A's gradient is not zero.
    adapters[name] = {"A": _normal(rng, (fan_in, LORA_RANK), 1 / math.sqrt(fan_in)),
                      "B": _normal(rng, (LORA_RANK, fan_out), 0.5)}

  def lin(x, adapters, name):
    return x @ base[name] + (x @ adapters[name]["A"]) @ adapters[name]["B"]

  def loss_fn(adapters, batch):
    tokens = batch["tokens"]
    x = base["emb"][tokens] + base["pos"][: tokens.shape[1]]
    h = _rms_norm(x)
    split = lambda y: y.reshape(y.shape[:2] + (HEADS, DIM // HEADS))
    q, kk, v = (split(lin(h, adapters, name)) for name in ("q", "k", "v"))
    o = _causal_attention(q, kk, v)
    x = x + lin(o.reshape(o.shape[:2] + (DIM,)), adapters, "o")
    x = x + lin(jax.nn.relu(lin(_rms_norm(x), adapters, "up")), adapters, "down")
    # Tied output embedding, but a constant here: nothing falls back.
    return _lm_loss(_rms_norm(x) @ base["emb"].T, batch)

  rules = (Rule(r"\['(A|B)'\]", (GHOST,), "dot_general"),)
  return Case(loss_fn, adapters, _lm_batch(6, seed=13), rules)


def _fallbacks() -> Case:
  """Parameters ghost cannot split: used by two dense layers, inside lax.scan,
  under exp; and a tied embedding, which it can."""
  rng = np.random.default_rng(14)
  params = {"emb": _normal(rng, (VOCAB, DIM)), "w_in": _normal(rng, (DIM, DIM), 1 / math.sqrt(DIM)),
            "b_in": _normal(rng, (DIM,), 0.1), "w_rec": _normal(rng, (DIM, DIM), 1 / math.sqrt(DIM)),
            "log_scale": _normal(rng, (DIM,), 0.3),
            "w_shared": _normal(rng, (DIM, DIM), 1 / math.sqrt(DIM))}

  def loss_fn(params, batch):
    x = params["emb"][batch["tokens"]] @ params["w_in"] + params["b_in"]
    x = jnp.tanh(jnp.tanh(x @ params["w_shared"]) @ params["w_shared"])  # shared weight

    def step(h, x_t):  # an RNN cell: w_rec is used once per time step
      h = jnp.tanh(h @ params["w_rec"] + x_t)
      return h, h

    h0 = jnp.zeros((x.shape[0], DIM), x.dtype)
    _, hs = jax.lax.scan(step, h0, jnp.swapaxes(x, 0, 1))
    hs = jnp.swapaxes(hs, 0, 1) * jnp.exp(params["log_scale"])
    return _lm_loss(hs @ params["emb"].T, batch)

  rules = (Rule(r"\['(w_shared|w_rec|log_scale)'\]", (FALLBACK,)),
           Rule(r"\['emb'\]", (GHOST,), "gather"),
           Rule(r"\['w_in'\]", (GHOST,), "dot_general"),
           Rule(r"\['b_in'\]", (PER_UNIT,)))
  return Case(loss_fn, params, _lm_batch(6, seed=15), rules)


ZOO = {"linen_mlp": _linen_mlp, "plain_mlp": _plain_mlp, "nnx_mlp": _nnx_mlp, "cnn": _cnn,
       "linen_lm": _linen_lm, "plain_lm": _plain_lm, "lora_lm": _lora_lm,
       "fallbacks": _fallbacks}


@functools.cache
def _case(name: str) -> Case:
  return ZOO[name]()


class _Ref(NamedTuple):
  ref: Any
  clip: float


@functools.cache
def _reference(name: str, unit: str = "example") -> _Ref:
  """The brute-force reference on the clean batch, with C splitting the units in half."""
  case = _case(name)
  batch, mask = (case.batch, None) if unit == "example" else (case.user_batch, case.user_mask)
  probe = brute_force(case.loss_fn, case.params, batch, 1.0, unit=unit, mask=mask)
  clip = split_clip_norm(probe.norms)
  ref = brute_force(case.loss_fn, case.params, batch, clip, unit=unit, mask=mask)
  assert 0 < ref.num_clipped < ref.num_units and ref.num_nonfinite == 0
  return _Ref(ref, clip)


@functools.cache
def _compiled(name, method, clip, unit="example", microbatch_size=None):
  """One compiled clipped_grad per configuration (compiles dominate the run time).

  Always call it with a mask: mask=None is another pytree, another compile.
  """
  return jax.jit(clipped_grad(_case(name).loss_fn, l2_clip_norm=clip, method=method,
                              unit=unit, microbatch_size=microbatch_size))


def _ones_mask(batch):
  return jnp.ones(jax.tree.leaves(batch)[0].shape[0], bool)


def _check(got, ref, *, rtol=F32_RTOL, stats_rtol=STATS_RTOL, check_clipped=True):
  """A (clipped_sum, aux) pair against a brute-force Reference."""
  total, aux = got
  assert_sum_close(total, ref.total, ref.abs_sum, rtol=rtol)
  norms = np.asarray(aux.grad_norms)
  finite = np.isfinite(ref.norms)
  np.testing.assert_allclose(norms[finite], ref.norms[finite], rtol=stats_rtol,
                             atol=stats_rtol * float(np.max(ref.norms[finite])))
  assert not np.isfinite(norms[~finite]).any()
  values = np.asarray(aux.values)
  ok = np.isfinite(ref.values)
  np.testing.assert_allclose(values[ok], ref.values[ok], rtol=stats_rtol, atol=1e-6)
  assert int(aux.num_units) == ref.num_units
  assert int(aux.num_nonfinite) == ref.num_nonfinite
  if check_clipped:
    assert int(aux.num_clipped) == ref.num_clipped
    assert float(aux.fraction_clipped) == pytest.approx(ref.num_clipped / max(ref.num_units, 1))


def _assert_each_unit_bounded(fn, params, batch, mask, clip):
  """Every included unit alone (all others masked) contributes a norm <= C."""
  contributions = []
  included = mask if mask.ndim == 1 else mask.any(axis=1)
  for u in np.flatnonzero(included):
    only = np.zeros_like(mask)
    only[u] = mask[u]
    total, aux = fn(params, batch, mask=jnp.asarray(only))
    assert int(aux.num_units) == 1
    contributions.append(flat(total))
    assert np.linalg.norm(contributions[-1]) <= clip * (1 + 1e-5), u
  return np.array(contributions)


# --------------------------------------------------------------------------
# 1-4, 7, 8: the zoo at example level, every method.


@pytest.mark.parametrize("method", CROSS_CHECKED)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_matches_brute_force(name, method):
  case, (ref, clip) = _case(name), _reference(name)
  fn = _compiled(name, method, clip)
  total, aux = fn(case.params, case.batch, mask=_ones_mask(case.batch))
  assert jax.tree.structure(total) == jax.tree.structure(case.params)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(total))
  _check((total, aux), ref)
  assert aux.aux is None


@pytest.mark.parametrize("method", CROSS_CHECKED)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_each_unit_contributes_at_most_clip_norm(name, method):
  case, (ref, clip) = _case(name), _reference(name)
  fn = _compiled(name, method, clip)
  mask = np.ones(jax.tree.leaves(case.batch)[0].shape[0], bool)
  contributions = _assert_each_unit_bounded(fn, case.params, case.batch, mask, clip)
  # The units' contributions, one at a time, add up to the clipped sum.
  total = fn(case.params, case.batch, mask=jnp.asarray(mask))[0]
  assert_sum_close(total, contributions.sum(axis=0), ref.abs_sum)


def _check_report(report, params, rules):
  """explain() partitions the parameters as the rules say, with sites and reasons."""
  ghost = _ghost()
  assert isinstance(report, ghost.ClipReport)
  assert report.method == "ghost"
  paths = _paths(params)
  groups = {GHOST: tuple(report.ghost), PER_UNIT: tuple(report.per_unit),
            FALLBACK: tuple(report.fallback)}
  listed = [p for group in groups.values() for p in group]
  assert sorted(listed) == sorted(paths), groups  # each parameter exactly once
  for reason in report.fallback.values():
    assert isinstance(reason, str) and reason.strip()
  for site in report.sites:
    assert isinstance(site, ghost.Site)
    assert site.path in paths, site
    assert isinstance(site.primitive, str) and isinstance(site.form, str), site
  for path in paths:
    matching = [rule for rule in rules if re.search(rule.pattern, path)]
    assert len(matching) == 1, (path, matching)
    (rule,) = matching
    (category,) = [c for c, group in groups.items() if path in group]
    assert category in rule.allowed, (path, category, rule, report)
    if category == GHOST:
      primitives = {s.primitive for s in report.sites if s.path == path}
      assert primitives, (path, report.sites)  # a ghost norm comes from somewhere
      if rule.primitive is not None:
        assert rule.primitive in primitives, (path, primitives)


def _fallback_warnings(fn, params, batch, mask=None):
  """GhostFallbackWarnings emitted while tracing fn (a fresh function: no cache)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    jax.jit(fn).trace(params, batch, mask=mask)
  return [w for w in caught if issubclass(w.category, _ghost().GhostFallbackWarning)]


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_explain_and_fallback_warning(name):
  case, (_, clip) = _case(name), _reference(name)
  report = clipped_grad(case.loss_fn, l2_clip_norm=clip, method="ghost").explain(
      case.params, case.batch)
  _check_report(report, case.params, case.rules)
  assert issubclass(_ghost().GhostFallbackWarning, UserWarning)
  # A function of its own: one that explain() already analysed may not warn twice.
  fn = clipped_grad(case.loss_fn, l2_clip_norm=clip, method="ghost")
  caught = _fallback_warnings(fn, case.params, case.batch)
  if report.fallback:
    assert caught, report.fallback
    message = " ".join(str(w.message) for w in caught)
    for path in report.fallback:
      assert path in message, (path, message)
  else:
    assert not caught, [str(w.message) for w in caught]


def test_fallback_reasons_and_exactness():
  # Which parameters fall back is pinned by the zoo's rules; here the
  # reasons, and the sum with every kind of fallback at once.
  case, (ref, clip) = _case("fallbacks"), _reference("fallbacks")
  report = clipped_grad(case.loss_fn, l2_clip_norm=clip, method="ghost").explain(
      case.params, case.batch)
  assert set(report.fallback) == {"['w_shared']", "['w_rec']", "['log_scale']"}
  assert "scan" in report.fallback["['w_rec']"]
  assert "2 places" in report.fallback["['w_shared']"]
  assert len({report.fallback[p] for p in ("['w_shared']", "['w_rec']", "['log_scale']")}) == 3
  _check(_compiled("fallbacks", "ghost", clip)(case.params, case.batch,
                                               mask=_ones_mask(case.batch)), ref)


def test_explain_of_auto_names_a_concrete_method():
  case, (_, clip) = _case("plain_mlp"), _reference("plain_mlp")
  report = clipped_grad(case.loss_fn, l2_clip_norm=clip, method="auto").explain(
      case.params, case.batch)
  assert report.method in ("materialize", "reweight", "ghost")


# --------------------------------------------------------------------------
# 5: user-level units.


@pytest.mark.parametrize("method", CROSS_CHECKED)
@pytest.mark.parametrize("name", ["plain_mlp", "linen_lm"])
def test_user_level_matches_brute_force(name, method):
  case, (ref, clip) = _case(name), _reference(name, "user")
  fn = _compiled(name, method, clip, unit="user")
  mask = jnp.asarray(case.user_mask)
  got = fn(case.params, case.user_batch, mask=mask)
  _check(got, ref)
  assert got[1].grad_norms.shape == (case.user_mask.shape[0],)
  _assert_each_unit_bounded(fn, case.params, case.user_batch, case.user_mask, clip)
  if method == "ghost":
    report = clipped_grad(case.loss_fn, l2_clip_norm=clip, method="ghost", unit="user").explain(
        case.params, case.user_batch, mask=mask)
    _check_report(report, case.params, case.rules)


# --------------------------------------------------------------------------
# 6: masked and non-finite units.


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["plain_mlp", "cnn", "linen_lm"])
def test_masked_and_nonfinite_units(name, method):
  case, (_, clip) = _case(name), _reference(name)
  n = jax.tree.leaves(case.batch)[0].shape[0]
  mask = np.ones(n, bool)
  mask[[0, n - 1]] = False
  # A masked unit with garbage input too: it must not leak either.
  batch = case.nan_batch
  key = next(k for k in batch if jnp.issubdtype(batch[k].dtype, jnp.floating))
  batch = _with_nan(batch, key, (n - 1,))
  ref = brute_force(case.loss_fn, case.params, batch, clip, mask=mask)
  assert ref.num_nonfinite == 1 and np.all(np.isfinite(ref.total))
  got = _compiled(name, method, clip)(case.params, batch, mask=jnp.asarray(mask))
  _check(got, ref)
  norms = np.asarray(got[1].grad_norms)
  assert not np.isfinite(norms[NAN_UNIT])
  np.testing.assert_array_equal(norms[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(got[1].values)[~mask], 0.0)
  # The NaN unit alone contributes exactly zero, and is counted.
  only = np.arange(n) == NAN_UNIT
  alone, aux = _compiled(name, method, clip)(case.params, batch, mask=jnp.asarray(only))
  np.testing.assert_array_equal(flat(alone), 0.0)
  assert int(aux.num_units) == 1 and int(aux.num_nonfinite) == 1


@pytest.mark.parametrize("method", CROSS_CHECKED)
@pytest.mark.parametrize("name", ["plain_mlp", "cnn"])
def test_all_units_nonfinite_gives_exact_zeros(name, method):
  case, (_, clip) = _case(name), _reference(name)
  batch = dict(case.batch, x=jnp.full_like(case.batch["x"], jnp.nan))
  total, aux = _compiled(name, method, clip)(case.params, batch, mask=_ones_mask(batch))
  np.testing.assert_array_equal(flat(total), 0.0)
  n = batch["x"].shape[0]
  assert int(aux.num_nonfinite) == n and int(aux.num_units) == n


# --------------------------------------------------------------------------
# 9: microbatching, has_aux, with and without jit, bf16.


@pytest.mark.parametrize("method", CROSS_CHECKED)
@pytest.mark.parametrize("name, microbatch_size", [("plain_mlp", 3), ("linen_lm", 4)])
def test_microbatched_equals_unblocked(name, microbatch_size, method):
  # 8 or 6 units in blocks of 3 or 4: the last block is a remainder.
  case, (ref, clip) = _case(name), _reference(name)
  mask = _ones_mask(case.batch)
  whole = _compiled(name, method, clip)(case.params, case.batch, mask=mask)
  micro = _compiled(name, method, clip, microbatch_size=microbatch_size)(
      case.params, case.batch, mask=mask)
  _check(micro, ref)
  assert_sum_close(micro[0], flat(whole[0]), ref.abs_sum)
  np.testing.assert_allclose(micro[1].grad_norms, whole[1].grad_norms, rtol=1e-5)


@pytest.mark.parametrize("method", CROSS_CHECKED)
def test_has_aux_returns_per_example_aux(method):
  case, (ref, clip) = _case("plain_mlp"), _reference("plain_mlp")
  fn = jax.jit(clipped_grad(_plain_mlp_loss_with_aux, l2_clip_norm=clip, method=method,
                            has_aux=True, microbatch_size=5))
  got = fn(case.params, case.batch)
  _check(got, ref)
  aux = got[1].aux
  assert aux["logits"].shape == (8, 1, 3) and aux["h_norm"].shape == (8,)
  for i in range(8):
    _, want = _plain_mlp_loss_with_aux(case.params, jax.tree.map(lambda x: x[i : i + 1], case.batch))
    np.testing.assert_allclose(aux["logits"][i], want["logits"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["h_norm"][i], want["h_norm"], rtol=1e-5)


@pytest.mark.parametrize("method", CROSS_CHECKED)
def test_without_jit_equals_brute_force(method):
  case, (ref, clip) = _case("plain_mlp"), _reference("plain_mlp")
  _check(clipped_grad(case.loss_fn, l2_clip_norm=clip, method=method)(case.params, case.batch),
         ref)


# bf16 parameters and activations against a float32 reference on the same
# (bf16-representable) values: every bf16 rounding (2^-8 relative) of the
# forward and backward pass shows up in the per-unit gradients.
BF16_RTOL = 2e-2


@pytest.mark.parametrize("method", HALF_METHODS)
@pytest.mark.parametrize("name", ["plain_mlp", "linen_lm"])
def test_bf16_params_and_activations(name, method):
  case, (_, clip) = _case(name), _reference(name)
  to_bf16 = lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x
  params, batch = jax.tree.map(to_bf16, case.params), jax.tree.map(to_bf16, case.batch)
  up = lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x
  ref = brute_force(case.loss_fn, jax.tree.map(up, params), jax.tree.map(up, batch), clip)
  total, aux = jax.jit(clipped_grad(case.loss_fn, l2_clip_norm=clip, method=method))(
      params, batch)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(total))
  assert aux.grad_norms.dtype == jnp.float32
  # Norms near C may land on either side at bf16 precision: no num_clipped check.
  _check((total, aux), ref, rtol=BF16_RTOL, stats_rtol=BF16_RTOL, check_clipped=False)


# --------------------------------------------------------------------------
# Property: every contribution <= C across four decades of data scale.


@pytest.mark.parametrize("method", CROSS_CHECKED)
@settings(max_examples=6, deadline=None)
@given(log10_scale=st.floats(-2.0, 2.0), seed=st.integers(0, 2**16))
def test_each_contribution_is_at_most_clip_norm(method, log10_scale, seed):
  case, (_, clip) = _case("plain_mlp"), _reference("plain_mlp")
  params = _plain_mlp_params(seed)
  batch = _classification(8, seed=seed + 1)
  batch["x"] = batch["x"] * 10.0**log10_scale
  fn = _compiled("plain_mlp", method, clip)
  contributions = _assert_each_unit_bounded(fn, params, batch, np.ones(8, bool), clip)
  ref = brute_force(case.loss_fn, params, batch, clip)
  got = fn(params, batch, mask=_ones_mask(batch))
  _check(got, ref, check_clipped=False)
  assert_sum_close(got[0], contributions.sum(axis=0), ref.abs_sum)


# --------------------------------------------------------------------------
# 11: make_private passes clip_method through.


def _binary_loss(params, batch):
  logits = batch["x"] @ params["w"] + params["b"]
  return optax.sigmoid_binary_cross_entropy(logits, batch["y"]).mean()


def test_make_private_with_ghost_runs_and_equals_materialize():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 5)).astype(np.float32)
  data = {"x": x, "y": (x @ rng.normal(size=5) > 0).astype(np.float32)}
  params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32), "b": jnp.zeros(())}
  after = {}
  for method in ("materialize", "ghost"):
    private = dpfl.make_private(_binary_loss, optax.sgd(0.5), l2_clip_norm=0.3, dataset_size=64,
                                batch_size=8, num_steps=2, noise_multiplier=1.0, delta=1e-5,
                                key=0, seed=0, clip_method=method)
    assert private.clipped_grad.method == method
    state = private.init(params)
    step = private.make_step()
    batch, mask = next(iter(private.batches(data, state)))
    state, aux = step(state, batch, mask)
    assert int(state.step) == 1 and int(aux.num_units) == int(np.sum(mask)) > 0
    after[method] = flat(state.params)
  assert np.all(np.isfinite(after["ghost"]))
  assert not np.allclose(after["ghost"], flat(params))
  # Same keys, same batch, same noise: only the clipped sum's rounding differs
  # (lr 0.5 / batch 8 times a sum of at most 8 terms of norm <= 0.3).
  np.testing.assert_allclose(after["ghost"], after["materialize"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# Ghost needs a loss: an update that is no gradient (DP-FedAvg) is refused.


def _not_a_gradient(params, example, example_mask):
  del example_mask
  s = jnp.sum(example["x"])
  return jax.tree.map(lambda p: jnp.sin(s * p), params), s, None


def test_ghost_refuses_an_update_that_is_no_gradient():
  with pytest.raises(ValueError, match="method='ghost'") as info:
    clipped_sum(l2_clip_norm=1.0, unit_update=_not_a_gradient, method="ghost")
  assert "materialize" in str(info.value)
  # θ − θ_u after local steps is not the gradient of a loss either.
  with pytest.raises(ValueError, match="method='ghost'.*local-step"):
    clipped_user_updates(_plain_mlp_loss, l2_clip_norm=1.0, local_steps=2,
                         local_learning_rate=0.1, method="ghost")


def test_tied_embedding_in_einsum_form_with_clamped_ids_is_ghost_and_exact():
  # The output projection written as einsum against E itself (no transpose),
  # and a lookup in clip mode, where out-of-range ids clamp to the last row:
  # the token-equality Gram and the cross term must see the clamped ids.
  rng = np.random.default_rng(21)
  params = {"E": _normal(rng, (7, 5)), "w": _normal(rng, (5, 5), 0.5)}

  def loss_fn(params, batch):
    x = jnp.take(params["E"], batch["t"], axis=0, mode="clip")
    h = jnp.tanh(x @ params["w"])
    logits = jnp.einsum("btd,vd->btv", h, params["E"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  batch = {"t": jnp.array([[1, 2, 1, 9], [0, 0, 3, 6], [6, 9, 6, 2], [4, 4, 4, 4]]),
           "y": jnp.array([[1, 2, 3, 4], [0, 0, 0, 0], [6, 5, 4, 3], [4, 4, 4, 4]])}
  ref = brute_force(loss_fn, params, batch, 1.0)
  clip = split_clip_norm(ref.norms)
  ref = brute_force(loss_fn, params, batch, clip)
  fn = clipped_grad(loss_fn, l2_clip_norm=clip, method="ghost")
  report = fn.explain(params, batch)
  assert "['E']" in report.ghost and not report.fallback
  got, aux = jax.jit(fn)(params, batch)
  assert_sum_close(got, ref.total, ref.abs_sum)
  np.testing.assert_allclose(aux.grad_norms, ref.norms, rtol=1e-4)


# --------------------------------------------------------------------------
# Holes found in review, each against brute force.


def test_out_of_range_ids_of_plain_indexing_are_dropped_as_the_gradient_drops_them():
  # E[ids] gathers in promise_in_bounds mode: the forward pass reads a
  # clamped row, but the gradient drops an out-of-range lookup. A unit whose
  # out-of-range lookup would cancel a valid one's must not get a small norm
  # (it did: contribution 5.0 with C = 1).
  a = jnp.array([3.0, 4.0])
  params = {"E": jnp.zeros((3, 2))}
  batch = {"ids": jnp.array([[2, 7], [1, 2], [-9, 0]]),
           "y": jnp.stack([jnp.stack([a, -0.9 * a]), jnp.stack([a, a]),
                           jnp.stack([a, 0.5 * a])])}

  def loss_fn(params, batch):
    return jnp.sum(params["E"][batch["ids"]] * batch["y"])

  ref = brute_force(loss_fn, params, batch, 1.0)
  got, aux = jax.jit(clipped_grad(loss_fn, l2_clip_norm=1.0, method="ghost"))(params, batch)
  np.testing.assert_allclose(aux.grad_norms, ref.norms, rtol=1e-5)
  assert_sum_close(got, ref.total, ref.abs_sum)
  one, _ = clipped_grad(loss_fn, l2_clip_norm=1.0, method="ghost")(
      params, batch, mask=jnp.array([True, False, False]))
  assert float(jnp.linalg.norm(one["E"])) <= 1.0 + 1e-5


def test_fortran_order_reshape_and_rounding_ops_of_a_parameter_are_exact():
  rng = np.random.default_rng(22)
  params = {"w": _normal(rng, (2, 3)), "q": _normal(rng, (3, 3))}
  batch = {"x": _normal(rng, (5, 3)), "y": _normal(rng, (5, 2))}

  def loss_fn(params, batch):
    w = jnp.reshape(params["w"], (3, 2), order="F")  # a permuting reshape
    q = jax.lax.reduce_precision(params["q"], exponent_bits=4, mantissa_bits=3)
    return jnp.mean((jnp.tanh(batch["x"] @ q) @ w - batch["y"]) ** 2)

  ref = brute_force(loss_fn, params, batch, 1.0)
  clip = split_clip_norm(ref.norms)
  ref = brute_force(loss_fn, params, batch, clip)
  fn = clipped_grad(loss_fn, l2_clip_norm=clip, method="ghost")
  report = fn.explain(params, batch)
  assert set(report.fallback) == {"['w']", "['q']"}
  got, aux = jax.jit(fn)(params, batch)
  np.testing.assert_allclose(aux.grad_norms, ref.norms, rtol=1e-5)
  assert_sum_close(got, ref.total, ref.abs_sum)


def test_integer_parameter_the_loss_depends_on_is_named():
  params = {"w": jnp.ones((3,)), "step": jnp.array(2, jnp.int32)}

  def loss_fn(params, batch):
    return jnp.mean(batch["x"] @ params["w"] * params["step"])

  with pytest.raises(ValueError, match=r"parameter \['step'\] has dtype int32"):
    clipped_grad(loss_fn, l2_clip_norm=1.0, method="ghost")(params, {"x": jnp.ones((2, 3))})
