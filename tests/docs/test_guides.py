"""Every code block of the documentation site's guides runs as written.

* ```python blocks of a page run top to bottom in one namespace (a page is
  one script, as a reader would paste it).
* ```console blocks: every ``$ dpfl ...`` command parses with the real
  parser (a renamed flag fails here); ``epsilon``, ``calibrate`` and ``plan``
  also run and must exit 0.
* Sections the README and the site share are included from README.md by
  MyST ``{include}`` between ``<!-- docs:NAME:start/end -->`` markers (their
  code runs in tests/test_readme.py); these tests check every marker a page
  names exists once, every marked README section is on the site, and no guide
  holds a copy of a README block that could drift from it.

Guides are found by glob (docs/guides/*.md), so a page added later is run too.
"""

import pathlib
import re
import shlex
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from guide_blocks import fenced_blocks  # noqa: E402

from accounting import cli as accounting_cli  # noqa: E402
from dpfl import cli  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
CHEAP_COMMANDS = ("epsilon", "calibrate", "plan")
# Guides whose blocks take more than a few seconds (compiles of several
# models); they run with `-m slow`, which .ci/run also runs for tests/docs.
# Lines in a row that make a copy (three are idiom: init, loop, step).
COPY_RUN = 5
SLOW_GUIDES = {"optax", "flax_linen", "clipping", "multi_device", "flax_nnx"}


def _guide_params():
  return [pytest.param(path, id=path.stem,
                       marks=[pytest.mark.slow] if path.stem in SLOW_GUIDES else [])
          for path in GUIDES]


@pytest.mark.parametrize("path", _guide_params())
def test_guide_python_blocks_run(path, capsys):
  namespace = {"__name__": f"__guide_{path.stem}__"}
  for info, line, code in fenced_blocks(path):
    if info == "python":
      exec(compile(code, f"{path.relative_to(ROOT)} (block at line {line})", "exec"), namespace)


def _commands():
  out = []
  for path in sorted(DOCS.rglob("*.md")):
    if "_build" in path.parts:
      continue
    for info, line, code in fenced_blocks(path):
      if info not in ("console", "bash"):
        continue
      for text in code.replace("\\\n", " ").splitlines():
        if info == "console":
          if not text.startswith("$ "):
            continue
          text = text[2:]
        argv = shlex.split(text, comments=True)
        if argv and argv[0] == "dpfl":
          out.append(pytest.param(argv[1:], id=f"{path.stem}-line{line}-{argv[1]}"))
  return out


@pytest.mark.parametrize("argv", _commands())
def test_guide_console_command(argv, capsys):
  parser = accounting_cli.build_parser(cli.COMMANDS, selected=argv[0])
  parser.parse_args(argv)
  if argv[0] in CHEAP_COMMANDS:
    assert cli.main(argv) == 0, argv


INCLUDE = re.compile(r"^```\{include\}\s+(\S+)\n((?::[\w-]+:.*\n)*)```", re.MULTILINE)


def _includes():
  """(page, included file, start marker, end marker) of every {include}."""
  out = []
  for path in sorted(DOCS.rglob("*.md")):
    if "_build" in path.parts:
      continue
    for match in INCLUDE.finditer(path.read_text(encoding="utf-8")):
      options = dict(re.findall(r"^:([\w-]+):\s*(.*)$", match.group(2), flags=re.MULTILINE))
      target = (path.parent / match.group(1)).resolve()
      out.append((path, target, options.get("start-after"), options.get("end-before")))
  return out


def test_included_readme_sections_exist_once_and_all_are_on_the_site():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  marked = set(re.findall(r"<!-- docs:([\w-]+):start -->", readme))
  included = set()
  for page, target, start, end in _includes():
    assert target.exists(), (page, target)
    if target != ROOT / "README.md":
      continue
    assert start and end, f"{page}: include README.md between markers"
    name = re.fullmatch(r"<!-- docs:([\w-]+):start -->", start).group(1)
    assert end == f"<!-- docs:{name}:end -->", (page, start, end)
    assert readme.count(start) == 1 and readme.count(end) == 1, (page, name)
    assert readme.index(start) < readme.index(end), (page, name)
    included.add(name)
  assert marked and marked == included, ("marked in README, on no page", marked - included)


def _code_lines(code: str) -> list[str]:
  return [line.strip() for line in code.splitlines() if line.strip()]


def test_no_guide_copies_a_readme_code_block():
  """A run of COPY_RUN consecutive lines of a README block is a copy: include it instead."""
  readme_runs = set()
  for info, _, code in fenced_blocks(ROOT / "README.md"):
    if info in ("python", "diff"):
      lines = [line.lstrip("+- ") for line in _code_lines(code)] if info == "diff" else (
          _code_lines(code))
      readme_runs |= {tuple(lines[i:i + COPY_RUN]) for i in range(len(lines) - COPY_RUN + 1)}
  for path in GUIDES:
    for info, line, code in fenced_blocks(path):
      if info != "python":
        continue
      lines = _code_lines(code)
      copied = [run for run in (tuple(lines[i:i + COPY_RUN])
                                for i in range(len(lines) - COPY_RUN + 1)) if run in readme_runs]
      assert not copied, (f"{path.name}:{line} repeats a README block; include the README "
                          f"section instead", copied[0])
