"""The ``autodac`` command as the tests run it, shared by the CLI tests.

Most runs call ``autodac.cli.main`` in this process (its own working folder, one thread, both
streams captured): a fresh interpreter costs about 2.7 s of ``import torch`` per command, which
was a third of the suite. ``fresh=True`` (and any ``pythonpath``, which only a new interpreter
can honour) runs ``python -m autodac.cli`` in a new process, as users run it;
``test_cli.py::test_the_command_runs_in_a_fresh_interpreter`` keeps that path covered.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, pythonpath: str | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """``autodac ARGS`` in ``cwd`` on one thread: in this process, or in a fresh one (``fresh``, or ``pythonpath`` first
    on the import path, to hide a package)."""
    if fresh or pythonpath is not None:
        return _run_fresh(args, cwd, pythonpath)
    return _run_here(args, cwd)


def _run_fresh(args: tuple[str, ...], cwd: Path, pythonpath: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "autodac.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _run_here(args: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess:
    """``autodac.cli.main(args)`` with ``cwd`` as the working folder and stdout/stderr captured; everything restored after."""
    from autodac.cli import main

    out, err = io.StringIO(), io.StringIO()
    folder, threads = os.getcwd(), torch.get_num_threads()
    os.chdir(cwd)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as leaving:  # --help, or argparse leaving on its own
                code = leaving.code if isinstance(leaving.code, int) else int(leaving.code is not None)
    finally:
        os.chdir(folder)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["autodac", *args], code, out.getvalue(), err.getvalue())


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
