"""The training step as a GPU needs it (issue 17): no value read inside a step, a few padded
lengths, padding that changes no loss and no prediction, and a compiled step that trains as the
eager one does."""

import gc
import json
import weakref

import pytest
import torch
from torch._dynamo.utils import counters, get_static_address_type

from softfine.batches import Split, encode, train_loader
from softfine.config import TrainConfig, make_config
from softfine.datasets import load_corpus
from softfine.device import attention_kernels, compile_step, pad_multiple
from softfine.evaluate import predict_tags
from softfine.fused import FusedModel, member_loss, uses_augmentation
from softfine.labels import LabelSpace
from softfine.model import CharIds, SoftFiNEModel, load_checkpoint, random_model
from softfine.stats import categories
from softfine.train import GroupRun, label_space, new_encoder, output_directory, train

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128)


def forward_loss(model: SoftFiNEModel, soft_table: torch.Tensor, config: TrainConfig):
    """`loss(input_ids, aug_ids, attention_mask, label_ids)`: one model's forward pass and SoftFiNE
    loss, without vmap: what a member of a fused group computes (fused.member_loss), to compare with."""
    use_aug = uses_augmentation(config)

    def loss(input_ids, aug_ids, attention_mask, label_ids) -> dict[str, torch.Tensor]:
        return member_loss(
            model,
            soft_table,
            use_aug,
            config.alpha_aug,
            config.alpha_fea,
            input_ids,
            aug_ids,
            attention_mask,
            label_ids,
        )

    return loss


def tiny_config(data_dir, out, **overrides) -> TrainConfig:
    # 45 sentences at batch 8: the last batch of an epoch is short, so padding rows are exercised
    values = dict(
        dataset="resume",
        data_dir=str(data_dir),
        model="tiny",
        tiny_layers=1,
        tiny_hidden=64,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        limit_train=45,
        limit_eval=40,
        out=str(out),
        seed=7,
        dropout=0.0,
        log_every=0,
        eval_every=3,
    )
    values.update(overrides)
    return make_config(values)


@pytest.mark.parametrize("members", [1, 3])
def test_a_step_reads_no_value_from_the_device(members):
    # On meta tensors nothing has a value: an op that needs one (boolean indexing, `if mask.all()`,
    # .item()) raises. The training loop's step (a fused group; a run alone is a group of one)
    # runs here whole, so it runs on a GPU without the host waiting for it.
    labels = LabelSpace.from_categories(["ORG", "PER"])
    _, net = random_model("abcdefg", labels, 0.1, SHAPE)
    fused = FusedModel([SoftFiNEModel(net).to("meta")] * members).train()
    tables = torch.stack([labels.soft_targets(3.0, 2.0)] * members).to("meta")
    alphas = torch.full((members,), 0.01, device="meta")
    ids = torch.zeros(4, 64, dtype=torch.long, device="meta")
    with attention_kernels(torch.device("cpu"), "math" if members > 1 else "auto"):
        parts = fused.loss(tables, True, alphas, alphas)(ids, ids, ids, ids)
        parts["loss"].sum().backward()
    fused.clip_grad_norms(1.0)
    assert set(parts) == {"loss", "loss_soft", "loss_aug", "loss_fea"} and parts["loss"].shape == (members,)
    assert all(p.grad is not None for p in fused.params.values())
    with pytest.raises(NotImplementedError):  # what the step did before: logits[chars]
        parts["loss"].new_zeros(4, 8)[ids[:, :8].ne(-100)]


def test_weibo_batches_take_a_few_lengths_and_full_rows(data_dir):
    config = make_config(dict(dataset="weibo", data_dir=str(data_dir), model="tiny", batch_size=16))
    sentences = load_corpus(config, ["train"]).splits["train"]
    labels = LabelSpace.infer(categories(sentences), config.label_separator)
    tokenizer, _ = random_model((c for s in sentences for c in s.chars), labels, 0.1, SHAPE)
    examples = encode(sentences, CharIds(tokenizer), labels, config.max_length)

    def shapes(multiple: int) -> set[tuple[int, int]]:
        return {
            tuple(b["input_ids"].shape) for b in train_loader(examples, 16, config.seed, 0, False, multiple)
        }

    bucketed, dynamic = shapes(pad_multiple(None, torch.device("cuda"))), shapes(0)
    assert len({length for _, length in bucketed}) <= 8 and {rows for rows, _ in bucketed} == {16}
    assert all(length % 64 == 0 for _, length in bucketed)
    assert len({length for _, length in dynamic}) > 20  # what a GPU saw before: a new shape every few steps


def test_padding_changes_no_loss_and_no_gradient(data_dir):
    # One batch of real Resume windows (5 of them: 3 padding rows at batch 8), the loss and its
    # gradients at its own length and padded to multiples of 64: the same up to float rounding.
    config = make_config(dict(dataset="resume", data_dir=str(data_dir), model="tiny", limit_train=5))
    sentences = load_corpus(config, ["train"]).splits["train"]
    labels = LabelSpace.infer(categories(sentences), config.label_separator)
    no_dropout = dict(SHAPE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tokenizer, net = random_model((c for s in sentences for c in s.chars), labels, 0.0, no_dropout)
    model = SoftFiNEModel(net).train()
    loss = forward_loss(model, labels.soft_targets(3.0, 2.0), config)
    examples = encode(sentences, CharIds(tokenizer), labels, config.max_length)
    results = []
    for multiple in (0, 64):
        batch = next(iter(train_loader(examples, 8, 0, 0, False, multiple)))
        model.zero_grad()
        parts = loss(batch["input_ids"], batch["aug_ids"], batch["attention_mask"], batch["label_ids"])
        parts["loss"].backward()
        results.append((batch["input_ids"].shape, parts, [p.grad.clone() for p in model.parameters()]))
    (short, plain, plain_grads), (padded, bucketed, bucketed_grads) = results
    assert short[0] == 5 and padded[0] == 8 and padded[1] % 64 == 0 and short[1] < padded[1]
    for key in plain:
        assert bucketed[key].item() == pytest.approx(plain[key].item(), rel=1e-5), key
    assert plain["loss_aug"].item() > 0 and plain["loss_fea"].item() > 0
    for a, b in zip(plain_grads, bucketed_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_padding_changes_no_prediction(data_dir, tmp_path):
    train(tiny_config(data_dir, tmp_path / "run"))
    model, tokenizer, labels, settings = load_checkpoint(tmp_path / "run" / "best")
    sentences = load_corpus(tiny_config(data_dir, tmp_path), ["dev"]).splits["dev"]
    split = Split(sentences, encode(sentences, CharIds(tokenizer), labels, settings["max_length"]))
    tags = {
        m: predict_tags(model, split, labels, torch.device("cpu"), batch_size=16, multiple=m)
        for m in (0, 32, 64)
    }
    assert sum(t != "O" for s in tags[0] for t in s) > 0  # an entity predicted: something to compare
    assert len(tags[0]) == 40 and tags[0] == tags[32] == tags[64]


@pytest.mark.parametrize("members", [1, 2])
def test_the_step_compiles_as_one_graph_and_computes_the_same_loss(data_dir, members):
    # fullgraph: dynamo refuses any graph break (a value read, an unsupported op) in the forward
    # pass and the loss; aot_eager also traces the backward, without inductor's slow CPU codegen.
    config = make_config(dict(dataset="resume", data_dir=str(data_dir), model="tiny", limit_train=8))
    sentences = load_corpus(config, ["train"]).splits["train"]
    labels = LabelSpace.infer(categories(sentences), config.label_separator)
    no_dropout = dict(SHAPE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    tokenizer, net = random_model((c for s in sentences for c in s.chars), labels, 0.0, no_dropout)
    fused = FusedModel([SoftFiNEModel(net)] * members).train()
    tables = torch.stack([labels.soft_targets(3.0, 2.0)] * members)
    loss = fused.loss(tables, True, *[torch.full((members,), 0.01)] * 2)
    batch = next(iter(train_loader(encode(sentences, CharIds(tokenizer), labels, 512), 8, 0, 0, False, 64)))
    tensors = [batch[k] for k in ("input_ids", "aug_ids", "attention_mask", "label_ids")]
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True, dynamic=False)
    eager_parts, compiled_parts = loss(*tensors), compiled(*tensors)
    compiled_parts["loss"].sum().backward()
    for key in eager_parts:
        assert torch.allclose(compiled_parts[key], eager_parts[key], rtol=1e-5), key
    assert all(p.grad is not None for p in fused.params.values())


def test_train_with_compile(data_dir, tmp_path):
    # torch.compile with inductor on this CPU: one padded length (64) for the 2 steps and the evaluations
    settings = dict(epochs=1, eval_every=0, limit_train=16, limit_eval=8, pad_multiple=64)
    eager = train(tiny_config(data_dir, tmp_path / "eager", **settings))
    compiled = train(tiny_config(data_dir, tmp_path / "compiled", compile=True, **settings))
    a, b = (json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("eager", "compiled"))
    assert b["step"] == a["step"] == 2
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
    assert compiled["test_sentences"] == eager["test_sentences"] == 8


def test_a_compiled_group_reads_its_stacked_weights_in_place_and_lets_them_go(data_dir, tmp_path):
    # Under CUDA graphs, an input not marked static is copied in on every replay: for 12 stacked
    # bert-base models, every weight. Marked, the weights must stay at one address step after step,
    # and the mark must not hold them: a Ray actor reused for the next trial runs it in this process.
    def group_run(name: str) -> GroupRun:
        configs = [tiny_config(data_dir, tmp_path / f"{name}{k}", compile=True, beta=2.0 + k) for k in (0, 1)]
        corpus = load_corpus(configs[0])
        labels = label_space(corpus, configs[0])
        tokenizer, model = new_encoder(configs[0], labels, corpus)
        outs = [output_directory(c.out) for c in configs]
        fused = FusedModel([model] * 2)
        return GroupRun(configs, outs, corpus, labels, tokenizer, fused, torch.device("cpu"))

    run = group_run("first")
    weights = [*run.fused.params.values(), *run.fused.buffers.values()]
    assert all(get_static_address_type(t) for t in weights)
    where = [t.data_ptr() for t in weights]
    batch = next(iter(train_loader(run.data["train"].examples, 8, 0, 0, False, 64)))
    for _ in range(2):
        run.train_on(batch)  # inductor compiles the step on the first
    assert run.step == 2 and [t.data_ptr() for t in weights] == where
    first, graphs = weakref.ref(weights[0]), counters["stats"]["unique_graphs"]
    del run, weights
    gc.collect()
    run = group_run("second")  # the next trial of a reused actor
    run.train_on(batch)
    assert first() is None, "the first run's weights are still held"
    assert counters["stats"]["unique_graphs"] == graphs  # and its compiled step is run again


def test_an_older_torch_leaves_the_weights_unmarked(monkeypatch):
    # Before torch 2.10 a mark is guarded: it would keep each trial's weights in a reused actor
    static = [torch.zeros(2), torch.ones(3)]
    monkeypatch.setattr(torch, "__version__", "2.9.1+cu128")
    compile_step(torch.add, torch.device("cpu"), static)
    assert [get_static_address_type(t) for t in static] == [None, None]
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    compile_step(torch.add, torch.device("cpu"), static)
    assert [get_static_address_type(t) for t in static] == ["unguarded", "unguarded"]


def test_an_attention_kernel_that_is_no_choice_is_refused():
    from softfine.errors import ConfigError

    with pytest.raises(ConfigError, match="--attention 'flash'"):  # flash takes no padding mask
        attention_kernels(torch.device("cpu"), "flash")
