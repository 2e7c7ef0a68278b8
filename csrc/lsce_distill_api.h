// lsce C++ core: the distillation kernels' interface (issue 16), next to
// lsce_api.h's class-index and lsce_soft_api.h's probability-target ones. No
// torch, no Python: raw pointers, int64 sizes and strides, dtype codes
// (lsce::Dtype).
//
// Per row i (z the student row, u the teacher's logits, T the temperature,
// y = target[i]; the contract is /work/notes/distill_spec.md, stated in
// PyTorch by lsce.reference.ROWS.distill_forward / distill_backward):
//   m = max z, log_s1 = log Σ exp(z − m), log_sT = log Σ exp((z − m)/T)
//   mt = max u, log_st = log Σ exp((u − mt)/T)
//   ls_k = (z_k − m)/T − log_sT, lt_k = (u_k − mt)/T − log_st, s = exp(ls), t = exp(lt)
//   D_β = (1 − β)·Σ t (lt − lm) + β·Σ s (ls − lm),  lm = log(β t + (1 − β) s)
//   kd = T²·D_β
//   ce = (1 − ε)·w_y·((m − z_y) + log_s1) + (ε/K)·(W·log_s1 + Σ_k w_k·(m − z_k))
//   ∂kd/∂z_k = T·(s_k − t_k) (β = 0), T·s_k·(q_k − Q) (β > 0)
//   ∂ce/∂z_k = ((1 − ε)·w_y + (ε/K)·W)·p_k − (1 − ε)·w_y·[k = y] − (ε/K)·w_k,  p = exp((z − m) − log_s1)
//   grad_k = g·∂kd/∂z_k + h·∂ce/∂z_k (0 on ignored rows)
// "acc" is double for an fp64 student and float otherwise; per-row arrays are acc.
#pragma once
#include <cstdint>

#include "lsce_api.h"

namespace lsce {

// Rows of DistillArgs::stats, each (N,) acc.
enum DistillStat { kStatM = 0, kStatLogS1, kStatLogST, kStatMT, kStatLogSt, kStatQ, kDistillStats };

// One call of distill_forward or distill_backward.
struct DistillArgs {
  int dtype;                   // Dtype of the student (and of its gradient)
  int teacher_dtype;           // Dtype of the teacher's logits (independent of the student's)
  const void* student;         // (N, K), element (i, k) at student[i * row_stride + k]
  int64_t N, K, row_stride;    // in elements
  const void* teacher;         // (N, K), element (i, k) at teacher[i * teacher_row_stride + k]
  int64_t teacher_row_stride;  // in elements
  const int64_t* target;       // (N,) contiguous, or null: no hard labels (ce = 0, every row counts)
  const void* weight;          // (K,) acc, or null (w = 1)
  double temperature;          // T > 0
  double beta;                 // β in [0, 1]
  double eps;                  // ε, the label smoothing, in [0, 1]
  double weight_sum;           // W = Σ_k w_k (K without weight), from the caller
  int64_t ignore_index;
  int nthreads;
  // forward outputs; the backward reads stats
  void* kd;                    // (N,) acc
  void* ce;                    // (N,) acc
  void* stats;                 // (kDistillStats, N) acc, contiguous: row j at stats[j * N]
  // backward; and the forward when grad is set (the fused training step, with
  // grad_kd and grad_ce pointing at the two elements of the upstream, strides 0)
  const void* grad_kd;         // (N,) acc at grad_kd[i * grad_kd_stride] (stride 0: a scalar)
  int64_t grad_kd_stride;
  const void* grad_ce;         // (N,) acc at grad_ce[i * grad_ce_stride]
  int64_t grad_ce_stride;
  void* grad;                  // (N, K) contiguous, the student's dtype (may be the student itself)
};

#define LSCE_DECLARE_DISTILL_ISA(ns)         \
  namespace ns {                             \
  void distill_forward(const DistillArgs&);  \
  void distill_backward(const DistillArgs&); \
  }
LSCE_DECLARE_DISTILL_ISA(generic)
LSCE_DECLARE_DISTILL_ISA(avx2)
LSCE_DECLARE_DISTILL_ISA(avx512)
#undef LSCE_DECLARE_DISTILL_ISA

// The kernels of the instruction set that lsce::forward would use
// (active_isa()); return its name.
const char* distill_forward(const DistillArgs& a);
const char* distill_backward(const DistillArgs& a);

}  // namespace lsce
