"""A user's own data: Resume and FiNE dev rewritten by the test into each format users bring (Hugging
Face run_ner.py's JSON lines, column files, span JSON lines), read as the built-in readers read the
originals, trained to the same predictions, refused as strictly, and searched (a 2-point search and a
fused one, ending with MLflow runs and the selection)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from softfine.config import make_config
from softfine.data import Sentence
from softfine.datasets import load_corpus
from softfine.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# Writers: sentences (BIOES tags, as every reader returns them) in a user's format.


def in_scheme(tags, scheme: str) -> list[str]:
    """BIOES tags written in `scheme`: bio (E- -> I-, S- -> B-), bmes (I- -> M-) or bioes."""
    rename = {"bio": {"E": "I", "S": "B"}, "bmes": {"I": "M"}, "bioes": {}}[scheme]
    return [t if t == "O" else rename.get(t[0], t[0]) + t[1:] for t in tags]


def words(sentence: Sentence) -> tuple[list[str], list[str]]:
    """Tokens of several characters: each entity one token (tagged B-X, as run_ner.py's word-level
    data is), the other characters in pairs (O)."""
    tokens, tags, i = [], [], 0
    entities = {start: (category, end) for category, start, end in get_entities(list(sentence.tags))}
    while i < len(sentence):
        if i in entities:
            category, end = entities[i]
            tokens.append("".join(sentence.chars[i : end + 1]))
            tags.append(f"B-{category}")
            i = end + 1
        else:
            end = i + 1 if i + 1 < len(sentence) and i + 1 not in entities else i
            tokens.append("".join(sentence.chars[i : end + 1]))
            tags.append("O")
            i = end + 1
    return tokens, tags


def write_tokens(
    path: Path,
    sentences,
    scheme: str = "bio",
    ids: str | None = None,
    split_words: bool = False,
    names: list[str] | None = None,
) -> None:
    """run_ner.py's JSON lines; `ids`: "labels.txt" or "field" writes integer tags with their names there."""
    lines = []
    for s in sentences:
        tokens, tags = words(s) if split_words else (list(s.chars), in_scheme(s.tags, scheme))
        record = {"tokens": tokens, "ner_tags": tags}
        if ids:
            record["ner_tags"] = [names.index(t) for t in tags]
            if ids == "field":
                record["label_names"] = names
        lines.append(json.dumps(record, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if ids == "labels.txt":
        (path.parent / "labels.txt").write_text("\n".join(names) + "\n", encoding="utf-8")


def write_columns(path: Path, sentences, scheme: str = "bioes", delimiter: str = "\t") -> None:
    blocks = [
        "".join(f"{c}{delimiter}{t}\n" for c, t in zip(s.chars, in_scheme(s.tags, scheme))) for s in sentences
    ]
    path.write_text("\n".join(blocks), encoding="utf-8")


def write_spans(path: Path, sentences) -> None:
    lines = []
    for number, s in enumerate(sentences):
        label: dict = {}
        for category, start, end in get_entities(list(s.tags)):
            label.setdefault(category, {}).setdefault("".join(s.chars[start : end + 1]), []).append(
                [start, end]
            )
        lines.append(json.dumps({"id": number, "text": "".join(s.chars), "label": label}, ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def all_tags(splits) -> list[str]:
    return sorted({t for sentences in splits.values() for s in sentences for t in in_scheme(s.tags, "bio")})


FORMATS = {  # name -> (file suffix, writer of one split)
    "tokens-bio": (".json", lambda p, s, names: write_tokens(p, s, "bio")),
    "tokens-bioes": (".json", lambda p, s, names: write_tokens(p, s, "bioes")),
    "tokens-ids-labels.txt": (
        ".json",
        lambda p, s, names: write_tokens(p, s, "bio", "labels.txt", names=names),
    ),
    "tokens-ids-field": (".jsonl", lambda p, s, names: write_tokens(p, s, "bio", "field", names=names)),
    "tokens-words": (".json", lambda p, s, names: write_tokens(p, s, split_words=True)),
    "columns-bio-tab": (".txt", lambda p, s, names: write_columns(p, s, "bio", "\t")),
    "columns-bmes-space": (".bmes", lambda p, s, names: write_columns(p, s, "bmes", " ")),
    "columns-bioes": ("", lambda p, s, names: write_columns(p, s, "bioes")),
    "spans": (".jsonl", lambda p, s, names: write_spans(p, s)),
}


def write_folder(folder: Path, splits: dict, fmt: str, dev_name: str = "dev") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    suffix, write = FORMATS[fmt]
    names = all_tags(splits)
    for split, sentences in splits.items():
        write(folder / f"{dev_name if split == 'dev' else split}{suffix}", sentences, names)
    return folder


def pairs(splits) -> dict:
    return {k: [(s.chars, s.tags) for s in v] for k, v in splits.items()}


@pytest.fixture(scope="module")
def resume(data_dir):
    """Resume's first 300 training sentences and its whole dev and test splits, as the built-in
    reader reads them."""
    return load_corpus(make_config({"dataset": "resume", "data_dir": str(data_dir), "limit_train": 300}))


@pytest.fixture(scope="module")
def fine_dev(data_dir):
    """FiNE's dev split (the only one shared) cut in three: 2000 / 500 / 500 sentences."""
    dev = load_corpus(make_config({"dataset": "fine", "data_dir": str(data_dir)}), ["dev"]).splits["dev"]
    return {"train": dev[:2000], "dev": dev[2000:2500], "test": dev[2500:]}


# ---------------------------------------------------------------------------------------------
# Reading.


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_reads_as_the_builtin_reader_reads_resume(fmt, resume, tmp_path):
    folder = write_folder(
        tmp_path / "mydata", resume.splits, fmt, dev_name="validation" if "ids" in fmt else "dev"
    )
    corpus = load_corpus(make_config({"dataset": str(folder)}))
    assert pairs(corpus.splits) == pairs(resume.splits)  # every sentence, character and tag
    assert corpus.name == "mydata" and corpus.unseen == resume.unseen
    assert {split: f["sentences"] for split, f in corpus.files.items()} == {
        "train": 300,
        "dev": 463,
        "test": 477,
    }


@pytest.mark.parametrize("fmt", ["spans", "tokens-bioes", "columns-bio-tab"])
def test_fine_dev_in_every_format_keeps_its_hierarchy(fmt, fine_dev, tmp_path):
    from softfine.labels import LabelSpace
    from softfine.stats import categories

    folder = write_folder(tmp_path / "fine-own", fine_dev, fmt)
    corpus = load_corpus(make_config({"dataset": str(folder)}))
    assert pairs(corpus.splits) == pairs(fine_dev)
    space = LabelSpace.infer(sorted({c for s in corpus.splits.values() for c in categories(s)}))
    assert space.separator == "/" and space.depth == 3  # read from the names: every category starts with "/"
    assert space.levels("/organization/company/vehicle_brand") == ("organization", "company", "vehicle_brand")
    assert LabelSpace.infer(["PER.NAM", "LOC.NAM"]).separator is None  # one level unless --label-separator
    assert LabelSpace.infer(["PER.NAM", "LOC.NAM"], ".").levels("PER.NAM") == ("PER", "NAM")


def test_run_ner_file_flags_read_as_a_folder(resume, tmp_path):
    folder = write_folder(tmp_path / "files", resume.splits, "tokens-bio")
    corpus = load_corpus(
        make_config(
            {
                "train_file": str(folder / "train.json"),
                "validation_file": str(folder / "dev.json"),
                "test_file": str(folder / "test.json"),
            }
        )
    )
    assert pairs(corpus.splits) == pairs(resume.splits) and corpus.name == "files"
    with pytest.raises(ConfigError, match="--dataset resume and --train-file: give a dataset"):
        make_config({"dataset": "resume", "train_file": str(folder / "train.json")})


def test_a_missing_dev_split_is_refused_or_carved_and_said_so(resume, tmp_path, caplog):
    folder = write_folder(
        tmp_path / "nodev", {"train": resume.splits["train"], "test": resume.splits["test"]}, "tokens-bio"
    )
    with pytest.raises(
        DataError,
        match=r"nodev: no dev file \(dev or validation, any extension\); add one, or pass "
        "--dev-fraction",
    ):
        load_corpus(make_config({"dataset": str(folder)}))
    with caplog.at_level(logging.WARNING):
        corpus = load_corpus(make_config({"dataset": str(folder), "dev_fraction": 0.1, "dev_seed": 3}))
    assert len(corpus.splits["dev"]) == 30 and len(corpus.splits["train"]) == 270
    assert (
        "no dev split; carved 30 of its 300 training sentences as dev (--dev-fraction 0.1, --dev-seed 3)"
        in caplog.text
    )
    assert corpus.files["dev"]["carved"] == "0.1 of train, seed 3"
    again = load_corpus(make_config({"dataset": str(folder), "dev_fraction": 0.1, "dev_seed": 3, "seed": 7}))
    assert pairs(again.splits) == pairs(corpus.splits)  # the training seed does not move the dev split
    other = load_corpus(make_config({"dataset": str(folder), "dev_fraction": 0.1, "dev_seed": 4}))
    assert pairs(other.splits)["dev"] != pairs(corpus.splits)["dev"]
    assert sorted(pairs(other.splits)["dev"] + pairs(other.splits)["train"]) == sorted(
        pairs(resume.splits)["train"]
    )
    with pytest.raises(
        ConfigError, match="--dev-fraction 0.1: .*dev.json .* is the dev split; leave --dev-fraction out"
    ):
        load_corpus(
            make_config(
                {
                    "dataset": str(write_folder(tmp_path / "withdev", resume.splits, "tokens-bio")),
                    "dev_fraction": 0.1,
                }
            )
        )


def test_a_category_only_in_dev_is_counted_and_reported(resume, tmp_path, caplog):
    from softfine.train import train

    dev = [Sentence(("甲", "乙", "丙"), ("B-NEWCAT", "E-NEWCAT", "O"), "x")] + resume.splits["dev"][:20]
    folder = write_folder(
        tmp_path / "unseen", {"train": resume.splits["train"][:40], "dev": dev}, "tokens-bioes"
    )
    corpus = load_corpus(make_config({"dataset": str(folder)}))
    assert corpus.unseen == {"dev": {"NEWCAT": 1}}
    with caplog.at_level(logging.WARNING):
        result = train(tiny(dataset=str(folder), epochs=1, out=str(tmp_path / "run")))
    assert "unseen dev: 1 gold entities of 1 categories that train never has (NEWCAT 1)" in caplog.text
    assert result["dev_unseen_entities"] == 1 and result["dev_sentences"] == 21
    assert result["dev_gold_entities"] == 1 + sum(t[0] in "BS" for s in dev[1:] for t in s.tags)


# ---------------------------------------------------------------------------------------------
# Bad data: one DataError naming the file and line, as the built-in readers' are.

GOOD = '{"tokens": ["高", "勇"], "ner_tags": ["B-NAME", "I-NAME"]}\n'
BAD_FILES = [  # (name, {file: text}, fragment of the error), file "train.json" unless named
    (
        "length-mismatch",
        {"dev.json": GOOD + '{"tokens": ["高", "勇"], "ner_tags": ["O"]}\n'},
        'dev.json:2: "ner_tags" has 1 tags for 2 tokens',
    ),
    (
        "ids-without-names",
        {"train.json": GOOD.replace('"B-NAME", "I-NAME"', "1, 2")},
        'train.json:1: integer "ner_tags" but no label names: put a labels.txt',
    ),
    (
        "id-past-the-names",
        {"dev.json": '{"tokens": ["高"], "ner_tags": [3], "label_names": ["O", "B-X"]}\n'},
        "dev.json:1: tag id 3 is not in the 2 label names",
    ),
    (
        "unknown-prefix",
        {"dev.json": '{"tokens": ["高"], "ner_tags": ["X-NAME"]}\n'},
        "dev.json:1: tag 'X-NAME' at character 1: unknown tag prefix",
    ),
    ("not-json", {"dev.json": GOOD + "{tokens: 1}\n"}, "dev.json:2: not valid JSON"),
    ("neither-format", {"dev.json": '{"words": ["a"]}\n'}, 'dev.json:1: a JSON line with neither "tokens"'),
    (
        "space-in-token",
        {"dev.json": '{"tokens": ["高 勇"], "ner_tags": ["B-NAME"]}\n'},
        "dev.json:1: token 1 '高 勇' is empty or holds whitespace among other characters",
    ),
    (
        "mixed-formats",
        {"dev.json": None, "dev.txt": "高 B-NAME\n"},
        "the splits mix formats (train.json is JSON lines with tokens and "
        "ner_tags, dev.txt is a two-column character file",
    ),
    ("empty-split", {"test.json": "\n\n"}, "test.json: the file is empty"),
    (
        "bom-inside",
        {"dev.json": GOOD + "\ufeff" + GOOD},
        "dev.json:2: a byte-order mark (U+FEFF) inside the file",
    ),
    (
        "column-third-field",
        {
            "train.json": None,
            "dev.json": None,
            "train.txt": "高 B-NAME\n",
            "dev.txt": "高 B-NAME\n勇 I-NAME x\n",
        },
        "dev.txt:2: malformed line '勇 I-NAME x'",
    ),
    (
        "column-no-tag",
        {"train.json": None, "dev.json": None, "train.txt": "高\tB-NAME\n", "dev.txt": "高\tB-NAME\n勇\n"},
        "dev.txt:2: malformed line '勇'",
    ),
    (
        "m-and-i",
        {
            "train.json": None,
            "dev.json": None,
            "train.txt": "高 B-A\n勇 M-A\n李 E-A\n\n王 B-B\n五 I-B\n",
            "dev.txt": "高 O\n",
        },
        "train.txt: its tags have both M- and I- prefixes",
    ),
    (
        "span-not-its-mention",
        {
            "train.json": None,
            "dev.json": None,
            "train.jsonl": '{"text": "高勇", "label": {}}\n',
            "dev.jsonl": '{"id": 7, "text": "高勇是", "label": {"NAME": {"高勇": [[1, 2]]}}}\n',
        },
        "dev.jsonl:1: id 7: span [1, 2] reads '勇是', not its mention '高勇'",
    ),
    (
        "two-dev-files",
        {"dev.json": GOOD, "validation.json": GOOD},
        "dev.json and validation.json are all dev files",
    ),
    ("no-train", {"train.json": None}, "no training file"),
    ("not-utf8", {"dev.json": "高".encode("gbk")}, "dev.json: not UTF-8 text"),
]


# Refused before a format is known (the content chooses it): the other errors name the reader too.
BEFORE_DETECTION = {
    "neither-format",
    "empty-split",
    "bom-inside",
    "not-utf8",
    "mixed-formats",
    "two-dev-files",
    "no-train",
}


@pytest.mark.parametrize("name, files, fragment", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_user_data_is_one_error_naming_file_and_line(tmp_path, name, files, fragment):
    folder = tmp_path / "bad"
    folder.mkdir()
    for file, text in {"train.json": GOOD * 3, "dev.json": GOOD, **files}.items():
        if text is not None:
            (folder / file).write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    with pytest.raises((DataError, ConfigError)) as caught:
        load_corpus(make_config({"dataset": str(folder)}))
    assert fragment in str(caught.value)
    if name not in BEFORE_DETECTION:
        assert "[read as " in str(caught.value) and "detected from its content]" in str(caught.value)


def test_a_byte_order_mark_at_the_start_is_read_as_the_builtin_readers_read_it(tmp_path):
    folder = tmp_path / "bom"
    folder.mkdir()
    (folder / "train.json").write_text("\ufeff" + GOOD * 2, encoding="utf-8")
    (folder / "dev.json").write_text("\ufeff" + GOOD, encoding="utf-8")
    corpus = load_corpus(make_config({"dataset": str(folder)}))
    assert corpus.splits["dev"][0].chars == ("高", "勇") and corpus.splits["dev"][0].tags == (
        "B-NAME",
        "E-NAME",
    )


def test_a_bad_training_sentence_is_skipped_and_a_strict_run_refuses_it(tmp_path, caplog):
    folder = tmp_path / "skip"
    folder.mkdir()
    (folder / "train.json").write_text(GOOD + '{"tokens": ["高"], "ner_tags": []}\n' + GOOD, encoding="utf-8")
    (folder / "dev.json").write_text(GOOD, encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        assert len(load_corpus(make_config({"dataset": str(folder)})).splits["train"]) == 2
    assert (
        'train.json:2: "ner_tags" has 0 tags for 1 tokens' in caplog.text
        and "(sentence skipped)" in caplog.text
    )
    with pytest.raises(DataError, match="train.json:2"):
        load_corpus(make_config({"dataset": str(folder), "strict": True}))


def test_an_unknown_bare_name_is_refused_before_any_data_is_read():
    with pytest.raises(
        ConfigError,
        match="--dataset: unknown dataset 'weibp'; known: weibo, resume, ontonotes4, fine, "
        "or a folder of your own files",
    ):
        make_config({"dataset": "weibp"})


# ---------------------------------------------------------------------------------------------
# The commands.


def softfine(*args, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "softfine", *map(str, args)], capture_output=True, text=True, check=check
    )


def test_labels_prints_the_label_space_levels_and_table1_figures(fine_dev, tmp_path):
    folder = write_folder(tmp_path / "myfine", fine_dev, "spans")
    out = softfine("labels", "--dataset", folder).stdout
    assert "myfine (span JSON lines (FiNE's)): 54 categories, 217 labels" in out and "separator '/'" in out
    assert out.splitlines()[1].split()[:6] == ["split", "sentences", "avg", "chars", "avg", "ent."]
    train = next(line for line in out.splitlines() if line.startswith("train "))
    assert train.split()[1] == "2000" and str(folder / "train.jsonl") in train
    summary = json.loads(softfine("labels", "--dataset", folder, "--json").stdout)
    assert (
        summary["separator"] == "/"
        and len(summary["levels"]) == 3
        and summary["splits"]["dev"]["sentences"] == 500
    )
    assert summary["splits"]["train"]["categories_per_level"][0] == summary["levels"][0]
    scores = json.loads(
        softfine(
            "labels",
            "--dataset",
            folder,
            "--beta",
            "4",
            "--gamma",
            "2",
            "--gold",
            "B-/work/video/teleplay",
            "--json",
        ).stdout
    )
    assert scores["I-/work/video/teleplay"] == pytest.approx(4**-2)
    bad = softfine("labels", "--dataset", folder, "--gold", "B-/work/video/teleplay", check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].endswith(
        "give --beta and --gamma too (the soft label's base and penalty)"
    )


# ---------------------------------------------------------------------------------------------
# Training: the same sentences, the same seed, the same model.


def tiny(**values):
    return make_config(
        {
            "model": "tiny",
            "tiny_layers": 1,
            "tiny_hidden": 64,
            "epochs": 2,
            "batch_size": 8,
            "lr": 5e-3,
            "device": "cpu",
            "log_every": 0,
            **values,
        }
    )


def test_training_on_a_user_folder_gives_the_builtin_readers_predictions(resume, data_dir, tmp_path):
    from softfine.batches import Split, encode
    from softfine.evaluate import predict_tags
    from softfine.model import CharIds, load_checkpoint
    from softfine.train import train

    limits = {"limit_train": 120, "limit_eval": 60}
    small = {
        "train": resume.splits["train"][:120],
        "dev": resume.splits["dev"][:60],
        "test": resume.splits["test"][:60],
    }
    folder = write_folder(tmp_path / "own", small, "tokens-words")
    builtin = train(tiny(dataset="resume", data_dir=str(data_dir), out=str(tmp_path / "builtin"), **limits))
    own = train(tiny(dataset=str(folder), out=str(tmp_path / "own-run")))
    for key in (
        "best_dev_f1",
        "best_step",
        "dev_sentences",
        "dev_gold_entities",
        "test_f1",
        "test_sentences",
    ):
        assert own[key] == builtin[key], key
    assert [
        json.loads(line)["dev_f1"]
        for line in (tmp_path / "own-run" / "metrics.jsonl").read_text().splitlines()
    ] == [
        json.loads(line)["dev_f1"]
        for line in (tmp_path / "builtin" / "metrics.jsonl").read_text().splitlines()
    ]
    predicted = []
    for run in ("builtin", "own-run"):
        model, tokenizer, labels, config = load_checkpoint(tmp_path / run / "best")
        split = Split(small["dev"], encode(small["dev"], CharIds(tokenizer), labels, 512))
        predicted.append(predict_tags(model, split, labels, __import__("torch").device("cpu")))
    assert predicted[0] == predicted[1]

    # evaluate takes the folder as train does, and counts the whole split
    scored = json.loads(
        softfine(
            "evaluate",
            "--checkpoint",
            tmp_path / "own-run" / "best",
            "--dataset",
            folder,
            "--split",
            "dev",
            "--json",
        ).stdout
    )
    assert (
        scored["dataset"] == "own"
        and scored["sentences"] == 60
        and scored["f1"] == pytest.approx(own["best_dev_f1"])
    )


def test_training_from_a_corpus_needs_no_data_files(resume, tmp_path):
    """What a search's trial does on a node without the data: the driver's corpus, no file read."""
    from softfine.train import train

    folder = write_folder(tmp_path / "gone", {k: v[:30] for k, v in resume.splits.items()}, "columns-bio-tab")
    config = tiny(dataset=str(folder), epochs=1, out=str(tmp_path / "run"))
    corpus = load_corpus(config)
    shutil.rmtree(folder)
    result = train(config, corpus=corpus)
    assert result["dev_sentences"] == 30 and result["data_sha256"] == corpus.sha256
    with pytest.raises(DataError, match="no such folder"):
        load_corpus(config)


def test_train_takes_run_ner_files_and_the_tag_scheme_flag(resume, tmp_path):
    small = {"train": resume.splits["train"][:20], "dev": resume.splits["dev"][:10]}
    folder = write_folder(tmp_path / "flags", small, "columns-bio-tab")
    files = ["--train-file", folder / "train.txt", "--validation-file", folder / "dev.txt"]
    common = [
        "--model",
        "tiny",
        "--tiny-layers",
        "1",
        "--tiny-hidden",
        "64",
        "--epochs",
        "1",
        "--device",
        "cpu",
    ]
    result = json.loads(softfine("train", *files, *common, "--out", tmp_path / "run").stdout)
    assert result["dev_sentences"] == 10 and result["dev_gold_entities"] == sum(
        t[0] in "BS" for s in small["dev"] for t in s.tags
    )
    refused = softfine(
        "train", *files, "--tag-scheme", "bmes", *common, "--out", tmp_path / "bmes", check=False
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"softfine: error: {folder / 'dev.txt'}:")
        and "unknown tag prefix" in last
        and "BMES" in last
    )
