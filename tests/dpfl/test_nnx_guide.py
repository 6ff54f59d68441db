"""docs/guides/flax_nnx.md runs: its ```python blocks, top to bottom, in one namespace.

The docs site's own harness runs every guide; this one runs the NNX page on
its own, so the page is tested where it is written. It costs ~30 s of CPU
(accounting, and a compile per clipping method), so it is slow; the README's
NNX diff (tests/test_readme.py) is its fast subset in the default suite.
"""

import pathlib
import re

import pytest

GUIDE = pathlib.Path(__file__).resolve().parents[2] / "docs" / "guides" / "flax_nnx.md"


@pytest.mark.slow
def test_flax_nnx_guide_runs(capsys):
  text = GUIDE.read_text(encoding="utf-8")
  blocks = [(text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)]
  assert len(blocks) >= 6
  namespace = {"__name__": "__guide__"}
  for line, code in blocks:
    exec(compile(code, f"{GUIDE.name} (block at line {line})", "exec"), namespace)
  out = capsys.readouterr().out
  assert "BatchStat" in out and "LayerNorm" in out  # the refusal was printed, with the remedy
  assert namespace["private"].epsilon() > 0
