"""Which device to run on, in which precision, and what its peak throughput is (for MFU): one policy for
training and inference."""

from __future__ import annotations

import contextlib
import os

import torch

from minillama.errors import MiniLlamaError

# Dense bf16 tensor-core peaks in FLOP/s (no sparsity), by substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {
    "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
    "A100": 312e12, "A10G": 70e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,  # V100/T4: their fp16 peak
}


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks CUDA (this rank's GPU), then Apple's MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MiniLlamaError(f"device '{name}' is not a torch device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise MiniLlamaError(f"device '{name}' is not one Mini Llama runs on; use auto, cpu, cuda, cuda:N or mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MiniLlamaError(f"device '{name}' was asked for, but this PyTorch sees no CUDA GPU; use the cpu device "
                             "(--device cpu, or --set device=cpu for train)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise MiniLlamaError(f"device '{name}' was asked for, but MPS is not available here; use the cpu device "
                             "(--device cpu, or --set device=cpu for train)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _native_bf16(device: torch.device) -> bool:
    return device.type != "cuda" or torch.cuda.is_bf16_supported(including_emulation=False)


def autocast_dtype(device: torch.device, choice: str) -> torch.dtype | None:
    """The training autocast dtype, or None for plain float32. 'auto': bf16 where the hardware has it; fp16 (with
    a gradient scaler) on GPUs without bf16 such as V100 and T4, where bf16 would be emulated or NaN-prone."""
    if choice == "float32" or (choice == "auto" and device.type == "cpu"):
        return None
    if choice == "auto":
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    return DTYPES[choice]


def inference_dtype(device: torch.device, choice: str) -> torch.dtype:
    """The dtype to hold weights in for sampling and evaluation. 'auto': bfloat16 on GPUs that have it natively,
    float16 on older GPUs, float32 elsewhere. Emulated bf16 is refused, as training refuses it."""
    if choice == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if _native_bf16(device) else torch.float16
    if choice == "bfloat16" and not _native_bf16(device):
        raise MiniLlamaError(f"{torch.cuda.get_device_name(device)} has no native bfloat16; use --dtype float16 or float32")
    return DTYPES[choice]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def memory_bytes(device: torch.device) -> int | None:
    """What the device can hold: a GPU's free memory, or the machine's physical memory for the CPU (None where
    it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
