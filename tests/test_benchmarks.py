"""The benchmarks still run (their figures are printed, never asserted): the CPU path of
train_throughput.py for a few steps, and gpu_packing.py's refusal without a CUDA GPU."""

import json
import subprocess
import sys

import pytest

from tune_fixtures import REPO, shared_data_dir


def benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=300, check=False)


def test_train_throughput_times_full_softfine_steps_on_cpu():
    done = benchmark("train_throughput.py", "--dataset", "resume", "--data-dir", str(shared_data_dir()),
                     "--shape", "tiny", "--batch-size", "4", "--steps", "3", "--warmup", "1", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["device"] == "cpu" and figures["augmentation"] is True and figures["steps"] == 3
    assert figures["chars_per_s"] > 0 and figures["peak_memory_MiB"] > 0


def test_gpu_packing_says_it_needs_a_cuda_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: run benchmarks/gpu_packing.py itself")
    done = benchmark("gpu_packing.py", "--packing", "1", "--steps", "2")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["gpu_packing: needs a CUDA GPU (torch sees none); CPU figures come "
                                                "from train_throughput.py"]
