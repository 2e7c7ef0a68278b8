// lsce C++ core: the interface between the dispatcher and the per-ISA kernels.
// No torch, no Python: raw pointers, sizes, strides and a dtype code.
#pragma once
#include <cstdint>

namespace lsce {

enum Dtype : int { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

// One call of the forward or the backward kernel, whose per-row formulas are
// the contract of lsce/interface.py (docs/design.md §1). "acc" below means
// double for fp64 logits and float otherwise; every per-row array is in acc.
struct Args {
  int dtype;                 // Dtype of the logits (and of the gradient)
  const void* logits;        // (N, K), element (i, k) at logits[i * row_stride + k]
  int64_t N, K, row_stride;  // in elements
  const int64_t* target;     // (N,), class ids; ignore_index marks ignored rows, and any
                             // other id outside [0, K) a true class outside these columns
  int64_t ignore_index;
  const void* weight;        // (K,) acc, or null (w = 1): w_y of the true class
  const void* c;             // (K,) acc: c_k of the smoothing term; null: uniform, c_k = 1 / uniform_over
  double C;                  // the coefficient of lse in the smoothing term (Σ c for full rows;
                             // K / uniform_over on the uniform path)
  int64_t uniform_over;      // >= 1: classes the uniform c spreads over (K for full rows)
  double eps, z_loss, softcap;  // softcap 0: off
  int nthreads;
  // forward outputs, (N,) acc; backward reads m and log_s: the row max of the
  // (capped) logits and log Σ exp(zc − m), so that p = exp((zc − m) − log_s)
  // (lse = m + log_s is never formed in the kernels but for the z-loss)
  void* loss;
  void* m;
  void* log_s;
  // backward; and the forward when grad is set (it then also writes the
  // gradient for grad_loss, with grad_lse null: the fused training step)
  const void* grad_loss;     // (N,) acc at grad_loss[i * grad_loss_stride] (stride 0: a scalar)
  int64_t grad_loss_stride;
  const void* grad_lse;      // (N,) acc or null
  int64_t grad_lse_stride;
  void* grad;                // (N, K) contiguous, in the logits' dtype (may be the logits themselves)
};

// One pair of entry points per instruction set; the same source compiled for
// each (kernels_*.cpp), chosen at run time by dispatch.cpp.
#define LSCE_DECLARE_ISA(ns) \
  namespace ns {             \
  void forward(const Args&); \
  void backward(const Args&); \
  }
LSCE_DECLARE_ISA(generic)
LSCE_DECLARE_ISA(avx2)
LSCE_DECLARE_ISA(avx512)
#undef LSCE_DECLARE_ISA

// Runs the kernel of the best instruction set this CPU has (or the one forced
// by set_isa). Returns the name of the instruction set used.
const char* forward(const Args& a);
const char* backward(const Args& a);
// "auto", "avx512", "avx2" or "generic"; returns false if this CPU or build lacks it.
bool set_isa(const char* name);
const char* active_isa();

}  // namespace lsce
