"""The accelerators the planner knows: dense peak FLOP/s, memory, bandwidth and power, from their datasheets.

Peaks are *dense* tensor-core figures: vendors print the 2:4 structured-sparsity number first (twice the dense
one), and no LLaMA-style training uses it. `bf16` is the 16-bit matmul peak with fp32 accumulation (fp16 on V100,
which has no bf16); `fp32` is the plain (non-tensor-core, non-TF32) fp32 peak. Memory capacities are the
datasheet's "GB" read as GiB (2^30 bytes): that is what nvidia-smi / rocm-smi report for these parts.

`cpu` is not a table row but a measurement: a matmul probe run once per machine (bf16 and fp32), cached as JSON
under $XDG_CACHE_HOME/minillama (default ~/.cache/minillama). Its "peak" is the best achieved matmul rate, which
is the honest ceiling for MFU on a CPU.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from minillama.errors import MinillamaError
from minillama.files import atomic_write_json, cache_dir

GiB = 2**30


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    peak_flops_bf16: float  # dense 16-bit tensor FLOP/s
    peak_flops_fp32: float  # dense fp32 FLOP/s (no TF32)
    memory_bytes: int
    bandwidth_bytes_per_s: float
    tdp_w: float | None
    source: str

    def peak_flops(self, dtype: str = "bf16") -> float:
        """Dense peak FLOP/s for matmuls in `dtype` ("bf16", "fp16", "fp32"; int8/int4 weights compute in bf16)."""
        if dtype in ("bf16", "fp16", "int8", "int4"):
            return self.peak_flops_bf16
        if dtype == "fp32":
            return self.peak_flops_fp32
        raise MinillamaError(f"unknown dtype {dtype!r}; expected bf16, fp16, fp32, int8 or int4")


TB = 1e12
# Sources (vendor datasheets; the sparsity figure halved where only that is printed):
GPUS: dict[str, Hardware] = {
    h.name: h
    for h in [
        # NVIDIA Tesla V100 datasheet (SXM2): 125 TFLOPS tensor (fp16), 15.7 TFLOPS fp32, 32 GB HBM2, 900 GB/s, 300 W.
        Hardware("v100", "NVIDIA V100 SXM2 32GB (fp16 tensor cores; no bf16)", 125e12, 15.7e12, 32 * GiB, 0.9 * TB,
                 300, "NVIDIA Tesla V100 datasheet (2020)"),
        # NVIDIA A100 datasheet (SXM4): BF16 312 TFLOPS (624 with sparsity), FP32 19.5, 1,555 GB/s (40GB), 400 W.
        Hardware("a100-40gb", "NVIDIA A100 SXM4 40GB", 312e12, 19.5e12, 40 * GiB, 1.555 * TB, 400,
                 "NVIDIA A100 Tensor Core GPU datasheet (2021)"),
        Hardware("a100-80gb", "NVIDIA A100 SXM4 80GB", 312e12, 19.5e12, 80 * GiB, 2.039 * TB, 400,
                 "NVIDIA A100 Tensor Core GPU datasheet (2021)"),
        # NVIDIA H100 datasheet: SXM BF16 1,979 TFLOPS with sparsity -> 989 dense, FP32 67, 3.35 TB/s, 700 W;
        # PCIe BF16 1,513 with sparsity -> 756 dense, FP32 51, 2.0 TB/s, 350 W.
        Hardware("h100-sxm", "NVIDIA H100 SXM5 80GB", 989e12, 67e12, 80 * GiB, 3.35 * TB, 700,
                 "NVIDIA H100 Tensor Core GPU datasheet (2023)"),
        Hardware("h100-pcie", "NVIDIA H100 PCIe 80GB", 756e12, 51e12, 80 * GiB, 2.0 * TB, 350,
                 "NVIDIA H100 Tensor Core GPU datasheet (2023)"),
        # NVIDIA H200 datasheet (SXM): same compute as H100 SXM, 141 GB HBM3e at 4.8 TB/s, up to 700 W.
        Hardware("h200", "NVIDIA H200 SXM 141GB", 989e12, 67e12, 141 * GiB, 4.8 * TB, 700,
                 "NVIDIA H200 Tensor Core GPU datasheet (2024)"),
        # NVIDIA HGX B200 spec (per GPU, 1,000 W): BF16 4.5 PFLOPS with sparsity -> 2.25 dense, FP32 80 TFLOPS,
        # 1.44 TB HBM3e per 8 GPUs -> 180 GB each, 8 TB/s.
        Hardware("b200", "NVIDIA B200 (HGX, 1000 W) 180GB", 2.25e15, 80e12, 180 * GiB, 8.0 * TB, 1000,
                 "NVIDIA HGX B200 specifications (2025)"),
        # AMD Instinct MI300X datasheet: BF16 1,307.4 TFLOPS dense (2,614.9 sparse), FP32 163.4, 192 GB HBM3,
        # 5.3 TB/s, 750 W.
        Hardware("mi300x", "AMD Instinct MI300X 192GB", 1307.4e12, 163.4e12, 192 * GiB, 5.3 * TB, 750,
                 "AMD Instinct MI300X datasheet (2023)"),
        # NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity -> 121 dense, FP32 30.3, 24 GB GDDR6, 300 GB/s, 72 W.
        Hardware("l4", "NVIDIA L4 24GB", 121e12, 30.3e12, 24 * GiB, 0.3 * TB, 72, "NVIDIA L4 datasheet (2023)"),
        # A10G (AWS G5 only; NVIDIA publishes no datasheet): 70 TFLOPS BF16 tensor, 35 TFLOPS FP32, 24 GB GDDR6 at
        # 600 GB/s, 300 W, as tabulated by Baseten, "NVIDIA A10 vs A10G for ML model inference" (2023).
        Hardware("a10g", "NVIDIA A10G 24GB (AWS G5)", 70e12, 35e12, 24 * GiB, 0.6 * TB, 300,
                 "AWS G5 / Baseten A10 vs A10G comparison (2023)"),
        # NVIDIA Ada Lovelace architecture whitepaper, Appendix A (RTX 4090): FP16/BF16 tensor with FP32 accumulate
        # 165.2 TFLOPS dense (330.3 sparse), FP32 82.6, 24 GB GDDR6X at 1,008 GB/s, 450 W.
        Hardware("rtx4090", "NVIDIA GeForce RTX 4090 24GB", 165.2e12, 82.6e12, 24 * GiB, 1.008 * TB, 450,
                 "NVIDIA Ada GPU architecture whitepaper v2.1, Appendix A"),
    ]
}

KNOWN_HARDWARE = [*GPUS, "cpu"]


def get_hardware(name: str) -> Hardware:
    """The table row for `name`, or the measured CPU for "cpu". Unknown names list the known ones."""
    key = name.lower()
    if key == "cpu":
        return measured_cpu()
    if key not in GPUS:
        raise MinillamaError(f"unknown GPU {name!r}; known: {', '.join(KNOWN_HARDWARE)}")
    return GPUS[key]


def peak_flops(name: str, dtype: str = "bf16") -> float:
    """Dense peak FLOP/s of hardware `name` (a table key or "cpu") for matmuls in `dtype`: the MFU denominator."""
    return get_hardware(name).peak_flops(dtype)


def detect_hardware(device: object = None) -> str:
    """The table key for a torch device ("cuda", "cuda:1", a torch.device, or None for the current CUDA device if
    any, else "cpu"), matched on the CUDA device name. Raises MinillamaError for an accelerator not in the table."""
    import torch

    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        raise MinillamaError(f"no peak FLOP/s known for device type {device.type!r}")
    product = torch.cuda.get_device_name(device).lower()
    # Order matters: "h100 pcie" before "h100", "80gb" before the 40GB default of an A100.
    patterns = [("h100 pcie", "h100-pcie"), ("h100", "h100-sxm"), ("h200", "h200"), ("b200", "b200"),
                ("a100", "a100-80gb" if "80gb" in product else "a100-40gb"), ("v100", "v100"),
                ("mi300x", "mi300x"), ("l4", "l4"), ("a10g", "a10g"), ("4090", "rtx4090")]
    for pattern, key in patterns:
        if pattern in product:
            return key
    raise MinillamaError(f"GPU {product!r} is not in the hardware table; known: {', '.join(GPUS)}")


# --------------------------------------------------------------------------------------------------------------
# The CPU: measured, not looked up.
# --------------------------------------------------------------------------------------------------------------
def cpu_model_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _measure_matmul_flops(dtype: object, n: int = 2048, min_time_s: float = 1.0) -> float:
    """Best FLOP/s of an n x n matmul over repeated timings (2 n^3 FLOPs each). n = 2048 and a second of
    repeats: smaller products or fewer repeats read low (packing overhead, a busy neighbour), and a peak read low
    makes every MFU after it read high."""
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up: thread pool, packing buffers
    best, elapsed, start = 0.0, 0.0, time.perf_counter()
    while elapsed < min_time_s:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt)
        elapsed = time.perf_counter() - start
    return best


def _measure_copy_bandwidth(nbytes: int = 256 * 2**20) -> float:
    """Best bytes/s of a large tensor copy (counting the read and the write)."""
    import torch

    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0))
    return best


def measured_cpu(refresh: bool = False) -> Hardware:
    """This machine's CPU as a Hardware row: matmul peaks (bf16, fp32) and copy bandwidth from a probe that runs
    once (about a second) and is cached per CPU model, thread count and torch version. TDP is unknown (None)."""
    import torch

    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = cache_dir() / "cpu_peak.json"
    cached: dict = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
    if refresh or key not in cached:
        cached[key] = dict(peak_flops_bf16=_measure_matmul_flops(torch.bfloat16),
                           peak_flops_fp32=_measure_matmul_flops(torch.float32),
                           bandwidth_bytes_per_s=_measure_copy_bandwidth())
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, cached)  # two processes probing at once must not leave half a file
        except OSError:
            pass  # a read-only home still gets a (re-measured) answer
    probe = cached[key]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return Hardware("cpu", f"{cpu_model_name()} ({torch.get_num_threads()} threads, measured)",
                    probe["peak_flops_bf16"], probe["peak_flops_fp32"], memory, probe["bandwidth_bytes_per_s"],
                    None, f"matmul probe cached in {path}")


def hardware_dict(hw: Hardware) -> dict:
    return asdict(hw)





def device_peak_flops(device: object, dtype: str = "bf16") -> float | None:
    """Peak FLOP/s of the torch device a run uses, for the trainer's MFU: the table row of its GPU, or the
    measured CPU. `dtype` is the trainer's ("bf16" autocast or "fp32"). None for an accelerator not in the
    table (MFU is then not reported)."""
    try:
        return peak_flops(detect_hardware(device), "fp32" if dtype == "fp32" else "bf16")
    except MinillamaError:
        return None


__all__ = ["Hardware", "GPUS", "KNOWN_HARDWARE", "get_hardware", "peak_flops", "detect_hardware", "device_peak_flops",
           "measured_cpu", "cpu_model_name", "hardware_dict"]
