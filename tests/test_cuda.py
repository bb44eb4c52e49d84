"""No host sync inside a training or evaluation step on CUDA: one real step of each member under
``torch.cuda.set_sync_debug_mode("error")`` (any ``.item()``, host copy or data-dependent shape
raises), the same function ``make gpu-check`` runs. The CUDA test is skipped without CUDA; the CPU
one runs the function's body (the CPU-side equivalents of the sync-free paths are in test_bench.py
and test_augment_color.py)."""

from __future__ import annotations

import pytest
import torch

from pipeline.bench.step_speed import step_bench, sync_debug_step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["geometric", "color", "shift"])
@pytest.mark.parametrize("arch", ["cnn_v1", "cnn_v2"])
def test_a_training_and_an_evaluation_step_never_wait_for_the_host(arch: str, policy: str) -> None:
    bench = step_bench(arch, policy, 64, 100, torch.device("cuda"), "bf16")
    assert sync_debug_step(bench) == "passed"


def test_the_sync_check_runs_its_steps_on_the_cpu_and_says_it_checked_nothing() -> None:
    bench = step_bench("cnn_v1", "color", 4, 32, torch.device("cpu"), "fp32")
    before = [p.detach().clone() for p in bench.step.model.parameters()]
    assert sync_debug_step(bench).startswith("not checked")
    assert any(not torch.equal(a, b) for a, b in zip(before, bench.step.model.parameters(), strict=True))
