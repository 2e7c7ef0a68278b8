// lsce C++ core: the probability-target (soft) kernels, templated on the
// storage types of the logits (T) and of the target (U).
//
// Included by kernels_{generic,avx2,avx512}.cpp after lsce_kernels.h (whose
// Io, exp_acc, log_acc, capped, neg_inf, merge, Part and kBlock it uses),
// inside the same per-ISA namespace, so the plain loops below are vectorised
// once per instruction set. Formulas: lsce_soft_api.h. Every quantity is
// formed relative to the row max: Σ a_k·(m − zc_k) is a sum of terms >= 0
// for a target >= 0 (no cancellation, no overflow of Σ a_k·zc_k), and p_k is
// exp((zc_k − m) − log_s), never exp(zc_k − lse) with an absolute lse.
//
// Data flow per row i:
//   forward : one read of z[i, :] and t[i, :]      -> loss, m, log_s, mass (acc)
//   backward: one read of z[i, :] and t[i, :], one write of grad[i, :]
//             (and of grad_target[i, :] when asked for)
// Rows are not split across threads (unlike the class-index kernels): a row
// is one task, so fewer rows than threads leave threads idle.
//
// Requires lsce_soft_api.h included before.

// Running statistics of the prefix of a row: (m, s) as Part (s = Σ exp(zc − m)),
// the target mass Σ a_k, and dev = Σ a_k·(ref − zc_k) relative to ref, the
// largest finite block max so far (-inf: none yet).
template <typename A> struct SoftPart {
  Part<A> ms;
  A mass, dev, ref;
};

// The exp shift of a block whose max is mb: mb itself, or 0 when mb is -inf
// (only -inf and NaN: exp(-inf − (-inf)) would be NaN). A +inf max stays:
// exp(inf − inf) = NaN is the row's NaN, as log_softmax gives.
template <typename A> static inline A soft_shift(A mb) { return mb == neg_inf<A>() ? A(0) : mb; }

// Folds the statistics of one block (s and dev relative to its shift) into p.
// dev of a block without a finite max holds only ±inf or NaN terms (a_k times
// an infinite or NaN distance): it is added as it is, whatever the reference.
template <typename A>
static inline void soft_merge(SoftPart<A>& p, A mb, A s, A mass, A dev) {
  merge(p.ms, Part<A>{mb, s, A(0), A(0)});  // only m and s are read (dot and cs stay 0)
  const A before = p.mass;
  p.mass += mass;
  if (mb - mb != A(0)) {  // ±inf or NaN
    p.dev += dev;
  } else if (p.ref == neg_inf<A>()) {
    p.dev += dev;
    p.ref = mb;
  } else if (mb > p.ref) {  // re-reference the prefix: each added term >= 0 for a target >= 0
    p.dev = p.dev + before * (mb - p.ref) + dev;
    p.ref = mb;
  } else {
    p.dev += dev + mass * (p.ref - mb);
  }
}

// What a row's loops need of the call.
template <typename A> struct SoftRow {
  A cap, inv_cap;  // softcap and 1 / softcap (0 without)
  A keep_t;        // 1 − ε: the target's share of a_k
  A uniform;       // ε / K: the smoothing share of a_k
};

template <typename A> static inline SoftRow<A> soft_row(const SoftArgs& a) {
  SoftRow<A> r;
  r.cap = A(a.softcap);
  r.inv_cap = a.softcap != 0.0 ? A(1) / r.cap : A(0);
  r.keep_t = A(1) - A(a.eps);
  r.uniform = A(a.eps) / A(a.K);
  return r;
}

// Kept by the fused forward for a row's gradient: per element e = exp(zc − shift)
// and a_k (and zc with softcap), per block its shift. Row-sized, one per thread.
template <typename A> struct SoftKept {
  A* e;
  A* a;
  A* v;
  A* shift;
};

// Statistics of one row from one read of z and t (z, t point at the row's start).
template <typename T, typename U, bool CAP, bool W>
static SoftPart<typename Io<T>::acc> soft_row_stats(const T* z, const U* t, const typename Io<T>::acc* w,
                                                    int64_t K, const SoftRow<typename Io<T>::acc>& r,
                                                    const SoftKept<typename Io<T>::acc>* keep) {
  using A = typename Io<T>::acc;
  SoftPart<A> p{Part<A>{neg_inf<A>(), A(0), A(0)}, A(0), A(0), neg_inf<A>()};
  alignas(64) A block_buf[CAP ? kBlock : 1];
  const A cap = r.cap, inv_cap = r.inv_cap, keep_t = r.keep_t, uniform = r.uniform;
  for (int64_t b = 0; b < K; b += kBlock) {
    const int64_t n = (K - b < kBlock) ? K - b : kBlock;
    const T* zb = z + b;
    const U* tb = t + b;
    A* buf = keep && CAP ? keep->v + b : block_buf;
    // Pass 1: the block's max (capped values into buf).
    A mb = neg_inf<A>();
#pragma omp simd reduction(max : mb)
    for (int64_t j = 0; j < n; ++j) {
      const A v = capped<CAP>(Io<T>::load(zb[j]), cap, inv_cap);
      if (CAP) buf[j] = v;
      mb = v > mb ? v : mb;
    }
    // Pass 2, from L1: Σ exp(zc − shift), Σ a, Σ a·(shift − zc).
    const A shift = soft_shift(mb);
    A s = A(0), mass = A(0), dev = A(0);
    if (keep) {
      A* e = keep->e + b;
      A* ak = keep->a + b;
      keep->shift[b / kBlock] = shift;
#pragma omp simd reduction(+ : s, mass, dev)
      for (int64_t j = 0; j < n; ++j) {
        const A v = CAP ? buf[j] : Io<T>::load(zb[j]);
        const A x = exp_acc<true>(v - shift);
        const A a = (W ? w[b + j] : A(1)) * (keep_t * Io<U>::load(tb[j]) + uniform);
        e[j] = x;
        ak[j] = a;
        s += x;
        mass += a;
        dev += a * (shift - v);
      }
    } else {
#pragma omp simd reduction(+ : s, mass, dev)
      for (int64_t j = 0; j < n; ++j) {
        const A v = CAP ? buf[j] : Io<T>::load(zb[j]);
        const A a = (W ? w[b + j] : A(1)) * (keep_t * Io<U>::load(tb[j]) + uniform);
        s += exp_acc<true>(v - shift);
        mass += a;
        dev += a * (shift - v);
      }
    }
    soft_merge(p, mb, s, mass, dev);
  }
  return p;
}

// Turns row i's statistics into loss, m, log_s and mass. Returns (m, log_s).
template <typename A>
static inline void soft_finish(const SoftArgs& a, int64_t i, const SoftPart<A>& p, A& m, A& log_s) {
  m = p.ms.m;
  log_s = log_acc(p.ms.s);  // all -inf: -inf (the loss is then NaN, as log_softmax's); any NaN or +inf: NaN
  A loss = p.dev + p.mass * log_s;
  if (a.z_loss > 0) loss += A(a.z_loss) * (m + log_s) * (m + log_s);
  static_cast<A*>(a.loss)[i] = loss;
  static_cast<A*>(a.m)[i] = m;
  static_cast<A*>(a.log_s)[i] = log_s;
  static_cast<A*>(a.mass)[i] = p.mass;
}

// The coefficient of p_k in row i's gradient: g·(A + 2λ·lse) + h.
template <typename A>
static inline A soft_coef_p(const SoftArgs& a, int64_t i, A g, A m, A log_s, A mass) {
  A cp = g * mass;
  if (a.z_loss > 0) cp += g * A(2) * A(a.z_loss) * (m + log_s);
  if (a.grad_lse) cp += static_cast<const A*>(a.grad_lse)[i * a.grad_lse_stride];
  return cp;
}

static inline bool soft_parallel_worth(const SoftArgs& a) { return a.N * a.K >= (int64_t(1) << 15); }

// The fused forward's gradient of a row from what soft_row_stats kept:
// p_k = e_k · exp(shift_b − m − log_s) per block; no second read of z or t.
template <typename T, bool CAP>
static void soft_kept_grad_row(const SoftArgs& a, int64_t i, const SoftKept<typename Io<T>::acc>& keep,
                               typename Io<T>::acc m, typename Io<T>::acc log_s, typename Io<T>::acc mass,
                               const SoftRow<typename Io<T>::acc>& r) {
  using A = typename Io<T>::acc;
  T* out = static_cast<T*>(a.grad) + i * a.K;
  const A g = static_cast<const A*>(a.grad_loss)[i * a.grad_loss_stride];
  const A cp = soft_coef_p(a, i, g, m, log_s, mass);
  const A inv_cap = r.inv_cap;
  for (int64_t b = 0; b < a.K; b += kBlock) {
    const int64_t n = (a.K - b < kBlock) ? a.K - b : kBlock;
    const A cpb = cp * exp_acc<true>((keep.shift[b / kBlock] - m) - log_s);
    const A* e = keep.e + b;
    const A* ak = keep.a + b;
    const A* v = CAP ? keep.v + b : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      A d = cpb * e[j] - g * ak[j];
      if (CAP) d *= A(1) - (v[j] * inv_cap) * (v[j] * inv_cap);
      out[b + j] = Io<T>::store(d);
    }
  }
}

template <typename T, typename U, bool CAP, bool W>
static void soft_forward_impl(const SoftArgs& a) {
  using A = typename Io<T>::acc;
  const SoftRow<A> r = soft_row<A>(a);
  const A* w = static_cast<const A*>(a.weight);
  const int64_t N = a.N, K = a.K, nblocks = (K + kBlock - 1) / kBlock;
#pragma omp parallel num_threads(a.nthreads) if (soft_parallel_worth(a))
  {
    A* scratch = a.grad ? new A[(CAP ? 3 : 2) * K + nblocks] : nullptr;
    const SoftKept<A> keep{scratch, scratch + K, CAP ? scratch + 2 * K : nullptr, scratch + (CAP ? 3 : 2) * K};
#pragma omp for schedule(static)
    for (int64_t i = 0; i < N; ++i) {
      const T* z = static_cast<const T*>(a.logits) + i * a.row_stride;
      const U* t = static_cast<const U*>(a.target) + i * a.target_row_stride;
      const SoftPart<A> p = soft_row_stats<T, U, CAP, W>(z, t, w, K, r, scratch ? &keep : nullptr);
      A m, log_s;
      soft_finish(a, i, p, m, log_s);
      if (scratch) soft_kept_grad_row<T, CAP>(a, i, keep, m, log_s, p.mass, r);
    }
    delete[] scratch;
  }
}

// Every z[k] and t[k] is read before grad[k] (grad_target[k]) is written and
// never after, so the gradients may be written over the logits (the target).
template <typename T, typename U, bool CAP, bool W, bool GT>
static void soft_backward_impl(const SoftArgs& a) {
  using A = typename Io<T>::acc;
  const SoftRow<A> r = soft_row<A>(a);
  const A* w = static_cast<const A*>(a.weight);
  const A cap = r.cap, inv_cap = r.inv_cap, keep_t = r.keep_t, uniform = r.uniform;
  const int64_t N = a.N, K = a.K;
#pragma omp parallel for num_threads(a.nthreads) schedule(static) if (soft_parallel_worth(a))
  for (int64_t i = 0; i < N; ++i) {
    const T* z = static_cast<const T*>(a.logits) + i * a.row_stride;
    const U* t = static_cast<const U*>(a.target) + i * a.target_row_stride;
    T* out = static_cast<T*>(a.grad) + i * K;
    U* out_t = GT ? static_cast<U*>(a.grad_target) + i * K : nullptr;
    const A m = static_cast<const A*>(a.m)[i], log_s = static_cast<const A*>(a.log_s)[i];
    const A g = static_cast<const A*>(a.grad_loss)[i * a.grad_loss_stride];
    const A cp = soft_coef_p(a, i, g, m, log_s, static_cast<const A*>(a.mass)[i]);
    const A gt = g * keep_t;  // ∂loss/∂t_k = g·(1 − ε)·w_k·(m − zc_k + log_s)
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const A v = capped<CAP>(Io<T>::load(z[k]), cap, inv_cap);
      const A wk = W ? w[k] : A(1);
      const A ak = wk * (keep_t * Io<U>::load(t[k]) + uniform);
      A d = cp * exp_acc<true>((v - m) - log_s) - g * ak;
      if (CAP) d *= A(1) - (v * inv_cap) * (v * inv_cap);
      if (GT) out_t[k] = Io<U>::store(typename Io<U>::acc(gt * wk * ((m - v) + log_s)));
      out[k] = Io<T>::store(d);
    }
  }
}

// ---------------------------------------------------------------------------
// Entry points: the instantiation for (dtype, target dtype, softcap?, weight?[, target gradient?]).

template <typename T, typename U>
static void soft_by_options(const SoftArgs& a, bool backward) {
  const bool cap = a.softcap != 0.0, w = a.weight != nullptr, gt = a.grad_target != nullptr;
  if (!backward) {
    if (cap && w) soft_forward_impl<T, U, true, true>(a);
    else if (cap) soft_forward_impl<T, U, true, false>(a);
    else if (w) soft_forward_impl<T, U, false, true>(a);
    else soft_forward_impl<T, U, false, false>(a);
  } else if (gt) {
    if (cap && w) soft_backward_impl<T, U, true, true, true>(a);
    else if (cap) soft_backward_impl<T, U, true, false, true>(a);
    else if (w) soft_backward_impl<T, U, false, true, true>(a);
    else soft_backward_impl<T, U, false, false, true>(a);
  } else {
    if (cap && w) soft_backward_impl<T, U, true, true, false>(a);
    else if (cap) soft_backward_impl<T, U, true, false, false>(a);
    else if (w) soft_backward_impl<T, U, false, true, false>(a);
    else soft_backward_impl<T, U, false, false, false>(a);
  }
}

template <typename T>
static void soft_by_target(const SoftArgs& a, bool backward) {
  switch (a.target_dtype) {
    case kF32: soft_by_options<T, float>(a, backward); break;
    case kF64: soft_by_options<T, double>(a, backward); break;
    case kBF16: soft_by_options<T, bf16>(a, backward); break;
    case kF16: soft_by_options<T, _Float16>(a, backward); break;
  }
}

static void soft_by_dtype(const SoftArgs& a, bool backward) {
  switch (a.dtype) {
    case kF32: soft_by_target<float>(a, backward); break;
    case kF64: soft_by_target<double>(a, backward); break;
    case kBF16: soft_by_target<bf16>(a, backward); break;
    case kF16: soft_by_target<_Float16>(a, backward); break;
  }
}

void soft_forward(const SoftArgs& a) { soft_by_dtype(a, false); }
void soft_backward(const SoftArgs& a) { soft_by_dtype(a, true); }
