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

import argparse
import importlib
import json
import math
import os
import re
import sys

from accounting import mechanisms as mech

_FLAG_OF = {
    "noise_multiplier": "--noise-multiplier", "sampling_prob": "--sampling-prob",
    "num_steps": "--steps", "delta": "--delta", "examples_per_user": "--examples-per-user",
    "dataset_size": "--dataset-size", "batch_size": "--batch-size", "epochs": "--epochs",
    "target_epsilon": "--target-epsilon", "max_batch_size": "--max-batch-size",
    "accountant": "--accountant",
}


# The allowed range of each numeric flag, for messages about it.
_RANGE_OF = {
    "--noise-multiplier": "a number > 0", "--sampling-prob": "a number in (0, 1]",
    "--steps": "an integer in [1, 100000000]", "--delta": "a number in (0, 1)",
    "--examples-per-user": "an integer >= 1", "--dataset-size": "an integer >= 1",
    "--batch-size": "an integer >= 1", "--epochs": "a number > 0",
    "--target-epsilon": "a number in (0, 100]", "--max-batch-size": "an integer >= 1",
}


class UsageError(Exception):
  """Bad command-line input: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
  """argparse, with exact flag names and one-line errors.

  ``allow_abbrev=False``: argparse would otherwise take ``--noise 1.1`` as
  ``--noise-multiplier 1.1`` (and any prefix of any flag), so a typo or a
  flag of another command could silently mean something else. Subparsers
  are built with this class too, so the rule holds for every command.
  """

  def __init__(self, *args, **kwargs):
    kwargs.setdefault("allow_abbrev", False)
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    super().__init__(*args, **kwargs)

  def error(self, message):  # one line, no usage dump, status 2
    if message.startswith("the following arguments are required:"):
      missing = [f.strip() for f in message.partition(":")[2].split(",")]
      ranges = [f"{f} is {_RANGE_OF[f]}" for f in missing if f in _RANGE_OF]
      if ranges:
        message += " (" + "; ".join(ranges) + ")"
    raise UsageError(f"{self.prog}: {message}")


def _version() -> str:
  """The installed distribution's version (read only when asked for)."""
  from importlib import metadata
  try:
    return metadata.version("dpfl")
  except metadata.PackageNotFoundError:
    return "unknown (dpfl is not installed; `pip install -e .`)"


class _VersionAction(argparse.Action):
  """``--version``: prints ``dpfl X.Y.Z`` and exits 0 (the version is looked up lazily)."""

  def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
               help="print dpfl's version and exit"):
    super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

  def __call__(self, parser, namespace, values, option_string=None):
    print(f"dpfl {_version()}")
    parser.exit()


def _value(flag: str, integer: bool = False):
  """The argparse ``type`` of a numeric flag: a parse error names its range.

  Integers accept integral spellings such as ``1e3``. The range itself is
  checked where the value is used (one message for CLI and Python callers).
  """
  def parse(text: str):
    try:
      value = float(text)
    except ValueError:
      value = None
    if value is not None and integer:
      try:
        return int(text)
      except ValueError:
        if math.isfinite(value) and value.is_integer():
          return int(value)
        value = None
    if value is None:
      raise argparse.ArgumentTypeError(f"must be {_RANGE_OF[flag]}, got {text!r}")
    return value
  parse.__name__ = "integer" if integer else "number"
  return parse


def _negative_values_joined(argv: list[str]) -> list[str]:
  """``--delta -1e-5`` -> ``--delta=-1e-5``, so the range check, not argparse's
  "expected one argument", answers a negative value."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if (arg in _RANGE_OF and i + 1 < len(argv)
        and re.fullmatch(r"-(\d|\.\d|inf|nan).*", argv[i + 1], flags=re.IGNORECASE)):
      out.append(f"{arg}={argv[i + 1]}")
      i += 2
    else:
      out.append(arg)
      i += 1
  return out


def _flagged(message: str) -> str:
  """Rewrites python argument names in a ValueError into the CLI's flags."""
  return re.sub(r"(?<![-\w])(" + "|".join(_FLAG_OF) + r")\b", lambda m: _FLAG_OF[m.group(1)], message)


# --- arguments ----------------------------------------------------------------

# The two ways to give the sampling, as one usage fragment for both commands.
_SAMPLING_USAGE = "(--sampling-prob Q | --dataset-size N --batch-size B) (--steps T | --epochs E)"
_OPTIONS_USAGE = ("[--accountant {pld,rdp}] [--privacy-unit {example,user}]\n"
                  "         [--sampling-unit {example,user}] [--examples-per-user K]\n"
                  "         [--sampling-scheme {poisson,shuffle}] [--max-batch-size M]")

_EPSILON_USAGE = ("%(prog)s --noise-multiplier S --delta D\n"
                  f"         {_SAMPLING_USAGE}\n"
                  f"         {_OPTIONS_USAGE}\n"
                  "         [--group-privacy] [--json]")
_CALIBRATE_USAGE = ("%(prog)s --target-epsilon E --delta D [--noise-multiplier S]\n"
                    f"         {_SAMPLING_USAGE}\n"
                    f"         {_OPTIONS_USAGE}\n"
                    "         [--json]")

_EPSILON_EXAMPLES = """\
examples:
  dpfl epsilon --noise-multiplier 1.1 --sampling-prob 0.01 --steps 1000 --delta 1e-5
  dpfl epsilon --noise-multiplier 1.1 --dataset-size 60000 --batch-size 256 --epochs 10 \\
               --delta 1e-5 --json
  dpfl epsilon --noise-multiplier 2 --sampling-prob 0.001 --steps 10000 --delta 1e-8 \\
               --privacy-unit user --sampling-unit example --examples-per-user 8"""

_CALIBRATE_EXAMPLES = """\
examples:
  # the noise multiplier for ε = 8 over 10,000 steps at q = 0.01
  dpfl calibrate --target-epsilon 8 --sampling-prob 0.01 --steps 10000 --delta 1e-5
  # the most steps (so epochs) that σ = 1.1 affords at ε = 2
  dpfl calibrate --target-epsilon 2 --noise-multiplier 1.1 --dataset-size 10000 \\
                 --batch-size 100 --delta 1e-5
  # the largest batch size for 500 steps at σ = 1.1 and ε = 2
  dpfl calibrate --target-epsilon 2 --noise-multiplier 1.1 --dataset-size 10000 \\
                 --steps 500 --delta 1e-5"""


def _add_common(p: argparse.ArgumentParser, *, calibrate: bool) -> None:
  if calibrate:
    p.add_argument("--noise-multiplier", type=_value("--noise-multiplier"), metavar="S",
                   help="noise std / clip norm, > 0 (omit to calibrate it; give it to "
                        "calibrate the steps or the sampling rate instead)")
  else:
    p.add_argument("--noise-multiplier", type=_value("--noise-multiplier"), metavar="S",
                   required=True, help="noise std / clip norm, > 0")
  p.add_argument("--delta", type=_value("--delta"), required=True, metavar="D",
                 help="target δ in (0, 1)")
  sampling = p.add_argument_group(
      "sampling (give one form)",
      "  as a rate:     --sampling-prob Q --steps T\n"
      "  from the data: --dataset-size N --batch-size B --epochs E (or --steps T)\n"
      "--sampling-prob and --batch-size exclude each other, as do --steps and --epochs."
      + ("\nWith --noise-multiplier given, leave out the steps (--steps/--epochs) or the\n"
         "rate (--sampling-prob/--batch-size): that one is calibrated." if calibrate else ""))
  rate = sampling.add_mutually_exclusive_group()
  rate.add_argument("--sampling-prob", type=_value("--sampling-prob"), metavar="Q",
                    help="Poisson sampling probability of a unit per step, in (0, 1]")
  rate.add_argument("--batch-size", type=_value("--batch-size", integer=True), metavar="B",
                    help="expected batch size, with --dataset-size (q = B/N)")
  sampling.add_argument("--dataset-size", type=_value("--dataset-size", integer=True),
                        metavar="N", help="number of sampling units (examples, or users "
                                          "for ULS)")
  length = sampling.add_mutually_exclusive_group()
  length.add_argument("--steps", type=_value("--steps", integer=True), metavar="T",
                      help="number of noisy steps, >= 1")
  length.add_argument("--epochs", type=_value("--epochs"), metavar="E",
                      help="passes over the data set, > 0, with --dataset-size and "
                           "--batch-size: T = ceil(E·N/B) steps for Poisson sampling; with "
                           "--sampling-scheme shuffle an epoch is floor(N/B) full batches, "
                           "T = ceil(E·floor(N/B))")
  unit = p.add_argument_group("unit of privacy")
  unit.add_argument("--privacy-unit", choices=("example", "user"), default="example",
                    help="what a neighbouring dataset adds or removes (default: example)")
  unit.add_argument("--sampling-unit", choices=("example", "user"), default=None,
                    help="what is Poisson-sampled (default: same as --privacy-unit); "
                         "user/user is ULS, user/example is ELS")
  unit.add_argument("--examples-per-user", type=_value("--examples-per-user", integer=True),
                    metavar="K", help="cap on examples per user; required for ELS")
  how = p.add_argument_group("accounting")
  how.add_argument("--accountant", choices=("pld", "rdp"), default="pld",
                   help="dp-accounting back end (default: pld)")
  how.add_argument("--sampling-scheme", choices=("poisson", "shuffle"), default="poisson",
                   help="poisson (default), or fixed-size shuffled batches with no "
                        "amplification (needs --dataset-size and --batch-size)")
  how.add_argument("--max-batch-size", type=_value("--max-batch-size", integer=True),
                   metavar="M", help="truncate Poisson batches to M examples (accounted "
                                     "exactly; needs --dataset-size)")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object as the last line of stdout")


def _description(extra_commands: dict) -> str:
  """The top-level description: names every command (each one's help is listed below it)."""
  names = ["epsilon", "calibrate", *extra_commands]
  return ("dpfl: differential privacy for JAX training, from the command line.\n"
          f"Commands: {', '.join(names)}.\n"
          "`dpfl COMMAND --help` shows a command's flags and ends with examples.")


_TOP_EXAMPLES = """\
examples:
  dpfl epsilon --noise-multiplier 1.1 --sampling-prob 0.01 --steps 1000 --delta 1e-5
  dpfl calibrate --target-epsilon 8 --sampling-prob 0.01 --steps 10000 --delta 1e-5
  dpfl mf --strategy blt --steps 1024 --participations 4 --target-epsilon 8 --delta 1e-6"""


def build_parser(extra_commands: dict | None = None,
                 selected: str | None = None) -> argparse.ArgumentParser:
  """The ``dpfl`` parser: accounting commands, plus those a caller plugs in.

  ``extra_commands`` maps a command name to ``(help, module)``; the module
  provides ``add_arguments(parser)``, ``run(args) -> dict`` and
  ``format_table(result) -> str``, and optionally ``EXAMPLES``, the text that
  ends its ``--help``. It is imported only when its command is the
  ``selected`` one, so ``dpfl --help`` stays light.
  """
  extra_commands = extra_commands or {}
  parser = _Parser(prog="dpfl", description=_description(extra_commands),
                   epilog=_TOP_EXAMPLES if "mf" in extra_commands else None)
  parser.add_argument("--version", action=_VersionAction)
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser,
                              title="commands")
  sub.required = True
  eps = sub.add_parser("epsilon", help="ε spent by a DP-SGD configuration at δ",
                       description="ε spent by a DP-SGD configuration at δ.",
                       usage=_EPSILON_USAGE, epilog=_EPSILON_EXAMPLES)
  _add_common(eps, calibrate=False)
  eps.add_argument("--group-privacy", action="store_true",
                   help="ELS: also report the group-privacy baseline (example-level ε "
                        "converted to k examples)")
  cal = sub.add_parser("calibrate", help="noise, steps or sampling rate for a target ε",
                       description="Solves for the one quantity left out: the noise "
                       "multiplier,\nthe steps (or epochs), or the sampling rate (or batch "
                       "size).", usage=_CALIBRATE_USAGE, epilog=_CALIBRATE_EXAMPLES)
  cal.add_argument("--target-epsilon", type=_value("--target-epsilon"), required=True, metavar="E",
                   help="the ε budget, > 0")
  _add_common(cal, calibrate=True)
  for name, (help_text, module_name) in extra_commands.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    if name == selected:
      module = importlib.import_module(module_name)
      module.add_arguments(p)
      if not any("--json" in a.option_strings for a in p._actions):
        p.add_argument("--json", action="store_true",
                       help="print one JSON object as the last line of stdout")
      p.epilog = getattr(module, "EXAMPLES", None)
  return parser


def _selected_command(argv: list[str], names) -> str | None:
  for arg in argv:
    if not arg.startswith("-"):
      return arg if arg in names else None
  return None


# --- from flags to mechanisms ---------------------------------------------------

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


def _maker(args, scheme):
  """(σ, q, T) -> mechanism for the scheme the flags describe."""
  def make(sigma, q, steps):
    if scheme == "poisson":
      return mech.PoissonDpSgd(sigma, q, steps)
    if scheme == "uls":
      return mech.UlsDpSgd(sigma, q, steps)
    if scheme == "els":
      return mech.ElsDpSgd(sigma, q, steps, args.examples_per_user)
    if scheme == "truncated":
      return mech.TruncatedPoissonDpSgd(sigma, q, args.dataset_size, args.max_batch_size, steps)
    batch = args.batch_size if args.batch_size is not None else round(q * args.dataset_size)
    return mech.ShuffledDpSgd(sigma, args.dataset_size, batch, steps)
  return make


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
         "discretization": disc, "mechanism": mechanism.to_dict()}
  if args.group_privacy:
    if scheme != "els":
      raise UsageError("--group-privacy applies to ELS (--privacy-unit user "
                       "--sampling-unit example --examples-per-user K)")
    from accounting import group
    example_level = mech.PoissonDpSgd(args.noise_multiplier, q, steps)
    out["group_privacy_epsilon"] = group.group_privacy_epsilon(
        example_level, group_size=args.examples_per_user, delta=args.delta,
        accountant=args.accountant)
  group_eps = out.get("group_privacy_epsilon")
  _explain_infinite(out, "epsilon", args)
  _explain_infinite(out, "group_privacy_epsilon", args)
  if not args.json:
    _print_table(f"dpfl epsilon: {_DESCRIPTION[scheme]}", [
        ("noise multiplier", args.noise_multiplier), ("sampling prob", q),
        ("batch size", batch), ("steps", steps),
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
         "discretization": disc, "mechanism": result.mechanism.to_dict()}
  if not args.json:
    _print_table(f"dpfl calibrate: {_DESCRIPTION[scheme]}", [
        ("target epsilon", args.target_epsilon), ("noise multiplier", sigma),
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
    selected = _selected_command(argv, extra_commands)
    args = build_parser(extra_commands, selected).parse_args(_negative_values_joined(argv))
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
    print(f"{prog}: error: {_flagged(message)}", file=sys.stderr)
    return 2
  except ValueError as e:  # a mechanism or accountant rejected an argument
    print(f"dpfl: error: {_flagged(str(e))}", file=sys.stderr)
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
