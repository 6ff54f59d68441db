"""The documentation site builds strictly: the README's command, as CI runs it.

``sphinx-build -W --keep-going -n``: any warning fails the build, including a
broken internal reference (``-n``), a page left out of every toctree, a
README section whose ``<!-- docs:NAME:start -->`` marker is gone, and a
docstring whose reST does not parse. It builds into a temporary folder
(about 8 s on 2 loaded cores, fresh, so every page and docstring is read).
"""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
README_COMMAND = "sphinx-build -W --keep-going -n -b html docs docs/_build/html"


def test_the_readme_states_the_build_command_this_test_runs():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert README_COMMAND in readme
  assert "docs/_build/" in (ROOT / ".gitignore").read_text(encoding="utf-8").split()


def test_the_site_builds_strictly(tmp_path):
  argv = README_COMMAND.split()
  out = tmp_path / "html"
  argv = argv[1:-1] + [str(out)]  # same flags and sources, a temporary output folder
  done = subprocess.run([sys.executable, "-m", "sphinx", *argv, "-q", "-E"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert not re.search(r"WARNING|ERROR|CRITICAL", done.stderr), done.stderr
  pages = {p.relative_to(out).as_posix() for p in out.rglob("*.html")}
  expected = {"index.html", "checks.html", "api/dpfl.html", "api/accounting.html",
              "api/mf.html", "api/audit.html", "api/nnx.html", "scaling_study/REPORT.html", "user_level_study.html"}
  expected |= {f"guides/{p.stem}.html" for p in (ROOT / "docs" / "guides").glob("*.md")}
  assert expected <= pages, expected - pages
  # Every public name is on its package's page, under the package's own name.
  import accounting
  import dpfl
  import dpfl.audit
  import dpfl.mf
  import dpfl.nnx
  for package, page in ((dpfl, "dpfl"), (accounting, "accounting"), (dpfl.mf, "mf"),
                        (dpfl.audit, "audit"), (dpfl.nnx, "nnx")):
    html = (out / "api" / f"{page}.html").read_text(encoding="utf-8")
    missing = [name for name in package.__all__
               if f'id="{package.__name__}.{name}"' not in html]
    assert not missing, (page, missing)
