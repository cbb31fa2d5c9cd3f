"""Training throughput of SoftFiNE: characters/s, sentences/s and peak memory.

    python benchmarks/train_throughput.py --dataset resume --shape tiny --batch-size 16
    python benchmarks/train_throughput.py --dataset weibo --shape bert-base --batch-size 16 --device cuda

`--shape bert-base` is a randomly initialised BERT with bert-base-chinese's shape (12 layers,
width 768); `--model NAME` loads a real encoder instead. Full SoftFiNE steps are timed (original
and augmented sentences, soft labels, feature loss) unless --no-aug. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch

from softfine.config import TrainConfig
from softfine.data import categories
from softfine.labels import LabelSpace
from softfine.model import CharIds, SoftFiNEModel, build_model, random_model
from softfine.train import build_optimizer, encode, load_splits, resolve_device, train_loader, train_step


def build(shape: str, model: str | None, labels, dropout: float, chars):
    if model:
        return build_model(model, labels, dropout, chars)
    # bert-base: BertConfig's defaults, which are bert-base-chinese's shape.
    tiny = None if shape == "bert-base" else TrainConfig(model="tiny").tiny_shape()
    tokenizer, net = random_model(chars, labels, dropout, tiny)
    return tokenizer, SoftFiNEModel(net)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="resume")
    parser.add_argument("--data-dir")
    parser.add_argument("--shape", choices=["tiny", "bert-base"], default="tiny")
    parser.add_argument("--model", help="a Hugging Face name or directory instead of --shape")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-aug", action="store_true", help="time plain steps (no augmentation)")
    args = parser.parse_args()

    config = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size,
                         aug=not args.no_aug, lr=1e-4, device=args.device)
    device = resolve_device(config.device)
    torch.manual_seed(0)
    sentences = load_splits(config, ["train"])["train"]
    labels = LabelSpace.from_categories(categories(sentences), config.separator())
    tokenizer, model = build(args.shape, args.model, labels, config.dropout, (c for s in sentences for c in s.chars))
    model = model.to(device).train()
    examples = encode(sentences, CharIds(tokenizer), labels, config.max_length)
    optimizer = build_optimizer(model, config)
    table = labels.soft_targets(config.beta, config.gamma).to(device)

    def batches():
        epoch = 0
        while True:
            yield from train_loader(examples, config.batch_size, config.seed, epoch, device.type == "cuda")
            epoch += 1

    stream = batches()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        train_step(model, next(stream), table, config, device)
        optimizer.step(), optimizer.zero_grad(set_to_none=True)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    chars = sentences_seen = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = next(stream)
        train_step(model, batch, table, config, device)
        optimizer.step(), optimizer.zero_grad(set_to_none=True)
        chars += int(batch["label_ids"].ne(-100).sum())
        sentences_seen += len(batch["sentence"])
    sync()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    figures = {
        "dataset": args.dataset, "model": args.model or args.shape, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "bf16": device.type == "cuda", "augmentation": not args.no_aug,
        "batch_size": args.batch_size, "steps": args.steps, "parameters_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "chars_per_s": round(chars / seconds), "sentences_per_s": round(sentences_seen / seconds, 1),
        "peak_memory_MiB": round(peak), "peak_memory_kind": "CUDA allocated" if device.type == "cuda" else "process max RSS",
    }
    for key, value in figures.items():
        print(f"{key:>18}: {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
