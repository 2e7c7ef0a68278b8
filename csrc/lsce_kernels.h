// lsce C++ core: the forward and backward kernels, templated on the storage type.
//
// Included by kernels_{generic,avx2,avx512}.cpp inside `namespace lsce::<isa>`,
// after `#pragma GCC target(...)`, so the same plain loops are vectorised once
// per instruction set. Everything here is a local template or static inline
// function with no library calls but libm builtins: a std:: template
// instantiated under a wider target could be folded by the linker into the
// generic build and crash an older CPU.
//
// Data flow per row i (docs/design.md §2):
//   forward : one read of z[i, :]       -> loss[i], m[i], log_s[i]  (acc)
//   backward: one read of z[i, :], one write of grad[i, :]      (logits' dtype)
// with the row split across threads into vocabulary blocks when N is small.
//
// Requires lsce_api.h, <cstdint> and <cstring> included before.

// ---------------------------------------------------------------------------
// Storage types: load to the accumulation type, store from it.
struct bf16 { uint16_t bits; };

template <typename T> struct Io;
template <> struct Io<float> {
  using acc = float;
  static inline float load(float x) { return x; }
  static inline float store(float a) { return a; }
};
template <> struct Io<double> {
  using acc = double;
  static inline double load(double x) { return x; }
  static inline double store(double a) { return a; }
};
template <> struct Io<bf16> {
  using acc = float;
  // bf16 is the top half of an fp32.
  static inline float load(bf16 x) {
    uint32_t u = uint32_t(x.bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  // Round to nearest even, as PyTorch's conversion does; NaN stays NaN.
  static inline bf16 store(float a) {
    uint32_t u;
    __builtin_memcpy(&u, &a, 4);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    bf16 out;
    out.bits = uint16_t(a != a ? 0x7FC0u : r);
    return out;
  }
};
template <> struct Io<_Float16> {
  using acc = float;
  // Compiles to vcvtph2ps/vcvtps2ph where F16C is enabled, a libgcc call otherwise.
  static inline float load(_Float16 x) { return float(x); }
  static inline _Float16 store(float a) { return _Float16(a); }
};

// ---------------------------------------------------------------------------
// Math. exp_acc(float) is a branch-free Cephes-style exp (1.2 ulp at most on
// [-87, 0]) that the compiler vectorises; libm's expf is a call per element.
// Its domain is x <= 0 (callers pass z - max or (z - m) - log_s) and NaN, which it
// propagates. Below -87 it returns exp(-87) ~ 1.6e-38, harmless inside a sum;
// ZERO_BELOW makes it exactly 0 there, as the gradient of a -inf logit must be.
// exp_acc(double) is libm's: fp64 is for gradcheck.
template <bool ZERO_BELOW = false>
static inline float exp_acc(float x) {
  const float lo = -87.0f;
  const float xc = x < lo ? lo : x;            // NaN passes
  const float magic = 12582912.0f;             // 1.5 * 2^23: adding it rounds to an integer
  const float r = xc * 1.44269504088896341f + magic;
  const float n = r - magic;                   // n = round(x / ln 2)
  uint32_t rb;
  __builtin_memcpy(&rb, &r, 4);
  const uint32_t eb = (rb + (127u - 0x4B400000u)) << 23;  // bits of 2^n
  float scale;
  __builtin_memcpy(&scale, &eb, 4);
  float f = xc - n * 0.693359375f;             // f = x - n ln 2 in two steps (Cody-Waite)
  f = f - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;                  // e^f, |f| <= ln 2 / 2, Horner
  y = y * f + 1.3981999507e-3f;
  y = y * f + 8.3334519073e-3f;
  y = y * f + 4.1665795894e-2f;
  y = y * f + 1.6666665459e-1f;
  y = y * f + 5.0000001201e-1f;
  y = y * f + 1.0f;
  y = y * f + 1.0f;
  const float res = y * scale;                 // a multiply, not an exponent add, keeps NaN NaN
  return ZERO_BELOW ? (x < lo ? 0.0f : res) : res;
}
template <bool ZERO_BELOW = false>
static inline double exp_acc(double x) { return __builtin_exp(x); }

static inline float log_acc(float x) { return __builtin_logf(x); }
static inline double log_acc(double x) { return __builtin_log(x); }

// tanh from exp (libm's tanhf does not vectorise): tanh|x| = (1 - e) / (1 + e)
// with e = e^-2|x| in exp's domain; it saturates to ±1 as e underflows. Near 0
// the numerator cancels to an absolute error of ~1e-7, which is what the
// softmax sees of a capped logit (softcap * tanh): no slower polynomial branch.
static inline float tanh_acc(float x) {
  const float ax = x < 0 ? -x : x;
  const float e = exp_acc(-2.0f * ax);
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0 ? -t : t;
}
static inline double tanh_acc(double x) { return __builtin_tanh(x); }

template <typename A> static inline A neg_inf() { return -__builtin_inf(); }

// The logit as the loss sees it: softcap * tanh(z / softcap), or z itself.
template <bool CAP, typename A>
static inline A capped(A v, A cap, A inv_cap) {
  return CAP ? cap * tanh_acc(v * inv_cap) : v;
}

// A gradient at least this large is written with non-temporal stores where
// the build has them (it cannot stay in the caches anyway).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

// What the backward loops need of one row (row_grad fills it): over a range
// of its columns,
//   grad[k] = (coef_p · p_k − (coef_c · c_k or uniform) − [k = y] · tcls) · dcap_k
// with p_k = exp((zc_k − m) − log_s) and, with softcap, dcap_k = 1 − (zc_k / cap)².
// Relative to the row max m: an absolute lse = m + log_s rounded to acc would
// cost p its precision on rows far from 0 (randn + 1e6, rows of −1e30).
// The true-class term `tcls` is subtracted in acc before the one store: p_y − 1
// must not be rounded to bf16 first (Liger-Kernel issue 1329). The fused
// forward's loops take a copy per block, with coef_p and y relative to it.
template <typename A> struct RowGrad {
  A m, log_s, coef_p, coef_c, uniform, tcls;
  A cap, inv_cap;  // softcap and 1 / softcap (0 without)
  int64_t y;       // the true class, relative to the range at hand; -1: none in it
  bool zeros;      // ignored row with a finite lse: exact zeros (else 0·NaN, as PyTorch)
  bool stream;     // a gradient of at least kStreamBytes: non-temporal stores where the build has them
};

// Wide<T>: the hand-vectorised loops of the AVX-512 build (lsce_avx512.h),
// used for fp32/bf16/fp16 where `on`; elsewhere the plain loops below.
#ifdef LSCE_AVX512
#include "lsce_avx512.h"
#else
template <typename T> struct Wide {
  static constexpr bool on = false;
};
#endif

// ---------------------------------------------------------------------------
// Forward.

// Running statistics of part of a row: its max m, s = Σ exp(zc − m), and
// dot = Σ c·(m − zc) (c ≡ 1 without coefficients), relative to the max so
// that it neither overflows nor cancels (docs/design.md §1); cs = Σ c over the
// elements (their count without coefficients) moves dot to another max.
// With m = −inf (no element above it) dot is relative to 0: +inf or NaN.
template <typename A> struct Part {
  A m, s, dot, cs;
};

// dot = Σ c·(from − zc) moved to Σ c·(to − zc); −inf stands for 0 (see Part).
template <typename A>
static inline A shifted(A dot, A cs, A from, A to) {
  const A rf = from == neg_inf<A>() ? A(0) : from, rt = to == neg_inf<A>() ? A(0) : to;
  return rt == rf ? dot : dot + cs * (rt - rf);
}

// Folds the statistics q into the running p. The -inf guards keep a block of
// -inf logits from contributing exp(-inf - (-inf)) = NaN (flash-attention 1930).
// The new max's own term stays exactly 1: it is q's (two-pass blocks).
template <typename A>
static inline void merge(Part<A>& p, const Part<A>& q) {
  if (q.s == A(0) && q.m == neg_inf<A>()) {  // only -inf (or nothing): dot is +inf (or NaN, or 0)
    p.dot += shifted(q.dot, q.cs, q.m, p.m);
  } else if (q.m > p.m) {
    p.s = (p.m == neg_inf<A>() ? p.s : p.s * exp_acc(p.m - q.m)) + q.s;  // p.s is 0, or NaN from a NaN-only block
    p.dot = shifted(p.dot, p.cs, p.m, q.m) + q.dot;
    p.m = q.m;
  } else {
    p.s += q.s * exp_acc(q.m - p.m);
    p.dot += shifted(q.dot, q.cs, q.m, p.m);
  }
  p.cs += q.cs;
}

// Elements per block of a row: its two passes (max, then exp) run in L1.
constexpr int64_t kBlock = 4096;

// What the fused forward keeps of a row for its gradient (forward_impl): per
// element e[k] = exp(v_k − bmax[k / kBlock]) and, with softcap, the capped
// logit v[k]; per block its max. Row-sized, one per thread, in L2.
template <typename A> struct Kept {
  A* e;
  A* v;
  A* bmax;
};

// Statistics of z[k0:k1] of one row (z points at the row's start); with
// `keep` (k0 = 0) also what the row's gradient needs. csum: prefix sums of c
// (csum[k] = Σ_{j<k} c_j, in double), null without coefficients.
template <typename T, bool CAP, bool COEF>
static Part<typename Io<T>::acc> range_stats(const T* z, int64_t k0, int64_t k1,
                                             typename Io<T>::acc cap,
                                             const typename Io<T>::acc* c, const double* csum,
                                             const Kept<typename Io<T>::acc>* keep = nullptr) {
  using A = typename Io<T>::acc;
  const A inv_cap = CAP ? A(1) / cap : A(0);
  Part<A> p{neg_inf<A>(), A(0), A(0), A(0)};
  alignas(64) A block_buf[CAP ? kBlock : 1];
  for (int64_t b = k0; b < k1; b += kBlock) {
    const int64_t n = (k1 - b < kBlock) ? k1 - b : kBlock;
    const T* zb = z + b;
    A* buf = keep && CAP ? keep->v + b : block_buf;
    A* e = keep ? keep->e + b : nullptr;
    const A cs = COEF ? A(csum[b + n] - csum[b]) : A(n);  // Σ c over the block
    if constexpr (Wide<T>::on && !CAP) {
      // After the first block: one pass, exp relative to the running max p.m
      // instead of this block's, which a second pass would need; kept unless
      // the block's max is NaN or more than kJump above p.m (its terms could
      // overflow), and then redone below. A block that raises the max moves
      // p to it, its max's term (computed as exp(mb − p.m)) replaced by an
      // exact 1, so that p.m is always the max and s carries no more error
      // than a two-pass sum.
      constexpr A kJump = A(16);
      if (p.m - p.m == A(0)) {  // finite
        A mb, dotb;
        const A sb = Wide<T>::exp_sum_ref(zb, n, p.m, COEF ? c + b : nullptr, e, mb, dotb);
        if (mb <= p.m + kJump) {
          if (keep) keep->bmax[b / kBlock] = p.m;
          p.s += sb;
          p.dot += dotb;
          p.cs += cs;
          if (mb > p.m) {
            p.s = (p.s - Wide<T>::exp1(mb - p.m)) * exp_acc(p.m - mb) + A(1);
            p.dot = shifted(p.dot, p.cs, p.m, mb);
            p.m = mb;
          }
          continue;
        }
      }
    }
    A m = neg_inf<A>();
    if constexpr (Wide<T>::on && CAP) {
      Wide<T>::capped_max(zb, buf, n, cap, m);
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < n; ++j) {
        A v = capped<CAP>(Io<T>::load(zb[j]), cap, inv_cap);
        if (CAP) buf[j] = v;
        m = v > m ? v : m;
      }
    }
    // Second pass: Σ exp(v − m) and Σ c·(v − m), one subtraction for both.
    A s = A(0), dot = A(0);
    if (m != neg_inf<A>()) {
      // Capped values come from the buffer (tanh once); plain ones are re-read
      // from L1, which is cheaper than the buffer's store and load.
      const A* cb = COEF ? c + b : nullptr;
      if constexpr (Wide<T>::on) {
        s = e ? Wide<T>::exp_sum_keep(zb, CAP ? buf : nullptr, n, m, cb, e, dot)
              : Wide<T>::exp_sum(zb, CAP ? buf : nullptr, n, m, cb, dot);
      } else {
        // In steps of 256, each after prefetching the values as far after this
        // block (as exp_sum of lsce_avx512.h does, for the same reason).
        for (int64_t j0 = 0; j0 < n; j0 += 256) {
          const int64_t j1 = n - j0 < 256 ? n : j0 + 256;
          for (int64_t l = 0; l < 256 * int64_t(sizeof(T)); l += 64)
            __builtin_prefetch(reinterpret_cast<const char*>(zb + n + j0) + l);
          if (e) {
#pragma omp simd reduction(+ : s, dot)
            for (int64_t j = j0; j < j1; ++j) {
              const A d = (CAP ? buf[j] : Io<T>::load(zb[j])) - m;
              e[j] = exp_acc(d);
              s += e[j];
              dot += COEF ? cb[j] * d : d;
            }
          } else {
#pragma omp simd reduction(+ : s, dot)
            for (int64_t j = j0; j < j1; ++j) {
              const A d = (CAP ? buf[j] : Io<T>::load(zb[j])) - m;
              s += exp_acc(d);
              dot += COEF ? cb[j] * d : d;
            }
          }
        }
        dot = -dot;  // Σ c·(m − v)
      }
    } else {
      // No element above -inf: NaN or -inf only. A NaN must still reach the
      // sum; dot is relative to 0 (Part), +inf from c·(0 − (−inf)).
      for (int64_t j = 0; j < n; ++j) {
        const A v = CAP ? buf[j] : Io<T>::load(zb[j]);
        if (v != v) s = v;
        dot -= COEF ? c[b + j] * v : v;
        if (e) e[j] = v != v ? v : A(0);
      }
    }
    if (keep) keep->bmax[b / kBlock] = m;
    merge(p, Part<A>{m, s, dot, cs});
  }
  return p;
}

template <typename T, bool CAP, bool COEF>
static inline Part<typename Io<T>::acc> stats_of(const Args& a, int64_t i, int64_t k0, int64_t k1,
                                                 const double* csum,
                                                 const Kept<typename Io<T>::acc>* keep = nullptr) {
  using A = typename Io<T>::acc;
  const T* z = static_cast<const T*>(a.logits) + i * a.row_stride;
  return range_stats<T, CAP, COEF>(z, k0, k1, A(a.softcap), static_cast<const A*>(a.c), csum, keep);
}

// Prefix sums of the coefficients c, in double (csum[k] = Σ_{j<k} c_j), so
// that any block's Σ c is one subtraction; null without coefficients. Once
// per call: O(K) against the kernels' O(N·K). Freed with delete[].
template <bool COEF, typename A>
static inline double* coef_prefix(const Args& a) {
  if (!COEF) return nullptr;
  const A* c = static_cast<const A*>(a.c);
  double* csum = new double[a.K + 1];
  csum[0] = 0.0;
  for (int64_t k = 0; k < a.K; ++k) csum[k + 1] = csum[k] + double(c[k]);
  return csum;
}

// Whether a target y (not ignore_index) is one of these columns. One outside
// [0, K) is a true class in another slice of the vocabulary (lsce.distributed):
// its row gets no true-class term, and neither w_y nor z[y] is read.
static inline bool owns_target(const Args& a, int64_t y) { return y >= 0 && y < a.K; }

// Turns a row's statistics into its loss, m and log_s (docs/design.md §1),
// every term relative to the row max: (m − zc_y) + log_s is not the difference
// of two large numbers, and Σ c·(m − zc) cannot overflow for finite rows.
template <typename T, bool CAP, bool COEF>
static inline void finish_row(const Args& a, int64_t i, const Part<typename Io<T>::acc>& p) {
  using A = typename Io<T>::acc;
  const A m = p.m, log_s = log_acc(p.s);  // all -inf: -inf, -inf; any NaN or +inf: log_s NaN
  static_cast<A*>(a.m)[i] = m;
  static_cast<A*>(a.log_s)[i] = log_s;
  A loss = A(0);
  const int64_t y = a.target[i];
  if (y != a.ignore_index) {
    const A eps = A(a.eps);
    if (owns_target(a, y)) {
      const A cap = A(a.softcap);
      const T* z = static_cast<const T*>(a.logits) + i * a.row_stride;
      const A zy = capped<CAP>(Io<T>::load(z[y]), cap, CAP ? A(1) / cap : A(0));
      const A wy = a.weight ? static_cast<const A*>(a.weight)[y] : A(1);
      loss = (A(1) - eps) * wy * ((m - zy) + log_s);
    }
    if (a.eps > 0) {
      const A dot = COEF ? p.dot : p.dot / A(a.uniform_over);
      loss += eps * (A(a.C) * log_s + dot);
    }
    if (a.z_loss > 0) {
      const A lse = m + log_s;
      loss += A(a.z_loss) * lse * lse;
    }
  }
  static_cast<A*>(a.loss)[i] = loss;
}

// How many vocabulary blocks each row is split into: 1 when there are enough
// rows to keep every thread busy, more for small N and large K (N = 8,
// K = 256000 runs 8 blocks of 32000 per row). It depends on N and K only, not
// on the thread count, so that results are bitwise the same on any number of
// threads.
static inline int64_t blocks_per_row(const Args& a) {
  const int64_t min_width = 8192, want_tasks = 64;
  if (a.N < 1 || a.N >= want_tasks || a.K < 2 * min_width) return 1;  // (N = 0 would divide by 0)
  const int64_t nb = (want_tasks + a.N - 1) / a.N, most = a.K / min_width;
  return nb < most ? nb : most;
}

static inline int64_t block_width(const Args& a, int64_t nb) {
  int64_t w = (a.K + nb - 1) / nb;
  return (w + 63) / 64 * 64;  // whole cache lines per block
}

// Enough work to be worth waking the other threads for.
static inline bool parallel_worth(const Args& a) { return a.N * a.K >= (int64_t(1) << 15); }

template <typename T, bool CAP, bool COEF>
static void kept_grad_row(const Args& a, int64_t i, const Kept<typename Io<T>::acc>& keep);
template <typename T, bool CAP, bool COEF>
static void backward_impl(const Args& a);

// With a.grad set, the forward also writes the gradient for the upstream
// a.grad_loss (a.grad_lse must be null): the fused training step. Rows that
// are not split keep their exp values (Kept) and turn them into the gradient
// while the row is still in L2: one read of the logits and one exp per
// element instead of two of each. Split rows (small N) run the backward
// kernel after the forward.
template <typename T, bool CAP, bool COEF>
static void forward_impl(const Args& a) {
  using A = typename Io<T>::acc;
  const int64_t N = a.N, K = a.K;
  const int64_t nb = blocks_per_row(a);
  double* csum = coef_prefix<COEF, A>(a);
  if (nb == 1 && a.grad) {
    const int64_t nblocks = (K + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(a.nthreads) if (parallel_worth(a))
    {
      A* scratch = new A[(CAP ? 2 : 1) * K + nblocks];
      const Kept<A> keep{scratch, CAP ? scratch + K : nullptr, scratch + (CAP ? 2 : 1) * K};
#pragma omp for schedule(static)
      for (int64_t i = 0; i < N; ++i) {
        finish_row<T, CAP, COEF>(a, i, stats_of<T, CAP, COEF>(a, i, 0, K, csum, &keep));
        kept_grad_row<T, CAP, COEF>(a, i, keep);
      }
      delete[] scratch;
    }
    delete[] csum;
    return;
  }
  if (nb == 1) {
#pragma omp parallel for num_threads(a.nthreads) schedule(static) if (parallel_worth(a))
    for (int64_t i = 0; i < N; ++i) finish_row<T, CAP, COEF>(a, i, stats_of<T, CAP, COEF>(a, i, 0, K, csum));
    delete[] csum;
    return;
  }
  // Split rows: per-block statistics first, then one merge per row. Blocks
  // are taken dynamically: on a VM an idle thread can wake hundreds of µs late,
  // and with a static split the other thread then waits for its half (N = 8,
  // K = 256000: 490 µs on 2 threads, 515 on 1; dynamic: 349).
  const int64_t bw = block_width(a, nb);
  Part<A>* parts = new Part<A>[N * nb];
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic)
  for (int64_t t = 0; t < N * nb; ++t) {
    const int64_t i = t / nb, k0 = (t % nb) * bw;
    const int64_t k1 = k0 + bw < K ? k0 + bw : K;
    parts[t] = k0 < K ? stats_of<T, CAP, COEF>(a, i, k0, k1, csum) : Part<A>{neg_inf<A>(), A(0), A(0), A(0)};
  }
  for (int64_t i = 0; i < N; ++i) {
    Part<A> p{neg_inf<A>(), A(0), A(0), A(0)};
    for (int64_t b = 0; b < nb; ++b) merge(p, parts[i * nb + b]);
    finish_row<T, CAP, COEF>(a, i, p);
  }
  delete[] parts;
  delete[] csum;
  if (a.grad) backward_impl<T, CAP, COEF>(a);
}

// ---------------------------------------------------------------------------
// Backward: grad[i, k] = (A_i · p_k − g_i · ε · c_k − [k = y] · g_i · (1 − ε) · w_y) · dcap_k
// (lsce/interface.py), as RowGrad holds it.

template <typename T>
static inline RowGrad<typename Io<T>::acc> row_grad(const Args& a, int64_t i) {
  using A = typename Io<T>::acc;
  const A eps = A(a.eps);
  const int64_t y = a.target[i];
  const bool valid = y != a.ignore_index, own = valid && owns_target(a, y);
  RowGrad<A> r;
  r.m = static_cast<const A*>(a.m)[i];
  r.log_s = static_cast<const A*>(a.log_s)[i];
  const A lse = r.m + r.log_s;
  const A g = valid ? static_cast<const A*>(a.grad_loss)[i * a.grad_loss_stride] : A(0);
  const A h = a.grad_lse ? static_cast<const A*>(a.grad_lse)[i * a.grad_lse_stride] : A(0);
  // w_y·[own]: 0 leaves out the true-class term of a row whose class is not in these columns.
  const A wy = !own ? A(0) : a.weight ? static_cast<const A*>(a.weight)[y] : A(1);
  r.coef_p = h;  // coefficient of p_k
  if (valid) r.coef_p += g * ((A(1) - eps) * wy + eps * A(a.C) + A(2) * A(a.z_loss) * lse);
  r.coef_c = g * eps;                       // times c_k (COEF)
  r.uniform = g * eps / A(a.uniform_over);  // otherwise
  r.tcls = g * (A(1) - eps) * wy;
  r.y = own ? y : -1;
  r.zeros = r.coef_p == A(0) && g == A(0) && lse - lse == A(0);
  r.cap = A(a.softcap);
  r.inv_cap = a.softcap != 0.0 ? A(1) / r.cap : A(0);
  r.stream = a.N * a.K * int64_t(sizeof(T)) >= kStreamBytes;
  return r;
}

// Every z[k] is read before grad[k] is written and never after, so grad may
// be the logits' own storage (lsce.linear writes a chunk's gradient in place).
template <typename T, bool CAP, bool COEF>
static void backward_range(const Args& a, int64_t i, int64_t k0, int64_t k1) {
  using A = typename Io<T>::acc;
  const T* z = static_cast<const T*>(a.logits) + i * a.row_stride;
  T* out = static_cast<T*>(a.grad) + i * a.K;
  const A* c = static_cast<const A*>(a.c);
  RowGrad<A> r = row_grad<T>(a, i);
  if (r.zeros) {
    const T zero = Io<T>::store(A(0));
    for (int64_t k = k0; k < k1; ++k) out[k] = zero;
    return;
  }
  if (r.y < k0 || r.y >= k1) r.y = -1;  // the true class of this range only
  if constexpr (Wide<T>::on) {
    Wide<T>::template grad<CAP, COEF>(z, out, c, k0, k1, r);
    return;
  }
  const A cap = r.cap, inv_cap = r.inv_cap;
  const bool has_y = r.y >= 0;
  const A vy = has_y ? capped<CAP>(Io<T>::load(z[r.y]), cap, inv_cap) : A(0);
  // In steps of 256, each after prefetching z 2 KiB ahead (as Wide<T>::grad).
  for (int64_t j0 = k0; j0 < k1; j0 += 256) {
    const int64_t j1 = k1 - j0 < 256 ? k1 : j0 + 256;
    for (int64_t l = 0; l < 256 * int64_t(sizeof(T)); l += 64)
      __builtin_prefetch(reinterpret_cast<const char*>(z + j0) + 2048 + l);
#pragma omp simd
    for (int64_t k = j0; k < j1; ++k) {
      const A v = capped<CAP>(Io<T>::load(z[k]), cap, inv_cap);
      A d = r.coef_p * exp_acc<true>((v - r.m) - r.log_s) - (COEF ? r.coef_c * c[k] : r.uniform);
      if (CAP) d *= A(1) - (v * inv_cap) * (v * inv_cap);
      out[k] = Io<T>::store(d);
    }
  }
  if (has_y) {
    A d = r.coef_p * exp_acc<true>((vy - r.m) - r.log_s) - (COEF ? r.coef_c * c[r.y] : r.uniform) - r.tcls;
    if (CAP) d *= A(1) - (vy * inv_cap) * (vy * inv_cap);
    out[r.y] = Io<T>::store(d);
  }
}

// The fused forward's gradient of row i from what range_stats kept (its m and
// log_s already stored): p_k = e[k] · exp((bmax − m) − log_s) per block, no second read of
// the logits and no second exp per element. Reads only `keep`, so grad may
// be the logits' own storage here too.
template <typename T, bool CAP, bool COEF>
static void kept_grad_row(const Args& a, int64_t i, const Kept<typename Io<T>::acc>& keep) {
  using A = typename Io<T>::acc;
  T* out = static_cast<T*>(a.grad) + i * a.K;
  const A* c = static_cast<const A*>(a.c);
  const RowGrad<A> r = row_grad<T>(a, i);
  if (r.zeros) {
    const T zero = Io<T>::store(A(0));
    for (int64_t k = 0; k < a.K; ++k) out[k] = zero;
    return;
  }
  const A inv_cap = r.inv_cap;
  for (int64_t b = 0; b < a.K; b += kBlock) {
    const int64_t n = (a.K - b < kBlock) ? a.K - b : kBlock;
    RowGrad<A> rb = r;  // this block's: p_k = e[k] · exp((bmax − m) − log_s), y relative to b
    rb.coef_p = r.coef_p * exp_acc<true>((keep.bmax[b / kBlock] - r.m) - r.log_s);
    rb.y = r.y >= b && r.y < b + n ? r.y - b : -1;
    const A* e = keep.e + b;
    const A* v = CAP ? keep.v + b : nullptr;
    const A* cb = COEF ? c + b : nullptr;
    if constexpr (Wide<T>::on) {
      Wide<T>::template kept_grad<CAP, COEF>(e, v, cb, out + b, n, rb);
      continue;
    }
    const A cp = rb.coef_p;
    const int64_t yb = rb.y;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A d = cp * e[j] - (COEF ? r.coef_c * cb[j] : r.uniform);
      if (CAP) d *= A(1) - (v[j] * inv_cap) * (v[j] * inv_cap);
      out[b + j] = Io<T>::store(d);
    }
    if (yb >= 0) {
      A d = cp * e[yb] - (COEF ? r.coef_c * cb[yb] : r.uniform) - r.tcls;
      if (CAP) d *= A(1) - (v[yb] * inv_cap) * (v[yb] * inv_cap);
      out[b + yb] = Io<T>::store(d);
    }
  }
}

template <typename T, bool CAP, bool COEF>
static void backward_impl(const Args& a) {
  const int64_t N = a.N, K = a.K;
  const int64_t nb = blocks_per_row(a);
  const int64_t bw = block_width(a, nb);
  // Dynamic, as the split forward's blocks, for the same late-waking threads.
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic) if (parallel_worth(a))
  for (int64_t t = 0; t < N * nb; ++t) {
    const int64_t i = t / nb, k0 = (t % nb) * bw;
    const int64_t k1 = k0 + bw < K ? k0 + bw : K;
    if (k0 < K) backward_range<T, CAP, COEF>(a, i, k0, k1);
  }
}

// ---------------------------------------------------------------------------
// Entry points: pick the instantiation for (dtype, softcap?, coefficients?).

template <template <typename, bool, bool> class F, typename T>
static void by_options(const Args& a) {
  const bool cap = a.softcap != 0.0, coef = a.c != nullptr;
  if (cap && coef) F<T, true, true>::run(a);
  else if (cap) F<T, true, false>::run(a);
  else if (coef) F<T, false, true>::run(a);
  else F<T, false, false>::run(a);
}

template <template <typename, bool, bool> class F>
static void by_dtype(const Args& a) {
  switch (a.dtype) {
    case kF32: by_options<F, float>(a); break;
    case kF64: by_options<F, double>(a); break;
    case kBF16: by_options<F, bf16>(a); break;
    case kF16: by_options<F, _Float16>(a); break;
  }
}

template <typename T, bool CAP, bool COEF> struct Forward {
  static void run(const Args& a) { forward_impl<T, CAP, COEF>(a); }
};
template <typename T, bool CAP, bool COEF> struct Backward {
  static void run(const Args& a) { backward_impl<T, CAP, COEF>(a); }
};

void forward(const Args& a) { by_dtype<Forward>(a); }
void backward(const Args& a) { by_dtype<Backward>(a); }
