"""`make_plan`: every figure of a training or serving run from a model, a token count and a hardware layout.

The plan is a flat dict with stable keys (the `--json` output); `format_plan` renders it as a table with units
and footnoted sources, and `plan["explain"]` holds each formula with its numbers substituted (`--explain`).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minillama.config import PRESETS, ModelConfig, model_config_from_table, read_toml
from minillama.errors import MinillamaError
from minillama.plan import cost as costs
from minillama.plan import flops as flop_counts
from minillama.plan import memory as mem
from minillama.plan import scaling
from minillama.plan.hardware import Hardware, get_hardware

DEFAULT_MFU = 0.4

# Sources cited in footnotes, by key.
SOURCES = {
    "params": "counted on the model itself: minillama.model.count_parameters (built on the meta device)",
    "6nd": "C = 6ND: Kaplan et al. 2020 §2.1; Hoffmann et al. 2022 §3",
    "counted": "per-layer matmul count with causal attention, 6M + 6·L·H·Dh·(T+1) per token: PaLM (Chowdhery et "
               "al. 2022) appendix B with the causal halving; see minillama/plan/flops.py",
    "chinchilla": "Hoffmann et al. 2022: ~20 tokens/parameter; Table 3 (Approach 1) interpolated log-log",
    "loss": "L = E + A/N^α + B/D^β: Hoffmann et al. 2022 §3.3 (E 1.69, A 406.4, B 410.7, α 0.34, β 0.28); "
            "Besiroglu et al. 2024, Epoch AI refit (E 1.8169, A 482.01, B 2085.43, α 0.3478, β 0.3658)",
    "mfu": "MFU = achieved model FLOP/s / dense peak (PaLM appendix B); peaks from datasheets, without sparsity",
    "energy": "GPU-hours × W × PUE, × grid kgCO2eq/kWh: LLaMA (Touvron et al. 2023) §6 and Table 15",
    "memory": "model states by ZeRO (Rajbhandari et al. 2020) §3; activations counted from what autograd saves "
              "in minillama.model (minillama/plan/memory.py)",
    "kv": "2 · layers · kv_heads · head_dim · bytes per token (k and v of every layer)",
    "decode": "decode reads all weights and the KV cache once per step: batch × GPUs × bandwidth / bytes read",
    "budget": "compute-optimal N, D under C = 6ND: 20 tokens/param; Hoffmann et al. and Epoch AI fits",
    "projection": "FLOP/s per dollar doubling time: Epoch AI, Hobbhahn & Besiroglu 2022 (~2.5 years)",
    "gpuhours": "6ND counts only the final run's useful FLOPs; GPU-hours × a quoted throughput counts every hour "
                "the GPUs were allocated at that throughput",
}


@dataclass
class PlanOptions:
    """Everything `minillama plan` takes. Counts may be numbers or strings like "1.4T", "7e9", "2,048"."""

    model: str | None = None
    config: str | Path | None = None
    model_config: ModelConfig | None = None
    params: Any = None
    tokens: Any = None
    gpu: str = "h100-sxm"
    gpus: Any = None
    mfu: Any = None
    tokens_per_s_per_gpu: Any = None
    flops_per_s_per_gpu: Any = None
    flops_basis: str = "counted"
    gpu_hours: Any = None
    price_per_gpu_hour: Any = None
    power_w: Any = None
    pue: Any = 1.1
    grid_kgco2_per_kwh: Any = 0.385
    seq_len: Any = None
    batch_tokens: Any = None
    micro_batch: Any = None
    dp: Any = None
    tp: Any = None
    pp: Any = None
    zero: Any = 0
    activation_checkpointing: str | None = None
    precision: str | None = None
    dtype: str = "bf16"
    context: Any = None
    batch: Any = 1
    budget_gpu_hours: Any = None
    budget_dollars: Any = None
    budget_flops: Any = None
    year: Any = None
    doubling_years: Any = costs.EPOCH_DOUBLING_YEARS
    base_year: Any = None


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def parse_quantity(value: Any, name: str, integer: bool = False, allow_zero: bool = False) -> float | int | None:
    """A positive number from a number or a string ("1.4T", "7e9", "2,048", "65B"); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().replace(",", "").replace("_", "")
        match = re.fullmatch(r"([-+]?[0-9.]+(?:e[-+]?\d+)?)\s*([kKmMbBgGtTpP]?)", text)
        if not match:
            raise MinillamaError(f"--{name.replace('_', '-')}: expected a number like 1.4e12 or 1.4T, got {value!r}")
        try:
            number = float(match.group(1)) * (_SUFFIXES[match.group(2).lower()] if match.group(2) else 1)
        except ValueError:
            raise MinillamaError(f"--{name.replace('_', '-')}: expected a number, got {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise MinillamaError(f"--{name.replace('_', '-')}: expected a number, got {value!r}")
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise MinillamaError(f"--{name.replace('_', '-')} must be {'non-negative' if allow_zero else 'positive'}, "
                             f"got {value}")
    if integer:
        if number != int(number):
            raise MinillamaError(f"--{name.replace('_', '-')} must be a whole number, got {value}")
        return int(number)
    return number


@functools.lru_cache(maxsize=64)
def _counts(cfg_json: str) -> tuple[int, int]:
    from minillama.model import count_parameters

    cfg = ModelConfig(**json.loads(cfg_json))
    return count_parameters(cfg), count_parameters(cfg, embeddings=False)


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(total, non-embedding) parameters of `cfg`, from the model built on the meta device (cached)."""
    return _counts(json.dumps(cfg.to_dict(), sort_keys=True))


def num(x: float) -> str:
    """A number for --explain: integers with thousands separators, others to 4 significant digits."""
    if x is None:
        return "n/a"
    if float(x).is_integer() and abs(x) < 1e12:
        return f"{int(x):,}"
    return _sci(x, 4)


def _sci(x: float, digits: int = 3) -> str:
    """x to `digits` significant digits, exponents written 1.4e12 rather than 1.4e+12."""
    return f"{x:.{digits}g}".replace("e+", "e")


def _resolve_model(opts: PlanOptions) -> tuple[ModelConfig | None, str, dict]:
    """The ModelConfig (None for --params), a display name, and any [train] defaults from a run TOML."""
    given = [name for name, value in (("--model", opts.model), ("--config", opts.config),
                                      ("--params", opts.params), ("model_config", opts.model_config))
             if value is not None]
    if not given:
        raise MinillamaError("give the model: --model PRESET, --config FILE or --params N "
                             f"(presets: {', '.join(PRESETS)})")
    if len(given) > 1:
        raise MinillamaError(f"give only one of --model, --config, --params (got {' and '.join(given)})")
    if opts.model_config is not None:
        return opts.model_config, "custom", {}
    if opts.model is not None:
        return ModelConfig.from_preset(opts.model), opts.model, {}
    if opts.config is not None:
        table = read_toml(opts.config)
        if "model" not in table:
            raise MinillamaError(f"{opts.config}: no [model] table")
        train = table.get("train", {}) if isinstance(table.get("train", {}), dict) else {}
        return model_config_from_table(table["model"]), str(opts.config), train
    return None, "params", {}


# --------------------------------------------------------------------------------------------------------------
# The plan, section by section. Each section takes the figures it needs and returns its own, under their
# `--json` keys, with the `--explain` lines that derive them; `make_plan` runs them in order and lays the
# figures out in PLAN_KEYS order.
# --------------------------------------------------------------------------------------------------------------
PLAN_KEYS = (
    "model", "architecture", "params", "params_embedding", "params_non_embedding", "seq_len", "tokens",
    "tokens_source", "flops_6nd", "flops", "flops_per_token", "flops_basis", "chinchilla_tokens",
    "chinchilla_tokens_table3", "tokens_per_param", "compute_optimal_multiple", "loss_chinchilla", "loss_epoch",
    "gpu", "gpu_description", "gpu_memory_bytes", "gpus", "dp", "tp", "pp", "zero", "precision",
    "activation_checkpointing", "micro_batch", "batch_tokens", "grad_accum", "peak_flops_per_s", "peak_flops_source",
    "achieved_flops_per_s_per_gpu", "mfu", "tokens_per_s_per_gpu", "days", "gpu_hours", "flops_from_gpu_hours",
    "price_per_gpu_hour", "cost_usd", "power_w", "pue", "grid_kgco2_per_kwh", "energy_mwh", "co2_tonnes",
    "train_memory_bytes", "fits", "min_gpus_train", "dtype", "context", "batch", "weights_bytes",
    "kv_bytes_per_token", "kv_bytes", "min_gpus_inference", "decode_tokens_per_s_max", "prefill_tokens_per_s_max",
    "cost_per_million_tokens_usd", "budget", "projection", "notes", "explain",
)


@dataclass
class _Section:
    """One part of a plan: its figures (under their `--json` keys), the `--explain` lines that derive them, and
    notes for the reader."""

    figures: dict[str, Any]
    explain: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


def make_plan(opts: PlanOptions) -> dict[str, Any]:
    """Compute the plan. Raises MinillamaError (one line) on bad input.

    Budget mode with no model given plans the preset nearest to the compute-optimal size, for the tokens the
    budget buys it (the budget's FLOPs depend on the hardware and MFU, not on the model)."""
    no_model = all(v is None for v in (opts.model, opts.config, opts.params, opts.model_config))
    has_budget = any(v is not None for v in (opts.budget_flops, opts.budget_gpu_hours, opts.budget_dollars))
    if no_model and has_budget and opts.tokens_per_s_per_gpu is None:
        budget = make_plan(dataclasses.replace(opts, params=1e9))["budget"]
        tokens = opts.tokens if opts.tokens is not None else budget["flops"] / (6 * budget["nearest_preset_params"])
        return make_plan(dataclasses.replace(opts, model=budget["nearest_preset"], tokens=tokens))

    plan: dict[str, Any] = {"notes": [], "explain": []}

    def add(section: _Section) -> dict[str, Any]:
        plan.update(section.figures)
        plan["explain"] += section.explain
        plan["notes"] += section.notes
        return section.figures

    cfg, model_name, train_table = _resolve_model(opts)
    params = add(_parameters_section(cfg, model_name, opts.params))["params"]
    layout = add(_layout_section(opts, cfg, train_table))
    seq_len = layout["seq_len"]
    compute = add(_compute_section(opts, cfg, params, seq_len, train_table))
    tokens = compute["tokens"]
    add(_scaling_section(params, tokens))
    hw = get_hardware(opts.gpu)
    basis_flops_per_token = compute["flops_per_token"] if opts.flops_basis == "counted" else 6.0 * params
    throughput = add(_throughput_section(opts, hw, layout["precision"], basis_flops_per_token))
    achieved = throughput["achieved_flops_per_s_per_gpu"]
    time_cost = add(_time_and_cost_section(opts, tokens, throughput["tokens_per_s_per_gpu"], achieved,
                                           layout["gpus"], compute["flops_6nd"]))
    add(_energy_section(opts, hw, time_cost["gpu_hours"]))
    add(_training_memory_section(cfg, params, hw, layout))
    add(_serving_section(opts, cfg, params, hw, seq_len, time_cost["price_per_gpu_hour"]))
    add(_budget_section(opts, achieved, time_cost["price_per_gpu_hour"]))
    add(_projection_section(opts, time_cost["cost_usd"], time_cost["gpu_hours"]))
    return {key: plan[key] for key in PLAN_KEYS}


def _architecture(cfg: ModelConfig | None) -> dict | None:
    if cfg is None:
        return None
    return dict(n_layers=cfg.n_layers, dim=cfg.dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                head_dim=cfg.head_dim, ffn_hidden_dim=cfg.ffn_hidden_dim, vocab_size=cfg.vocab_size,
                tie_embeddings=cfg.tie_embeddings)


def _parameters_section(cfg: ModelConfig | None, model_name: str, params_given: Any) -> _Section:
    """N, counted on the model when there is one, else the bare `--params`."""
    if cfg is not None:
        params, params_non_embedding = parameter_counts(cfg)
        line = (f"parameters N = count_parameters({model_name}) = {num(params)} "
                f"(non-embedding {num(params_non_embedding)})")
    else:
        params = parse_quantity(params_given, "params")
        params_non_embedding = None
        line = (f"parameters N = {num(params)} (given; no architecture, so no attention, activation or KV "
                "figures)")
    params_embedding = params - params_non_embedding if params_non_embedding is not None else None
    return _Section(dict(model=model_name, architecture=_architecture(cfg), params=params,
                        params_embedding=params_embedding, params_non_embedding=params_non_embedding), [line])


def _zero_stage(value: Any) -> int:
    """--zero: 0, 1, 2, 3, or fsdp (= 3)."""
    stage = 3 if str(value).lower() == "fsdp" else value
    try:
        stage = int(stage)
    except (TypeError, ValueError):
        raise MinillamaError(f"--zero must be 0, 1, 2, 3 or fsdp, got {value!r}") from None
    if stage not in (0, 1, 2, 3):
        raise MinillamaError(f"--zero must be 0, 1, 2, 3 or fsdp, got {value!r}")
    return stage


def _parallel_layout(opts: PlanOptions, cfg: ModelConfig | None) -> tuple[int, int, int, int]:
    """(gpus, dp, tp, pp): any of --gpus and --dp follows from the other, tp and pp default to 1."""
    gpus = parse_quantity(opts.gpus, "gpus", integer=True)
    tp = parse_quantity(opts.tp, "tp", integer=True) or 1
    pp = parse_quantity(opts.pp, "pp", integer=True) or 1
    dp = parse_quantity(opts.dp, "dp", integer=True)
    if dp is None:
        if gpus is not None and gpus % (tp * pp):
            raise MinillamaError(f"--gpus {gpus} is not divisible by tp x pp = {tp * pp}")
        dp = gpus // (tp * pp) if gpus is not None else 1
    if gpus is None:
        gpus = dp * tp * pp
    if dp * tp * pp != gpus:
        raise MinillamaError(f"layout dp x tp x pp = {dp} x {tp} x {pp} = {dp * tp * pp} differs from --gpus {gpus}")
    if cfg is not None:
        if cfg.n_heads % tp:
            raise MinillamaError(f"--tp {tp} does not divide the model's {cfg.n_heads} attention heads")
        if pp > cfg.n_layers:
            raise MinillamaError(f"--pp {pp} exceeds the model's {cfg.n_layers} layers")
    return gpus, dp, tp, pp


def _layout_section(opts: PlanOptions, cfg: ModelConfig | None, train_table: dict) -> _Section:
    """Sequence length, precision, activation checkpointing, the GPU layout and the batch: options first, then
    the run TOML's [train] table, then defaults (the model's pre-extension context, bf16, one micro-batch)."""
    default_seq = None
    if cfg is not None:
        default_seq = cfg.rope_scaling.original_max_position_embeddings if cfg.rope_scaling else cfg.max_seq_len
    seq_len = parse_quantity(opts.seq_len if opts.seq_len is not None else
                             train_table.get("seq_len", default_seq or 2048), "seq_len", integer=True)
    precision = opts.precision or train_table.get("dtype", "bf16")
    if precision == "auto":  # a run TOML's "auto" is bf16 on the GPUs planned for (runtime.autocast_dtype)
        precision = "bf16"
    mem.get_policy(precision)
    checkpointing = opts.activation_checkpointing or train_table.get("activation_checkpointing", "none")
    if checkpointing not in mem.CHECKPOINTING:
        raise MinillamaError(f"--activation-checkpointing must be one of {', '.join(mem.CHECKPOINTING)}, "
                             f"got {checkpointing!r}")
    zero = _zero_stage(opts.zero)
    gpus, dp, tp, pp = _parallel_layout(opts, cfg)
    micro_default = train_table.get("micro_batch_size") or 1
    micro_batch = parse_quantity(opts.micro_batch if opts.micro_batch is not None else micro_default, "micro_batch",
                                 integer=True)
    batch_tokens = parse_quantity(opts.batch_tokens if opts.batch_tokens is not None else
                                  train_table.get("batch_tokens"), "batch_tokens", integer=True)
    tokens_per_forward = micro_batch * seq_len * dp
    if batch_tokens is None:
        batch_tokens = tokens_per_forward
    if batch_tokens % tokens_per_forward:
        raise MinillamaError(f"--batch-tokens {batch_tokens} is not a multiple of micro-batch x seq-len x dp = "
                             f"{micro_batch} x {seq_len} x {dp} = {tokens_per_forward}")
    return _Section(dict(seq_len=seq_len, gpus=gpus, dp=dp, tp=tp, pp=pp, zero=zero, precision=precision,
                        activation_checkpointing=checkpointing, micro_batch=micro_batch, batch_tokens=batch_tokens,
                        grad_accum=batch_tokens // tokens_per_forward))


def _compute_section(opts: PlanOptions, cfg: ModelConfig | None, params: float, seq_len: int,
                     train_table: dict) -> _Section:
    """Training tokens D, and the FLOPs they cost: 6ND, and counted per layer with causal attention."""
    tokens = parse_quantity(opts.tokens, "tokens")
    tokens_source = "given"
    if tokens is None and "max_steps" in train_table and "batch_tokens" in train_table:
        tokens = parse_quantity(train_table["max_steps"] * train_table["batch_tokens"], "tokens")
        tokens_source = "train.max_steps x train.batch_tokens"
    if tokens is None:
        tokens, tokens_source = scaling.chinchilla_tokens(params), "20 x N, compute-optimal; no --tokens given"
    flops_6nd = flop_counts.flops_6nd(params, tokens)
    explain = [f"6ND = 6 x {num(params)} x {num(tokens)} = {num(flops_6nd)} FLOPs"]
    if cfg is not None:
        flops_per_token = flop_counts.flops_per_token(cfg, seq_len, training=True)
        matmul = flop_counts.matmul_params(cfg)
        explain.append(
            f"counted FLOPs/token = 6 x M + 6 x L x H x Dh x (T+1) = 6 x {num(matmul)} + 6 x {cfg.n_layers} x "
            f"{cfg.n_heads} x {cfg.head_dim} x {seq_len + 1} = {num(flops_per_token)}  (M = matmul weights: N "
            "less the embedding lookup and norms)")
    else:
        flops_per_token = 6.0 * params
    flops = flops_per_token * tokens
    explain.append(f"counted FLOPs = {num(flops_per_token)} x {num(tokens)} = {num(flops)}")
    if opts.flops_basis not in ("counted", "6nd"):
        raise MinillamaError(f"--flops-basis must be counted or 6nd, got {opts.flops_basis!r}")
    return _Section(dict(tokens=tokens, tokens_source=tokens_source, flops_6nd=flops_6nd, flops=flops,
                        flops_per_token=flops_per_token, flops_basis=opts.flops_basis), explain)


def _scaling_section(params: float, tokens: float) -> _Section:
    """Compute-optimal tokens and the loss the Chinchilla fits predict."""
    chinchilla_tokens = scaling.chinchilla_tokens(params)
    chinchilla_tokens_table3 = scaling.chinchilla_table3_tokens(params)
    loss_hoffmann = scaling.HOFFMANN.loss(params, tokens)
    loss_epoch = scaling.EPOCH.loss(params, tokens)
    explain = [
        f"Chinchilla tokens = 20 x N = {num(chinchilla_tokens)}; Table 3 interpolated: {num(chinchilla_tokens_table3)} "
        f"(6 x N x D = {num(6 * params * chinchilla_tokens_table3)} FLOPs)",
        f"tokens per parameter = {num(tokens)} / {num(params)} = {tokens / params:.4g} "
        f"= {tokens / chinchilla_tokens:.3g} x the 20/param compute-optimal",
        f"loss (Hoffmann) = 1.69 + 406.4 / {num(params)}^0.34 + 410.7 / {num(tokens)}^0.28 = "
        f"1.69 + {406.4 / params ** 0.34:.4f} + {410.7 / tokens ** 0.28:.4f} = {loss_hoffmann:.4f}",
        f"loss (Epoch AI) = 1.8169 + 482.01 / {num(params)}^0.3478 + 2085.43 / {num(tokens)}^0.3658 = "
        f"{loss_epoch:.4f}",
    ]
    return _Section(dict(chinchilla_tokens=chinchilla_tokens, chinchilla_tokens_table3=chinchilla_tokens_table3,
                        tokens_per_param=tokens / params, compute_optimal_multiple=tokens / chinchilla_tokens,
                        loss_chinchilla=loss_hoffmann, loss_epoch=loss_epoch), explain)


def _throughput_section(opts: PlanOptions, hw: Hardware, precision: str, basis_flops_per_token: float) -> _Section:
    """Tokens/s and FLOP/s per GPU, from one of --mfu (default 0.4), --tokens-per-s-per-gpu or
    --flops-per-s-per-gpu; `basis_flops_per_token` is the FLOPs per token that MFU refers to (--flops-basis)."""
    peak = hw.peak_flops("fp32" if precision == "fp32" else "bf16")
    throughput_given = [n for n in ("mfu", "tokens_per_s_per_gpu", "flops_per_s_per_gpu")
                        if getattr(opts, n) is not None]
    if len(throughput_given) > 1:
        raise MinillamaError("give only one of --mfu, --tokens-per-s-per-gpu, --flops-per-s-per-gpu")
    explain = []
    if opts.tokens_per_s_per_gpu is not None:
        tokens_per_s = parse_quantity(opts.tokens_per_s_per_gpu, "tokens_per_s_per_gpu")
        achieved = tokens_per_s * basis_flops_per_token
        explain.append(f"tokens/s/GPU = {num(tokens_per_s)} (given); achieved FLOP/s/GPU = {num(tokens_per_s)} x "
                       f"{num(basis_flops_per_token)} = {num(achieved)}")
    else:
        if opts.flops_per_s_per_gpu is not None:
            achieved = parse_quantity(opts.flops_per_s_per_gpu, "flops_per_s_per_gpu")
            explain.append(f"achieved FLOP/s/GPU = {num(achieved)} (given)")
        else:
            mfu_given = parse_quantity(opts.mfu if opts.mfu is not None else DEFAULT_MFU, "mfu")
            if not 0 < mfu_given <= 1:
                raise MinillamaError(f"--mfu must be in (0, 1], got {opts.mfu}")
            achieved = mfu_given * peak
            explain.append(f"achieved FLOP/s/GPU = MFU x peak = {mfu_given} x {num(peak)} = {num(achieved)}")
        tokens_per_s = achieved / basis_flops_per_token
        explain.append(f"tokens/s/GPU = {num(achieved)} / {num(basis_flops_per_token)} FLOPs per token "
                       f"({opts.flops_basis}) = {tokens_per_s:.4g}")
    return _Section(dict(gpu=hw.name, gpu_description=hw.description, gpu_memory_bytes=hw.memory_bytes,
                        peak_flops_per_s=peak, peak_flops_source=hw.source, achieved_flops_per_s_per_gpu=achieved,
                        mfu=achieved / peak, tokens_per_s_per_gpu=tokens_per_s), explain)


def _time_and_cost_section(opts: PlanOptions, tokens: float, tokens_per_s_per_gpu: float, achieved: float,
                           gpus: int, flops_6nd: float) -> _Section:
    """Days and GPU-hours (computed, or --gpu-hours given, which also yields the FLOPs they bought), and dollars."""
    explain, notes = [], []
    given_hours = parse_quantity(opts.gpu_hours, "gpu_hours")
    if given_hours is not None:
        hours = given_hours
        days = hours / gpus / 24
        explain.append(f"days = GPU-hours / GPUs / 24 = {num(hours)} / {gpus} / 24 = {days:.4g} (GPU-hours given)")
    else:
        hours = costs.gpu_hours(tokens, tokens_per_s_per_gpu)
        days = costs.training_days(tokens, tokens_per_s_per_gpu, gpus)
        explain.append(f"days = D / (tokens/s/GPU x GPUs) / 86400 = {num(tokens)} / ({tokens_per_s_per_gpu:.4g} x "
                       f"{gpus}) / 86400 = {days:.4g} ({days / costs.DAYS_PER_YEAR:.4g} years)")
        explain.append(f"GPU-hours = D / (tokens/s/GPU) / 3600 = {num(tokens)} / {tokens_per_s_per_gpu:.4g} / 3600 = "
                       f"{hours:,.0f}")
    flops_from_hours = hours * 3600 * achieved if given_hours is not None else None
    if flops_from_hours is not None:
        explain.append(f"FLOPs from GPU-hours = {num(hours)} x 3600 x {num(achieved)} = {num(flops_from_hours)}")
        ratio = flops_6nd / flops_from_hours
        notes.append(f"6ND ({_sci(flops_6nd, 2)}) is {ratio:.2f} x the GPU-hours x throughput figure "
                     f"({_sci(flops_from_hours, 2)}): the GPU-hours cover every hour the GPUs were held at a quoted "
                     "peak throughput, 6ND only the final run's useful work (no attention, recomputation, restarts, "
                     "evaluation, or time below that throughput)")
    price = parse_quantity(opts.price_per_gpu_hour, "price_per_gpu_hour")
    cost_usd = hours * price if price is not None else None
    if cost_usd is not None:
        explain.append(f"cost = GPU-hours x $/GPU-hour = {num(hours)} x {price:.4g} = ${cost_usd:,.0f}")
    return _Section(dict(days=days, gpu_hours=hours, flops_from_gpu_hours=flops_from_hours, price_per_gpu_hour=price,
                        cost_usd=cost_usd), explain, notes)


def _energy_section(opts: PlanOptions, hw: Hardware, gpu_hours: float) -> _Section:
    """Energy and emissions of the GPU-hours, at --power-w (default: the chip's TDP), PUE and grid intensity."""
    power_w = parse_quantity(opts.power_w, "power_w") if opts.power_w is not None else hw.tdp_w
    pue = parse_quantity(opts.pue, "pue")
    if pue < 1:  # PUE = facility energy / IT equipment energy (The Green Grid): never below 1
        raise MinillamaError(f"--pue must be >= 1 (facility power / IT power), got {opts.pue}")
    grid = parse_quantity(opts.grid_kgco2_per_kwh, "grid_kgco2_per_kwh", allow_zero=True)
    if power_w is None:
        return _Section(dict(power_w=power_w, pue=pue, grid_kgco2_per_kwh=grid, energy_mwh=None, co2_tonnes=None),
                       notes=[f"{hw.name} has no known power draw: give --power-w for energy and CO2"])
    energy = costs.energy_mwh(gpu_hours, power_w, pue)
    co2 = costs.co2_tonnes(energy, grid)
    explain = [f"energy = GPU-hours x W x PUE / 1e6 = {num(gpu_hours)} x {num(power_w)} x {pue} / 1e6 = "
               f"{energy:.4g} MWh",
               f"CO2 = MWh x kgCO2eq/kWh = {energy:.4g} x {grid} = {co2:.4g} tCO2eq"]
    return _Section(dict(power_w=power_w, pue=pue, grid_kgco2_per_kwh=grid, energy_mwh=energy, co2_tonnes=co2),
                   explain)


def _training_memory_section(cfg: ModelConfig | None, params: float, hw: Hardware, layout: dict[str, Any]) -> _Section:
    """Memory per GPU for training in `layout` (_layout_section's figures), whether it fits, and the fewest GPUs
    that would fit it with ZeRO-3."""
    precision, checkpointing = layout["precision"], layout["activation_checkpointing"]
    shape = dict(micro_batch=layout["micro_batch"], seq_len=layout["seq_len"], precision=precision,
                 tp=layout["tp"], pp=layout["pp"], activation_checkpointing=checkpointing,
                 grad_accum=layout["grad_accum"])
    train_mem = mem.training_memory(cfg, params, dp=layout["dp"], zero=layout["zero"], **shape)
    policy = mem.get_policy(precision)
    explain = [
        f"training memory per GPU ({precision}, ZeRO-{layout['zero']}, dp {layout['dp']}, tp {layout['tp']}, pp "
        f"{layout['pp']}, micro-batch {layout['micro_batch']} x {layout['seq_len']}, AC {checkpointing}): weights "
        f"N x {policy.weight} B = {num(train_mem['weights'])}, optimizer N x {policy.optimizer} B = "
        f"{num(train_mem['optimizer'])}, gradients {num(train_mem['gradients'])}, activations "
        f"{num(train_mem['activations'])}, working weights {num(train_mem['working_weights'])}; peak at "
        f"{train_mem['peak_phase']} = {num(train_mem['total'])} bytes"]
    if cfg is not None:
        explain.append(f"activations per token per layer = "
                       f"{num(mem.layer_activation_bytes(cfg, precision, checkpointing))} B "
                       f"(C {cfg.dim}, Hq {cfg.n_heads * cfg.head_dim}, Kv {cfg.n_kv_heads * cfg.head_dim}, "
                       f"F {cfg.ffn_hidden_dim}); head + loss per token = "
                       f"{num(mem.head_activation_bytes(cfg, precision) + mem.loss_backward_transient_bytes(cfg))} B")
    min_gpus_train = mem.min_gpus_to_train(cfg, params, hw.memory_bytes, **shape)
    return _Section(dict(train_memory_bytes=train_mem, fits=train_mem["total"] <= hw.memory_bytes,
                        min_gpus_train=min_gpus_train), explain)


def _serving_section(opts: PlanOptions, cfg: ModelConfig | None, params: float, hw: Hardware, seq_len: int,
                     price: float | None) -> _Section:
    """Weights and KV cache in --dtype at --context x --batch, the GPUs they need, and the decode (bandwidth)
    and prefill (compute) bounds on tokens/s."""
    dtype = opts.dtype
    weights_bytes = mem.weight_bytes(params, dtype)
    context = parse_quantity(opts.context, "context", integer=True) or seq_len
    batch = parse_quantity(opts.batch, "batch", integer=True)
    explain = []
    kv_per_token = kv_total = None
    if cfg is not None:
        kv_per_token = mem.kv_cache_bytes_per_token(cfg, dtype)
        kv_total = kv_per_token * context * batch
        element = 4 if dtype == "fp32" else 2
        explain.append(f"KV cache per token = 2 x L x K x Dh x bytes = 2 x {cfg.n_layers} x {cfg.n_kv_heads} x "
                       f"{cfg.head_dim} x {element} = {num(kv_per_token)}; at {num(context)} x {batch} = "
                       f"{num(kv_total)} bytes")
    serve_bytes = weights_bytes + (kv_total or 0)
    min_gpus = max(1, math.ceil(serve_bytes / hw.memory_bytes))
    explain.append(f"inference weights = N x {mem.WEIGHT_BYTES[dtype]} B = {num(weights_bytes)}; GPUs = ceil(("
                   f"{num(weights_bytes)} + {num(kv_total or 0)}) / {num(hw.memory_bytes)}) = {min_gpus}")
    decode = batch * min_gpus * hw.bandwidth_bytes_per_s / serve_bytes
    forward_flops_per_token = (flop_counts.flops_per_token(cfg, context, training=False) if cfg is not None
                               else 2.0 * params)
    prefill = min_gpus * hw.peak_flops(dtype) / forward_flops_per_token
    explain.append(f"decode tokens/s <= batch x GPUs x bandwidth / bytes read = {batch} x {min_gpus} x "
                   f"{num(hw.bandwidth_bytes_per_s)} / {num(serve_bytes)} = {decode:.4g}")
    explain.append(f"prefill tokens/s <= GPUs x peak / forward FLOPs per token = {min_gpus} x "
                   f"{num(hw.peak_flops(dtype))} / {num(forward_flops_per_token)} = {prefill:.4g}")
    cost_per_million = price * min_gpus / (decode * 3600) * 1e6 if price is not None else None
    return _Section(dict(dtype=dtype, context=context, batch=batch, weights_bytes=weights_bytes,
                        kv_bytes_per_token=kv_per_token, kv_bytes=kv_total, min_gpus_inference=min_gpus,
                        decode_tokens_per_s_max=decode, prefill_tokens_per_s_max=prefill,
                        cost_per_million_tokens_usd=cost_per_million), explain)


def _budget_section(opts: PlanOptions, achieved: float, price: float | None) -> _Section:
    """Budget mode: the FLOPs one of --budget-flops/-gpu-hours/-dollars buys at the achieved FLOP/s, and the
    compute-optimal model and tokens for them. `budget` is None without a budget."""
    given = [n for n in ("budget_flops", "budget_gpu_hours", "budget_dollars") if getattr(opts, n) is not None]
    if not given:
        return _Section(dict(budget=None))
    if len(given) > 1:
        raise MinillamaError("give only one of --budget-flops, --budget-gpu-hours, --budget-dollars")
    explain = []
    if opts.budget_flops is not None:
        flops = parse_quantity(opts.budget_flops, "budget_flops")
        hours = flops / achieved / 3600
    else:
        if opts.budget_gpu_hours is not None:
            hours = parse_quantity(opts.budget_gpu_hours, "budget_gpu_hours")
        else:
            if price is None:
                raise MinillamaError("--budget-dollars needs --price-per-gpu-hour")
            hours = parse_quantity(opts.budget_dollars, "budget_dollars") / price
        flops = hours * 3600 * achieved
        explain.append(f"budget FLOPs = GPU-hours x 3600 x achieved FLOP/s = {num(hours)} x 3600 x {num(achieved)} = "
                       f"{num(flops)}")
    params_rule, tokens_rule = scaling.optimal_by_rule(flops)
    params_hoffmann, tokens_hoffmann = scaling.HOFFMANN.optimal(flops)
    params_epoch, tokens_epoch = scaling.EPOCH.optimal(flops)
    explain.append(f"compute-optimal N = sqrt(C / 120) = sqrt({num(flops)} / 120) = {num(round(params_rule))}, "
                   f"D = 20 N = {num(round(tokens_rule))}")
    nearest = min(PRESETS, key=lambda name: abs(math.log(parameter_counts(ModelConfig.from_preset(name))[0] /
                                                         params_rule)))
    budget = dict(flops=flops, gpu_hours=hours, cost_usd=hours * price if price is not None else None,
                  params=params_rule, tokens=tokens_rule, params_chinchilla_fit=params_hoffmann,
                  tokens_chinchilla_fit=tokens_hoffmann, params_epoch_fit=params_epoch,
                  tokens_epoch_fit=tokens_epoch, nearest_preset=nearest,
                  nearest_preset_params=parameter_counts(ModelConfig.from_preset(nearest))[0])
    return _Section(dict(budget=budget), explain)


def _projection_section(opts: PlanOptions, cost_usd: float | None, gpu_hours: float) -> _Section:
    """--year: the cost scaled by FLOP/s per dollar doubling every --doubling-years. None without --year."""
    if opts.year is None:
        return _Section(dict(projection=None))
    year = parse_quantity(opts.year, "year")
    base_year = (parse_quantity(opts.base_year, "base_year") if opts.base_year is not None
                 else datetime.date.today().year)
    doubling = parse_quantity(opts.doubling_years, "doubling_years")
    factor = 2.0 ** (-(year - base_year) / doubling)
    projection = dict(year=year, base_year=base_year, doubling_years=doubling, cost_factor=factor,
                      cost_usd=cost_usd * factor if cost_usd is not None else None,
                      gpu_hours_equivalent=gpu_hours * factor)
    line = (f"cost in {num(year)} = cost x 2^-(({num(year)} - {num(base_year)}) / {doubling}) = cost x {factor:.4g}"
            + (f" = ${cost_usd * factor:,.0f}" if cost_usd is not None else ""))
    return _Section(dict(projection=projection), [line])


# --------------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------------
def _si(x: float, unit: str = "") -> str:
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"


def _figure(x: float, digits: int = 4) -> str:
    """A figure for the table: `digits` significant digits, thousands separators, 1.2e24 past a billion."""
    if abs(x) >= 1e9:
        return _sci(x, digits)
    if abs(x) >= 10**digits:
        return f"{round(x):,}"
    return f"{x:,.{digits}g}"


def _bytes_text(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x / 1e12:.3g} TB" if x >= 1e12 else f"{x / 1e9:.3g} GB"


def _usd(x: float | None) -> str:
    if x is None:
        return "n/a (give --price-per-gpu-hour)"
    if x < 100:
        return f"${x:,.2f}"
    return f"${x:,.0f}" if x < 1e7 else f"${x / 1e6:,.3g}M"


_Row = tuple[str, str, str] | str  # (label, value, footnote mark), or a heading
_Ref = Callable[[str], str]  # a source key -> its footnote mark, "[n]"


def _model_rows(p: dict[str, Any], ref: _Ref) -> list[_Row]:
    rows: list[_Row] = [f"model {p['model']}", ("parameters", f"{p['params']:,.0f}", ref("params"))]
    if p["params_non_embedding"] is not None:
        rows.append(("  embedding / non-embedding", f"{p['params_embedding']:,} / {p['params_non_embedding']:,}",
                     ref("params")))
    rows.append("training compute")
    rows.append(("tokens", f"{_si(p['tokens'])} ({p['tokens_source']})", ""))
    rows.append(("FLOPs (6ND)", _sci(p['flops_6nd']), ref("6nd")))
    rows.append(("FLOPs (counted, causal attention)",
                 f"{_sci(p['flops'])} ({_sci(p['flops_per_token'], 4)} per token at seq {p['seq_len']})",
                 ref("counted")))
    rows.append("scaling")
    rows.append(("Chinchilla-optimal tokens", f"{_si(p['chinchilla_tokens'])} (20/param); Table 3: "
                 f"{_si(p['chinchilla_tokens_table3'])}", ref("chinchilla")))
    rows.append(("tokens per parameter", f"{p['tokens_per_param']:.3g} ({p['compute_optimal_multiple']:.3g}x "
                 "compute-optimal)", ref("chinchilla")))
    rows.append(("predicted loss", f"{p['loss_chinchilla']:.4f} (Hoffmann fit), {p['loss_epoch']:.4f} (Epoch AI "
                 "refit) nats/token", ref("loss")))
    return rows


def _time_and_cost_rows(p: dict[str, Any], ref: _Ref) -> list[_Row]:
    rows: list[_Row] = [f"time and cost on {p['gpus']:,} x {p['gpu']} ({p['gpu_description']})"]
    rows.append(("throughput", f"{_figure(p['tokens_per_s_per_gpu'])} tokens/s/GPU, "
                 f"{_sci(p['achieved_flops_per_s_per_gpu'])} FLOP/s/GPU, MFU {p['mfu']:.3g} of peak "
                 f"{_sci(p['peak_flops_per_s'])} ({p['flops_basis']} FLOPs)", ref("mfu")))
    rows.append(("peak from", p["peak_flops_source"], ""))
    years = p["days"] / costs.DAYS_PER_YEAR
    rows.append(("wall clock", f"{_figure(p['days'], 3)} days" + (f" ({_figure(years)} years)" if years >= 2 else ""),
                 ""))
    rows.append(("GPU-hours", _figure(p["gpu_hours"]), ""))
    if p["flops_from_gpu_hours"] is not None:
        rows.append(("FLOPs from GPU-hours x throughput", _sci(p['flops_from_gpu_hours'], 2), ref("gpuhours")))
    rows.append(("cost", _usd(p["cost_usd"]) + (f" at ${p['price_per_gpu_hour']:.4g}/GPU-hour"
                                                 if p["price_per_gpu_hour"] else ""), ""))
    if p["energy_mwh"] is not None:
        energy = (f"{_figure(p['energy_mwh'])} MWh" if p["energy_mwh"] >= 1
                  else f"{_figure(p['energy_mwh'] * 1e3)} kWh")
        co2 = (f"{_figure(p['co2_tonnes'])} tCO2eq" if p["co2_tonnes"] >= 1
               else f"{_figure(p['co2_tonnes'] * 1e3)} kgCO2eq")
        rows.append(("energy", f"{energy} at {p['power_w']:g} W x PUE {p['pue']:g}", ref("energy")))
        rows.append(("emissions", f"{co2} at {p['grid_kgco2_per_kwh']:g} kgCO2eq/kWh", ref("energy")))
    return rows


def _training_memory_rows(p: dict[str, Any], ref: _Ref) -> list[_Row]:
    memory = p["train_memory_bytes"]
    rows: list[_Row] = [
        f"training memory per GPU ({p['precision']}, ZeRO-{p['zero']}, dp {p['dp']} x tp {p['tp']} x pp "
        f"{p['pp']}, micro-batch {p['micro_batch']} x {p['seq_len']}, accumulation {p['grad_accum']}, "
        f"checkpointing {p['activation_checkpointing']})"]
    for part in ("weights", "gradients", "optimizer", "activations", "working_weights"):
        rows.append((f"  {part.replace('_', ' ')}", _bytes_text(memory[part]), ref("memory")))
    verdict = "fits" if p["fits"] else "does NOT fit"
    rows.append(("  total (peak: " + memory["peak_phase"] + ")",
                 f"{_bytes_text(memory['total'])}: {verdict} in {_bytes_text(p['gpu_memory_bytes'])} "
                 f"({p['gpu_memory_bytes'] / 2**30:.4g} GiB)", ref("memory")))
    rows.append(("  minimum GPUs that fit (ZeRO-3 over dp)",
                 "none: one micro-batch's activations do not fit" if p["min_gpus_train"] is None
                 else f"{p['min_gpus_train']:,}", ""))
    return rows


def _serving_rows(p: dict[str, Any], ref: _Ref) -> list[_Row]:
    rows: list[_Row] = [f"inference ({p['dtype']}, context {p['context']:,}, batch {p['batch']})",
                        ("weights", _bytes_text(p["weights_bytes"]), "")]
    if p["kv_bytes_per_token"] is not None:
        rows.append(("KV cache",
                     f"{p['kv_bytes_per_token']:,} bytes/token, {_bytes_text(p['kv_bytes'])} at context x batch",
                     ref("kv")))
    rows.append(("minimum GPUs to serve", f"{p['min_gpus_inference']:,}", ""))
    rows.append(("decode bound (memory bandwidth)", f"{_figure(p['decode_tokens_per_s_max'])} tokens/s",
                 ref("decode")))
    rows.append(("prefill bound (compute)", f"{_figure(p['prefill_tokens_per_s_max'])} tokens/s", ref("mfu")))
    if p["cost_per_million_tokens_usd"] is not None:
        rows.append(("cost per million decoded tokens", f"${_figure(p['cost_per_million_tokens_usd'])}", ""))
    return rows


def _budget_and_projection_rows(p: dict[str, Any], ref: _Ref) -> list[_Row]:
    rows: list[_Row] = []
    if p["budget"] is not None:
        budget = p["budget"]
        rows.append(f"budget: {_sci(budget['flops'])} FLOPs = {_figure(budget['gpu_hours'])} GPU-hours")
        for label, fit in (("compute-optimal (20 tokens/param)", ""), ("Hoffmann fit optimum", "_chinchilla_fit"),
                           ("Epoch AI fit optimum", "_epoch_fit")):
            rows.append((label, f"N {_si(budget['params' + fit])}, D {_si(budget['tokens' + fit])}", ref("budget")))
        rows.append(("nearest preset", f"{budget['nearest_preset']} ({_si(budget['nearest_preset_params'])} params)",
                     ""))
    if p["projection"] is not None:
        projection = p["projection"]
        rows.append(f"projection to {projection['year']:g} (FLOP/s per $ doubling every "
                    f"{projection['doubling_years']:g} years)")
        rows.append(("cost", f"{_usd(projection['cost_usd'])} (x{projection['cost_factor']:.3g} of "
                             f"{projection['base_year']:g})", ref("projection")))
    return rows


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a readable table: every figure with its unit, sources as numbered footnotes."""
    refs: list[str] = []

    def ref(key: str) -> str:
        if key not in refs:
            refs.append(key)
        return f"[{refs.index(key) + 1}]"

    rows = [row for section in (_model_rows, _time_and_cost_rows, _training_memory_rows, _serving_rows,
                                _budget_and_projection_rows) for row in section(plan, ref)]
    label_width = max(len(r[0]) for r in rows if isinstance(r, tuple))
    lines = []
    for row in rows:
        if isinstance(row, str):
            lines.append(("" if not lines else "\n") + row)
        else:
            label, value, note = row
            lines.append(f"  {label.ljust(label_width)}  {value}{'  ' + note if note else ''}")
    for note in plan["notes"]:
        lines.append(f"\nnote: {note}")
    lines.append("")
    lines += [f"[{i + 1}] {SOURCES[key]}" for i, key in enumerate(refs)]
    return "\n".join(lines)


def format_explain(plan: dict[str, Any]) -> str:
    return "\n".join(["how each figure is computed:"] + [f"  {line}" for line in plan["explain"]])


def plan_json(plan: dict[str, Any], explain: bool = False) -> str:
    out = {k: v for k, v in plan.items() if k != "explain" or explain}
    return json.dumps(out, indent=2)


__all__ = ["PlanOptions", "make_plan", "format_plan", "format_explain", "plan_json", "parse_quantity",
           "parameter_counts", "SOURCES", "DEFAULT_MFU"]
