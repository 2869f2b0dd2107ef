"""Weight-only int8 and int4 quantization of a Transformer's projections, swapped in from outside the model.

    quantize(model, "int8")                   every nn.Linear -> Int8Linear: int8 weights, one scale per output
                                              channel (symmetric): W ~ q * scale[:, None]
    quantize(model, "int4", group_size=64)    every nn.Linear -> Int4Linear: 4-bit weights, a scale and a zero
                                              point per group of `group_size` inputs (asymmetric):
                                              W ~ (q - 8) * scale + zero, q in 0..15

Activations stay in floating point (bf16 or fp32): only the weights shrink, which is what batch-1 decoding wants,
since it reads every weight once per token and is bound by memory bandwidth, not arithmetic. The model's math is
untouched (model.py calls `self.wq(x)` and does not care what `wq` is), as in gpt-fast's quantize.py and
torchao's `quantize_`.

Kernels are PyTorch's own weight-packed matmuls, chosen because they read the weights at close to this machine's
memory bandwidth (benchmarks/quantize_speed.py; numbers in benchmarks/RESULTS.md):
- int8: `aten._weight_int8pack_mm(x, q, scales)` (int8 (N, K) needs no packing), on every device type whose
  build registers a kernel for it (the CPU here). Elsewhere, `F.linear(x, q.to(x.dtype)) * scales`, which
  torch.compile fuses into one pass over the int8 weights (gpt-fast's formulation).
- int4: `aten._weight_int4pack_mm_for_cpu` / `aten._weight_int4pack_mm` (CUDA), the "tinygemm" kernels, on a
  device-specific packed layout made by `_convert_weight_to_int4pack(_for_cpu)`. Their dequantization is
  (q - 8) * scale + zero, hence the asymmetric scheme with tinygemm's zero convention.
torchao 0.18 (installed with --no-deps beside torch 2.13) was tried and not used: `quantize_(m,
Int8WeightOnlyConfig())` ran a 3072 x 1024 matmul at M = 1 in 9.2 ms on this CPU, where the aten kernel takes
0.1-0.3 ms, and its `Int4WeightOnlyConfig` wants the `mslk` package (its CPU int4 layout is a prototype).
Both kernels used here reach the memory bandwidth, so no kernel of our own is written.

Checkpoints hold a portable layout, never a kernel's: int8 `weight` (N, K) + `weight_scale` (N,); int4
`weight_packed` (N, K/2) uint8 with column 2j in the high nibble and 2j+1 in the low one (the layout CUDA's
packer takes), `weight_scale` and `weight_zero` (N, K/group_size). config.json says so in `quantization_config`
(`QuantizationSpec.to_hf`). In memory an Int4Linear holds only the kernel's layout; saving reads the 4-bit values
back out through the kernel itself (see `Int4Linear.unpacked`), so no undocumented layout is decoded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillama.errors import MinillamaError

METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the tinygemm kernels accept (qGroupSize)
# 32 rather than torchao's 128, for quality: int4 cost +0.48% perplexity at group 32 against +0.84% at 128 on the
# Shakespeare recipe's model, and +0.75% against +1.4% (group 64) on the tests' tiny one; the undertrained 15m
# default-recipe model showed no difference beyond noise (+0.14% / +0.07%) (benchmarks/quantize_quality.py,
# RESULTS.md). The price: 5 bits per weight instead of 4.25 (a bf16 scale and zero per group), on 350m 18% more
# bytes read per token.
DEFAULT_GROUP_SIZE = 32
QUANT_METHOD = "minillama"  # `quant_method` of config.json's quantization_config
FORMAT_VERSION = 1
INT4_ZERO_OFFSET = 8  # tinygemm's dequantization: (q - 8) * scale + zero


def _devices_with_kernel(op: str) -> frozenset[str]:
    """The device types for which `op` (e.g. "aten::_weight_int8pack_mm") has a kernel registered. Computed once
    at import: a constant set is what torch.compile can trace, a dispatcher query is not."""
    keys = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS", "xpu": "XPU"}
    return frozenset(t for t, key in keys.items() if torch._C._dispatch_has_kernel_for_dispatch_key(op, key))


INT8_KERNEL_DEVICES = _devices_with_kernel("aten::_weight_int8pack_mm")


# --------------------------------------------------------------------------------------------------------------
# The arithmetic: quantize and dequantize one matrix (pure functions, pinned by tests/test_quantize.py)
# --------------------------------------------------------------------------------------------------------------
def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale (N,) in scale_dtype), symmetric per output channel: scale = max|row| / 127.

    q is rounded against the scale *as stored* (in scale_dtype), so |W - q * scale| <= scale / 2 holds for the
    scale the kernel sees; -128 is never used, keeping the range symmetric (as in LLM.int8() and gpt-fast)."""
    w = weight.detach().float()
    tiny = torch.finfo(scale_dtype).tiny  # an all-zero row gets a tiny scale and q = 0, not a division by zero
    scale = (w.abs().amax(dim=1) / 127).clamp(min=tiny).to(scale_dtype)  # (N,)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]  # (N, K) fp32


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 values 0..15 (N, K), scale (N, K/G), zero (N, K/G)), asymmetric per group of G inputs:
    scale ~ (max - min) / 15 and zero ~ min + 8 * scale, so that (q - 8) * scale + zero spans [min, max].

    As for int8, q is rounded against the scale and zero as stored, which cover the group's range, so
    |W - Ŵ| <= scale / 2 for the scale the kernel sees."""
    N, K = weight.shape
    w = weight.detach().float().view(N, K // group_size, group_size)  # (N, K/G, G)
    w_min, w_max = w.amin(dim=-1), w.amax(dim=-1)  # (N, K/G)
    finfo = torch.finfo(scale_dtype)
    zero = (w_min + INT4_ZERO_OFFSET * (w_max - w_min) / 15).to(scale_dtype)
    # The zero is stored rounded (in bf16 by half a part in 256 of |zero|, which for a group far from 0 can be
    # several steps): pick the smallest stored scale with which (q - 8) * scale + zero still reaches both ends.
    needed = torch.maximum((w_max - zero.float()) / 7, (zero.float() - w_min) / 8).clamp(min=finfo.tiny)
    scale = needed.to(scale_dtype)
    rounded_down = scale.float() < needed
    scale[rounded_down] = (needed[rounded_down] * (1 + finfo.eps)).to(scale_dtype)
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None]) + INT4_ZERO_OFFSET  # (N, K/G, G)
    return q.clamp(0, 15).to(torch.uint8).view(N, K), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    group_size = K // scale.shape[1]
    q = q.float().view(N, -1, group_size)
    return ((q - INT4_ZERO_OFFSET) * scale.float()[..., None] + zero.float()[..., None]).view(N, K)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, column 2j in the high nibble (CUDA's `_convert_weight_to_int4pack`
    input layout, and the one our checkpoints store)."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)  # (N, K)


# --------------------------------------------------------------------------------------------------------------
# The modules
# --------------------------------------------------------------------------------------------------------------
# What PyTorch's CPU allocator guarantees (c10's gAlignment), and more than the int8 kernel needs.
_KERNEL_ALIGNMENT = 64


class Int8Linear(nn.Module):
    """y = x W^T with W = q * scale[:, None]; no bias (LLaMA has none). Buffers, not parameters: not trained."""

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype | None = None) -> Int8Linear:
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, device=weight.device, dtype=scale_dtype or weight.dtype)
        module.weight, module.weight_scale = quantize_int8(weight, module.weight_scale.dtype)
        return module

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.weight_scale)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        if self.weight.data_ptr() % _KERNEL_ALIGNMENT:  # load_state_dict(assign=True) of a safetensors slice
            self.weight = self.weight.clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.weight_scale.dtype)  # (M, K) in the scales' dtype
        if self._use_kernel(x2):
            if not torch.compiler.is_compiling() and x2.data_ptr() % _KERNEL_ALIGNMENT:
                x2 = x2.clone()  # a view into a larger tensor (compiled graphs allocate aligned buffers)
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.weight_scale)  # (M, N)
        else:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.weight_scale
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """The aten kernel where it exists and its CPU code's alignment needs are met: it segfaults (torch 2.13)
        on rows of W that are not 16-byte multiples (K % 16 != 0) or on x and W not aligned to 32 and 16 bytes,
        as a safetensors slice or a view can be. W is kept aligned (`_load_from_state_dict`; quantizing and
        moving allocate anew); x is copied in `forward` if it is not. Otherwise: the dequantizing path."""
        if x.device.type not in INT8_KERNEL_DEVICES or self.in_features % 16 != 0:
            return False
        return torch.compiler.is_compiling() or self.weight.data_ptr() % _KERNEL_ALIGNMENT == 0

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def _int4_inner_k_tiles(in_features: int) -> int:
    """CUDA's packer tiles K by inner_k_tiles * 16; the largest of gpt-fast's choices (8, 4, 2) that divides K."""
    return next((t for t in (8, 4, 2) if in_features % (t * 16) == 0), 2)


def _int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Values 0..15 (N, K) -> the layout of this device's tinygemm kernel."""
    if q.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # inner tiles: unused
    return torch.ops.aten._convert_weight_to_int4pack(pack_nibbles(q), _int4_inner_k_tiles(q.shape[1]))


def _int4_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scale_and_zero: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu":
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scale_and_zero)
    return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scale_and_zero)


def check_int4_device(device: torch.device) -> None:
    if device.type not in ("cpu", "cuda", "meta"):
        raise MinillamaError(f"int4 needs PyTorch's tinygemm kernels, which exist for cpu and cuda, not "
                             f"{device.type}; use int8 there")


class Int4Linear(nn.Module):
    """y = x W^T with W = (q - 8) * scale + zero per group of `group_size` inputs; no bias.

    Holds the kernel's packed weights (`weight_packed`) and tinygemm's (K/G, N, 2) scale-and-zero tensor. Its
    state dict is the portable layout instead (module docstring): `_save_to_state_dict` reads the 4-bit values
    back through the kernel and `_load_from_state_dict` packs them, so `state_dict()` / `load_state_dict()` and
    checkpoints never see a device's layout. Moving to another device goes through the portable layout too.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        check_int4_device(torch.empty(0, device=device).device)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight_packed", torch.empty(0, dtype=torch.uint8, device=device))
        self.register_buffer("scale_and_zero", torch.empty(in_features // group_size, out_features, 2, dtype=dtype,
                                                           device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, scale_dtype: torch.dtype | None = None) -> Int4Linear:
        weight = linear.weight
        dtype = torch.bfloat16 if weight.device.type == "cuda" else scale_dtype or weight.dtype  # see set_quantized
        module = cls(linear.in_features, linear.out_features, group_size, device=weight.device, dtype=dtype)
        q, scale, zero = quantize_int4(weight, group_size, module.scale_and_zero.dtype)
        module.set_quantized(q, scale, zero)
        return module

    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> None:
        """Take values 0..15 (N, K) and their (N, K/G) scales and zeros, packing for the device q lies on."""
        check_int4_device(q.device)
        if q.device.type == "cuda":  # CUDA's tinygemm takes bf16 activations and scales only (CPU's: any float)
            scale, zero = scale.to(torch.bfloat16), zero.to(torch.bfloat16)
        self.scale_and_zero = torch.stack([scale.t(), zero.t()], dim=-1).contiguous()  # (K/G, N, 2)
        if q.device.type == "meta":
            self.weight_packed = torch.empty(q.shape[0], q.shape[1] // 2, dtype=torch.uint8, device="meta")
        else:
            self.weight_packed = _int4_pack(q)

    @torch.no_grad()
    def unpacked(self) -> torch.Tensor:
        """The values 0..15 (N, K), read back through the kernel: rows of the identity matrix as inputs, with
        scale 1 and zero 8, give (q - 8) * 1 + 8 = q exactly (small integers are exact in bf16, and each output
        sums one non-zero product). Costs a K x K x N matmul: about a second for a 1024 x 32000 head on 2 cores."""
        K, N = self.in_features, self.out_features
        device = self.weight_packed.device
        identity_qparams = torch.stack([torch.ones(K // self.group_size, N, device=device),
                                        torch.full((K // self.group_size, N), float(INT4_ZERO_OFFSET),
                                                   device=device)], dim=-1).to(torch.bfloat16)
        eye = torch.eye(K, dtype=torch.bfloat16, device=device)
        rows = [_int4_mm(eye[start:start + 1024], self.weight_packed, self.group_size, identity_qparams)
                for start in range(0, K, 1024)]  # blocks of 1024 rows bound the (rows, N) output
        return torch.cat(rows).t().round().to(torch.uint8)  # (N, K)

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.unpacked(), self.scale_and_zero[..., 0].t(), self.scale_and_zero[..., 1].t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scale_and_zero.dtype)  # (M, K)
        y = _int4_mm(x2, self.weight_packed, self.group_size, self.scale_and_zero)  # (M, N)
        return y.view(*shape[:-1], self.out_features).to(x.dtype)

    # The portable layout in state dicts -------------------------------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        scale_and_zero = self.scale_and_zero.detach()
        if self.weight_packed.device.type == "meta":
            q = torch.empty(self.out_features, self.in_features // 2, dtype=torch.uint8, device="meta")
        else:
            q = pack_nibbles(self.unpacked())
        destination[prefix + "weight_packed"] = q  # (N, K/2)
        destination[prefix + "weight_scale"] = scale_and_zero[..., 0].t().contiguous()  # (N, K/G)
        destination[prefix + "weight_zero"] = scale_and_zero[..., 1].t().contiguous()  # (N, K/G)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        names = ("weight_packed", "weight_scale", "weight_zero")
        if any(prefix + name not in state_dict for name in names):
            missing_keys.extend(prefix + name for name in names if prefix + name not in state_dict)
            return
        packed, scale, zero = (state_dict[prefix + name] for name in names)
        N, K, G = self.out_features, self.in_features, self.group_size
        expected = {"weight_packed": (N, K // 2), "weight_scale": (N, K // G), "weight_zero": (N, K // G)}
        for name, tensor in zip(names, (packed, scale, zero)):
            if tuple(tensor.shape) != expected[name]:
                error_msgs.append(f"{prefix}{name}: shape {tuple(tensor.shape)}, expected {expected[name]}")
                return
        on_meta = self.scale_and_zero.device.type == "meta"  # built to be loaded into: take what is given
        device = packed.device if on_meta else self.scale_and_zero.device
        dtype = scale.dtype if on_meta else self.scale_and_zero.dtype
        self.set_quantized(unpack_nibbles(packed.to(device)), scale.to(device, dtype), zero.to(device, dtype))

    def _apply(self, fn, recurse: bool = True):
        """`.to(device)` and friends: the packed layout is the device's own, so a move unpacks, moves, repacks.
        Casts (`.to(dtype)`, `.half()`) reach only the floating scale-and-zero tensor, as for any module."""
        old_device = self.weight_packed.device
        new_device = fn(torch.empty(0, dtype=torch.uint8, device=old_device)).device
        if new_device == old_device or "meta" in (old_device.type, new_device.type):
            return super()._apply(fn, recurse)
        check_int4_device(new_device)
        q = self.unpacked()
        super()._apply(fn, recurse)  # moves scale_and_zero (and the stale packed tensor, replaced next)
        self.set_quantized(q.to(new_device), self.scale_and_zero[..., 0].t(), self.scale_and_zero[..., 1].t())
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


# --------------------------------------------------------------------------------------------------------------
# What a model's quantization is, as config.json records it
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationSpec:
    """method "int8" | "int4"; group_size for int4 (None for int8); quantize_output: the output head too."""

    method: str
    group_size: int | None = None
    quantize_output: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MinillamaError(f"unknown quantization {self.method!r}; expected one of {', '.join(METHODS)}")
        if self.method == "int8" and self.group_size is not None:
            raise MinillamaError("int8 is quantized per output channel; a group size applies to int4 only")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise MinillamaError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got "
                                 f"{self.group_size!r}")

    @classmethod
    def create(cls, method: str, group_size: int | None = None, quantize_output: bool = True) -> QuantizationSpec:
        """Like the constructor, with int4's group size defaulting to DEFAULT_GROUP_SIZE."""
        if method == "int4" and group_size is None:
            group_size = DEFAULT_GROUP_SIZE
        return cls(method, group_size, quantize_output)

    @property
    def bits(self) -> int:
        return 8 if self.method == "int8" else 4

    def to_hf(self) -> dict[str, Any]:
        """config.json's `quantization_config`. `quant_method` is what transformers dispatches on (see
        `minillama.interop.hf.refuse_foreign_quantization` for what it does with ours)."""
        return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": self.method,
                "bits": self.bits, "group_size": self.group_size, "symmetric": self.method == "int8",
                "quantize_output": self.quantize_output}

    @classmethod
    def from_hf(cls, config: Any, source: str) -> QuantizationSpec:
        if not isinstance(config, dict) or config.get("quant_method") != QUANT_METHOD:
            method = config.get("quant_method") if isinstance(config, dict) else config
            raise MinillamaError(f"{source}: quantization_config.quant_method={method!r}; minillama reads only "
                                 f"its own {QUANT_METHOD!r} quantization")
        if config.get("format_version") != FORMAT_VERSION:
            raise MinillamaError(f"{source}: quantization_config.format_version={config.get('format_version')!r}, "
                                 f"this minillama reads version {FORMAT_VERSION}")
        quantize_output = config.get("quantize_output", True)
        if not isinstance(quantize_output, bool):
            raise MinillamaError(f"{source}: quantization_config.quantize_output must be true or false, got "
                                 f"{quantize_output!r}")
        try:
            spec = cls(config.get("method"), config.get("group_size"), quantize_output)
        except MinillamaError as exc:
            raise MinillamaError(f"{source}: quantization_config: {exc}") from None
        if config.get("bits") != spec.bits:
            raise MinillamaError(f"{source}: quantization_config.bits={config.get('bits')!r} contradicts "
                                 f"method={spec.method!r}")
        return spec


def quantization_spec(model: nn.Module) -> QuantizationSpec | None:
    """The spec `quantize` applied to `model` (None if it is not quantized)."""
    return getattr(_unwrap(model), "quantization", None)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # torch.compile's wrapper


# --------------------------------------------------------------------------------------------------------------
# Quantizing a model
# --------------------------------------------------------------------------------------------------------------
def _targets(model: nn.Module, spec: QuantizationSpec) -> list[tuple[str, nn.Linear]]:
    """The Linear modules to replace, each checked against the kernels' shape rules before any is replaced."""
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or (name == "output" and not spec.quantize_output):
            continue
        if module.bias is not None:
            raise MinillamaError(f"{name}: a Linear with a bias; minillama quantizes LLaMA's bias-free projections")
        N, K = module.out_features, module.in_features
        if spec.method == "int4":
            check_int4_device(module.weight.device)
            if K % spec.group_size != 0:
                raise MinillamaError(f"{name}: int4 group size {spec.group_size} does not divide its input "
                                     f"dimension {K}; choose one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                                     f"that does")
            if N % 16 != 0:  # both tinygemm packers' rule (CPU: N % 16, CUDA: N % 8)
                raise MinillamaError(f"{name}: int4 needs an output dimension divisible by 16, got {N}")
        targets.append((name, module))
    return targets


def default_scale_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype quantized matmuls run in unless asked otherwise: the weights', except fp32 on an x86 CPU with
    AVX2 or AVX-512, which gets bf16. There PyTorch's int8 and int4 CPU kernels are vectorized for bf16
    activations only, and fp32 ones take a scalar path (`benchmarks/quantize_speed.py --base-dtype fp32`,
    RESULTS.md, torch 2.13, 2 threads):
    - AVX-512 (with BF16): the 15m shape's int8 projections 4.5x and int4 ones 9.5x faster with bf16 scales than
      with fp32 ones, eager decoding 2.7x faster for both;
    - AVX2 only (no native bf16): 15m's projections 3.8x (int8) and 5.5x (int4) faster, eager decoding 2.2x and
      2.8x; at 350m decoding 3.4x (int8) and 8.7x (int4), and the compiled int8 step 11x. With fp32 scales
      quantizing made an fp32 model slower (350m: 0.49x for int8), with bf16 ones faster (1.63x).
    The quantized matmuls' activations are then rounded to bf16 (each layer's output is cast back to fp32): a
    relative error of at most 2^-9 per value, below that of the weights' own rounding to 8 or 4 bits. Other
    CPUs (ARM, POWER, x86 without AVX2) keep the weights' dtype: not measured."""
    if (weight_dtype == torch.float32 and device.type == "cpu"
            and torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512"))):
        return torch.bfloat16
    return weight_dtype


def _scale_dtype_for(model: nn.Module) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the model's floating-point weights, `default_scale_dtype` for them)."""
    weight = next(model.parameters())
    return weight.dtype, default_scale_dtype(weight.dtype, weight.device)


def set_scale_dtype(model: nn.Module) -> nn.Module:
    """Where `default_scale_dtype` differs from the model's floating-point dtype (fp32 on an AVX2/AVX-512 CPU),
    cast its quantized layers' scales and zeros to it: a quantized checkpoint loaded in fp32 there runs its quantized
    matmuls in bf16, as `quantize()` gives them. Elsewhere the scales stay as loaded (on CUDA int4 keeps the
    bf16 its kernel needs). Returns `model`."""
    weight_dtype, scale_dtype = _scale_dtype_for(model)
    if scale_dtype != weight_dtype:
        for module in model.modules():
            if isinstance(module, QUANTIZED_LINEARS):
                module.to(scale_dtype)  # a cast reaches only the floating-point scales, not the integer weights
    return model


def quantize(model: nn.Module, method: str, group_size: int | None = None, *, quantize_output: bool = True,
             scale_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` (a Transformer, possibly compiled) in place; returns `model`.

    method: "int8" (per output channel) or "int4" (groups of `group_size` inputs, default DEFAULT_GROUP_SIZE).
    quantize_output=False keeps the output head in floating point (and tied to the embedding if it was).
    With it quantized, a tied embedding keeps its own floating-point copy: the lookup reads one row per token,
    so it costs memory but no decode bandwidth, while the head is read whole for every token.
    scale_dtype: dtype of scales and zeros, which is also the dtype the matmuls run in (default:
    `default_scale_dtype`, the weights' except for fp32 weights on an AVX2/AVX-512 CPU, which get bf16).
    Call it after moving the model to its device: int4 packs for the device it finds.
    """
    target = _unwrap(model)
    if quantization_spec(target) is not None:
        raise MinillamaError(f"the model is already quantized ({quantization_spec(target).method})")
    spec = QuantizationSpec.create(method, group_size, quantize_output)
    scale_dtype = scale_dtype or _scale_dtype_for(target)[1]
    for name, linear in _targets(target, spec):
        with torch.no_grad():
            if spec.method == "int8":
                replacement = Int8Linear.from_linear(linear, scale_dtype)
            else:
                replacement = Int4Linear.from_linear(linear, spec.group_size, scale_dtype)
        _replace(target, name, replacement)
    target.quantization = spec
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_structure(model: nn.Module, spec: QuantizationSpec, scale_dtype: torch.dtype) -> nn.Module:
    """Swap in empty quantized modules of the right shapes (for a model on the meta device, before loading)."""
    for name, linear in _targets(model, spec):
        N, K = linear.out_features, linear.in_features
        device = linear.weight.device
        if spec.method == "int8":
            replacement = Int8Linear(K, N, device=device, dtype=scale_dtype)
        else:
            replacement = Int4Linear(K, N, spec.group_size, device=device, dtype=scale_dtype)
            replacement.weight_packed = torch.empty(N, K // 2, dtype=torch.uint8, device=device)
        _replace(model, name, replacement)
    model.quantization = spec
    return model


def quantize_checkpoint(source: str | Path, out: str | Path, method: str, group_size: int | None = None, *,
                        quantize_output: bool = True) -> QuantizationSpec:
    """`minillama quantize`: read the checkpoint `source`, quantize it and save it (with its tokenizer) to `out`,
    atomically. Weights are quantized from their stored precision; scales, zeros and the floating-point
    remainder (embedding, norms, an unquantized head) are stored in bf16. Returns what was applied."""
    from minillama.checkpoint import load, save  # in the function: checkpoint imports this module too

    spec = QuantizationSpec.create(method, group_size, quantize_output)  # bad values fail before any reading
    if Path(out).resolve() == Path(source).resolve():
        raise MinillamaError(f"--out {out} is the source checkpoint; write the quantized copy elsewhere")
    model, tokenizer = load(source)
    if quantization_spec(model) is not None:
        raise MinillamaError(f"{source} is already quantized ({quantization_spec(model).method}); quantize the "
                             "original checkpoint instead")
    quantize(model, spec.method, spec.group_size, quantize_output=spec.quantize_output, scale_dtype=torch.bfloat16)
    save(model, tokenizer, out, dtype=torch.bfloat16)
    return spec


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each counted once (a tied embedding is one matrix)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


__all__ = ["quantize", "quantize_structure", "quantization_spec", "QuantizationSpec", "Int8Linear", "Int4Linear",
           "QUANTIZED_LINEARS", "METHODS", "INT4_GROUP_SIZES", "DEFAULT_GROUP_SIZE", "quantize_int8",
           "dequantize_int8", "quantize_int4", "dequantize_int4", "pack_nibbles", "unpack_nibbles", "weight_bytes",
           "quantize_checkpoint"]
