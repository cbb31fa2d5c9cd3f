"""Bad input to the `softfine` command, table-driven: data files, --config files, flags, checkpoints.

Every case asserts exit status 2, one line on stderr that says `softfine ... error:` and names the
file and line, the key or the flag, and no traceback. The command runs in this process
(`softfine.cli.main`), exactly as the console script calls it; a few cases run it as a subprocess
too. The search's cases are in test_bad_input_tune.py, the tracking server's in test_mlflow_server.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from softfine.cli import main

BAD_UTF8 = "é".encode("latin-1")


def first_sentences(path: Path, n: int) -> str:
    """The first n blank-line separated sentences of a real column file."""
    blocks = path.read_text(encoding="utf-8").split("\n\n")
    return "\n\n".join(blocks[:n]) + "\n\n"


@pytest.fixture(scope="module")
def small_data(data_dir, tmp_path_factory) -> Path:
    """A data directory of real excerpts: 40 Resume and Weibo sentences a split, FiNE dev's first 40 lines."""
    root = tmp_path_factory.mktemp("data")
    for name, files in {
        "resume": ["train.char.bmes", "dev.char.bmes", "test.char.bmes"],
        "weibo": [f"weiboNER_2nd_conll.{s}" for s in ("train", "dev", "test")],
    }.items():
        (root / name).mkdir()
        for file in files:
            (root / name / file).write_text(first_sentences(data_dir / name / file, 40), encoding="utf-8")
    (root / "fine").mkdir()
    lines = (data_dir / "fine" / "dev.json").read_text(encoding="utf-8").splitlines()[:40]
    (root / "fine" / "dev.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def run(capsys, *args) -> tuple[int, str]:
    return call_main(*args), capsys.readouterr().err


def call_main(*args) -> int:
    root = logging.getLogger()
    handlers = list(root.handlers)
    try:
        return main([str(a) for a in args])
    except SystemExit as exit:  # argparse's own errors
        return exit.code
    finally:  # main's logging.basicConfig wrote to this test's captured stderr: not to the next one's
        root.handlers[:] = handlers


def assert_one_line_error(code: int, err: str, *fragments: str, argparse_error: bool = False) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    last = lines[-1]
    assert last.startswith("softfine") and "error: " in last, err
    if not argparse_error:  # argparse prints its usage first
        assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"


# ---------------------------------------------------------------------------------------------
# Data files: a bad line in a dev split (every dev and test sentence is scored, so an unreadable
# one is an error), or anywhere with --strict.

RESUME_DEV = "resume/dev.char.bmes"
WEIBO_DEV = "weibo/weiboNER_2nd_conll.dev"
FINE_DEV = "fine/dev.json"
GOOD_FINE = '{"id": 0, "text": "你好", "label": {}}\n'

DATA_CASES = [
    # (id, file, content, extra flags, fragments of the message)
    (
        "bmes-line-without-tag",
        RESUME_DEV,
        "中 B-PER\n人\n国 E-PER\n",
        [],
        ["dev.char.bmes:2:", "malformed line '人'"],
    ),
    (
        "bmes-three-columns",
        RESUME_DEV,
        "高 XX B-NAME\n",
        [],
        ["dev.char.bmes:1:", "malformed line '高 XX B-NAME'"],
    ),
    ("bmes-tab-not-space", RESUME_DEV, "中\tO\n", [], ["dev.char.bmes:1:", "malformed line"]),
    (
        "bmes-unknown-prefix",
        RESUME_DEV,
        "中 B-PER\n国 X-PER\n",
        [],
        ["dev.char.bmes:2:", "unknown tag prefix"],
    ),
    (
        "bmes-I-prefix",
        RESUME_DEV,
        "中 B-PER\n国 I-PER\n人 E-PER\n",
        [],
        ["dev.char.bmes:2:", "unknown tag prefix"],
    ),
    ("bmes-empty-category", RESUME_DEV, "中 B-\n", [], ["dev.char.bmes:1:", "empty category"]),
    ("bmes-lowercase-o", RESUME_DEV, "中 o\n", [], ["dev.char.bmes:1:", "unknown tag prefix"]),
    (
        "bmes-u2028-keeps-line-numbers",
        RESUME_DEV,
        "中\u2028 O\n\n人 X-PER\n",
        [],
        ["dev.char.bmes:3:", "unknown tag"],
    ),
    ("bmes-crlf-bad-line", RESUME_DEV, "中 O\r\n人\r\n", [], ["dev.char.bmes:2:", "malformed line '人'"]),
    (
        "bmes-strict-unopened-entity",
        RESUME_DEV,
        "中 O\n国 M-PER\n人 E-PER\n",
        ["--strict"],
        ["dev.char.bmes:2:", "not valid BMES"],
    ),
    (
        "bmes-strict-open-at-end",
        RESUME_DEV,
        "中 B-PER\n国 M-PER\n",
        ["--strict"],
        ["dev.char.bmes:2:", "not valid BMES"],
    ),
    (
        "bmes-strict-unclosed",
        RESUME_DEV,
        "中 B-PER\n国 O\n",
        ["--strict"],
        ["dev.char.bmes:1:", "not valid BMES"],
    ),
    (
        "bmes-strict-type-switch",
        RESUME_DEV,
        "中 B-PER\n国 M-LOC\n人 E-LOC\n",
        ["--strict"],
        ["dev.char.bmes:1:"],
    ),
    ("bmes-not-utf8", RESUME_DEV, BAD_UTF8 + b" O\n", [], ["dev.char.bmes: not UTF-8"]),
    ("bmes-empty-file", RESUME_DEV, "\n\n", [], ["dev.char.bmes: the file is empty"]),
    ("bmes-whitespace-only", RESUME_DEV, "  \n\t\n", [], ["dev.char.bmes: the file is empty"]),
    ("weibo-no-position-digit", WEIBO_DEV, "中\tO\n", [], ["conll.dev:1:", "word-position digits"]),
    ("weibo-space-delimiter", WEIBO_DEV, "中0 O\n", [], ["conll.dev:1:", "malformed line"]),
    ("weibo-bmes-prefix", WEIBO_DEV, "中0\tM-PER.NAM\n", [], ["conll.dev:1:", "unknown tag prefix"]),
    (
        "weibo-strict-unopened",
        "weibo/weiboNER_2nd_conll.train",
        "中0\tO\n国0\tI-PER.NAM\n",
        ["--strict"],
        ["conll.train:2:", "not valid BIO"],
    ),
    ("weibo-empty-tag", WEIBO_DEV, "中0\t\n", [], ["conll.dev:1:", "malformed line"]),
    (
        "fine-not-json",
        FINE_DEV,
        GOOD_FINE + '{"id": 5, "text": "北京"\n',
        [],
        ["dev.json:2:", "not valid JSON"],
    ),
    ("fine-not-an-object", FINE_DEV, GOOD_FINE + "[1, 2]\n", [], ["dev.json:2:", "expected a JSON object"]),
    ("fine-no-label", FINE_DEV, GOOD_FINE + '{"id": 6, "text": "北京"}\n', [], ["dev.json:2:", 'no "label"']),
    (
        "fine-null-label",
        FINE_DEV,
        GOOD_FINE + '{"id": 7, "text": "北京", "label": null}\n',
        [],
        ['"label" null'],
    ),
    ("fine-list-label", FINE_DEV, GOOD_FINE + '{"id": 8, "text": "北京", "label": []}\n', [], ['"label" []']),
    (
        "fine-empty-category",
        FINE_DEV,
        GOOD_FINE + '{"id": 9, "text": "北京", "label": {"": {"北京": [[0, 1]]}}}\n',
        [],
        ["dev.json:2:", "empty category ''"],
    ),
    (
        "fine-slash-category",
        FINE_DEV,
        GOOD_FINE + '{"id": 10, "text": "北京", "label": {"/": {"北京": [[0, 1]]}}}\n',
        [],
        ["dev.json:2:", "empty category '/'"],
    ),
    (
        "fine-empty-text",
        FINE_DEV,
        GOOD_FINE + '{"id": 11, "text": "", "label": {}}\n',
        [],
        ['non-empty "text"'],
    ),
    (
        "fine-text-not-string",
        FINE_DEV,
        GOOD_FINE + '{"id": 12, "text": 5, "label": {}}\n',
        [],
        ['"text" string'],
    ),
    (
        "fine-span-outside",
        FINE_DEV,
        GOOD_FINE + '{"id": 13, "text": "北京", "label": {"/l": {"北京": [[0, 9]]}}}\n',
        [],
        ["dev.json:2:", "id 13", "outside the text"],
    ),
    (
        "fine-span-mismatch",
        FINE_DEV,
        GOOD_FINE + '{"id": 14, "text": "北京", "label": {"/l": {"上海": [[0, 1]]}}}\n',
        [],
        ["id 14", "not its mention '上海'"],
    ),
    (
        "fine-overlap",
        FINE_DEV,
        GOOD_FINE + '{"id": 15, "text": "北京欢迎", "label": {"/l": {"北京": [[0, 1]], "京欢": [[1, 2]]}}}\n',
        [],
        ["overlaps"],
    ),
    (
        "fine-float-offsets",
        FINE_DEV,
        GOOD_FINE + '{"id": 16, "text": "北京", "label": {"/l": {"北京": [[0.0, 1]]}}}\n',
        [],
        ['malformed "label"'],
    ),
    (
        "fine-mention-list",
        FINE_DEV,
        GOOD_FINE + '{"id": 17, "text": "北京", "label": {"/l": ["北京"]}}\n',
        [],
        ['malformed "label"'],
    ),
    (
        "fine-not-utf8",
        FINE_DEV,
        b'{"id": 1, "text": "' + BAD_UTF8 + b'", "label": {}}\n',
        [],
        ["dev.json: not UTF-8"],
    ),
    # A lone "\r" is no line end (line numbers are an editor's); in a column file it would end up in a
    # character.
    ("bmes-lone-cr", RESUME_DEV, "中 O\n\n国 O\r人 O\n", [], ["dev.char.bmes:3:", "carriage return"]),
    (
        "bmes-old-mac-line-ends",
        RESUME_DEV,
        "中 O\r国 O\r\r人 O\r",
        [],
        ["dev.char.bmes:1:", "old Mac line endings"],
    ),
    ("weibo-cr-in-character", WEIBO_DEV, "中0\tO\n国\r0\tO\n", [], ["conll.dev:2:", "carriage return"]),
    (
        "fine-cr-between-tokens-then-bad-line",
        FINE_DEV,
        '{"id": 0,\r "text": "你好", "label": {}}\n{"id": 5\n',
        [],
        ["dev.json:2:", "not valid JSON"],
    ),
    (
        "fine-raw-cr-in-text",
        FINE_DEV,
        GOOD_FINE + '{"id": 4, "text": "北\r京", "label": {}}\n',
        [],
        ["dev.json:2:", "Invalid control character"],
    ),
]


@pytest.mark.parametrize(
    "file, content, flags, fragments", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES]
)
def test_bad_data_file(capsys, small_data, tmp_path, file, content, flags, fragments):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    target = data / file
    if isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content, encoding="utf-8")
    code, err = run(capsys, "data", "stats", file.split("/")[0], "--data-dir", data, *flags)
    assert_one_line_error(
        code, err, str(target) if ":" not in fragments[0] else str(data / Path(file).parent), *fragments
    )


def test_missing_data_and_a_data_dir_that_is_a_file(capsys, small_data, tmp_path):
    code, err = run(
        capsys, "train", "--dataset", "resume", "--model", "tiny", "--data-dir", tmp_path / "nothing"
    )
    assert_one_line_error(code, err, "missing data file(s) for 'resume'", "train.char.bmes")
    (tmp_path / "a-file").write_text("x")
    code, err = run(capsys, "data", "download", "weibo", "--data-dir", tmp_path / "a-file")
    assert_one_line_error(code, err, "--data-dir: cannot create", "a-file")


# ---------------------------------------------------------------------------------------------
# --config files: every value is checked against its type and range before any data is read.

CONFIG_CASES = [
    ("quoted-number", 'lr: "1e-3"\n', "key 'lr': Input should be a valid number"),
    ("quoted-bool", 'soft: "false"\n', "key 'soft': Input should be a valid boolean"),
    ("float-epochs", "epochs: 1.5\n", "key 'epochs': Input should be a valid integer"),
    ("float-batch", "batch_size: 2.5\n", "key 'batch_size': Input should be a valid integer"),
    ("string-epochs", 'epochs: "12"\n', "key 'epochs': Input should be a valid integer"),
    ("bool-epochs", "epochs: true\n", "key 'epochs': Input should be a valid integer"),
    ("int-device", "device: 5\n", "key 'device': Input should be a valid string"),
    ("bad-device", "device: cuda:x\n", "key 'device': expected auto, cpu, cuda or cuda:N"),
    ("null-dropout", "dropout: null\n", "key 'dropout' is null"),
    ("infinite-beta", "beta: .inf\n", "key 'beta': inf is not a finite number"),
    ("nan-lr", "lr: .nan\n", "key 'lr': nan is not a finite number"),
    ("negative-grad-norm", "max_grad_norm: -1\n", "key 'max_grad_norm': Input should be greater than 0"),
    ("zero-grad-norm", "max_grad_norm: 0\n", "key 'max_grad_norm': Input should be greater than 0"),
    ("negative-seed", "seed: -1\n", "key 'seed': Input should be greater than or equal to 0"),
    ("zero-epochs", "epochs: 0\n", "key 'epochs': Input should be greater than or equal to 1"),
    ("warmup-one", "warmup_ratio: 1.0\n", "key 'warmup_ratio': Input should be less than 1"),
    ("dropout-one", "dropout: 1\n", "key 'dropout': Input should be less than 1"),
    ("beta-one", "beta: 1\n", "key 'beta': Input should be greater than 1"),
    ("gamma-zero", "gamma: 0\n", "key 'gamma': Input should be greater than 0"),
    ("negative-alpha", "alpha_aug: -0.1\n", "key 'alpha_aug': Input should be greater than or equal to 0"),
    ("unknown-schedule", "schedule: exponential\n", "key 'schedule': Input should be 'linear', 'cosine'"),
    ("unknown-scope", "soft_scope: all\n", "key 'soft_scope': Input should be 'paper' or 'related'"),
    ("tiny-hidden-not-64s", "tiny_hidden: 100\n", "key 'tiny_hidden': Input should be a multiple of 64"),
    ("short-max-length", "max_length: 4\n", "key 'max_length': Input should be greater than or equal to 8"),
    ("long-max-length", "max_length: 1024\n", "key 'max_length': Input should be less than or equal to 512"),
    ("unknown-key", "bta: 3\n", "key 'bta': unknown option 'bta'"),
    ("unknown-dataset", "dataset: nope\n", "unknown dataset 'nope'"),
    ("list-not-mapping", "- lr\n- 3\n", "expected a mapping of option: value, got list"),
    ("scalar-not-mapping", "3\n", "expected a mapping of option: value, got int"),
    ("invalid-yaml", "lr: [1\n", "line 2: not valid YAML"),
    ("tab-indented-yaml", "lr:\n\t- 1\n", "not valid YAML"),
    ("dict-value", "lr: {a: 1}\n", "key 'lr': Input should be a valid number"),
    ("limit-train-zero", "limit_train: 0\n", "key 'limit_train': Input should be greater than or equal to 1"),
    ("key-written-twice", "lr: 1e-3\nepochs: 3\nlr: 2e-3\n", "key 'lr' is written twice (lines 1 and 3)"),
    (
        "key-written-twice-nested",
        "lr: 1e-3\nx:\n  a: 1\n  a: 2\n",
        "key 'a' is written twice (lines 3 and 4)",
    ),
    (
        "option-spelt-two-ways",
        "max_grad_norm: 1\nmax-grad-norm: 2\n",
        "keys 'max_grad_norm' and 'max-grad-norm' name one option (lines 1 and 2)",
    ),
    ("empty-data-dir", 'data_dir: ""\n', "key 'data_dir' is '' (empty); give a value or leave the key out"),
    ("empty-out", "out: ''\n", "key 'out' is '' (empty)"),
    ("empty-label-separator", "label_separator: ''\n", "key 'label_separator' is '' (empty)"),
]


@pytest.mark.parametrize("content, fragment", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_file(capsys, tmp_path, content, fragment):
    config = tmp_path / "run.yaml"
    config.write_text(content, encoding="utf-8")
    # no data directory at all: the config is refused before any data would be read
    code, err = run(capsys, "train", "--config", config, "--data-dir", tmp_path / "no-data")
    assert_one_line_error(code, err, f"--config {config}", fragment)


def test_config_files_that_cannot_be_read(capsys, tmp_path):
    code, err = run(capsys, "train", "--config", tmp_path / "missing.yaml")
    assert_one_line_error(code, err, f"--config {tmp_path / 'missing.yaml'}: cannot read it")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: " + BAD_UTF8 + b"\n")
    code, err = run(capsys, "train", "--config", latin)
    assert_one_line_error(code, err, f"--config {latin}: cannot read it")


def test_yaml_keys_merged_in_may_be_overridden(tmp_path):
    """`<<: *anchor` then a key of its own is YAML's way to override, not a key written twice."""
    from softfine.config import read_yaml

    config = tmp_path / "run.yaml"
    config.write_text(
        "base: &base {lr: 1.0e-3, epochs: 3}\nrun:\n  <<: *base\n  epochs: 5\n", encoding="utf-8"
    )
    assert read_yaml(config)["run"] == {"lr": 1e-3, "epochs": 5}


def test_yaml_numbers_are_numbers(tmp_path):
    from softfine.config import load_config

    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-3\nweight_decay: 5E-2\nbeta: 2\n", encoding="utf-8")
    loaded = load_config(config)
    assert (loaded.lr, loaded.weight_decay, loaded.beta) == (1e-3, 5e-2, 2.0)


# ---------------------------------------------------------------------------------------------
# Flags.

FLAG_CASES = [
    ("float-epochs", ["train", "--epochs", "1.5"], "argument --epochs: invalid int value: '1.5'", True),
    ("text-lr", ["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'", True),
    ("unknown-schedule", ["train", "--schedule", "exponential"], "argument --schedule: invalid choice", True),
    ("unknown-scope", ["train", "--soft-scope", "all"], "argument --soft-scope: invalid choice", True),
    ("unknown-flag", ["train", "--bta", "3"], "unrecognized arguments: --bta", True),
    (
        "negative-grad-norm",
        ["train", "--max-grad-norm", "-1"],
        "--max-grad-norm: Input should be greater than 0",
        False,
    ),
    ("negative-seed", ["train", "--seed", "-1"], "--seed: Input should be greater than or equal to 0", False),
    ("huge-seed", ["train", "--seed", str(2**40)], "--seed: Input should be less than 4294967296", False),
    (
        "device-foo",
        ["train", "--device", "foo"],
        "--device: expected auto, cpu, cuda or cuda:N (got 'foo')",
        False,
    ),
    ("infinite-lr", ["train", "--lr", "inf"], "--lr: Input should be a finite number", False),
    ("nan-beta", ["train", "--beta", "nan"], "--beta: Input should be a finite number", False),
    ("beta-one", ["train", "--beta", "1"], "--beta: Input should be greater than 1", False),
    ("gamma-negative", ["train", "--gamma", "-2"], "--gamma: Input should be greater than 0", False),
    (
        "zero-batch",
        ["train", "--batch-size", "0"],
        "--batch-size: Input should be greater than or equal to 1",
        False,
    ),
    ("dropout-one", ["train", "--dropout", "1"], "--dropout: Input should be less than 1", False),
    (
        "limit-eval-zero",
        ["train", "--limit-eval", "0"],
        "--limit-eval: Input should be greater than or equal to 1",
        False,
    ),
    (
        "eval-every-negative",
        ["train", "--eval-every", "-1"],
        "--eval-every: Input should be greater than or equal to 0",
        False,
    ),
    (
        "unknown-dataset",
        ["train", "--dataset", "nope"],
        "unknown dataset 'nope'; known: weibo, resume, ontonotes4, fine",
        False,
    ),
    (
        "labels-infinite-beta",
        ["labels", "--categories", "A,B", "--beta", "inf", "--gamma", "2", "--gold", "B-A"],
        "--beta must be a finite number > 1, got inf",
        False,
    ),
    (
        "labels-gamma-zero",
        ["labels", "--categories", "A,B", "--beta", "2", "--gamma", "0", "--gold", "B-A"],
        "--gamma must be a finite number > 0, got 0.0",
        False,
    ),
    (
        "labels-unknown-gold",
        ["labels", "--categories", "A,B", "--beta", "2", "--gamma", "2", "--gold", "B-C"],
        "--gold: label 'B-C' is not in this label space",
        False,
    ),
    (
        "labels-unknown-scope",
        ["labels", "--categories", "A", "--beta", "2", "--gamma", "2", "--gold", "B-A", "--soft-scope", "x"],
        "argument --soft-scope: invalid choice",
        True,
    ),
    ("stats-unknown-dataset", ["data", "stats", "nope"], "unknown dataset 'nope'", False),
    ("download-unknown-dataset", ["data", "download", "nope"], "unknown dataset 'nope'", False),
    ("download-ontonotes", ["data", "download", "ontonotes4"], "has no public origin", False),
    ("download-unverified", ["data", "download", "fine"], "no pinned checksum for train.json", False),
    (
        "download-mirror-not-a-url",
        ["data", "download", "weibo", "--mirror", "mirror.example.org"],
        "--mirror mirror.example.org: not a URL",
        False,
    ),
    (
        "download-mirror-bad-ipv6",
        ["data", "download", "weibo", "--mirror", "http://[::1"],
        "--mirror http://[::1: not a URL (Invalid IPv6 URL)",
        False,
    ),
    (
        "labels-empty-category",
        ["labels", "--categories", "A,,B", "--beta", "2", "--gamma", "2", "--gold", "B-A"],
        "--categories 'A,,B': category 2 is empty",
        False,
    ),
]


@pytest.mark.parametrize(
    "args, fragment, argparse_error", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES]
)
def test_bad_flag(capsys, tmp_path, args, fragment, argparse_error):
    code, err = run(capsys, *args, *(["--data-dir", tmp_path / "no-data"] if args[0] != "labels" else []))
    assert_one_line_error(code, err, fragment, argparse_error=argparse_error)


def test_out_naming_a_file(capsys, small_data, tmp_path):
    (tmp_path / "a-file").write_text("x")
    code, err = run(
        capsys,
        "train",
        "--dataset",
        "resume",
        "--model",
        "tiny",
        "--data-dir",
        small_data,
        "--out",
        tmp_path / "a-file",
    )
    assert_one_line_error(code, err, f"--out {tmp_path / 'a-file'}: a file is there")


def test_cuda_without_a_gpu(small_data, tmp_path):
    # The GPUs hidden from torch (CUDA_VISIBLE_DEVICES=-1), so this runs on a machine with one too.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "softfine",
            "train",
            "--dataset",
            "resume",
            "--model",
            "tiny",
            "--data-dir",
            str(small_data),
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"},
    )
    assert_one_line_error(done.returncode, done.stderr, "--device cuda: torch sees no CUDA device")
    assert not (tmp_path / "out").exists()  # refused before the output folder was made


# ---------------------------------------------------------------------------------------------
# Checkpoints: a damaged one is named with the file that is wrong; nothing is unpickled.


@pytest.fixture(scope="module")
def checkpoint(small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert (
        call_main(
            "train",
            "--dataset",
            "resume",
            "--model",
            "tiny",
            "--tiny-layers",
            "1",
            "--tiny-hidden",
            "64",
            "--epochs",
            "1",
            "--data-dir",
            small_data,
            "--out",
            out,
            "--log-every",
            "0",
        )
        == 0
    )
    return out / "best"


def damage(name: str, how):
    def apply(directory: Path) -> None:
        path = directory / name
        if how is None:
            path.unlink()
        elif callable(how):
            how(path)
        else:
            path.write_bytes(how if isinstance(how, bytes) else how.encode())

    return apply


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_weight(path: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(path)
    del weights["classifier.bias"]
    save_file(weights, path)


def edit_json(**changes):
    def apply(path: Path) -> None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))

    return apply


CHECKPOINT_CASES = [
    ("truncated-weights", damage("model.safetensors", truncate), "model.safetensors is missing or damaged"),
    ("garbage-weights", damage("model.safetensors", b"\x00" * 64), "model.safetensors is missing or damaged"),
    (
        "pickle-as-weights",
        damage("model.safetensors", b"\x80\x04\x95" + b"\x00" * 40),
        "model.safetensors is missing or damaged",
    ),
    ("no-weights", damage("model.safetensors", None), "not a SoftFiNE checkpoint (no model.safetensors)"),
    ("no-labels", damage("labels.json", None), "labels.json is missing or damaged"),
    ("labels-not-json", damage("labels.json", "{categories"), "labels.json is missing or damaged"),
    ("labels-wrong-shape", damage("labels.json", '{"categories": 5}'), "labels.json is missing or damaged"),
    (
        "labels-empty-category",
        damage("labels.json", '{"categories": [""]}'),
        "labels.json is missing or damaged",
    ),
    (
        "labels-fewer",
        damage("labels.json", '{"categories": ["NAME"]}'),
        "labels.json is missing or damaged (5 labels, but",
    ),
    (
        "unknown-model-type",
        damage("config.json", edit_json(model_type="no-such-model")),
        "config.json is missing or damaged",
    ),
    ("no-config", damage("config.json", None), "config.json is missing or damaged"),
    ("config-not-json", damage("config.json", "{"), "config.json is missing or damaged (JSONDecodeError"),
    (
        "config-other-labels",
        damage("config.json", edit_json(id2label={str(i): "B-X" for i in range(33)})),
        "labels.json or config.json is missing or damaged (label 0 is 'O' in labels.json but 'B-X'",
    ),
    (
        "tokenizer-not-json",
        damage("tokenizer.json", "{not json"),
        "the tokenizer files is missing or damaged",
    ),
    (
        "tokenizer-wrong-shape",
        damage("tokenizer.json", '{"model": 5}'),
        "the tokenizer files is missing or damaged",
    ),
    (
        "weights-of-another-model",
        damage("model.safetensors", lambda path: save_file({"x": torch.zeros(2)}, path)),
        "model.safetensors is missing or damaged (",
        "weights missing or of another shape",
    ),
    (
        "weights-one-missing",
        damage("model.safetensors", drop_weight),
        "model.safetensors is missing or damaged (1 "
        "weights missing or of another shape, e.g. classifier.bias)",
    ),
    ("no-train-config", damage("train_config.json", None), "train_config.json is missing or damaged"),
    ("train-config-list", damage("train_config.json", "[1, 2]"), "train_config.json is missing or damaged"),
    # every value is checked as a TrainConfig's, as a flag's or a --config file's would be
    (
        "train-config-max-length-string",
        damage("train_config.json", edit_json(max_length="128")),
        "train_config.json is missing or damaged (key 'max_length': Input should be a valid integer "
        "(got '128': str))",
    ),
    (
        "train-config-max-length-too-small",
        damage("train_config.json", edit_json(max_length=4)),
        "train_config.json is missing or damaged (key 'max_length': Input should be greater than or "
        "equal to 8",
    ),
    (
        "train-config-soft-string",
        damage("train_config.json", edit_json(soft="false")),
        "train_config.json is missing or damaged (key 'soft': Input should be a valid boolean (got "
        "'false': str))",
    ),
    (
        "train-config-null-model",
        damage("train_config.json", edit_json(model=None)),
        "train_config.json is missing or damaged (key 'model': Input should be a valid string",
    ),
]


@pytest.mark.parametrize(
    "spoil, fragments", [(c[1], c[2:]) for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_damaged_checkpoint(capsys, checkpoint, small_data, tmp_path, spoil, fragments):
    copy = tmp_path / "best"
    shutil.copytree(checkpoint, copy)
    spoil(copy)
    code, err = run(capsys, "evaluate", "--checkpoint", copy, "--dataset", "resume", "--data-dir", small_data)
    assert_one_line_error(code, err, f"--checkpoint {copy}", *fragments)
    code, err = run(capsys, "predict", "--checkpoint", copy, "高勇：男，中国国籍。")
    assert_one_line_error(code, err, f"--checkpoint {copy}", *fragments)


def test_a_checkpoint_with_options_this_version_does_not_know_predicts(capsys, caplog, checkpoint, tmp_path):
    # another version's train_config.json: its options the model does not depend on are left out
    copy = tmp_path / "best"
    shutil.copytree(checkpoint, copy)
    edit_json(some_future_option=3)(copy / "train_config.json")
    with caplog.at_level(logging.WARNING, logger="softfine.model"):
        code = call_main("predict", "--checkpoint", copy, "高勇：男，中国国籍。")
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["text"] == "高勇：男，中国国籍。"
    assert "options this version does not know, left out: some_future_option" in caplog.text


# A resume (as the search's trainable resumes a trial, train(config, resume_from=DIR)) from a
# damaged state/: the file and the key named, nothing loaded.


def edit_state(**changes):
    """training_state.pt with keys replaced (a value of REMOVE: the key left out)."""

    def apply(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        state.update(changes)
        torch.save({k: v for k, v in state.items() if v is not REMOVE}, path)

    return apply


def edit_optimizer(edit):
    def apply(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        edit(state["optimizer"])
        torch.save(state, path)

    return apply


REMOVE = object()
STATE = "state/training_state.pt"
RESUME_CASES = [
    (
        "state-a-list",
        damage(STATE, lambda path: torch.save([1, 2], path)),
        "training_state.pt: not a training state to resume from: expected a dict of optimizer, "
        "scheduler, step, "
        "best_f1, best_step, rng (got list)",
    ),
    (
        "state-no-step",
        damage(STATE, edit_state(step=REMOVE)),
        "training_state.pt: not a training state to resume from: key 'step': Field required",
    ),
    (
        "state-step-string",
        damage(STATE, edit_state(step="6")),
        "key 'step': Input should be a valid integer (got '6': str)",
    ),
    (
        "state-step-negative",
        damage(STATE, edit_state(step=-1)),
        "key 'step': Input should be greater than or equal to 0",
    ),
    (
        "state-best-f1-string",
        damage(STATE, edit_state(best_f1="0.5")),
        "key 'best_f1': Input should be a valid number",
    ),
    (
        "state-best-step-past-step",
        damage(STATE, edit_state(best_step=99)),
        "key 'best_step': 99 is past key 'step'",
    ),
    (
        "state-optimizer-list",
        damage(STATE, edit_state(optimizer=[])),
        "key 'optimizer': Input should be a valid dictionary",
    ),
    (
        "state-scheduler-no-last-epoch",
        damage(STATE, edit_state(scheduler={"base_lrs": [0.1]})),
        "key 'scheduler.last_epoch': Field required",
    ),
    (
        "state-rng-not-a-generator",
        damage(STATE, edit_state(rng={"python": (3, (1, 2), None), "torch": torch.zeros(3), "cuda": []})),
        "key 'rng.python': 2 words",
    ),
    (
        "state-parameter-number-string",
        damage(STATE, edit_optimizer(lambda o: o["state"].update({"0": o["state"].pop(0)}))),
        "key 'optimizer.state' has the key '0': Input should be a valid integer",
    ),
    (
        "state-lr-string",
        damage(STATE, edit_optimizer(lambda o: o["param_groups"][0].update(lr="0.1"))),
        "key 'optimizer.param_groups.0.lr': Input should be a valid number (got '0.1': str)",
    ),
    (
        "state-moments-of-another-shape",
        damage(
            STATE,
            edit_optimizer(lambda o: o["state"][0].update(exp_avg=torch.zeros(3), exp_avg_sq=torch.zeros(3))),
        ),
        "resume: the saved optimizer state holds moments of "
        "shape [3] for net.bert.embeddings.word_embeddings.weight, whose shape is [",
    ),
    (
        "state-train-config-max-length-string",
        damage("state/train_config.json", edit_json(max_length="128")),
        "state: train_config.json is missing or damaged (key 'max_length': Input should be a valid integer",
    ),
]


@pytest.mark.parametrize("spoil, fragment", [c[1:] for c in RESUME_CASES], ids=[c[0] for c in RESUME_CASES])
def test_resume_from_a_damaged_state(checkpoint, small_data, tmp_path, spoil, fragment):
    from softfine.config import make_config
    from softfine.errors import ConfigError
    from softfine.train import train

    copy = tmp_path / "run"
    shutil.copytree(checkpoint.parent, copy)
    spoil(copy)
    config = make_config(
        dict(
            dataset="resume",
            model="tiny",
            tiny_layers=1,
            tiny_hidden=64,
            epochs=1,
            data_dir=str(small_data),
            out=str(tmp_path / "resumed"),
            log_every=0,
        )
    )
    with pytest.raises(ConfigError) as raised:
        train(config, resume_from=copy)
    message = str(raised.value)
    assert "\n" not in message and fragment in message, message
    assert str(copy) in message or message.startswith("resume: "), message  # the file, or the group's states


def test_resume_from_an_undamaged_state(checkpoint, small_data, tmp_path):
    # what the cases above damage: as it was written, it resumes
    from softfine.config import make_config
    from softfine.train import train

    config = make_config(
        dict(
            dataset="resume",
            model="tiny",
            tiny_layers=1,
            tiny_hidden=64,
            epochs=1,
            data_dir=str(small_data),
            out=str(tmp_path / "resumed"),
            log_every=0,
        )
    )
    assert train(config, resume_from=checkpoint.parent)["best_dev_f1"] >= 0


EVALUATE_CASES = [
    (
        "no-checkpoint",
        ["--checkpoint", "/nonexistent"],
        "--checkpoint /nonexistent: not a SoftFiNE checkpoint",
    ),
    ("other-dataset", ["--dataset", "weibo"], "--dataset weibo: label"),
    ("limit-zero", ["--limit", "0"], "--limit 0: give 1 to 40"),
    ("limit-past-the-split", ["--limit", "1000"], "--limit 1000: give 1 to 40"),
    ("device-foo", ["--device", "foo"], "--device 'foo': expected auto, cpu, cuda or cuda:N"),
]


@pytest.mark.parametrize(
    "args, fragment", [c[1:] for c in EVALUATE_CASES], ids=[c[0] for c in EVALUATE_CASES]
)
def test_bad_evaluate(capsys, checkpoint, small_data, args, fragment):
    base = {"--checkpoint": str(checkpoint), "--dataset": "resume"}
    base.update(dict(zip(args[::2], args[1::2])))
    code, err = run(capsys, "evaluate", *[x for kv in base.items() for x in kv], "--data-dir", small_data)
    assert_one_line_error(code, err, fragment)


def test_predict_refuses_text_that_is_not_utf8(checkpoint):
    done = subprocess.run(
        [sys.executable, "-m", "softfine", "predict", "--checkpoint", str(checkpoint)],
        input=b"\xff\xfe bad\n",
        capture_output=True,
    )
    err = done.stderr.decode()
    assert_one_line_error(done.returncode, err, "standard input: not UTF-8 text")


def test_predict_reads_any_line_ends_on_standard_input(checkpoint, capsys, monkeypatch):
    """ "\r\n" and "\r" end lines as "\n" does: no text keeps a "\r" (which the model would read as
    one more character, and the output would echo). In this process: standard input is bytes that
    predict reads from sys.stdin.buffer (test_predict_refuses_text_that_is_not_utf8 reads a real pipe)."""
    texts = ["高勇：男，中国国籍，无境外居留权。", "汉族，中共党员，本科学历。", "北京大学工程师。"]

    def predict(data: bytes, *args: str) -> list[dict]:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
        code = call_main("predict", "--checkpoint", checkpoint, *args)
        out, err = capsys.readouterr()
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines()]

    expected = predict(b"", *texts)
    assert [r["text"] for r in expected] == texts
    for ends in ("\n", "\r\n", "\r"):
        assert predict((ends.join(texts) + ends + ends).encode()) == expected, repr(ends)


def test_errors_from_the_console_script_are_one_line(tmp_path):
    """The same path as a user's shell: a subprocess, a bad --config value."""
    config = tmp_path / "run.yaml"
    config.write_text('soft: "false"\n')
    done = subprocess.run(
        [sys.executable, "-m", "softfine", "train", "--config", str(config)], capture_output=True, text=True
    )
    assert_one_line_error(done.returncode, done.stderr, f"--config {config}: key 'soft'")
    verbose = subprocess.run(
        [sys.executable, "-m", "softfine", "-v", "train", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr  # -v: the traceback for a bug report


def test_a_full_disk_while_saving(capsys, small_data, tmp_path):
    """A 200 KiB tmpfs as --out: the first checkpoint does not fit."""
    import os

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    disk = tmp_path / "small-disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], check=True)
    try:
        code, err = run(
            capsys,
            "train",
            "--dataset",
            "resume",
            "--model",
            "tiny",
            "--tiny-layers",
            "1",
            "--tiny-hidden",
            "64",
            "--epochs",
            "1",
            "--data-dir",
            small_data,
            "--out",
            disk / "run",
        )
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert_one_line_error(code, err, f"{disk / 'run'}", "No space left on device")
