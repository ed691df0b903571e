// FastMKA's memory path on the CPU in one pass per (batch row, kv head): the routing weights, the session
// EMA, the chunk summaries, the causal top-R recall and the routed mix, forward and backward.
//
// The semantics are those of the mka:: reference ops composed as SiteMemory.mix_levels composes them
// (kernels/session_scan.py, kernels/longterm.py, kernels/route_mix.py, layers/attention.routing_weights);
// tests/kernels/test_fastmka_memory_cpu.py checks this file against that composition. float32 only.
//
// Layouts: k1, v1 [B, Hkv, T, d] (any strides, last one 1); q [B, T, H*d] (last stride 1); logits
// [B, T, G*L] contiguous; valid [B, T] bool; n_seen [B] int64; states float32 contiguous:
// ema/part [B, Hkv, d], summ [B, Hkv, N, d]. kf, vf and the saved per-token tensors are [B, T, Hkv, d].

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

// With inplace (no backward), kf and vf may be written over k1 and v1. Returns kf, vf (empty when !mix: MKA mode attends over the levels instead), lam, router_p, ema_k, ema_v,
// part_k, part_v, summ_k, summ_v, then (when save or !mix) the session levels s_k, s_v, [k3|v3] [B, Hkv, T, 2d]
// (when save; else undefined), the recalled slots [B, Hkv, T, R] int32 (-1 = none) and their weights.
std::vector<Tensor> forward(Tensor k1, Tensor v1, Tensor q, Tensor logits, double gate, Tensor valid,
                            Tensor n_seen, Tensor ema_k, Tensor ema_v, Tensor part_k, Tensor part_v,
                            Tensor summ_k, Tensor summ_v, bool session, bool longterm, double beta_d,
                            int64_t C, int64_t R, double scale_d, bool save, bool mix, bool inplace) {
  k1 = last_contiguous(k1);
  v1 = last_contiguous(v1);
  q = last_contiguous(q);
  logits = logits.contiguous();
  valid = valid.contiguous();
  n_seen = n_seen.contiguous();
  const Levels lv(session, longterm);
  const int64_t B = k1.size(0), Hkv = k1.size(1), T = k1.size(2), d = k1.size(3);
  const int64_t rep = q.size(2) / (Hkv * d), L = lv.L, G = logits.size(2) / L, N = summ_k.size(2);
  const float beta = static_cast<float>(beta_d), scale = static_cast<float>(scale_d), g = static_cast<float>(gate);
  const Tokens tk = token_table(valid, n_seen, B, T, C, N, longterm, beta);

  auto f32 = k1.options();
  Tensor lam = torch::empty({B, G, T, L}, f32), rp = torch::empty({B, G, T, L}, f32);
  {  // routing: lam = onehot + g (softmax(logits, L3 off where nothing is recalled) - onehot)
    const float* lg = logits.data_ptr<float>();
    float* lp = lam.data_ptr<float>();
    float* pp = rp.data_ptr<float>();
    at::parallel_for(0, B * G * T, kRowGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t b = row / (G * T), gi = (row / T) % G, t = row % T;
        const float* x = lg + (b * T + t) * G * L + gi * L;
        const int64_t live = (lv.longterm && !tk.recall[b * T + t]) ? L - 1 : L;
        float m = -std::numeric_limits<float>::infinity(), z = 0.f;
        for (int64_t l = 0; l < live; ++l) m = std::max(m, x[l]);
        float* p = pp + row * L;
        for (int64_t l = 0; l < L; ++l) z += (p[l] = l < live ? exp_nonpos(x[l] - m) : 0.f);
        for (int64_t l = 0; l < L; ++l) {
          p[l] /= z;
          lp[row * L + l] = (l == 0 ? 1.f : 0.f) + g * (p[l] - (l == 0 ? 1.f : 0.f));
        }
      }
    });
  }

  const bool keep = save || !mix;  // the levels themselves are outputs: for the backward, or for MKA mode
  const int64_t Tm = mix ? T : 0;
  // inplace: kf and vf overwrite k1 and v1 when those are head views of [B, T, Hkv*d] buffers (each token's keys
  // are read before its kf is written; nothing later reads k1)
  auto token_major = [&](const Tensor& x) {
    return x.stride(3) == 1 && x.stride(1) == d && x.stride(2) == Hkv * d && (B == 1 || x.stride(0) == T * Hkv * d);
  };
  const bool over = inplace && mix && !keep && token_major(k1) && token_major(v1);
  Tensor kf = over ? k1.transpose(1, 2) : torch::empty({B, Tm, Hkv, d}, f32);
  Tensor vf = over ? v1.transpose(1, 2) : torch::empty({B, Tm, Hkv, d}, f32);
  const auto dense = at::MemoryFormat::Contiguous;  // the loops index the states as dense row-major buffers
  Tensor ek = ema_k.clone(dense), ev = ema_v.clone(dense), pk = part_k.clone(dense), pv = part_v.clone(dense);
  Tensor sk_out = summ_k.clone(dense), sv_out = summ_v.clone(dense);
  Tensor s_k, s_v, kv3, slots, weights;
  if (keep) {
    s_k = torch::zeros({B, T, Hkv, d}, f32);
    s_v = torch::zeros({B, T, Hkv, d}, f32);
    slots = torch::full({B, Hkv, T, R}, -1, k1.options().dtype(torch::kInt32));
    weights = torch::zeros({B, Hkv, T, R}, f32);
  }
  const float *kp = k1.data_ptr<float>(), *vp = v1.data_ptr<float>();
  const int64_t ksb = k1.stride(0), ksh = k1.stride(1), kst = k1.stride(2);
  const int64_t vsb = v1.stride(0), vsh = v1.stride(1), vst = v1.stride(2);
  const float* lamp = lam.data_ptr<float>();
  const int64_t* ns = n_seen.data_ptr<int64_t>();
  float *kfp = kf.data_ptr<float>(), *vfp = vf.data_ptr<float>();
  float *ekp = ek.data_ptr<float>(), *evp = ev.data_ptr<float>(), *pkp = pk.data_ptr<float>(), *pvp = pv.data_ptr<float>();
  float *mkp = sk_out.data_ptr<float>(), *mvp = sv_out.data_ptr<float>();
  float *skp = keep ? s_k.data_ptr<float>() : nullptr, *svp = keep ? s_v.data_ptr<float>() : nullptr;

  // pass 1, in token order: the session EMA and the chunk summaries; kf = lam_1 k1 + lam_s s
  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, kRowGrain / T), [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv, gi = G == 1 ? 0 : h;
      float *__restrict__ s_kk = ekp + bh * d, *__restrict__ s_vv = evp + bh * d;
      float *__restrict__ acc_k = pkp + bh * d, *__restrict__ acc_v = pvp + bh * d;
      float *mk = mkp + bh * N * d, *mv = mvp + bh * N * d;
      int64_t seen = ns[b];
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        const float* kt = kp + b * ksb + h * ksh + t * kst;
        const float* vt = vp + b * vsb + h * vsh + t * vst;
        if (tk.ok[i]) {
          if (lv.session) {
            const float a = tk.a[i], u = tk.u[i];
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) {
              s_kk[j] = a * s_kk[j] + u * kt[j];
              s_vv[j] = a * s_vv[j] + u * vt[j];
            }
          }
          if (lv.longterm) {
            axpy(1.f, kt, acc_k, d);
            axpy(1.f, vt, acc_v, d);
            if ((seen + 1) % C == 0) {  // this token completes chunk seen / C
              const int64_t c = seen / C;
              for (int64_t j = 0; j < d; ++j) {
                mk[c * d + j] = acc_k[j] / static_cast<float>(C);
                mv[c * d + j] = acc_v[j] / static_cast<float>(C);
                acc_k[j] = acc_v[j] = 0.f;
              }
            }
          }
          ++seen;
        }
        const float* w = lamp + ((b * G + gi) * T + t) * L;
        const int64_t o = (i * Hkv + h) * d;
        if (lv.session && keep) {
          std::copy(s_kk, s_kk + d, skp + o);
          std::copy(s_vv, s_vv + d, svp + o);
        }
        if (!mix) continue;
        float *__restrict__ kout = kfp + o, *__restrict__ vout = vfp + o;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) {
          kout[j] = w[0] * kt[j];
          vout[j] = w[0] * vt[j];
        }
        if (lv.session) {
          axpy(w[lv.ls], s_kk, kout, d);
          axpy(w[lv.ls], s_vv, vout, d);
        }
      }
    }
  });

  if (lv.longterm) {
    // recall queries (the mean over each kv group's query heads), then the scores of every token against every
    // slot in one matmul; a token reads only the chunks completed before it
    Tensor qr = torch::empty({B, Hkv, T, d}, f32);
    const float* qp = q.data_ptr<float>();
    const int64_t qsb = q.stride(0), qst = q.stride(1);
    float* qrp = qr.data_ptr<float>();
    at::parallel_for(0, B * Hkv * T, kRowGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t b = row / (Hkv * T), h = (row / T) % Hkv, t = row % T;
        float* out = qrp + row * d;
        const float* src = qp + b * qsb + t * qst + h * rep * d;
        std::copy(src, src + d, out);
        for (int64_t r = 1; r < rep; ++r) axpy(1.f, src + r * d, out, d);
        for (int64_t j = 0; j < d; ++j) out[j] /= static_cast<float>(rep);
      }
    });
    Tensor scores = at::matmul(qr, sk_out.transpose(-1, -2)).contiguous();  // [B, Hkv, T, N]
    const float* scp = scores.data_ptr<float>();
    if (save) kv3 = torch::zeros({B, Hkv, T, 2 * d}, f32);
    float* k3p = save ? kv3.data_ptr<float>() : nullptr;
    int32_t* slp = keep ? slots.data_ptr<int32_t>() : nullptr;
    float* wsp = keep ? weights.data_ptr<float>() : nullptr;
    // pass 2: each token's top-R recallable slots, their softmax weights, k3 and v3; kf += lam_3 k3
    at::parallel_for(0, B * Hkv * T, kRowGrain / 2, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(R), pw(R), k3(d), v3(d);
      std::vector<int64_t> pick(R);
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t b = row / (Hkv * T), h = (row / T) % Hkv, t = row % T, i = b * T + t;
        if (!tk.recall[i]) continue;
        const int64_t nav = std::min(tk.pos[i] / C, N);  // chunks completed before this token
        const float* sc = scp + row * N;
        int64_t take = 0;
        if (nav <= R) {
          for (; take < nav; ++take) pick[take] = take;
        } else {  // the R best, kept sorted by insertion (ties go to the lower slot)
          for (int64_t c = 0; c < nav; ++c) {
            const float v = sc[c];
            if (take == R && !(v > buf[R - 1])) continue;
            int64_t at = take < R ? take++ : R - 1;
            for (; at > 0 && v > buf[at - 1]; --at) {
              buf[at] = buf[at - 1];
              pick[at] = pick[at - 1];
            }
            buf[at] = v;
            pick[at] = c;
          }
        }
        float m = -std::numeric_limits<float>::infinity(), z = 0.f;
        for (int64_t r = 0; r < take; ++r) m = std::max(m, pw[r] = scale * sc[pick[r]]);
#pragma omp simd reduction(+ : z)
        for (int64_t r = 0; r < take; ++r) z += (pw[r] = exp_nonpos(pw[r] - m));
        for (int64_t r = 0; r < take; ++r) pw[r] /= z;
        if (keep)
          for (int64_t r = 0; r < take; ++r) {
            slp[row * R + r] = static_cast<int32_t>(pick[r]);
            wsp[row * R + r] = pw[r];
          }
        if (!mix) continue;
        const float* mk = mkp + (b * Hkv + h) * N * d;
        const float* mv = mvp + (b * Hkv + h) * N * d;
        std::fill(k3.begin(), k3.end(), 0.f);
        std::fill(v3.begin(), v3.end(), 0.f);
        for (int64_t r = 0; r < take; ++r) {
          axpy(pw[r], mk + pick[r] * d, k3.data(), d);
          axpy(pw[r], mv + pick[r] * d, v3.data(), d);
        }
        const float w3 = lamp[((b * G + (G == 1 ? 0 : h)) * T + t) * L + lv.l3];
        const int64_t o = (i * Hkv + h) * d;
        axpy(w3, k3.data(), kfp + o, d);
        axpy(w3, v3.data(), vfp + o, d);
        if (save) {
          std::copy(k3.begin(), k3.end(), k3p + row * 2 * d);
          std::copy(v3.begin(), v3.end(), k3p + row * 2 * d + d);
        }
      }
    });
  } else if (save) {
    kv3 = torch::zeros({B, Hkv, T, 2 * d}, f32);
  }
  std::vector<Tensor> out = {kf, vf, lam, rp, ek, ev, pk, pv, sk_out, sv_out};
  if (keep) out.insert(out.end(), {s_k, s_v, kv3, slots, weights});
  return out;
}

// Gradients of the token inputs (the incoming state gets none: the fused path runs under autograd only for a
// fresh state that nothing keeps). Returns gk1, gv1 ([B, T, Hkv, d]), gq [B, T, H*d], glogits [B, T, G*L] and
// the gate's gradient through the effective gate (a one-element tensor).
std::vector<Tensor> backward(Tensor gkf, Tensor gvf, Tensor k1, Tensor v1, Tensor q, double gate, Tensor valid,
                             Tensor n_seen, Tensor lam, Tensor rp, Tensor summ_k, Tensor summ_v, Tensor s_k,
                             Tensor s_v, Tensor kv3, Tensor slots, Tensor weights, bool session,
                             bool longterm, double beta_d, int64_t C, int64_t R, double scale_d) {
  gkf = gkf.contiguous();
  gvf = gvf.contiguous();
  k1 = last_contiguous(k1);
  v1 = last_contiguous(v1);
  q = last_contiguous(q);
  const Levels lv(session, longterm);
  const int64_t B = k1.size(0), Hkv = k1.size(1), T = k1.size(2), d = k1.size(3);
  const int64_t HQ = q.size(2), rep = HQ / (Hkv * d), L = lv.L, G = lam.size(1), N = summ_k.size(2);
  const float scale = static_cast<float>(scale_d), g = static_cast<float>(gate);
  const Tokens tk = token_table(valid.contiguous(), n_seen.contiguous(), B, T, C, N, longterm,
                                static_cast<float>(beta_d));
  auto f32 = k1.options();
  Tensor gk1 = torch::empty({B, T, Hkv, d}, f32), gv1 = torch::empty({B, T, Hkv, d}, f32);
  Tensor gq = torch::zeros({B, T, HQ}, f32);
  Tensor glam_h = torch::empty({B, Hkv, T, L}, f32);
  const float *kp = k1.data_ptr<float>(), *vp = v1.data_ptr<float>(), *qp = q.data_ptr<float>();
  const int64_t ksb = k1.stride(0), ksh = k1.stride(1), kst = k1.stride(2);
  const int64_t vsb = v1.stride(0), vsh = v1.stride(1), vst = v1.stride(2);
  const int64_t qsb = q.stride(0), qst = q.stride(1);
  const float *gkp = gkf.data_ptr<float>(), *gvp = gvf.data_ptr<float>(), *lamp = lam.data_ptr<float>();
  const int64_t* ns = n_seen.contiguous().data_ptr<int64_t>();

  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, kRowGrain / T), [&](int64_t lo, int64_t hi) {
    std::vector<float> Dk(d), Dv(d), gk3(d), gv3(d), qr(d), gqr(d), gsk(N * d), gsv(N * d);
    for (int64_t bh = lo; bh < hi; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv, gi = G == 1 ? 0 : h;
      const float* mk = summ_k.data_ptr<float>() + bh * N * d;
      const float* mv = summ_v.data_ptr<float>() + bh * N * d;
      std::fill(Dk.begin(), Dk.end(), 0.f);
      std::fill(Dv.begin(), Dv.end(), 0.f);
      std::fill(gsk.begin(), gsk.end(), 0.f);
      std::fill(gsv.begin(), gsv.end(), 0.f);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t i = b * T + t, o = (i * Hkv + h) * d;
        const float *gk = gkp + o, *gv = gvp + o;
        const float* kt = kp + b * ksb + h * ksh + t * kst;
        const float* vt = vp + b * vsb + h * vsh + t * vst;
        const float* w = lamp + ((b * G + gi) * T + t) * L;
        float* gl = glam_h.data_ptr<float>() + (bh * T + t) * L;
        float* gko = gk1.data_ptr<float>() + o;
        float* gvo = gv1.data_ptr<float>() + o;
        gl[0] = dot(gk, kt, d) + dot(gv, vt, d);
        for (int64_t j = 0; j < d; ++j) {
          gko[j] = w[0] * gk[j];
          gvo[j] = w[0] * gv[j];
        }
        if (lv.session) {  // D_t = dL/ds_t = lam_s g_t + a_{t+1} D_{t+1}; dk_t += u_t D_t
          gl[lv.ls] = dot(gk, s_k.data_ptr<float>() + o, d) + dot(gv, s_v.data_ptr<float>() + o, d);
          const float u = tk.u[i], a = tk.a[i];
          for (int64_t j = 0; j < d; ++j) {
            Dk[j] += w[lv.ls] * gk[j];
            Dv[j] += w[lv.ls] * gv[j];
            gko[j] += u * Dk[j];
            gvo[j] += u * Dv[j];
            Dk[j] *= a;
            Dv[j] *= a;
          }
        }
        if (!lv.longterm) continue;
        const float* k3 = kv3.data_ptr<float>() + (bh * T + t) * 2 * d;
        gl[lv.l3] = dot(gk, k3, d) + dot(gv, k3 + d, d);
        if (!tk.recall[i]) continue;
        const int32_t* sl = slots.data_ptr<int32_t>() + (bh * T + t) * R;
        const float* pw = weights.data_ptr<float>() + (bh * T + t) * R;
        for (int64_t j = 0; j < d; ++j) {
          gk3[j] = w[lv.l3] * gk[j];
          gv3[j] = w[lv.l3] * gv[j];
        }
        std::fill(qr.begin(), qr.end(), 0.f);
        for (int64_t r = 0; r < rep; ++r) axpy(1.f, qp + b * qsb + t * qst + (h * rep + r) * d, qr.data(), d);
        for (int64_t j = 0; j < d; ++j) qr[j] /= static_cast<float>(rep);
        float gp[64], mean = 0.f;
        std::vector<float> big;
        float* gpw = R <= 64 ? gp : (big.resize(R), big.data());
        int64_t take = 0;
        for (; take < R && sl[take] >= 0; ++take) {
          const int64_t c = sl[take];
          gpw[take] = dot(gk3.data(), mk + c * d, d) + dot(gv3.data(), mv + c * d, d);
          mean += pw[take] * gpw[take];
        }
        std::fill(gqr.begin(), gqr.end(), 0.f);
        for (int64_t r = 0; r < take; ++r) {
          const int64_t c = sl[r];
          const float gs = pw[r] * (gpw[r] - mean) * scale;  // softmax backward, times the recall scale
          axpy(pw[r], gk3.data(), gsk.data() + c * d, d);
          axpy(gs, qr.data(), gsk.data() + c * d, d);
          axpy(pw[r], gv3.data(), gsv.data() + c * d, d);
          axpy(gs, mk + c * d, gqr.data(), d);
        }
        for (int64_t r = 0; r < rep; ++r) axpy(1.f / static_cast<float>(rep), gqr.data(),
                                                gq.data_ptr<float>() + b * T * HQ + t * HQ + (h * rep + r) * d, d);
      }
      if (!lv.longterm) continue;
      // summaries completed in this call pass their gradient to their tokens (mean over C)
      const int64_t first = ns[b] / C;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t i = b * T + t;
        if (!tk.ok[i]) continue;
        const int64_t c = tk.pos[i] / C;
        if (c < first || c >= tk.done[b]) continue;  // a chunk still open: its gradient is the state's
        const int64_t o = (i * Hkv + h) * d;
        axpy(1.f / static_cast<float>(C), gsk.data() + c * d, gk1.data_ptr<float>() + o, d);
        axpy(1.f / static_cast<float>(C), gsv.data() + c * d, gv1.data_ptr<float>() + o, d);
      }
    }
  });

  // routing backward: lam = onehot + g (p - onehot), p = softmax(logits) over the live levels
  Tensor glam = G == 1 ? glam_h.sum(1, true) : glam_h;  // [B, G, T, L]
  glam = glam.contiguous();
  Tensor glogits = torch::empty({B, T, G * L}, f32), ggate_rows = torch::empty({B * G * T}, f32);
  const float *glp = glam.data_ptr<float>(), *pp = rp.data_ptr<float>();
  float* glo = glogits.data_ptr<float>();
  float* ggr = ggate_rows.data_ptr<float>();
  at::parallel_for(0, B * G * T, kRowGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t b = row / (G * T), gi = (row / T) % G, t = row % T;
      const float *gl = glp + row * L, *p = pp + row * L;
      float s = 0.f, gg = 0.f;
      for (int64_t l = 0; l < L; ++l) {
        s += p[l] * g * gl[l];
        gg += gl[l] * (p[l] - (l == 0 ? 1.f : 0.f));
      }
      float* out = glo + (b * T + t) * G * L + gi * L;
      for (int64_t l = 0; l < L; ++l) out[l] = p[l] * (g * gl[l] - s);
      ggr[row] = gg;
    }
  });
  return {gk1, gv1, gq, glogits, ggate_rows.sum().reshape({1})};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "FastMKA memory path, forward (CPU, float32)");
  m.def("backward", &backward, "FastMKA memory path, backward (CPU, float32)");
}
