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


def test_search_overhead_alternates_its_runs_and_prints_the_medians(tmp_path):
    # A quick check that the benchmark runs end to end (the direct run and a one-trial search on
    # Ray of its own, twice); its figures are not asserted.
    done = benchmark("search_overhead.py", "--data-dir", str(shared_data_dir()), "--epochs", "1", "--limit-train", "200",
                     "--ray", "own", "--repeat", "2", "--out", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    rows = [(line[:30].strip(), line[30:].split()) for line in done.stdout.splitlines()
            if line.startswith(("direct", "search"))]
    direct, own = "direct (softfine train)", "search, Ray started by it"
    assert [(name, fields[0]) for name, fields in rows] == [(direct, "1"), (own, "1"), (direct, "2"), (own, "2")]
    assert all(fields[-1] == rows[0][1][-1] for _, fields in rows)  # the same training: the same test F1
    assert all(fields[3] == "%" for name, fields in rows if name == own)  # the overhead, in percent
    medians = [line for line in done.stdout.splitlines() if line.startswith("median of 2:")]
    assert len(medians) == 2 and medians[1].endswith("%")
    for name in ("direct-1", "own-1", "direct-2", "own-2"):
        assert (tmp_path / "runs" / name).is_dir()


def test_search_overhead_refuses_an_impossible_repeat(tmp_path):
    done = benchmark("search_overhead.py", "--repeat", "0", "--out", str(tmp_path / "runs"))
    assert done.returncode == 2 and "--repeat 0: expected 1 or more" in done.stderr
    assert not (tmp_path / "runs").exists()
