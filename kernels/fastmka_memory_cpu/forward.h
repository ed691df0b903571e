// The forward pass of the fused CPU memory path (see extension.cpp).
#pragma once

#include "common.h"

// Returns kf, vf [B, T, Hkv, d] (empty when !mix: MKA mode attends over the levels instead), lam, router_p,
// ema_k, ema_v, part_k, part_v, summ_k, summ_v (fresh tensors: the state is copied, never written in place), then
// (when save or !mix) the session levels s_k, s_v [B, T, Hkv, d], [k3|v3] [B, Hkv, T, 2d] (when save; else
// undefined), the recalled slots [B, Hkv, T, R] int32 (-1 = none), their weights and the recall queries
// [B, Hkv, T, d] (empty without the long-term level).
std::vector<Tensor> forward(Tensor k1, Tensor v1, Tensor q, Tensor logits, double gate, Tensor valid,
                            Tensor n_seen, Tensor ema_k, Tensor ema_v, Tensor part_k, Tensor part_v,
                            Tensor summ_k, Tensor summ_v, bool session, bool longterm, double beta_d,
                            int64_t C, int64_t R, double scale_d, bool save, bool mix) {
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
  Tensor kf = torch::empty({B, Tm, Hkv, d}, f32), vf = torch::empty({B, Tm, Hkv, d}, f32);
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

  Tensor qr = torch::empty({0}, f32);  // [B, Hkv, T, d] with the long-term level (kept for the backward)
  if (lv.longterm) {
    // recall queries (the mean over each kv group's query heads), then the scores of every token against every
    // slot in one matmul; a token reads only the chunks completed before it
    qr = torch::empty({B, Hkv, T, d}, f32);
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
  if (keep) out.insert(out.end(), {s_k, s_v, kv3, slots, weights, qr});
  return out;
}
