// Seeded random driver for the distillation kernels of the C++ core
// (lsce::distill_forward / lsce::distill_backward, csrc/lsce_distill_api.h),
// built with AddressSanitizer and UndefinedBehaviorSanitizer by tests/test_fuzz.py
// as fuzz_kernels.cpp is (same flags, same core sources):
//
//   g++ -std=c++17 -fsanitize=address,undefined -fno-sanitize-recover=all -fopenmp
//       -O1 -g -fno-trapping-math -fno-omit-frame-pointer -Icsrc
//       csrc/fuzz/fuzz_distill.cpp csrc/kernels_*.cpp csrc/dispatch.cpp -o fuzz_distill
//   ./fuzz_distill --seed 1 --seconds 30
//
// Each case draws sizes (N 0..40, K 1..20000 weighted towards the block and
// vector widths), the student's and the teacher's dtypes (each of the four,
// mixed), padded rows for both (NaN canaries in the padding), β (0, 1, or in
// between: each of the kernels' three forms), T, ε, a weight or none, hard
// labels or none (with ignored rows, ignore_index sometimes a class), upstreams
// of stride 0 or 1, the fused forward (the gradient written by the forward) or
// the backward, the gradient written over the student (contiguous rows), one
// of the instruction sets this CPU has and two thread counts in 1..4. Every
// buffer has its exact size, so ASan sees any access past it. Checked per row
// against a float64 evaluation of lsce_distill_api.h's formulas on the same
// rounded values:
//   - rows whose student and teacher logits are finite, or −inf at the same
//     columns (a padded vocabulary): kd, ce, the six stats and the gradient
//     within a floating-point bound of the fp64 values, and Σ_k grad_k = 0
//     (both terms are invariant to a shift of the row);
//   - a NaN or +inf in the student or the teacher, or a student of only −inf,
//     on a row that counts: NaN kd (and a NaN gradient for a NaN student);
//   - ignored rows: kd = ce = 0 and a zero gradient, whatever their values;
//   - every output element written (outputs pre-filled with a NaN payload the
//     kernels never produce), the padding never read (a canary read would turn
//     a finite row's loss into NaN);
//   - outputs bitwise identical for the two thread counts.
// The first failure prints the case and exits 1; `--case I --verbose` replays one.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../lsce_api.h"
#include "../lsce_distill_api.h"

namespace {

#include "fuzz_common.h"  // storage, canaries (kPadding, kUnwritten), Block, Rng

const int64_t kEdgeK[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257,
                          2047, 2048, 2049, 4095, 4096, 4097, 6143, 8193, 20000};
const char* const* const kIsaNames = kFuzzIsaNames;
const char* const kDtypeNames[] = {"f32", "f64", "bf16", "f16"};
const char* const kFillNames[] = {"normal", "offset", "masked", "nonfinite"};

struct Case {
  int dtype, teacher_dtype, isa_index, threads_a, threads_b, fill;
  int64_t N, K, row_stride, teacher_row_stride, grad_kd_stride, grad_ce_stride, ignore_index;
  bool weight, target, fused, inplace;
  double T, beta, eps;
};

Case draw_case(Rng& r, const std::vector<int>& isas) {
  Case c{};
  c.dtype = int(r.range(0, 3));
  c.teacher_dtype = r.chance(0.5) ? c.dtype : int(r.range(0, 3));
  c.isa_index = isas[size_t(r.range(0, int64_t(isas.size()) - 1))];
  c.K = r.chance(0.6) ? r.pick(kEdgeK) : r.range(1, 20000);
  c.N = r.range(0, c.K > 4096 ? 12 : 40);
  c.row_stride = c.K + (r.chance(0.4) ? r.range(1, 40) : 0);
  c.teacher_row_stride = c.K + (r.chance(0.4) ? r.range(1, 40) : 0);
  if (c.N <= 1 && r.chance(0.3)) c.row_stride = r.range(0, c.K + 3);
  if (c.N <= 1 && r.chance(0.3)) c.teacher_row_stride = r.range(0, c.K + 3);
  c.threads_a = int(r.range(1, 4));
  c.threads_b = int(r.range(1, 4));
  c.fill = int(r.range(0, 3));
  c.weight = r.chance(0.4);
  c.target = r.chance(0.7);
  c.ignore_index = r.chance(0.8) ? -100 : r.range(0, c.K - 1);
  const double betas[] = {0.0, 0.0, 1.0, 0.5, 0.3, -1};
  c.beta = r.pick(betas);
  if (c.beta < 0) c.beta = r.uniform();
  const double temps[] = {1.0, 1.0, 0.5, 2.0, 4.0, -1};
  c.T = r.pick(temps);
  if (c.T < 0) c.T = 0.25 + 4 * r.uniform();
  const double eps[] = {0.0, 0.0, 0.1, 1.0};
  c.eps = r.pick(eps);
  c.fused = r.chance(0.4);
  c.inplace = c.row_stride == c.K && r.chance(0.3);
  c.grad_kd_stride = c.fused ? 0 : r.range(0, 1);
  c.grad_ce_stride = c.fused ? 0 : r.range(0, 1);
  return c;
}

void describe(const Case& c, uint64_t seed, int64_t index) {
  std::fprintf(stderr,
               "case: --seed %llu --case %lld: dtype=%s teacher=%s isa=%s threads=%d/%d N=%lld K=%lld "
               "strides=%lld/%lld T=%g beta=%g eps=%g weight=%d target=%d ignore_index=%lld fused=%d inplace=%d "
               "g_strides=%lld/%lld fill=%s\n",
               (unsigned long long)seed, (long long)index, kDtypeNames[c.dtype], kDtypeNames[c.teacher_dtype],
               kIsaNames[c.isa_index], c.threads_a, c.threads_b, (long long)c.N, (long long)c.K,
               (long long)c.row_stride, (long long)c.teacher_row_stride, c.T, c.beta, c.eps, int(c.weight),
               int(c.target), (long long)c.ignore_index, int(c.fused), int(c.inplace), (long long)c.grad_kd_stride,
               (long long)c.grad_ce_stride, kFillNames[c.fill]);
}

struct Outputs {
  std::vector<unsigned char> kd, ce, stats, grad;
};

struct Inputs {
  Block *student, *teacher, *target, *weight, *grad_kd, *grad_ce, *upstream;
  double weight_sum;
};

void copy(std::vector<unsigned char>& v, const Block& b) {
  v.assign(static_cast<const unsigned char*>(b.p), static_cast<const unsigned char*>(b.p) + b.bytes);
}

bool run_kernels(const Case& cs, const Inputs& in, int threads, Outputs& out) {
  const int64_t N = cs.N, K = cs.K;
  const bool dbl = cs.dtype == lsce::kF64;
  const int adt = dbl ? lsce::kF64 : lsce::kF32, acc = dbl ? 8 : 4;
  Block kd(size_t(N) * acc), ce(size_t(N) * acc), stats(size_t(lsce::kDistillStats * N) * acc);
  Block grad(size_t(N * K) * item_size(cs.dtype));
  for (int64_t i = 0; i < N; ++i)
    for (Block* b : {&kd, &ce}) put_payload(b->p, i, adt, kUnwritten);
  for (int64_t i = 0; i < lsce::kDistillStats * N; ++i) put_payload(stats.p, i, adt, kUnwritten);
  if (cs.inplace) std::memcpy(grad.p, in.student->p, grad.bytes);  // the gradient written over the student
  else
    for (int64_t i = 0; i < N * K; ++i) put_payload(grad.p, i, cs.dtype, kUnwritten);
  lsce::DistillArgs a{};
  a.dtype = cs.dtype;
  a.teacher_dtype = cs.teacher_dtype;
  a.student = cs.inplace ? grad.p : in.student->p;
  a.N = N;
  a.K = K;
  a.row_stride = cs.row_stride;
  a.teacher = in.teacher->p;
  a.teacher_row_stride = cs.teacher_row_stride;
  a.target = in.target ? static_cast<const int64_t*>(in.target->p) : nullptr;
  a.weight = in.weight ? in.weight->p : nullptr;
  a.temperature = cs.T;
  a.beta = cs.beta;
  a.eps = cs.eps;
  a.weight_sum = in.weight_sum;
  a.ignore_index = cs.ignore_index;
  a.nthreads = threads;
  a.kd = kd.p;
  a.ce = ce.p;
  a.stats = stats.p;
  if (cs.fused) {
    a.grad = grad.p;
    a.grad_kd = in.upstream->p;
    a.grad_ce = static_cast<const char*>(in.upstream->p) + acc;
  }
  const char* isa = lsce::distill_forward(a);
  if (std::strcmp(isa, kIsaNames[cs.isa_index]) != 0) {
    std::fprintf(stderr, "FAIL: distill_forward ran %s, not %s\n", isa, kIsaNames[cs.isa_index]);
    return false;
  }
  if (!cs.fused) {
    a.grad_kd = in.grad_kd->p;
    a.grad_kd_stride = cs.grad_kd_stride;
    a.grad_ce = in.grad_ce->p;
    a.grad_ce_stride = cs.grad_ce_stride;
    a.grad = grad.p;
    lsce::distill_backward(a);
  }
  copy(out.kd, kd);
  copy(out.ce, ce);
  copy(out.stats, stats);
  copy(out.grad, grad);
  return true;
}

bool fail(const char* what, int64_t i, int64_t k, double got, double want, double tol) {
  std::fprintf(stderr, "FAIL: %s row %lld col %lld: got %.9g, expected %.9g (tol %.3g)\n", what, (long long)i,
               (long long)k, got, want, tol);
  return false;
}

// Within tol, or the same infinity (or both NaN) as the fp64 value.
bool close(double got, double want, double tol) {
  return got == want || (got != got && want != want) || std::fabs(got - want) <= tol;
}

double logaddexp(double a, double b) {
  const double hi = std::max(a, b), lo = std::min(a, b);
  return hi == -HUGE_VAL ? hi : hi + std::log1p(std::exp(lo - hi));
}

// One row in fp64, from lsce_distill_api.h's formulas.
struct RowTruth {
  double m, log_s1, log_sT, mt, log_st, Q, D, ce, S, cP;
  std::vector<double> grad;  // for upstream (g, h), the true-class term included
};

RowTruth truth(const double* z, const double* u, const std::vector<double>& w, double W, int64_t K, int64_t y,
               const Case& cs, double g, double h) {
  RowTruth r;
  const double T = cs.T, b = cs.beta, e = cs.eps;
  r.m = -HUGE_VAL;
  r.mt = -HUGE_VAL;
  for (int64_t k = 0; k < K; ++k) r.m = std::max(r.m, z[k]), r.mt = std::max(r.mt, u[k]);
  double s1 = 0, sT = 0, st = 0;
  for (int64_t k = 0; k < K; ++k) {
    s1 += std::exp(z[k] - r.m);
    sT += std::exp((z[k] - r.m) / T);
    st += std::exp((u[k] - r.mt) / T);
  }
  r.log_s1 = std::log(s1);
  r.log_sT = std::log(sT);
  r.log_st = std::log(st);
  std::vector<double> ls(K), lt(K), s(K), t(K), sq(K, 0.0);
  double D = 0, Q = 0;
  r.S = 1 + std::fabs(r.log_sT) + std::fabs(r.log_st);
  double S2 = 0;
  for (int64_t k = 0; k < K; ++k) {
    ls[k] = (z[k] - r.m) / T - r.log_sT;
    lt[k] = (u[k] - r.mt) / T - r.log_st;
    s[k] = std::exp(ls[k]);
    t[k] = std::exp(lt[k]);
    if (s[k] > 0 || t[k] > 0) S2 = std::max(S2, std::fabs(ls[k]) + std::fabs(lt[k]));
    if (b == 0) {
      if (t[k] > 0) D += t[k] * (lt[k] - ls[k]);
    } else if (b == 1) {
      if (s[k] > 0) D += s[k] * (ls[k] - lt[k]), sq[k] = s[k] * (ls[k] - lt[k]);
    } else {
      const double lm = logaddexp(std::log(b) + lt[k], std::log1p(-b) + ls[k]);
      if (t[k] > 0) D += (1 - b) * t[k] * (lt[k] - lm);
      if (s[k] > 0) {
        D += b * s[k] * (ls[k] - lm);
        const double mix = b * t[k] + (1 - b) * s[k];
        sq[k] = s[k] * (b * (ls[k] - lm) - (1 - b) * ((1 - b) * t[k] + b * s[k]) / mix);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) Q += sq[k];
  if (b == 0) Q = 0;
  r.S += S2 + (std::fabs(r.m) + std::fabs(r.mt)) / T * 0x1p-12;
  r.D = D;
  r.Q = Q;
  const double wy = y >= 0 ? w[y] : 0.0;
  r.ce = 0;
  if (y >= 0) {
    r.ce = (1 - e) * wy * ((r.m - z[y]) + r.log_s1);
    if (e > 0) {
      double dev = 0;
      for (int64_t k = 0; k < K; ++k) dev += w[k] * (r.m - z[k]);
      r.ce += e / K * (W * r.log_s1 + dev);
    }
  }
  r.cP = (1 - e) * wy + e / K * W;
  const double hh = y >= 0 ? h : 0.0;
  r.grad.assign(K, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    const double kd = b == 0 ? T * (s[k] - t[k]) : T * (sq[k] - s[k] * Q);
    const double p = std::exp((z[k] - r.m) - r.log_s1);
    const double ce = r.cP * p - (1 - e) * wy * (k == y) - e / K * w[k];
    r.grad[k] = g * kd + hh * ce;
  }
  return r;
}

bool run_case(const Case& cs, uint64_t case_seed) {
  Rng r(case_seed ^ 0x9E3779B97F4A7C15ull);
  const int64_t N = cs.N, K = cs.K;
  const int dt = cs.dtype, tdt = cs.teacher_dtype;
  const bool dbl = dt == lsce::kF64;
  const int adt = dbl ? lsce::kF64 : lsce::kF32, acc = dbl ? 8 : 4;
  const double u = dbl ? 0x1p-53 : 0x1p-24;
  const double inf = HUGE_VAL, nan = std::nan("");

  const int64_t n_student = N == 0 ? 0 : (N - 1) * cs.row_stride + K;
  const int64_t n_teacher = N == 0 ? 0 : (N - 1) * cs.teacher_row_stride + K;
  Block student(size_t(n_student) * item_size(dt)), teacher(size_t(n_teacher) * item_size(tdt));
  for (int64_t i = 0; i < n_student; ++i) put_payload(student.p, i, dt, kPadding);
  for (int64_t i = 0; i < n_teacher; ++i) put_payload(teacher.p, i, tdt, kPadding);
  // Rows with a row stride below K overlap: the values of row i are read back from storage.
  for (int64_t i = 0; i < N; ++i) {
    const double offset = cs.fill == 1 ? (r.chance(0.5) ? 1e4 : -3e3) : 0.0;
    const double scale = r.chance(0.5) ? 3.0 : 20.0 * r.uniform();
    const double tscale = r.chance(0.5) ? scale : 20.0 * r.uniform();
    const int64_t hot = r.range(0, K - 1);
    for (int64_t k = 0; k < K; ++k) {
      double v = offset + scale * r.normal();
      double tv = (r.chance(0.5) ? v - offset : 0.0) + tscale * r.normal() + (r.chance(0.5) ? offset : 0.0);
      if (cs.fill == 2 && r.chance(0.3) && k != hot) v = tv = -inf;
      if (cs.fill == 3 && r.chance(2.0 / K)) { const double vals[] = {inf, -inf, nan}; v = r.pick(vals); }
      if (cs.fill == 3 && r.chance(1.0 / K)) { const double vals[] = {inf, -inf, nan}; tv = r.pick(vals); }
      if (cs.fill == 3 && i == 0 && r.chance(0.2)) v = -inf;
      store(student.p, i * cs.row_stride + k, dt, v);
      store(teacher.p, i * cs.teacher_row_stride + k, tdt, tv);
    }
  }
  std::vector<double> z(size_t(N * K)), t(size_t(N * K));
  for (int64_t i = 0; i < N; ++i)
    for (int64_t k = 0; k < K; ++k) {
      z[size_t(i * K + k)] = load(student.p, i * cs.row_stride + k, dt);
      t[size_t(i * K + k)] = load(teacher.p, i * cs.teacher_row_stride + k, tdt);
    }
  // The accumulation type rounds the teacher's values (an fp64 teacher of an fp32 student).
  if (!dbl)
    for (double& v : t) v = double(float(v));
  std::vector<double> w(static_cast<size_t>(K), 1.0);
  Block* weight = nullptr;
  double W = double(K);
  if (cs.weight) {
    weight = new Block(size_t(K) * acc);
    W = 0;
    for (int64_t k = 0; k < K; ++k) W += w[k] = store(weight->p, k, adt, r.chance(0.05) ? 0.0 : 2 * r.uniform());
    W = dbl ? W : double(float(W));
  }
  Block* target = nullptr;
  std::vector<int64_t> y(static_cast<size_t>(N), -1);
  if (cs.target) {
    target = new Block(size_t(N) * 8);
    for (int64_t i = 0; i < N; ++i) {
      y[i] = r.chance(0.15) ? cs.ignore_index : r.range(0, K - 1);
      static_cast<int64_t*>(target->p)[i] = y[i];
    }
  }
  Block grad_kd(size_t(cs.grad_kd_stride ? N : 1) * acc), grad_ce(size_t(cs.grad_ce_stride ? N : 1) * acc);
  Block upstream(size_t(2) * acc);
  for (int64_t i = 0; i < (cs.grad_kd_stride ? N : 1); ++i) store(grad_kd.p, i, adt, r.normal());
  for (int64_t i = 0; i < (cs.grad_ce_stride ? N : 1); ++i) store(grad_ce.p, i, adt, r.normal());
  store(upstream.p, 0, adt, r.normal());
  store(upstream.p, 1, adt, r.normal());
  Inputs in{&student, &teacher, target, weight, &grad_kd, &grad_ce, &upstream, W};

  lsce::set_isa(kIsaNames[cs.isa_index]);
  Outputs oa, ob;
  bool ok = run_kernels(cs, in, cs.threads_a, oa) && run_kernels(cs, in, cs.threads_b, ob);
  lsce::set_isa("auto");
  if (ok && (oa.kd != ob.kd || oa.ce != ob.ce || oa.stats != ob.stats || oa.grad != ob.grad)) {
    std::fprintf(stderr, "FAIL: outputs differ between %d and %d threads\n", cs.threads_a, cs.threads_b);
    ok = false;
  }
  const double out_u = dt == lsce::kBF16 ? 0x1p-8 : dt == lsce::kF16 ? 0x1p-11 : u;
  for (int64_t i = 0; ok && i < N; ++i) {
    for (auto* v : {&oa.kd, &oa.ce})
      if (has_payload(v->data(), i, adt, kUnwritten)) ok = fail("kd/ce unwritten", i, -1, 0, 0, 0);
    for (int j = 0; ok && j < lsce::kDistillStats; ++j)
      if (has_payload(oa.stats.data(), j * N + i, adt, kUnwritten)) ok = fail("stats unwritten", i, j, 0, 0, 0);
    for (int64_t k = 0; ok && k < K; ++k)
      if (has_payload(oa.grad.data(), i * K + k, dt, kUnwritten)) ok = fail("gradient unwritten", i, k, 0, 0, 0);
    if (!ok) break;
    const double* zr = &z[size_t(i * K)];
    const double* ur = &t[size_t(i * K)];
    const double kd = load(oa.kd.data(), i, adt), ce = load(oa.ce.data(), i, adt);
    const bool ignored = cs.target && y[i] == cs.ignore_index;
    if (ignored) {
      if (kd != 0 || ce != 0) { ok = fail("kd, ce of an ignored row", i, -1, kd + ce, 0, 0); break; }
      for (int64_t k = 0; ok && k < K; ++k)
        if (load(oa.grad.data(), i * K + k, dt) != 0) ok = fail("grad of an ignored row", i, k, load(oa.grad.data(), i * K + k, dt), 0, 0);
      continue;
    }
    if (!cs.target && ce != 0) { ok = fail("ce without a target", i, -1, ce, 0, 0); break; }
    bool znan = false, bad = false, all_minf = true, same_minf = true;
    for (int64_t k = 0; k < K; ++k) {
      znan |= zr[k] != zr[k];
      bad |= zr[k] != zr[k] || ur[k] != ur[k] || zr[k] == inf || ur[k] == inf;
      all_minf &= zr[k] == -inf;
      same_minf &= (zr[k] == -inf) == (ur[k] == -inf);
    }
    if (bad || all_minf) {
      if (kd == kd) ok = fail("kd of a NaN / +inf / all -inf row", i, -1, kd, nan, 0);
      const double g = cs.fused ? load(upstream.p, 0, adt) : load(grad_kd.p, i * cs.grad_kd_stride, adt);
      for (int64_t k = 0; ok && znan && g != 0 && k < K; ++k) {
        const double gk = load(oa.grad.data(), i * K + k, dt);
        if (gk == gk) ok = fail("grad of a NaN row", i, k, gk, nan, 0);
      }
      continue;
    }
    if (!same_minf) continue;  // −inf student against a finite teacher: kd is inf, checked by the Python tests
    const double g = cs.fused ? load(upstream.p, 0, adt) : load(grad_kd.p, i * cs.grad_kd_stride, adt);
    const double h = cs.fused ? load(upstream.p, 1, adt) : load(grad_ce.p, i * cs.grad_ce_stride, adt);
    const RowTruth tr = truth(zr, ur, w, W, K, cs.target ? y[i] : -1, cs, g, h);
    const double ku = u * (64 + K / 8.0) * 8;
    const double st[lsce::kDistillStats] = {tr.m, tr.log_s1, tr.log_sT, tr.mt, tr.log_st, tr.Q};
    const char* names[] = {"m", "log_s1", "log_sT", "mt", "log_st", "Q"};
    for (int j = 0; ok && j < lsce::kDistillStats; ++j) {
      const double got = load(oa.stats.data(), j * N + i, adt);
      const double tol = j == 0 || j == 3 ? 0.0 : ku * (j == 5 ? tr.S * tr.S : 1 + std::fabs(st[j]));
      if (!close(got, st[j], tol)) ok = fail(names[j], i, -1, got, st[j], tol);
    }
    if (!ok) break;
    const double T2 = cs.T * cs.T;
    const double kd_tol = T2 * ku * tr.S * (1 + std::fabs(tr.D)) * 2;
    if (!close(kd, T2 * tr.D, kd_tol)) { ok = fail("kd", i, -1, kd, T2 * tr.D, kd_tol); break; }
    double spread = 1, wmax = 0;
    for (int64_t k = 0; k < K; ++k) {
      if (zr[k] != -inf) spread = std::max(spread, tr.m - zr[k]);
      wmax = std::max(wmax, w[k]);
    }
    const double ce_tol = ku * ((1 + cs.eps) * wmax * (spread + tr.log_s1) + 1) * 2;
    if (!close(ce, tr.ce, ce_tol)) { ok = fail("ce", i, -1, ce, tr.ce, ce_tol); break; }
    const double hh = cs.target ? h : 0.0;
    const double gtol = ku * tr.S * (std::fabs(g) * cs.T * (1 + std::fabs(tr.Q) + tr.S) +
                                     std::fabs(hh) * (std::fabs(tr.cP) + wmax) * (spread + 1)) + 1e-30;
    double gsum = 0, gabs = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double want = tr.grad[k], got = load(oa.grad.data(), i * K + k, dt);
      gsum += got;
      gabs += std::fabs(want);
      const double tk = gtol + out_u * std::fabs(want) * 2 + (dt == lsce::kF16 ? 6e-8 : 0.0);
      if (!close(got, want, tk)) { ok = fail("grad", i, k, got, want, tk); break; }
    }
    const double stol = K * gtol + out_u * 4 * gabs + (dt == lsce::kF16 ? 6e-8 * K : 0.0);
    if (ok && !(std::fabs(gsum) <= stol)) ok = fail("Σ grad", i, -1, gsum, 0, stol);
  }
  delete weight;
  delete target;
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t fused = 0, mixed = 0, mixture = 0;
  return fuzz_main(
      argc, argv, "fuzz_distill", draw_case, run_case, describe,
      [&](const Case& cs) {
        fused += cs.fused;
        mixed += cs.dtype != cs.teacher_dtype;
        mixture += cs.beta > 0 && cs.beta < 1;
      },
      [&] {
        char buf[160];
        std::snprintf(buf, sizeof buf, "fused %lld, mixed dtypes %lld, 0 < beta < 1 %lld", (long long)fused,
                      (long long)mixed, (long long)mixture);
        return std::string(buf);
      });
}
