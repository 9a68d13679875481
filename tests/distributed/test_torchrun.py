"""The multi-node launch path on one machine: torchrun starts both ranks of a tp=2 package (c10d
rendezvous on loopback, as across nodes), rank 0 generates, rank 1 serves its steps, and the tokens
equal the tp=1 package's."""

import os
import shutil
import subprocess
import sys

import pytest

from llmc.compiler import compile_model
from llmc.examples_tiny import save_tiny_model
from tests.server.server_helpers import free_port

PROMPT = "5,17,99,3,42,8"


@pytest.mark.slow
def test_torchrun_two_ranks_generate_like_one(tmp_path):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not on PATH")
    model = save_tiny_model("qwen2", tmp_path / "model")
    one = compile_model(model, "cpu", tmp_path / "tp1", quality_tokens=0).out_dir
    two = compile_model(model, "cpu", tmp_path / "tp2", overrides=["shard.tp=2"], quality_tokens=0).out_dir
    want = subprocess.run([sys.executable, str(one), "generate", "--tokens", PROMPT, "--max-tokens", "8"],
                          capture_output=True, text=True, check=True).stdout.strip()
    run = subprocess.run([torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
                          "--rdzv-endpoint", f"127.0.0.1:{free_port()}", str(two / "__main__.py"), "generate",
                          "--tokens", PROMPT, "--max-tokens", "8", "--tp", "2"],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines() == [want]  # printed once: by rank 0 only
