"""The ``dpfl`` command line as a newcomer meets it: exact flags, --version, help.

Every subcommand's ``--help`` ends with examples, and each example parses
with that command's own parser (so a renamed flag cannot leave a stale
example behind); the ``epsilon`` and ``calibrate`` examples also run.
"""

import re
import shlex
from importlib import metadata

import pytest

from accounting import cli as accounting_cli
from dpfl import cli

SUBCOMMANDS = ["epsilon", "calibrate", *cli.COMMANDS]


def _help(capsys, *argv) -> str:
  with pytest.raises(SystemExit) as exit_:
    cli.main([*argv, "--help"])
  assert exit_.value.code == 0
  return capsys.readouterr().out


def _examples(text: str) -> list[list[str]]:
  """The commands listed under ``examples:`` (continuation lines joined)."""
  body = text.split("\nexamples:\n", 1)[1]
  body = body.replace("\\\n", " ")
  return [shlex.split(line) for line in body.splitlines()
          if line.strip().startswith("dpfl ")]


@pytest.mark.parametrize("argv", [
    ["epsilon", "--noise", "1.1", "--sampling-prob", "0.01", "--steps", "10", "--delta", "1e-5"],
    ["epsilon", "--noise-multiplier", "1.1", "--sampling", "0.01", "--steps", "10",
     "--delta", "1e-5"],
    ["calibrate", "--target", "3", "--sampling-prob", "0.01", "--steps", "10", "--delta", "1e-5"],
    ["mf", "--strategy", "sqrt", "--steps", "8", "--participation", "2"],
    ["plan", "--compute", "1e13", "--target-eps", "4", "--delta", "1e-6", "--users", "1000"],
    ["sweep", "--result", "x.jsonl", "--dry-run"],
    ["fit", "--results", "x.jsonl", "--ou", "law.json"],
])
def test_abbreviated_flags_are_refused(argv, capsys):
  """argparse's default would take `--noise 1.1` as `--noise-multiplier 1.1`."""
  assert cli.main(argv) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("dpfl"), err


def test_version(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["--version"])
  assert exit_.value.code == 0
  assert capsys.readouterr().out.strip() == f"dpfl {metadata.version('dpfl')}"


def test_top_level_help_names_every_subcommand(capsys):
  text = _help(capsys)
  description = text.split("\n\n")[1]  # the paragraph after the usage line
  for name in SUBCOMMANDS:
    assert re.search(rf"\b{name}\b", description), name
  assert "--version" in text


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_help_ends_with_examples_that_parse(command, capsys):
  text = _help(capsys, command)
  assert "\nexamples:\n" in text
  tail = text.rstrip().split("\nexamples:\n", 1)[1]
  assert "--" not in tail.split("dpfl", 1)[0]  # examples are the last section
  examples = _examples(text)
  assert 1 <= len(examples) <= 3
  parser = accounting_cli.build_parser(cli.COMMANDS, selected=command)
  for argv in examples:
    assert argv[:2] == ["dpfl", command], argv
    parser.parse_args(argv[1:])  # raises UsageError on an unknown or bad flag


@pytest.mark.parametrize("command", ["epsilon", "calibrate"])
def test_accounting_examples_run(command, capsys):
  text = _help(capsys, command)
  for argv in _examples(text):
    assert cli.main(argv[1:]) == 0, argv
  capsys.readouterr()


def test_required_flags_are_not_shown_as_optional(capsys):
  usage = {c: _help(capsys, c).split("\n\n")[0] for c in SUBCOMMANDS}
  required = {"epsilon": ["--noise-multiplier S", "--delta D"],
              "calibrate": ["--target-epsilon E", "--delta D"],
              "mf": ["--strategy", "--steps N"], "sweep": ["--results FILE"],
              "fit": ["--results FILE", "--out LAW.json"],
              "plan": ["--compute FLOPS", "--target-epsilon E", "--delta D", "--users N"]}
  for command, flags in required.items():
    for flag in flags:
      assert flag in usage[command] and f"[{flag}" not in usage[command], (command, flag)


def test_sampling_forms_are_shown_and_enforced_as_exclusive(capsys):
  usage = _help(capsys, "epsilon").split("\n\n")[0]
  assert "(--sampling-prob Q | --dataset-size N --batch-size B)" in usage
  assert "(--steps T | --epochs E)" in usage
  base = ["epsilon", "--noise-multiplier", "1", "--delta", "1e-5"]
  assert cli.main([*base, "--sampling-prob", "0.01", "--batch-size", "10",
                   "--dataset-size", "1000", "--steps", "10"]) == 2
  assert cli.main([*base, "--dataset-size", "1000", "--batch-size", "10", "--steps", "10",
                   "--epochs", "1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and all("not allowed with" in line for line in err), err


def test_epochs_means_passes_in_epsilon_and_is_not_an_mf_flag_name(capsys):
  """`--epochs` is dataset passes in `epsilon`; `mf` calls its count --participations."""
  assert "passes over the data set" in _help(capsys, "epsilon")
  mf_help = _help(capsys, "mf")
  assert "--participations K" in mf_help and "--epochs" not in mf_help.split("\n\n")[0]
