"""The ``autodac`` command run as users run it (a fresh interpreter per command), shared by the CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    """``python -m autodac.cli ARGS`` in ``cwd``, one thread, importing this checkout (``pythonpath`` first, to hide a package)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "autodac.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def succeeded(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """``done``, after checking it exited 0 (else both streams are shown)."""
    assert done.returncode == 0, f"exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
    return done


def refused(done: subprocess.CompletedProcess, *words: str, code: int | None = None) -> str:
    """The one error line, after checking the exit code (non-zero, or exactly ``code``), that it is alone on stderr,
    starts ``autodac: error:``, names every one of ``words``, and that nothing went to stdout."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 if code is None else done.returncode == code, done.stdout
    assert len(lines) == 1 and lines[0].startswith("autodac: error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert done.stdout == ""
    return lines[0]
