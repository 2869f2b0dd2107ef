"""Compute-optimal training (Chinchilla) and predicted loss from parametric scaling-law fits.

Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"):
  - the rule of thumb of about 20 training tokens per parameter (Table 3, Approach 1 projections);
  - Table 3 itself: (parameters, FLOPs, tokens) at nine sizes, interpolated here log-log between rows;
  - the parametric fit (§3.3, Approach 3)  L(N, D) = E + A / N^α + B / D^β  with E 1.69, A 406.4, B 410.7,
    α 0.34, β 0.28, whose minimum under C = 6ND is N_opt = G (C/6)^(β/(α+β)), D_opt = (C/6)^(α/(α+β)) / G,
    G = (αA / (βB))^(1/(α+β)) (§3.3 and appendix D.2).
Besiroglu et al. 2024 (Epoch AI, "Chinchilla Scaling: A replication attempt") refit the same form to the paper's
data: E 1.8169, A 482.01, B 2085.43, α 0.3478, β 0.3658 (≈ 20 tokens per parameter at optimum, unlike the
original fit's smaller ratio). N counts all parameters, embeddings included, as Hoffmann et al. do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CHINCHILLA_TOKENS_PER_PARAM = 20.0


@dataclass(frozen=True)
class LossFit:
    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    def loss(self, params: float, tokens: float) -> float:
        """Predicted final training loss (nats/token on the fit's data) of N params trained on D tokens."""
        return self.E + self.A / params**self.alpha + self.B / tokens**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """The (params, tokens) minimising loss under flops = 6 · params · tokens."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1 / (a + b))
        params = G * (flops / 6) ** (b / (a + b))
        return params, flops / (6 * params)


HOFFMANN = LossFit("chinchilla", 1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, §3.3")
EPOCH = LossFit("epoch", 1.8169, 482.01, 2085.43, 0.3478, 0.3658, "Besiroglu et al. 2024 (Epoch AI)")

# Hoffmann et al. 2022 Table 3 (Approach 1): parameters -> compute-optimal FLOPs and tokens.
CHINCHILLA_TABLE3 = [
    (400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12), (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]


def chinchilla_tokens(params: float) -> float:
    """Compute-optimal training tokens by the 20-tokens-per-parameter rule."""
    return CHINCHILLA_TOKENS_PER_PARAM * params


def chinchilla_table3_tokens(params: float) -> float:
    """Compute-optimal tokens from Hoffmann et al. Table 3, log-log interpolated between its rows (and
    extrapolated along the nearest segment outside 400M-10T)."""
    rows = CHINCHILLA_TABLE3
    i = next((i for i in range(len(rows) - 2) if params <= rows[i + 1][0]), len(rows) - 2)
    (n0, _, d0), (n1, _, d1) = rows[i], rows[i + 1]
    return d0 * (params / n0) ** (math.log(d1 / d0) / math.log(n1 / n0))


def optimal_by_rule(flops: float) -> tuple[float, float]:
    """(params, tokens) with tokens = 20 · params and 6 · params · tokens = flops."""
    params = math.sqrt(flops / (6 * CHINCHILLA_TOKENS_PER_PARAM))
    return params, CHINCHILLA_TOKENS_PER_PARAM * params


__all__ = ["CHINCHILLA_TOKENS_PER_PARAM", "LossFit", "HOFFMANN", "EPOCH", "CHINCHILLA_TABLE3", "chinchilla_tokens",
           "chinchilla_table3_tokens", "optimal_by_rule"]
