"""How ``mtnlg`` processes end (``mtnlg.process.exit_process``): what the interpreter's exit
does that anyone can see still happens (a non-daemon thread finishes, ``atexit`` handlers
run, logging and buffered output reach their files and pipes, the exit status is kept),
with the fast exit and with ``MTNLG_FULL_EXIT=1``; and the ``mtnlg`` command's statuses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.e2e

CHILD = textwrap.dedent("""
    import atexit, logging, sys, threading, time
    from mtnlg.process import exit_process

    out = sys.argv[1]
    def late():
        time.sleep(0.3)
        open(out + ".thread", "w").write("joined")
    threading.Thread(target=late).start()              # non-daemon: must be joined
    atexit.register(lambda: open(out + ".atexit", "w").write("ran"))
    log = logging.getLogger("child")
    log.addHandler(logging.FileHandler(out + ".log", delay=True))
    log.warning("logged")
    sys.stdout.write("x" * 200000)                     # more than a pipe's buffer, no newline
    sys.stderr.write("to stderr")
    exit_process(int(sys.argv[2]))
""")


@pytest.mark.parametrize("full", ["0", "1"])
def test_exit_process_does_what_the_interpreter_exit_does(tmp_path, full):
    out = str(tmp_path / "o")
    env = dict(os.environ, MTNLG_FULL_EXIT=full)
    proc = subprocess.run([sys.executable, "-c", CHILD, out, "3"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "x" * 200000 and proc.stderr == "to stderr"
    assert open(out + ".thread").read() == "joined"
    assert open(out + ".atexit").read() == "ran"
    assert open(out + ".log").read() == "logged\n"


def test_the_mtnlg_command_keeps_its_exit_statuses(tmp_path):
    mtnlg = [sys.executable, "-m", "mtnlg.cli", "train", "--recipe", "debug"]
    ok = subprocess.run(mtnlg + ["--print-config"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "model:" in ok.stdout and ok.stdout.endswith("\n"), ok.stderr
    bad = subprocess.run(mtnlg + ["nosuch.key=1", "--print-config"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown key 'nosuch'" in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "mtnlg.cli", "no-such-command"], capture_output=True, text=True,
                           timeout=120)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr  # argparse's SystemExit, unchanged


def test_the_installed_mtnlg_script_is_the_run_entry_point():
    """The console script (pyproject's ``mtnlg = "mtnlg.cli:run"``) prints, and exits with
    the command's status."""
    script = shutil.which("mtnlg", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("no mtnlg script beside this interpreter (the package is not installed)")
    assert "from mtnlg.cli import run" in open(script).read()
    ok = subprocess.run([script, "train", "--recipe", "debug", "--print-config"], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "model:" in ok.stdout, ok.stderr
    bad = subprocess.run([script, "train", "--recipe", "debug", "nosuch.key=1"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "unknown key 'nosuch'" in bad.stderr
