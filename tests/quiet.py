"""What a command's output must not hold: lines written by the libraries under it rather than by the
command. One checker for every output test (README "Progress and output": progress and results are
ours; a library's log lines, warnings and notices are hidden where we call it).

``third_party_lines(output)`` returns the offending lines. The ``mlflow run`` launcher is MLflow's
process, not ours, and prints its own lines before and after our command (README: its store set-up,
``=== Running command ... ===``): ``without_launcher(stderr)`` takes them away from its stderr, and
``drop_launcher_lines(output)`` its ``mlflow.projects`` lines from any output.
"""

from __future__ import annotations

import re

_LEVEL = r"(?:DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)"
_DATE = r"\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d(?:[.,]\d+)?"
_NATIVE_SOURCE = r"\S+\.(?:cpp|cc|cu|cuh|c|h|hpp):\d+\]"  # a C++ logger's "file.cpp:56]"

PATTERNS = {
    # warnings.formatwarning: "path.py:12: FutureWarning: ..." (and any "SomethingWarning: ..." line)
    "python warning": r"\b[A-Z]\w*Warning: ",
    "traceback": r"^Traceback \(most recent call last\):|^\s+File \"[^\"]+\", line \d+",
    # MLflow's format: "2026/12/07 16:51:13 INFO mlflow.store.db.utils: Creating initial MLflow database tables..."
    "dated log line": rf"^{_DATE}\s+{_LEVEL}\s+[\w.]+(?:\s*\[[^\]]*\])?:? ",
    # logging.basicConfig's "INFO:alembic.runtime.migration:Context impl ..." / "WARNING:root:..."
    "basicConfig log line": rf"^{_LEVEL}:[\w.]+:",
    # alembic's own "INFO  [alembic.runtime.migration] Running upgrade ..."
    "bracketed logger": rf"^{_LEVEL}\s+\[[\w.]+\] ",
    # "WARNING urllib3.connectionpool: ...", "ERROR optuna.storages: ...": a level, then a dotted logger name
    "named logger": rf"^{_LEVEL}\s+[a-z_]\w*(?:\.\w+)+:? ",
    # Optuna's "[I 2026-12-07 16:51:13,123] Trial 0 finished ..." / "[W ...]"
    "optuna log line": rf"^\[[DIWEC] {_DATE}\]",
    # torch/c10 C++ logs: "[W1207 16:51:13.123456 1234 file.cpp:56] ..." and the older "[W file.cpp:56] ..."
    "torch C++ log line": rf"^\[[DIWEF]\s?\d{{4}} \d\d:\d\d:\d\d|^\[[DIWEF] {_NATIVE_SOURCE}",
    # glog: "E1207 16:51:13.123456  1234 file.cpp:56] ..."
    "glog line": r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ",
    # kineto/the profiler: "ERROR:2026-... DeviceProperties.cpp:56] gpuGetDeviceCount failed", "USDT: ...", "STAGE:..."
    "profiler line": rf"^(?:USDT|STAGE):|^{_LEVEL}:.*{_NATIVE_SOURCE}",
    # What MLflow print()s on registering a model and on ending a run against a server
    "MLflow notice": r"^(?:Successfully registered model '|Registered model '.*' already exists|"
                     r"Created version '\d+' of model '|🏃 View run |🧪 View experiment )",
}
_ANY = re.compile("|".join(f"(?:{p})" for p in PATTERNS.values()))


def third_party_lines(output: str) -> list[str]:
    """Every line of ``output`` (stdout and stderr together) that a library wrote: warnings, log lines
    of other libraries, tracebacks, profiler chatter and MLflow's notices."""
    return [line for line in output.splitlines() if _ANY.search(line)]


def kind_of(line: str) -> str | None:
    """Which of ``PATTERNS`` a line matches (for a readable failure)."""
    return next((name for name, pattern in PATTERNS.items() if re.search(pattern, line)), None)


LAUNCHER_START = re.compile(r"^\S+ \S+ INFO mlflow\.projects\.backend\.local: === Running command .*$", re.M)
LAUNCHER_LINE = re.compile(r"^\S+ \S+ INFO mlflow\.projects(?:\.[\w.]+)?: .*$", re.M)


def without_launcher(stderr: str) -> str:
    """``stderr`` of an ``mlflow run`` without the launcher's own lines: everything up to its
    ``=== Running command ... ===`` line (its store set-up and project lines, printed before our
    process starts) and its later ``INFO mlflow.projects`` lines (``=== Run ... succeeded ===``)."""
    start = LAUNCHER_START.search(stderr)
    assert start, f"no `=== Running command` line: not the output of `mlflow run`?\n{stderr[-2000:]}"
    return drop_launcher_lines(stderr[start.end():])


def drop_launcher_lines(output: str) -> str:
    """``output`` without the launcher's ``INFO mlflow.projects...`` lines."""
    return LAUNCHER_LINE.sub("", output)
