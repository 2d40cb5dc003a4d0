// Generated from speed_kernels/tables.py by `python -m speed_kernels.tables > csrc/table_rows.h`.
// Do not edit: change ROWS there and regenerate (tests/test_table_layout.py checks this file).
// Rows of the float32 [NUM_ROWS, T] table every backend reads.
#pragma once

#include <stdint.h>

namespace speed_kernels {

constexpr int64_t ROW_SQRT_AB = 0;  // sqrt(alphabar_t)
constexpr int64_t ROW_SQRT_1MAB = 1;  // sqrt(1 - alphabar_t)
constexpr int64_t ROW_WEIGHT = 2;  // strategy weight of the MSE term
constexpr int64_t ROW_CDF = 3;  // float32 CDF of the sampling distribution (last entry exactly 1)
constexpr int64_t ROW_POST_X0 = 4;  // posterior mean coefficient of x0
constexpr int64_t ROW_POST_XT = 5;  // posterior mean coefficient of x_t
constexpr int64_t ROW_POST_LOGVAR = 6;  // clipped log posterior variance (the learned range's lower end)
constexpr int64_t ROW_LOG_BETA = 7;  // log beta_t (the learned range's upper end)
constexpr int64_t ROW_X0HAT_XT = 8;  // predicted x0 = ROW_X0HAT_XT * x_t + ROW_X0HAT_OUT * model output
constexpr int64_t ROW_X0HAT_OUT = 9;  // (eps: 1/sqrt(ab), -sqrt(1/ab - 1); v: sqrt(ab), -sqrt(1-ab); x0: 0, 1)
constexpr int64_t NUM_ROWS = 10;

}  // namespace speed_kernels
