// The bias add and activation of a dense SAE encoder in one in-place pass over the [rows, d_sae] GEMM output:
// `nnsae.kernels.bias_activation`. As torch ops they are 2-4 passes with temporaries (the add, a broadcast compare,
// a mask, a multiply), which on CPU cost more than half the encoder GEMM itself. Same float32 operations as the torch
// path, so the same results bit for bit, NaN propagation included:
//   kind 0 (ReLU):      z = h + b;            relu(z)
//   kind 1 (JumpReLU):  z = h + b;            relu(z) · 1[z > θ]      (t = max(θ, 0): z if z > t else 0)
//   kind 2 (gated):     g = h + b_gate;       m = h · s + b_mag;      relu(m) · 1[g > 0]
// where h is the row of x @ W_enc and s = exp(r_mag).

#include <cstdint>

// No fused multiply-add: torch multiplies, rounds, then adds (GCC 12 contracts by default even in ISO mode).
#if defined(__clang__)
#pragma clang fp contract(off)
#define NNSAE_NO_FMA
#elif defined(__GNUC__)
#define NNSAE_NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define NNSAE_NO_FMA
#endif

namespace {

inline float relu(float v) { return v > 0.0f ? v : (v != v ? v : 0.0f); }

}  // namespace

extern "C" NNSAE_NO_FMA int nnsae_bias_activation(int64_t rows, int64_t d, float* h, const float* b, const float* t,
                                     const float* s, const float* b2, int kind) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = h + i * d;
    if (kind == 0) {
      for (int64_t j = 0; j < d; ++j) row[j] = relu(row[j] + b[j]);
    } else if (kind == 1) {
      for (int64_t j = 0; j < d; ++j) {
        const float z = row[j] + b[j];
        row[j] = z <= t[j] ? 0.0f : z;  // NaN stays NaN, as relu(NaN) · 0 does
      }
    } else if (kind == 2) {
      for (int64_t j = 0; j < d; ++j) {
        const float g = row[j] + b[j];
        const float p = row[j] * s[j];
        const float m = relu(p + b2[j]);
        row[j] = g > 0.0f ? m : m * 0.0f;
      }
    } else {
      return 1;
    }
  }
  return 0;
}
