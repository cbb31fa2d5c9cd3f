"""Where and how a run computes: the device, bf16 autocast, the attention kernel, the padded
lengths a batch may take, and `torch.compile`.

On a GPU a SoftFiNE step at the paper's settings is small, so the host's time per step decides
the speed (figures: benchmarks/README.md). Three host costs are avoided here: an attention plan
built for every new shape, many shapes, and kernel launches (the compiled step, optional until
measured on a GPU; see docs/training.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable

import torch

from .config import ATTENTION
from .errors import ConfigError, DeviceError

GPU_PAD_MULTIPLE = 64  # Weibo and Resume windows (<= 180 tokens) then take 3 lengths, any dataset <= 8


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise DeviceError(
            f"--device {name}: torch sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{visible!r}, torch {torch.__version__}, built for CUDA {torch.version.cuda})"
        )
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


def autocast(device: torch.device):
    # bf16 on CUDA: the A100/H100 fast path; weights and AdamW states stay fp32. CPU runs stay fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def attention_kernels(device: torch.device, choice: str = "auto"):
    """The scaled-dot-product attention kernels BERT may use on `device` (a context manager).

    PyTorch's own first choice on Hopper is cuDNN's attention, which builds an execution plan for
    every new shape, host time that dominates a small step. "auto" is therefore the memory-efficient kernel
    (flash attention takes no padding mask, so BERT's batches never reach it), with the math kernel
    as fallback. "cudnn" is there to measure it again on the few padded lengths of `pad_multiple`.
    """
    if choice not in ATTENTION:
        raise ConfigError(f"--attention {choice!r}: expected one of {', '.join(ATTENTION)}")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # math alone where asked (fused groups: vmap has no rule for the CPU's flash kernel)
    if device.type != "cuda":
        return sdpa_kernel([SDPBackend.MATH]) if choice == "math" else contextlib.nullcontext()

    first = {
        "auto": SDPBackend.EFFICIENT_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[choice]
    return sdpa_kernel(list(dict.fromkeys([first, SDPBackend.MATH])), set_priority=True)


def pad_multiple(configured: int | None, device: torch.device, compiled: bool = False) -> int:
    """Tokens a batch's length is padded to a multiple of (0: the batch's longest window).

    On a GPU, or for a compiled step, every new shape costs host time (attention plans, a new
    graph), so batches take a few lengths and full rows; an eager step on a CPU pays for padding
    in compute, so its batches stay as long as their longest window."""
    if configured is not None:
        return configured
    return GPU_PAD_MULTIPLE if device.type == "cuda" or compiled else 0


def compile_step(fn: Callable, device: torch.device, static: Iterable[torch.Tensor] = ()) -> Callable:
    """`fn` compiled with torch.compile: on CUDA as CUDA graphs (mode reduce-overhead: one launch a
    step instead of hundreds), on the CPU with inductor's default mode. Shapes are static: one
    graph per padded length, few with `pad_multiple`.

    `static`: the tensors `fn` reads that stay at one address, changed in place by the optimizer or
    not at all (a fused group's stacked parameters, which are no module's, and its soft targets).
    Marked static, CUDA graphs read them where they are; unmarked, each replay first copies them in.
    Marked from torch 2.10 only: before, a mark is guarded (PyTorch #162208), which keeps the tensors
    alive and compiles again for new ones, as a Ray actor reused for the next trial would have."""
    if torch.torch_version.TorchVersion(torch.__version__) >= (2, 10):
        for tensor in static:
            torch._dynamo.mark_static_address(tensor)
    mode = "reduce-overhead" if device.type == "cuda" else None
    return torch.compile(fn, mode=mode, dynamic=False)
