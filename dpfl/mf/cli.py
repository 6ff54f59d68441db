"""The logic of ``dpfl mf``: build or optimize a strategy and report its numbers.

  dpfl mf --strategy identity|tree|online-tree|sqrt|banded|blt|dense --steps N
          [--participations K | --min-sep B] [--participation min-sep|fixed-epoch]
          [--bands M] [--buffers M] [--decoder honaker|plain] [--restart]
          [--objective max|mean] [--json]
          [--noise-multiplier S | --target-epsilon E] [--delta D]
  dpfl mf --strategy banded --bands M --sampling cyclic-poisson
          (--sampling-prob Q | --dataset-size N --batch-size B) --steps T
          (--noise-multiplier S | --target-epsilon E) --delta D [--json]

``--participations K`` is ``k = K`` participations of each unit in the
``N``-step run, with separation ``b = N / K``; ``--min-sep B`` gives ``b``
(then ``k = N / B``); neither is single participation. ``--epochs`` is the
deprecated name of ``--participations`` (renamed because ``dpfl epsilon
--epochs`` means passes over a data set, which sets the steps; here the
steps are given and K only says how often a unit takes part).
``--participation fixed-epoch`` (default ``min-sep``) computes the
sensitivity, losses and ε for one fixed order repeated every ``b`` steps
(unit ``r`` at ``r, r + b, ...``: what cyclic training does) instead of every
b-separated set; there ``b`` need not divide ``N`` (``--min-sep B``: any
``B``, ``k = ceil(N / B)``; ``--participations K``: ``b = ceil(N / K)``,
which must give ``K``). ``run`` returns a dict with ``sensitivity``, ``max_loss``,
``mean_loss`` and ``seconds`` (wall time to build or optimize the strategy)
plus the settings used; bad flags raise ``ValueError`` naming the flag.

With ``--noise-multiplier S --delta D`` it also reports the ``epsilon`` of the
run (one Gaussian mechanism with noise multiplier ``S`` relative to
``sensitivity * clip norm``: ``accounting.MatrixMechanism``); with
``--target-epsilon E --delta D`` the smallest ``noise_multiplier`` meeting
``E`` (and the ``epsilon`` it gives). ``noise_stddev`` is then
``noise_multiplier * sensitivity``, the per-step noise in clip norms, and
``plan`` the run's ``accounting.plan.PrivacyPlan`` (``to_dict()``), whose
mechanism gives ``epsilon``.

``--sampling cyclic-poisson`` is amplified banded MF (``make_private(...,
strategy="banded", sampling_scheme="poisson")``): see
``dpfl.mf.amplified_cli``.

This module imports only the standard library; numpy and scipy load when
``run`` builds a strategy (no strategy here needs JAX).
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

STRATEGIES = ("identity", "tree", "online-tree", "sqrt", "banded", "blt", "dense")
DECODERS = ("honaker", "plain")
OBJECTIVES = ("max", "mean")
# As accounting.matrix.PARTICIPATIONS (a test checks); not imported (numpy).
PARTICIPATIONS = ("min-sep", "fixed-epoch")
# As dpfl.mf._checks.DEFAULT_OBJECTIVE (a test checks); not imported from
# there, which would load numpy for `dpfl mf --help`.
DEFAULT_OBJECTIVE = {"banded": "mean", "blt": "max", "dense": "mean"}
DEFAULT_BUFFERS = 3
DEFAULT_MAX_BANDS = 32

# Library argument names -> flags, for messages raised below the CLI.
_FLAG_OF = {"num_steps": "--steps", "num_participations": "--participations",
            "min_separation": "--min-sep", "bands": "--bands", "buffers": "--buffers",
            "objective": "--objective", "strategy": "--strategy",
            "noise_multiplier": "--noise-multiplier", "target_epsilon": "--target-epsilon",
            "delta": "--delta"}


EXAMPLES = """\
examples:
  dpfl mf --strategy blt --steps 1024 --participations 4 --buffers 3 --json
  dpfl mf --strategy dense --steps 256 --participations 4 --participation fixed-epoch --json
  dpfl mf --strategy banded --bands 4 --sampling cyclic-poisson --dataset-size 60000 \\
          --batch-size 256 --steps 2000 --target-epsilon 8 --delta 1e-6"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the ``dpfl mf`` flags to ``parser``."""
  parser.add_argument("--strategy", required=True, choices=STRATEGIES,
                      help="identity (DP-SGD), tree (binary tree padded to 2^L leaves, "
                           "Honaker estimator), online-tree (DP-FTRL's online tree, no "
                           "padding), sqrt "
                           "(square-root Toeplitz), banded, blt (buffered linear Toeplitz) "
                           "or dense; the last three are optimized")
  parser.add_argument("--steps", type=int, required=True, metavar="N",
                      help="number of steps n, >= 1")
  participation = parser.add_argument_group(
      "participation (default: each unit takes part once)")
  count = participation.add_mutually_exclusive_group()
  count.add_argument("--participations", type=int, metavar="K", dest="epochs",
                     help="times each unit takes part in the N steps, k (separation "
                          "b = N / K); not `dpfl epsilon --epochs`, passes that set the "
                          "steps (formerly --epochs here, still accepted)")
  count.add_argument("--epochs", type=int, dest="epochs", help=argparse.SUPPRESS)
  participation.add_argument("--min-sep", type=int, metavar="B",
                             help="minimum separation b between a unit's participations "
                                  "(k = N / B)")
  participation.add_argument("--participation", choices=PARTICIPATIONS, dest="participation",
                             help="min-sep (default): any steps b apart; fixed-epoch: one "
                                  "order repeated every b steps, unit r at r, r + b, ... "
                                  "(cyclic training; b need not divide N)")
  parser.add_argument("--bands", type=int, metavar="M",
                      help=f"banded only: nonzero diagonals, in [1, b] "
                           f"(default min({DEFAULT_MAX_BANDS}, b)); with --sampling "
                           f"cyclic-poisson the groups, in [1, min(T, N)] (default "
                           f"min(16, T), as make_private)")
  parser.add_argument("--buffers", type=int, metavar="M",
                      help=f"blt only: number of buffers, >= 1 (default {DEFAULT_BUFFERS})")
  parser.add_argument("--decoder", choices=DECODERS,
                      help="online-tree only: honaker (least-squares estimate from all "
                           "nodes; default, as TF Privacy) or plain (sum of the binary "
                           "decomposition's nodes)")
  parser.add_argument("--restart", action="store_true", default=None,
                      help="online-tree only: a new tree every b = N / K steps "
                           "(DP-FTRL-TreeRestart, one tree per epoch)")
  parser.add_argument("--objective", choices=OBJECTIVES,
                      help="loss the optimized strategies minimize (default: max for blt, "
                           "mean for banded and dense, as jax-privacy's optimizers)")
  parser.add_argument("--json", action="store_true",
                      help="print one JSON object as the last line of stdout")
  privacy = parser.add_argument_group(
      "privacy (optional)", "give one of --noise-multiplier and --target-epsilon, with --delta")
  noise = privacy.add_mutually_exclusive_group()
  noise.add_argument("--noise-multiplier", type=float, metavar="S",
                     help="noise std / (sensitivity * clip norm), > 0: also report the "
                          "run's epsilon")
  noise.add_argument("--target-epsilon", type=float, metavar="E",
                     help="> 0: also report the smallest noise multiplier meeting it")
  privacy.add_argument("--delta", type=float, metavar="D",
                       help="δ in (0, 1), for --noise-multiplier or --target-epsilon")
  _amplified().add_arguments(parser)


def _amplified():
  """``dpfl.mf.amplified_cli`` (deferred: this module loads only the standard library)."""
  from dpfl.mf import amplified_cli
  return amplified_cli


def _flagged(message: str) -> str:
  return re.sub(r"(?<![-\w])(" + "|".join(_FLAG_OF) + r")\b",
                lambda m: _FLAG_OF[m.group(1)], message)


def _positive(flag: str, value) -> int:
  from accounting import validate as check  # deferred: numpy, not needed for --help
  return check.positive_int(flag, value)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
  from accounting import validate as check  # deferred: numpy, not needed for --help
  strategy = getattr(args, "strategy", None)
  if strategy not in STRATEGIES:
    raise ValueError(f"--strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
  objective = getattr(args, "objective", None)
  if objective is None:
    objective = DEFAULT_OBJECTIVE.get(strategy, "mean")
  if objective not in OBJECTIVES:
    raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
  n = _positive("--steps", getattr(args, "steps", None))
  epochs, min_sep = getattr(args, "epochs", None), getattr(args, "min_sep", None)
  kind = getattr(args, "participation", None) or "min-sep"
  if kind not in PARTICIPATIONS:
    raise ValueError(f"--participation must be one of {', '.join(PARTICIPATIONS)}; "
                     f"got {kind!r}")
  if kind == "fixed-epoch":
    fixed = _fixed_epoch_counts(n, epochs, min_sep)
    epochs = min_sep = None  # checked there; the min-sep divisibility rules do not apply
  if epochs is not None:
    epochs = _positive("--participations", epochs)
    if epochs > n or n % epochs:
      raise ValueError(f"--participations must divide --steps={n} (b = N / K), got {epochs}")
  if min_sep is not None:
    min_sep = _positive("--min-sep", min_sep)
    if min_sep > n or n % min_sep:
      raise ValueError(f"--min-sep must divide --steps={n} (k = N / B), got {min_sep}")
  if epochs is not None and min_sep is not None and epochs * min_sep != n:
    raise ValueError(
        f"--participations * --min-sep must equal --steps={n}, got {epochs} * {min_sep}")
  k = epochs if epochs is not None else (n // min_sep if min_sep is not None else 1)
  b = n // k
  if kind == "fixed-epoch":
    k, b = fixed
  bands, buffers = getattr(args, "bands", None), getattr(args, "buffers", None)
  if bands is not None and strategy != "banded":
    raise ValueError(f"--bands applies only to --strategy banded, not {strategy}")
  if buffers is not None and strategy != "blt":
    raise ValueError(f"--buffers applies only to --strategy blt, not {strategy}")
  decoder, restart = getattr(args, "decoder", None), getattr(args, "restart", None)
  for flag, value in (("--decoder", decoder), ("--restart", restart)):
    if value is not None and strategy != "online-tree":
      raise ValueError(f"{flag} applies only to --strategy online-tree, not {strategy}")
  if decoder is not None and decoder not in DECODERS:
    raise ValueError(f"--decoder must be one of {', '.join(DECODERS)}; got {decoder!r}")
  if strategy == "banded":
    bands = min(DEFAULT_MAX_BANDS, b) if bands is None else bands
    bands = check.integer("--bands", bands, low=1, high=b)
  if strategy == "blt":
    from dpfl.mf.blt import MAX_BUFFERS
    buffers = DEFAULT_BUFFERS if buffers is None else buffers
    buffers = check.integer("--buffers", buffers, low=1, high=MAX_BUFFERS)
  settings = {"strategy": strategy, "steps": n, "epochs": k, "min_sep": b, "bands": bands,
              "buffers": buffers, "objective": objective, "participation": kind}
  if strategy == "online-tree":
    settings.update(decoder=decoder or "honaker", restart=bool(restart))
  privacy = _privacy_settings(args)
  return {**settings, **privacy} if privacy else settings


def _fixed_epoch_counts(n: int, epochs, min_sep) -> tuple[int, int]:
  """``(k, b)`` of a fixed-epoch order of ``n`` steps (``dpfl.mf.fixed_epoch``'s rules)."""
  from dpfl.mf.participation import fixed_epoch  # deferred: numpy
  if epochs is not None:
    epochs = _positive("--participations", epochs)
  if min_sep is not None:
    min_sep = _positive("--min-sep", min_sep)
  try:
    return tuple(fixed_epoch(n, num_participations=epochs, min_separation=min_sep))
  except ValueError as err:
    raise ValueError(_flagged(str(err)) + " (--participation fixed-epoch)") from None


def _participation_arg(settings: dict[str, Any]):
  """What ``dpfl.mf`` takes: a ``(k, b)`` pair (min-sep) or a ``FixedEpoch``."""
  pair = (settings["epochs"], settings["min_sep"])
  if settings.get("participation", "min-sep") == "fixed-epoch":
    from dpfl.mf.participation import FixedEpoch
    return FixedEpoch(*pair)
  return pair


def _privacy_settings(args: argparse.Namespace) -> dict[str, float]:
  """``--noise-multiplier`` / ``--target-epsilon`` with ``--delta``, checked."""
  from accounting import validate as check  # deferred: numpy, not needed for --help
  sigma = getattr(args, "noise_multiplier", None)
  target = getattr(args, "target_epsilon", None)
  delta = getattr(args, "delta", None)
  if sigma is None and target is None:
    if delta is not None:
      raise ValueError("--delta needs --noise-multiplier (report epsilon) or --target-epsilon "
                       "(calibrate the noise multiplier)")
    return {}
  if sigma is not None and target is not None:
    raise ValueError("give one of --noise-multiplier and --target-epsilon, not both")
  if delta is None:
    raise ValueError("--delta is required with --noise-multiplier or --target-epsilon "
                     "(a number in (0, 1))")
  delta = check.open_unit("--delta", delta)
  if sigma is not None:
    return {"noise_multiplier": check.noise_multiplier("--noise-multiplier", sigma),
            "delta": delta}
  return {"target_epsilon": check.target_epsilon("--target-epsilon", target), "delta": delta}


def _plan(settings: dict[str, Any], strategy):
  """The ``PrivacyPlan`` of ``strategy``'s run: the one configuration -> mechanism map.

  ``b`` units, each taking part once every ``b`` steps (cyclic, one unit a
  step), for the ``n`` steps of ``C``; ``--target-epsilon`` is calibrated by
  the planner.
  """
  from accounting import plan as planning
  n, k, b = settings["steps"], settings["epochs"], settings["min_sep"]
  options = {name: settings[name] for name in ("objective", "bands", "buffers", "decoder",
                                               "restart") if settings.get(name) is not None}
  noise = planning.NoisePlan(strategy=settings["strategy"], planned_steps=n,
                             sensitivity=strategy.sensitivity, max_participations=k,
                             min_separation=b, options=options,
                             participation=settings.get("participation", "min-sep"))
  sampling = planning.SamplingPlan(scheme="cyclic", unit="example", population_size=b,
                                   batch_size=1)
  # The clip norm does not enter ε (the noise is relative to it): 1 stands for C.
  return planning.plan_run(privacy_unit="example", sampling=sampling, l2_clip_norm=1.0,
                           delta=settings["delta"], num_steps=n, noise=noise,
                           noise_multiplier=settings.get("noise_multiplier"),
                           target_epsilon=settings.get("target_epsilon"))


def _account(settings: dict[str, Any], strategy) -> dict[str, Any]:
  """``epsilon`` (and the calibrated ``noise_multiplier``) of ``strategy``'s run, and its plan."""
  plan = _plan(settings, strategy)
  return {"noise_multiplier": plan.noise_multiplier, "epsilon": plan.epsilon(),
          "noise_stddev": plan.noise_multiplier * strategy.sensitivity, "plan": plan.to_dict()}


def build(settings: dict[str, Any]):
  """The strategy for validated ``settings`` (the keys ``_settings`` returns)."""
  from dpfl.mf.build import build as build_strategy
  return build_strategy(settings["strategy"], settings["steps"],
                        participation=_participation_arg(settings),
                        objective=settings["objective"], bands=settings["bands"],
                        buffers=settings["buffers"], **_online_tree_options(settings))


def _online_tree_options(settings: dict[str, Any]) -> dict[str, Any]:
  """``honaker`` and ``restart_every`` (one tree per epoch of b steps) for the online tree."""
  if settings["strategy"] != "online-tree":
    return {}
  return {"honaker": settings["decoder"] == "honaker",
          "restart_every": settings["min_sep"] if settings["restart"] else None}


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Builds the strategy ``args`` describe and returns its numbers.

  Raises:
    ValueError: on bad flags, with a message naming the flag.
  """
  if _amplified().requested(args):  # --sampling cyclic-poisson: amplified banded MF
    return _amplified().run(args, privacy=_privacy_settings(args))
  settings = _settings(args)
  try:
    start = time.perf_counter()
    strategy = build(settings)
    seconds = time.perf_counter() - start
    numbers = {"sensitivity": strategy.sensitivity,
               "sensitivity_exact": strategy.sensitivity_exact,
               "max_loss": strategy.max_loss, "mean_loss": strategy.mean_loss}
    if "delta" in settings:
      numbers.update(_account(settings, strategy))
  except ValueError as err:
    raise ValueError(_flagged(str(err))) from None
  return {**settings, **numbers, "seconds": seconds}


def format_table(result: dict[str, Any]) -> str:
  """The human-readable report of ``run``'s result."""
  if result.get("sampling") == "cyclic-poisson":
    return _amplified().format_table(result)
  k = result["epochs"]
  participation = ("single participation" if k == 1 else
                   f"{k} participations, min separation {result['min_sep']}")
  if k > 1 and result.get("participation") == "fixed-epoch":
    participation = (f"fixed-epoch order, {result['min_sep']} steps per epoch "
                     f"(at most {k} participations)")
  lines = [f"dpfl mf: {result['strategy']} strategy, {result['steps']} steps, {participation}"]
  rows = []
  if result["strategy"] in ("banded", "blt", "dense"):
    rows.append(("objective", result["objective"]))
  if result.get("bands") is not None:
    rows.append(("bands", result["bands"]))
  if result.get("buffers") is not None:
    rows.append(("buffers", result["buffers"]))
  if result.get("decoder") is not None:
    rows.append(("decoder", result["decoder"]))
    rows.append(("restart", f"every {result['min_sep']} steps" if result["restart"] else "no"))
  sens = f"{result['sensitivity']:.6g}"
  if not result.get("sensitivity_exact", True):
    sens += " (upper bound)"
  rows += [("sensitivity", sens), ("max_loss", f"{result['max_loss']:.6g}"),
           ("mean_loss", f"{result['mean_loss']:.6g}"), ("seconds", f"{result['seconds']:.3g}")]
  if "epsilon" in result:
    label = ("noise_multiplier (calibrated)" if "target_epsilon" in result
             else "noise_multiplier")
    rows += [(label, f"{result['noise_multiplier']:.6g}"),
             ("noise_stddev", f"{result['noise_stddev']:.6g} (clip norms per step)"),
             ("epsilon", f"{result['epsilon']:.6g} at delta={result['delta']:g}")]
  lines += [f"  {name:<22} {value}" for name, value in rows]
  return "\n".join(lines)
