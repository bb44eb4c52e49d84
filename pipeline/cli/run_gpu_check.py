"""``python -m pipeline.cli.run_gpu_check`` (``make gpu-check``): run the GPU check, print its table and
write ``gpu-check.json``; exit 1 when a step failed. See ``pipeline/bench/gpu_check.py``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from ..bench.gpu_check import check_settings, format_table, quiet_libraries, run_gpu_check, write_json


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="make gpu-check", description=__doc__)
    parser.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (cpu: toy size)")
    parser.add_argument("--out", default="gpu-check.json", help="the JSON file written")
    parser.add_argument("--workdir", default="gpu-check", help="stores, cache, logs and data of the check "
                                                               "(emptied first)")
    parser.add_argument("--data", default=None, help="a dataset to tune and predict on (default: synthetic)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    if Path.cwd().resolve().is_relative_to(workdir.resolve()):
        parser.error(f"--workdir {args.workdir} holds the current directory and is emptied first: name a folder "
                     "of its own")
    quiet_libraries()
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh store each time: the registered version is this run's
    out = run_gpu_check(check_settings(args.device, args.data), workdir, lambda line: print(line, flush=True))
    write_json(out, Path(args.out))
    print(format_table(out))
    print(f"wrote {args.out}")
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
