"""A sweep run on several local devices (data parallel over the batch) is the one-device run.

The device count is fixed when JAX starts, so the checks run in a child
process with ``--xla_force_host_platform_device_count=4`` (as
``tests/dpfl/test_user_level_sharding.py``). The child computes each thing
twice, on one device and on several, with the same seed; the parent compares
them to float32 rounding at their own scale (sums over the batch in another
order differ in the last digits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

_CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    import numpy as np
    from dpfl.scaling import corpus as corpus_lib, models, sweep

    assert jax.device_count() == 4, jax.devices()
    which = json.loads(sys.argv[1])
    out = {}

    def flat(tree):
      return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)]).tolist()

    if "step" in which:
      # One non-private step on 6 real rows: one device, then 4 (padded to 8
      # with rows of weight 0, split over the data axis).
      c = corpus_lib.load_corpus(seq_len=16, examples_per_user=4, max_users=60)
      rows = np.asarray(c.train_tokens[:6])
      params = models.init_params("s50k", 0, seq_len=16)
      got = {}
      for devices in (1, 4):
        optimizer, step = sweep.plain_step("s50k", 0.01, 0, devices)
        pad = (-len(rows)) % devices
        tokens = np.concatenate([rows, np.repeat(rows[:1], pad, 0)])
        weights = np.concatenate([np.full(len(rows), 1 / len(rows)), np.zeros(pad)])
        _, state, loss = step(params, optimizer.init(params), tokens,
                              weights.astype(np.float32))
        # Adam's first moment after one step: 0.1 × the gradient (the update
        # itself, ~lr·sign(g), magnifies rounding where |g| is tiny).
        got[devices] = [float(loss), flat(state[0].mu)]
      out["step"] = got

    for name, spec in which.get("runs", {}).items():
      kwargs = dict(model="s50k", batch_size=8, noise_multiplier=0.0, steps=3,
                    learning_rate=0.01, seq_len=16, delta=1e-5, eval_every=1,
                    eval_examples=16, max_users=60, examples_per_user=4, seed=7,
                    warmup_steps=0)
      kwargs.update(spec.get("config", {}))
      config = sweep.RunConfig(**kwargs)
      rows = {}
      for devices in (1, spec.get("devices", 4)):
        row = sweep.train_run(config, devices=devices)
        rows[devices] = {k: row.get(k) for k in (
            "eval_loss", "train_loss", "max_batch_size", "epsilon", "run_id", "seed",
            "devices", "mechanism")}
      out[name] = rows
    print(json.dumps(out))
    """
)


def _child(which: dict) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(which)], env=env,
                        capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# float32 rounding: rtol 1e-5 (~84 ulps) of each value's own magnitude, plus the
# same share of the largest value (a sum of O(scale) terms in another order).
def _close(got, want, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  scale = float(np.max(np.abs(want)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=what)


@pytest.mark.slow  # ~15 s of compiling in a 4-device child
def test_four_device_plain_step_is_the_one_device_step():
  (one, four) = (_child({"step": True})["step"][k] for k in ("1", "4"))
  assert one[0] > 1 and np.max(np.abs(one[1])) > 1e-4  # a real loss and gradient
  _close(four[0], one[0], "loss")
  _close(four[1], one[1], "gradient")


@pytest.mark.slow
def test_four_device_runs_are_the_one_device_runs():
  runs = {
      "plain": {},
      "plain, 3 devices (padded batch)": {"devices": 3},
      "dp-sgd": {"config": {"noise_multiplier": 2.0}},
      "uls": {"config": {"noise_multiplier": 2.0, "privacy_unit": "user", "steps": 2}},
  }
  out = _child({"runs": runs})
  for name, spec in runs.items():
    devices = str(spec.get("devices", 4))
    one, many = out[name]["1"], out[name][devices]
    assert many["run_id"] == one["run_id"] and many["seed"] == one["seed"] == 7, name
    assert one["devices"] is None and many["devices"] == int(devices), name
    for curve in ("eval_loss", "train_loss"):
      assert [s for s, _ in many[curve]] == [s for s, _ in one[curve]], name
      _close([v for _, v in many[curve]], [v for _, v in one[curve]], f"{name} {curve}")
    if one["epsilon"] is None:
      assert many["epsilon"] is None, name
      continue
    # The padded Poisson shape is a multiple of the devices.
    assert many["max_batch_size"] % int(devices) == 0, name
    assert one["max_batch_size"] <= many["max_batch_size"] < one["max_batch_size"] + int(devices)
    if "max_batch_size" in many["mechanism"]:
      # Truncated Poisson: ε of the recorded (rarer-truncating) shape, within a hair.
      assert many["mechanism"]["max_batch_size"] == many["max_batch_size"], name
      assert abs(many["epsilon"] - one["epsilon"]) <= 1e-3 * one["epsilon"], name
    else:  # ULS pads an overflow further instead of truncating: the shape is not in ε
      assert many["mechanism"] == one["mechanism"] and many["epsilon"] == one["epsilon"], name
