"""The benchmarks still run (their figures are printed, never asserted): the CPU path of
train_throughput.py for a few steps, gpu_packing.py's refusal without a CUDA GPU, search_overhead.py
end to end on a small subset, and cpu_share.py's sampling of a busy process."""

import json
import os
import subprocess
import sys

import pytest

from tune_fixtures import REPO, shared_data_dir


def benchmark(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_train_throughput_times_full_softfine_steps_on_cpu():
    done = benchmark("train_throughput.py", "--dataset", "resume", "--data-dir", str(shared_data_dir()),
                     "--shape", "tiny", "--batch-size", "4", "--steps", "3", "--warmup", "1", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["device"] == "cpu" and figures["augmentation"] is True and figures["steps"] == 3
    assert figures["chars_per_s"] > 0 and figures["peak_memory_MiB"] > 0


def test_train_throughput_profiles_the_step():
    done = benchmark("train_throughput.py", "--dataset", "resume", "--data-dir", str(shared_data_dir()),
                     "--shape", "tiny", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--device", "cpu",
                     "--profile", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["profile_step_ms"] > 0 and len(figures["profile_top"]) == 10
    assert "aten::mm" in figures["profile_top"] or "aten::addmm" in figures["profile_top"]
    table = done.stdout[done.stdout.index("profile of 2 steps"):]
    assert "calls/step" in table and figures["profile_top"][0] in table


def test_gpu_check_runs_every_check_in_its_smoke_run():
    # --smoke: every check at its smallest on the CPU, so the GPU session runs a script that works.
    done = benchmark("gpu_check.py", "--smoke", "--data-dir", str(shared_data_dir()), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert [r["note"] for r in rows] == [""] * len(rows)  # nothing failed or ran out of time
    assert len(rows) == 8 and all(r["figure"] for r in rows)  # the compiled runs left out
    assert "| check | figure | goal | s |" in done.stdout


def test_gpu_packing_says_it_needs_a_cuda_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: run benchmarks/gpu_packing.py itself")
    done = benchmark("gpu_packing.py", "--packing", "1", "--steps", "2")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["gpu_packing: needs a CUDA GPU (torch sees none); CPU figures come "
                                                "from train_throughput.py"]


def test_gpu_check_says_it_needs_a_cuda_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: run benchmarks/gpu_check.py itself")
    done = benchmark("gpu_check.py")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["gpu_check: needs a CUDA GPU (torch sees none); `--smoke` checks the "
                                                "script on a CPU"]


def test_search_overhead_alternates_its_runs_and_prints_the_medians(tmp_path):
    # A quick check that the benchmark runs end to end (the direct run and a one-trial search on
    # Ray of its own, twice); its figures are not asserted. The smallest runs that take every step
    # of both (training, an evaluation on dev, the checkpoint, the test split, the model logged).
    done = benchmark("search_overhead.py", "--data-dir", str(shared_data_dir()), "--epochs", "1", "--limit-train", "32",
                     "--limit-eval", "32", "--ray", "own", "--repeat", "2", "--out", str(tmp_path / "runs"))
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


def test_cpu_share_counts_the_training_process_cpu_over_its_window(tmp_path):
    # sample() on a command that keeps one core busy for 8 s (a 1 s window after 1 s: room for a
    # loaded machine): CPU time in a 1 s window, at most a
    # core-second, all of it the command's own (cpu_share.py's full runs train the tiny encoder; not run here).
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cpu_share
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    busy = [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 8: pass"]
    figures = cpu_share.sample(busy, search=False, settle=1.0, window=1.0, env=dict(os.environ), log=tmp_path / "log")
    assert figures["seconds"] >= 0.95  # the window asked for (no upper bound: a busy machine stretches it)
    assert 0 < figures["training"] <= figures["seconds"] + 0.05  # one thread: at most a core


def test_cpu_share_refuses_an_empty_window(tmp_path):
    done = benchmark("cpu_share.py", "--window", "0", "--out", str(tmp_path / "runs"))
    assert done.returncode == 2 and "--window 0.0: expected a positive number" in done.stderr
    assert not (tmp_path / "runs").exists()
