// lsce C++ core: the AVX-512 versions of the hot loops of lsce_kernels.h.
//
// Included by lsce_kernels.h in the AVX-512 build only (kernels_avx512.cpp
// defines LSCE_AVX512 and includes <immintrin.h>). The loops of
// lsce_kernels.h are compute-bound on exp; written for the compiler's
// vectoriser, exp costs ~19 instructions per 16 floats. With intrinsics it
// costs ~10: 2^n by vscalefps (exact, saturating, NaN-preserving) instead of
// building the exponent bits and multiplying, one FMA for the Cody-Waite
// reduction, and a polynomial no longer than the result's precision needs.
// Each loop reads a chunk of 16 before it writes it and never re-reads it, so
// the gradient may be written over the logits (grad == logits).
//
// Requires lsce_kernels.h's Io, bf16, neg_inf and RowGrad, included before.

// ---------------------------------------------------------------------------
// 16 values of a storage type as fp32, and back. Partial chunks (the tail of
// a range) use masked loads and stores: nothing outside the range is touched.
template <typename T> struct Lanes;
template <> struct Lanes<float> {
  static inline __m512 load(const float* p, __mmask16 k, __m512 fill) { return _mm512_mask_loadu_ps(fill, k, p); }
  static inline void store(float* p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
  static inline void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
};
template <> struct Lanes<bf16> {
  static inline __m512 load(const bf16* p, __mmask16 k, __m512 fill) {
    const __m512i u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p));
    return _mm512_mask_mov_ps(fill, k, _mm512_castsi512_ps(_mm512_slli_epi32(u, 16)));
  }
  // Round to nearest even, NaN to 0x7FC0: bitwise Io<bf16>::store.
  static inline __m256i round(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
  }
  static inline void store(bf16* p, __mmask16 k, __m512 v) { _mm256_mask_storeu_epi16(p, k, round(v)); }
  static inline void stream(bf16* p, __m512 v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), round(v)); }
};
template <> struct Lanes<_Float16> {
  static inline __m512 load(const _Float16* p, __mmask16 k, __m512 fill) {
    return _mm512_mask_mov_ps(fill, k, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)));
  }
  static inline __m256i round(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static inline void store(_Float16* p, __mmask16 k, __m512 v) { _mm256_mask_storeu_epi16(p, k, round(v)); }
  static inline void stream(_Float16* p, __m512 v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), round(v)); }
};

// Lanes [0, n) of a chunk (n <= 16).
static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// ---------------------------------------------------------------------------
// exp for x <= 0 (and NaN, which it propagates): n = round(x / ln 2) by the
// 1.5·2^23 trick, f = x − n·ln 2 by FMA, e^f by a minimax polynomial on
// |f| <= ln2/2 (fitted with f32 coefficients), then vscalefps(e^f, n). Below
// -87 the result is exactly 0: the gradient of a -inf logit is 0, and in a
// sum such terms are below rounding. Measured against fp64 exp on [-87, 0]
// (fp32 inputs), by DEG:
//   6: ln 2 in two parts, <= 1.0 ulp (exp_acc: 0.84) where the value is
//      stored as fp32;
//   5: one FMA (its error n·1.9e-9 is a tenth of the rounding that x = z − m
//      already carries), <= 2.4 ulp on [-20, 0], 4.7 at -86: inside sums,
//      whose relative error stays below 2.4 ulp (0.15 ulp of the loss), and
//      in tanh16;
//   4: <= 46 ulp (2.8e-6), where it is stored in bf16/fp16 (1/1000 of their ulp).
template <int DEG>
static inline __m512 exp16(__m512 x) {
  const __m512 magic = _mm512_set1_ps(12582912.0f);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), magic), magic);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182464599609375f), x);
  if (DEG >= 6) f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-1.904654299957768e-09f), f);  // ln 2's low part
  __m512 p;
  if (DEG >= 6) {
    p = _mm512_set1_ps(0x1.6ae72p-10f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.126794p-7f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.555822p-5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.55541ap-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.fffffcp-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  } else if (DEG == 5) {
    p = _mm512_set1_ps(0x1.0fa82p-7f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.573a6cp-5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.555a6cp-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.fffdc6p-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.fffff6p-1f));
  } else {
    p = _mm512_set1_ps(0x1.5414c8p-5f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.57ced6p-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.0003f4p-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0x1.fffba6p-1f));
  }
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  // Lanes at or above -87, or NaN, keep their value; the rest (-inf included,
  // whose f is NaN) are 0.
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(keep, p, n);
}

// tanh(x) = sign(x)·(1 − e)/(1 + e) with e = e^-2|x| (exp's domain; e -> 0
// saturates to ±1), the division as rcp14 and one Newton step (a division
// costs more than the rest). Absolute error <= 1.6e-7 on [-10, 10] (tanh_acc:
// 0.9e-7; exp16<6> here would not lower it and costs 6% more).
static inline __m512 tanh16(__m512 x) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = exp16<5>(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 den = _mm512_add_ps(one, e);
  __m512 r = _mm512_rcp14_ps(den);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.0f)));
  const __m512 t = _mm512_mul_ps(_mm512_sub_ps(one, e), r);
  return _mm512_xor_ps(t, _mm512_xor_ps(x, ax));  // x ^ |x| is x's sign bit
}

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
static inline float hmax(__m512 v) { return _mm512_reduce_max_ps(v); }

// ---------------------------------------------------------------------------
// The loops. Wide<T>::on tells lsce_kernels.h to use them for T.
template <typename T> struct Wide {
  static constexpr bool on = true;

  // Softcap's first pass over z[0:n]: buf[j] = cap·tanh(z[j]/cap); returns their max.
  static inline void capped_max(const T* z, float* buf, int64_t n, float cap, float& m) {
    const __m512 vcap = _mm512_set1_ps(cap), vinv = _mm512_set1_ps(1.0f / cap);
    __m512 vm = _mm512_set1_ps(neg_inf<float>());
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = first_lanes(n - j);
      const __m512 v = _mm512_mul_ps(vcap, tanh16(_mm512_mul_ps(Lanes<T>::load(z + j, k, vinv), vinv)));
      _mm512_mask_storeu_ps(buf + j, k, v);
      vm = _mm512_mask_max_ps(vm, k, vm, v);
    }
    m = hmax(vm);
  }

  // Adds c[j]·d (or d without coefficients, c null) to vd in lanes k: the
  // smoothing term's Σ c·(v − reference), from the subtraction exp needs.
  static inline __m512 dot_add(__m512 vd, const float* c, int64_t j, __mmask16 k, __m512 d) {
    return c ? _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(k, c + j), d, vd, k) : _mm512_mask_add_ps(vd, k, vd, d);
  }

  // Σ exp(v[j] − m) over j < n, v = buf[j] when buf is set, else z[j]; m > -inf;
  // and dot = Σ c[j]·(m − v[j]) (Σ (m − v[j]) with c null).
  // This pass runs from L1, and without loads that miss the hardware
  // prefetcher stops: it prefetches the n values after z[0:n] (the next block,
  // or the next row), so that memory and exp overlap instead of taking turns.
  // exp_sum_keep also stores each term in e[j], for the fused gradient. Both
  // use the exp that a stored fp32 gradient needs (degree 6) where T is fp32,
  // so that the loss is the same bits whether or not the forward is fused.
  static constexpr int kSumDeg = sizeof(T) == 4 ? 6 : 5;
  template <bool KEEP>
  static inline float exp_sum_impl(const T* z, const float* buf, int64_t n, float m, const float* c, float* e,
                                   float& dot) {
    const __m512 vm = _mm512_set1_ps(m), ninf = _mm512_set1_ps(neg_inf<float>());
    __m512 s = _mm512_setzero_ps(), vd = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(z + n + j), _MM_HINT_T0);
      const __mmask16 k = first_lanes(n - j);
      const __m512 v = buf ? _mm512_mask_loadu_ps(ninf, k, buf + j) : Lanes<T>::load(z + j, k, ninf);
      const __m512 d = _mm512_sub_ps(v, vm);
      const __m512 x = exp16<kSumDeg>(d);
      if (KEEP) _mm512_mask_storeu_ps(e + j, k, x);
      s = _mm512_add_ps(s, x);
      vd = dot_add(vd, c, j, k, d);
    }
    dot = -hsum(vd);
    return hsum(s);
  }
  // One pass over z[0:n] for range_stats: Σ exp(z[j] − r) for a reference r
  // (not this block's max), and the block's max m and
  // dot = Σ (c[j]·) (r − z[j]); each term into e[j] when e is set.
  static inline float exp_sum_ref(const T* z, int64_t n, float r, const float* c, float* e, float& m, float& dot) {
    const __m512 vr = _mm512_set1_ps(r), ninf = _mm512_set1_ps(neg_inf<float>());
    __m512 s = _mm512_setzero_ps(), vm = ninf, vd = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(z + n + j), _MM_HINT_T0);
      const __mmask16 k = first_lanes(n - j);
      const __m512 v = Lanes<T>::load(z + j, k, ninf);
      vm = _mm512_max_ps(vm, v);  // NaN: the block may be kept, and the NaN reaches the sum
      const __m512 d = _mm512_sub_ps(v, vr);
      const __m512 x = exp16<kSumDeg>(d);
      if (e) _mm512_mask_storeu_ps(e + j, k, x);
      s = _mm512_add_ps(s, x);
      vd = dot_add(vd, c, j, k, d);
    }
    m = hmax(vm);
    dot = -hsum(vd);
    return hsum(s);
  }
  // exp_sum_ref's term for one value x, bitwise the same as in its lanes.
  static inline float exp1(float x) { return _mm512_cvtss_f32(exp16<kSumDeg>(_mm512_set1_ps(x))); }

  static inline float exp_sum(const T* z, const float* buf, int64_t n, float m, const float* c, float& dot) {
    return exp_sum_impl<false>(z, buf, n, m, c, nullptr, dot);
  }
  static inline float exp_sum_keep(const T* z, const float* buf, int64_t n, float m, const float* c, float* e,
                                   float& dot) {
    return exp_sum_impl<true>(z, buf, n, m, c, e, dot);
  }

  // A row's RowGrad broadcast to 16 lanes, once per loop (y stays scalar).
  struct Row16 {
    __m512 m, log_s, p, c, u, t, cap, inv;  // m, log_s, coef_p, coef_c, uniform, tcls, cap, inv_cap
    int64_t y;
    bool stream;
    explicit Row16(const RowGrad<float>& r)
        : m(_mm512_set1_ps(r.m)), log_s(_mm512_set1_ps(r.log_s)), p(_mm512_set1_ps(r.coef_p)), c(_mm512_set1_ps(r.coef_c)),
          u(_mm512_set1_ps(r.uniform)), t(_mm512_set1_ps(r.tcls)), cap(_mm512_set1_ps(r.cap)),
          inv(_mm512_set1_ps(r.inv_cap)), y(r.y), stream(r.stream) {}
  };

  // The end of the gradient of the chunk at j (out and c point at the range's
  // start), from p: coef_p·p minus the smoothing term (coef_c·c or uniform)
  // and, in lane y − j, the true-class term; times dcap = 1 − t² with softcap
  // (t = v / cap); stores lanes k.
  // stream: non-temporal stores for a gradient far larger than the caches,
  // which then costs a write instead of a read for ownership and a write
  // (fp32 1.3x faster); a smaller one stays in cache for its next reader.
  template <bool CAP, bool COEF>
  static inline void put(T* out, const float* c, int64_t j, __mmask16 k, __m512 p, __m512 t, const Row16& r) {
    __m512 d = _mm512_fmsub_ps(r.p, p, COEF ? _mm512_mul_ps(r.c, _mm512_maskz_loadu_ps(k, c + j)) : r.u);
    if (uint64_t(r.y - j) < 16) d = _mm512_mask_sub_ps(d, __mmask16(1u << (r.y - j)), d, r.t);
    if (CAP) d = _mm512_mul_ps(d, _mm512_fnmadd_ps(t, t, _mm512_set1_ps(1.0f)));
    if (r.stream && k == 0xFFFF && (reinterpret_cast<uintptr_t>(out + j) & (16 * sizeof(T) - 1)) == 0)
      Lanes<T>::stream(out + j, d);
    else
      Lanes<T>::store(out + j, k, d);
  }

  // grad[k] over [k0, k1) as RowGrad says (r.y absolute, or -1): the backward
  // of lsce_kernels.h in one pass, the true-class term subtracted in fp32 in
  // the same lane (no second read of z[y]). The loop prefetches z 2 KiB ahead
  // (measured: bf16 1.4x, softcap 1.2x faster).
  template <bool CAP, bool COEF>
  static inline void grad(const T* z, T* out, const float* c, int64_t k0, int64_t k1, const RowGrad<float>& row) {
    const Row16 r(row);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t j = k0; j < k1; j += 16) {
      _mm_prefetch(reinterpret_cast<const char*>(z + j) + 2048, _MM_HINT_T0);
      const __mmask16 k = first_lanes(k1 - j);
      __m512 v = Lanes<T>::load(z + j, k, zero), t = zero;
      if (CAP) {
        t = tanh16(_mm512_mul_ps(v, r.inv));
        v = _mm512_mul_ps(r.cap, t);
      }
      // (v − m) − log_s: relative to the row max (one subtraction more than
      // v − lse, which an absolute lse rounded to fp32 would make inexact).
      const __m512 p = exp16<sizeof(T) == 4 ? 6 : 4>(_mm512_sub_ps(_mm512_sub_ps(v, r.m), r.log_s));
      put<CAP, COEF>(out, c, j, k, p, t, r);
    }
    if (r.stream) _mm_sfence();  // non-temporal stores are weakly ordered: visible before the kernel returns
  }

  // The fused forward's gradient of n elements from the kept e = exp(v − bmax)
  // (row.coef_p = coef_p·exp((bmax − m) − log_s), row.y relative to e) and, with
  // softcap, the kept v.
  template <bool CAP, bool COEF>
  static inline void kept_grad(const float* e, const float* v, const float* c, T* out, int64_t n,
                               const RowGrad<float>& row) {
    const Row16 r(row);
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 k = first_lanes(n - j);
      const __m512 t = CAP ? _mm512_mul_ps(_mm512_maskz_loadu_ps(k, v + j), r.inv) : zero;
      put<CAP, COEF>(out, c, j, k, _mm512_maskz_loadu_ps(k, e + j), t, r);
    }
    if (r.stream) _mm_sfence();
  }
};
template <> struct Wide<double> {
  static constexpr bool on = false;
};
