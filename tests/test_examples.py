"""The examples run end to end at toy size (each asserts its own checks)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script, expect", [
    ("quickstart.py", "chunk    : max relative error"),
    ("lm_block.py", "equal to a full forward"),
    ("vision.py", "noncausal"),
    ("mqar.py", "recall accuracy"),
])
def test_example_runs_at_toy_size(script, expect, tmp_path):
    run = subprocess.run([sys.executable, str(EXAMPLES / script), "--toy", "--device", "cpu"]
                         if script != "quickstart.py" else
                         [sys.executable, str(EXAMPLES / script), "--toy"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert expect in run.stdout
