"""Bad input to the `softfine` command, continued (test_bad_input.py has the rest and the helpers):
command-line text that is empty or not UTF-8, and encoder or checkpoint folders whose files a
dependency refuses (torch's safe loader, safetensors, tokenizers, transformers). Each case: exit
status 2, one line naming the flag or file, no traceback; nothing unpickled.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import assert_one_line_error, checkpoint, run, small_data, truncate  # noqa: F401 (fixtures)

EMPTY_CASES = [
    ("data-dir", ["train", "--data-dir", ""], "--data-dir '': empty; give a directory or leave the flag out"),
    ("model", ["train", "--model", ""], "--model '': empty; give a Hugging Face name"),
    ("out", ["train", "--out", ""], "--out '': empty; give a directory or leave the flag out"),
    ("label-separator", ["train", "--label-separator", ""], "--label-separator '': empty; give a separator"),
    ("config", ["train", "--config", ""], "--config '': empty; give a YAML file or leave the flag out"),
    ("dataset", ["train", "--dataset", ""], "--dataset '': empty"),
    (
        "labels-separator",
        [
            "labels",
            "--categories",
            "A/B",
            "--label-separator",
            "",
            "--beta",
            "2",
            "--gamma",
            "2",
            "--gold",
            "B-A/B",
        ],
        "--label-separator '': empty",
    ),
    (
        "labels-categories",
        ["labels", "--categories", "", "--beta", "2", "--gamma", "2", "--gold", "B-A"],
        "--categories '': empty",
    ),
    (
        "checkpoint",
        ["evaluate", "--checkpoint", "", "--dataset", "resume"],
        "--checkpoint '': empty; give a checkpoint directory",
    ),
    (
        "predict-text",
        ["predict", "--checkpoint", "/nonexistent", "高勇", ""],
        "text 2 '': empty; give a text to tag",
    ),
    ("stats-dataset", ["data", "stats", ""], "dataset '': empty"),
    ("download-mirror", ["data", "download", "weibo", "--mirror", ""], "--mirror '': empty"),
]


@pytest.mark.parametrize("args, fragment", [c[1:] for c in EMPTY_CASES], ids=[c[0] for c in EMPTY_CASES])
def test_an_empty_value_is_not_an_absent_one(capsys, args, fragment):
    code, err = run(capsys, *args)
    assert_one_line_error(code, err, fragment)


def test_an_empty_data_dir_variable_is_refused(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SOFTFINE_DATA_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where the default would be: nothing is read there
    code, err = run(capsys, "data", "stats", "resume")
    assert_one_line_error(code, err, "$SOFTFINE_DATA_DIR is set but empty; give it a directory or unset it")
    code, err = run(capsys, "train", "--dataset", "resume", "--model", "tiny", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "$SOFTFINE_DATA_DIR is set but empty")
    assert not (tmp_path / "softfine").exists()  # nothing looked for in the default data directory


# The shell's bytes that are not UTF-8 reach Python as lone surrogates (surrogateescape).
NOT_UTF8 = b"\xff".decode("utf-8", "surrogateescape")
UTF8_CASES = [
    (
        "predict-text",
        ["predict", "--checkpoint", "/nonexistent", "高勇", f"ab{NOT_UTF8}c"],
        r"text 2 'ab\xffc': not valid UTF-8 (byte 0xff at character 3)",
    ),
    (
        "checkpoint",
        ["evaluate", "--checkpoint", f"/tmp/{NOT_UTF8}", "--dataset", "resume"],
        r"--checkpoint '/tmp/\xff': not valid UTF-8",
    ),
    ("dataset", ["train", "--dataset", NOT_UTF8], r"--dataset '\xff': not valid UTF-8"),
    ("data-dir", ["train", "--data-dir", f"/tmp/{NOT_UTF8}"], r"--data-dir '/tmp/\xff': not valid UTF-8"),
    ("config", ["train", "--config", f"{NOT_UTF8}.yaml"], r"--config '\xff.yaml': not valid UTF-8"),
    ("model", ["train", "--model", NOT_UTF8], r"--model '\xff': not valid UTF-8"),
    (
        "gold",
        ["labels", "--categories", "A", "--beta", "2", "--gamma", "2", "--gold", f"B-{NOT_UTF8}"],
        r"--gold 'B-\xff': not valid UTF-8",
    ),
    ("stats-dataset", ["data", "stats", NOT_UTF8], r"dataset '\xff': not valid UTF-8"),
]


@pytest.mark.parametrize("args, fragment", [c[1:] for c in UTF8_CASES], ids=[c[0] for c in UTF8_CASES])
def test_command_line_text_that_is_not_utf8(capsys, args, fragment):
    code, err = run(capsys, *args)
    assert_one_line_error(code, err, fragment)


def test_command_line_bytes_that_are_not_utf8_from_a_shell(checkpoint):
    """As a shell passes them: `softfine predict --checkpoint DIR $'\\xff'`."""
    done = subprocess.run(
        [sys.executable, "-m", "softfine", "predict", "--checkpoint", str(checkpoint), b"\xff\xfe"],
        capture_output=True,
    )
    assert_one_line_error(done.returncode, done.stderr.decode(), r"text 1 '\xff\xfe': not valid UTF-8")
    assert not done.stdout


class Planted:
    """Unpickling this runs code: it writes the file it names."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def planted_pickle(path: Path, marker: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"bert.embeddings.word_embeddings.weight": Planted(marker)}))


def test_a_pickle_beside_the_weights_is_never_read(capsys, checkpoint, small_data, tmp_path):
    copy = tmp_path / "best"
    shutil.copytree(checkpoint, copy)
    planted_pickle(copy / "pytorch_model.bin", tmp_path / "unpickled")
    code, err = run(capsys, "evaluate", "--checkpoint", copy, "--dataset", "resume", "--data-dir", small_data)
    assert code == 0, err
    (copy / "model.safetensors").unlink()
    code, err = run(capsys, "predict", "--checkpoint", copy, "高勇")
    assert_one_line_error(code, err, "not a SoftFiNE checkpoint (no model.safetensors)")
    assert not (tmp_path / "unpickled").exists()


def encoder_folder(folder: Path) -> Path:
    """A small BERT encoder saved as a Hugging Face folder (config, vocabulary, safetensors weights)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from softfine.model import no_hf_progress_bars

    (folder / "vocab.txt").parent.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"高勇男中国籍"]) + "\n"
    )
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    with no_hf_progress_bars():
        BertModel(
            BertConfig(
                vocab_size=11,
                hidden_size=64,
                num_hidden_layers=1,
                num_attention_heads=1,
                intermediate_size=64,
            )
        ).save_pretrained(folder)
    return folder


ENCODER_CASES = [
    (
        "pickled-objects-as-weights",
        lambda d, marker: (
            (d / "model.safetensors").unlink(),
            planted_pickle(d / "pytorch_model.bin", marker),
        ),
        "its pytorch_model.bin holds Python objects besides tensors, and nothing read from disk is unpickled",
    ),
    (
        "damaged-safetensors",
        lambda d, marker: truncate(d / "model.safetensors"),
        "cannot load this encoder (SafetensorError",
    ),
    (
        "garbage-safetensors",
        lambda d, marker: (d / "model.safetensors").write_bytes(b"\x10" + b"\x00" * 7 + b"{x"),
        "cannot load this encoder (SafetensorError",
    ),
    ("config-not-json", lambda d, marker: (d / "config.json").write_text("{"), "cannot load this encoder"),
    (
        "tokenizer-not-json",
        lambda d, marker: (d / "tokenizer.json").write_text("{x"),
        "cannot load this encoder",
    ),
]


@pytest.mark.parametrize("spoil, fragment", [c[1:] for c in ENCODER_CASES], ids=[c[0] for c in ENCODER_CASES])
def test_an_encoder_folder_that_cannot_be_loaded(capsys, small_data, tmp_path, spoil, fragment):
    encoder = encoder_folder(tmp_path / "encoder")
    spoil(encoder, tmp_path / "unpickled")
    code, err = run(
        capsys,
        "train",
        "--dataset",
        "resume",
        "--model",
        encoder,
        "--data-dir",
        small_data,
        "--epochs",
        "1",
        "--out",
        tmp_path / "out",
    )
    assert_one_line_error(code, err, f"--model {encoder}: ", fragment)
    assert not (tmp_path / "unpickled").exists()
