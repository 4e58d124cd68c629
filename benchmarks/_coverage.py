"""Shared by the coverage surveys (``zoo_coverage.py``, ``coverage_zoo.py``): one model per subprocess,
results in a JSON-lines file that an interrupted run resumes from, and the common command line."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def add_survey_args(parser: argparse.ArgumentParser, timeout: float, memory_gb: float) -> None:
    """The options every survey takes (``--child`` runs one model in the current process)."""
    parser.add_argument("models", nargs="*", help="model names (default: every one)")
    parser.add_argument("--jsonl", type=Path, help="results file, one JSON object per model")
    parser.add_argument("--out", type=Path, help="write the markdown page here (default stdout)")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per model")
    parser.add_argument("--memory-gb", type=float, default=memory_gb, help="address space per model")
    parser.add_argument("--rerun", action="store_true", help="run models already in --jsonl")
    parser.add_argument("--no-run", action="store_true", help="only render --jsonl")
    parser.add_argument("--child", help=argparse.SUPPRESS)


def run_isolated(script: str, name: str, timeout: float, args: Iterable[str]) -> dict:
    """``script --child name *args`` in a fresh interpreter: the last JSON line it prints.

    A run that times out or dies (signal, non-zero exit, no JSON line) gives ``status: error`` with
    ``stage`` ``timeout`` or ``crash``.
    """
    cmd = [sys.executable, script, "--child", name, *args]
    start = time.perf_counter()
    failed = {"model": name, "status": "error"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return failed | {"stage": "timeout", "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        seconds = round(time.perf_counter() - start, 1)
        error = f"exit code {done.returncode}: {done.stderr[-500:]}"
        return failed | {"stage": "crash", "error": error, "seconds": seconds}
    return json.loads(lines[-1])


def load_jsonl(path: Path | None) -> dict[str, dict]:
    """Model name → its last record in ``path`` (empty if there is no file)."""
    records: dict[str, dict] = {}
    if path and path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["model"]] = record
    return records


def survey(
    names: Iterable[str],
    records: dict[str, dict],
    run: Callable[[str], dict],
    jsonl: Path | None,
    rerun: bool,
) -> None:
    """Run every model not yet in ``records`` (all with ``rerun``), one at a time, appending to ``jsonl``."""
    for name in names:
        if name in records and not rerun:
            continue
        record = run(name)
        records[name] = record
        error = record.get("error", "")[:200]
        print(f"{name}: {record['status']} {record.get('seconds')} s {error}", file=sys.stderr)
        if jsonl:
            with jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")


def write_page(page: str, out: Path | None) -> None:
    """Write the markdown page to ``out``, or to stdout."""
    if out:
        out.write_text(page)
    else:
        sys.stdout.write(page)


def first_line(text: str, limit: int = 160) -> str:
    """The first line of ``text``, at most ``limit`` characters."""
    return (text.splitlines() or [""])[0][:limit]


def run_forked(target: Callable[[str], dict], name: str, timeout: float) -> dict:
    """``target(name)`` in a forked copy of this process (libraries imported once, before forking).

    Like :func:`run_isolated`, a timeout or a dead child gives ``status: error`` with ``stage``
    ``timeout`` or ``crash``.
    """
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=lambda: sender.send(target(name)), daemon=True)
    start = time.perf_counter()
    child.start()
    sender.close()
    failed = {"model": name, "status": "error"}
    try:
        if not receiver.poll(timeout):
            return failed | {"stage": "timeout", "error": f"timed out after {timeout:.0f} s"}
        return receiver.recv()
    except EOFError:
        child.join()
        seconds = round(time.perf_counter() - start, 1)
        return failed | {"stage": "crash", "error": f"exit code {child.exitcode}", "seconds": seconds}
    finally:
        child.kill()
        child.join()
