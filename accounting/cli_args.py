"""The ``dpfl`` command line's arguments: flags, ranges, usage, help and parsing.

Split from ``accounting.cli`` (which runs the commands): everything argparse
needs, and how a bad flag becomes one line naming it and its range. Standard
library only, so ``dpfl --help`` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import math
import re

_FLAG_OF = {
    "noise_multiplier": "--noise-multiplier", "sampling_prob": "--sampling-prob",
    "num_steps": "--steps", "delta": "--delta", "examples_per_user": "--examples-per-user",
    "dataset_size": "--dataset-size", "batch_size": "--batch-size", "epochs": "--epochs",
    "target_epsilon": "--target-epsilon", "max_batch_size": "--max-batch-size",
    "accountant": "--accountant", "count_noise_stddev": "--count-noise-stddev",
}


# The allowed range of each numeric flag, for messages about it.
_RANGE_OF = {
    "--noise-multiplier": "a number > 0", "--sampling-prob": "a number in (0, 1]",
    "--steps": "an integer in [1, 100000000]", "--delta": "a number in (0, 1)",
    "--examples-per-user": "an integer >= 1", "--dataset-size": "an integer >= 1",
    "--batch-size": "an integer >= 1", "--epochs": "a number > 0",
    "--target-epsilon": "a number in (0, 128]", "--max-batch-size": "an integer >= 1",
    "--count-noise-stddev": "a number > 0",
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


def negative_values_joined(argv: list[str]) -> list[str]:
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


def flagged(message: str) -> str:
  """Rewrites python argument names in a ValueError into the CLI's flags.

  A name followed by ``:`` is a label, not an argument (``dpfl plan``'s
  refusals start with the dimension, e.g. ``epochs: ...``), and is kept.
  """
  return re.sub(r"(?<![-\w])(" + "|".join(_FLAG_OF) + r")\b(?!:)", lambda m: _FLAG_OF[m.group(1)],
                message)


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
  how.add_argument("--count-noise-stddev", type=_value("--count-noise-stddev"), metavar="SB",
                   help="adaptive clipping (dpfl.adaptive_clip): the std of the noise on "
                        "each step's count of unclipped units, > 0; the step is then "
                        "accounted as one Gaussian with noise multiplier "
                        "(S^-2 + (2 SB)^-2)^-1/2, S the gradient's")
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
                   help="the ε budget, in (0, 128]")
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


def selected_command(argv: list[str], names) -> str | None:
  for arg in argv:
    if not arg.startswith("-"):
      return arg if arg in names else None
  return None


# --- from flags to mechanisms ---------------------------------------------------
