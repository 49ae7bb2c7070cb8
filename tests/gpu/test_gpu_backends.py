"""The GPU backend matrix (tests/gpu/gpu_backends.py) as a test: runs only where CUDA GPUs are present."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs")]


def test_every_backend_trains_matches_ddp_and_resumes(tmp_path):
    script = Path(__file__).with_name("gpu_backends.py")
    gpus = min(torch.cuda.device_count(), 2)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), "--gpus", str(gpus)], capture_output=True, text=True
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
