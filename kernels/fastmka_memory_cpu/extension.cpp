// FastMKA's memory path on the CPU in one pass per (batch row, kv head): the routing weights, the session
// EMA, the chunk summaries, the causal top-R recall and the routed mix, forward and backward.
//
// The CPU kernel of mka::memory_mix and mka::memory_levels (reference.py declares them): their definition is the
// composition of the mka:: ops in reference.py (reference_memory_mix: session_scan, chunk_update, recall_select,
// recall_mix, route_mix, gated_routing); tests/kernels/test_fastmka_memory_cpu.py checks these files against
// that composition. float32 only.
//
// Layouts: k1, v1 [B, Hkv, T, d] (any strides, last one 1); q [B, T, H*d] (last stride 1); logits
// [B, T, G*L] contiguous; valid [B, T] bool; n_seen [B] int64; states float32 contiguous:
// ema/part [B, Hkv, d], summ [B, Hkv, N, d]. kf, vf and the saved per-token tensors are [B, T, Hkv, d].
//
// One translation unit (the headers hold the passes), so the build compiles torch's headers once.

#include "backward.h"
#include "common.h"
#include "forward.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "FastMKA memory path, forward (CPU, float32)");
  m.def("backward", &backward, "FastMKA memory path, backward (CPU, float32)");
}
