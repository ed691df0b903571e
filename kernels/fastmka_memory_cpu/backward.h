// The backward pass of the fused CPU memory path (see extension.cpp).
#pragma once

#include "common.h"

// Gradients of the token inputs from those of kf, vf and (glam_in, [B, G, T, L], empty when there is none) lam;
// the incoming state gets none (the engine differentiates through this pass only for a fresh state that nothing
// keeps). qr: the forward's recall queries; HQ: the query projection's width. Returns gk1, gv1 ([B, T, Hkv, d]),
// gq [B, T, H*d], glogits [B, T, G*L] and the gate's gradient through the effective gate (a one-element tensor).
std::vector<Tensor> backward(Tensor gkf, Tensor gvf, Tensor glam_in, Tensor k1, Tensor v1, Tensor qr, int64_t HQ,
                             double gate,
                             Tensor valid, Tensor n_seen, Tensor lam, Tensor rp, Tensor summ_k, Tensor summ_v, Tensor s_k,
                             Tensor s_v, Tensor kv3, Tensor slots, Tensor weights, bool session,
                             bool longterm, double beta_d, int64_t C, int64_t R, double scale_d) {
  gkf = gkf.contiguous();
  gvf = gvf.contiguous();
  k1 = last_contiguous(k1);
  v1 = last_contiguous(v1);
  const Levels lv(session, longterm);
  const int64_t B = k1.size(0), Hkv = k1.size(1), T = k1.size(2), d = k1.size(3);
  const int64_t rep = HQ / (Hkv * d), L = lv.L, G = lam.size(1), N = summ_k.size(2);
  const float scale = static_cast<float>(scale_d), g = static_cast<float>(gate);
  const Tokens tk = token_table(valid.contiguous(), n_seen.contiguous(), B, T, C, N, longterm,
                                static_cast<float>(beta_d));
  auto f32 = k1.options();
  Tensor gk1 = torch::empty({B, T, Hkv, d}, f32), gv1 = torch::empty({B, T, Hkv, d}, f32);
  Tensor gq = torch::zeros({B, T, HQ}, f32);
  Tensor glam_h = torch::empty({B, Hkv, T, L}, f32);
  const float *kp = k1.data_ptr<float>(), *vp = v1.data_ptr<float>(), *qrp = qr.data_ptr<float>();
  const int64_t ksb = k1.stride(0), ksh = k1.stride(1), kst = k1.stride(2);
  const int64_t vsb = v1.stride(0), vsh = v1.stride(1), vst = v1.stride(2);
  const float *gkp = gkf.data_ptr<float>(), *gvp = gvf.data_ptr<float>(), *lamp = lam.data_ptr<float>();
  const int64_t* ns = n_seen.contiguous().data_ptr<int64_t>();

  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, kRowGrain / T), [&](int64_t lo, int64_t hi) {
    std::vector<float> Dk(d), Dv(d), gk3(d), gv3(d), gqr(d), gsk(N * d), gsv(N * d);
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
        const float* q_r = qrp + (bh * T + t) * d;  // the forward's recall query
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
          axpy(gs, q_r, gsk.data() + c * d, d);
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
  if (glam_in.numel()) glam = glam + glam_in;
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
