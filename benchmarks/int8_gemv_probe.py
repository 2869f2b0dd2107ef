"""Would another int8 matrix-vector kernel read the weights faster than inductor's? (issue 10's int8 target)

    pip install ninja   # torch.utils.cpp_extension builds the probe kernel with it
    python benchmarks/int8_gemv_probe.py [--preset 350m] [--threads 2] [--rounds 8]

At one row (batch-1 decoding), an int8 weight-only matmul reads each weight byte once and does one multiply-add
with it. The compiled CPU decode step (minillama/infer/engine.py, CPU_COMPILE_OPTIONS) lets inductor generate
that kernel: weights blocked at freezing, int8 widened to fp32 and multiplied in vector registers. This probe
puts two alternatives beside it:
- a plain kernel of our own, the way llama.cpp's CPU kernels read weights: rows packed in groups of 4 so that each
  vector load holds 16 (AVX-512) or 8 (AVX2) weights of each of the 4 rows (one contiguous stream per thread),
  widened to fp32, fused multiply-adds into 4 accumulators, threads split over the output rows (at::parallel_for);
- PyTorch's dynamically quantized Linear (fbgemm, `torch.ao`): the input row is quantized to int8 at each call and
  the products are integer dot products (AVX2's vpmaddubsw), as llama.cpp's q8_0 does. That is no longer
  weight-only quantization (the activations lose precision too); it is here to see whether integer dot products
  beat widening every weight. Its weights are our int8 weights, per channel; it runs eagerly (dynamo cannot trace
  its packed weights), which adds the Python cost of 169 module calls to its pass.

The inductor and hand-written contestants run the same thing, compiled with freezing: one pass through the
preset's projections in forward order (every layer's wq, wk, wv, wo, w1, w3, w2, then the head), each a distinct
matrix, input one row. Interleaved rounds; each round's figure is the median of 8 passes. Prints a table; writes
benchmarks/results/int8_gemv_probe-<date>.json. Neither alternative is part of minillama: both lost (RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_speed import build_model, projections  # noqa: E402

from minillama.infer.engine import CPU_COMPILE_OPTIONS  # noqa: E402
from minillama.plan.hardware import cpu_model_name  # noqa: E402
from minillama.quantize import Int8Linear, quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

KERNEL = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// out[n] = scale[n] * sum_k x[k] * w[n, k], w packed as (N/4, K/L, 4, L): block b holds rows 4b..4b+3, L = 16
// (AVX-512) or 8 (AVX2) weights of each per vector load.
__attribute__((target("avx512f,avx512bw,fma")))
static void rows_of_4_avx512(const float* x, int64_t K, const int8_t* w, int64_t b0, int64_t b1, float* out,
                             const float* scale) {
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), acc2 = _mm512_setzero_ps(),
           acc3 = _mm512_setzero_ps();
    const int8_t* p = w + b * 4 * K;
    for (int64_t k = 0; k < K; k += 16, p += 64) {
      __m512i four = _mm512_loadu_si512(p);
      __m512 xv = _mm512_loadu_ps(x + k);
      acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(four))), xv, acc0);
      acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(four, 1))), xv, acc1);
      acc2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(four, 2))), xv, acc2);
      acc3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(four, 3))), xv, acc3);
    }
    out[4 * b] = _mm512_reduce_add_ps(acc0) * scale[4 * b];
    out[4 * b + 1] = _mm512_reduce_add_ps(acc1) * scale[4 * b + 1];
    out[4 * b + 2] = _mm512_reduce_add_ps(acc2) * scale[4 * b + 2];
    out[4 * b + 3] = _mm512_reduce_add_ps(acc3) * scale[4 * b + 3];
  }
}

__attribute__((target("avx2,fma")))
static inline float sum_of_8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

__attribute__((target("avx2,fma")))
static void rows_of_4_avx2(const float* x, int64_t K, const int8_t* w, int64_t b0, int64_t b1, float* out,
                           const float* scale) {
  for (int64_t b = b0; b < b1; ++b) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), acc2 = _mm256_setzero_ps(),
           acc3 = _mm256_setzero_ps();
    const int8_t* p = w + b * 4 * K;
    for (int64_t k = 0; k < K; k += 8, p += 32) {
      __m256i four = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      __m128i lo = _mm256_castsi256_si128(four), hi = _mm256_extracti128_si256(four, 1);
      __m256 xv = _mm256_loadu_ps(x + k);
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)), xv, acc0);
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))), xv, acc1);
      acc2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)), xv, acc2);
      acc3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))), xv, acc3);
    }
    out[4 * b] = sum_of_8(acc0) * scale[4 * b];
    out[4 * b + 1] = sum_of_8(acc1) * scale[4 * b + 1];
    out[4 * b + 2] = sum_of_8(acc2) * scale[4 * b + 2];
    out[4 * b + 3] = sum_of_8(acc3) * scale[4 * b + 3];
  }
}

torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scale) {
  auto K = x.size(1), N = scale.size(0), L = packed.size(3);
  TORCH_CHECK(x.size(0) == 1 && (L == 16 || L == 8) && K % L == 0 && N % 4 == 0, "one row, K % L, N % 4");
  auto rows_of_4 = L == 16 ? rows_of_4_avx512 : rows_of_4_avx2;
  auto xf = x.to(torch::kFloat).contiguous();
  auto sf = scale.to(torch::kFloat).contiguous();
  auto out = torch::empty({1, N}, x.options().dtype(torch::kFloat));
  const float* xp = xf.data_ptr<float>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  float* op = out.data_ptr<float>();
  const float* sp = sf.data_ptr<float>();
  at::parallel_for(0, N / 4, 16, [&](int64_t b0, int64_t b1) { rows_of_4(xp, K, wp, b0, b1, op, sp); });
  return out.to(x.scalar_type());
}

TORCH_LIBRARY(minillama_probe, m) { m.def("int8_gemv(Tensor x, Tensor packed, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(minillama_probe, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
"""


def build_kernel() -> None:
    from torch.utils.cpp_extension import load_inline

    try:
        import ninja  # noqa: F401
    except ImportError:
        sys.exit("int8_gemv_probe.py: torch.utils.cpp_extension needs ninja: pip install ninja")
    load_inline("minillama_int8_gemv_probe", cpp_sources=KERNEL, extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"], is_python_module=False)

    @torch.library.register_fake("minillama_probe::int8_gemv")
    def _(x, packed, scale):
        return x.new_empty(x.shape[0], scale.shape[0])


def vector_lanes() -> int:
    """fp32 lanes of this CPU's widest vectors the probe kernel has code for: 16 (AVX-512) or 8 (AVX2)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith(("AVX512", "AVX2")):
        sys.exit(f"int8_gemv_probe.py: the probe kernel needs AVX2 or AVX-512; this CPU has {capability}")
    return 16 if capability.startswith("AVX512") else 8


class PackedInt8Linear(nn.Module):
    """An Int8Linear's weights in the probe kernel's layout."""

    def __init__(self, layer: Int8Linear, lanes: int) -> None:
        super().__init__()
        n, k = layer.weight.shape
        self.register_buffer("packed", layer.weight.view(n // 4, 4, k // lanes, lanes).transpose(1, 2).contiguous())
        self.register_buffer("scale", layer.weight_scale)
        self.in_features = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.minillama_probe.int8_gemv(x, self.packed, self.scale)


class DynamicInt8Linear(nn.Module):
    """An Int8Linear's weights and scales in fbgemm's dynamically quantized Linear (int8 activations)."""

    def __init__(self, layer: Int8Linear) -> None:
        super().__init__()
        try:
            from torch.ao.nn.quantized.dynamic import Linear
        except ImportError:
            sys.exit("int8_gemv_probe.py: this torch has no torch.ao dynamic quantization (fbgemm)")
        n, k = layer.weight.shape
        scale, zero = layer.weight_scale.double(), torch.zeros(n, dtype=torch.long)
        weight = torch._make_per_channel_quantized_tensor(layer.weight, scale, zero, 0)
        self.inner = Linear(k, n, bias_=False, dtype=torch.qint8)
        self.inner.set_weight_bias(weight, None)
        self.in_features = k
        self.nbytes = n * k + 4 * n  # int8 weights + fp32 scales, what it reads (its packed copy is opaque)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


class ProjectionPass(nn.Module):
    """Every projection once, in forward order, each on a one-row input of its width."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: dict[int, torch.Tensor]) -> list[torch.Tensor]:
        return [layer(inputs[layer.in_features]) for layer in self.layers]


def bytes_read(module: nn.Module) -> int:
    if isinstance(module, DynamicInt8Linear):
        return module.nbytes
    own = sum(t.numel() * t.element_size() for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])
    return own + sum(bytes_read(child) for child in module.children())


def compile_pass(module: nn.Module, inputs: dict[int, torch.Tensor]) -> tuple[nn.Module, list[torch.Tensor]]:
    """`module` compiled with freezing and the engine's CPU options, and its first outputs."""
    import torch._inductor.config as inductor_config

    started = time.perf_counter()
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(module.eval(), options=CPU_COMPILE_OPTIONS)
        outputs = compiled(inputs)
    print(f"  compiled in {time.perf_counter() - started:.0f} s", flush=True)
    return compiled, outputs


def time_passes(compiled: dict[str, nn.Module], inputs: dict[int, torch.Tensor], rounds: int) -> dict[str, list]:
    """Per contestant, each round's median seconds of 8 passes (after 2 unmeasured), rounds interleaved."""
    import torch._inductor.config as inductor_config

    times: dict[str, list[float]] = {name: [] for name in compiled}
    with inductor_config.patch(freezing=True), torch.no_grad():
        for _ in range(rounds):
            for name, step in compiled.items():
                for _ in range(2):
                    step(inputs)
                passes = []
                for _ in range(8):
                    started = time.perf_counter()
                    step(inputs)
                    passes.append(time.perf_counter() - started)
                times[name].append(statistics.median(passes))
    return times


def table(contestants: dict[str, nn.Module], times: dict[str, list]) -> list[dict]:
    """Print the markdown table of a probe's passes; returns its rows for the JSON."""
    rows = []
    print("| kernel | ms per pass (median of rounds) | best round | GB/s of weights read |")
    print("| --- | ---: | ---: | ---: |")
    for name, module in contestants.items():
        median, nbytes = statistics.median(times[name]), bytes_read(module)
        rows.append(dict(kernel=name, ms_per_pass=median * 1e3, best_ms=min(times[name]) * 1e3, bytes=nbytes,
                         gb_per_s=nbytes / median / 1e9, rounds_ms=[t * 1e3 for t in times[name]]))
        print(f"| {name} | {median * 1e3:.1f} | {min(times[name]) * 1e3:.1f} | {nbytes / median / 1e9:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/int8_gemv_probe-<date>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    build_kernel()
    model = quantize(build_model(args.preset), "int8")
    int8_layers = [layer for _, layer in projections(model)]
    lanes, eager = vector_lanes(), "fbgemm dynamic (int8 activations), eager"  # dynamo cannot trace fbgemm's
    contestants = {"inductor (engine's CPU_COMPILE_OPTIONS)": ProjectionPass(int8_layers),
                   f"hand-written, rows packed by 4, {lanes} lanes": ProjectionPass(
                       [PackedInt8Linear(m, lanes) for m in int8_layers]),
                   eager: ProjectionPass([DynamicInt8Linear(m) for m in int8_layers])}
    widths = {m.in_features for m in int8_layers}
    inputs = {k: torch.randn(1, k, dtype=torch.bfloat16) for k in widths}
    with torch.no_grad():
        reference = [m(inputs[m.in_features]).float() for m in int8_layers]
    compiled = {}
    for name, module in contestants.items():
        print(name, flush=True)
        if name == eager:
            with torch.no_grad():
                compiled[name], outputs = module, module(inputs)
        else:
            compiled[name], outputs = compile_pass(module, inputs)
        worst = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip(outputs, reference))
        # int8 activations round the input as well: a looser bound for that contestant alone
        assert worst < (5e-2 if name == eager else 1e-2), f"{name}: relative difference {worst}"
    times = time_passes(compiled, inputs, args.rounds)
    print(f"\n{args.preset} int8 projections at one row, {args.threads} threads, {cpu_model_name()}")
    rows = table(contestants, times)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"int8_gemv_probe-{time.strftime('%Y-%m-%d')}.json")
    out.write_text(json.dumps(dict(preset=args.preset, threads=args.threads, cpu=cpu_model_name(),
                                   torch=torch.__version__, rows=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
