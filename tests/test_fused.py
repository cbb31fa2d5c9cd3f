"""Fused training (issue 18): each member of a fused group is the run it would be alone, step by
step (losses within 1e-5, relative), with the same dev scores, the same best checkpoint's
predictions, the same files, and a resume that continues exactly. CPU, fp32, BERT's dropout on."""

import shutil
from pathlib import Path

import pytest
import torch
from test_step import forward_loss
from transformers import set_seed

from softfine.batches import Split, encode, train_loader
from softfine.config import make_config
from softfine.datasets import load_corpus
from softfine.errors import ConfigError
from softfine.evaluate import predict_tags
from softfine.fused import FusedModel
from softfine.labels import LabelSpace
from softfine.model import CharIds, SoftFiNEModel, build_model, load_checkpoint, random_model
from softfine.optim import TRAINING_STATE, build_optimizer, make_scheduler
from softfine.stats import categories
from softfine.train import LOSS_PARTS, train, train_group, train_step

# Three points of the paper's grid: every searched value differs somewhere.
POINTS = [
    dict(alpha_aug=0.1, alpha_fea=0.1, beta=2.0, gamma=1.5),
    dict(alpha_aug=0.01, alpha_fea=0.005, beta=3.0, gamma=2.0),
    dict(alpha_aug=0.1, alpha_fea=0.05, beta=4.0, gamma=2.5, soft_scope="related"),
]


def tiny_config(data_dir, out, **overrides):
    # as tests/test_train.py's: 48 sentences at batch 8, 6 steps an epoch; dropout 0.1 in BERT and the head
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


def files_of(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def dev_tags(data_dir, checkpoint: Path) -> list[list[str]]:
    model, tokenizer, labels, settings = load_checkpoint(checkpoint)
    sentences = load_corpus(tiny_config(data_dir, checkpoint), ["dev"]).splits["dev"]
    split = Split(sentences, encode(sentences, CharIds(tokenizer), labels, settings["max_length"]))
    return predict_tags(model, split, labels, torch.device("cpu"))


def test_each_member_of_a_group_trains_as_it_would_alone(data_dir, tmp_path):
    # eval_every=1: every step's losses and dev scores are in metrics.jsonl and on_evaluate
    configs = [tiny_config(data_dir, tmp_path / f"fused{k}", eval_every=1, **p) for k, p in enumerate(POINTS)]
    fused_reports = [[] for _ in configs]
    fused = train_group(configs, on_evaluate=lambda k, metrics, out: fused_reports[k].append(metrics))
    worst = 0.0
    for k, point in enumerate(POINTS):
        alone_reports = []
        alone = train(
            tiny_config(data_dir, tmp_path / f"alone{k}", eval_every=1, **point),
            on_evaluate=lambda metrics, out, reports=alone_reports: reports.append(metrics),
        )
        assert (
            [m["step"] for m in fused_reports[k]] == [m["step"] for m in alone_reports] == list(range(1, 13))
        )
        for f, a in zip(fused_reports[k], alone_reports):
            for key in LOSS_PARTS:
                worst = max(worst, relative(f[f"train_{key}"], a[f"train_{key}"]))
                assert f[f"train_{key}"] == pytest.approx(a[f"train_{key}"], rel=1e-5), (k, f["step"], key)
            assert (f["dev_f1"], f["dev_sentences"], f["dev_gold_entities"]) == (
                a["dev_f1"],
                a["dev_sentences"],
                a["dev_gold_entities"],
            ), (k, f["step"])
        assert fused[k]["best_step"] == alone["best_step"] and fused[k]["best_dev_f1"] == alone["best_dev_f1"]
        assert (
            fused[k]["test_f1"] == alone["test_f1"]
            and fused[k]["test_gold_entities"] == alone["test_gold_entities"]
        )
        assert files_of(tmp_path / f"fused{k}") == files_of(tmp_path / f"alone{k}")
        tags = dev_tags(data_dir, tmp_path / f"fused{k}" / "best")
        assert tags == dev_tags(data_dir, tmp_path / f"alone{k}" / "best")
    # the points differ, and so do their runs: the comparison could fail
    assert len({round(r[-1]["train_loss"], 6) for r in fused_reports}) == len(POINTS)
    print(f"largest relative loss difference, fused against alone: {worst:.2e}")


def test_a_group_of_one_steps_as_the_plain_model_does(data_dir, tmp_path):
    # The vmapped step against the step without vmap (forward_loss on the model itself,
    # torch's clip_grad_norm_, AdamW): the same losses, BERT's dropout included.
    config = tiny_config(data_dir, tmp_path / "run", epochs=1, eval_every=1)
    reports = []
    train(config, on_evaluate=lambda metrics, out: reports.append(metrics))

    set_seed(config.seed)
    sentences = load_corpus(config, ["train", "dev", "test"]).splits
    labels = LabelSpace.infer([c for s in sentences.values() for c in categories(s)], config.label_separator)
    table = labels.soft_targets(config.beta, config.gamma, config.soft_scope)
    tokenizer, model = build_model(
        config.model,
        labels,
        config.dropout,
        (c for s in sentences["train"] for c in s.chars),
        config.tiny_shape(),
    )
    model.train()
    examples = encode(sentences["train"], CharIds(tokenizer), labels, config.max_length)
    optimizer = build_optimizer(model, config)
    scheduler = make_scheduler(config, optimizer, 6)
    loss = forward_loss(model, table, config)
    for batch, report in zip(
        train_loader(examples, config.batch_size, config.seed, 0, False, 0), reports, strict=True
    ):
        parts = train_step(loss, batch, torch.device("cpu"))
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step(), scheduler.step(), optimizer.zero_grad(set_to_none=True)
        for key in LOSS_PARTS:
            assert report[f"train_{key}"] == pytest.approx(float(parts[key]), rel=1e-5), (report["step"], key)


def test_a_group_resumes_exactly(data_dir, tmp_path):
    points = POINTS[:2]
    snapshots = [tmp_path / f"after-epoch-1-{k}" for k in range(len(points))]

    def keep_first(k, metrics, out):
        if metrics["epoch"] == 1:
            shutil.copytree(out, snapshots[k])

    full = train_group(
        [tiny_config(data_dir, tmp_path / f"full{k}", **p) for k, p in enumerate(points)], keep_first
    )
    reports = []
    resumed = train_group(
        [tiny_config(data_dir, tmp_path / f"resumed{k}", **p) for k, p in enumerate(points)],
        lambda k, metrics, out: reports.append((k, metrics["step"])),
        resume_from=snapshots,
    )
    assert reports == [(0, 12), (1, 12)]  # only the second epoch ran
    for k in range(len(points)):
        a, *_ = load_checkpoint(tmp_path / f"full{k}" / "state")
        b, *_ = load_checkpoint(tmp_path / f"resumed{k}" / "state")
        for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.allclose(pa, pb, atol=1e-6), (k, name)
        assert resumed[k]["best_dev_f1"] == pytest.approx(full[k]["best_dev_f1"])
        assert files_of(tmp_path / f"resumed{k}") == files_of(tmp_path / f"full{k}")
    with pytest.raises(ConfigError, match="2 directories for a group of 1"):
        train_group([tiny_config(data_dir, tmp_path / "one")], resume_from=snapshots)


def test_a_group_of_configs_that_differ_in_more_than_the_loss_is_refused(data_dir, tmp_path):
    base = tiny_config(data_dir, tmp_path / "a")
    with pytest.raises(
        ConfigError,
        match=r"^fused group: member 1 has lr=0.002 but member 0 has 0.001; members may "
        r"differ only in alpha_aug, alpha_fea, beta, gamma, soft_scope, soft and out$",
    ):
        train_group([base, tiny_config(data_dir, tmp_path / "b", beta=4.0, lr=2e-3)])
    with pytest.raises(ConfigError, match="two members write to"):
        train_group([base, tiny_config(data_dir, tmp_path / "a", beta=4.0)])
    with pytest.raises(ConfigError, match="member 1 skips the augmented sentences"):
        train_group([base, tiny_config(data_dir, tmp_path / "b", alpha_aug=0.0, alpha_fea=0.0)])
    assert not (tmp_path / "a").exists()  # refused before anything is written


def test_each_member_clips_its_own_gradients():
    labels = LabelSpace.from_categories(["ORG", "PER"])
    shape = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=64)
    models = [SoftFiNEModel(random_model("abcdef", labels, 0.1, shape)[1]) for _ in range(3)]
    fused = FusedModel(models)
    for model, scale in zip(models, (0.01, 1.0, 100.0)):  # norms below, near and above max_norm
        for p in model.parameters():
            p.grad = torch.randn_like(p) * scale
    for name, stacked in fused.params.items():
        stacked.grad = torch.stack([dict(m.named_parameters())[name].grad for m in models])
    norms = fused.clip_grad_norms(1.0)
    for k, model in enumerate(models):
        assert float(norms[k]) == pytest.approx(
            float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)), rel=1e-5
        )
        for name, p in model.named_parameters():
            assert torch.allclose(fused.params[name].grad[k], p.grad, rtol=1e-5, atol=1e-8), (k, name)


def test_a_members_training_state_holds_its_own_moments_only(data_dir, tmp_path):
    # torch.save writes a view's whole storage, and a moment sliced by another parameter's shape stays
    # stacked: either way a member's file would carry every member's, K times a run alone's file.
    # 16 sentences at batch 8: two steps.
    short = dict(epochs=1, limit_train=16, limit_eval=8)
    train_group([tiny_config(data_dir, tmp_path / f"fused{k}", **short, **p) for k, p in enumerate(POINTS)])
    train(tiny_config(data_dir, tmp_path / "alone", **short, **POINTS[0]))
    alone = (tmp_path / "alone" / "state" / TRAINING_STATE).stat().st_size
    for k in range(len(POINTS)):
        member = (tmp_path / f"fused{k}" / "state" / TRAINING_STATE).stat().st_size
        assert member == pytest.approx(alone, rel=0.05), (k, member, alone)
    # what the member's own AdamW would hold: moments of its parameters' shapes, in AdamW's order
    model, *_ = load_checkpoint(tmp_path / "fused1" / "state")
    params = [
        p
        for group in build_optimizer(model, tiny_config(data_dir, tmp_path)).param_groups
        for p in group["params"]
    ]
    saved = torch.load(tmp_path / "fused1" / "state" / TRAINING_STATE, weights_only=True)["optimizer"][
        "state"
    ]
    assert saved.keys() == set(range(len(params)))
    for i, moments in saved.items():
        assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == params[i].shape, i
