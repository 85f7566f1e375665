"""Sequential block offload for inference (CogView's ``--offload``): a model larger than the GPU runs on it.

Every transformer block keeps its weights in CPU memory (pinned on CUDA, so the copies are fast); a forward
pre-hook copies the block's parameters and buffers to the compute device just before the block runs, and a forward
hook points them back at the CPU copies right after (the device copies are freed; nothing is copied back: inference
does not change the weights). Everything else — embeddings, final norm, head, the image tokenizer — and the KV cache
live on the device. At most one block's weights are on the device at a time, so GPU memory is the non-block weights
+ one block + the KV cache and activations; the price is one host→device copy of every block per forward (per
generated token with a KV cache). On a CPU device the copies are no-ops and the same code runs.

Not for training (the gradients would be lost with the device copies), not with CUDA graphs (their captured
addresses would not follow the copies) nor ``GPT.fused_qkv`` (its fused weights would stay on the CPU): callers
turn those off for an offloaded model (:func:`is_offloaded`).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

_ATTR = "_tuwen_offload"


def _tensors(module: nn.Module):
    """(owner module, kind, name) of every parameter and buffer of ``module``, recursively."""
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                yield m, "p", name
        for name, b in m._buffers.items():
            if b is not None:
                yield m, "b", name


def _get(m: nn.Module, kind: str, name: str) -> torch.Tensor:
    return (m._parameters if kind == "p" else m._buffers)[name]


def _set_data(m: nn.Module, kind: str, name: str, t: torch.Tensor) -> None:
    if kind == "p":
        m._parameters[name].data = t
    else:
        m._buffers[name] = t


def offload(model: nn.Module, blocks: Iterable[nn.Module], device: torch.device | str) -> nn.Module:
    """Put ``model`` on ``device`` except ``blocks``, which stay in CPU memory and visit ``device`` one at a time
    while they run (in place; returns ``model``). Shared tensors (a tied head) are moved once."""
    device = torch.device(device)
    blocks = list(blocks)
    pin = device.type == "cuda" and torch.cuda.is_available()
    in_blocks = {id(m) for block in blocks for m in block.modules()}
    with torch.no_grad():
        for block in blocks:
            homes = []
            for m, kind, name in _tensors(block):
                t = _get(m, kind, name)
                cpu = t.detach().to("cpu")
                if pin and not cpu.is_pinned():
                    cpu = cpu.pin_memory()
                _set_data(m, kind, name, cpu)
                homes.append((m, kind, name, cpu))
            _install(block, homes, device)
        moved: dict[int, torch.Tensor] = {}
        for m, kind, name in list(_tensors(model)):
            t = _get(m, kind, name)
            if id(m) in in_blocks:
                continue
            if kind == "p":  # the same Parameter object may sit in two modules (tied weights): move it once
                if id(t) not in moved:
                    moved[id(t)] = t.data.to(device)
                    t.data = moved[id(t)]
            else:
                _set_data(m, kind, name, t.to(device))
    return model


def _install(block: nn.Module, homes: list, device: torch.device) -> None:
    if getattr(block, _ATTR, None) is not None:  # offloaded before: replace the hooks
        for h in getattr(block, _ATTR)[1]:
            h.remove()

    def to_device(module, args, kwargs=None):
        for m, kind, name, cpu in homes:
            _set_data(m, kind, name, cpu.to(device, non_blocking=True))

    def to_cpu(module, args, output):
        for m, kind, name, cpu in homes:
            _set_data(m, kind, name, cpu)
        return output

    hooks = (block.register_forward_pre_hook(to_device), block.register_forward_hook(to_cpu))
    setattr(block, _ATTR, (device, hooks))


def is_offloaded(model: nn.Module) -> bool:
    """Whether ``model`` or some module inside it was offloaded with :func:`offload`."""
    return any(getattr(m, _ATTR, None) is not None for m in model.modules())


def resident_bytes(model: nn.Module, device: torch.device | str) -> int:
    """Bytes of ``model``'s parameters and buffers that are on ``device`` now (between forwards)."""
    device = torch.device(device)
    seen, total = set(), 0
    for m, kind, name in _tensors(model):
        t = _get(m, kind, name)
        if id(t) in seen or t.device.type != device.type:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
