"""The kernel source cache on disk: a second process reuses what the first one wrote."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import logging, sys, torch
logging.basicConfig(level=logging.DEBUG, format="%(name)s %(message)s", stream=sys.stdout)
import linforge
attn = linforge.library.get("retnet")
x = {n: torch.randn(1, 3, 1, 4) for n in ("q", "k", "v")}
attn(**x, form="recurrent")
"""


def run_process(cache: Path) -> str:
    env = dict(os.environ, LINFORGE_CACHE_DIR=str(cache), TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_second_process_reuses_the_disk_cache(tmp_path):
    first = run_process(tmp_path)
    files = sorted(tmp_path.glob("retnet_recurrent_fwd_*.py"))
    assert len(files) == 1 and "kernel source written" in first
    written = files[0].stat().st_mtime_ns
    second = run_process(tmp_path)
    assert "kernel source cache hit" in second and "kernel source written" not in second
    assert sorted(tmp_path.glob("retnet_recurrent_fwd_*.py")) == files
    assert files[0].stat().st_mtime_ns == written
