"""The ``dpfl`` command line: privacy budgets without writing code.

  dpfl epsilon   --noise-multiplier S --sampling-prob Q --steps T --delta D
  dpfl calibrate --target-epsilon E --sampling-prob Q --steps T --delta D

Either form of sampling input works: ``--sampling-prob Q --steps T`` or
``--dataset-size N --batch-size B --epochs E``. ``--privacy-unit user
--sampling-unit user`` is ULS; ``--privacy-unit user --sampling-unit example
--examples-per-user K`` is ELS.

Start-up is kept light: this module imports only the standard library and the
mechanism descriptions; dp-accounting is imported when a number is computed,
so ``dpfl --help`` never pays for it. Bad input exits with status 2 and one
line on stderr naming the flag and its allowed range.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys

from accounting import mechanisms as mech
# The parser lives in cli_args; build_parser and UsageError are re-exported here.
from accounting.cli_args import (UsageError, build_parser, flagged,  # noqa: F401
                                 negative_values_joined, selected_command)


def _scheme(args) -> str:
  """Names the algorithm the flags describe, after checking they fit together."""
  sampling_unit = args.sampling_unit or args.privacy_unit
  if args.privacy_unit == "example" and sampling_unit == "user":
    raise UsageError("--sampling-unit user needs --privacy-unit user (that is ULS); "
                     "example-level privacy with user sampling is not a supported scheme")
  els = args.privacy_unit == "user" and sampling_unit == "example"
  if els and args.examples_per_user is None:
    raise UsageError("--examples-per-user is required for ELS (--privacy-unit user "
                     "--sampling-unit example): give an integer >= 1")
  if not els and args.examples_per_user is not None:
    raise UsageError("--examples-per-user applies only to ELS (--privacy-unit user "
                     "--sampling-unit example)")
  if args.examples_per_user is not None and args.examples_per_user < 1:
    raise UsageError(f"--examples-per-user must be an integer >= 1, got {args.examples_per_user}")
  if args.sampling_scheme == "shuffle":
    if args.privacy_unit != "example":
      raise UsageError("--sampling-scheme shuffle is supported for --privacy-unit example only")
    if args.dataset_size is None or args.batch_size is None:
      raise UsageError("--sampling-scheme shuffle needs --dataset-size and --batch-size")
    if args.max_batch_size is not None:
      raise UsageError("--max-batch-size applies to Poisson sampling, not to "
                       "--sampling-scheme shuffle")
    return "shuffle"
  if args.max_batch_size is not None:
    if args.privacy_unit != "example":
      raise UsageError("--max-batch-size is supported for --privacy-unit example only")
    if args.dataset_size is None:
      raise UsageError("--max-batch-size needs --dataset-size")
    return "truncated"
  return "els" if els else ("uls" if args.privacy_unit == "user" else "poisson")


_DESCRIPTION = {
    "poisson": "example-level DP-SGD, Poisson sampling",
    "truncated": "example-level DP-SGD, truncated Poisson sampling",
    "shuffle": "example-level DP-SGD, shuffled fixed-size batches (no amplification)",
    "uls": "user-level DP, ULS (users Poisson-sampled, one clipped vector per user)",
    "els": "user-level DP, ELS (examples Poisson-sampled, <= K examples per user)",
}


_PLAN_SCHEME = {"poisson": "poisson", "uls": "poisson", "els": "poisson",
                "truncated": "truncated_poisson", "shuffle": "shuffle"}


def _plan(args, scheme: str, sigma: float, q: float, steps: int):
  """The ``PrivacyPlan`` the flags describe (the one config -> mechanism map)."""
  from accounting import plan
  sampling_unit = args.sampling_unit or args.privacy_unit
  batch = args.batch_size
  if scheme == "shuffle" and batch is None:
    batch = round(q * args.dataset_size)
  sampling = plan.SamplingPlan(
      scheme=_PLAN_SCHEME[scheme], unit=sampling_unit, population_size=args.dataset_size,
      sampling_prob=None if scheme == "shuffle" else q, batch_size=batch,
      max_batch_size=args.max_batch_size, examples_per_user=args.examples_per_user)
  # The clip norm does not enter ε (noise is relative to it): 1 stands for C.
  return plan.plan_run(privacy_unit=args.privacy_unit, sampling=sampling, l2_clip_norm=1.0,
                       delta=args.delta, num_steps=steps, noise_multiplier=sigma,
                       accountant=args.accountant, adaptive=_adaptive(args))


def _adaptive(args):
  """Adaptive clipping's accounting part (the count noise), or None (fixed C)."""
  if args.count_noise_stddev is None:
    return None
  if not (args.count_noise_stddev > 0 and math.isfinite(args.count_noise_stddev)):
    raise UsageError(f"--count-noise-stddev must be a number > 0, got "
                     f"{args.count_noise_stddev:g}")
  from accounting.adaptive import AdaptiveClip
  # Only the count noise enters ε; the initial C, quantile and rate do not.
  return AdaptiveClip(initial=1.0, count_noise_stddev=args.count_noise_stddev)


def _adaptive_fields(args, sigma: float) -> dict:
  """The count noise and the pair's σ_eff, for the output (empty for a fixed C)."""
  if args.count_noise_stddev is None:
    return {}
  from accounting.adaptive import effective_noise_multiplier
  return {"count_noise_stddev": args.count_noise_stddev,
          "effective_noise_multiplier": effective_noise_multiplier(
              sigma, args.count_noise_stddev)}


def _maker(args, scheme):
  """(σ, q, T) -> mechanism for the scheme the flags describe, through its plan."""
  return lambda sigma, q, steps: _plan(args, scheme, sigma, q, steps).mechanism()


def _sampling_inputs(args, *, need_q: bool, need_steps: bool):
  """(q, T, batch_size) from either input form; None for what is left out."""
  dataset_form = any(v is not None for v in (args.batch_size, args.epochs))
  if args.sampling_prob is not None and dataset_form:
    raise UsageError("give --sampling-prob/--steps or --dataset-size/--batch-size/--epochs, "
                     "not both")
  if (args.sampling_prob is not None and args.dataset_size is not None
      and args.max_batch_size is None):
    raise UsageError("--dataset-size is used with --batch-size/--epochs (or "
                     "--max-batch-size), not with --sampling-prob: drop one")
  if args.sampling_prob is not None or not dataset_form:
    if need_q and args.sampling_prob is None:
      raise UsageError("--sampling-prob is required (in (0, 1]), or give --dataset-size, "
                       "--batch-size and --epochs")
    if args.epochs is not None:
      raise UsageError("--epochs needs --dataset-size and --batch-size")
    if need_steps and args.steps is None:
      raise UsageError("--steps is required (an integer >= 1), or give --dataset-size, "
                       "--batch-size and --epochs")
    return args.sampling_prob, args.steps, args.batch_size
  # dataset form
  if args.dataset_size is None:
    raise UsageError("--batch-size/--epochs need --dataset-size (an integer >= 1)")
  for flag, value in (("--dataset-size", args.dataset_size), ("--batch-size", args.batch_size)):
    if value is not None and value < 1:
      raise UsageError(f"{flag} must be an integer >= 1, got {value}")
  if need_q and args.batch_size is None:
    raise UsageError("--batch-size is required with --dataset-size (an integer >= 1)")
  if args.steps is not None and args.epochs is not None:
    raise UsageError("give --steps or --epochs, not both")
  q = steps = None
  if args.batch_size is not None:
    if args.batch_size > args.dataset_size:
      raise UsageError(f"--batch-size must be <= --dataset-size ({args.dataset_size}), "
                       f"got {args.batch_size}")
    q = args.batch_size / args.dataset_size
  if args.epochs is not None:
    if args.batch_size is None:
      raise UsageError("--epochs needs --batch-size")
    q, steps = mech.sampling_from_epochs(dataset_size=args.dataset_size,
                                         batch_size=args.batch_size, epochs=args.epochs,
                                         scheme=args.sampling_scheme)
  elif args.steps is not None:
    steps = args.steps
  elif need_steps:
    raise UsageError("--epochs (> 0) or --steps (>= 1) is required")
  return q, steps, args.batch_size


def _check_delta(args):
  if not (0 < args.delta < 1):
    raise UsageError(f"--delta must be in (0, 1), got {args.delta:g}")


# --- commands ----------------------------------------------------------------------

def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.6g}" if math.isfinite(value) else str(value)
  return str(value)


def _print_table(title: str, rows: list[tuple[str, object]]) -> None:
  print(title)
  width = max(len(k) for k, _ in rows)
  for key, value in rows:
    if value is not None:
      print(f"  {key:<{width}}  {_fmt(value)}")


def _accountant_label(args, disc) -> str:
  if args.accountant == "rdp":
    return "rdp"
  return f"pld (Δ={disc:g})" if isinstance(disc, float) else f"pld ({disc})"


def _cmd_epsilon(args) -> dict:
  _check_delta(args)
  scheme = _scheme(args)
  if args.noise_multiplier is None:
    raise UsageError("--noise-multiplier is required (> 0)")
  q, steps, batch = _sampling_inputs(args, need_q=True, need_steps=True)
  from accounting import accountants
  mechanism = _maker(args, scheme)(args.noise_multiplier, q, steps)
  eps, disc = accountants.epsilon_and_discretization(mechanism, delta=args.delta,
                                                     accountant=args.accountant)
  out = {"epsilon": eps, "delta": args.delta, "accountant": args.accountant,
         "noise_multiplier": args.noise_multiplier, "sampling_prob": q, "steps": steps,
         "privacy_unit": args.privacy_unit,
         "sampling_unit": args.sampling_unit or args.privacy_unit,
         "examples_per_user": args.examples_per_user, "scheme": scheme,
         "discretization": disc, "mechanism": mechanism.to_dict(),
         **_adaptive_fields(args, args.noise_multiplier)}
  if args.group_privacy:
    if args.count_noise_stddev is not None:
      raise UsageError("--group-privacy does not apply with --count-noise-stddev")
    if scheme != "els":
      raise UsageError("--group-privacy applies to ELS (--privacy-unit user "
                       "--sampling-unit example --examples-per-user K)")
    from accounting import group
    from accounting import plan as planning
    example_level = planning.PrivacyPlan(
        privacy_unit="example", sampling=planning.SamplingPlan(scheme="poisson", sampling_prob=q),
        noise_multiplier=args.noise_multiplier, l2_clip_norm=1.0, noise=planning.NoisePlan(),
        delta=args.delta, num_steps=steps, accountant=args.accountant).mechanism()
    out["group_privacy_epsilon"] = group.group_privacy_epsilon(
        example_level, group_size=args.examples_per_user, delta=args.delta,
        accountant=args.accountant)
  group_eps = out.get("group_privacy_epsilon")
  _explain_infinite(out, "epsilon", args)
  _explain_infinite(out, "group_privacy_epsilon", args)
  if not args.json:
    _print_table(f"dpfl epsilon: {_DESCRIPTION[scheme]}", [
        ("noise multiplier", args.noise_multiplier),
        ("count noise stddev", args.count_noise_stddev),
        ("effective noise multiplier", out.get("effective_noise_multiplier")),
        ("sampling prob", q), ("batch size", batch), ("steps", steps),
        ("examples per user", args.examples_per_user), ("privacy unit", args.privacy_unit),
        ("delta", args.delta), ("accountant", _accountant_label(args, disc)),
        ("epsilon", eps), ("group-privacy epsilon", group_eps),
        ("reason", out.get("reason"))])
  return out


def _explain_infinite(out: dict, key: str, args) -> None:
  """An infinite ε becomes ``None`` with a ``"reason"`` (strict JSON has no Infinity).

  The PLD puts the mass of its truncated tails at privacy loss +∞ (pessimistic),
  so for δ below that mass no finite ε is certified.
  """
  value = out.get(key)
  if not (isinstance(value, float) and math.isinf(value)):
    return
  out[key] = None
  reason = (f"no finite {key.replace('_', ' ')} at delta={args.delta:g}: delta is below the "
            "probability mass the accountant puts at infinite privacy loss; use a larger "
            "--delta" + (" or --accountant rdp" if args.accountant == "pld" else ""))
  out["reason"] = out["reason"] + "; " + reason if "reason" in out else reason


def _cmd_calibrate(args) -> dict:
  _check_delta(args)
  if not (args.target_epsilon > 0 and math.isfinite(args.target_epsilon)):
    raise UsageError(f"--target-epsilon must be a finite number > 0, got {args.target_epsilon:g}")
  scheme = _scheme(args)
  from accounting import calibrate as cal
  make = _maker(args, scheme)
  common = dict(target_epsilon=args.target_epsilon, delta=args.delta, accountant=args.accountant)
  out_batch = args.batch_size
  if args.noise_multiplier is None:
    q, steps, _ = _sampling_inputs(args, need_q=True, need_steps=True)
    mech_for = lambda s: make(s, q, steps)
    result = cal.calibrate_noise_multiplier(mech_for, **common)
    sigma = result.value
  else:
    if args.noise_multiplier <= 0:
      raise UsageError(f"--noise-multiplier must be > 0, got {args.noise_multiplier:g}")
    sigma = args.noise_multiplier
    missing_steps = args.steps is None and args.epochs is None
    missing_q = args.sampling_prob is None and args.batch_size is None
    if missing_steps == missing_q:
      raise UsageError("with --noise-multiplier given, leave out exactly one of --steps "
                       "(or --epochs) and --sampling-prob (or --batch-size) to calibrate it")
    if missing_steps:
      q, _, _ = _sampling_inputs(args, need_q=True, need_steps=False)
      result = cal.calibrate_num_steps(lambda t: make(sigma, q, t), **common)
      steps = int(result.value)
    else:
      if scheme in ("shuffle", "truncated"):
        raise UsageError("calibrating the sampling rate is supported for Poisson sampling "
                         "(drop --sampling-scheme/--max-batch-size)")
      if args.epochs is not None:
        raise UsageError("calibrating the batch size needs --steps, not --epochs")
      steps = args.steps
      if steps < 1:
        raise UsageError(f"--steps must be an integer >= 1, got {steps}")
      if args.dataset_size is not None:
        n = args.dataset_size
        if n < 1:
          raise UsageError(f"--dataset-size must be an integer >= 1, got {n}")
        result = cal.calibrate_batch_size(lambda b: make(sigma, b / n, steps),
                                          dataset_size=n, **common)
        out_batch = int(result.value)
        q = out_batch / n
      else:
        result = cal.calibrate_sampling_prob(lambda qq: make(sigma, qq, steps), **common)
        q = result.value
  disc = result.discretization
  if disc == "auto":  # report the grid the adaptive rule settled on (cached: no recompute)
    from accounting import accountants
    _, disc = accountants.epsilon_and_discretization(
        result.mechanism, delta=args.delta, accountant=args.accountant, discretization="auto")
  out = {"noise_multiplier": sigma, "epsilon": result.epsilon, "delta": args.delta,
         "accountant": args.accountant, "target_epsilon": args.target_epsilon,
         "sampling_prob": q, "steps": steps, "batch_size": out_batch,
         "privacy_unit": args.privacy_unit,
         "sampling_unit": args.sampling_unit or args.privacy_unit,
         "examples_per_user": args.examples_per_user, "scheme": scheme,
         "discretization": disc, "mechanism": result.mechanism.to_dict(),
         **_adaptive_fields(args, sigma)}
  if not args.json:
    _print_table(f"dpfl calibrate: {_DESCRIPTION[scheme]}", [
        ("target epsilon", args.target_epsilon), ("noise multiplier", sigma),
        ("count noise stddev", args.count_noise_stddev),
        ("effective noise multiplier", out.get("effective_noise_multiplier")),
        ("sampling prob", q), ("batch size", out_batch), ("steps", steps),
        ("examples per user", args.examples_per_user), ("privacy unit", args.privacy_unit),
        ("delta", args.delta), ("accountant", _accountant_label(args, disc)),
        ("epsilon achieved", result.epsilon)])
  return out


_COMMANDS = {"epsilon": _cmd_epsilon, "calibrate": _cmd_calibrate}


def main(argv: list[str] | None = None, extra_commands: dict | None = None) -> int:
  """Runs one ``dpfl`` command. Returns the exit status.

  Args:
    argv: the arguments (default: ``sys.argv[1:]``).
    extra_commands: further commands, ``{name: (help, module)}`` (see
      ``build_parser``); ``dpfl.cli`` plugs in the training-side ones.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  extra_commands = extra_commands or {}
  try:
    selected = selected_command(argv, extra_commands)
    args = build_parser(extra_commands, selected).parse_args(negative_values_joined(argv))
    if args.command in _COMMANDS:
      out = _COMMANDS[args.command](args)
    else:
      module = importlib.import_module(extra_commands[args.command][1])
      out = module.run(args)
      if not args.json:
        print(module.format_table(out))
  except UsageError as e:
    message = str(e)
    if message.startswith("dpfl"):  # argparse's "dpfl epsilon: ..." form
      prog, _, message = message.partition(": ")
    else:
      prog = "dpfl"
    print(f"{prog}: error: {flagged(message)}", file=sys.stderr)
    return 2
  except ValueError as e:  # a mechanism or accountant rejected an argument
    print(f"dpfl: error: {flagged(str(e))}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    return 130
  except BrokenPipeError:  # the reader left early (`dpfl ... | head`): not our error
    return _quiet_broken_pipe()
  except Exception as e:  # pragma: no cover - one line unless debugging
    if os.environ.get("DPFL_DEBUG"):
      raise
    print(f"dpfl: internal error: {type(e).__name__}: {e} (set DPFL_DEBUG=1 for a "
          "traceback)", file=sys.stderr)
    return 1
  if args.json:
    try:
      print(json.dumps(_strict_json(out), sort_keys=True, default=str, allow_nan=False),
            flush=True)
    except BrokenPipeError:
      return _quiet_broken_pipe()
  return 0


def _strict_json(value):
  """``value`` with every non-finite float replaced by ``None`` (jq reads it).

  The commands explain their own infinities (``"reason"``); this is the last
  guard for any other value, e.g. from a plugged-in command.
  """
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict_json(v) for v in value]
  return value


def _quiet_broken_pipe() -> int:
  """Stops writing to a closed pipe without a traceback at interpreter exit."""
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
  except (OSError, ValueError):
    pass
  return 0


if __name__ == "__main__":
  sys.exit(main())
