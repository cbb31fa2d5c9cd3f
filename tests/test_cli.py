"""The `softfine` command as a user runs it: subprocesses, real files, exit codes."""

import json
import subprocess
import sys

import pytest

from softfine.config import FROM_SCRATCH


def softfine(*args, check=True):
    done = subprocess.run([sys.executable, "-m", "softfine", *map(str, args)], capture_output=True, text=True)
    if check and done.returncode:
        raise AssertionError(
            f"softfine {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr[-3000:]}"
        )
    return done


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_help_lists_the_commands_and_flags():
    assert all(c in softfine("--help").stdout for c in ("data", "labels", "train", "evaluate", "predict"))
    train_help = softfine("train", "--help").stdout
    for flag in (
        "--data-dir",
        "--model",
        "--epochs",
        "--limit-train",
        "--seed",
        "--out",
        "--no-soft",
        "--no-aug",
        "--alpha-aug",
        "--alpha-fea",
        "--beta",
        "--gamma",
        "--config",
        "--soft-scope",
        "--schedule",
    ):
        assert flag in train_help
    assert f"(default: 2e-05; tiny: {FROM_SCRATCH['lr']})" in " ".join(train_help.split())


def test_stats_prints_table1(data_dir):
    out = softfine("data", "stats", "weibo", "--data-dir", data_dir).stdout
    assert "train       1350      54.7      1.4" in out
    out = softfine("data", "stats", "resume", "--data-dir", data_dir).stdout
    assert "train       3821      32.5      3.5" in out
    out = softfine("data", "stats", "fine", "--data-dir", data_dir).stdout
    assert "train    missing" in out and "dev         3000      41.6      2.5         54" in out


def test_train_evaluate_predict(data_dir, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "dataset: resume\nmodel: tiny\ntiny_layers: 1\ntiny_hidden: 64\nepochs: 3\nbatch_size: 8\n"
        "limit_train: 40\nlimit_eval: 20\n"
    )
    out = tmp_path / "run"
    done = softfine(
        "train", "--config", config, "--data-dir", data_dir, "--epochs", 1, "--out", out, "--seed", 3
    )
    result = json.loads(done.stdout)
    # the flag overrode the YAML's 3 epochs
    assert "test_f1" in result and "epoch 1 step 5: dev P" in done.stderr
    saved = json.loads((out / "best" / "train_config.json").read_text())
    assert saved["epochs"] == 1 and saved["batch_size"] == 8 and saved["seed"] == 3
    # what neither the file nor a flag gave is the tiny encoder's own default
    assert (saved["lr"], saved["schedule"], saved["dropout"]) == (
        FROM_SCRATCH["lr"],
        FROM_SCRATCH["schedule"],
        FROM_SCRATCH["dropout"],
    )

    evaluated = json.loads(
        softfine(
            "evaluate",
            "--checkpoint",
            out / "best",
            "--dataset",
            "resume",
            "--split",
            "test",
            "--data-dir",
            data_dir,
            "--limit",
            20,
            "--json",
        ).stdout
    )
    assert evaluated["f1"] == pytest.approx(result["test_f1"])
    assert evaluated["sentences"] == 20 and evaluated["gold_entities"] == result["test_gold_entities"]

    lines = softfine(
        "predict", "--checkpoint", out / "best", "高勇：男，中国国籍。", "ABC 公司"
    ).stdout.splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["高勇：男，中国国籍。", "ABC 公司"]
    assert all(isinstance(json.loads(line)["entities"], list) for line in lines)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["train", "--dataset", "nope"],
            "softfine: error: --dataset: unknown dataset 'nope'; known: weibo, resume, ontonotes4, fine",
        ),
        (
            ["train", "--dataset", "fine", "--model", "tiny"],
            "softfine: error: missing data file(s) for 'fine'",
        ),
        (
            ["train", "--dataset", "resume", "--beta", "0.5"],
            "softfine: error: --beta: Input should be greater than 1",
        ),
        (
            ["evaluate", "--checkpoint", "/nonexistent", "--dataset", "resume"],
            "softfine: error: --checkpoint /nonexistent: not a SoftFiNE checkpoint",
        ),
    ],
)
def test_errors_are_one_line_with_status_2(data_dir, args, message):
    done = softfine(*args, "--data-dir", data_dir, check=False)
    assert done.returncode == 2
    assert last_line(done.stderr).startswith(message)
    assert "Traceback" not in done.stderr


def test_unknown_yaml_option_names_the_file(tmp_path, data_dir):
    config = tmp_path / "bad.yaml"
    config.write_text("bta: 3\n")
    done = softfine("train", "--config", config, "--data-dir", data_dir, check=False)
    assert done.returncode == 2 and last_line(done.stderr).startswith(
        f"softfine: error: --config {config}: key 'bta': unknown option 'bta'"
    )


def test_unloadable_encoder_is_a_clear_error(data_dir, tmp_path):
    done = softfine(
        "train",
        "--dataset",
        "resume",
        "--data-dir",
        data_dir,
        "--model",
        tmp_path / "no-such-encoder",
        "--limit-train",
        8,
        "--out",
        tmp_path / "out",
        check=False,
    )
    assert (
        done.returncode == 2
        and f"--model {tmp_path / 'no-such-encoder'}: cannot load this encoder" in done.stderr
    )
