"""Fenced blocks of a MyST Markdown page, for tests/docs (not a test module)."""

import pathlib


def fenced_blocks(path: pathlib.Path) -> list[tuple[str, int, str]]:
  """(info string, line number, code) of every fenced block of a page.

  A line-by-line reader, not a regular expression: a MyST directive fence
  (```{include} ...) must not be read as the start of a code block.
  """
  out, info, start, body, fence = [], None, 0, [], ""
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
    stripped = line.strip()
    if info is None:
      if stripped.startswith("```"):
        fence = stripped[:len(stripped) - len(stripped.lstrip("`"))]
        info, start, body = stripped[len(fence):].strip(), number, []
    elif stripped == fence:
      out.append((info, start, "\n".join(body) + "\n"))
      info = None
    else:
      body.append(line)
  assert info is None, f"{path}: block opened at line {start} is never closed"
  return out
