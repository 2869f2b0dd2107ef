"""Would an int4 matrix-vector kernel of our own beat torch's CPU int4 kernel? (issue 10's int4 target)

    pip install ninja   # torch.utils.cpp_extension builds the probe kernel with it
    python benchmarks/int4_gemv_probe.py [--preset 350m] [--threads 2] [--rounds 8]

At one row (batch-1 decoding) the engine's int4 layers call `aten._weight_int4pack_mm_for_cpu` (tinygemm's CPU
kernel; inductor calls it as an external kernel). It read the weights at 39-45% of the copy bandwidth in the
350m decode runs, slower per token than int8 although it reads 0.63x the bytes: it spends its time unpacking
nibbles, not waiting for memory. This probe puts a kernel written for one row beside it, using the CPU's bf16
dot-product instruction (AVX512-BF16's vdpbf16ps, 16 multiply-adds of bf16 pairs into fp32 per 256-bit op):
- weights in blocks of 64 (two groups of 32) stored as 16 16-bit words, word j holding the 4-bit values of
  weights j, 16 + j, 32 + j and 48 + j, so that four shift-and-mask steps give four vectors of 16 weights each,
  in the input's own order;
- a 4-bit value q OR-ed into 0x4300 is the bf16 number 128 + q, exactly: no conversion instruction and no table;
- per group, the dot product with the bf16 input times the group's scale is accumulated in fp32, and the zero
  point (with the 128 and tinygemm's 8) is one more dot product, of per-group constants with per-group sums of
  the input: y[n] = sum_g s[n,g] * sum_i (128 + q_i) x_i + (z[n,g] - 136 s[n,g]) * sum_i x_i;
- threads split the output rows (at::parallel_for, OpenMP).
Same quantized values, scales and zeros as the engine's Int4Linear (group size --group-size, default 32, the
project's default).

Contestants, each compiled with freezing (the engine's `CPU_COMPILE_OPTIONS`), one pass through the preset's
projections in forward order (every layer's wq, wk, wv, wo, w1, w3, w2, then the head), each a distinct matrix,
input one row: torch's int4 kernel (the engine's Int4Linear), the probe kernel, and for reference the engine's
int8 layers (inductor's own generated kernel). Interleaved rounds; each round's figure is the median of 8 passes.
GB/s counts the bytes a pass reads: 4-bit weights plus a bf16 scale and zero per group (int8: weights and scales).
Prints a table; writes benchmarks/results/int4_gemv_probe-<date>.json. The kernel is a probe, not part of
minillama (RESULTS.md says what shipping it would take).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_gemv_probe import compile_pass, table, time_passes  # noqa: E402
from quantize_speed import build_model, projections  # noqa: E402

from minillama.plan.hardware import cpu_model_name  # noqa: E402
from minillama.quantize import Int4Linear, quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 512  // how far ahead of the weights being read to prefetch (rows are contiguous)
#endif

// Rows [n0, n1) of y = W x for one bf16 row x. packed: (N, K/64, 16) 16-bit words (module docstring); scale,
// zero: (N, K/32) bf16, as stored; xsum: (K/32) per-group sums of x. y: (N) bf16.
__attribute__((target("avx2,fma")))
static inline __m256 bf16x8(const uint16_t* p) {  // 8 bf16 -> 8 fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")))
static void rows(const uint16_t* packed, const uint16_t* scale, const uint16_t* zero, const uint16_t* x,
                 const float* xsum, int64_t blocks, int64_t n0, int64_t n1, uint16_t* y) {
  const __m256i low4 = _mm256_set1_epi16(0xF), bias = _mm256_set1_epi16(0x4300);  // bf16 0x4300 = 128
  const int64_t groups = 2 * blocks;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* p = packed + n * blocks * 16;
    const uint16_t* sn = scale + n * groups;
    const uint16_t* zn = zero + n * groups;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(p + b * 16) + PREFETCH_BYTES, _MM_HINT_T0);
      __m256i w = _mm256_loadu_si256((const __m256i*)(p + b * 16));
      // (v & 0xF) | 0x4300 in one ternary-logic op (0xEA: (A & B) | C): the bf16 of 128 + q
      __m256i q0 = _mm256_ternarylogic_epi32(w, low4, bias, 0xEA);
      __m256i q1 = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 4), low4, bias, 0xEA);
      __m256i q2 = _mm256_ternarylogic_epi32(_mm256_srli_epi16(w, 8), low4, bias, 0xEA);
      __m256i q3 = _mm256_or_si256(_mm256_srli_epi16(w, 12), bias);
      const __m256i* xb = reinterpret_cast<const __m256i*>(x + b * 64);  // 4 x 16 bf16 inputs
      __m256 g0 = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)q0, (__m256bh)_mm256_loadu_si256(xb));
      g0 = _mm256_dpbf16_ps(g0, (__m256bh)q1, (__m256bh)_mm256_loadu_si256(xb + 1));
      __m256 g1 = _mm256_dpbf16_ps(_mm256_setzero_ps(), (__m256bh)q2, (__m256bh)_mm256_loadu_si256(xb + 2));
      g1 = _mm256_dpbf16_ps(g1, (__m256bh)q3, (__m256bh)_mm256_loadu_si256(xb + 3));
      acc0 = _mm256_fmadd_ps(g0, _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)sn[2 * b] << 16)), acc0);
      acc1 = _mm256_fmadd_ps(g1, _mm256_castsi256_ps(_mm256_set1_epi32((int32_t)sn[2 * b + 1] << 16)), acc1);
    }
    // sum_g (z - 136 s) * xsum[g]: tinygemm's (q - 8) * s + z, less the 128 * s the bf16 trick added
    __m256 zero_terms = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8) {
      __m256 sv = bf16x8(sn + g), zv = bf16x8(zn + g);
      __m256 terms = _mm256_fnmadd_ps(_mm256_set1_ps(136.f), sv, zv);  // z - 136 s
      zero_terms = _mm256_fmadd_ps(terms, _mm256_loadu_ps(xsum + g), zero_terms);
    }
    float rest = 0.f;
    for (; g < groups; ++g) {
      uint32_t sb = static_cast<uint32_t>(sn[g]) << 16, zb = static_cast<uint32_t>(zn[g]) << 16;
      float sf, zf;
      std::memcpy(&sf, &sb, 4);
      std::memcpy(&zf, &zb, 4);
      rest += (zf - 136.f * sf) * xsum[g];
    }
    __m256 t = _mm256_add_ps(_mm256_add_ps(acc0, acc1), zero_terms);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    y[n] = c10::BFloat16(_mm_cvtss_f32(h) + rest).x;  // round to nearest even
  }
}

torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, torch::Tensor zero) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == torch::kBFloat16 && x.is_contiguous(),
              "one contiguous bf16 row");
  const int64_t N = packed.size(0), blocks = packed.size(1), groups = 2 * blocks;
  TORCH_CHECK(x.size(1) == 64 * blocks, "K = 64 x blocks");
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && zero.is_contiguous(), "contiguous weights");
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 && zero.scalar_type() == torch::kBFloat16, "bf16 scales");
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  float xsum[512];  // K <= 16384
  TORCH_CHECK(groups <= 512, "K <= 16384");
  for (int64_t gi = 0; gi < groups; ++gi) {
    float total = 0.f;
    for (int i = 0; i < 32; ++i) {
      uint32_t bits = static_cast<uint32_t>(xp[gi * 32 + i]) << 16;
      float value;
      std::memcpy(&value, &bits, 4);
      total += value;
    }
    xsum[gi] = total;
  }
  auto y = torch::empty({1, N}, x.options());
  const uint16_t* pp = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::BFloat16>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(zero.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 16, [&](int64_t a, int64_t b) { rows(pp, sp, zp, xp, xsum, blocks, a, b, yp); });
  return y;
}

TORCH_LIBRARY(minillama_int4_probe, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor scale, Tensor zero) -> Tensor");
}
TORCH_LIBRARY_IMPL(minillama_int4_probe, CPU, m) { m.impl("int4_gemv", &int4_gemv); }
"""


def build_kernel() -> None:
    from torch.utils.cpp_extension import load_inline

    try:
        import ninja  # noqa: F401
    except ImportError:
        sys.exit("int4_gemv_probe.py: torch.utils.cpp_extension needs ninja: pip install ninja")
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        sys.exit("int4_gemv_probe.py: the probe kernel needs an AVX-512 CPU with AVX512-BF16")
    load_inline("minillama_int4_gemv_probe", cpp_sources=KERNEL, extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"], is_python_module=False)

    @torch.library.register_fake("minillama_int4_probe::int4_gemv")
    def _(x, packed, scale, zero):
        return x.new_empty(x.shape[0], packed.shape[0])


class ProbeInt4Linear(nn.Module):
    """An Int4Linear's values, scales and zeros in the probe kernel's layout."""

    def __init__(self, layer: Int4Linear) -> None:
        super().__init__()
        q = layer.unpacked()  # (N, K) values 0..15, read back through torch's kernel
        n, k = q.shape
        quarters = q.view(n, k // 64, 4, 16).to(torch.int32)  # (N, blocks, quarter, j)
        words = quarters[:, :, 0] | quarters[:, :, 1] << 4 | quarters[:, :, 2] << 8 | quarters[:, :, 3] << 12
        signed = (words - (words >= 1 << 15).int() * (1 << 16)).to(torch.int16)  # the same 16 bits, as int16
        self.register_buffer("packed", signed.contiguous())  # q comes transposed from unpacked()
        self.register_buffer("scale", layer.scale_and_zero[..., 0].t().contiguous())  # (N, K/G) bf16
        self.register_buffer("zero", layer.scale_and_zero[..., 1].t().contiguous())
        self.in_features = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.minillama_int4_probe.int4_gemv(x, self.packed, self.scale, self.zero)


class ProjectionPass(nn.Module):
    """Every projection once, in forward order, each on a one-row input of its width."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [layer(inputs[layer.in_features]) for layer in self.layers]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/int4_gemv_probe-<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build_kernel()
    base = build_model(args.preset)
    int4_layers = [layer for _, layer in projections(quantize(build_model(args.preset), "int4", args.group_size))]
    int8_layers = [layer for _, layer in projections(quantize(base, "int8"))]
    contestants = {"torch int4 (_weight_int4pack_mm_for_cpu)": ProjectionPass(int4_layers),
                   "probe: bf16 dot products": ProjectionPass([ProbeInt4Linear(m) for m in int4_layers]),
                   "int8, for reference (inductor's kernel)": ProjectionPass(int8_layers)}
    inputs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in {m.in_features for m in int4_layers}}
    with torch.no_grad():
        reference = [m(inputs[m.in_features]).float() for m in int4_layers]
    compiled = {}
    for name, module in contestants.items():
        print(name, flush=True)
        compiled[name], outputs = compile_pass(module, inputs)
        if "int8" not in name:  # the int8 layers hold other weights
            worst = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(outputs, reference))
            assert worst < 1e-2, f"{name}: relative difference {worst} from Int4Linear"
            print(f"  largest difference from Int4Linear (eager): {worst:.2e} of the output's largest value")
    times = time_passes(compiled, inputs, args.rounds)
    print(f"\n{args.preset} projections at one row, int4 group {args.group_size}, {args.threads} threads, "
          f"{cpu_model_name()}")
    rows = table(contestants, times)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"int4_gemv_probe-{time.strftime('%Y-%m-%d')}.json")
    out.write_text(json.dumps(dict(preset=args.preset, group_size=args.group_size, threads=args.threads,
                                   cpu=cpu_model_name(), torch=torch.__version__, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
