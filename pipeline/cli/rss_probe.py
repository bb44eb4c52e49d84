"""Run one ``python -m pipeline`` command in this process, then print its peak memory as JSON.

``bench``'s memory section starts a ``tune`` worker through this module: the figures are the
worker's own (``/proc/self/status``), not the bench process's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def memory_figures() -> dict[str, int]:
    """Peak resident set (VmHWM) and, now, the anonymous and file-backed (shared, e.g. the
    memory-mapped decode cache) parts of it, in bytes."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def main(argv: list[str]) -> int:
    from . import main as cli_main

    code = cli_main(argv)
    print("RSS_PROBE " + json.dumps(memory_figures()), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
