"""Run one ``python -m pipeline`` command in this process, then print its peak memory as JSON.

``bench``'s memory section starts a ``tune`` worker through this module: the figures are the
worker's own (``/proc/self/status``), not the bench process's.
"""

from __future__ import annotations

import json
import sys

from ..train.host_memory import memory_figures


def main(argv: list[str]) -> int:
    from . import main as cli_main

    code = cli_main(argv)
    print("RSS_PROBE " + json.dumps(memory_figures()), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
