import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from softfine.config import FROM_SCRATCH, TrainConfig, make_config
from softfine.errors import ConfigError
from softfine.losses import feature_kl, soft_cross_entropy, softfine_loss
from softfine.model import CharIds, load_checkpoint, tiny_tokenizer
from softfine.optim import TRAINING_STATE
from softfine.predict import Predictor
from softfine.train import train


def tiny_config(data_dir, out, **overrides) -> TrainConfig:
    # a smaller tiny encoder than the default, for speed
    values = dict(
        dataset="resume",
        data_dir=str(data_dir),
        model="tiny",
        tiny_layers=1,
        tiny_hidden=64,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        limit_train=48,
        limit_eval=24,
        out=str(out),
        seed=7,
        dropout=0.1,
        log_every=0,
    )
    values.update(overrides)
    return make_config(values)


def test_train_reports_every_evaluation_and_keeps_the_best(data_dir, tmp_path):
    reports = []
    result = train(
        tiny_config(data_dir, tmp_path / "run", eval_every=4),
        on_evaluate=lambda metrics, out: reports.append(
            (metrics, sorted(p.name for p in (tmp_path / "run").iterdir()))
        ),
    )
    # 48 sentences / 8 = 6 steps an epoch: evaluations at steps 4, 6 (epoch end), 8, 12 (epoch end)
    assert [m["step"] for m, _ in reports] == [4, 6, 8, 12]
    for metrics, files in reports:
        assert {"best", "state", "metrics.jsonl"} <= set(files)
        assert {
            "train_loss",
            "train_loss_soft",
            "train_loss_aug",
            "train_loss_fea",
            "dev_precision",
            "dev_recall",
            "dev_f1",
            "best_dev_f1",
            "epoch",
        } <= set(metrics)
        assert metrics["dev_sentences"] == 24 and metrics["dev_gold_entities"] > 0
        assert metrics["train_loss_aug"] > 0 and metrics["train_loss_fea"] > 0
    assert result["best_dev_f1"] == max(m["dev_f1"] for m, _ in reports)
    assert {"test_precision", "test_recall", "test_f1", "data_sha256"} <= set(result)
    assert result["test_sentences"] == 24 and result["test_gold_entities"] > 0
    best = tmp_path / "run" / "best"
    assert {"model.safetensors", "labels.json", "config.json", "tokenizer.json", "train_config.json"} <= {
        p.name for p in best.iterdir()
    }
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    test_scores = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert test_scores["f1"] == result["test_f1"] and "per_category" in test_scores


def test_resume_continues_exactly(data_dir, tmp_path):
    snapshot = tmp_path / "after-epoch-1"

    def keep_first(metrics, out):
        if metrics["epoch"] == 1:
            shutil.copytree(out, snapshot)

    full = train(tiny_config(data_dir, tmp_path / "full"), on_evaluate=keep_first)
    resumed_reports = []
    resumed = train(
        tiny_config(data_dir, tmp_path / "resumed"),
        on_evaluate=lambda m, o: resumed_reports.append(m),
        resume_from=snapshot,
    )
    assert [m["step"] for m in resumed_reports] == [12]  # only the second epoch ran
    a, *_ = load_checkpoint(tmp_path / "full" / "state")
    b, *_ = load_checkpoint(tmp_path / "resumed" / "state")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert resumed["best_dev_f1"] == pytest.approx(full["best_dev_f1"])


def test_ablations_switch_the_losses(data_dir, tmp_path):
    reports = []
    train(
        tiny_config(data_dir, tmp_path / "plain", epochs=1, soft=False, aug=False),
        lambda m, o: reports.append(m),
    )
    assert reports[0]["train_loss_aug"] == 0 and reports[0]["train_loss_fea"] == 0
    assert reports[0]["train_loss"] == pytest.approx(reports[0]["train_loss_soft"])


def test_losses():
    logits = torch.randn(5, 7)
    gold = torch.tensor([0, 3, 6, 2, 2])
    every = torch.ones(5, dtype=torch.bool)
    assert soft_cross_entropy(logits, F.one_hot(gold, 7).float(), every) == pytest.approx(
        float(F.cross_entropy(logits, gold)), rel=1e-5
    )
    soft = torch.rand(5, 7)
    assert soft_cross_entropy(logits, soft, every) == pytest.approx(
        float(-(soft * logits.log_softmax(-1)).sum(-1).mean()), rel=1e-5
    )
    h = torch.randn(4, 16)
    assert float(feature_kl(h, h, every[:4])) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_kl(h, torch.randn(4, 16), every[:4])) > 0
    assert float(feature_kl(h, h + 1, torch.zeros(4, dtype=torch.bool))) == 0.0  # no entity character
    parts = softfine_loss(
        logits,
        soft,
        every,
        aug_logits=logits,
        features=h,
        aug_features=h + 1,
        entities=every[:4],
        alpha_aug=0.1,
        alpha_fea=0.5,
    )
    assert float(parts["loss"]) == pytest.approx(
        float(parts["loss_soft"] * 1.1 + 0.5 * parts["loss_fea"]), rel=1e-5
    )


def test_masked_losses_equal_the_losses_of_the_selected_characters():
    # A padded (2, 6) batch: the masked means are the plain means over the selected rows, whatever
    # the padding holds (here huge scores), so padding never changes a loss.
    logits, targets, features, aug = (
        torch.randn(2, 6, 9),
        torch.rand(2, 6, 9),
        torch.randn(2, 6, 16),
        torch.randn(2, 6, 16),
    )
    chars = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    entities = chars & torch.tensor([[0, 1, 0, 1, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    logits[~chars], features[~entities] = 1e4, -1e4
    ce = soft_cross_entropy(logits, targets, chars)
    assert float(ce) == pytest.approx(
        float(-(targets[chars] * logits[chars].log_softmax(-1)).sum(-1).mean()), rel=1e-5
    )
    kl = feature_kl(features, aug, entities)
    expected = F.kl_div(
        aug[entities].log_softmax(-1),
        features[entities].log_softmax(-1),
        log_target=True,
        reduction="batchmean",
    )
    assert float(kl) == pytest.approx(float(expected), rel=1e-5) and float(kl) > 0


def test_one_token_per_character():
    tokenizer = tiny_tokenizer("北京abc123")
    ids = CharIds(tokenizer)(list("北京 ABC 12x3"))
    assert len(ids) == len("北京 ABC 12x3")
    vocab = tokenizer.get_vocab()
    assert ids[2] == vocab["[unused1]"] and ids[3] == vocab["a"] and ids[9] == tokenizer.unk_token_id


def test_predict_offsets_match_the_text(data_dir, tmp_path):
    result = train(tiny_config(data_dir, tmp_path / "run", epochs=1))
    texts = ["高勇：男，中国国籍，无境外居留权。", "Tom 在 IBM 工作 3 年", ""]
    found = Predictor.from_checkpoint(result["best_checkpoint"]).predict(texts)
    assert len(found) == 3 and found[2] == []
    for text, entities in zip(texts, found):
        for e in entities:
            assert text[e["start"] : e["end"] + 1] == e["text"] and e["levels"] == [e["category"]]


def test_long_sentences_are_split_into_windows(data_dir, tmp_path):
    result = train(tiny_config(data_dir, tmp_path / "run", epochs=1, max_length=16))
    predictor = Predictor.from_checkpoint(result["best_checkpoint"])
    text = "中国国籍" * 20
    [entities] = predictor.predict([text])
    assert all(text[e["start"] : e["end"] + 1] == e["text"] for e in entities)


def test_bad_config_and_missing_device(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="--beta: Input should be greater than 1"):
        tiny_config(data_dir, tmp_path, beta=1.0)
    with pytest.raises(ConfigError, match="--limit-train: Input should be greater than or equal to 1"):
        tiny_config(data_dir, tmp_path, limit_train=0)
    # A process that sees no GPU (hidden with CUDA_VISIBLE_DEVICES=-1, so also on a machine that has one)
    code = (
        "import sys; from softfine.device import resolve_device; from softfine.errors import DeviceError\n"
        "try:\n    resolve_device('cuda')\nexcept DeviceError as err:\n    sys.exit(str(err))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "-1"},
    )
    assert done.returncode == 1 and done.stderr.startswith("--device cuda: torch sees no CUDA device"), (
        done.stderr
    )


def test_config_is_plain_data():
    config = TrainConfig()
    assert dataclasses.asdict(config)["beta"] == 3.0
    assert json.loads(json.dumps(dataclasses.asdict(config)))["model"] == "bert-base-chinese"


def test_the_tiny_encoder_has_defaults_of_its_own():
    tiny, bert = TrainConfig(model="tiny"), TrainConfig()
    assert {k: getattr(tiny, k) for k in FROM_SCRATCH} == FROM_SCRATCH
    assert (bert.lr, bert.batch_size, bert.epochs, bert.dropout, bert.schedule) == (
        2e-5,
        4,
        12,
        0.5,
        "linear",
    )
    given = TrainConfig(model="tiny", lr=5e-4)  # a value given wins over the encoder's default
    assert given.lr == 5e-4 and given.batch_size == FROM_SCRATCH["batch_size"]


def test_a_planted_pickle_in_the_training_state_is_refused_and_never_run(data_dir, tmp_path):
    snapshot = tmp_path / "after-epoch-1"
    train(
        tiny_config(data_dir, tmp_path / "full", epochs=1),
        on_evaluate=lambda metrics, out: shutil.copytree(out, snapshot, dirs_exist_ok=True),
    )
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state = torch.load(snapshot / "state" / TRAINING_STATE, weights_only=True)
    state["extra"] = Payload()
    torch.save(state, snapshot / "state" / TRAINING_STATE)  # a zip file as torch writes it, a payload inside
    with pytest.raises(ConfigError, match=r"training_state.pt: refused to load it"):
        train(tiny_config(data_dir, tmp_path / "resumed"), resume_from=snapshot)
    assert not marker.exists()


def test_encoder_from_a_local_directory(data_dir, tmp_path):
    """The real loading path (AutoTokenizer/AutoModel.from_pretrained) on a directory laid out like a
    Hugging Face model, since the Hub is out of reach here."""
    from transformers import BertConfig, BertModel

    tokenizer = tiny_tokenizer("高勇男中国国籍无境外居留权")
    BertModel(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    result = train(tiny_config(data_dir, tmp_path / "run", model=str(tmp_path / "encoder"), epochs=1))
    model, tokenizer, *_ = load_checkpoint(result["best_checkpoint"])
    assert model.encoder.config.hidden_size == 32
    assert tokenizer.convert_tokens_to_ids("[E]") != tokenizer.unk_token_id
    assert model.encoder.get_input_embeddings().num_embeddings == len(tokenizer)


@pytest.mark.parametrize("total_steps", [1, 2, 3, 5, 10, 11, 40])
def test_the_one_cycle_schedule_runs_short_trainings(total_steps):
    # OneCycleLR divided by zero when warm-up ended at step 1 or earlier (10 steps at ratio 0.1).
    from softfine.optim import make_scheduler

    config = make_config(dict(dataset="resume", model="tiny", schedule="onecycle", warmup_ratio=0.1, lr=1e-3))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = make_scheduler(config, optimizer, total_steps)
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total_steps - 1):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(0 <= lr <= config.lr + 1e-12 for lr in lrs)
    if total_steps >= 3:  # a warm-up to the peak, then a decay
        assert lrs[0] < max(lrs) and lrs[-1] < max(lrs)
