"""Small images end to end: ``tune`` on an 8-px ImageFolder dataset, as a new user ran it (issue 30).

Every architecture's own 8-px training step is in ``tests/test_models.py``; this is the session around
them: the speed probe, the plan, a final run and the registration on 8-px images.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import make_imagefolder_dataset, run_cli, seed_store


@pytest.mark.slow
def test_a_budgeted_tune_on_8_px_images_measures_plans_and_registers(tmp_path: Path, mlflow_template: Path) -> None:
    """The cpu preset on ten classes of 8x8 PNGs, in a 20-second budget (the user's was 2 minutes). cnn_v2
    is the first member so that its speed is always measured (a second member is probed only when the
    budget could pay for a pair); its probe used to end the session with "Output size is too small"."""
    workdir = tmp_path / "work"
    seed_store(mlflow_template, workdir)
    data = make_imagefolder_dataset(tmp_path / "tiny8", classes=tuple(f"class{i}" for i in range(10)), size=8,
                                    counts={"train": 8, "validation": 6}, test=None)
    proc = run_cli(["tune", "--config", "cpu", "--data", str(data), "--members", "cnn_v2,cnn_v1",
                    "--time-budget", "20s", "--tail-seconds", "5", "--audit-min-per-class", "2",
                    "--storage", f"sqlite:///{workdir / 'optuna.db'}", "--no-progress"], workdir, timeout=300)
    out = proc.stdout + proc.stderr
    assert re.search(r"speed of cnn_v2: \d+ training images/s", out), out[-3000:]
    assert "plan for a 0.3-minute budget" in out  # 20 s
    assert re.search(r"cnn_v[12] #\d+ final COMPLETE", out), out[-3000:]
    assert "registered as version 1" in out
