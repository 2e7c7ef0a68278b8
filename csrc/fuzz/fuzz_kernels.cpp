// Seeded random driver for the lsce C++ core (lsce::forward / lsce::backward),
// built with AddressSanitizer and UndefinedBehaviorSanitizer by tests/test_fuzz.py:
//
//   g++ -std=c++17 -fsanitize=address,undefined -fno-sanitize-recover=all -fopenmp
//       -O1 -g -fno-trapping-math -fno-omit-frame-pointer -Icsrc
//       csrc/fuzz/fuzz_kernels.cpp csrc/kernels_*.cpp csrc/dispatch.cpp -o fuzz_kernels
//   ./fuzz_kernels --seed 1 --seconds 30
//
// Not part of the extension (setup.py compiles csrc/*.cpp only, not csrc/fuzz/).
//
// Each case draws sizes (N 0..64, K 1..70000, weighted towards the block and
// vector widths and the split-row threshold), a row stride (padding after each
// row filled with NaN canaries), options, one of the four dtypes, one of the
// instruction sets this CPU has and two thread counts in 1..4. A quarter of the
// cases are vocabulary slices (lsce.distributed): the rows are K columns of
// uniform_over > K classes, the coefficients c (or the uniform 1/uniform_over)
// those of the slice, C = Σ c (K/uniform_over), and some targets lie outside
// [0, K) without being ignore_index (from K to far past it, negative, INT64
// extremes): such a row has no true-class term and must not read w_y or z[y].
// The class coefficients are made as lsce.interface.coefficients makes them:
// c = π·w in the accumulation precision, C their fp64 sum rounded to it.
// Every buffer is allocated to its exact size so that ASan sees any read or
// write past it. Checked per row, against a float64 evaluation of the formulas
// of lsce/interface.py ([own] = the target lies in [0, K)):
//   - rows whose (capped) logits are all finite: m the row's max (exactly,
//     without softcap), log_s >= 0; lse = m + log_s, loss and gradient finite
//     and within a floating-point error bound of the fp64 values, and, without
//     softcap, Σ_k grad_k = h + 2λ·g·lse (valid rows) or h (ignored rows), since
//     Σ_k [A·p_k − g·ε·c_k − g·(1−ε)·w_y·[own]·[k=y]] = A − g·(ε·C + (1−ε)·w_y·[own]);
//   - rows with −inf logits but a finite target logit (or, for a target
//     outside the slice, a finite first logit): finite gradient, loss finite /
//     inf / NaN exactly where the fp64 formula gives it;
//   - rows with a NaN (or, without softcap, a +inf) logit, or only -inf ones:
//     lse is NaN (-inf), as torch.logsumexp / log_softmax give, and the loss of
//     a row that is not ignored is NaN wherever a term of it is present (a row
//     outside the slice without smoothing or z-loss has loss 0);
//   - every output element written (outputs are pre-filled with a NaN
//     payload the kernels never produce), the padding never read;
//   - outputs bitwise identical for the two thread counts.
// The first failure prints the case (seed, case number, parameters) and exits 1.
// `--case I --verbose` replays one case.

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../lsce_api.h"

namespace {

#include "fuzz_common.h"  // storage, canaries, Block, Rng

const int64_t kEdgeK[] = {1,     2,     3,     4,     7,     8,     9,     15,    16,    17,
                          31,    32,    33,    63,    64,    65,    127,   128,   129,   255,
                          256,   257,   1023,  1024,  1025,  4095,  4096,  4097,  8191,  8192,
                          8193,  12288, 16383, 16384, 16385, 16447, 24575, 24576, 24577, 32767,
                          32768, 32769, 40000, 49151, 49152, 49153, 65535, 65536, 65537, 70000};
const int64_t kEdgeN[] = {0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 64};

struct Case {
  int dtype, isa_index, threads_a, threads_b;
  int64_t N, K, row_stride, ignore_index, grad_loss_stride, grad_lse_stride;
  int64_t uniform_over;  // > K: a vocabulary slice, with targets outside [0, K)
  bool has_weight, has_prior, has_grad_lse;
  double eps, z_loss, softcap;
  int fill;  // how the logits are drawn
};

const char* const kIsaNames[] = {"generic", "avx2", "avx512"};
const char* const kDtypeNames[] = {"f32", "f64", "bf16", "f16"};
const char* const kFillNames[] = {"normal", "large", "ties", "masked", "nonfinite", "nan-block", "huge"};

Case draw_case(Rng& r, const std::vector<int>& isas, int64_t max_elems) {
  Case c{};
  c.dtype = int(r.range(0, 3));
  c.isa_index = isas[size_t(r.range(0, int64_t(isas.size()) - 1))];
  c.K = r.chance(0.6) ? r.pick(kEdgeK) : int64_t(std::exp(r.uniform() * std::log(70000.0)));
  if (c.K < 1) c.K = 1;
  if (c.K > 70000) c.K = 70000;
  c.N = r.chance(0.5) ? r.pick(kEdgeN) : r.range(0, 64);
  if (c.N * c.K > max_elems) c.N = max_elems / c.K;  // the split-row path lives at small N
  c.row_stride = c.K;
  if (r.chance(0.4)) c.row_stride = c.K + r.range(1, 70);
  if (c.N <= 1 && r.chance(0.2)) c.row_stride = r.range(0, c.K + 3);  // never used with one row
  c.threads_a = int(r.range(1, 4));
  c.threads_b = int(r.range(1, 4));
  c.has_weight = r.chance(0.4);
  c.has_prior = r.chance(0.3);
  const double eps_choices[] = {0.0, 0.0, 0.1, 0.5, 1.0, -1.0};
  c.eps = r.pick(eps_choices);
  if (c.eps < 0) c.eps = r.uniform();
  const double zl[] = {0.0, 0.0, 1e-4, 0.1};
  c.z_loss = r.pick(zl);
  const double caps[] = {0.0, 0.0, 0.0, 1.0, 5.0, 30.0};
  c.softcap = r.pick(caps);
  const int64_t ignores[] = {-100, -1, 0, 1};
  c.ignore_index = r.pick(ignores);
  const int64_t strides[] = {0, 1, 1, 2};
  c.grad_loss_stride = r.pick(strides);
  c.has_grad_lse = r.chance(0.3);
  c.grad_lse_stride = r.pick(strides);
  c.fill = int(r.range(0, 6));
  c.uniform_over = r.chance(0.25) ? c.K + r.range(1, 3 * c.K) : c.K;
  return c;
}

void describe(const Case& c, uint64_t seed, int64_t index) {
  std::fprintf(stderr,
               "case: --seed %llu --case %lld: dtype=%s isa=%s threads=%d/%d N=%lld K=%lld "
               "row_stride=%lld ignore_index=%lld uniform_over=%lld weight=%d prior=%d eps=%.17g z_loss=%g "
               "softcap=%g grad_loss_stride=%lld grad_lse=%d stride %lld fill=%s\n",
               (unsigned long long)seed, (long long)index, kDtypeNames[c.dtype], kIsaNames[c.isa_index],
               c.threads_a, c.threads_b, (long long)c.N, (long long)c.K, (long long)c.row_stride,
               (long long)c.ignore_index, (long long)c.uniform_over, int(c.has_weight), int(c.has_prior), c.eps,
               c.z_loss, c.softcap,
               (long long)c.grad_loss_stride, int(c.has_grad_lse), (long long)c.grad_lse_stride,
               kFillNames[c.fill]);
}

// ---------------------------------------------------------------- one case

struct Outputs {
  std::vector<unsigned char> loss, m, log_s, grad;
};

// Runs forward then backward with `threads` and copies the outputs out.
// `in` holds the exactly sized buffers; outputs are fresh exact blocks.
struct Inputs {
  Block *logits, *target, *weight, *c, *grad_loss, *grad_lse;
  double C;
};

bool run_kernels(const Case& cs, const Inputs& in, int threads, Outputs& out) {
  const int64_t N = cs.N, K = cs.K;
  const int acc = acc_is_double(cs.dtype) ? 8 : 4, isz = item_size(cs.dtype);
  const int adt = acc_is_double(cs.dtype) ? lsce::kF64 : lsce::kF32;
  Block loss(size_t(N) * acc), m(size_t(N) * acc), log_s(size_t(N) * acc), grad(size_t(N * K) * isz);
  for (int64_t i = 0; i < N; ++i) {
    put_payload(loss.p, i, adt, kUnwritten);
    put_payload(m.p, i, adt, kUnwritten);
    put_payload(log_s.p, i, adt, kUnwritten);
  }
  for (int64_t i = 0; i < N * K; ++i) put_payload(grad.p, i, cs.dtype, kUnwritten);

  lsce::Args a{};
  a.dtype = cs.dtype;
  a.logits = in.logits->p;
  a.N = N;
  a.K = K;
  a.row_stride = cs.row_stride;
  a.target = static_cast<const int64_t*>(in.target->p);
  a.ignore_index = cs.ignore_index;
  a.weight = in.weight ? in.weight->p : nullptr;
  a.c = in.c ? in.c->p : nullptr;
  a.C = in.C;
  a.uniform_over = cs.uniform_over;
  a.eps = cs.eps;
  a.z_loss = cs.z_loss;
  a.softcap = cs.softcap;
  a.nthreads = threads;
  a.loss = loss.p;
  a.m = m.p;
  a.log_s = log_s.p;
  const char* isa = lsce::forward(a);
  if (std::strcmp(isa, kIsaNames[cs.isa_index]) != 0) {
    std::fprintf(stderr, "FAIL: forward ran %s, not %s\n", isa, kIsaNames[cs.isa_index]);
    return false;
  }
  a.grad_loss = in.grad_loss->p;
  a.grad_loss_stride = cs.grad_loss_stride;
  a.grad_lse = in.grad_lse ? in.grad_lse->p : nullptr;
  a.grad_lse_stride = cs.grad_lse_stride;
  a.grad = grad.p;
  lsce::backward(a);
  auto copy = [](std::vector<unsigned char>& v, const Block& b) {
    v.assign(static_cast<const unsigned char*>(b.p), static_cast<const unsigned char*>(b.p) + b.bytes);
  };
  copy(out.loss, loss);
  copy(out.m, m);
  copy(out.log_s, log_s);
  copy(out.grad, grad);
  return true;
}

// The logits of one row as the kernels see them (capped), in fp64.
double cap_of(double v, double cap) { return cap > 0 ? cap * std::tanh(v / cap) : v; }

struct Failure {
  bool failed = false;
  void operator()(const char* fmt, ...) __attribute__((format(printf, 2, 3)));
};
void Failure::operator()(const char* fmt, ...) {
  if (failed) return;  // the first message is the useful one
  failed = true;
  va_list ap;
  va_start(ap, fmt);
  std::fputs("FAIL: ", stderr);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
}

bool run_case(const Case& cs, uint64_t case_seed) {
  Rng r(case_seed ^ 0x9E3779B97F4A7C15ull);
  const int64_t N = cs.N, K = cs.K, rs = cs.row_stride;
  const int dt = cs.dtype, isz = item_size(dt), acc = acc_is_double(dt) ? 8 : 4;
  const bool dbl = acc_is_double(dt);

  // Logits: exactly (N - 1) * row_stride + K elements, padding = canaries.
  const int64_t n_logits = N == 0 ? 0 : (N - 1) * rs + K;
  Block logits(size_t(n_logits) * isz);
  for (int64_t i = 0; i < n_logits; ++i) put_payload(logits.p, i, dt, kPadding);

  Block target(size_t(N) * 8);
  int64_t* y = static_cast<int64_t*>(target.p);
  const bool slice = cs.uniform_over != K;
  for (int64_t i = 0; i < N; ++i) {
    y[i] = r.range(0, K - 1);
    if (slice && r.chance(0.4)) {  // the true class in another slice (ignore_index may come up: ignored)
      const int64_t outside[] = {K, K + 1, r.range(K, cs.uniform_over - 1), -2, -r.range(2, 1000),
                                 INT64_MIN, INT64_MAX};
      y[i] = r.pick(outside);
    }
    if (r.chance(0.15)) y[i] = cs.ignore_index;
  }
  const double inf = HUGE_VAL, nan = std::nan("");
  const double big = dt == lsce::kF16 ? 6.0e4 : 1.0e4;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = i * rs;
    const double scale = r.chance(0.5) ? 3.0 : r.uniform() * 20.0;
    const double tie = r.normal() * 5.0;
    for (int64_t k = 0; k < K; ++k) {
      double v;
      switch (cs.fill) {
        case 1: v = r.normal() * 30.0; break;
        case 2: v = tie + (r.chance(0.5) ? 0.0 : r.normal() * 1e-6); break;  // near-ties
        case 6: v = r.chance(0.01) ? (r.chance(0.5) ? big : -big) : r.normal() * scale; break;
        default: v = r.normal() * scale;
      }
      store(logits.p, base + k, dt, v);
    }
    const int64_t yi = (y[i] >= 0 && y[i] < K) ? y[i] : 0;
    if (cs.fill == 3 && r.chance(0.7)) {  // -inf over part of the vocabulary, not the target
      const int64_t k0 = r.range(0, K - 1), k1 = r.range(k0, K);
      for (int64_t k = k0; k < k1; ++k)
        if (k != yi) store(logits.p, base + k, dt, -inf);
      if (r.chance(0.2))
        for (int64_t k = 0; k < K; ++k)
          if (k != yi) store(logits.p, base + k, dt, -inf);
    }
    if (cs.fill == 4 && r.chance(0.5)) {  // a few non-finite values anywhere
      const int64_t n = r.range(1, 3);
      for (int64_t j = 0; j < n; ++j) {
        const double vals[] = {inf, -inf, nan};
        store(logits.p, base + r.range(0, K - 1), dt, r.pick(vals));
      }
      if (r.chance(0.1))
        for (int64_t k = 0; k < K; ++k) store(logits.p, base + k, dt, -inf);  // all -inf
    }
    if (cs.fill == 5 && r.chance(0.5)) {  // a run of NaN (whole blocks for large K)
      const int64_t k0 = r.range(0, K - 1), k1 = r.chance(0.3) ? K : r.range(k0, K);
      for (int64_t k = k0; k < k1; ++k) store(logits.p, base + k, dt, nan);
    }
  }

  // Class weight and coefficients c = prior * w of the slice's classes, or
  // null c: uniform over uniform_over classes, C = K / uniform_over.
  const double V = double(cs.uniform_over);
  std::vector<double> w(size_t(K), 1.0), cc(size_t(K), 1.0 / V);
  Block* weight = nullptr;
  Block* coef = nullptr;
  double C = double(K) / V;
  if (cs.has_weight) {
    weight = new Block(size_t(K) * acc);
    for (int64_t k = 0; k < K; ++k) {
      double v = r.chance(0.05) ? 0.0 : r.uniform() * 2.0;
      v = store(weight->p, k, dbl ? lsce::kF64 : lsce::kF32, v);
      w[size_t(k)] = v;
    }
  }
  if ((cs.has_weight || cs.has_prior) && cs.eps > 0) {
    std::vector<double> prior(size_t(K), 1.0 / V);  // the slice's part of a prior over V classes
    if (cs.has_prior) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += (prior[size_t(k)] = r.chance(0.05) ? 0.0 : r.uniform());
      for (int64_t k = 0; k < K; ++k) prior[size_t(k)] = s > 0 ? prior[size_t(k)] / s * (double(K) / V) : 1.0 / V;
    }
    coef = new Block(size_t(K) * acc);
    C = 0;
    for (int64_t k = 0; k < K; ++k) {
      // As lsce.interface.coefficients: in acc precision, prior_k * w_k.
      double v;
      if (dbl) {
        v = prior[size_t(k)] * w[size_t(k)];
      } else {
        v = double(float(prior[size_t(k)]) * float(w[size_t(k)]));
      }
      v = store(coef->p, k, dbl ? lsce::kF64 : lsce::kF32, v);
      cc[size_t(k)] = v;
      C += v;
    }
    if (!dbl) C = double(float(C));  // the fp64 sum, rounded once to acc
  }

  // Upstream gradients: exact (N - 1) * stride + 1 elements (1 for stride 0).
  auto upstream = [&](int64_t stride, std::vector<double>& vals) {
    const int64_t n = N == 0 ? 0 : (stride == 0 ? 1 : (N - 1) * stride + 1);
    Block* b = new Block(size_t(n) * acc);
    for (int64_t j = 0; j < n; ++j) store(b->p, j, dbl ? lsce::kF64 : lsce::kF32, r.chance(0.1) ? 0.0 : r.normal());
    vals.assign(size_t(N), 0.0);
    for (int64_t i = 0; i < N; ++i) vals[size_t(i)] = load(b->p, i * stride, dbl ? lsce::kF64 : lsce::kF32);
    return b;
  };
  std::vector<double> g, h(size_t(N), 0.0);
  Block* grad_loss = upstream(cs.grad_loss_stride, g);
  Block* grad_lse = cs.has_grad_lse ? upstream(cs.grad_lse_stride, h) : nullptr;

  Inputs in{&logits, &target, weight, coef, grad_loss, grad_lse, C};
  Failure fail;
  Outputs o1, o2;
  lsce::set_isa(kIsaNames[cs.isa_index]);
  if (!run_kernels(cs, in, cs.threads_a, o1) || !run_kernels(cs, in, cs.threads_b, o2)) fail("kernel call");
  if (!fail.failed && (o1.loss != o2.loss || o1.m != o2.m || o1.log_s != o2.log_s || o1.grad != o2.grad))
    fail("results differ between %d and %d threads", cs.threads_a, cs.threads_b);

  // ---- checks against fp64
  const int adt = dbl ? lsce::kF64 : lsce::kF32;
  const double u = dbl ? 0x1p-52 : 0x1p-23;  // unit roundoff of the accumulation
  const double ulp_out[] = {0x1p-23, 0x1p-52, 0x1p-7, 0x1p-10};
  const double out_ulp = ulp_out[dt];
  const double tiny_out[] = {0x1p-149, 0x1p-1074, 0x1p-133, 0x1p-24};  // subnormal spacing
  const double out_tiny = tiny_out[dt];
  const double sum_err = u * (64.0 + double(K) / 8.0);  // blocked/SIMD sums of K terms
  std::vector<double> zc(static_cast<size_t>(K));
  for (int64_t i = 0; i < N && !fail.failed; ++i) {
    const int64_t base = i * rs;
    bool any_nan = false, any_pinf = false;
    double m = -inf, mag = 0;
    for (int64_t k = 0; k < K; ++k) {
      const double v = load(logits.p, base + k, dt);
      if (v != v && has_payload(logits.p, base + k, dt, kPadding)) {
        fail("row %lld holds a padding canary: the harness is broken", (long long)i);
        break;
      }
      const double z = cap_of(v, cs.softcap);
      zc[size_t(k)] = z;
      any_nan |= z != z;
      any_pinf |= z == inf;
      if (z > m) m = z;
      if (std::isfinite(z) && std::fabs(z) > mag) mag = std::fabs(z);
    }
    const double loss = load(o1.loss.data(), i, adt), km = load(o1.m.data(), i, adt);
    const double klog_s = load(o1.log_s.data(), i, adt);
    const double lse = km + klog_s;  // the kernels' lse, formed as their callers form it (in fp64 here)
    if (has_payload(o1.loss.data(), i, adt, kUnwritten) || has_payload(o1.m.data(), i, adt, kUnwritten) ||
        has_payload(o1.log_s.data(), i, adt, kUnwritten)) {
      fail("row %lld: loss, m or log_s not written", (long long)i);
      break;
    }
    const bool valid = y[i] != cs.ignore_index;
    const bool own = valid && y[i] >= 0 && y[i] < K;  // the row's true class is one of these columns
    if (any_nan || any_pinf) {
      // Every term present (true class, smoothing, z-loss) is NaN with the lse.
      const bool nan_loss = valid && (own || cs.eps > 0 || cs.z_loss > 0);
      if (!(lse != lse)) fail("row %lld holds %s: lse is %.9g, not NaN", (long long)i, any_nan ? "NaN" : "+inf", lse);
      if (nan_loss && !(loss != loss)) fail("row %lld holds NaN/+inf: loss is %.9g, not NaN", (long long)i, loss);
      if (!nan_loss && loss != 0) fail("row %lld (ignored, or no loss term): loss %.9g", (long long)i, loss);
      for (int64_t k = 0; k < K && !fail.failed; ++k)
        if (has_payload(o1.grad.data(), i * K + k, dt, kUnwritten))
          fail("grad[%lld, %lld] not written", (long long)i, (long long)k);
      continue;
    }
    if (m == -inf) {  // every logit -inf: lse -inf
      if (lse != -inf) fail("row %lld is all -inf: lse %.9g, not -inf", (long long)i, lse);
      // The true-class and smoothing terms are NaN (0·inf, -inf + inf), as PyTorch; z-loss alone +inf.
      const double expect = !valid ? 0.0 : own || cs.eps > 0 ? nan : cs.z_loss > 0 ? inf : 0.0;
      if (expect == expect ? loss != expect : loss == loss)
        fail("row %lld is all -inf: loss %.9g, not %.9g", (long long)i, loss, expect);
      continue;
    }
    // fp64 evaluation (lsce/reference.py), IEEE semantics for the -inf logits.
    long double s = 0, dot_l = 0, absdot_l = 0;  // 64-bit mantissa: the reference's own sums are exact enough
    for (int64_t k = 0; k < K; ++k) {
      s += std::exp((long double)zc[size_t(k)] - m);
      dot_l += (long double)cc[size_t(k)] * zc[size_t(k)];
      absdot_l += std::fabs((long double)cc[size_t(k)] * zc[size_t(k)]);
    }
    const double rlse = double(m + std::log(s)), dot = double(dot_l), absdot = double(absdot_l);
    const int64_t yi = own ? y[i] : 0;
    const double wy = own ? w[size_t(yi)] : 0.0;  // w_y·[own]
    double rloss = 0, lmag = 0;
    if (valid) {
      if (own) {
        rloss = (1 - cs.eps) * wy * (rlse - zc[size_t(yi)]);
        lmag = (1 - cs.eps) * wy * (std::fabs(rlse) + std::fabs(zc[size_t(yi)]));
      }
      if (cs.eps > 0) {
        rloss += cs.eps * (C * rlse - dot);
        lmag += cs.eps * (std::fabs(C * rlse) + absdot);
      }
      if (cs.z_loss > 0) {
        rloss += cs.z_loss * rlse * rlse;
        lmag += cs.z_loss * rlse * rlse;
      }
    }
    // m is the row's max (exactly, without softcap, whose tanh differs from
    // libm's), so that log_s = log Σ exp(zc − m) >= 0: its largest term is 1.
    if (cs.softcap == 0 ? km != m : !(std::fabs(km - m) <= 1e-6 * cs.softcap))
      fail("row %lld: m %.17g, the row's max %.17g", (long long)i, km, m);
    if (!(klog_s >= 0)) fail("row %lld: log_s %.17g < 0", (long long)i, klog_s);
    const double M = 1.0 + std::max(mag, std::fabs(rlse));
    if (!std::isfinite(lse) || std::fabs(lse - rlse) > (64 * u + sum_err) * M)
      fail("row %lld: lse %.17g, fp64 %.17g", (long long)i, lse, rlse);
    const bool loss_finite = std::isfinite(rloss);
    if (loss_finite) {
      const double tol = (lmag + std::fabs(rloss)) * (64 * u * M + sum_err) + 1e-300;
      if (!std::isfinite(loss) || std::fabs(loss - rloss) > tol)
        fail("row %lld: loss %.17g, fp64 %.17g (tolerance %.3g)", (long long)i, loss, rloss, tol);
    } else if (!((rloss != rloss && loss != loss) || rloss == loss)) {
      fail("row %lld: loss %.17g, fp64 %.17g", (long long)i, loss, rloss);
    }
    if (fail.failed) break;
    // Gradient: A·p_k − g·ε·c_k − [own]·[k = y]·g·(1 − ε)·w_y, times (1 − (zc/cap)²).
    const double gi = valid ? g[size_t(i)] : 0.0, hi = h[size_t(i)];
    const double A = hi + gi * ((1 - cs.eps) * wy + cs.eps * C + 2 * cs.z_loss * rlse);
    long double sum = 0;  // the check's own sum must not add error
    double scale = std::fabs(A) + std::fabs(gi) * (cs.eps * C + (1 - cs.eps) * wy);
    for (int64_t k = 0; k < K && !fail.failed; ++k) {
      if (has_payload(o1.grad.data(), i * K + k, dt, kUnwritten)) {
        fail("grad[%lld, %lld] not written", (long long)i, (long long)k);
        break;
      }
      const double p = std::exp(zc[size_t(k)] - rlse);
      const double cterm = gi * cs.eps * cc[size_t(k)], yterm = k == yi && own ? gi * (1 - cs.eps) * wy : 0.0;
      double ref = A * p - cterm - yterm;
      double dcap = 1.0;
      if (cs.softcap > 0) {
        const double t = zc[size_t(k)] / cs.softcap;
        dcap = 1 - t * t;
      }
      ref *= dcap;
      const double got = load(o1.grad.data(), i * K + k, dt);
      const double terms = std::fabs(A) * p + std::fabs(cterm) + std::fabs(yterm);
      const double tol = out_ulp * std::fabs(ref) + terms * (64 * u * M + sum_err) +
                         out_tiny + (dbl ? 0.0 : std::fabs(A) * 0x1p-125);
      if (!std::isfinite(got) || std::fabs(got - ref) > tol)
        fail("grad[%lld, %lld] = %.17g, fp64 %.17g (tolerance %.3g)", (long long)i, (long long)k, got, ref, tol);
      sum += got;
    }
    if (!fail.failed && cs.softcap == 0) {
      // Σ_k grad_k = A − g·(ε·C + (1 − ε)·w_y·[own]) = h + 2λ·g·lse (valid), h (ignored).
      const double expect = hi + (valid ? 2 * cs.z_loss * gi * rlse : 0.0);
      const double tol = scale * (out_ulp + 64 * u * M + sum_err) + double(K) * (out_tiny + (dbl ? 0.0 : std::fabs(A) * 0x1p-125));
      if (std::fabs(double(sum) - expect) > tol)
        fail("row %lld: gradient sums to %.17g, expected %.17g (tolerance %.3g)", (long long)i, double(sum), expect, tol);
    }
  }
  delete weight;
  delete coef;
  delete grad_loss;
  delete grad_lse;
  return !fail.failed;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t seed = 1;
  int64_t iters = 1000000000, only = -1, max_elems = 1 << 20;
  double seconds = 30;
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "fuzz_kernels: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--seed") seed = std::strtoull(next(), nullptr, 10);
    else if (a == "--iters") iters = std::strtoll(next(), nullptr, 10);
    else if (a == "--seconds") seconds = std::strtod(next(), nullptr);
    else if (a == "--case") only = std::strtoll(next(), nullptr, 10);
    else if (a == "--max-elems") max_elems = std::strtoll(next(), nullptr, 10);
    else if (a == "--verbose") verbose = true;
    else {
      std::fprintf(stderr,
                   "usage: fuzz_kernels [--seed S] [--iters N] [--seconds T] [--case I] "
                   "[--max-elems E] [--verbose]\n");
      return 2;
    }
  }
  std::vector<int> isas;
  for (int k = 0; k < 3; ++k)
    if (lsce::set_isa(kIsaNames[k])) isas.push_back(k);
  lsce::set_isa("auto");
  std::printf("fuzz_kernels: seed %llu, instruction sets:", (unsigned long long)seed);
  for (int k : isas) std::printf(" %s", kIsaNames[k]);
  std::printf("\n");

  const auto t0 = std::chrono::steady_clock::now();
  int64_t done = 0, elems = 0, per_isa[3] = {0, 0, 0}, per_dtype[4] = {0, 0, 0, 0}, split = 0, empty = 0, slices = 0;
  for (int64_t index = (only >= 0 ? only : 0); index < (only >= 0 ? only + 1 : iters); ++index) {
    if (only < 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > seconds) break;
    // Each case has its own generator: `--case I` replays case I of a run.
    const uint64_t case_seed = seed * 0x100000001B3ull + uint64_t(index) * 0x9E3779B97F4A7C15ull;
    Rng r(case_seed);
    const Case cs = draw_case(r, isas, max_elems);
    if (verbose) describe(cs, seed, index);
    if (!run_case(cs, case_seed)) {
      describe(cs, seed, index);
      return 1;
    }
    ++done;
    elems += cs.N * cs.K;
    ++per_isa[cs.isa_index];
    ++per_dtype[cs.dtype];
    split += cs.N > 0 && cs.N < 64 && cs.K >= 2 * 8192;
    empty += cs.N == 0;
    slices += cs.uniform_over != cs.K;
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("fuzz_kernels: cases per isa: generic %lld, avx2 %lld, avx512 %lld; per dtype: f32 %lld, f64 %lld, "
              "bf16 %lld, f16 %lld; split rows %lld; N = 0: %lld; vocabulary slices %lld\n",
              (long long)per_isa[0], (long long)per_isa[1], (long long)per_isa[2], (long long)per_dtype[0],
              (long long)per_dtype[1], (long long)per_dtype[2], (long long)per_dtype[3], (long long)split,
              (long long)empty, (long long)slices);
  std::printf("fuzz_kernels: %lld cases, %lld logits, %.1f s, no failure\n", (long long)done, (long long)elems, dt);
  return 0;
}
