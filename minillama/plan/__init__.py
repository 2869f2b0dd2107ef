"""What a training or serving run costs before it runs: FLOPs, memory, GPUs, days, dollars, energy, carbon.

    from minillama.plan import PlanOptions, make_plan, format_plan
    plan = make_plan(PlanOptions(model="llama1-65b", tokens="1.4T", gpu="a100-80gb", gpus=2048,
                                 tokens_per_s_per_gpu=380))
    plan["days"]  # 20.8

The trainer uses `flops_per_token(cfg, seq_len)` and `device_peak_flops(device, dtype)` for MFU.
"""

from minillama.plan.flops import flops_6nd, flops_per_token
from minillama.plan.hardware import GPUS, KNOWN_HARDWARE, device_peak_flops, get_hardware, peak_flops
from minillama.plan.memory import activation_bytes_per_sequence, kv_cache_bytes_per_token, training_memory
from minillama.plan.planner import PlanOptions, format_explain, format_plan, make_plan, plan_json
from minillama.plan.presets import format_preset_table, preset_table

__all__ = ["flops_6nd", "flops_per_token", "GPUS", "KNOWN_HARDWARE", "device_peak_flops", "get_hardware",
           "peak_flops", "activation_bytes_per_sequence", "kv_cache_bytes_per_token", "training_memory",
           "PlanOptions", "make_plan", "format_plan", "format_explain", "plan_json", "preset_table",
           "format_preset_table"]
