"""Wall-clock time, GPU-hours, dollars, energy and emissions of a run, and the projection of cost to a later year.

Energy follows the LLaMA paper's accounting (Touvron et al. 2023, §6 "Carbon footprint", Table 15; after Wu et al.
2022):
    MWh = GPU-hours x GPU power (W) x PUE / 10^6,        tCO2eq = MWh x grid intensity (tCO2eq per MWh)
with their constants as defaults: PUE 1.1 and the US-average 0.385 kgCO2eq/kWh (= t/MWh). GPU power defaults to
the chip's TDP, which is what LLaMA used (400 W for A100-80GB).

Projection: hardware FLOP/s per dollar has doubled about every 2.5 years (Epoch AI, Hobbhahn & Besiroglu 2022,
"Trends in GPU price-performance"); the same run in a later year costs cost x 2^-(years / doubling time). The
notes this project grew from say "halving every two years": pass doubling_years=2.
"""

from __future__ import annotations

SECONDS_PER_DAY = 86400.0
DAYS_PER_YEAR = 365.25
EPOCH_DOUBLING_YEARS = 2.5


def training_days(tokens: float, tokens_per_s_per_gpu: float, gpus: int) -> float:
    return tokens / (tokens_per_s_per_gpu * gpus) / SECONDS_PER_DAY


def gpu_hours(tokens: float, tokens_per_s_per_gpu: float) -> float:
    return tokens / tokens_per_s_per_gpu / 3600.0


def energy_mwh(hours: float, power_w: float, pue: float) -> float:
    """GPU-hours x watts x PUE, in MWh."""
    return hours * power_w * pue / 1e6


def co2_tonnes(mwh: float, grid_kgco2_per_kwh: float) -> float:
    """kgCO2eq/kWh equals tCO2eq/MWh."""
    return mwh * grid_kgco2_per_kwh


def projected_cost(cost: float, years_ahead: float, doubling_years: float = EPOCH_DOUBLING_YEARS) -> float:
    """Cost of the same compute `years_ahead` later if FLOP/s per dollar doubles every `doubling_years`."""
    return cost * 2.0 ** (-years_ahead / doubling_years)


__all__ = ["SECONDS_PER_DAY", "DAYS_PER_YEAR", "EPOCH_DOUBLING_YEARS", "training_days", "gpu_hours", "energy_mwh",
           "co2_tonnes", "projected_cost"]
