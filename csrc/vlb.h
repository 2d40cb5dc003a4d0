// Per-element learned-sigma VLB term and its derivative w.r.t. the model log-variance, shared by the
// CPU and CUDA kernels (no torch headers). Formulas follow speed_kernels/reference.py (guided-diffusion):
//   KL  (t > 0): 0.5 * (-1 + lm - lt + exp(lt - lm) + dm^2 exp(-lm)), dm = c_x0 (x0 - x0_hat): the
//                posterior-mean difference formed directly (no cancellation of two close means)
//   NLL (t = 0): -log P(x0 in its 1/255 bin | N(mm, exp(lm))) with the tanh CDF approximation and
//                the 1e-12 clamps (clamped branches pass no gradient, as torch.clamp's backward).
// The model mean is detached in the reference, so only d/d lm is needed.
#pragma once

#include <math.h>

#include "philox.h"  // SK_HD
#include "table_rows.h"

namespace speed_kernels {

// The learned-sigma coefficients of one time step (rows of the table), read the same way by the CPU
// and CUDA kernels.
struct LearnedSigmaCoefs {
  float c_x0;      // posterior mean coefficient of x0
  float c_xt;      // posterior mean coefficient of x_t
  float lv_true;   // clipped log posterior variance (the learned range's lower end)
  float lv_max;    // log beta_t (its upper end)
  float x0hat_xt;  // predicted x0 = x0hat_xt * x_t + x0hat_out * out
  float x0hat_out;
};

SK_HD LearnedSigmaCoefs load_learned_sigma(const float* tables, int64_t T, int64_t t) {
  return LearnedSigmaCoefs{tables[ROW_POST_X0 * T + t],  tables[ROW_POST_XT * T + t],
                           tables[ROW_POST_LOGVAR * T + t], tables[ROW_LOG_BETA * T + t],
                           tables[ROW_X0HAT_XT * T + t], tables[ROW_X0HAT_OUT * T + t]};
}

struct VlbTerm {
  float value;  // nats
  float dlm;    // d value / d log-variance of the model
};

SK_HD VlbTerm kl_term(float mean_diff, float lv_true, float lv_model) {
  const float e1 = expf(lv_true - lv_model);
  const float d = mean_diff;
  const float e2 = d * d * expf(-lv_model);
  return VlbTerm{0.5f * (-1.0f + lv_model - lv_true + e1 + e2), 0.5f * (1.0f - e1 - e2)};
}

// guided-diffusion's approx_standard_normal_cdf and its derivative.
SK_HD float approx_cdf(float a, float& deriv) {
  const float k = 0.7978845608028654f;  // sqrt(2/pi)
  const float th = tanhf(k * (a + 0.044715f * (a * a * a)));
  deriv = 0.5f * (1.0f - th * th) * (k * (1.0f + 3.0f * 0.044715f * (a * a)));
  return 0.5f * (1.0f + th);
}

SK_HD VlbTerm nll_term(float x, float mean_model, float lv_model) {
  const float inv_stdv = expf(-0.5f * lv_model);
  const float c = x - mean_model;
  const float a_plus = inv_stdv * (c + 1.0f / 255.0f);
  const float a_min = inv_stdv * (c - 1.0f / 255.0f);
  float d_plus, d_min;
  const float cdf_plus = approx_cdf(a_plus, d_plus);
  const float cdf_min = approx_cdf(a_min, d_min);
  // d a / d lv_model = -0.5 * a (a = exp(-lv/2) * const)
  const float g_plus = d_plus * (-0.5f * a_plus);
  const float g_min = d_min * (-0.5f * a_min);
  float ll, dll;
  if (x < -0.999f) {
    ll = logf(fmaxf(cdf_plus, 1e-12f));
    dll = cdf_plus >= 1e-12f ? g_plus / cdf_plus : 0.0f;
  } else if (x > 0.999f) {
    const float q = 1.0f - cdf_min;
    ll = logf(fmaxf(q, 1e-12f));
    dll = q >= 1e-12f ? -g_min / q : 0.0f;
  } else {
    const float q = cdf_plus - cdf_min;
    ll = logf(fmaxf(q, 1e-12f));
    dll = q >= 1e-12f ? (g_plus - g_min) / q : 0.0f;
  }
  return VlbTerm{-ll, -dll};
}

}  // namespace speed_kernels
