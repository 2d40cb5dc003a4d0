"""Per-time-step tables the kernels read: one float32 [NUM_ROWS, T] tensor per loss object.

Everything a kernel needs about the schedule and the strategy is a row of this table, computed
in float64 on the host and rounded once to float32. Dynamic strategies rewrite rows in place
(`copy_`) so compiled steps and captured CUDA graphs keep pointing at valid data.
"""
from __future__ import annotations

import math

import torch

from .rng import uniform_cdf_of

# The table layout, defined once: (constant, long name, what the row holds). Row i is ROWS[i].
# Python (here), Triton (ops/*.py import these constants) and C++/CUDA (csrc/table_rows.h, generated
# from this tuple by `python -m speed_kernels.tables > csrc/table_rows.h`; tests/test_table_layout.py
# fails when the header is stale) all read it, so adding a row is one edit here plus the regeneration.
ROWS = (
    ("ROW_SQRT_AB", "sqrt_alphas_cumprod", "sqrt(alphabar_t)"),
    ("ROW_SQRT_1MAB", "sqrt_one_minus_alphas_cumprod", "sqrt(1 - alphabar_t)"),
    ("ROW_WEIGHT", "weights", "strategy weight of the MSE term"),
    ("ROW_CDF", "cdf", "float32 CDF of the sampling distribution (last entry exactly 1)"),
    ("ROW_POST_X0", "posterior_mean_coef_x0", "posterior mean coefficient of x0"),
    ("ROW_POST_XT", "posterior_mean_coef_xt", "posterior mean coefficient of x_t"),
    ("ROW_POST_LOGVAR", "posterior_log_variance_clipped", "clipped log posterior variance (the learned range's lower end)"),
    ("ROW_LOG_BETA", "log_betas", "log beta_t (the learned range's upper end)"),
    ("ROW_X0HAT_XT", "x0_from_xt", "predicted x0 = ROW_X0HAT_XT * x_t + ROW_X0HAT_OUT * model output"),
    ("ROW_X0HAT_OUT", "x0_from_out", "(eps: 1/sqrt(ab), -sqrt(1/ab - 1); v: sqrt(ab), -sqrt(1-ab); x0: 0, 1)"),
)
NUM_ROWS = len(ROWS)
ROW_NAMES = tuple(name for _, name, _ in ROWS)
(
    ROW_SQRT_AB,
    ROW_SQRT_1MAB,
    ROW_WEIGHT,
    ROW_CDF,
    ROW_POST_X0,
    ROW_POST_XT,
    ROW_POST_LOGVAR,
    ROW_LOG_BETA,
    ROW_X0HAT_XT,
    ROW_X0HAT_OUT,
) = range(NUM_ROWS)
assert all(globals()[const] == i for i, (const, _, _) in enumerate(ROWS)), "ROWS and the ROW_* names disagree"
# the rows only learned-sigma losses read (a loss without it may pass a table of ROW_CDF + 1 rows)
LEARNED_SIGMA_ROWS = (ROW_POST_X0, ROW_POST_XT, ROW_POST_LOGVAR, ROW_LOG_BETA, ROW_X0HAT_XT, ROW_X0HAT_OUT)

TARGETS = ("eps", "v", "x0")


def c_header() -> str:
    """csrc/table_rows.h: the row constants for the C++ and CUDA kernels (torch-free)."""
    lines = [
        "// Generated from speed_kernels/tables.py by `python -m speed_kernels.tables > csrc/table_rows.h`.",
        "// Do not edit: change ROWS there and regenerate (tests/test_table_layout.py checks this file).",
        "// Rows of the float32 [NUM_ROWS, T] table every backend reads.",
        "#pragma once",
        "",
        "#include <stdint.h>",
        "",
        "namespace speed_kernels {",
        "",
    ]
    for i, (const, _, doc) in enumerate(ROWS):
        lines.append(f"constexpr int64_t {const} = {i};  // {doc}")
    lines += [f"constexpr int64_t NUM_ROWS = {NUM_ROWS};", "", "}  // namespace speed_kernels", ""]
    return "\n".join(lines)


def target_code(prediction: str) -> int:
    if prediction not in TARGETS:
        raise ValueError(f"prediction must be one of {TARGETS}, got {prediction!r}")
    return TARGETS.index(prediction)


def _check_table(name: str, values: torch.Tensor, T: int) -> torch.Tensor:
    values = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if values.numel() != T:
        raise ValueError(f"{name} table has {values.numel()} entries, the schedule has T={T}")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).nonzero()[0])
        raise ValueError(f"{name} table is not finite (first bad entry at t={bad}: {values[bad].item()})")
    if (values < 0).any():
        bad = int((values < 0).nonzero()[0])
        raise ValueError(f"{name} table is negative at t={bad}: {values[bad].item()}")
    return values


def sampling_row(probs: torch.Tensor, T: int) -> torch.Tensor:
    probs = _check_table("probs", probs, T)
    if probs.sum() <= 0:
        raise ValueError("probs table sums to zero")
    return uniform_cdf_of(probs)


def weight_row(weights: torch.Tensor, T: int) -> torch.Tensor:
    return _check_table("weights", weights, T).to(torch.float32)


def build_tables(
    schedule, probs: torch.Tensor, weights: torch.Tensor, prediction: str, learn_sigma: bool
) -> torch.Tensor:
    """The float32 [NUM_ROWS, T] table of a loss object (on the CPU; callers move it)."""
    betas = torch.as_tensor(schedule.betas, dtype=torch.float64)
    ab = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float64)
    T = betas.numel()
    code = target_code(prediction)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    alphas = 1.0 - betas
    rows = torch.zeros(NUM_ROWS, T, dtype=torch.float64)
    rows[ROW_SQRT_AB] = ab.sqrt()
    rows[ROW_SQRT_1MAB] = (1.0 - ab).sqrt()
    rows[ROW_WEIGHT] = _check_table("weights", weights, T)
    rows[ROW_CDF] = sampling_row(probs, T).to(torch.float64)
    if learn_sigma:
        # guided-diffusion's posterior q(x_{t-1} | x_t, x0) and learned-range variance.
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        c_x0 = betas * ab_prev.sqrt() / (1.0 - ab)
        c_xt = (1.0 - ab_prev) * alphas.sqrt() / (1.0 - ab)
        # x0 predicted from (x_t, out) is linear: x0_hat = a * x_t + b * out.
        if code == 0:  # eps
            a, b = (1.0 / ab).sqrt(), -(1.0 / ab - 1.0).sqrt()
        elif code == 1:  # v
            a, b = ab.sqrt(), -(1.0 - ab).sqrt()
        else:  # x0
            a, b = torch.zeros_like(ab), torch.ones_like(ab)
        rows[ROW_POST_X0] = c_x0
        rows[ROW_POST_XT] = c_xt
        rows[ROW_POST_LOGVAR] = post_logvar
        rows[ROW_LOG_BETA] = torch.log(betas)
        rows[ROW_X0HAT_XT] = a
        rows[ROW_X0HAT_OUT] = b
        for r in LEARNED_SIGMA_ROWS:
            if not torch.isfinite(rows[r]).all():
                bad = int((~torch.isfinite(rows[r])).nonzero()[0])
                raise ValueError(
                    f"learned-sigma table {ROW_NAMES[r]} is not finite at t={bad} "
                    f"(a zero-terminal-SNR schedule with prediction={prediction!r}?)"
                )
    return rows.to(torch.float32)


LN2 = math.log(2.0)


if __name__ == "__main__":
    print(c_header(), end="")
