// lsce C++ core: the probability-target (soft) kernels' interface, next to
// lsce_api.h's class-index one. No torch, no Python: raw pointers, sizes,
// strides and dtype codes (lsce::Dtype).
#pragma once
#include <cstdint>

#include "lsce_api.h"

namespace lsce {

// One call of soft_forward or soft_backward; the per-row formulas are those of
// lsce/interface.py (RowKernels.soft_forward / soft_backward). With
// a_k = w_k·((1 − ε)·t_k + ε/K), A = Σ_k a_k, zc the (capped) logits,
// m = max_k zc_k and log_s = log Σ_k exp(zc_k − m), everything relative to m:
//   loss = Σ_k a_k·(m − zc_k) + A·log_s + λ·(m + log_s)²
//   ∂/∂zc_k = (g·(A + 2λ·(m + log_s)) + h)·p_k − g·a_k,  p_k = exp((zc_k − m) − log_s)
//   ∂/∂t_k  = g·(1 − ε)·w_k·((m − zc_k) + log_s)
// "acc" is double for fp64 logits and float otherwise; per-row arrays are in acc.
struct SoftArgs {
  int dtype;                  // Dtype of the logits (and of their gradient)
  int target_dtype;           // Dtype of the target (and of its gradient)
  const void* logits;         // (N, K), element (i, k) at logits[i * row_stride + k]
  int64_t N, K, row_stride;   // in elements
  const void* target;         // (N, K), element (i, k) at target[i * target_row_stride + k]
  int64_t target_row_stride;  // in elements
  const void* weight;         // (K,) acc, or null (w = 1)
  double eps, z_loss, softcap;  // softcap 0: off
  int nthreads;
  // forward outputs, (N,) acc; the backward reads m, log_s and mass
  void* loss;
  void* m;
  void* log_s;
  void* mass;                 // A = Σ_k a_k
  // backward; and the forward when grad is set (it then also writes the
  // logits' gradient for grad_loss, with grad_lse null: the fused training step)
  const void* grad_loss;      // (N,) acc at grad_loss[i * grad_loss_stride] (stride 0: a scalar)
  int64_t grad_loss_stride;
  const void* grad_lse;       // (N,) acc or null: upstream of lse = m + log_s
  int64_t grad_lse_stride;
  void* grad;                 // (N, K) contiguous, the logits' dtype (may be the logits themselves)
  void* grad_target;          // (N, K) contiguous, the target's dtype, or null: no target gradient
};

#define LSCE_DECLARE_SOFT_ISA(ns)      \
  namespace ns {                       \
  void soft_forward(const SoftArgs&);  \
  void soft_backward(const SoftArgs&); \
  }
LSCE_DECLARE_SOFT_ISA(generic)
LSCE_DECLARE_SOFT_ISA(avx2)
LSCE_DECLARE_SOFT_ISA(avx512)
#undef LSCE_DECLARE_SOFT_ISA

// The kernels of the instruction set that lsce::forward would use
// (active_isa()); return its name.
const char* soft_forward(const SoftArgs& a);
const char* soft_backward(const SoftArgs& a);

}  // namespace lsce
