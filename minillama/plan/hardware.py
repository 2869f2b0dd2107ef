"""The accelerators the planner knows: dense peak FLOP/s, memory, bandwidth and power, from their datasheets.

Peaks are *dense* tensor-core figures: vendors print the 2:4 structured-sparsity number first (twice the dense
one), and no LLaMA-style training uses it. `bf16` is the 16-bit matmul peak with fp32 accumulation (fp16 on V100,
which has no bf16); `fp32` is the plain (non-tensor-core, non-TF32) fp32 peak. Memory capacities are the
datasheet's "GB" read as GiB (2^30 bytes): that is what nvidia-smi / rocm-smi report for these parts.

`cpu` is not a table row but a measurement: a matmul probe (bf16 and fp32) cached as JSON in minillama's cache
directory (files.cache_dir). Its "peak" is the best achieved matmul rate, which is the honest ceiling for MFU on a
CPU. One probe taken while the machine was busy would read low and make every MFU after it read high, so the
peak is the best of several probes from different processes (CPU_PROBES_KEPT), each dropped after
CPU_PROBE_MAX_AGE_S and taken again.
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


CPU_PROBES_KEPT = 3  # the peak is the best of up to this many probes, each taken by a different process
CPU_PROBE_MAX_AGE_S = 30 * 86400  # a probe older than this is dropped: the next process probes again
_PROBE_FIELDS = ("peak_flops_bf16", "peak_flops_fp32", "bandwidth_bytes_per_s")
_probed_this_process: dict[str, dict] = {}  # cache key -> the probe this process took (one per process)


def _now() -> float:
    """Seconds since the epoch: when a probe is taken and how old the stored ones are (tests fake it)."""
    return time.time()


def _stored_probes(entry: object, now: float) -> list[dict]:
    """The well-formed probes of one cache entry that are younger than CPU_PROBE_MAX_AGE_S, oldest first. An
    entry in the old one-probe format (no timestamps) has none, so it is probed again."""
    probes = entry.get("probes") if isinstance(entry, dict) else None
    if not isinstance(probes, list):
        return []
    fresh = [p for p in probes if isinstance(p, dict)
             and all(isinstance(p.get(k), (int, float)) for k in ("time", *_PROBE_FIELDS))
             and now - p["time"] < CPU_PROBE_MAX_AGE_S]
    return sorted(fresh, key=lambda p: p["time"])


def _probe(now: float) -> dict:
    import torch

    from minillama.runtime import native_bf16

    # Where bf16 is emulated (an AVX2-only CPU: ~1.3 GFLOP/s on 2 cores) one 2048 x 2048 product takes ~13 s, and
    # every process that trains probes until three probes are stored; a 256 x 256 one reads that rate in ~0.1 s.
    bf16_size = 2048 if native_bf16(torch.device("cpu")) else 256
    return dict(time=now, peak_flops_bf16=_measure_matmul_flops(torch.bfloat16, n=bf16_size),
                peak_flops_fp32=_measure_matmul_flops(torch.float32), bandwidth_bytes_per_s=_measure_copy_bandwidth())


def _probe_note(probes: list[dict], path: Path) -> str:
    """Which probes the figures come from, for the Hardware row's `source` (and so the trainer's metrics)."""
    def when(probe: dict) -> str:
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(probe["time"]))

    best = {k: max(probes, key=lambda p: p[k]) for k in ("peak_flops_bf16", "peak_flops_fp32")}
    return (f"best of {len(probes)} matmul probe(s) taken {', '.join(map(when, probes))} UTC (bf16 peak from "
            f"{when(best['peak_flops_bf16'])}, fp32 from {when(best['peak_flops_fp32'])}; up to {CPU_PROBES_KEPT} "
            f"kept {CPU_PROBE_MAX_AGE_S // 86400} days each) in {path}")


def measured_cpu(refresh: bool = False) -> Hardware:
    """This machine's CPU as a Hardware row: matmul peaks (bf16, fp32) and copy bandwidth, the best of the cached
    probes for this CPU model, thread count and torch version. A process probes (about three seconds) at most
    once, and only while fewer than CPU_PROBES_KEPT probes younger than CPU_PROBE_MAX_AGE_S are stored;
    `refresh` drops the stored ones and probes now. TDP is unknown (None)."""
    import torch

    key = f"{cpu_model_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    path = cache_dir() / "cpu_peak.json"
    cached: dict = {}
    if path.exists():
        try:
            cached = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
        cached = cached if isinstance(cached, dict) else {}
    now = _now()
    probes = [] if refresh else _stored_probes(cached.get(key), now)
    mine = _probed_this_process.get(key)
    if refresh or (mine is None and len(probes) < CPU_PROBES_KEPT):
        mine = _probed_this_process[key] = _probe(now)
        probes = [*probes, mine][-CPU_PROBES_KEPT:]
        cached[key] = {"probes": probes}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, cached)  # two processes probing at once must not leave half a file
        except OSError:
            pass  # a read-only home still gets a (re-measured) answer
    elif mine is not None and mine not in probes:  # this process's probe, which an unwritable cache did not keep
        probes.append(mine)
    peak = {k: max(p[k] for p in probes) for k in _PROBE_FIELDS}
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return Hardware("cpu", f"{cpu_model_name()} ({torch.get_num_threads()} threads, measured)",
                    peak["peak_flops_bf16"], peak["peak_flops_fp32"], memory, peak["bandwidth_bytes_per_s"],
                    None, _probe_note(probes, path))


def hardware_dict(hw: Hardware) -> dict:
    return asdict(hw)


def device_peak(device: object, dtype: str = "bf16") -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) of the torch device a run uses, for the trainer's MFU: the table row
    of its GPU, or the measured CPU. `dtype` is the trainer's ("bf16" autocast or "fp32"). The peak is None for
    an accelerator not in the table (MFU is then not reported), and the second item says why."""
    try:
        hw = get_hardware(detect_hardware(device))
    except MinillamaError as exc:
        return None, str(exc)
    return hw.peak_flops("fp32" if dtype == "fp32" else "bf16"), f"{hw.description}: {hw.source}"


def device_peak_flops(device: object, dtype: str = "bf16") -> float | None:
    """`device_peak`'s peak FLOP/s alone."""
    return device_peak(device, dtype)[0]


__all__ = ["Hardware", "GPUS", "KNOWN_HARDWARE", "get_hardware", "peak_flops", "detect_hardware", "device_peak",
           "device_peak_flops", "measured_cpu", "CPU_PROBES_KEPT", "CPU_PROBE_MAX_AGE_S", "cpu_model_name",
           "hardware_dict"]
