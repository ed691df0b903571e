// The CPU kernel of mka::bounded_attention's forward (reference.py declares the op and holds its definition,
// reference_bounded_attention; tests/kernels/test_bounded_attention.py checks this file against it).
//
// One pass per (batch row, kv head, query): the query's entries idx[b, g, t, :] are read from the pool, each key
// turned by its delta * freqs (cos/sin computed in double once per run of equal deltas), scored against the
// group's query heads, and one softmax per head (max, exp, sum) gives out and lse. No temporaries beyond the
// scores of one query. float32 and float64 (accumulation in the input dtype, as the reference's for them).
//
// Layouts (contiguous): q [B, H, T, d]; k, v [B, G, P, d]; idx, delta [B, G, T, M] int64; freqs [rot/2] float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

using torch::Tensor;

namespace {

constexpr int64_t kGrain = 16;  // queries per task below which a loop stays on one thread

template <typename T>
void forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx, const Tensor& delta,
                  const Tensor& freqs, double scale, bool interleaved, Tensor& out, Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), d = q.size(3);
  const int64_t G = k.size(1), P = k.size(2), M = idx.size(3);
  const int64_t rep = H / G, half = freqs.numel(), rot = 2 * half;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* dp = delta.data_ptr<int64_t>();
  const float* fp = freqs.data_ptr<float>();
  T* op = out.data_ptr<T>();
  T* lp = lse.data_ptr<T>();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  std::atomic<bool> bad{false};

  at::parallel_for(0, B * G * Tq, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<T> s(rep * M), cs(half), sn(half), kr(d), acc(d);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row % Tq, g = (row / Tq) % G, b = row / (Tq * G);
      const int64_t* ix = ip + row * M;
      const int64_t* dx = dp + row * M;
      const T* kbase = kp + (b * G + g) * P * d;
      const T* vbase = vp + (b * G + g) * P * d;
      int64_t turned = std::numeric_limits<int64_t>::min();  // the delta cs / sn hold
      for (int64_t m = 0; m < M; ++m) {
        const int64_t i = ix[m];
        if (i < 0 || i >= P) {
          if (i >= P) bad = true;
          for (int64_t r = 0; r < rep; ++r) s[r * M + m] = neg_inf;
          continue;
        }
        const T* key = kbase + i * d;
        const T* use = key;
        if (half > 0 && dx[m] != 0) {
          if (dx[m] != turned) {
            turned = dx[m];
            for (int64_t j = 0; j < half; ++j) {
              const double a = static_cast<double>(turned) * static_cast<double>(fp[j]);
              cs[j] = static_cast<T>(std::cos(a));
              sn[j] = static_cast<T>(std::sin(a));
            }
          }
          for (int64_t j = 0; j < half; ++j) {
            const int64_t i1 = interleaved ? 2 * j : j, i2 = interleaved ? 2 * j + 1 : j + half;
            kr[i1] = key[i1] * cs[j] - key[i2] * sn[j];
            kr[i2] = key[i2] * cs[j] + key[i1] * sn[j];
          }
          for (int64_t j = rot; j < d; ++j) kr[j] = key[j];
          use = kr.data();
        }
        for (int64_t r = 0; r < rep; ++r) {
          const T* qq = qp + ((b * H + g * rep + r) * Tq + t) * d;
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j < d; ++j) dot += qq[j] * use[j];
          s[r * M + m] = dot * static_cast<T>(scale);
        }
      }
      for (int64_t r = 0; r < rep; ++r) {
        T* sr = s.data() + r * M;
        T mx = neg_inf;
        for (int64_t m = 0; m < M; ++m) mx = std::max(mx, sr[m]);
        T* o = op + ((b * H + g * rep + r) * Tq + t) * d;
        T* l = lp + (b * H + g * rep + r) * Tq + t;
        if (!std::isfinite(mx)) {  // no entry
          for (int64_t j = 0; j < d; ++j) o[j] = 0;
          *l = neg_inf;
          continue;
        }
        std::fill(acc.begin(), acc.end(), T(0));
        T den = 0;
        for (int64_t m = 0; m < M; ++m) {
          if (sr[m] == neg_inf) continue;
          const T p = std::exp(sr[m] - mx);
          den += p;
          const T* vv = vbase + ix[m] * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) acc[j] += p * vv[j];
        }
        for (int64_t j = 0; j < d; ++j) o[j] = acc[j] / den;
        *l = mx + std::log(den);
      }
    }
  });
  TORCH_CHECK(!bad, "mka::bounded_attention: idx holds an entry past the pool's ", P, " keys");
}

std::vector<Tensor> forward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& idx,
                            const Tensor& delta, const Tensor& freqs, double scale, bool interleaved) {
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto ic = idx.contiguous(), dc = delta.contiguous(), fc = freqs.contiguous();
  auto out = torch::empty_like(qc);
  auto lse = torch::empty({q.size(0), q.size(1), q.size(2)}, qc.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "bounded_attention_cpu", [&] {
    forward_impl<scalar_t>(qc, kc, vc, ic, dc, fc, scale, interleaved, out, lse);
  });
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "mka::bounded_attention forward (CPU, float32 / float64)");
}
