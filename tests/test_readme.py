"""Every code block of README.md runs as written.

* ```python blocks: the first is the shared setup (a small synthetic
  regression task); every other block runs in a fresh namespace after it.
* The ```diff blocks (a plain loop made private: optax, Flax NNX): both
  sides are rebuilt, the plain one from ' ' and '-' lines, the private one
  from ' ' and '+' lines, and both run after the setup. The NNX one changes
  at most 6 lines (issue 17).
* ```console / ```bash commands: every ``dpfl ...`` command parses with the
  real parser (a renamed or misspelt flag fails here); the cheap ones
  (``epsilon``, ``calibrate``, ``plan``) also run through ``dpfl.cli.main``
  and must exit 0, and a printed ``epsilon`` line must match the README's.
  ``mf``, ``sweep`` and ``fit`` take seconds to minutes, so they are only
  parsed (their own tests run them).
"""

import importlib.resources
import pathlib
import re
import shlex

import pytest

from accounting import cli as accounting_cli
from dpfl import cli

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SETUP_MARKER = "# Setup shared by the Python examples below"
CHEAP_COMMANDS = ("epsilon", "calibrate", "plan")


def _blocks() -> list[tuple[str, int, str]]:
  """(language, line number, code) of every fenced block."""
  text = README.read_text(encoding="utf-8")
  out = []
  for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
    line = text.count("\n", 0, match.start()) + 1
    out.append((match.group(1), line, match.group(2)))
  return out


BLOCKS = _blocks()
PYTHON = [(line, code) for lang, line, code in BLOCKS if lang == "python"]
DIFFS = [(line, code) for lang, line, code in BLOCKS if lang == "diff"]
SETUP = PYTHON[0][1]


def _side(diff: str, keep: str) -> str:
  """One side of a unified-style diff: unchanged (' ') lines and ``keep`` lines."""
  lines = []
  for raw in diff.splitlines():
    if not raw.strip():
      lines.append("")
    elif raw[0] in (" ", keep):
      lines.append(raw[1:])
    elif raw[0] not in "+-":
      raise AssertionError(f"diff line without a ' ', '+' or '-' prefix: {raw!r}")
  return "\n".join(lines) + "\n"


def _run(code: str, name: str) -> dict:
  namespace = {"__name__": "__readme__"}
  exec(compile(SETUP, "README.md (setup block)", "exec"), namespace)
  exec(compile(code, name, "exec"), namespace)
  return namespace


def _commands() -> list[tuple[int, list[str], str]]:
  """(line, argv after `dpfl`, the block's text) of every dpfl command shown."""
  out = []
  for lang, line, code in BLOCKS:
    if lang not in ("console", "bash"):
      continue
    joined = code.replace("\\\n", " ")
    for text in joined.splitlines():
      if lang == "console":
        if not text.startswith("$ "):
          continue  # printed output
        text = text[2:]
      for part in text.split("&&"):
        argv = shlex.split(part)
        if argv and argv[0] == "dpfl":
          out.append((line, argv[1:], code))
  return out


COMMANDS = _commands()


def test_the_readme_has_what_this_test_expects():
  assert SETUP_MARKER in SETUP
  assert len(PYTHON) >= 4 and len(DIFFS) == 2 and "dpfl.nnx" in DIFFS[1][1]
  used = {argv[0] for _, argv, _ in COMMANDS}
  assert {"epsilon", "mf", "sweep", "fit", "plan"} <= used
  languages = {lang for lang, _, _ in BLOCKS}
  assert languages <= {"python", "diff", "console", "bash", ""}, languages


def test_setup_block_runs():
  _run("", "README.md (setup only)")


@pytest.mark.parametrize("line,code", PYTHON[1:], ids=[f"line{l}" for l, _ in PYTHON[1:]])
def test_python_block_runs(line, code):
  _run(code, f"README.md (block at line {line})")


@pytest.mark.parametrize("side", ["+", "-"], ids=["private", "plain"])
@pytest.mark.parametrize("which", [0, 1], ids=["optax", "nnx"])
def test_diff_block_both_sides_run(which, side):
  line, diff = DIFFS[which]
  namespace = _run(_side(diff, side), f"README.md (diff at line {line}, side {side!r})")
  if side == "+":
    private = namespace["private"]
    assert private.ledger.num_steps == private.num_steps
    assert 0 < private.epsilon() <= 3.0
    if which == 1:  # dpfl.nnx plans with make_private: the same keywords, the same plan
      import optax
      from dpfl import make_private
      same = make_private(lambda params, batch: 0.0, optax.adam(1e-2), l2_clip_norm=1.0,
                          target_epsilon=3.0, delta=1e-5, dataset_size=namespace["n"],
                          batch_size=100, epochs=3)
      assert private.plan == same.plan


def test_nnx_diff_changes_at_most_6_lines():
  _, diff = DIFFS[1]
  changed = [raw for raw in diff.splitlines() if raw[:1] == "+"]
  removed = [raw for raw in diff.splitlines() if raw[:1] == "-"]
  assert len(changed) <= 6 and len(removed) <= len(changed), (changed, removed)
  assert not any("nnx.split" in raw or "nnx.merge" in raw for raw in changed)


@pytest.mark.parametrize("line,argv,block", COMMANDS,
                         ids=[f"line{l}-{a[0]}" for l, a, _ in COMMANDS])
def test_console_command(line, argv, block, capsys, tmp_path, monkeypatch):
  parser = accounting_cli.build_parser(cli.COMMANDS, selected=argv[0])
  parser.parse_args(argv)  # every flag exists and parses (UsageError otherwise)
  if argv[0] not in CHEAP_COMMANDS:
    return
  if "--law" in argv:
    # The README's flow plans with the law its `dpfl fit` line wrote; that
    # sweep is not run here, so the shipped law (fitted the same way, from
    # the study's sweep) stands in for it.
    import shutil
    from dpfl.scaling import fit
    law = argv[argv.index("--law") + 1]
    shutil.copy(importlib.resources.files("dpfl.scaling") / "data" / "law.json",
                tmp_path / law)
    monkeypatch.chdir(tmp_path)
    assert fit.load_law(law)
  assert cli.main(argv) == 0, argv
  out = capsys.readouterr().out
  shown = re.search(r"^\s+epsilon\s+([0-9.]+)\s*$", block, flags=re.MULTILINE)
  if shown and "--json" not in argv:
    printed = re.search(r"^\s+epsilon\s+([0-9.]+)\s*$", out, flags=re.MULTILINE)
    assert printed, out
    assert float(printed.group(1)) == pytest.approx(float(shown.group(1)), rel=1e-4)
