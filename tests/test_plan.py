"""The planner: every published figure it must reproduce, its CLI, its errors, and its memory model against the
tensors autograd really saves. Tolerances are ±1 in the last digit of the published figure."""

import gc
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minillama import ModelConfig, Transformer, count_parameters
from minillama.cli import main
from minillama.config import PRESETS
from minillama.plan import PlanOptions, activation_bytes_per_sequence, flops_per_token, hardware, make_plan
from minillama.plan.flops import layer_matmul_params, matmul_params
from minillama.plan.memory import head_activation_bytes, layer_activation_bytes, training_memory

# GPT-3 175B's shape (Brown et al. 2020, Table 2.1) in our architecture: 96 layers, d 12,288, 96 heads, a SwiGLU
# of width 8d/3 (the same 8d² weights as GPT-3's 4d GELU MLP), GPT-2's 50,257-token vocabulary, tied embeddings.
GPT3 = ModelConfig(dim=12288, n_layers=96, n_heads=96, vocab_size=50257, ffn_hidden_dim=32768, tie_embeddings=True,
                   max_seq_len=2048)


def plan(**kwargs):
    return make_plan(PlanOptions(**kwargs))


def close(value, published, last_digit):
    """Within ±1 in the last printed digit of the published figure."""
    return abs(value - published) <= last_digit + 1e-9 * abs(published)


# --------------------------------------------------------------------------------------------------------------
# Published figures
# --------------------------------------------------------------------------------------------------------------
EXACT_COUNTS = {
    "llama1-7b": 6_738_415_616, "llama1-13b": 13_015_864_320, "llama1-33b": 32_528_943_616,
    "llama1-65b": 65_285_660_672, "llama2-70b": 68_976_648_192, "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800, "llama3.2-1b": 1_235_814_400,
    "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_of_every_preset(name):
    params = plan(model=name)["params"]
    assert params == count_parameters(ModelConfig.from_preset(name))
    if name in EXACT_COUNTS:
        assert params == EXACT_COUNTS[name]


def test_llama_65b_takes_21_days_on_2048_gpus():
    p = plan(model="llama1-65b", tokens="1.4T", gpu="a100-80gb", gpus=2048, tokens_per_s_per_gpu=380)
    assert close(p["days"], 20.8, 0.1)


@pytest.mark.parametrize("gpu_hours, mwh, tonnes", [(1_022_362, 449, 173), (82_432, 36, 14), (135_168, 59, 23),
                                                     (530_432, 233, 90)])
def test_llama_table15_energy_and_carbon(gpu_hours, mwh, tonnes):
    p = plan(params="65B", gpu="a100-80gb", gpu_hours=gpu_hours, power_w=400, pue=1.1, grid_kgco2_per_kwh=0.385)
    assert close(p["energy_mwh"], mwh, 1)
    assert close(p["co2_tonnes"], tonnes, 1)


def test_llama2_7b_costs_760k_dollars():
    p = plan(model="llama2-7b", tokens="2T", gpu="a100-80gb", gpu_hours=184_320, price_per_gpu_hour=33 / 8)
    assert close(p["cost_usd"] / 1e3, 760, 1)


def test_gpt3_flops_and_355_gpu_years():
    p = plan(model_config=GPT3, tokens=300e9, gpu="v100", gpus=1, flops_per_s_per_gpu=28e12, flops_basis="6nd")
    assert close(p["flops_6nd"], 3.14e23, 0.01e23)
    assert close(p["days"] / 365.25, 355, 1)
    # The count with attention is larger: 6·L·H·Dh·(T+1) adds ~1.4% at T = 2048.
    assert 1.01 < p["flops"] / p["flops_6nd"] < 1.02


def test_llama3_8b_6nd_and_gpu_hour_flops_differ():
    p = plan(model="llama3-8b", tokens="15T", gpu="h100-sxm", gpu_hours=1.3e6, flops_per_s_per_gpu=400e12)
    assert close(p["flops_6nd"], 7.2e23, 0.1e23)
    assert close(p["flops_from_gpu_hours"], 1.9e24, 0.1e24)
    assert any("GPU-hours" in note for note in p["notes"])  # the plan says why


def test_chinchilla_table3_and_parametric_loss():
    p = plan(params="1B")
    assert close(p["chinchilla_tokens_table3"], 20.2e9, 0.1e9)
    assert close(6 * p["params"] * p["chinchilla_tokens_table3"], 1.21e20, 0.01e20)
    assert p["chinchilla_tokens"] == 20e9
    assert close(plan(params="70B", tokens="1.4T")["loss_chinchilla"], 1.9366, 0.0001)


@pytest.mark.parametrize("name, per_token", [("llama3-8b", 131_072), ("llama2-70b", 327_680), ("llama1-7b", 524_288)])
def test_kv_cache_bytes_per_token_in_bf16(name, per_token):
    assert plan(model=name, dtype="bf16")["kv_bytes_per_token"] == per_token


def test_175b_in_fp16_needs_five_80gb_gpus():
    p = plan(params="175B", dtype="fp16", gpu="a100-80gb")
    assert 4 * p["gpu_memory_bytes"] < p["weights_bytes"] <= 5 * p["gpu_memory_bytes"]
    assert p["min_gpus_inference"] == 5
    assert plan(model_config=GPT3, dtype="bf16", gpu="a100-80gb", context=2048)["min_gpus_inference"] == 5


@pytest.mark.parametrize("stage, gigabytes", [(0, 120), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_figure1(stage, gigabytes):
    m = plan(params="7.5B", gpus=64, precision="mixed", zero=stage)["train_memory_bytes"]
    model_states = m["weights"] + m["gradients"] + m["optimizer"]
    assert close(model_states / 1e9, gigabytes, 1 if stage == 0 else 0.1)


# --------------------------------------------------------------------------------------------------------------
# FLOPs and memory formulas against the model code
# --------------------------------------------------------------------------------------------------------------
def test_counted_matmul_weights_are_the_models_linear_layers():
    for name in ("tiny", "llama3-8b", "llama3.2-1b"):
        cfg = ModelConfig.from_preset(name)
        with torch.device("meta"):
            model = Transformer(cfg)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        assert matmul_params(cfg) == linear  # the tied head is counted once, as a matmul
        assert sum(layer_matmul_params(cfg).values()) * cfg.n_layers + cfg.dim * cfg.vocab_size == linear


def test_flops_per_token_formula():
    cfg = ModelConfig.from_preset("llama3-8b")
    expected = 6 * matmul_params(cfg) + 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * (8192 + 1)
    assert flops_per_token(cfg, 8192) == expected
    assert flops_per_token(cfg, 8192, training=False) == expected / 3


def _saved_bytes(cfg, tokens, mode, attention="sdpa", seq_len=None):
    """Bytes of distinct non-parameter storages autograd saves for a forward + loss (census), over sequences of
    `seq_len` (default: two sequences of tokens / 2)."""
    torch.manual_seed(0)
    model = Transformer(cfg, attention=attention)
    if mode == "pure-bf16":
        model = model.to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}
    alive = []  # held here, not by the graph: a pack hook returning its tensor makes an uncollectable cycle

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        alive.append(t)
        return None

    seq_len = seq_len or tokens // 2
    x, y = torch.randint(0, cfg.vocab_size, (2, tokens // seq_len, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    alive.clear()
    return sum(kept.values())


@pytest.mark.parametrize("seq_len", [64, 100, 150])
@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_blocked_attention_activation_formula_matches_the_census(mode, seq_len):
    """What CPU training runs: the blocked kernel keeps its softmax probabilities (the staircase of query blocks;
    100 and 150 end in a ragged block) instead of sdpa's log-sum-exp."""
    tokens = 300 if seq_len != 64 else 128
    tokens = tokens - tokens % seq_len
    one, two = (ModelConfig.from_preset("15m", n_layers=n) for n in (1, 2))
    weight_copies = 2 * sum(layer_matmul_params(one).values()) if mode == "bf16" else 0
    census = [_saved_bytes(cfg, tokens, mode, "blocked", seq_len) for cfg in (two, one)]
    per_layer = census[0] - census[1] - weight_copies
    expected = layer_activation_bytes(one, mode, attention="blocked", seq_len=seq_len) * tokens
    assert per_layer == pytest.approx(expected, abs=0.5)
    assert per_layer > layer_activation_bytes(one, mode) * tokens  # more than sdpa keeps


@pytest.mark.parametrize("mode", ["bf16", "fp32", "pure-bf16"])
def test_activation_formula_matches_saved_tensor_census(mode):
    """The planner's per-layer activation bytes are exactly what autograd saves per block (minus autocast's
    weight copies, which the planner counts as working weights)."""
    tokens = 128
    one, two = (ModelConfig.from_preset("15m", n_layers=n) for n in (1, 2))
    weight_copies = 2 * sum(layer_matmul_params(one).values()) if mode == "bf16" else 0
    per_layer = _saved_bytes(two, tokens, mode) - _saved_bytes(one, tokens, mode) - weight_copies
    assert per_layer == layer_activation_bytes(one, mode) * tokens
    head_copies = 2 * one.dim * one.vocab_size if mode == "bf16" else 0
    rest = _saved_bytes(one, tokens, mode) - per_layer - weight_copies - head_copies
    rope_tables = 2 * 4 * (tokens // 2) * one.head_dim // 2  # fp32 cos and sin (T, D/2), shared by all layers
    assert rest == head_activation_bytes(one, mode) * tokens + rope_tables + 4  # + the loss scalar


@pytest.fixture(scope="module")
def bench():
    """benchmarks/plan_vs_measured.py as a module: its census and its tensor-bytes tracker."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "plan_vs_measured.py"
    spec = importlib.util.spec_from_file_location("plan_vs_measured", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkpointed_model(cfg: ModelConfig, attention: str, checkpointing: str) -> Transformer:
    """A model with the trainer's own activation checkpointing applied (train/parallelize.py)."""
    from minillama.train.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    model = Transformer(cfg, attention=attention)
    if checkpointing != "none":
        apply_activation_checkpointing(model, checkpointing)
    return model


def _live_after_forward(bench, cfg, tokens, seq_len, mode, attention, checkpointing) -> int:
    """Bytes of the tensors a forward + loss leaves alive for backward (inside autocast, so its weight copies
    included), by watching every op's outputs: unlike a saved-tensor hook this also sees inside checkpointed
    blocks, where checkpointing keeps its block inputs and the selective policy its cache of matmul outputs."""
    model = _checkpointed_model(cfg, attention, checkpointing)
    tokens_in = torch.randint(0, cfg.vocab_size, (tokens // seq_len, seq_len + 1))
    with bench.TensorBytes(bench.TensorBytes.storage_ptrs([*model.parameters(), *model.buffers()])) as tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
            loss = model(tokens_in[:, :-1], tokens_in[:, 1:])
            live = tracker.now
    del loss
    return live


@pytest.mark.parametrize("attention", ["sdpa", "blocked"])
@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
@pytest.mark.parametrize("mode", ["bf16", "fp32"])
def test_checkpointed_activation_formula_matches_the_live_tensor_census(bench, mode, checkpointing, attention):
    """What each activation checkpointing mode keeps per block, as the trainer applies it, is exactly what the
    planner counts: selective keeps the block input and its matmul and attention outputs (with the blocked CPU
    kernel, whose attention is batched matmuls, the score matrices: as large as the probabilities it keeps
    without checkpointing)."""
    tokens, seq_len = 128, 64
    one, two = (ModelConfig.from_preset("15m", n_layers=n) for n in (1, 2))
    weight_copies = 2 * sum(layer_matmul_params(one).values()) if mode == "bf16" else 0
    census = [_live_after_forward(bench, cfg, tokens, seq_len, mode, attention, checkpointing) for cfg in (two, one)]
    per_layer = census[0] - census[1] - weight_copies
    expected = layer_activation_bytes(one, mode, checkpointing, attention, seq_len) * tokens
    assert per_layer == pytest.approx(expected, abs=0.5)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_checkpointing_keeps_the_gradients_and_lowers_the_peak_as_planned(bench, mode):
    """Forward + backward with none, selective and full checkpointing: the same gradients (recomputation runs
    the same kernels on the same inputs: bit for bit), and a measured peak of tensor memory that falls from
    none to selective to full, each within 5% of the planner's (its total less the weights and AdamW state,
    which this step does not touch). A model whose activations outweigh its weights, so that they set the peak."""
    cfg = ModelConfig(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden_dim=768, vocab_size=512,
                      max_seq_len=256)
    batch, seq_len = 2, 256
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(0))
    peaks, grads = {}, {}
    for checkpointing in ("none", "selective", "full"):
        model = _checkpointed_model(cfg, "blocked", checkpointing)
        with bench.TensorBytes(bench.TensorBytes.storage_ptrs([*model.parameters(), *model.buffers()])) as tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                model(tokens[:, :-1], tokens[:, 1:]).backward()
        peaks[checkpointing] = tracker.peak
        grads[checkpointing] = {name: p.grad for name, p in model.named_parameters()}
        plan = training_memory(cfg, count_parameters(cfg), micro_batch=batch, seq_len=seq_len, precision=mode,
                               activation_checkpointing=checkpointing, attention="blocked")
        planned = plan["total"] - plan["weights"] - plan["optimizer"]
        assert tracker.peak == pytest.approx(planned, rel=0.05), (checkpointing, plan["peak_phase"])
    assert peaks["none"] > 1.05 * peaks["selective"] and peaks["selective"] > 1.05 * peaks["full"], peaks
    for checkpointing in ("selective", "full"):
        for name, grad in grads["none"].items():
            assert torch.equal(grads[checkpointing][name], grad), (checkpointing, name)


def _live_tensor_ids() -> set[int]:
    gc.collect()
    return {id(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}


def test_benchmark_census_leaves_nothing_alive():
    """The benchmark's census of saved tensors must free its models and graphs. Its pack hook once returned the
    tensor itself, which for an op's own saved output is a cycle gc cannot see (tensor -> grad_fn -> saved slot ->
    tensor): each census leaked its two models, their graphs and autocast's weight copies (509 MB for 125m, 2,262 MB
    for 1b), and since the CUDA rows shared a process, every later row's max_memory_allocated carried them (1b with
    full checkpointing read 23.4 GB against a 20.1 GB peak of its own)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "plan_vs_measured.py"
    spec = importlib.util.spec_from_file_location("plan_vs_measured", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = ModelConfig.from_preset("tiny")
    before = _live_tensor_ids()
    assert bench.saved_bytes_per_layer(cfg, "cpu", "bf16", tokens=64) == layer_activation_bytes(
        cfg, "bf16", attention="blocked", seq_len=64)  # the kernel CPU training runs
    assert _saved_bytes(cfg, 64, "bf16") > 0
    assert _live_tensor_ids() - before == set()


def test_trainer_facing_activation_estimate():
    cfg = ModelConfig.from_preset("tiny")
    per_seq = activation_bytes_per_sequence(cfg, 256, dtype="bf16", activation_checkpointing="none")
    assert per_seq == 256 * (cfg.n_layers * layer_activation_bytes(cfg, "bf16") + head_activation_bytes(cfg)
                             + 8 * cfg.vocab_size)
    assert activation_bytes_per_sequence(cfg, 256, "bf16", "full") < per_seq


def test_memory_peak_and_parts():
    cfg = ModelConfig.from_preset("125m")
    params = count_parameters(cfg)
    m = training_memory(cfg, params, micro_batch=8, seq_len=2048)
    assert m["total"] == pytest.approx(sum(m[k] for k in ("weights", "gradients", "optimizer", "activations",
                                                           "working_weights")))
    assert m["weights"] == 4 * params and m["optimizer"] == 8 * params
    # gradient accumulation keeps gradients alive through the forward pass
    accumulating = training_memory(cfg, params, micro_batch=8, seq_len=2048, grad_accum=2)
    assert accumulating["total"] > m["total"] and accumulating["gradients"] == 4 * params
    full = training_memory(cfg, params, micro_batch=8, seq_len=2048, activation_checkpointing="full")
    selective = training_memory(cfg, params, micro_batch=8, seq_len=2048, activation_checkpointing="selective")
    assert full["total"] < selective["total"] < m["total"]
    sharded = training_memory(cfg, params, micro_batch=8, seq_len=2048, dp=8, zero=3)
    assert sharded["weights"] == 4 * params / 8


def test_min_gpus_and_fit():
    p = plan(model="llama3-8b", gpu="h100-sxm", seq_len=8192, activation_checkpointing="full")
    assert not p["fits"]  # 16 bytes x 8B parameters alone exceed one 80 GB GPU
    assert 2 <= p["min_gpus_train"] <= 4
    assert plan(model="tiny", gpu="h100-sxm")["fits"]


def test_budget_mode_and_projection():
    p = plan(model="1b", budget_flops=1.21e20)
    assert close(p["budget"]["params"], 1.0e9, 0.01e9)
    assert p["budget"]["tokens"] == pytest.approx(20 * p["budget"]["params"])
    assert p["budget"]["nearest_preset"] == "1b"
    p = plan(model="1b", tokens="20B", price_per_gpu_hour=2, year=2030, base_year=2025, doubling_years=2.5)
    assert p["projection"]["cost_usd"] == pytest.approx(p["cost_usd"] / 4)


def test_config_file_reads_model_and_train_tables(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\npreset = "tiny"\nn_layers = 2\n\n[train]\nseq_len = 128\nbatch_tokens = 1024\n')
    p = plan(config=path)
    assert p["params"] == count_parameters(ModelConfig.from_preset("tiny", n_layers=2))
    assert p["seq_len"] == 128 and p["batch_tokens"] == 1024 and p["grad_accum"] == 8


# --------------------------------------------------------------------------------------------------------------
# Hardware
# --------------------------------------------------------------------------------------------------------------
def test_hardware_table_is_dense_peaks():
    assert set(hardware.GPUS) >= {"v100", "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200",
                                  "mi300x", "l4", "a10g", "rtx4090"}
    assert hardware.peak_flops("h100-sxm") == 989e12 and hardware.peak_flops("a100-80gb", "fp32") == 19.5e12
    for hw in hardware.GPUS.values():
        assert hw.peak_flops_bf16 > hw.peak_flops_fp32 > 0 and hw.memory_bytes > 0 and hw.tdp_w > 0


def test_preset_table_counts_every_preset():
    from minillama.plan import format_preset_table, preset_table

    rows = preset_table()
    assert [row["name"] for row in rows] == list(PRESETS)
    for row in rows:
        cfg = ModelConfig.from_preset(row["name"])
        assert row["params"] == count_parameters(cfg) and row["kv_heads"] == cfg.n_kv_heads
    lines = format_preset_table(rows).splitlines()
    assert lines[0].split()[:2] == ["name", "params"] and len(lines) == len(rows) + 1
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert lines[1].split()[1] == f"{rows[0]['params']:,}"


def test_cpu_probe_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "_probed_this_process", {})
    monkeypatch.delenv("MINILLAMA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware, "_measure_matmul_flops", lambda dtype, n=2048: calls.append(dtype) or 1e11)
    monkeypatch.setattr(hardware, "_measure_copy_bandwidth", lambda: 1e10)
    cpu = hardware.get_hardware("cpu")
    assert cpu.peak_flops("bf16") == 1e11 and (tmp_path / "minillama" / "cpu_peak.json").exists()
    assert hardware.device_peak_flops("cpu", "fp32") == 1e11 and len(calls) == 2  # second lookup: from the cache
    assert hardware.detect_hardware("cpu") == "cpu"
    p = plan(model="tiny", gpu="cpu", power_w=65)
    assert p["peak_flops_per_s"] == 1e11 and p["energy_mwh"] > 0


def test_cpu_probe_is_cached_under_minillama_cache(tmp_path, monkeypatch):
    """$MINILLAMA_CACHE moves every cache, the planner's CPU probe included (it once followed only XDG)."""
    monkeypatch.setattr(hardware, "_probed_this_process", {})
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(hardware, "_measure_matmul_flops", lambda dtype, n=2048: 2e11)
    monkeypatch.setattr(hardware, "_measure_copy_bandwidth", lambda: 1e10)
    cpu = hardware.get_hardware("cpu")
    assert cpu.peak_flops("fp32") == 2e11
    assert (tmp_path / "mine" / "cpu_peak.json").exists() and not (tmp_path / "xdg").exists()
    assert str(tmp_path / "mine" / "cpu_peak.json") in cpu.source


def test_the_cpu_probe_times_a_small_bf16_product_where_bf16_is_emulated(monkeypatch):
    """An AVX2-only CPU emulates bf16 (~1 GFLOP/s): its 2048 x 2048 probe product took a minute on one thread, in
    every process that trained until three probes were stored. There the bf16 product is 256 x 256."""
    from minillama import runtime

    sizes = {}
    monkeypatch.setattr(hardware, "_measure_matmul_flops", lambda dtype, n=2048: sizes.setdefault(dtype, n))
    monkeypatch.setattr(hardware, "_measure_copy_bandwidth", lambda: 1e10)
    for native, bf16_size in [(True, 2048), (False, 256)]:
        sizes.clear()
        monkeypatch.setattr(runtime, "native_bf16", lambda device, native=native: native)
        hardware._probe(0.0)
        assert sizes == {torch.bfloat16: bf16_size, torch.float32: 2048}


class FakeProbes:
    """Stands in for the matmul and copy probes and the clock: each `new_process` forgets the probe the last
    one took, as a new process would; `bf16`/`fp32` are what the next probe measures."""

    DAY = 86400.0

    def __init__(self, monkeypatch, tmp_path):
        self.monkeypatch, self.now, self.probes = monkeypatch, 1.7e9, 0
        self.bf16 = self.fp32 = 1e11
        monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path))
        monkeypatch.setattr(hardware, "_now", lambda: self.now)
        monkeypatch.setattr(hardware, "_measure_matmul_flops", self._matmul)
        monkeypatch.setattr(hardware, "_measure_copy_bandwidth", lambda: 1e10)
        self.new_process()

    def _matmul(self, dtype, n=2048):
        self.probes += dtype == torch.bfloat16
        return self.bf16 if dtype == torch.bfloat16 else self.fp32

    def new_process(self, days_later: float = 0.0) -> None:
        self.now += days_later * self.DAY
        self.monkeypatch.setattr(hardware, "_probed_this_process", {})

    def run(self, bf16: float, fp32: float = 1e11) -> tuple[hardware.Hardware, bool]:
        """One lookup of the CPU's row: (the row, whether it probed)."""
        self.bf16, self.fp32 = bf16, fp32
        before = self.probes
        return hardware.get_hardware("cpu"), self.probes > before


def test_cpu_peak_is_the_best_of_three_probes_from_different_processes(tmp_path, monkeypatch):
    fake = FakeProbes(monkeypatch, tmp_path)
    cpu, probed = fake.run(bf16=1e11, fp32=5e10)  # process 1, on a busy machine
    assert probed and cpu.peak_flops("bf16") == 1e11 and "best of 1 matmul probe(s)" in cpu.source
    assert fake.run(bf16=9e11) == (cpu, False)  # the same process probes once
    fake.new_process(days_later=1)
    cpu, probed = fake.run(bf16=3e11, fp32=4e10)  # process 2, a quiet machine
    assert probed and (cpu.peak_flops("bf16"), cpu.peak_flops("fp32")) == (3e11, 5e10)  # each the best seen
    assert "best of 2" in cpu.source and "bf16 peak from 2023-11-15 22:13, fp32 from 2023-11-14 22:13" in cpu.source
    fake.new_process(days_later=1)
    cpu, probed = fake.run(bf16=2e11)  # process 3
    assert probed and cpu.peak_flops("bf16") == 3e11 and "best of 3" in cpu.source
    fake.new_process(days_later=1)
    cpu, probed = fake.run(bf16=9e11)  # process 4: three probes are stored, none is taken
    assert not probed and cpu.peak_flops("bf16") == 3e11
    stored = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert [len(entry["probes"]) for entry in stored.values()] == [3]
    assert hardware.device_peak("cpu") == (3e11, f"{cpu.description}: {cpu.source}")  # the trainer's peak_source


def test_cpu_probes_expire_after_thirty_days(tmp_path, monkeypatch):
    fake = FakeProbes(monkeypatch, tmp_path)
    for bf16 in (1e11, 3e11, 2e11):  # three processes on three days
        fake.run(bf16=bf16)
        fake.new_process(days_later=1)
    fake.new_process(days_later=27.5)  # 30.5 days after the first probe, 28.5 after the second
    cpu, probed = fake.run(bf16=1.5e11)
    assert probed and cpu.peak_flops("bf16") == 3e11 and "best of 3" in cpu.source  # the first one replaced
    fake.new_process(days_later=60)
    cpu, probed = fake.run(bf16=1.5e11)  # every stored probe is stale: the new one alone
    assert probed and cpu.peak_flops("bf16") == 1.5e11 and "best of 1" in cpu.source


def test_cpu_probe_again_for_another_cpu_or_on_refresh(tmp_path, monkeypatch):
    fake = FakeProbes(monkeypatch, tmp_path)
    fake.run(bf16=1e11)
    fake.new_process()
    monkeypatch.setattr(hardware, "cpu_model_name", lambda: "Another CPU")  # keyed by CPU, threads and torch
    cpu, probed = fake.run(bf16=2e11)
    assert probed and cpu.peak_flops("bf16") == 2e11 and "Another CPU" in cpu.description
    assert len(json.loads((tmp_path / "cpu_peak.json").read_text())) == 2
    fake.bf16 = 1.2e11
    cpu = hardware.measured_cpu(refresh=True)  # drops what is stored and probes now
    assert cpu.peak_flops("bf16") == 1.2e11 and "best of 1" in cpu.source


def test_cpu_probe_cached_in_the_old_format_is_taken_again(tmp_path, monkeypatch):
    """Earlier versions stored one probe with no timestamp, to be kept forever: it is replaced."""
    key = f"{hardware.cpu_model_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}"
    old = dict(peak_flops_bf16=9e11, peak_flops_fp32=9e11, bandwidth_bytes_per_s=9e11)
    (tmp_path / "cpu_peak.json").write_text(json.dumps({key: old}))
    cpu, probed = FakeProbes(monkeypatch, tmp_path).run(bf16=1e11)
    assert probed and cpu.peak_flops("bf16") == 1e11
    assert json.loads((tmp_path / "cpu_peak.json").read_text())[key]["probes"][0]["peak_flops_bf16"] == 1e11


def test_device_peak_of_an_unknown_gpu_says_why(monkeypatch):
    def unknown(device):
        raise hardware.MinillamaError("GPU 'acme x1' is not in the hardware table")

    monkeypatch.setattr(hardware, "detect_hardware", unknown)
    assert hardware.device_peak("cuda") == (None, "GPU 'acme x1' is not in the hardware table")
    assert hardware.device_peak_flops("cuda") is None


def test_plan_names_where_the_peak_comes_from(tmp_path, monkeypatch):
    FakeProbes(monkeypatch, tmp_path).run(bf16=1e11)
    p = plan(model="tiny", gpu="cpu", power_w=65)
    assert p["peak_flops_source"].startswith("best of 1 matmul probe(s)")
    assert plan(model="tiny", gpu="h100-sxm")["peak_flops_source"] == "NVIDIA H100 Tensor Core GPU datasheet (2023)"


def test_real_cpu_probe_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware._measure_matmul_flops(torch.float32, n=256, min_time_s=0.05) > 1e8


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
REQUIRED_KEYS = {"params", "flops_6nd", "flops", "chinchilla_tokens", "tokens_per_param", "loss_chinchilla", "days",
                 "gpu_hours", "cost_usd", "energy_mwh", "co2_tonnes", "train_memory_bytes", "min_gpus_train",
                 "weights_bytes", "kv_bytes_per_token", "min_gpus_inference", "decode_tokens_per_s_max"}


def test_cli_json_has_the_stable_keys(capsys):
    assert main(["plan", "--model", "tiny", "--tokens", "100M", "--gpu", "a10g", "--price-per-gpu-hour", "1",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert REQUIRED_KEYS <= set(out)
    assert {"weights", "gradients", "optimizer", "activations", "total"} <= set(out["train_memory_bytes"])
    assert out["params"] == count_parameters(ModelConfig.from_preset("tiny")) and out["tokens"] == 100e6
    assert "explain" not in out


def test_cli_table_has_units_and_footnotes(capsys):
    assert main(["plan", "--model", "125m", "--tokens", "2.5B", "--gpu", "rtx4090", "--price-per-gpu-hour", "0.4",
                 "--year", "2030", "--base-year", "2025", "--budget-dollars", "1000"]) == 0
    out = capsys.readouterr().out
    for text in ("days", "GPU-hours", "kWh", "kgCO2eq", " GB", "tokens/s", "[1]", "Kaplan", "Hoffmann",
                 "nearest preset", "projection to 2030"):
        assert text in out


def test_cli_explain_substitutes_the_numbers(capsys):
    assert main(["plan", "--model", "llama1-65b", "--tokens", "1.4T", "--gpu", "a100-80gb", "--gpus", "2048",
                 "--tokens-per-s-per-gpu", "380", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "6ND = 6 x 65,285,660,672 x 1.4e12" in out
    assert "1.4e12 / (380 x 2048) / 86400 = 20.82" in out
    assert "2 x L x K x Dh x bytes = 2 x 80 x 64 x 128 x 2 = 2,621,440" in out
    assert "loss (Hoffmann) = 1.69 + 406.4 / 65,285,660,672^0.34" in out


@pytest.mark.parametrize("argv, expected", [
    (["--model", "tiny", "--gpu", "tpu-v9"], "known: v100, a100-40gb"),
    (["--model", "llama9-1t"], "known presets: llama1-7b"),
    (["--params", "0"], "--params must be positive"),
    (["--params", "-5"], "--params must be positive"),
    (["--model", "tiny", "--tokens", "0"], "--tokens must be positive"),
    (["--model", "tiny", "--gpus", "-2"], "--gpus must be positive"),
    (["--model", "tiny", "--mfu", "0"], "--mfu must be positive"),
    (["--model", "tiny", "--mfu", "1.5"], "--mfu must be in (0, 1]"),
    (["--model", "tiny", "--gpus", "8", "--dp", "2", "--tp", "2"], "differs from --gpus 8"),
    (["--model", "tiny", "--tokens", "lots"], "--tokens: expected a number"),
    ([], "give the model"),
    (["--model", "tiny", "--params", "7B"], "only one of"),
])
def test_bad_input_is_one_line_and_exit_code_2(capsys, argv, expected):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minillama: error:") and expected in err


def test_budget_mode_without_a_model_plans_the_nearest_preset(capsys):
    from minillama.cli import main

    assert main(["plan", "--budget-gpu-hours", "100000", "--gpu", "h100-sxm", "--gpus", "64", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    budget = plan["budget"]
    assert plan["model"] == budget["nearest_preset"]
    # The tokens planned are those the budget's FLOPs buy the preset under C = 6ND.
    assert plan["tokens"] == pytest.approx(budget["flops"] / (6 * budget["nearest_preset_params"]), rel=1e-9)
    assert plan["flops_6nd"] == pytest.approx(budget["flops"], rel=1e-9)
    # Time comes from counted FLOPs, which add causal attention to 6N: a little over the budget's 6ND hours.
    assert 1.0 < plan["gpu_hours"] / 100000 < 1.0 + plan["flops"] / plan["flops_6nd"] - 1 + 1e-6
