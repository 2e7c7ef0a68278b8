// Seeded random driver for the probability-target kernels of the C++ core
// (lsce::soft_forward / lsce::soft_backward, csrc/lsce_soft_api.h), built with
// AddressSanitizer and UndefinedBehaviorSanitizer by tests/test_fuzz.py as
// fuzz_kernels.cpp is (same flags, same core sources):
//
//   g++ -std=c++17 -fsanitize=address,undefined -fno-sanitize-recover=all -fopenmp
//       -O1 -g -fno-trapping-math -fno-omit-frame-pointer -Icsrc
//       csrc/fuzz/fuzz_soft.cpp csrc/kernels_*.cpp csrc/dispatch.cpp -o fuzz_soft
//   ./fuzz_soft --seed 1 --seconds 30
//
// Each case draws sizes (N 0..40, K 1..20000 weighted towards the block and
// vector widths), the logits' and the target's dtypes (each of the four, mixed),
// padded rows for both (NaN canaries in the padding), a weight or none, ε,
// z_loss, softcap, an upstream of stride 0 or 1, an lse upstream or none, a
// target gradient or none, the fused forward (the gradient written by the
// forward) or not, one of the instruction sets this CPU has and two thread
// counts in 1..4. Every buffer has its exact size, so ASan sees any access past
// it. Checked per row against a float64 evaluation of lsce_soft_api.h's
// formulas on the same rounded values:
//   - rows whose (capped) logits are finite: loss, m, log_s, mass and both
//     gradients within a floating-point bound of the fp64 values, and (without
//     softcap) Σ_k grad_k = h + 2λ·g·lse (the target terms cancel: Σ(A·p − a) = 0);
//   - rows with a NaN logit, or a +inf one without softcap: NaN loss and NaN
//     logits' gradient; rows of only −inf: m = log_s = −inf and a NaN loss;
//   - every output element written (outputs pre-filled with a NaN payload the
//     kernels never produce), the padding never read (a canary read would turn
//     a finite row's loss into NaN);
//   - outputs bitwise identical for the two thread counts.
// The first failure prints the case and exits 1; `--case I --verbose` replays one.

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
#include "../lsce_soft_api.h"

namespace {

#include "fuzz_common.h"  // storage, canaries (kPadding, kUnwritten), Block, Rng

const int64_t kEdgeK[] = {1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257,
                          4095, 4096, 4097, 8191, 8192, 8193, 12289, 20000};
const char* const* const kIsaNames = kFuzzIsaNames;
const char* const kDtypeNames[] = {"f32", "f64", "bf16", "f16"};
const char* const kFillNames[] = {"normal", "offset", "masked", "nonfinite"};
const char* const kTargetNames[] = {"prob", "any", "zeros", "onehot"};

struct Case {
  int dtype, target_dtype, isa_index, threads_a, threads_b, fill, tkind;
  int64_t N, K, row_stride, target_row_stride, grad_loss_stride, grad_lse_stride;
  bool weight, grad_lse, grad_target, fused;
  double eps, z_loss, softcap;
};

Case draw_case(Rng& r, const std::vector<int>& isas) {
  Case c{};
  c.dtype = int(r.range(0, 3));
  c.target_dtype = r.chance(0.5) ? c.dtype : int(r.range(0, 3));
  c.isa_index = isas[size_t(r.range(0, int64_t(isas.size()) - 1))];
  c.K = r.chance(0.6) ? r.pick(kEdgeK) : r.range(1, 20000);
  c.N = r.range(0, c.K > 4096 ? 12 : 40);
  c.row_stride = c.K + (r.chance(0.4) ? r.range(1, 40) : 0);
  c.target_row_stride = c.K + (r.chance(0.4) ? r.range(1, 40) : 0);
  if (c.N <= 1 && r.chance(0.3)) c.row_stride = r.range(0, c.K + 3);
  c.threads_a = int(r.range(1, 4));
  c.threads_b = int(r.range(1, 4));
  c.fill = int(r.range(0, 3));
  c.tkind = int(r.range(0, 3));
  c.weight = r.chance(0.4);
  const double eps[] = {0.0, 0.0, 0.1, 1.0};
  c.eps = r.pick(eps);
  const double zl[] = {0.0, 0.0, 1e-3};
  c.z_loss = r.pick(zl);
  const double caps[] = {0.0, 0.0, 3.0, 30.0};
  c.softcap = r.pick(caps);
  c.fused = r.chance(0.3);
  c.grad_lse = !c.fused && r.chance(0.4);
  c.grad_target = !c.fused && r.chance(0.5);
  c.grad_loss_stride = c.fused ? 0 : r.range(0, 1);
  c.grad_lse_stride = r.range(0, 1);
  return c;
}

void describe(const Case& c, uint64_t seed, int64_t index) {
  std::fprintf(stderr,
               "case: --seed %llu --case %lld: dtype=%s target=%s isa=%s threads=%d/%d N=%lld K=%lld strides=%lld/%lld "
               "weight=%d eps=%g z_loss=%g softcap=%g fused=%d grad_lse=%d grad_target=%d g_stride=%lld fill=%s "
               "target=%s\n",
               (unsigned long long)seed, (long long)index, kDtypeNames[c.dtype], kDtypeNames[c.target_dtype],
               kIsaNames[c.isa_index], c.threads_a, c.threads_b, (long long)c.N, (long long)c.K,
               (long long)c.row_stride, (long long)c.target_row_stride, int(c.weight), c.eps, c.z_loss, c.softcap,
               int(c.fused), int(c.grad_lse), int(c.grad_target), (long long)c.grad_loss_stride, kFillNames[c.fill],
               kTargetNames[c.tkind]);
}

struct Outputs {
  std::vector<unsigned char> loss, m, log_s, mass, grad, grad_t;
};

struct Inputs {
  Block *logits, *target, *weight, *grad_loss, *grad_lse;
};

void copy(std::vector<unsigned char>& v, const Block& b) {
  v.assign(static_cast<const unsigned char*>(b.p), static_cast<const unsigned char*>(b.p) + b.bytes);
}

bool run_kernels(const Case& cs, const Inputs& in, int threads, Outputs& out) {
  const int64_t N = cs.N, K = cs.K;
  const bool dbl = cs.dtype == lsce::kF64;
  const int adt = dbl ? lsce::kF64 : lsce::kF32, acc = dbl ? 8 : 4;
  Block loss(size_t(N) * acc), m(size_t(N) * acc), log_s(size_t(N) * acc), mass(size_t(N) * acc);
  Block grad(size_t(N * K) * item_size(cs.dtype));
  Block grad_t(cs.grad_target ? size_t(N * K) * item_size(cs.target_dtype) : 0);
  for (int64_t i = 0; i < N; ++i)
    for (Block* b : {&loss, &m, &log_s, &mass}) put_payload(b->p, i, adt, kUnwritten);
  for (int64_t i = 0; i < N * K; ++i) {
    put_payload(grad.p, i, cs.dtype, kUnwritten);
    if (cs.grad_target) put_payload(grad_t.p, i, cs.target_dtype, kUnwritten);
  }
  lsce::SoftArgs a{};
  a.dtype = cs.dtype;
  a.target_dtype = cs.target_dtype;
  a.logits = in.logits->p;
  a.N = N;
  a.K = K;
  a.row_stride = cs.row_stride;
  a.target = in.target->p;
  a.target_row_stride = cs.target_row_stride;
  a.weight = in.weight ? in.weight->p : nullptr;
  a.eps = cs.eps;
  a.z_loss = cs.z_loss;
  a.softcap = cs.softcap;
  a.nthreads = threads;
  a.loss = loss.p;
  a.m = m.p;
  a.log_s = log_s.p;
  a.mass = mass.p;
  if (cs.fused) {
    a.grad = grad.p;
    a.grad_loss = in.grad_loss->p;
    a.grad_loss_stride = 0;
  }
  const char* isa = lsce::soft_forward(a);
  if (std::strcmp(isa, kIsaNames[cs.isa_index]) != 0) {
    std::fprintf(stderr, "FAIL: soft_forward ran %s, not %s\n", isa, kIsaNames[cs.isa_index]);
    return false;
  }
  if (!cs.fused) {
    a.grad_loss = in.grad_loss->p;
    a.grad_loss_stride = cs.grad_loss_stride;
    a.grad_lse = in.grad_lse ? in.grad_lse->p : nullptr;
    a.grad_lse_stride = cs.grad_lse_stride;
    a.grad = grad.p;
    a.grad_target = cs.grad_target ? grad_t.p : nullptr;
    lsce::soft_backward(a);
  }
  copy(out.loss, loss);
  copy(out.m, m);
  copy(out.log_s, log_s);
  copy(out.mass, mass);
  copy(out.grad, grad);
  copy(out.grad_t, grad_t);
  return true;
}

double cap_of(double v, double cap) { return cap > 0 ? cap * std::tanh(v / cap) : v; }

bool fail(const char* what, int64_t i, int64_t k, double got, double want, double tol) {
  std::fprintf(stderr, "FAIL: %s row %lld col %lld: got %.9g, expected %.9g (tol %.3g)\n", what, (long long)i,
               (long long)k, got, want, tol);
  return false;
}

bool run_case(const Case& cs, uint64_t case_seed) {
  Rng r(case_seed ^ 0x9E3779B97F4A7C15ull);
  const int64_t N = cs.N, K = cs.K;
  const int dt = cs.dtype, tdt = cs.target_dtype;
  const bool dbl = dt == lsce::kF64;
  const int adt = dbl ? lsce::kF64 : lsce::kF32;
  const double u = dbl ? 0x1p-53 : 0x1p-24;
  const double inf = HUGE_VAL, nan = std::nan("");

  const int64_t n_logits = N == 0 ? 0 : (N - 1) * cs.row_stride + K;
  const int64_t n_target = N == 0 ? 0 : (N - 1) * cs.target_row_stride + K;
  Block logits(size_t(n_logits) * item_size(dt)), target(size_t(n_target) * item_size(tdt));
  for (int64_t i = 0; i < n_logits; ++i) put_payload(logits.p, i, dt, kPadding);
  for (int64_t i = 0; i < n_target; ++i) put_payload(target.p, i, tdt, kPadding);
  std::vector<double> z(size_t(N * K)), t(size_t(N * K));
  for (int64_t i = 0; i < N; ++i) {
    const double offset = cs.fill == 1 ? (r.chance(0.5) ? 1e4 : -3e3) : 0.0;
    const double scale = r.chance(0.5) ? 3.0 : 20.0 * r.uniform();
    const int64_t hot = r.range(0, K - 1);
    double tsum = 0;
    std::vector<double> traw(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) {
      traw[k] = cs.tkind == 0 ? std::exp(r.normal()) : cs.tkind == 1 ? 2 * r.normal() : cs.tkind == 2 ? 0.0 : (k == hot);
      tsum += traw[k];
    }
    for (int64_t k = 0; k < K; ++k) {
      double v = offset + scale * r.normal();
      if (cs.fill == 2 && r.chance(0.3) && k != hot) v = -inf;
      if (cs.fill == 3 && r.chance(2.0 / K)) { const double vals[] = {inf, -inf, nan}; v = r.pick(vals); }
      if (cs.fill == 3 && i == 0 && r.chance(0.2)) v = -inf;
      const double tv = cs.tkind == 0 ? traw[k] / tsum : traw[k];
      z[size_t(i * K + k)] = store(logits.p, i * cs.row_stride + k, dt, v);
      t[size_t(i * K + k)] = store(target.p, i * cs.target_row_stride + k, tdt, tv);
    }
  }
  std::vector<double> w(static_cast<size_t>(K), 1.0);
  Block* weight = nullptr;
  if (cs.weight) {
    weight = new Block(size_t(K) * (dbl ? 8 : 4));
    for (int64_t k = 0; k < K; ++k) w[k] = store(weight->p, k, adt, r.chance(0.05) ? 0.0 : 2 * r.uniform());
  }
  Block grad_loss(size_t(cs.grad_loss_stride ? N : 1) * (dbl ? 8 : 4)), grad_lse(size_t(cs.grad_lse_stride ? N : 1) * (dbl ? 8 : 4));
  for (int64_t i = 0; i < (cs.grad_loss_stride ? N : 1); ++i) store(grad_loss.p, i, adt, r.normal());
  for (int64_t i = 0; i < (cs.grad_lse_stride ? N : 1); ++i) store(grad_lse.p, i, adt, r.normal());
  Inputs in{&logits, &target, weight, &grad_loss, cs.grad_lse ? &grad_lse : nullptr};

  lsce::set_isa(kIsaNames[cs.isa_index]);
  Outputs oa, ob;
  bool ok = run_kernels(cs, in, cs.threads_a, oa) && run_kernels(cs, in, cs.threads_b, ob);
  lsce::set_isa("auto");
  if (ok && (oa.loss != ob.loss || oa.m != ob.m || oa.log_s != ob.log_s || oa.mass != ob.mass || oa.grad != ob.grad ||
             oa.grad_t != ob.grad_t)) {
    std::fprintf(stderr, "FAIL: outputs differ between %d and %d threads\n", cs.threads_a, cs.threads_b);
    ok = false;
  }
  for (int64_t i = 0; ok && i < N; ++i) {
    // Everything written.
    for (auto* v : {&oa.loss, &oa.m, &oa.log_s, &oa.mass})
      if (has_payload(v->data(), i, adt, kUnwritten)) { std::fprintf(stderr, "FAIL: row %lld output unwritten\n", (long long)i); ok = false; }
    for (int64_t k = 0; ok && k < K; ++k)
      if (has_payload(oa.grad.data(), i * K + k, dt, kUnwritten) || (cs.grad_target && has_payload(oa.grad_t.data(), i * K + k, tdt, kUnwritten))) {
        std::fprintf(stderr, "FAIL: gradient [%lld, %lld] unwritten\n", (long long)i, (long long)k);
        ok = false;
      }
    if (!ok) break;
    // fp64 evaluation of the row.
    std::vector<double> zc(static_cast<size_t>(K)), a(static_cast<size_t>(K));
    bool has_nan = false, has_pinf = false, all_minf = true, finite = true;
    double mx = -inf, A = 0, Aabs = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double v = cap_of(z[size_t(i * K + k)], cs.softcap);
      zc[k] = v;
      has_nan |= v != v;
      has_pinf |= v == inf;
      all_minf &= v == -inf;
      finite &= std::isfinite(v);
      if (v > mx) mx = v;
      a[k] = w[k] * ((1 - cs.eps) * t[size_t(i * K + k)] + cs.eps / double(K));
      A += a[k];
      Aabs += std::fabs(a[k]);
    }
    const double loss = load(oa.loss.data(), i, adt), m = load(oa.m.data(), i, adt), ls = load(oa.log_s.data(), i, adt);
    if (has_nan || has_pinf) {
      if (loss == loss) ok = fail("loss of a NaN/+inf row", i, -1, loss, nan, 0);
      for (int64_t k = 0; ok && k < K; ++k)
        if (load(oa.grad.data(), i * K + k, dt) == load(oa.grad.data(), i * K + k, dt) && (cs.fused ? load(grad_loss.p, 0, adt) : 1.0) != 0.0)
          ok = fail("grad of a NaN/+inf row", i, k, load(oa.grad.data(), i * K + k, dt), nan, 0);
      continue;
    }
    if (all_minf) {
      if (!(m == -inf && ls == -inf && loss != loss)) ok = fail("all -inf row (m, log_s -inf, loss NaN)", i, -1, loss, nan, 0);
      continue;
    }
    if (!finite) continue;  // -inf among finite logits: values checked by the Python tests
    double s = 0;
    for (int64_t k = 0; k < K; ++k) s += std::exp(zc[k] - mx);
    const double log_s = std::log(s), lse = mx + log_s;
    double dev = 0, M = 1 + std::fabs(mx) + log_s;
    for (int64_t k = 0; k < K; ++k) dev += a[k] * (mx - zc[k]);
    const double want = dev + A * log_s + cs.z_loss * lse * lse;
    double spread = 1;
    for (int64_t k = 0; k < K; ++k) spread = std::max(spread, mx - zc[k]);
    const double T = Aabs * (spread + log_s) + cs.z_loss * lse * lse + 1;
    const double tol = u * (64 + K / 8.0) * T * 4;
    if (!(std::fabs(loss - want) <= tol)) { ok = fail("loss", i, -1, loss, want, tol); break; }
    if (!(std::fabs(m - mx) <= 8 * u * M)) { ok = fail("m", i, -1, m, mx, 8 * u * M); break; }
    if (!(std::fabs(ls - log_s) <= u * (64 + K / 8.0) * 4 * M)) { ok = fail("log_s", i, -1, ls, log_s, 0); break; }
    const double got_mass = load(oa.mass.data(), i, adt);
    if (!(std::fabs(got_mass - A) <= u * (16 + K / 8.0) * 4 * (Aabs + 1))) { ok = fail("mass", i, -1, got_mass, A, 0); break; }
    const double g = load(grad_loss.p, cs.fused ? 0 : i * cs.grad_loss_stride, adt);
    const double h = cs.grad_lse ? load(grad_lse.p, i * cs.grad_lse_stride, adt) : 0.0;
    const double cp = g * (A + 2 * cs.z_loss * lse) + h;
    const double out_u = dt == lsce::kBF16 ? 0x1p-8 : dt == lsce::kF16 ? 0x1p-11 : u;
    const double tout_u = tdt == lsce::kBF16 ? 0x1p-8 : tdt == lsce::kF16 ? 0x1p-11 : tdt == lsce::kF64 ? 0x1p-53 : 0x1p-24;
    double gsum = 0;
    const double wmax_a = [&] { double x = 0; for (double v : a) x = std::max(x, std::fabs(v)); return x; }();
    // log_s carries the rounding of a K-term sum, as the loss does: the same (64 + K/8) units.
    const double gtol = u * (64 + K / 8.0) * M * (std::fabs(cp) + std::fabs(g) * wmax_a) + 1e-30;
    for (int64_t k = 0; k < K; ++k) {
      const double p = std::exp((zc[k] - mx) - log_s);
      double d = cp * p - g * a[k];
      if (cs.softcap > 0) d *= 1 - (zc[k] / cs.softcap) * (zc[k] / cs.softcap);
      const double got = load(oa.grad.data(), i * K + k, dt);
      gsum += got;
      const double tk = gtol + out_u * std::fabs(d) * 2 + (dt == lsce::kF16 ? 6e-8 : 0.0);
      if (!(std::fabs(got - d) <= tk)) { ok = fail("grad", i, k, got, d, tk); break; }
      if (cs.grad_target) {
        const double dtk = g * (1 - cs.eps) * w[k] * ((mx - zc[k]) + log_s);
        const double gotk = load(oa.grad_t.data(), i * K + k, tdt);
        const double ttol = u * 64 * M * std::fabs(g) * w[k] * 4 + std::max(tout_u, u) * std::fabs(dtk) * 2 +
                            (tdt == lsce::kF16 ? 6e-8 : 0.0) + 1e-30;
        if (!(std::fabs(gotk - dtk) <= ttol)) { ok = fail("target grad", i, k, gotk, dtk, ttol); break; }
      }
    }
    if (ok && cs.softcap == 0) {
      const double want_sum = h + 2 * cs.z_loss * g * lse;
      const double stol = (u * (64 + K / 8.0) * 4 + out_u * 4) * (std::fabs(cp) + std::fabs(g) * Aabs) + 1e-6 * K * (dt == lsce::kF16);
      if (!(std::fabs(gsum - want_sum) <= stol)) ok = fail("Σ grad", i, -1, gsum, want_sum, stol);
    }
  }
  delete weight;
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  int64_t fused = 0, mixed = 0, gt = 0;
  return fuzz_main(
      argc, argv, "fuzz_soft", draw_case, run_case, describe,
      [&](const Case& cs) {
        fused += cs.fused;
        mixed += cs.dtype != cs.target_dtype;
        gt += cs.grad_target;
      },
      [&] {
        char buf[160];
        std::snprintf(buf, sizeof buf, "fused %lld, mixed dtypes %lld, target gradient %lld", (long long)fused,
                      (long long)mixed, (long long)gt);
        return std::string(buf);
      });
}
