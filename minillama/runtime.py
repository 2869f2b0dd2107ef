"""Where and how code runs: the device, bf16 autocast, and process-wide settings. Used by training, evaluation
and inference alike; nothing here touches the model's math."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform
import sys

import torch

from minillama.errors import MinillamaError


def resolve_device(name: str) -> torch.device:
    """`auto` is CUDA when available, else the CPU; a CUDA device that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MinillamaError(f"device {name!r} was asked for but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MinillamaError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from None


@functools.cache  # asked per batch where "auto" reaches autocast_context (evaluation); the answer never changes
def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on `device`: a CUDA GPU with bf16 (Ampere or newer), or a CPU whose
    oneDNN has bf16 kernels (AVX512-BF16 or AMX). Elsewhere they are emulated: on 2 cores of an AVX2-only AMD EPYC
    a 512 x 512 bf16 matmul ran at ~1.3 GFLOP/s, a 1024 x 1024 fp32 one at ~110, and training the 15m shape under
    bf16 autocast did 18-44 tokens/s against 1,080-1,300 in fp32 (2026-12-03)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(dtype: str, device: torch.device) -> str:
    """The precision a "bf16" / "fp32" / "auto" setting means on `device`: "auto" is "bf16" where bf16 is native
    (native_bf16), "fp32" elsewhere."""
    if dtype == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if dtype not in ("bf16", "fp32"):
        raise MinillamaError(f"dtype must be auto, bf16 or fp32, got {dtype!r}")
    return dtype


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16" (matmuls in bf16, master weights and optimizer in fp32); nothing for "fp32";
    "auto" as autocast_dtype says."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_dtype(dtype, device) == "bf16")


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse: no mmap for large blocks, no trimming of the heap.

    PyTorch's CPU allocator keeps no cache, and glibc serves large blocks by mmap and unmaps them on free, so each
    training step's activations and gradients land in fresh pages that fault in and are zeroed 4 kB at a time
    (~100k faults per 15m step). With this, what one step frees the next one reuses. Process-wide and for the
    rest of the process; returns False where the C library is not glibc (nothing changes there)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def warn(message: str) -> None:
    """One line on stderr, in the CLI's style: something the user should know that does not stop the run."""
    print(f"minillama: warning: {message}", file=sys.stderr, flush=True)


@functools.cache
def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot run on this machine for `device_type`, in one line; None when it can.

    Compiling needs more than PyTorch: on CPU, inductor writes C++ and builds it with the compiler named by $CXX
    (g++ by default); on CUDA, Triton. A tiny function is compiled and run once per process (about a second, less
    with inductor's cache warm) so that a missing piece is found before a run starts instead of in its first step."""
    try:
        probe = torch.compile(lambda x: x * 2.0 + 1.0)
        probe(torch.ones(8, device=device_type))
    except Exception as exc:  # inductor wraps what failed (no compiler, no Triton, a bad flag) in its own errors
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = next((line for line in lines if "compiler" in line.lower() or "triton" in line.lower()),
                     lines[0] if lines else type(exc).__name__)
        return f"{type(exc).__name__}: {cause}"[:300]
    return None


__all__ = ["resolve_device", "autocast_context", "retain_freed_memory", "warn", "compile_problem"]
