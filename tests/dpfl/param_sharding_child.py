"""Child process of test_clipping_param_sharding.py (not collected).

Runs with 4 host-platform devices on a (data, model) = (2, 2) mesh: the
parameters carry the user's own NamedShardings over "model", the batch is
sharded over "data". argv[1] is JSON ``{"configs": [[mesh, unit, method,
microbatch_size], ...], "bound": bool}``; the last stdout line is JSON with,
per config, the clipped sum's error against a brute-force float64 loop
(``clip_reference``), the norms' error, the output shardings and the
compiled program's collectives; and, with ``bound``, the contributions of
one-unit batches whose gradient lives on one model shard or on all.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip_reference  # noqa: E402
import hlo_collectives  # noqa: E402

import dpfl  # noqa: E402
from dpfl.federated import clipped_user_updates  # noqa: E402

assert jax.device_count() == 4, jax.devices()

VOCAB, TOKENS, D, H, OUT = 32, 3, 16, 32, 4
USERS, PER_USER = 8, 2
C = 0.3


def mesh_of(kind: str):
  t = AxisType.Explicit if kind == "explicit" else AxisType.Auto
  return jax.make_mesh((2, 2), ("data", "model"), axis_types=(t, t))


# Auto mesh: an FSDP-style model: an embedding sharded over its vocabulary,
# a column-sharded and a row-sharded dense layer, a sharded bias.
def loss_auto(params, batch):
  x = params["emb"][batch["tokens"]]                      # [b, T, D]
  h = jnp.tanh(x @ params["w1"] + params["b1"])           # [b, T, H]
  out = jnp.mean(h @ params["w2"], axis=1)                # [b, OUT]
  return jnp.mean(jnp.sum((out - batch["y"]) ** 2, axis=-1))


SPECS_AUTO = {"emb": P("model", None), "w1": P(None, "model"), "b1": P("model"),
              "w2": P("model", None)}


# Explicit mesh: the user's code must say how a contraction over a sharded
# axis is sharded; this one stays elementwise along the sharded axis H.
def loss_explicit(params, batch):
  x = batch["x"]                                          # [b, T, D]
  h = jnp.tanh(x @ params["w1"] + params["b1"])           # [b, T, H@model]
  out = jnp.mean(jnp.sum(h * params["v"], axis=-1), axis=1)  # [b]
  return jnp.mean((out - batch["y"][:, 0]) ** 2)


SPECS_EXPLICIT = {"w1": P(None, "model"), "b1": P("model"), "v": P("model")}


def make(kind: str, unit: str):
  k = jax.random.split(jax.random.key(0), 8)
  if kind == "auto":
    params = {"emb": jax.random.normal(k[0], (VOCAB, D)),
              "w1": jax.random.normal(k[1], (D, H)) / 4,
              "b1": 0.1 * jax.random.normal(k[2], (H,)),
              "w2": jax.random.normal(k[3], (H, OUT)) / 4}
    batch = {"tokens": jax.random.randint(k[4], (USERS, PER_USER, TOKENS), 0, VOCAB),
             "y": jax.random.normal(k[5], (USERS, PER_USER, OUT))}
    loss, specs = loss_auto, SPECS_AUTO
  else:
    params = {"w1": jax.random.normal(k[1], (D, H)) / 4,
              "b1": 0.1 * jax.random.normal(k[2], (H,)),
              "v": jax.random.normal(k[3], (H,)) / 2}
    batch = {"x": jax.random.normal(k[4], (USERS, PER_USER, TOKENS, D)),
             "y": jax.random.normal(k[5], (USERS, PER_USER, OUT))}
    loss, specs = loss_explicit, SPECS_EXPLICIT
  mask = jax.random.bernoulli(k[6], 0.8, (USERS, PER_USER)).at[:, 0].set(True)
  if unit == "example":
    batch = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
    mask = mask.reshape(-1)
  return loss, specs, params, batch, mask


def build(loss, unit, method, microbatch_size):
  if method == "local_steps":
    return clipped_user_updates(loss, l2_clip_norm=C, local_steps=2,
                                local_learning_rate=0.1, microbatch_size=microbatch_size)
  return dpfl.clipped_grad(loss, l2_clip_norm=C, unit=unit, method=method,
                           microbatch_size=microbatch_size)


def local_steps_reference(loss, params, batch, mask):
  """Brute-force DP-FedAvg: 2 full-batch SGD steps (lr 0.1) on each user's
  real examples, θ − θ_u clipped to C and summed, in a Python loop."""
  grad = jax.jit(jax.grad(loss))
  total, abs_sum, norms = 0.0, 0.0, []
  for u in range(USERS):
    real = np.flatnonzero(np.asarray(mask[u]))
    one = jax.tree.map(lambda x: x[u][real], batch)
    p = params
    for _ in range(2):
      p = jax.tree.map(lambda a, g: a - 0.1 * g, p, grad(p, one))
    delta = clip_reference.flat(params) - clip_reference.flat(p)
    norm = float(np.linalg.norm(delta))
    norms.append(norm)
    contribution = delta * min(1.0, C / norm)
    total, abs_sum = total + contribution, abs_sum + np.abs(contribution)
  return total, abs_sum, np.array(norms)


def run_config(kind, unit, method, microbatch_size):
  loss, specs, params, batch, mask = make(kind, unit)
  mesh = mesh_of(kind)
  sharded_params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                                params, specs)
  sharded_units = jax.device_put((batch, mask), NamedSharding(mesh, P("data")))
  # The user's step says how its parameters (and so their update) are
  # sharded: the Auto mesh's only way to tell XLA (Explicit: the types).
  fn = jax.jit(lambda p, b, m: build(loss, unit, method, microbatch_size)(p, b, mask=m),
               out_shardings=(jax.tree.map(lambda x: x.sharding, sharded_params), None))
  with jax.set_mesh(mesh):
    hlo = fn.lower(sharded_params, *sharded_units).compile().as_text()
    got, aux = fn(sharded_params, *sharded_units)
  if method == "local_steps":
    total, abs_sum, norms = local_steps_reference(loss, params, batch, mask)
  else:
    ref = clip_reference.brute_force(loss, params, batch, C, unit=unit, mask=np.asarray(mask))
    total, abs_sum, norms = ref.total, ref.abs_sum, ref.norms
  groups = hlo_collectives.axis_groups(mesh)
  return {
      "sum_error": float(np.max(np.abs(clip_reference.flat(jax.tree.map(np.asarray, got)) - total))),
      "sum_scale": float(np.max(abs_sum)),
      "sum_norm": float(np.linalg.norm(total)),
      "norm_error": float(np.max(np.abs(np.asarray(aux.grad_norms, np.float64) - norms)
                                 / np.maximum(norms, 1e-3))),
      "num_clipped": int(aux.num_clipped),
      "shardings": {k: [str(s) for s in v.sharding.spec] for k, v in got.items()},
      "param_specs": {k: [str(s) for s in v] for k, v in specs.items()},
      "param_shapes": {k: list(np.shape(v)) for k, v in params.items()},
      "collectives": [
          {"kind": c.kind, "shapes": [list(s) for s in c.shapes],
           "axes": groups.get(c.group, str(sorted(c.group))), "op": c.op_name[-120:]}
          for c in hlo_collectives.collectives(hlo, 4)],
  }


def contribution_bound(kind, unit, method):
  """Clipped sums of one-unit batches (a masked second unit pads the data
  axis) for a unit whose gradient lives on model shard 0 only and one whose
  gradient is spread over both shards; with the closed-form norm."""
  mesh = mesh_of(kind)
  specs = {"w": P(None, "model"), "b": P("model")}

  def loss(params, batch):  # linear: the gradient is (x ⊗ c, c), norm |c|·sqrt(1+|x|²)
    z = batch["x"] @ params["w"] + params["b"]                    # [b, H]
    return jnp.mean(jnp.sum(z * batch["c"], axis=-1))

  params = {"w": jnp.ones((D, H)), "b": jnp.zeros((H,))}
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params,
                         specs)
  rng = np.random.default_rng(1)
  x = rng.normal(size=D).astype(np.float32)
  on_one = np.zeros(H, np.float32)
  on_one[: H // 2] = 10 * rng.normal(size=H // 2)  # the columns of model shard 0
  spread = 10 * rng.normal(size=H).astype(np.float32)
  out = {}
  for name, c in (("one shard", on_one), ("all shards", spread)):
    for scale in (1.0, 1e-3):  # clipped, and below C
      cs = scale * c
      norm = float(np.linalg.norm(cs.astype(np.float64))
                   * np.sqrt(1 + np.sum(x.astype(np.float64) ** 2)))
      if method == "local_steps":  # θ − θ_u = 2 steps × lr 0.1 × the constant gradient
        norm *= 0.2
      ex = {"x": np.stack([x, x]), "c": np.stack([cs, cs])}
      m = np.array([True, False])
      if unit == "user":
        ex = jax.tree.map(lambda a: a[:, None], ex)
        m = m[:, None]
      units = jax.device_put((ex, m), NamedSharding(mesh, P("data")))
      fn = jax.jit(lambda p, b, mk: build(loss, unit, method, None)(p, b, mask=mk))
      with jax.set_mesh(mesh):
        got, aux = fn(sharded, *units)
      out[f"{name}/x{scale}"] = {
          "contribution": float(np.linalg.norm(clip_reference.flat(jax.tree.map(np.asarray, got)))),
          "reported": float(np.asarray(aux.grad_norms)[0]), "true": norm}
  return out


def main():
  request = json.loads(sys.argv[1])
  out = {"configs": {}, "bound": {}}
  for kind, unit, method, micro in request["configs"]:
    out["configs"][f"{kind}/{unit}/{method}/{micro}"] = run_config(kind, unit, method, micro)
  for kind, unit, method in request.get("bound", []):
    out["bound"][f"{kind}/{unit}/{method}"] = contribution_bound(kind, unit, method)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
