"""Training throughput of SoftFiNE: characters/s, sentences/s and peak memory; with --profile, where
a step's time goes.

    python benchmarks/train_throughput.py --dataset resume --shape tiny --batch-size 16
    python benchmarks/train_throughput.py --dataset weibo --shape bert-base --batch-size 16 --device cuda
    python benchmarks/train_throughput.py --dataset weibo --shape bert-base --device cuda --profile 10

`--shape bert-base` is a randomly initialised BERT with bert-base-chinese's shape (12 layers,
width 768); `--model NAME` loads a real encoder instead (`--model tiny`: the tiny encoder, as
`--shape tiny`). Full SoftFiNE steps are timed (original and augmented sentences, soft labels,
feature loss, clipping, AdamW) unless --no-aug, as the training loop runs them: its fused model
(`--fuse K` members, 1 by default: a run alone), padding, attention kernel and (with --compile)
compiled step. Characters/s are summed over the members. The untimed warm-up steps hold the
compilation; their time is printed as `warmup_s` (`--one-length`: one padded length, so one graph
to compile). `--profile N` runs N more steps under torch.profiler and prints the step's host (wall)
time, its GPU kernel time, the attention kernels that ran and the ten costliest operators and kernels.
Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import time
from collections import Counter

import torch

from softfine.batches import train_loader
from softfine.config import ATTENTION, MAX_TOKENS, TrainConfig, make_config
from softfine.datasets import load_corpus
from softfine.device import resolve_device
from softfine.fused import FusedModel
from softfine.model import SoftFiNEModel, build_model, random_model
from softfine.script import integer, run_script
from softfine.train import GroupRun, label_space

TINY_SHAPE = TrainConfig(
    model="tiny"
).tiny_shape()  # the tiny encoder's defaults, as `softfine train` builds it


def build(shape: str, model: str | None, labels, dropout: float, chars):
    if model:  # "tiny" too: build_model takes its shape (without one, BertConfig's would be bert-base's)
        return build_model(model, labels, dropout, chars, TINY_SHAPE)
    # bert-base: BertConfig's defaults, which are bert-base-chinese's shape.
    tokenizer, net = random_model(chars, labels, dropout, None if shape == "bert-base" else TINY_SHAPE)
    return tokenizer, SoftFiNEModel(net)


def kernel_ms(events, steps: int) -> float:
    """The GPU's kernel time of a step (ms): the device's own events only. A CPU operator's
    self_device_time_total counts the kernels it launched, which are events of their own too."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e3 / steps


def attention_ops(events) -> list[str]:
    """The attention kernels that ran, as their operators name them (aten::_scaled_dot_product_
    efficient_attention, ..._cudnn_attention, ..._attention_math): a kernel asked for may fall back."""
    return sorted({e.key for e in events if e.key.startswith("aten::_scaled_dot_product_")})


def profile_steps(step, steps: int, device: torch.device, sync) -> dict:
    """Runs `steps` steps under torch.profiler; prints and returns the per-step figures."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    events = prof.key_averages()
    on_gpu = device.type == "cuda"
    kernels = kernel_ms(events, steps) if on_gpu else None
    key = (lambda e: e.self_device_time_total) if on_gpu else (lambda e: e.self_cpu_time_total)
    top = sorted(events, key=key, reverse=True)[:10]
    print(
        f"\nprofile of {steps} steps: step {wall_ms:.1f} ms host (wall)"
        + (f", GPU kernels {kernels:.1f} ms ({kernels / wall_ms:.0%} of it)" if on_gpu else ", no GPU")
    )
    print(f"{'operator or kernel':<48} {'calls/step':>10} {'self CPU ms/step':>16} {'self GPU ms/step':>16}")
    for e in top:
        gpu = f"{e.self_device_time_total / 1e3 / steps:16.2f}" if on_gpu else f"{'-':>16}"
        print(f"{e.key[:48]:<48} {e.count / steps:>10.1f} {e.self_cpu_time_total / 1e3 / steps:>16.2f} {gpu}")
    return {
        "profile_step_ms": round(wall_ms, 2),
        "profile_kernel_ms": round(kernels, 2) if kernels is not None else None,
        "profile_attention": attention_ops(events),
        "profile_top": [e.key for e in top],
    }


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="resume")
    parser.add_argument("--data-dir")
    parser.add_argument("--shape", choices=["tiny", "bert-base"], default="tiny")
    parser.add_argument("--model", help="a Hugging Face name or directory instead of --shape")
    parser.add_argument("--batch-size", type=integer(1), default=16)
    parser.add_argument("--steps", type=integer(1), default=30, help="timed steps")
    parser.add_argument(
        "--warmup", type=integer(0), default=5, help="untimed steps first (compilation included)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-aug", action="store_true", help="time plain steps (no augmentation)")
    parser.add_argument(
        "--attention", choices=ATTENTION, default="auto", help="as softfine train --attention"
    )
    parser.add_argument(
        "--pad-multiple",
        type=integer(0, MAX_TOKENS),
        help="as softfine train --pad-multiple (default: the device's)",
    )
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=False, help="as softfine train --compile"
    )
    parser.add_argument(
        "--one-length",
        action="store_true",
        help="step only the batches of the epoch's most common padded length (one compiled graph)",
    )
    parser.add_argument(
        "--fuse",
        type=integer(1),
        default=1,
        metavar="K",
        help="members of a fused group (a grid's points that differ only in the loss), trained as one model",
    )
    parser.add_argument(
        "--profile",
        type=integer(0),
        default=0,
        metavar="N",
        help="profile N more steps and print where the time goes",
    )
    return parser


def setup(args: argparse.Namespace) -> tuple[GroupRun, int]:
    """The training loop's own set-up (softfine.train.GroupRun: optimizer, loss, attention kernel,
    padding) around an encoder of `--shape` or `--model`; and the encoder's parameter count."""
    # make_config: a bad --dataset or --device is a ConfigError naming the flag, as in softfine train
    config = make_config(
        dict(
            dataset=args.dataset,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            aug=not args.no_aug,
            lr=1e-4,
            device=args.device,
            attention=args.attention,
            pad_multiple=args.pad_multiple,
            compile=args.compile,
        )
    )
    device = resolve_device(config.device)
    torch.manual_seed(0)
    corpus = load_corpus(config, ["train"])
    labels = label_space(corpus, config)
    chars = (c for s in corpus.splits["train"] for c in s.chars)
    tokenizer, model = build(args.shape, args.model, labels, config.dropout, chars)
    fused = FusedModel([model.to(device)] * args.fuse).train()
    run = GroupRun([config] * args.fuse, [], corpus, labels, tokenizer, fused, device)
    return run, sum(p.numel() for p in model.parameters())


def measure(args: argparse.Namespace) -> None:
    run, parameters = setup(args)
    config, device, lengths = run.config, run.device, set()

    def batches(epochs=None):
        for epoch in itertools.count() if epochs is None else epochs:
            yield from train_loader(
                run.data["train"].examples,
                config.batch_size,
                config.seed,
                epoch,
                device.type == "cuda",
                run.multiple,
                config.max_length,
            )

    stream = batches()
    if args.one_length:  # the epoch's most common padded length alone: a compiled step compiles once
        length = Counter(b["input_ids"].shape[1] for b in batches([0])).most_common(1)[0][0]
        stream = (b for b in stream if b["input_ids"].shape[1] == length)

    def step() -> dict:
        batch = next(stream)
        run.train_on(batch)
        lengths.add(batch["input_ids"].shape[1])
        return batch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    chars = sentences_seen = 0
    start = time.perf_counter()
    for _ in range(args.steps):
        batch = step()
        chars += int(batch["label_ids"].ne(-100).sum()) * args.fuse
        sentences_seen += len(batch["sentence"]) * args.fuse
    sync()
    seconds = time.perf_counter() - start
    figures = {
        **setting(args, run, parameters),
        "chars_per_s": round(chars / seconds),
        "sentences_per_s": round(sentences_seen / seconds, 1),
        "step_ms": round(seconds * 1e3 / args.steps, 2),
        "warmup_s": round(warmup_s, 2),
        "padded_lengths": len(lengths),
        **peak_memory(device),
    }
    if args.profile:
        figures.update(profile_steps(step, args.profile, device, sync))
    for key, value in figures.items():
        if key != "profile_top":
            print(f"{key:>18}: {value}")
    print(json.dumps(figures))


def setting(args: argparse.Namespace, run: GroupRun, parameters: int) -> dict:
    """What was measured: the data, the encoder, the device and the step's settings."""
    on_gpu = run.device.type == "cuda"
    return {
        "dataset": args.dataset,
        "model": args.model or args.shape,
        "device": str(run.device),
        "device_name": torch.cuda.get_device_name() if on_gpu else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bf16": on_gpu,
        "augmentation": not args.no_aug,
        "attention": run.kernel,
        "pad_multiple": run.multiple,
        "compile": run.config.compile,
        "one_length": args.one_length,
        "fuse": args.fuse,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "parameters_M": round(parameters / 1e6, 1),
    }


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "peak_memory_MiB": round(torch.cuda.max_memory_allocated() / 2**20),
            "peak_memory_kind": "CUDA allocated",
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"peak_memory_MiB": round(peak), "peak_memory_kind": "process max RSS"}


if __name__ == "__main__":
    run_script(parser(), measure)
