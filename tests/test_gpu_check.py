"""benchmarks/gpu_check.sh, the one-shot GPU check, as a dry run on this CPU: every stage runs
at tiny sizes and the summary holds each stage's figures."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

import pytest
from faults import FAST_COMPILE

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path: pathlib.Path) -> None:
    # Every stage running and reporting is the subject, not its figures: XLA compiles for speed
    # of compiling (faults.FAST_COMPILE), on one CPU device.
    env = {**os.environ, "OUT": str(tmp_path / "out"), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = " ".join(FAST_COMPILE)
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error:" not in proc.stdout, proc.stdout
    summary = (tmp_path / "out" / "summary.md").read_text()
    # The dry run benchmarks test_eca_resnet (the registry's test model), beside its PyTorch twin.
    row = r"\| test_eca_resnet \| 32 \| eca_flax \| 438,478 \|.*\| [\d.]+ \| [\d.]+ \|"
    assert re.search(row, summary)
    torch_row = r"\| test_eca_resnet \| 32 \| PyTorch, channels_last, autocast bf16 \|"
    assert re.search(torch_row, summary)
    for kind in ("train", "eval"):
        row = rf"\| {kind} \| this revision \| [\d.]+ \| [\d.]+ \| 150,5\d\d \|"
        assert re.search(row, summary)
    assert re.search(r"final step=4 top1=[\d.]+ top5=[\d.]+ images=16", summary)
    assert (tmp_path / "out" / "gpu_check.log").read_text().startswith("\n=== device and versions")
