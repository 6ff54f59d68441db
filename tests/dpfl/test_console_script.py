"""The console script (dpfl.cli): light start-up and the plug-in command protocol."""

import json
import subprocess
import sys
import textwrap

from dpfl import cli


def test_epsilon_through_console_entry_never_imports_jax():
  probe = ("import sys\nfrom dpfl import cli\n"
           "assert cli.main(['epsilon', '--noise-multiplier', '1', '--sampling-prob', '0.1', "
           "'--steps', '10', '--delta', '1e-5']) == 0\n"
           "try:\n  cli.main(['--help'])\nexcept SystemExit:\n  pass\n"
           "assert 'jax' not in sys.modules, 'jax imported'")
  subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)


def test_plugged_in_command(tmp_path, monkeypatch, capsys):
  (tmp_path / "fake_cmd.py").write_text(textwrap.dedent('''
      def add_arguments(p):
          p.add_argument("--size", type=int, required=True)
      def run(args):
          if args.size < 1:
              raise ValueError(f"--size must be an integer >= 1, got {args.size}")
          return {"double": 2 * args.size}
      def format_table(result):
          return f"double: {result['double']}"
  '''))
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setitem(cli.COMMANDS, "fake", ("a test command", "fake_cmd"))
  assert cli.main(["fake", "--size", "3", "--json"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"double": 6}
  assert cli.main(["fake", "--size", "3"]) == 0
  assert capsys.readouterr().out.strip() == "double: 6"
  assert cli.main(["fake", "--size", "0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--size" in err[0]
  assert cli.main(["fake", "--bogus"]) == 2
