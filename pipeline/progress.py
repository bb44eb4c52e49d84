"""How a long step shows it is alive: bars on a terminal, plain lines anywhere else, nothing with --quiet.

One process-wide mode, set once by the CLI (``configure``):

- ``bars``: stderr is a terminal and progress is on; tqdm bars for epochs and batches, and a line per
  finished trial and per phase (written above the bars);
- ``lines``: a log file, CI, a pipe, or ``--no-progress``; one plain line per finished epoch, trial and
  phase, and a line every few seconds from a long loop over images;
- ``quiet``: ``--quiet``; nothing but errors and the final summary.

Everything here writes to **stderr**: stdout keeps what a command produces (the summary, the
decision, the JSON line), so ``python -m pipeline tune > summary.txt`` still shows progress.
Library callers that never call ``configure`` get ``bars`` on a terminal and ``lines`` elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from . import metrics as M

BARS, LINES, QUIET = "bars", "lines", "quiet"
LINE_EVERY_SECONDS = 10.0  # a loop over images says where it is at most this often (lines mode)

_mode: str | None = None
_lock = threading.Lock()  # trial threads (n_jobs > 1) write whole lines


def configure(no_progress: bool = False, quiet: bool = False) -> str:
    """Set the process's mode from the two flags; returns it."""
    global _mode
    _mode = QUIET if quiet else LINES if no_progress else None  # None: decided per call from the terminal
    if quiet:
        # MLflow's own INFO lines ("Creating initial MLflow database tables...") are progress too: the
        # environment variable covers an mlflow imported later, the level one imported already.
        os.environ["MLFLOW_LOGGING_LEVEL"] = "WARNING"
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    return mode()


def mode() -> str:
    if _mode is not None:
        return _mode
    return BARS if _isatty() else LINES


def _isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def say(text: str) -> None:
    """One progress line on stderr (above any live bar), unless quiet."""
    current = mode()
    if current == QUIET:
        return
    with _lock:
        if current == BARS:
            from tqdm.auto import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)


# What MLflow print()s to stderr (not a log line) when it registers a model: the registration phase and
# the summary say the same in the session's words, so hushed() drops these lines.
MLFLOW_REGISTRY_NOTICES = ("Successfully registered model '", "Registered model '", "Created version '")


class _Without:
    """A stderr stand-in that drops whole lines starting with ``prefixes`` and passes everything else
    through as it is written (a live bar's carriage returns included)."""

    def __init__(self, stream, prefixes: tuple[str, ...]):
        self.stream, self.prefixes, self.dropping = stream, prefixes, False

    def write(self, text: str) -> int:
        if text.startswith(self.prefixes):  # print() writes the message, then its "\n"
            self.dropping = not text.endswith("\n")
        elif self.dropping and text.startswith("\n"):
            self.dropping = False
            self.stream.write(text[1:])
        else:
            self.dropping = False
            self.stream.write(text)
        return len(text)

    def __getattr__(self, name: str):  # flush, isatty, fileno, encoding...
        return getattr(self.stream, name)


def hushed():
    """A block whose libraries print progress straight to stderr: MLflow's "Successfully registered
    model ..." / "Created version ..." lines are dropped, and with --quiet nothing at all is printed
    there; errors still propagate as exceptions."""
    if mode() != QUIET:
        return contextlib.redirect_stderr(_Without(sys.stderr, MLFLOW_REGISTRY_NOTICES))
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
    return stack


def duration(seconds: float) -> str:
    """12s, 3m41s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


class EpochLines:
    """A ``fit`` report listener: in lines mode, a line per epoch with an evaluation, and otherwise one
    at most every ``LINE_EVERY_SECONDS``: ``cnn_v1 #3 epoch 2/4 val 71.2% best 71.2% 53 img/s``
    (``epochs`` 0: the run's length is a deadline; on a terminal fit's bar shows the same)."""

    def __init__(self, label: str, epochs: int, clock: Callable[[], float] = time.monotonic):
        self.label, self.epochs, self.clock = label, epochs, clock
        self.best: float | None = None
        self.last = clock()

    def __call__(self, epoch: int, values: dict[str, float]) -> None:
        val = values.get(M.VAL_ACCURACY)
        if val is not None and (self.best is None or val > self.best):
            self.best = val
        if mode() != LINES or (val is None and self.clock() - self.last < LINE_EVERY_SECONDS):
            return
        self.last = self.clock()
        rate = values.get(M.EPOCH_IMAGES_PER_SECOND)
        loss = values.get(M.TRAIN_LOSS)
        say(f"{self.label} epoch {epoch}" + (f"/{self.epochs}" if self.epochs else "")
            + (f" loss {loss:.3f}" if loss is not None else "") + f" val {pct(val)} best {pct(self.best)}"
            + (f" lr {values[M.LR]:.2g}" if M.LR in values else "")
            + (f" {rate:.0f} img/s" if rate is not None else ""))


class Counter:
    """Progress of a loop over many items: a tqdm bar in bars mode (when the caller allows bars), a
    line at most every ``every`` seconds in lines mode, nothing when quiet. Use as a context manager
    and call ``update(n)``. ``clock`` is injectable for tests."""

    def __init__(self, total: int, desc: str, unit: str = "img", bars: bool = True, leave: bool = True,
                 every: float = LINE_EVERY_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit, self.every, self.clock = total, desc, unit, every, clock
        self.done = 0
        self.lines = 0
        current = mode()
        self.bar = None
        if current == BARS and bars:
            from tqdm.auto import tqdm

            # delay: a step done within a second never flashes a bar
            self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, leave=leave,
                            delay=1.0)
        self.active = current == LINES
        self.start = self.last = clock()

    def __enter__(self) -> Counter:
        return self

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.active and self.clock() - self.last >= self.every and self.done < self.total:
            self.last = self.clock()
            elapsed = self.last - self.start
            rate = self.done / elapsed if elapsed > 0 else 0.0
            left = (self.total - self.done) / rate if rate > 0 else 0.0
            share = 100 * self.done / self.total if self.total else 100.0
            say(f"{self.desc}: {self.done}/{self.total} {self.unit} ({share:.0f}%), {rate:.0f} {self.unit}/s, "
                f"~{duration(left)} left")
            self.lines += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.active and self.lines and exc_type is None:
            # Whoever saw "n/total" lines learns the step ended; a quick step stays silent.
            say(f"{self.desc}: {self.done}/{self.total} {self.unit} in {duration(self.clock() - self.start)}")
