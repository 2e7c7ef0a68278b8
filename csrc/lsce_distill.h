// lsce C++ core: the distillation kernels (issue 16), templated on the
// storage types of the student (T) and of the teacher's logits (U), on
// whether there is a class weight (W), and on the divergence's form (MODE:
// forward KL at β = 0, reverse KL at β = 1, the skew Jensen–Shannon mixture
// in between). Formulas: lsce_distill_api.h.
//
// Included by kernels_{generic,avx2,avx512}.cpp after lsce_kernels.h (whose
// Io, exp_acc, log_acc, neg_inf and soft_shift of lsce_soft.h it uses),
// inside the same per-ISA namespace, so the plain loops below are vectorised
// once per instruction set. Every exp is of a quantity relative to a row (or
// block) max, never of an absolute log-sum-exp.
//
// Data flow per row i (a row is one task; rows are taken dynamically):
//   stats : blocks of kDistillBlock columns, each read once from memory (its
//           max, then its sums from L1); at β ∈ {0, 1} the divergence too,
//           as Σ t·((u − mt) − (z − m)) (or Σ s·(…)) relative to the block maxima
//   D, Q  : 0 < β < 1 only, one more read of the row (from L2 when fused)
//   grad  : one read of z and u, one write of grad (backward; and the fused
//           forward, right after the row's stats, while the row is in L2)
//
// Requires lsce_distill_api.h included before, and lsce_soft.h (soft_shift).

// Columns per block of the stats pass: a block of the student and one of the
// teacher (fp32: 2 × 8 KiB) stay in L1 between its two loops.
constexpr int64_t kDistillBlock = 2048;

enum DistillMode { kForwardKL = 0, kReverseKL = 1, kMixture = 2 };

// A compile-time flag for the generic lambdas that write a loop twice (T = 1 or not).
template <bool B> struct DistillFlag {
  static constexpr bool value = B;
};

static inline float log1p_acc(float x) { return __builtin_log1pf(x); }
static inline double log1p_acc(double x) { return __builtin_log1p(x); }

// What one block of a row's stats pass leaves: its maxima (zs, us: as shifts,
// 0 for a block of only −inf), s1 = Σ exp(z − zs), sT = Σ exp((z − zs)/T),
// st = Σ exp((u − us)/T), x = Σ t'·((u − us) − (z − zs)) at β = 0 (t' the
// unnormalised exp) or Σ s'·((z − zs) − (u − us)) at β = 1, dev = Σ w·(zs − z),
// wsum = Σ w over the block.
template <typename A> struct DistillBlock {
  A mz, mu, zs, us, s1, sT, st, x, dev, wsum;
};

// A row's statistics (the stats rows of DistillArgs) and its divergence.
template <typename A> struct DistillStats {
  A m, log_s1, log_sT, mt, log_st, Q, D, dev;
};

// What every row's loops need of the call.
template <typename A> struct DistillCall {
  A T, inv_T;
  A beta, keep_b, log_b, log_keep_b;  // β, 1 − β, log β, log(1 − β)
  A keep, uniform;                    // 1 − ε and ε / K
  A W;                                // Σ_k w_k
  bool one_t;                         // T = 1: the tempered student is p itself (one exp fewer)
};

template <typename A> static inline DistillCall<A> distill_call(const DistillArgs& a) {
  DistillCall<A> c;
  c.T = A(a.temperature);
  c.inv_T = A(1) / c.T;
  c.beta = A(a.beta);
  c.keep_b = A(1) - c.beta;
  c.log_b = a.beta > 0 ? log_acc(c.beta) : neg_inf<A>();
  c.log_keep_b = a.beta < 1 ? A(log1p_acc(-double(a.beta))) : neg_inf<A>();
  c.keep = A(1) - A(a.eps);
  c.uniform = A(a.eps) / A(a.K);
  c.W = A(a.weight_sum);
  c.one_t = a.temperature == 1.0;
  return c;
}

// The row statistics from its blocks (their shifts moved to the row maxima).
// A block without mass (s = 0: only −inf) adds nothing: its shift may be far
// from the row max, and 0 · exp(large) would be NaN.
template <typename A, int MODE>
static inline DistillStats<A> distill_combine(const DistillBlock<A>* bl, int64_t nblocks, const DistillCall<A>& c) {
  DistillStats<A> r;
  A m = neg_inf<A>(), mt = neg_inf<A>();
  for (int64_t b = 0; b < nblocks; ++b) {
    m = bl[b].mz > m || bl[b].mz != bl[b].mz ? bl[b].mz : m;
    mt = bl[b].mu > mt || bl[b].mu != bl[b].mu ? bl[b].mu : mt;
  }
  const A m0 = soft_shift(m), mt0 = soft_shift(mt);  // all −inf: sums of 0, log −inf
  A s1 = 0, sT = 0, st = 0, x = 0, dev = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const DistillBlock<A>& k = bl[b];
    const A dz = k.zs - m0, du = k.us - mt0;  // <= 0 for finite rows
    if (k.s1 != A(0)) s1 += k.s1 * exp_acc(dz);
    const A fz = k.sT != A(0) ? exp_acc(dz * c.inv_T) : A(0);
    const A fu = k.st != A(0) ? exp_acc(du * c.inv_T) : A(0);
    if (k.sT != A(0)) sT += k.sT * fz;
    if (k.st != A(0)) st += k.st * fu;
    // Σ t'·((u − mt) − (z − m)) = Σ_b fu·(x_b + st_b·(du − dz)), and the mirror image at β = 1.
    if (MODE == kForwardKL && k.st != A(0)) x += fu * (k.x + k.st * (du - dz));
    if (MODE == kReverseKL && k.sT != A(0)) x += fz * (k.x + k.sT * (dz - du));
    dev += k.dev + k.wsum * (m0 - k.zs);
  }
  r.m = m;
  r.mt = mt;
  r.log_s1 = log_acc(s1);
  r.log_sT = c.one_t ? r.log_s1 : log_acc(sT);
  r.log_st = log_acc(st);
  r.dev = dev;
  if (MODE == kForwardKL) r.D = x / (c.T * st) - r.log_st + r.log_sT;
  if (MODE == kReverseKL) r.D = x / (c.T * sT) - r.log_sT + r.log_st;
  if (MODE == kMixture) r.D = A(0);  // distill_mixture_pass
  r.Q = MODE == kReverseKL ? r.D : A(0);
  return r;
}

// The stats pass of row i: one read of z and u, block by block.
// With `keep` (the fused step at β = 0) it also stores each element's three
// exps (relative to its block's maxima) for distill_kept_grad_row.
template <typename A> struct DistillKept {
  A *e1, *eT, *et;
};

template <typename T, typename U, bool W, int MODE>
static DistillStats<typename Io<T>::acc> distill_stats(const DistillArgs& a, const T* z, const U* u,
                                                       const DistillCall<typename Io<T>::acc>& c,
                                                       DistillBlock<typename Io<T>::acc>* bl,
                                                       const DistillKept<typename Io<T>::acc>* keep = nullptr) {
  using A = typename Io<T>::acc;
  using B = typename Io<U>::acc;
  const A* w = static_cast<const A*>(a.weight);
  const int64_t K = a.K;
  const A inv_T = c.inv_T;
  const bool one_t = c.one_t;
  int64_t nb = 0;
  for (int64_t b = 0; b < K; b += kDistillBlock, ++nb) {
    const int64_t n = (K - b < kDistillBlock) ? K - b : kDistillBlock;
    const T* zb = z + b;
    const U* ub = u + b;
    A mz = neg_inf<A>(), mu = neg_inf<A>();
#pragma omp simd reduction(max : mz, mu)
    for (int64_t j = 0; j < n; ++j) {
      const A vz = Io<T>::load(zb[j]);
      const A vu = A(B(Io<U>::load(ub[j])));
      mz = vz > mz ? vz : mz;
      mu = vu > mu ? vu : mu;
    }
    DistillBlock<A>& k = bl[nb];
    k.mz = mz;
    k.mu = mu;
    k.zs = soft_shift(mz);
    k.us = soft_shift(mu);
    const A zs = k.zs, us = k.us;
    A s1 = 0, sT = 0, st = 0, x = 0, dev = 0, wsum = 0;
    A* k1 = keep ? keep->e1 + b : nullptr;
    A* kT = keep ? keep->eT + b : nullptr;
    A* kt = keep ? keep->et + b : nullptr;
    auto sums = [&](auto one) {
#pragma omp simd reduction(+ : s1, sT, st, x, dev, wsum)
      for (int64_t j = 0; j < n; ++j) {
        const A d = Io<T>::load(zb[j]) - zs;
        const A du = A(B(Io<U>::load(ub[j]))) - us;
        const A e1 = exp_acc<true>(d);
        const A eT = decltype(one)::value ? e1 : exp_acc<true>(d * inv_T);
        const A et = exp_acc<true>(du * inv_T);
        if (keep) k1[j] = e1, kT[j] = eT, kt[j] = et;
        s1 += e1;
        sT += eT;
        st += et;
        if (MODE == kForwardKL) x += et != A(0) ? et * (du - d) : A(0);  // 0·log 0 = 0; a NaN stays
        if (MODE == kReverseKL) x += eT != A(0) ? eT * (d - du) : A(0);
        const A wk = W ? w[b + j] : A(1);
        dev -= wk * d;
        wsum += wk;
      }
    };
    if (one_t) sums(DistillFlag<true>{});
    else sums(DistillFlag<false>{});
    // A NaN is dropped by the max but not by the exps: the sums carry it.
    k.s1 = s1;
    k.sT = sT;
    k.st = st;
    k.x = x;
    k.dev = dev;
    k.wsum = wsum;
  }
  return distill_combine<A, MODE>(bl, nb, c);
}

// The skew Jensen–Shannon terms of one element: adds its D term and returns
// s·q (0 where s = 0), with lm = logaddexp(log β + lt, log(1 − β) + ls).
// always_inline (as distill_grad_elem): a call inside the gradient loop keeps it scalar.
template <typename A>
__attribute__((always_inline)) static inline A distill_mix_terms(A ls, A lt, const DistillCall<A>& c, A& D) {
  const A s = exp_acc<true>(ls), t = exp_acc<true>(lt);
  const A ea = c.log_b + lt, eb = c.log_keep_b + ls;
  const A hi = ea > eb ? ea : eb, lo = ea > eb ? eb : ea;
  const A lm = hi == neg_inf<A>() ? hi : hi + log1p_acc(exp_acc<true>(lo - hi));
  D += c.keep_b * (t != A(0) ? t * (lt - lm) : A(0)) + c.beta * (s != A(0) ? s * (ls - lm) : A(0));
  const A mix = c.beta * t + c.keep_b * s;
  const A q = c.beta * (ls - lm) - c.keep_b * (c.keep_b * t + c.beta * s) / mix;
  return s != A(0) ? s * q : A(0);
}

// 0 < β < 1: D and Q = Σ s·q from one more read of the row, given its maxima and sums.
template <typename T, typename U>
static void distill_mixture_pass(const DistillArgs& a, const T* z, const U* u,
                                 const DistillCall<typename Io<T>::acc>& c,
                                 DistillStats<typename Io<T>::acc>& r) {
  using A = typename Io<T>::acc;
  using B = typename Io<U>::acc;
  A D = 0, Q = 0;
  for (int64_t k = 0; k < a.K; ++k) {
    const A ls = (Io<T>::load(z[k]) - r.m) * c.inv_T - r.log_sT;
    const A lt = (A(B(Io<U>::load(u[k]))) - r.mt) * c.inv_T - r.log_st;
    Q += distill_mix_terms(ls, lt, c, D);
  }
  r.D = D;
  r.Q = Q;
}

// What the gradient loops need of one row: grad_k = kd_k + hc·p_k − hu·w_k,
// with kd_k = gT·(s_k − t_k) (β = 0) or gT·(s_k·q_k − Q·s_k) (β > 0), and the
// true class's −tcls subtracted before its one store.
template <typename A> struct DistillGrad {
  A gT, hc, hu, tcls;
  int64_t y;   // the true class, or −1: none (no target)
  bool zeros;  // an ignored row
};

template <typename A>
static inline DistillGrad<A> distill_grad_coefs(const DistillArgs& a, int64_t i, const DistillCall<A>& c, A g, A h) {
  DistillGrad<A> r;
  const int64_t y = a.target ? a.target[i] : -1;
  r.zeros = a.target && y == a.ignore_index;
  r.y = a.target && !r.zeros ? y : -1;
  if (r.y < 0) h = A(0);  // no target: no ce
  const A wy = r.y < 0 ? A(0) : a.weight ? static_cast<const A*>(a.weight)[r.y] : A(1);
  r.gT = g * c.T;
  r.hc = h * (c.keep * wy + c.uniform * c.W);
  r.hu = h * c.uniform;
  r.tcls = h * c.keep * wy;
  return r;
}

// An ignored row's gradient: exact zeros, whatever its values.
template <typename T> static inline void distill_zero_row(T* out, int64_t K) {
  const T zero = Io<T>::store(typename Io<T>::acc(0));
  for (int64_t k = 0; k < K; ++k) out[k] = zero;
}

// The gradient of one element but for the true-class term.
template <int MODE, typename A>
__attribute__((always_inline)) static inline A distill_grad_elem(A zv, A uv, A wk, const DistillCall<A>& c, const DistillStats<A>& st,
                                  const DistillGrad<A>& gr) {
  const A d = zv - st.m;
  const A ls = d * c.inv_T - st.log_sT;
  const A lt = (uv - st.mt) * c.inv_T - st.log_st;
  const A s = exp_acc<true>(ls);
  const A p = exp_acc<true>(d - st.log_s1);
  A kd;
  if (MODE == kForwardKL) {
    kd = s - exp_acc<true>(lt);
  } else if (MODE == kReverseKL) {
    kd = (s != A(0) ? s * (ls - lt) : A(0)) - st.Q * s;
  } else {
    A unused = 0;
    kd = distill_mix_terms(ls, lt, c, unused) - st.Q * s;
  }
  return gr.gT * kd + gr.hc * p - gr.hu * wk;
}

// Row i's gradient for upstream (g, h), given its statistics: one read of z
// and u, one write. Every z[k] and u[k] is read before grad[k] is written and
// never after (the true class's values first), so grad may be the student.
template <typename T, typename U, bool W, int MODE>
static void distill_grad_row(const DistillArgs& a, int64_t i, const DistillCall<typename Io<T>::acc>& c,
                             const DistillStats<typename Io<T>::acc>& st, typename Io<T>::acc g,
                             typename Io<T>::acc h) {
  using A = typename Io<T>::acc;
  using B = typename Io<U>::acc;
  const int64_t K = a.K;
  const T* z = static_cast<const T*>(a.student) + i * a.row_stride;
  const U* u = static_cast<const U*>(a.teacher) + i * a.teacher_row_stride;
  T* out = static_cast<T*>(a.grad) + i * K;
  const A* w = static_cast<const A*>(a.weight);
  const DistillGrad<A> gr = distill_grad_coefs(a, i, c, g, h);
  if (gr.zeros) return distill_zero_row(out, K);
  const int64_t y = gr.y;
  const A zy = y >= 0 ? Io<T>::load(z[y]) : A(0);
  const A uy = y >= 0 ? A(B(Io<U>::load(u[y]))) : A(0);
  // Local copies: the stores to out could alias the caller's structs, which
  // would keep their fields loaded in the loop and the loop scalar.
  const DistillCall<A> cl = c;
  const DistillStats<A> sl = st;
  const DistillGrad<A> gl = gr;
  if (MODE == kForwardKL) {
    // Written out with scalars (gcc leaves the loop scalar through distill_grad_elem here).
    const A m = sl.m, mt = sl.mt, inv_T = cl.inv_T, log_sT = sl.log_sT, log_st = sl.log_st, log_s1 = sl.log_s1;
    const A gT = gl.gT, hc = gl.hc, hu = gl.hu;
    // T = 1 (p = s) as its own loop: a select on a loop-invariant flag keeps gcc from vectorising.
    auto loop = [&](auto one) {
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) {
        const A d = Io<T>::load(z[k]) - m;
        const A s = exp_acc<true>(d * inv_T - log_sT);
        const A t = exp_acc<true>((A(B(Io<U>::load(u[k]))) - mt) * inv_T - log_st);
        const A p = decltype(one)::value ? s : exp_acc<true>(d - log_s1);
        out[k] = Io<T>::store(gT * (s - t) + hc * p - hu * (W ? w[k] : A(1)));
      }
    };
    if (cl.one_t) loop(DistillFlag<true>{});
    else loop(DistillFlag<false>{});
  } else {
#pragma omp simd
    for (int64_t k = 0; k < K; ++k) {
      const A wk = W ? w[k] : A(1);
      out[k] = Io<T>::store(distill_grad_elem<MODE>(Io<T>::load(z[k]), A(B(Io<U>::load(u[k]))), wk, cl, sl, gl));
    }
  }
  if (y >= 0) out[y] = Io<T>::store(distill_grad_elem<MODE>(zy, uy, W ? w[y] : A(1), cl, sl, gl) - gl.tcls);
}

// The fused step's gradient of row i at β = 0 from what distill_stats kept:
// s_k = eT_k·fs_b, t_k = et_k·ft_b, p_k = e1_k·fp_b with per-block factors
// that move the block's exps to the row's maxima and normalise them; no read
// of z or u and no exp per element (the stats pass's three are the row's only ones).
template <typename T, bool W>
static void distill_kept_grad_row(const DistillArgs& a, int64_t i, const DistillCall<typename Io<T>::acc>& c,
                                  const DistillStats<typename Io<T>::acc>& st,
                                  const DistillBlock<typename Io<T>::acc>* bl,
                                  const DistillKept<typename Io<T>::acc>& keep, typename Io<T>::acc g,
                                  typename Io<T>::acc h) {
  using A = typename Io<T>::acc;
  const int64_t K = a.K;
  T* out = static_cast<T*>(a.grad) + i * K;
  const A* w = static_cast<const A*>(a.weight);
  const DistillGrad<A> gr = distill_grad_coefs(a, i, c, g, h);
  if (gr.zeros) return distill_zero_row(out, K);
  const A m0 = soft_shift(st.m), mt0 = soft_shift(st.mt);
  // A block without mass has exps of 0 only; its factor could overflow (0·inf),
  // so it is 0·log-sum instead: 0, or NaN where the row's sum is NaN (a NaN
  // anywhere in the row) or −inf (a row of only −inf), as the backward gives.
  const A none_s = A(0) * st.log_sT, none_t = A(0) * st.log_st, none_p = A(0) * st.log_s1;
  int64_t nb = 0;
  for (int64_t b = 0; b < K; b += kDistillBlock, ++nb) {
    const int64_t n = (K - b < kDistillBlock) ? K - b : kDistillBlock;
    const DistillBlock<A>& k = bl[nb];
    const A fs = k.sT != A(0) ? gr.gT * exp_acc<true>((k.zs - m0) * c.inv_T - st.log_sT) : none_s;
    const A ft = k.st != A(0) ? gr.gT * exp_acc<true>((k.us - mt0) * c.inv_T - st.log_st) : none_t;
    const A fp = k.s1 != A(0) ? gr.hc * exp_acc<true>((k.zs - m0) - st.log_s1) : none_p;
    const A* e1 = keep.e1 + b;
    const A* eT = keep.eT + b;
    const A* et = keep.et + b;
    const A* wb = W ? w + b : nullptr;
    const A hu = gr.hu;
    T* ob = out + b;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) ob[j] = Io<T>::store(fs * eT[j] - ft * et[j] + fp * e1[j] - hu * (W ? wb[j] : A(1)));
    if (gr.y >= b && gr.y < b + n) {
      const int64_t j = gr.y - b;
      ob[j] = Io<T>::store(fs * eT[j] - ft * et[j] + fp * e1[j] - hu * (W ? wb[j] : A(1)) - gr.tcls);
    }
  }
}

static inline bool distill_parallel_worth(const DistillArgs& a) { return a.N * a.K >= (int64_t(1) << 15); }

template <typename A> static inline A distill_upstream(const void* p, int64_t stride, int64_t i) {
  return static_cast<const A*>(p)[i * stride];
}

// kd, ce and the stats of every row; with a.grad also the gradient (the fused step).
template <typename T, typename U, bool W, int MODE>
static void distill_forward_impl(const DistillArgs& a) {
  using A = typename Io<T>::acc;
  const DistillCall<A> c = distill_call<A>(a);
  const int64_t N = a.N, K = a.K, nblocks = (K + kDistillBlock - 1) / kDistillBlock;
  A* kd = static_cast<A*>(a.kd);
  A* ce = static_cast<A*>(a.ce);
  A* stats = static_cast<A*>(a.stats);
#pragma omp parallel num_threads(a.nthreads) if (distill_parallel_worth(a))
  {
    DistillBlock<A>* blocks = new DistillBlock<A>[nblocks];
    // The fused step at β = 0 keeps the row's exps (3·K acc, in L2) for its gradient.
    const bool kept = a.grad && MODE == kForwardKL;
    A* scratch = kept ? new A[3 * K] : nullptr;
    const DistillKept<A> keep{scratch, scratch + K, scratch + 2 * K};
#pragma omp for schedule(dynamic)
    for (int64_t i = 0; i < N; ++i) {
      const T* z = static_cast<const T*>(a.student) + i * a.row_stride;
      const U* u = static_cast<const U*>(a.teacher) + i * a.teacher_row_stride;
      DistillStats<A> r = distill_stats<T, U, W, MODE>(a, z, u, c, blocks, kept ? &keep : nullptr);
      if (MODE == kMixture) distill_mixture_pass(a, z, u, c, r);
      const int64_t y = a.target ? a.target[i] : -1;
      const bool ignored = a.target && y == a.ignore_index;
      kd[i] = ignored ? A(0) : c.T * c.T * r.D;
      A loss = A(0);
      if (a.target && !ignored) {
        const A wy = W ? static_cast<const A*>(a.weight)[y] : A(1);
        loss = c.keep * wy * ((r.m - Io<T>::load(z[y])) + r.log_s1);
        if (a.eps > 0) loss += c.uniform * (c.W * r.log_s1 + r.dev);
      }
      ce[i] = loss;
      const A row[kDistillStats] = {r.m, r.log_s1, r.log_sT, r.mt, r.log_st, r.Q};
      for (int j = 0; j < kDistillStats; ++j) stats[j * N + i] = row[j];
      if (kept)
        distill_kept_grad_row<T, W>(a, i, c, r, blocks, keep, distill_upstream<A>(a.grad_kd, a.grad_kd_stride, i),
                                    distill_upstream<A>(a.grad_ce, a.grad_ce_stride, i));
      else if (a.grad)
        distill_grad_row<T, U, W, MODE>(a, i, c, r, distill_upstream<A>(a.grad_kd, a.grad_kd_stride, i),
                                        distill_upstream<A>(a.grad_ce, a.grad_ce_stride, i));
    }
    delete[] scratch;
    delete[] blocks;
  }
}

template <typename T, typename U, bool W, int MODE>
static void distill_backward_impl(const DistillArgs& a) {
  using A = typename Io<T>::acc;
  const DistillCall<A> c = distill_call<A>(a);
  const int64_t N = a.N;
  const A* stats = static_cast<const A*>(a.stats);
#pragma omp parallel for num_threads(a.nthreads) schedule(dynamic) if (distill_parallel_worth(a))
  for (int64_t i = 0; i < N; ++i) {
    DistillStats<A> r;
    r.m = stats[kStatM * N + i];
    r.log_s1 = stats[kStatLogS1 * N + i];
    r.log_sT = stats[kStatLogST * N + i];
    r.mt = stats[kStatMT * N + i];
    r.log_st = stats[kStatLogSt * N + i];
    r.Q = stats[kStatQ * N + i];
    distill_grad_row<T, U, W, MODE>(a, i, c, r, distill_upstream<A>(a.grad_kd, a.grad_kd_stride, i),
                                    distill_upstream<A>(a.grad_ce, a.grad_ce_stride, i));
  }
}

// ---------------------------------------------------------------------------
// Entry points: the instantiation for (student dtype, teacher dtype, weight?, β's form).

template <typename T, typename U, bool W>
static void distill_by_mode(const DistillArgs& a, bool backward) {
  const int mode = a.beta == 0.0 ? kForwardKL : a.beta == 1.0 ? kReverseKL : kMixture;
  switch (mode) {
    case kForwardKL:
      backward ? distill_backward_impl<T, U, W, kForwardKL>(a) : distill_forward_impl<T, U, W, kForwardKL>(a);
      break;
    case kReverseKL:
      backward ? distill_backward_impl<T, U, W, kReverseKL>(a) : distill_forward_impl<T, U, W, kReverseKL>(a);
      break;
    default:
      backward ? distill_backward_impl<T, U, W, kMixture>(a) : distill_forward_impl<T, U, W, kMixture>(a);
  }
}

template <typename T, typename U>
static void distill_by_weight(const DistillArgs& a, bool backward) {
  if (a.weight) distill_by_mode<T, U, true>(a, backward);
  else distill_by_mode<T, U, false>(a, backward);
}

template <typename T>
static void distill_by_teacher(const DistillArgs& a, bool backward) {
  switch (a.teacher_dtype) {
    case kF32: distill_by_weight<T, float>(a, backward); break;
    case kF64: distill_by_weight<T, double>(a, backward); break;
    case kBF16: distill_by_weight<T, bf16>(a, backward); break;
    case kF16: distill_by_weight<T, _Float16>(a, backward); break;
  }
}

static void distill_by_dtype(const DistillArgs& a, bool backward) {
  switch (a.dtype) {
    case kF32: distill_by_teacher<float>(a, backward); break;
    case kF64: distill_by_teacher<double>(a, backward); break;
    case kBF16: distill_by_teacher<bf16>(a, backward); break;
    case kF16: distill_by_teacher<_Float16>(a, backward); break;
  }
}

void distill_forward(const DistillArgs& a) { distill_by_dtype(a, false); }
void distill_backward(const DistillArgs& a) { distill_by_dtype(a, true); }
