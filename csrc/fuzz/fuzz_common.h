// Storage, canaries, exact-size blocks, the seeded generator and the driver
// loop shared by the sanitizer fuzz drivers (fuzz_kernels.cpp, fuzz_soft.cpp,
// fuzz_distill.cpp). Each driver includes it inside its own anonymous
// namespace, after <chrono>, <cstring>, <cstdio>, <cstdlib>, <cmath>, <random>,
// <string>, <vector> and lsce_api.h.
#pragma once

// ---------------------------------------------------------------- storage

int item_size(int dtype) {
  static const int s[] = {4, 8, 2, 2};
  return s[dtype];
}
bool acc_is_double(int dtype) { return dtype == lsce::kF64; }

uint16_t bf16_from_float(float f) {  // round to nearest even, NaN kept NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return 0x7FC0;
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
float float_from_bf16(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Stores x (double) as element i of a buffer of `dtype`, rounding as a
// conversion would; returns the value actually stored, as a double.
double store(void* buf, int64_t i, int dtype, double x) {
  switch (dtype) {
    case lsce::kF32: {
      float v = float(x);
      static_cast<float*>(buf)[i] = v;
      return v;
    }
    case lsce::kF64:
      static_cast<double*>(buf)[i] = x;
      return x;
    case lsce::kBF16: {
      uint16_t b = bf16_from_float(float(x));
      static_cast<uint16_t*>(buf)[i] = b;
      return float_from_bf16(b);
    }
    default: {
      _Float16 h = _Float16(float(x));
      static_cast<_Float16*>(buf)[i] = h;
      return double(float(h));
    }
  }
}
double load(const void* buf, int64_t i, int dtype) {
  switch (dtype) {
    case lsce::kF32: return static_cast<const float*>(buf)[i];
    case lsce::kF64: return static_cast<const double*>(buf)[i];
    case lsce::kBF16: return float_from_bf16(static_cast<const uint16_t*>(buf)[i]);
    default: return double(float(static_cast<const _Float16*>(buf)[i]));
  }
}

// NaN bit patterns with payloads the kernels never produce (their NaNs come
// from arithmetic, as the default quiet NaN, or from the logits' own NaNs,
// which this driver writes as default NaNs): one marks the row padding, the
// other output not yet written. `dtype` is a Dtype code (the loss and lse
// use the accumulation type: kF32 or kF64).
void put_payload(void* buf, int64_t i, int dtype, int which) {
  switch (dtype) {
    case lsce::kF32: {
      const uint32_t v = which ? 0x7FA5A5A5u : 0x7F8C0FFEu;
      std::memcpy(static_cast<char*>(buf) + 4 * i, &v, 4);
      break;
    }
    case lsce::kF64: {
      const uint64_t v = which ? 0x7FF5A5A5A5A5A5A5ull : 0x7FF0C0FFEE00BEEFull;
      std::memcpy(static_cast<char*>(buf) + 8 * i, &v, 8);
      break;
    }
    case lsce::kBF16:
      static_cast<uint16_t*>(buf)[i] = which ? 0x7FA5 : 0x7F8D;  // the kernels store NaN as 0x7FC0
      break;
    default:
      static_cast<uint16_t*>(buf)[i] = which ? 0x7D5A : 0x7E35;
  }
}
bool has_payload(const void* buf, int64_t i, int dtype, int which) {
  unsigned char tmp[8];
  put_payload(tmp, 0, dtype, which);
  const int n = item_size(dtype);
  return std::memcmp(static_cast<const unsigned char*>(buf) + int64_t(n) * i, tmp, size_t(n)) == 0;
}
const int kPadding = 0, kUnwritten = 1;

// An exactly sized heap block (ASan reports an access one byte past its end;
// a 0-byte block has no byte to read).
struct Block {
  void* p;
  size_t bytes;
  explicit Block(size_t n) : p(std::malloc(n)), bytes(n) {
    if (!p && n == 0) p = std::malloc(1);
    if (!p) {
      std::fprintf(stderr, "fuzz_kernels: out of memory (%zu bytes)\n", n);
      std::exit(2);
    }
  }
  ~Block() { std::free(p); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;
};

// ---------------------------------------------------------------- random cases

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  uint64_t u64() { return g(); }
  int64_t range(int64_t lo, int64_t hi) {  // inclusive
    return lo + int64_t(u64() % uint64_t(hi - lo + 1));
  }
  double uniform() { return double(u64() >> 11) * (1.0 / 9007199254740992.0); }
  bool chance(double p) { return uniform() < p; }
  double normal() {
    double u1 = uniform(), u2 = uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  template <typename T, size_t n> T pick(const T (&a)[n]) { return a[size_t(u64() % n)]; }
};

// ---------------------------------------------------------------- the driver loop

// The main of a driver (fuzz_soft.cpp, fuzz_distill.cpp): --seed S --seconds T
// --case I --verbose; the instruction sets this CPU has; cases drawn and run
// until the time is up (or the one case asked for). draw(Rng&, isas) -> Case,
// run(case, case_seed) -> bool, describe(case, seed, index) on a failure (and
// with --verbose), tally(case) after each passed case, summary() the counts it
// keeps for the last line, which ends in "no failure". Needs <chrono>, <string>,
// <vector> and the kernels' lsce::set_isa.
const char* const kFuzzIsaNames[] = {"generic", "avx2", "avx512"};

template <typename Draw, typename Run, typename Describe, typename Tally, typename Summary>
int fuzz_main(int argc, char** argv, const char* name, Draw draw, Run run, Describe describe, Tally tally,
              Summary summary) {
  uint64_t seed = 1;
  int64_t only = -1;
  double seconds = 30;
  bool verbose = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc && a != "--verbose") { std::fprintf(stderr, "%s: %s needs a value\n", name, a.c_str()); return 2; }
    if (a == "--seed") seed = std::strtoull(argv[++i], nullptr, 10);
    else if (a == "--seconds") seconds = std::strtod(argv[++i], nullptr);
    else if (a == "--case") only = std::strtoll(argv[++i], nullptr, 10);
    else if (a == "--verbose") verbose = true;
    else { std::fprintf(stderr, "usage: %s [--seed S] [--seconds T] [--case I] [--verbose]\n", name); return 2; }
  }
  std::vector<int> isas;
  for (int k = 0; k < 3; ++k)
    if (lsce::set_isa(kFuzzIsaNames[k])) isas.push_back(k);
  lsce::set_isa("auto");
  std::printf("%s: seed %llu, instruction sets:", name, (unsigned long long)seed);
  for (int k : isas) std::printf(" %s", kFuzzIsaNames[k]);
  std::printf("\n");
  const auto t0 = std::chrono::steady_clock::now();
  int64_t done = 0;
  for (int64_t index = (only >= 0 ? only : 0); only < 0 || index == only; ++index) {
    if (only < 0 && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > seconds) break;
    const uint64_t case_seed = seed * 0x100000001B3ull + uint64_t(index) * 0x9E3779B97F4A7C15ull;
    Rng r(case_seed);
    const auto cs = draw(r, isas);
    if (verbose) describe(cs, seed, index);
    if (!run(cs, case_seed)) {
      describe(cs, seed, index);
      return 1;
    }
    ++done;
    tally(cs);
    if (only >= 0) break;
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%s: %lld cases (%s), %.1f s, no failure\n", name, (long long)done, summary().c_str(), dt);
  return 0;
}
