"""The benchmarks still run (their figures are printed, never asserted): the CPU path of
train_throughput.py for a few steps, search_overhead.py end to end on a small subset,
cpu_share.py's sampling of a busy process, and value_paths.py's paths of the training config.
And they refuse bad flags, missing data and a missing GPU as the softfine command does: one line
`SCRIPT: error: ...`, exit status 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest
from tune_fixtures import REPO, shared_data_dir


def benchmark(
    name: str, *args: str, timeout: float = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def test_train_throughput_times_full_softfine_steps_on_cpu():
    done = benchmark(
        "train_throughput.py",
        "--dataset",
        "resume",
        "--data-dir",
        str(shared_data_dir()),
        "--shape",
        "tiny",
        "--batch-size",
        "4",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["device"] == "cpu" and figures["augmentation"] is True and figures["steps"] == 3
    assert figures["chars_per_s"] > 0 and figures["peak_memory_MiB"] > 0


def test_train_throughput_profiles_the_step():
    done = benchmark(
        "train_throughput.py",
        "--dataset",
        "resume",
        "--data-dir",
        str(shared_data_dir()),
        "--shape",
        "tiny",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--profile",
        "2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["profile_step_ms"] > 0 and len(figures["profile_top"]) == 10
    assert "aten::mm" in figures["profile_top"] or "aten::addmm" in figures["profile_top"]
    table = done.stdout[done.stdout.index("profile of 2 steps") :]
    assert "calls/step" in table and figures["profile_top"][0] in table


def test_gpu_check_runs_the_checks_of_parts_2_and_3_in_its_smoke_run(tmp_path):
    # --smoke: every check at its smallest on the CPU, so the GPU session runs a script that works.
    # Part 1's checks run in test_gpu_session_prepares_its_folder_and_runs_a_part_from_it.
    log, table = tmp_path / "checks.log", tmp_path / "table.json"
    done = benchmark(
        "gpu_check.py",
        *("--smoke", "--part", "2", "3", "--data-dir", str(shared_data_dir())),
        *("--log", str(log), "--json", str(table)),
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert json.loads(table.read_text())["rows"] == rows
    assert [r["note"] for r in rows] == [""] * len(rows)  # nothing failed or ran out of time
    assert len(rows) == 7 and all(r["figure"] for r in rows)  # the compiled runs left out
    profiled = [r for r in rows if "profiled" in r["check"]]  # cuDNN's attention asked for: what ran
    assert len(profiled) == 1 and "no GPU kernels, attention " in profiled[0]["figure"]
    assert "| check | figure | goal | s |" in done.stdout
    # every check is a child, its output kept whole: the profile's table too
    children = log.read_text()
    assert children.count("===== exit 0 after ") == 7 and "----- stderr" in children
    assert "profile of 1 steps" in children


def test_gpu_check_runs_no_check_past_its_budget():
    done = benchmark(
        "gpu_check.py", "--smoke", "--part", "1", "--budget", "1", "--data-dir", str(shared_data_dir())
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert [r["check"] for r in rows][:1] == ["toolchain"] and len(rows) == 4
    assert all(r["note"] == "not run: the call's --budget was spent" for r in rows[1:])


def test_gpu_check_stops_a_check_at_its_limit_and_keeps_what_it_wrote(tmp_path):
    log = tmp_path / "checks.log"
    done = benchmark(
        "gpu_check.py",
        *(
            "--smoke",
            "--part",
            "1",
            "--limit",
            "0.5",
            "--log",
            str(log),
            "--data-dir",
            str(shared_data_dir()),
        ),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    assert [r["note"] for r in rows[1:]] == ["stopped after 0.5 s"] * 3  # python and torch take longer
    assert log.read_text().count("===== exit none: stopped after ") == 3


def test_gpu_session_prepares_its_folder_and_runs_a_part_from_it(tmp_path):
    # What the GPU machine gets: the project at HEAD (committed code: in a working checkout, the last
    # commit's), the data and the wheels, and part 1 of gpu_check.py run from them, at its smallest
    shared = shared_data_dir().parent
    prepared = tmp_path / "gpu"
    made = benchmark(
        "gpu_session.py",
        *("prepare", "--to", str(prepared), "--data-dir", str(shared / "data")),
        *("--wheels", str(shared / "gpu-wheels")),
    )
    assert made.returncode == 0, made.stderr[-3000:]
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert (prepared / "COMMIT").read_text().strip() == head.stdout.strip()
    assert (prepared / "project" / "softfine" / "train.py").is_file() and not (
        prepared / "project" / ".git"
    ).exists()
    assert sorted(p.name for p in (prepared / "data").iterdir()) == ["resume", "weibo"]
    assert len(list((prepared / "wheels").glob("*.whl"))) == len(list((shared / "gpu-wheels").glob("*.whl")))
    assert f"python3 {prepared}/project/benchmarks/gpu_session.py run 1" in made.stdout
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(prepared / "project" / "benchmarks" / "gpu_session.py"), "run", "1", "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OUT": str(out), "SOFTFINE_DATA_DIR": "/nonexistent-data"},  # the folder's data
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"part 1 of gpu_check.py at commit {head.stdout.strip()}" in done.stdout
    rows = json.loads((out / "part1.json").read_text())["rows"]
    assert len(rows) == 4 and [r["note"] for r in rows] == [""] * 4 and all(r["figure"] for r in rows)
    assert rows[0]["check"] == "toolchain" and "seqeval 1.2.2" in rows[0]["figure"]
    profiled = [r for r in rows if "profiled" in r["check"]]
    assert len(profiled) == 2 and all("no GPU kernels, attention " in r["figure"] for r in profiled)
    fused = next(r["figure"] for r in rows if "fused members" in r["check"])
    assert "x one trial; 36-point grid's training computed: " in fused
    assert (out / "part1.log").read_text().count("===== exit 0 after ") == 3


def test_train_throughput_model_tiny_measures_the_tiny_encoder():
    # --model tiny is the tiny encoder of softfine train (1.3 M parameters at Resume's vocabulary),
    # not a random encoder of bert-base's shape (about 100 M)
    done = benchmark(
        "train_throughput.py",
        "--dataset",
        "resume",
        "--data-dir",
        str(shared_data_dir()),
        "--model",
        "tiny",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["model"] == "tiny" and figures["parameters_M"] < 5


def test_search_overhead_alternates_its_runs_and_prints_the_medians(tmp_path):
    # A quick check that the benchmark runs end to end (the direct run and a one-trial search on
    # Ray of its own, twice); its figures are not asserted. The smallest runs that take every step
    # of both (training, an evaluation on dev, the checkpoint, the test split, the model logged).
    done = benchmark(
        "search_overhead.py",
        "--data-dir",
        str(shared_data_dir()),
        "--epochs",
        "1",
        "--limit-train",
        "32",
        "--limit-eval",
        "32",
        "--ray",
        "own",
        "--repeat",
        "2",
        "--out",
        str(tmp_path / "runs"),
        timeout=600,
    )  # 75 s alone on 2 cores; the other test worker may double it
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    rows = [
        (line[:30].strip(), line[30:].split())
        for line in done.stdout.splitlines()
        if line.startswith(("direct", "search"))
    ]
    direct, own = "direct (softfine train)", "search, Ray started by it"
    assert [(name, fields[0]) for name, fields in rows] == [
        (direct, "1"),
        (own, "1"),
        (direct, "2"),
        (own, "2"),
    ]
    assert all(fields[-1] == rows[0][1][-1] for _, fields in rows)  # the same training: the same test F1
    assert all(fields[3] == "%" for name, fields in rows if name == own)  # the overhead, in percent
    medians = [line for line in done.stdout.splitlines() if line.startswith("median of 2:")]
    assert len(medians) == 2 and medians[1].endswith("%")
    for name in ("direct-1", "own-1", "direct-2", "own-2"):
        assert (tmp_path / "runs" / name).is_dir()


def test_cpu_share_counts_the_training_process_cpu_over_its_window(tmp_path):
    # sample() on a command that keeps one core busy for 8 s (a 1 s window after 1 s: room for a
    # loaded machine): CPU time in a 1 s window, at most a core-second, all of it the command's own
    # (cpu_share.py's full runs train the tiny encoder; not run here).
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import cpu_share
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    busy = [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 8: pass"]
    figures = cpu_share.sample(
        busy, search=False, settle=1.0, window=1.0, env=dict(os.environ), log=tmp_path / "log"
    )
    assert figures["seconds"] >= 0.95  # the window asked for (no upper bound: a busy machine stretches it)
    assert 0 < figures["training"] <= figures["seconds"] + 0.05  # one thread: at most a core


# Refusals, before anything trains or any folder is made. A flag argparse refuses has its usage
# above the error line, as the softfine command's; every other refusal is the one line alone.
def test_value_paths_reads_and_traces_the_training_config():
    done = benchmark("value_paths.py", "--no-search", "--show", "--data-dir", str(shared_data_dir()))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    figures = [line for line in lines if " visits to " in line]
    assert [line.split(": ", 1)[1].rsplit(": ", 1)[0] for line in figures] == [
        "read: config from softfine/train.py:train",
        "read: args from tune/search.py:main",
        "read: config and its fields from softfine/train.py:train",
        "read: args and its fields from tune/search.py:main",
        "run: config through train()",
    ]
    # each path's functions in order: the config goes from train() to train_group() in every way
    paths = [line.strip() for line in lines if line.startswith("  ")]
    assert len(paths) == 5 and all(
        p.startswith("softfine/train.py:train > softfine/train.py:train_group") for p in paths[0::2]
    )
    assert paths[1].startswith("tune/search.py:main > ") and paths[3].startswith("tune/search.py:main > ")
    # a field passed on is followed: resolve_device(config.device)
    assert "softfine/device.py:resolve_device" in paths[2] and "device.py" not in paths[0]


OUT, NO_DATA = "OUT", "/nonexistent-data"
NO_GPU = "--device cuda: torch sees no CUDA device"
MISSING = f"missing data file(s) for 'resume': {NO_DATA}/resume/train.char.bmes"
REFUSALS = [
    ("train_throughput.py", "steps-0", ["--steps", "0"], "argument --steps: expected 1 or more (got 0)"),
    (
        "train_throughput.py",
        "batch-size-0",
        ["--batch-size", "0"],
        "argument --batch-size: expected 1 or more (got 0)",
    ),
    ("train_throughput.py", "fuse-0", ["--fuse", "0"], "argument --fuse: expected 1 or more (got 0)"),
    (
        "train_throughput.py",
        "pad-multiple-negative",
        ["--pad-multiple", "-5"],
        "argument --pad-multiple: expected 0 to 512 (got -5)",
    ),
    (
        "train_throughput.py",
        "warmup-negative",
        ["--warmup", "-1"],
        "argument --warmup: expected 0 or more (got -1)",
    ),
    (
        "train_throughput.py",
        "steps-not-a-number",
        ["--steps", "many"],
        "argument --steps: expected an integer (got 'many')",
    ),
    ("train_throughput.py", "no-gpu", ["--device", "cuda"], NO_GPU),
    (
        "train_throughput.py",
        "device-foo",
        ["--device", "foo"],
        "--device: expected auto, cpu, cuda or cuda:N (got 'foo')",
    ),
    ("train_throughput.py", "no-data", ["--data-dir", NO_DATA], MISSING),
    ("train_throughput.py", "unknown-dataset", ["--dataset", "nope"], "--dataset: unknown dataset 'nope'"),
    ("fused_grid.py", "fuse-0", ["--fuse", "1", "0"], "argument --fuse: expected 1 or more (got 0)"),
    ("fused_grid.py", "points-37", ["--points", "37"], "argument --points: expected 1 to 36 (got 37)"),
    (
        "fused_grid.py",
        "batch-size-0",
        ["--batch-size", "0"],
        "argument --batch-size: expected 1 or more (got 0)",
    ),
    ("fused_grid.py", "no-gpu", ["--device", "cuda"], NO_GPU),
    ("fused_grid.py", "no-data", ["--data-dir", NO_DATA], MISSING),
    ("gpu_check.py", "no-gpu", [], NO_GPU + " (CUDA_VISIBLE_DEVICES='-1'"),
    ("gpu_check.py", "limit-0", ["--limit", "0"], "argument --limit: expected a number above 0 (got 0)"),
    (
        "gpu_check.py",
        "smoke-no-data",
        ["--smoke", "--data-dir", NO_DATA],
        f"missing data file(s) for 'weibo': {NO_DATA}/weibo/",
    ),
    (
        "gpu_packing.py",
        "no-gpu",
        ["--packing", "1", "--steps", "2"],
        "; CPU figures come from train_throughput.py",
    ),
    ("gpu_packing.py", "packing-0", ["--packing", "0"], "argument --packing: expected 1 or more (got 0)"),
    ("gpu_packing.py", "steps-0", ["--steps", "0"], "argument --steps: expected 1 or more (got 0)"),
    (
        "gpu_packing.py",
        "cpu-no-data",
        ["--device", "cpu", "--data-dir", NO_DATA],
        f"missing data file(s) for 'weibo': {NO_DATA}/weibo/",
    ),
    (
        "search_overhead.py",
        "repeat-0",
        ["--repeat", "0", "--out", OUT],
        "argument --repeat: expected 1 or more (got 0)",
    ),
    ("search_overhead.py", "seed-negative", ["--seed", "-1", "--out", OUT], "argument --seed: expected 0 to"),
    ("search_overhead.py", "no-data", ["--data-dir", NO_DATA, "--out", OUT], MISSING),
    (
        "cpu_share.py",
        "window-0",
        ["--window", "0", "--out", OUT],
        "argument --window: expected a number above 0 (got 0)",
    ),
    (
        "cpu_share.py",
        "settle-nan",
        ["--settle", "nan", "--out", OUT],
        "argument --settle: expected a number above 0",
    ),
    (
        "cpu_share.py",
        "epochs-0",
        ["--epochs", "0", "--out", OUT],
        "argument --epochs: expected 1 or more (got 0)",
    ),
    ("cpu_share.py", "no-data", ["--data-dir", NO_DATA, "--out", OUT], MISSING),
    ("value_paths.py", "no-data", ["--no-search", "--data-dir", NO_DATA], MISSING),
    ("value_paths.py", "not-a-checkout", ["--root", "/"], "--root /: no softfine/ and tune/ folders there"),
    (
        "budgeted_search.py",
        "budget-0",
        ["--budget", "0", "--out", OUT],
        "argument --budget: expected 1 or more (got 0)",
    ),
    (
        "budgeted_search.py",
        "tolerance-negative",
        ["--tolerance", "-1", "--out", OUT],
        "argument --tolerance: expected a number of 0 or more (got -1)",
    ),
    ("budgeted_search.py", "no-data", ["--data-dir", NO_DATA, "--out", OUT], MISSING),
    (
        "tiny_resume.py",
        "seed-negative",
        ["--seed", "-1"],
        "argument --seed: expected 0 to 4294967295 (got -1)",
    ),
    ("tiny_resume.py", "no-data", ["--data-dir", NO_DATA], MISSING),
    (
        "gpu_session.py",
        "prepare-no-data",
        ["prepare", "--to", OUT, "--data-dir", NO_DATA],
        f"--data-dir {NO_DATA}: no {NO_DATA}/weibo (the data of ../shared/data)",
    ),
    ("gpu_session.py", "no-out", ["run", "1"], "--out: give a folder for the logs (or set $OUT)"),
    ("gpu_session.py", "not-prepared", ["run", "1", "--out", OUT], "is not the copy `prepare` made (no "),
    ("gpu_check.py", "part-4", ["--smoke", "--part", "4"], "argument --part: invalid choice: 4"),
]


@pytest.mark.parametrize(
    "script, args, fragment",
    [(c[0], c[2], c[3]) for c in REFUSALS],
    ids=[f"{c[0][:-3]}-{c[1]}" for c in REFUSALS],
)
def test_a_benchmark_refuses_bad_input_in_one_line(script, args, fragment, tmp_path):
    out = tmp_path / "runs"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "-1"}  # no GPU for torch, on a machine with one too
    done = benchmark(script, *[str(out) if a == OUT else a for a in args], timeout=120, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[-1].startswith(f"{script}: error: ") and fragment in lines[-1], done.stderr[-3000:]
    if not fragment.startswith("argument "):  # argparse prints its usage first
        assert len(lines) == 1, done.stderr[-3000:]
    assert not out.exists()  # refused before its runs' folder was made


def test_the_profile_counts_each_kernel_once_and_names_the_attention_that_ran():
    # A CPU operator's self_device_time_total counts the kernels it launched, which are events of their
    # own too: summing both read the kernel share of a step about twice too high.
    import importlib.util

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEventAvg

    spec = importlib.util.spec_from_file_location(
        "train_throughput", REPO / "benchmarks" / "train_throughput.py"
    )
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)

    def event(key: str, device: DeviceType, self_device_us: int) -> FunctionEventAvg:
        averaged = FunctionEventAvg()
        averaged.key, averaged.device_type, averaged.self_device_time_total = key, device, self_device_us
        return averaged

    events = [
        event("aten::mm", DeviceType.CPU, 700),
        event("sm90_xmma_gemm_bf16", DeviceType.CUDA, 700),
        event("aten::_scaled_dot_product_efficient_attention", DeviceType.CPU, 300),
        event("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", DeviceType.CUDA, 300),
    ]
    assert throughput.kernel_ms(events, steps=2) == 0.5  # (700 + 300) us over 2 steps
    assert throughput.attention_ops(events) == ["aten::_scaled_dot_product_efficient_attention"]


def test_a_failed_check_is_reported_by_the_line_that_says_why():
    from softfine.script import error_line

    traceback = (
        "Traceback (most recent call last):\n"
        '  File "train_throughput.py", line 9, in <module>\n'
        "    measure(args)\n"
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\n"
        "GPU 0 has a total capacity of 79.19 GiB\n"
        "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're "
        "reporting a bug to PyTorch).\n"
    )
    assert error_line(traceback) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."
    assert error_line("a warning\ngpu_packing.py: error: --steps: expected 1 or more\n") == (
        "--steps: expected 1 or more"
    )
    assert error_line("a warning\nkilled\n") == "killed" and error_line("") == "no output"


def test_gpu_session_refuses_a_budget_that_is_no_time():
    done = benchmark("gpu_session.py", "run", "1", "--budget", "0", "--out", "unused")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        "gpu_session.py run: error: argument --budget: expected a number of seconds above 0 (got '0')"
    )
