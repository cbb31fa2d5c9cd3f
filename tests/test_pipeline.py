"""A checkpoint as users call it: `transformers.pipeline("token-classification", model=DIR, ...)`
and the MLflow pyfunc model find the entities `softfine predict` finds.

The pipeline groups tokens by B-/I- prefixes only, so the exported config names the BIOES labels
B-X (B, S) and I-X (I, E) while labels.json keeps the project's own. Where the model's tags are
valid BIOES the two readings agree; where they are not (a weak model), `predict` reads no entity,
as the strict evaluation does, and the pipeline reads whatever its grouping makes of them.
"""

from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path

import pytest
from seqeval.metrics.sequence_labeling import get_entities
from seqeval.scheme import IOBES, Entities

from softfine.batches import Split, encode
from softfine.config import make_config
from softfine.data import Sentence
from softfine.datasets import read_split
from softfine.evaluate import predict_tags
from softfine.model import load_checkpoint, pipeline_label
from softfine.predict import Predictor
from softfine.train import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(data_dir, tmp_path_factory) -> Path:
    """A tiny encoder trained on 400 Resume sentences (test F1 about 0.4): enough to tag entities."""
    out = tmp_path_factory.mktemp("run")
    config = make_config(
        dict(
            dataset="resume",
            data_dir=str(data_dir),
            model="tiny",
            tiny_layers=1,
            tiny_hidden=128,
            epochs=4,
            batch_size=16,
            lr=5e-3,
            limit_train=400,
            limit_eval=24,
            out=str(out),
            seed=7,
            dropout=0.1,
            log_every=0,
        )
    )
    return Path(train(config)["best_checkpoint"])


@pytest.fixture(scope="module")
def texts(data_dir) -> list[str]:
    """Resume's test split and Weibo's first 100 test sentences: Chinese text with digits, Latin
    letters and punctuation. Left out: texts with characters a pipeline drops and the model sees
    as a blank (whitespace; U+FFFD, which BERT's normalizer removes): 5 of Weibo's."""
    sentences = read_split("resume", "test", data_dir) + read_split("weibo", "test", data_dir)[:100]
    texts = ["".join(s.chars) for s in sentences]
    kept = [t for t in texts if not any(c.isspace() or c == "\ufffd" for c in t)]
    assert len(kept) >= len(texts) - 10
    return kept


def pipeline_of(checkpoint: Path, **kwargs):
    from transformers import pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipeline("token-classification", model=str(checkpoint), device="cpu", **kwargs)


@pytest.fixture(scope="module")
def tags(checkpoint, texts) -> list[list[str]]:
    """The model's tag of every character of every text, as `softfine predict` computes them."""
    predictor = Predictor.from_checkpoint(checkpoint, "cpu")
    sentences = [Sentence(tuple(t), ("O",) * len(t), f"text {i}") for i, t in enumerate(texts)]
    split = Split(sentences, encode(sentences, predictor.char_ids, predictor.labels, predictor.max_length))
    return predict_tags(predictor.model, split, predictor.labels, predictor.device, 32)


def well_formed(tags: list[str]) -> bool:
    """The tags are valid BIOES: the strict reading and conlleval's lenient one find the same chunks."""
    return [(e.tag, e.start, e.end - 1) for e in Entities([tags], IOBES).entities[0]] == [
        (c, s, e) for c, s, e in get_entities(tags)
    ]


def test_the_exported_config_names_labels_the_pipeline_reads(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    labels = load_checkpoint(checkpoint)[2].labels
    assert labels[0] == "O" and any(label.startswith(("S-", "E-")) for label in labels)  # labels.json: BIOES
    assert [config["id2label"][str(i)] for i in range(len(labels))] == [
        pipeline_label(label) for label in labels
    ]
    assert {config["id2label"][str(i)][:2] for i in range(1, len(labels))} == {"B-", "I-"}
    assert config["label2id"] == {label: i for i, label in enumerate(labels)}
    assert [pipeline_label(t) for t in ("O", "B-NAME", "I-NAME", "E-NAME", "S-NAME", "S-/a/b")] == [
        "O",
        "B-NAME",
        "I-NAME",
        "I-NAME",
        "B-NAME",
        "B-/a/b",
    ]


def test_the_pipeline_sees_one_token_per_character_as_the_model_does(checkpoint, texts, tags):
    """aggregation_strategy="none": one token per character (digits and Latin letters too), each
    labelled as `softfine predict`'s model labels it, on every sentence."""
    tagger = pipeline_of(checkpoint, aggregation_strategy="none", ignore_labels=[])
    assert sum(any(c.isascii() and c.isalnum() for c in t) for t in texts) > 100  # digits and Latin are there
    for text, ours, tokens in zip(texts, tags, tagger(texts)):
        assert [(t["start"], t["end"]) for t in tokens] == [(i, i + 1) for i in range(len(text))], text
        assert [t["entity"] for t in tokens] == [pipeline_label(tag) for tag in ours], text


@pytest.mark.parametrize("strategy", ["simple", "first"])
def test_the_pipeline_finds_the_entities_predict_finds(checkpoint, texts, tags, strategy):
    tagger = pipeline_of(checkpoint, aggregation_strategy=strategy)
    compared = [i for i, t in enumerate(tags) if well_formed(t)]
    ours = Predictor.from_checkpoint(checkpoint, "cpu").predict([texts[i] for i in compared])
    found = list(zip([texts[i] for i in compared], ours, tagger([texts[i] for i in compared])))
    # Something to compare: sentences the model tags validly, with entities.
    assert len(compared) >= 30 and sum(len(e) for _, e, _ in found) >= 40, (len(compared), found[:3])
    assert sum(1 for _, e, _ in found if len(e) > 1) >= 5
    for text, entities, piped in found:
        assert [(e["start"], e["end"] + 1, e["category"], e["text"]) for e in entities] == [
            (p["start"], p["end"], p["entity_group"], text[p["start"] : p["end"]]) for p in piped
        ], text


def random_tags(rng: random.Random, length: int) -> list[str]:
    """Valid BIOES tags: random chunks of random categories, adjacent ones included."""
    tags = ["O"] * length
    i = 0
    while i < length:
        size = rng.choice([0, 0, 1, 1, 2, 3])
        if size == 0 or i + size > length:
            i += 1
            continue
        category = rng.choice(["NAME", "ORG", "/a/b"])
        tags[i : i + size] = (
            [f"S-{category}"]
            if size == 1
            else [f"B-{category}"] + [f"I-{category}"] * (size - 2) + [f"E-{category}"]
        )
        i += size
    return tags


def test_the_pipelines_grouping_reads_every_valid_bioes_sequence_right(checkpoint):
    """The pipeline's own grouping (TokenClassificationPipeline.group_entities) on the exported
    names of valid BIOES tags: S-X S-X, E-X B-X, S-X B-X E-X, ... are the strict reading's entities."""
    tagger = pipeline_of(checkpoint, aggregation_strategy="simple")
    rng = random.Random(0)
    cases = [
        ["S-NAME", "S-NAME"],
        ["B-NAME", "E-NAME", "B-NAME", "E-NAME"],
        ["S-NAME", "B-NAME", "E-NAME"],
        ["B-NAME", "E-NAME", "S-NAME"],
        ["B-NAME", "I-NAME", "E-NAME", "S-ORG"],
        ["S-ORG", "S-NAME"],
    ]
    cases += [random_tags(rng, rng.randint(1, 12)) for _ in range(300)]
    for tags in cases:
        tokens = [
            {
                "entity": pipeline_label(tag),
                "score": 1.0,
                "index": i + 1,
                "word": "字",
                "start": i,
                "end": i + 1,
            }
            for i, tag in enumerate(tags)
        ]
        groups = [g for g in tagger.group_entities(tokens) if g["entity_group"] != "O"]
        strict = Entities([tags], IOBES).entities[0]
        assert [(g["entity_group"], g["start"], g["end"]) for g in groups] == [
            (e.tag, e.start, e.end) for e in strict
        ], tags


def test_the_mlflow_model_still_predicts_what_predict_does(checkpoint, tmp_path):
    import mlflow

    texts = [
        "高勇：男，中国国籍，无境外居留权。",
        "1963年出生，工科学士，高级工程师，北京物资学院客座副教授。",
    ]
    path = tmp_path / "model"
    mlflow.pyfunc.save_model(
        str(path),
        python_model=str(REPO / "tune" / "pyfunc.py"),
        artifacts={"checkpoint": str(checkpoint)},
        code_paths=[str(REPO / "softfine")],
    )
    loaded = mlflow.pyfunc.load_model(str(path))
    assert loaded.predict(texts) == Predictor.from_checkpoint(checkpoint, "cpu").predict(texts)


def test_a_checkpoint_whose_config_names_other_labels_is_refused(checkpoint, tmp_path):
    """labels.json is the label space; config.json must agree with it."""
    from softfine.errors import ConfigError

    copy = tmp_path / "best"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    config["id2label"]["1"], config["id2label"]["2"] = config["id2label"]["2"], config["id2label"]["1"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"labels.json or config.json is missing or damaged \(label 1 is"):
        load_checkpoint(copy)
