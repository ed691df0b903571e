// Shared pieces of the fused CPU memory path: level indices, small vector helpers, a vectorisable exp, and
// the per-token table (real position, recall availability, EMA decay). Included by extension.cpp only.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

using torch::Tensor;

namespace {

struct Levels {
  bool session, longterm;
  int64_t L, ls, l3;  // number of levels, index of the session level, index of the long-term level
  Levels(bool s, bool l) : session(s), longterm(l), L(1 + s + l), ls(s ? 1 : -1), l3(l ? (s ? 2 : 1) : -1) {}
};

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float w, const float* __restrict__ x, float* __restrict__ y, int64_t d) {  // y += w x
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += w * x[i];
}

// exp(x) for a softmax argument x <= 0, in a form the compiler vectorises (Cephes' expf: range reduction by
// ln 2 in two parts and a degree-6 polynomial; about 1 ulp). Below -87 it returns exp(-87) ~ 1.6e-38, not 0.
inline float exp_nonpos(float x) {
  x = std::max(x, -87.f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  union {
    int32_t i;
    float f;
  } two_n{(static_cast<int32_t>(n) + 127) << 23};
  return p * two_n.f;
}

// Rows (tokens x heads) below which a loop runs on one thread: forking costs more than the work.
constexpr int64_t kRowGrain = 2048;

Tensor last_contiguous(const Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// Per token: the real position, whether anything is recallable, the EMA decay a and input weight u.
struct Tokens {
  std::vector<int64_t> pos;
  std::vector<float> a, u;
  std::vector<uint8_t> ok, recall;
  std::vector<int64_t> done;  // per row: chunks completed once this call's tokens are in
};

Tokens token_table(const Tensor& valid, const Tensor& n_seen, int64_t B, int64_t T, int64_t C, int64_t N,
                   bool longterm, float beta) {
  Tokens tk;
  tk.pos.resize(B * T);
  tk.a.resize(B * T);
  tk.u.resize(B * T);
  tk.ok.resize(B * T);
  tk.recall.resize(B * T);
  tk.done.resize(B);
  const bool* vp = valid.data_ptr<bool>();
  const int64_t* ns = n_seen.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t seen = ns[b];
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      const bool ok = vp[i];
      tk.ok[i] = ok;
      tk.a[i] = !ok ? 1.f : (seen == 0 ? 0.f : beta);
      tk.u[i] = !ok ? 0.f : (seen == 0 ? 1.f : static_cast<float>(1.0 - static_cast<double>(beta)));
      tk.pos[i] = std::max<int64_t>(ok ? seen : seen - 1, 0);
      tk.recall[i] = longterm && std::min(tk.pos[i] / C, N) > 0;
      seen += ok;
    }
    tk.done[b] = seen / C;
  }
  return tk;
}

}  // namespace
