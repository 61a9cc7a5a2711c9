// qlr CPU kernels: fused decode + GEMV straight from packed codes, tile decoding for BLAS, and the fast
// Walsh-Hadamard transform. Plain C ABI (no torch headers), called through ctypes by qlr.kernels.cpu.
//
// Conventions (match qlr.kernels.reference, the pure-torch twin of every function here):
//   * a factor is an m x n matrix (out x in); x is (B, n) float32 with row stride ldx; y is (B, m) with stride ldy;
//   * gemv computes y[b, i] (+)= sum_j F[i, j] x[b, j] for rows i of F in [0, m);
//   * decode writes rows [r0, r1) of F as float32 into out ((r1 - r0) x n, row stride n).
// Scalar grid (qlr.quant.grid / qlr.quant.packing): row i's codes are a little-endian bit stream of n codes of
// `bits` bits in words_per_row int32 words; value = (code - zero) * scale for integer grids, levels[code] * scale
// for NormalFloat grids. Scales per (row, group) as float32 / float16 / int8 power-of-two exponents; zeros as a
// packed bit stream over the flattened (m, groups) array, float16 (m, groups), or one constant.
// E8P (qlr.quant.e8p): codes (stages, m, n/8) of unsigned 16-bit patterns; a codeword is the absolute pattern
// row (code >> 8) with the signs of bits 7..1 (dims 1..7, the 8th implied by parity) and a +-1/4 shift (bit 0).
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline v8f load8(const float* p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float* p, v8f v) { memcpy(p, &v, sizeof v); }
static inline float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#if defined(__F16C__)
#include <immintrin.h>
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) { bits = sign; }
    else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) { man <<= 1; exp--; }
      man &= 0x3FF;
      bits = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f; memcpy(&f, &bits, 4); return f;
}
#endif

static inline int threads_for(long work, int nthreads) {
  // below ~64k multiply-adds a parallel region costs more than it saves
  if (nthreads <= 1 || work < 65536) return 1;
  return nthreads;
}

// per-thread scratch buffers, reused across calls (slots 0-2: the layer kernel, 3: grid rows, 4: Hadamard)
static float* scratch(int which, size_t count) {
  static thread_local float* bufs[5] = {NULL, NULL, NULL, NULL, NULL};
  static thread_local size_t caps[5] = {0, 0, 0, 0, 0};
  if (caps[which] < count) {
    free(bufs[which]);
    bufs[which] = (float*)malloc(sizeof(float) * count);
    caps[which] = bufs[which] ? count : 0;
  }
  return bufs[which];
}

// for i in [begin, end): f(i), on nt OpenMP threads when nt > 1 (no parallel region at all otherwise: entering one,
// even with if(0), costs microseconds that small layers cannot afford)
template <class F>
static inline void pfor(int begin, int end, int nt, F&& f) {
  if (nt > 1) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int i = begin; i < end; i++) f(i);
  } else {
    for (int i = begin; i < end; i++) f(i);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// scalar grid
// ---------------------------------------------------------------------------------------------------------------
struct Grid {
  const uint32_t* codes; int words; int bits; int m; int n; int glen; int groups;
  const void* scale; int scale_kind;   // 0 float32, 1 float16, 2 int8 exponent
  const void* zero; int zero_kind;     // 0 constant, 1 packed stream, 2 float16
  float zero_const; const float* levels;  // levels != NULL: NormalFloat
};

static inline uint32_t stream_code(const uint32_t* w, long pos, int bits) {
  long wi = pos >> 5; int off = (int)(pos & 31);
  uint32_t v = w[wi] >> off;
  if (off + bits > 32) v |= w[wi + 1] << (32 - off);
  return v & ((1u << bits) - 1u);
}

static inline float grid_scale(const Grid& g, long i, int k) {
  long idx = i * g.groups + k;
  switch (g.scale_kind) {
    case 0: return ((const float*)g.scale)[idx];
    case 1: return half_to_float(((const uint16_t*)g.scale)[idx]);
    default: return ldexpf(1.0f, ((const int8_t*)g.scale)[idx]);
  }
}

static inline float grid_zero(const Grid& g, long i, int k) {
  switch (g.zero_kind) {
    case 1: return (float)stream_code((const uint32_t*)g.zero, (i * g.groups + k) * (long)g.bits, g.bits);
    case 2: return half_to_float(((const uint16_t*)g.zero)[i * g.groups + k]);
    default: return g.zero_const;
  }
}

// 32 codes from BITS words (BITS * 32 bits) as floats
template <int BITS>
static inline void decode32(const uint32_t* w, float* out) {
  if (32 % BITS == 0) {
    constexpr int per = 32 / BITS;
    for (int q = 0; q < BITS; q++) {
      for (int c0 = 0; c0 < per; c0 += 8) {
        v8i sh; for (int t = 0; t < 8; t++) sh[t] = ((c0 + t) * BITS) & 31;
        v8u wv = (v8u){w[q], w[q], w[q], w[q], w[q], w[q], w[q], w[q]};
        v8u c = (wv >> (v8u)sh) & (uint32_t)((1u << BITS) - 1u);
        if (per - c0 >= 8) {
          store8(out + q * per + c0, __builtin_convertvector((v8i)c, v8f));
        } else {
          for (int t = 0; t < per - c0; t++) out[q * per + c0 + t] = (float)c[t];
        }
      }
    }
  } else {
    for (int k = 0; k < 32; k++) {
      const int pos = k * BITS, wi = pos >> 5, off = pos & 31;
      uint32_t v = w[wi] >> off;
      if (off + BITS > 32) v |= w[wi + 1] << (32 - off);
      out[k] = (float)(v & ((1u << BITS) - 1u));
    }
  }
}

template <int BITS>
static void decode_row_codes_t(const uint32_t* w, int n, int words, float* out) {
  int full = n / 32;
  for (int b = 0; b < full; b++) decode32<BITS>(w + b * BITS, out + b * 32);
  if (full * 32 < n) {  // tail: copy the remaining words into a zero-padded block
    uint32_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int have = words - full * BITS;
    for (int q = 0; q < have && q < BITS; q++) tmp[q] = w[full * BITS + q];
    float buf[32];
    decode32<BITS>(tmp, buf);
    memcpy(out + full * 32, buf, sizeof(float) * (n - full * 32));
  }
}

static void decode_row_codes(const Grid& g, long i, float* out) {
  const uint32_t* w = g.codes + i * (long)g.words;
  switch (g.bits) {
    case 1: decode_row_codes_t<1>(w, g.n, g.words, out); break;
    case 2: decode_row_codes_t<2>(w, g.n, g.words, out); break;
    case 3: decode_row_codes_t<3>(w, g.n, g.words, out); break;
    case 4: decode_row_codes_t<4>(w, g.n, g.words, out); break;
    case 5: decode_row_codes_t<5>(w, g.n, g.words, out); break;
    case 6: decode_row_codes_t<6>(w, g.n, g.words, out); break;
    case 7: decode_row_codes_t<7>(w, g.n, g.words, out); break;
    default: decode_row_codes_t<8>(w, g.n, g.words, out); break;
  }
  if (g.levels) {
    for (int j = 0; j < g.n; j++) out[j] = g.levels[(int)out[j]];
  }
}

// sum_j (c_j - z) x_j over [j0, j1) for B inputs; c holds raw codes (or NF levels with z = 0)
template <int B>
static inline void group_dots(const float* c, float z, const float* x, long ldx, int j0, int j1, float* acc) {
  v8f a[B];
  for (int b = 0; b < B; b++) a[b] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
  int j = j0;
  for (; j + 8 <= j1; j += 8) {
    v8f w = load8(c + j) - z;
    for (int b = 0; b < B; b++) a[b] += w * load8(x + b * ldx + j);
  }
  for (int b = 0; b < B; b++) {
    float s = hsum8(a[b]);
    for (int t = j; t < j1; t++) s += (c[t] - z) * x[b * ldx + t];
    acc[b] = s;
  }
}

// 8 consecutive codes starting at code index j (a multiple of 8) of a row's bit stream, as floats
template <int BITS>
static inline v8f chunk8(const uint32_t* w, long j, int words) {
  const long o = j * BITS;
  const long wi = o >> 5;
  const int off = (int)(o & 31);
  uint64_t u = w[wi];
  if (off + 8 * BITS > 32 && wi + 1 < words) u |= (uint64_t)w[wi + 1] << 32;
  u >>= off;
  const uint32_t lo = (uint32_t)u, hi = (uint32_t)(u >> (4 * BITS));
  const v8u sh = {0, BITS, 2 * BITS, 3 * BITS, 0, BITS, 2 * BITS, 3 * BITS};
  v8u c = ((v8u){lo, lo, lo, lo, hi, hi, hi, hi} >> sh) & (uint32_t)((1u << BITS) - 1u);
  return __builtin_convertvector((v8i)c, v8f);
}

// chunk k (0..3) of a 32-code block of BITS <= 4 whose words are w[0..BITS): 8 codes from one 32-bit window
template <int BITS, int K>
static inline v8f block_chunk(const uint32_t* w) {
  constexpr int o = 8 * BITS * K, wi = o >> 5, off = o & 31;
  uint32_t u = w[wi] >> off;
  if (off + 8 * BITS > 32) u |= w[wi + 1] << (32 - off);
  const v8u sh = {0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS};
  v8u c = ((v8u){u, u, u, u, u, u, u, u} >> sh) & (uint32_t)((1u << BITS) - 1u);
  return __builtin_convertvector((v8i)c, v8f);
}

// integer grids, BITS <= 4, every group a whole number of 32-code blocks
template <int BITS, int B>
static void grid_gemv_blocks(const Grid& g, const float* x, long ldx, float* y, long ldy, int accumulate,
                             int nthreads) {
  int nt = threads_for((long)g.m * g.n * B, nthreads);
  pfor(0, g.m, nt, [&](int i) {
    const uint32_t* w = g.codes + (long)i * g.words;
    v8f tv[B];  // per-group sums scaled into vector accumulators: one horizontal sum per row, not per group
    for (int b = 0; b < B; b++) tv[b] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < g.groups; k++) {
      const int j0 = k * g.glen, j1 = j0 + g.glen < g.n ? j0 + g.glen : g.n;
      const float z = grid_zero(g, i, k), s = grid_scale(g, i, k);
      v8f a[B];
      for (int b = 0; b < B; b++) a[b] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
      for (int j = j0; j < j1; j += 32) {
        const uint32_t* wb = w + (j / 32) * BITS;
        const v8f v0 = block_chunk<BITS, 0>(wb) - z, v1 = block_chunk<BITS, 1>(wb) - z;
        const v8f v2 = block_chunk<BITS, 2>(wb) - z, v3 = block_chunk<BITS, 3>(wb) - z;
        for (int b = 0; b < B; b++) {
          const float* xb = x + b * ldx + j;
          a[b] += (v0 * load8(xb) + v1 * load8(xb + 8)) + (v2 * load8(xb + 16) + v3 * load8(xb + 24));
        }
      }
      for (int b = 0; b < B; b++) tv[b] += s * a[b];
    }
    for (int b = 0; b < B; b++) {
      const float t = hsum8(tv[b]);
      if (accumulate) y[b * ldy + i] += t; else y[b * ldy + i] = t;
    }
  });
}

// fused path: every group and the row are whole 8-code chunks; codes decoded in registers, never stored
template <int BITS, int B>
static void grid_gemv_fused(const Grid& g, const float* x, long ldx, float* y, long ldy, int accumulate,
                            int nthreads) {
  int nt = threads_for((long)g.m * g.n * B, nthreads);
  pfor(0, g.m, nt, [&](int i) {
    const uint32_t* w = g.codes + (long)i * g.words;
    float tot[B];
    for (int b = 0; b < B; b++) tot[b] = 0.f;
    for (int k = 0; k < g.groups; k++) {
      const int j0 = k * g.glen, j1 = j0 + g.glen < g.n ? j0 + g.glen : g.n;
      const float z = g.levels ? 0.f : grid_zero(g, i, k), s = grid_scale(g, i, k);
      v8f a[B];
      for (int b = 0; b < B; b++) a[b] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
      if (g.levels) {
        for (int j = j0; j < j1; j += 8) {
          v8i c = __builtin_convertvector(chunk8<BITS>(w, j, g.words), v8i);
          v8f v;
          for (int t = 0; t < 8; t++) v[t] = g.levels[c[t]];
          for (int b = 0; b < B; b++) a[b] += v * load8(x + b * ldx + j);
        }
      } else {
        for (int j = j0; j < j1; j += 8) {
          v8f v = chunk8<BITS>(w, j, g.words) - z;
          for (int b = 0; b < B; b++) a[b] += v * load8(x + b * ldx + j);
        }
      }
      for (int b = 0; b < B; b++) tot[b] += s * hsum8(a[b]);
    }
    for (int b = 0; b < B; b++) {
      if (accumulate) y[b * ldy + i] += tot[b]; else y[b * ldy + i] = tot[b];
    }
  });
}

// general path (any n and group length): decode the row's codes into a buffer, then per-group dot products
template <int B>
static void grid_gemv_buffered(const Grid& g, const float* x, long ldx, float* y, long ldy, int accumulate,
                               int nthreads) {
  int nt = threads_for((long)g.m * g.n * B, nthreads);
  pfor(0, g.m, nt, [&](int i) {
    float* c = scratch(3, (size_t)g.n + 32);
    decode_row_codes(g, i, c);
    float tot[B], part[B];
    for (int b = 0; b < B; b++) tot[b] = 0.f;
    for (int k = 0; k < g.groups; k++) {
      int j0 = k * g.glen, j1 = j0 + g.glen < g.n ? j0 + g.glen : g.n;
      float z = g.levels ? 0.f : grid_zero(g, i, k), s = grid_scale(g, i, k);
      group_dots<B>(c, z, x, ldx, j0, j1, part);
      for (int b = 0; b < B; b++) tot[b] += s * part[b];
    }
    for (int b = 0; b < B; b++) {
      if (accumulate) y[b * ldy + i] += tot[b]; else y[b * ldy + i] = tot[b];
    }
  });
}

template <int B>
static void grid_gemv_t(const Grid& g, const float* x, long ldx, float* y, long ldy, int accumulate, int nthreads) {
  if (!g.levels && g.bits <= 4 && g.glen % 32 == 0 && (g.groups == 1 || g.n % 32 == 0)) {
    switch (g.bits) {
      case 1: return grid_gemv_blocks<1, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      case 2: return grid_gemv_blocks<2, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      case 3: return grid_gemv_blocks<3, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      default: return grid_gemv_blocks<4, B>(g, x, ldx, y, ldy, accumulate, nthreads);
    }
  }
  if (g.glen % 8 == 0 && g.n % 8 == 0) {
    switch (g.bits) {
      case 1: return grid_gemv_fused<1, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      case 2: return grid_gemv_fused<2, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      case 3: return grid_gemv_fused<3, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      case 4: return grid_gemv_fused<4, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      case 5: return grid_gemv_fused<5, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      case 6: return grid_gemv_fused<6, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      case 7: return grid_gemv_fused<7, B>(g, x, ldx, y, ldy, accumulate, nthreads);
      default: return grid_gemv_fused<8, B>(g, x, ldx, y, ldy, accumulate, nthreads);
    }
  }
  grid_gemv_buffered<B>(g, x, ldx, y, ldy, accumulate, nthreads);
}

static Grid make_grid(const int32_t* codes, int words, int bits, int m, int n, int glen, const void* scale,
                      int scale_kind, const void* zero, int zero_kind, float zero_const, const float* levels) {
  Grid g;
  g.codes = (const uint32_t*)codes; g.words = words; g.bits = bits; g.m = m; g.n = n;
  g.glen = glen > 0 ? glen : n; g.groups = (n + g.glen - 1) / g.glen;
  g.scale = scale; g.scale_kind = scale_kind; g.zero = zero; g.zero_kind = zero_kind;
  g.zero_const = zero_const; g.levels = levels;
  return g;
}

extern "C" {

int qlr_abi_version(void) { return 1; }

int qlr_max_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int qlr_grid_gemv(const int32_t* codes, int words, int bits, int m, int n, int glen, const void* scale,
                  int scale_kind, const void* zero, int zero_kind, float zero_const, const float* levels,
                  const float* x, int B, long ldx, float* y, long ldy, int accumulate, int nthreads) {
  if (bits < 1 || bits > 8 || B < 1 || B > 8) return -1;
  Grid g = make_grid(codes, words, bits, m, n, glen, scale, scale_kind, zero, zero_kind, zero_const, levels);
  switch (B) {
    case 1: grid_gemv_t<1>(g, x, ldx, y, ldy, accumulate, nthreads); break;
    case 2: grid_gemv_t<2>(g, x, ldx, y, ldy, accumulate, nthreads); break;
    case 3: grid_gemv_t<3>(g, x, ldx, y, ldy, accumulate, nthreads); break;
    case 4: grid_gemv_t<4>(g, x, ldx, y, ldy, accumulate, nthreads); break;
    case 5: grid_gemv_t<5>(g, x, ldx, y, ldy, accumulate, nthreads); break;
    case 6: grid_gemv_t<6>(g, x, ldx, y, ldy, accumulate, nthreads); break;
    case 7: grid_gemv_t<7>(g, x, ldx, y, ldy, accumulate, nthreads); break;
    default: grid_gemv_t<8>(g, x, ldx, y, ldy, accumulate, nthreads); break;
  }
  return 0;
}

int qlr_grid_decode(const int32_t* codes, int words, int bits, int m, int n, int glen, const void* scale,
                    int scale_kind, const void* zero, int zero_kind, float zero_const, const float* levels,
                    int r0, int r1, float* out, int nthreads) {
  if (bits < 1 || bits > 8 || r0 < 0 || r1 > m || r0 > r1) return -1;
  Grid g = make_grid(codes, words, bits, m, n, glen, scale, scale_kind, zero, zero_kind, zero_const, levels);
  int nt = threads_for((long)(r1 - r0) * n, nthreads);
  pfor(r0, r1, nt, [&](int i) {
    float* o = out + (long)(i - r0) * n;
    decode_row_codes(g, i, o);
    for (int k = 0; k < g.groups; k++) {
      int j0 = k * g.glen, j1 = j0 + g.glen < n ? j0 + g.glen : n;
      float s = grid_scale(g, i, k);
      if (g.levels) {
        for (int j = j0; j < j1; j++) o[j] = o[j] * s;
      } else {
        float z = grid_zero(g, i, k);
        for (int j = j0; j < j1; j++) o[j] = (o[j] - z) * s;
      }
    }
  });
  return 0;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------------
// E8P lattice
// ---------------------------------------------------------------------------------------------------------------
struct E8PTables {
  float pattern[256][8];   // absolute pattern, dimension 0 negated for odd patterns (so only the stored sign bits
                           // and their parity remain to apply)
  uint32_t flip[128][8];   // sign-bit masks from code bits 7..1 (dims 1..7) and their parity (dim 0)
};

static E8PTables g_e8p;
static int g_e8p_ready = 0;

extern "C" int qlr_e8p_init(const float* abs_grid /* 256 x 8 */) {
  for (int p = 0; p < 256; p++) {
    float s = 0.f;
    for (int d = 0; d < 8; d++) s += abs_grid[p * 8 + d];
    int odd = ((int)lrintf(s)) & 1;
    for (int d = 0; d < 8; d++) g_e8p.pattern[p][d] = abs_grid[p * 8 + d];
    if (odd) g_e8p.pattern[p][0] = -g_e8p.pattern[p][0];
  }
  for (int f = 0; f < 128; f++) {
    int low = f << 1, par = 0;
    for (int d = 1; d < 8; d++) {
      int neg = (low >> (8 - d)) & 1;
      par ^= neg;
      g_e8p.flip[f][d] = neg ? 0x80000000u : 0u;
    }
    g_e8p.flip[f][0] = par ? 0x80000000u : 0u;
  }
  g_e8p_ready = 1;
  return 0;
}

static inline v8f e8p_word(uint16_t c) {
  v8f a = load8(g_e8p.pattern[c >> 8]);
  v8u f; memcpy(&f, g_e8p.flip[(c >> 1) & 127], sizeof f);
  v8f v = (v8f)((v8u)a ^ f);
  return v + ((float)(c & 1) * 0.5f - 0.25f);
}

template <int B>
static void e8p_gemv_t(const int16_t* codes, int stages, const float* scales, int m, int n, const float* x,
                       long ldx, float* y, long ldy, int accumulate, int nthreads) {
  const int nb = n / 8;
  int nt = threads_for((long)m * n * B * stages, nthreads);
  pfor(0, m, nt, [&](int i) {
    float tot[B];
    for (int b = 0; b < B; b++) tot[b] = 0.f;
    for (int s = 0; s < stages; s++) {
      const uint16_t* c = (const uint16_t*)codes + ((long)s * m + i) * nb;
      v8f a[B];
      for (int b = 0; b < B; b++) a[b] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
      int k = 0;
      for (; k + 4 <= nb; k += 4) {  // four codes per step, summed as a tree: one dependent add per step
        const v8f w0 = e8p_word(c[k]), w1 = e8p_word(c[k + 1]), w2 = e8p_word(c[k + 2]), w3 = e8p_word(c[k + 3]);
        for (int b = 0; b < B; b++) {
          const float* xb = x + b * ldx + 8 * k;
          a[b] += (w0 * load8(xb) + w1 * load8(xb + 8)) + (w2 * load8(xb + 16) + w3 * load8(xb + 24));
        }
      }
      for (; k < nb; k++) {
        v8f w = e8p_word(c[k]);
        for (int b = 0; b < B; b++) a[b] += w * load8(x + b * ldx + 8 * k);
      }
      for (int b = 0; b < B; b++) tot[b] += scales[s] * hsum8(a[b]);
    }
    for (int b = 0; b < B; b++) {
      if (accumulate) y[b * ldy + i] += tot[b]; else y[b * ldy + i] = tot[b];
    }
  });
}

extern "C" {

int qlr_e8p_gemv(const int16_t* codes, int stages, const float* scales, int m, int n, const float* x, int B,
                 long ldx, float* y, long ldy, int accumulate, int nthreads) {
  if (!g_e8p_ready || n % 8 || B < 1 || B > 8) return -1;
  switch (B) {
    case 1: e8p_gemv_t<1>(codes, stages, scales, m, n, x, ldx, y, ldy, accumulate, nthreads); break;
    case 2: e8p_gemv_t<2>(codes, stages, scales, m, n, x, ldx, y, ldy, accumulate, nthreads); break;
    case 3: e8p_gemv_t<3>(codes, stages, scales, m, n, x, ldx, y, ldy, accumulate, nthreads); break;
    case 4: e8p_gemv_t<4>(codes, stages, scales, m, n, x, ldx, y, ldy, accumulate, nthreads); break;
    case 5: e8p_gemv_t<5>(codes, stages, scales, m, n, x, ldx, y, ldy, accumulate, nthreads); break;
    case 6: e8p_gemv_t<6>(codes, stages, scales, m, n, x, ldx, y, ldy, accumulate, nthreads); break;
    case 7: e8p_gemv_t<7>(codes, stages, scales, m, n, x, ldx, y, ldy, accumulate, nthreads); break;
    default: e8p_gemv_t<8>(codes, stages, scales, m, n, x, ldx, y, ldy, accumulate, nthreads); break;
  }
  return 0;
}

int qlr_e8p_decode(const int16_t* codes, int stages, const float* scales, int m, int n, int r0, int r1, float* out,
                   int nthreads) {
  if (!g_e8p_ready || n % 8 || r0 < 0 || r1 > m || r0 > r1) return -1;
  const int nb = n / 8;
  int nt = threads_for((long)(r1 - r0) * n * stages, nthreads);
  pfor(r0, r1, nt, [&](int i) {
    float* o = out + (long)(i - r0) * n;
    for (int s = 0; s < stages; s++) {
      const uint16_t* c = (const uint16_t*)codes + ((long)s * m + i) * nb;
      for (int k = 0; k < nb; k++) {
        v8f w = e8p_word(c[k]) * scales[s];
        if (s == 0) store8(o + 8 * k, w); else store8(o + 8 * k, load8(o + 8 * k) + w);
      }
    }
  });
  return 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Hadamard: y = (Had_n (x * pre)) * scale * post over each row of x (B, n), in place; Had_n = H_b (x) H_p with
// H_p Sylvester's (butterflies) and H_b a dense b x b matrix given row-major (pass H_b^T for the transpose).
// Row layout: x[i * p + j] is entry (i, j) of the b x p view; the butterflies run along j, H_b mixes along i.
// ---------------------------------------------------------------------------------------------------------------
// the first three butterfly levels (h = 1, 2, 4) of an 8-element block, in registers: lane l takes its partner
// l ^ h and keeps v + partner (lower lane of the pair) or partner - v (upper lane)
static inline v8f fwht8(v8f v) {
  const v8i x1 = {1, 0, 3, 2, 5, 4, 7, 6}, x2 = {2, 3, 0, 1, 6, 7, 4, 5}, x4 = {4, 5, 6, 7, 0, 1, 2, 3};
  const v8f s1 = {1, -1, 1, -1, 1, -1, 1, -1}, s2 = {1, 1, -1, -1, 1, 1, -1, -1}, s4 = {1, 1, 1, 1, -1, -1, -1, -1};
  v = __builtin_shuffle(v, x1) + v * s1;
  v = __builtin_shuffle(v, x2) + v * s2;
  return __builtin_shuffle(v, x4) + v * s4;
}

static void fwht_inplace(float* v, int p) {
  int h = 1;
  if (p >= 8) {
    for (int j = 0; j < p; j += 8) store8(v + j, fwht8(load8(v + j)));
    h = 8;
  }
  for (; h < p; h <<= 1) {
    if (h >= 8) {
      for (int s = 0; s < p; s += 2 * h) {
        for (int j = s; j < s + h; j += 8) {
          v8f a = load8(v + j), c = load8(v + j + h);
          store8(v + j, a + c); store8(v + j + h, a - c);
        }
      }
    } else {
      for (int s = 0; s < p; s += 2 * h) {
        for (int j = s; j < s + h; j++) {
          float a = v[j], c = v[j + h];
          v[j] = a + c; v[j + h] = a - c;
        }
      }
    }
  }
}

// out (b x p) = H (b x b) @ v (b x p), row-major. Register-blocked: 4 rows of H by 16 columns per step when b % 4 == 0
// and p % 16 == 0 (every dense Hadamard order is a multiple of 4), a plain loop otherwise.
static void mix_rows(const float* H, int b, int p, const float* v, float* out) {
  if (b % 4 == 0 && p % 16 == 0) {
    for (int i0 = 0; i0 < b; i0 += 4) {
      for (int j0 = 0; j0 < p; j0 += 16) {
        v8f a00 = {0, 0, 0, 0, 0, 0, 0, 0}, a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
            a31 = a00;
        for (int k = 0; k < b; k++) {
          const v8f v0 = load8(v + (long)k * p + j0), v1 = load8(v + (long)k * p + j0 + 8);
          const float h0 = H[(i0 + 0) * b + k], h1 = H[(i0 + 1) * b + k];
          const float h2 = H[(i0 + 2) * b + k], h3 = H[(i0 + 3) * b + k];
          a00 += h0 * v0; a01 += h0 * v1; a10 += h1 * v0; a11 += h1 * v1;
          a20 += h2 * v0; a21 += h2 * v1; a30 += h3 * v0; a31 += h3 * v1;
        }
        float* o = out + (long)i0 * p + j0;
        store8(o, a00); store8(o + 8, a01); store8(o + p, a10); store8(o + p + 8, a11);
        store8(o + 2 * p, a20); store8(o + 2 * p + 8, a21); store8(o + 3 * p, a30); store8(o + 3 * p + 8, a31);
      }
    }
    return;
  }
  for (int i = 0; i < b; i++) {
    float* o = out + (long)i * p;
    for (int j = 0; j < p; j++) o[j] = 0.f;
    for (int k = 0; k < b; k++) {
      const float h = H[i * b + k];
      const float* src = v + (long)k * p;
      for (int j = 0; j < p; j++) o[j] += h * src[j];
    }
  }
}

int qlr_hadamard_out(const float* src, long lds, float* x, int B, long ldx, int n, int b, const float* Hb,
                     const float* pre, const float* post, float scale, int nthreads);

int qlr_hadamard(float* x, int B, long ldx, int n, int b, const float* Hb, const float* pre, const float* post,
                 float scale, int nthreads) {
  return qlr_hadamard_out(x, ldx, x, B, ldx, n, b, Hb, pre, post, scale, nthreads);
}

// as qlr_hadamard, reading rows of src (row stride lds) and writing x (src == x: in place)
int qlr_hadamard_out(const float* src, long lds, float* x, int B, long ldx, int n, int b, const float* Hb,
                     const float* pre, const float* post, float scale, int nthreads) {
  if (b < 1 || n % b) return -1;
  const int p = n / b;
  if (p & (p - 1)) return -1;
  int nt = threads_for((long)B * n * 16, nthreads);
  pfor(0, B, nt, [&](int r) {
    float* tmp = b > 1 ? scratch(4, (size_t)n) : NULL;
    float* v = x + (long)r * ldx;
    const float* sv = src + (long)r * lds;
    if (pre) { for (int j = 0; j < n; j++) v[j] = sv[j] * pre[j]; }
    else if (sv != v) { memcpy(v, sv, sizeof(float) * n); }
    for (int i = 0; i < b; i++) fwht_inplace(v + (long)i * p, p);
    if (b > 1) {
      mix_rows(Hb, b, p, v, tmp);
      memcpy(v, tmp, sizeof(float) * n);
    }
    if (post) { for (int j = 0; j < n; j++) v[j] *= scale * post[j]; }
    else if (scale != 1.0f) { for (int j = 0; j < n; j++) v[j] *= scale; }
  });
  return 0;
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------------
// A whole QLRLinear forward for a few rows of x in one call: y = U^T-side rotation of (x~ Q^T + (x~ R^T) L^T) + b,
// x~ = the input rotation of x (see qlr.nn.qlinear). The caller (qlr.kernels.cpu.layer_plan) fills QLayer once per
// module with pointers to its buffers; scratch lives in per-thread buffers reused across calls.
// ---------------------------------------------------------------------------------------------------------------
struct QFactor {
  int kind;  // 0 absent, 1 scalar grid, 2 E8P, 3 dense float16, 4 dense float32
  int rows, cols;
  const int32_t* codes; int words; int bits; int glen;  // grid
  const void* scale; int scale_kind; const void* zero; int zero_kind; float zero_const; const float* levels;
  const int16_t* e8p_codes; int stages; const float* e8p_scales;  // E8P
  const void* dense;  // dense
};

struct QLayer {
  int m, n, r;
  QFactor q, l, rf;
  const int64_t* perm;                    // stored column j of Q is input column perm[j]; NULL: identity
  const float* s_in; const float* s_out;  // rotation signs; NULL: not rotated
  int b_in, b_out;                        // orders of the dense Hadamard factors
  const float* h_in; const float* h_out;  // H_b (input side) and H_b^T (output side), row-major; NULL when b = 1
  const void* bias; int bias_kind;        // 0 none, 1 float32, 2 float16, 3 bfloat16
};

static inline float bf16_to_float(uint16_t h) { uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f; }

template <int B>
static void dense_gemv_t(const QFactor& f, const float* x, long ldx, float* y, long ldy, int accumulate, int nthreads) {
  const int n = f.cols;
  int nt = threads_for((long)f.rows * n * B, nthreads);
  pfor(0, f.rows, nt, [&](int i) {
    float tot[B];
    v8f a[B];
    for (int b = 0; b < B; b++) a[b] = (v8f){0, 0, 0, 0, 0, 0, 0, 0};
    int j = 0;
    if (f.kind == 4) {
      const float* w = (const float*)f.dense + (long)i * n;
      for (; j + 8 <= n; j += 8) { v8f v = load8(w + j); for (int b = 0; b < B; b++) a[b] += v * load8(x + b * ldx + j); }
      for (int b = 0; b < B; b++) { tot[b] = hsum8(a[b]); for (int t = j; t < n; t++) tot[b] += w[t] * x[b * ldx + t]; }
    } else {
      const uint16_t* w = (const uint16_t*)f.dense + (long)i * n;
      for (; j + 8 <= n; j += 8) {
        v8f v;
        for (int t = 0; t < 8; t++) v[t] = half_to_float(w[j + t]);
        for (int b = 0; b < B; b++) a[b] += v * load8(x + b * ldx + j);
      }
      for (int b = 0; b < B; b++) {
        tot[b] = hsum8(a[b]);
        for (int t = j; t < n; t++) tot[b] += half_to_float(w[t]) * x[b * ldx + t];
      }
    }
    for (int b = 0; b < B; b++) {
      if (accumulate) y[b * ldy + i] += tot[b]; else y[b * ldy + i] = tot[b];
    }
  });
}

static void dense_gemv(const QFactor& f, const float* x, long ldx, int B, float* y, long ldy, int accumulate,
                       int nthreads) {
  switch (B) {
    case 1: return dense_gemv_t<1>(f, x, ldx, y, ldy, accumulate, nthreads);
    case 2: return dense_gemv_t<2>(f, x, ldx, y, ldy, accumulate, nthreads);
    case 3: return dense_gemv_t<3>(f, x, ldx, y, ldy, accumulate, nthreads);
    case 4: return dense_gemv_t<4>(f, x, ldx, y, ldy, accumulate, nthreads);
    case 5: return dense_gemv_t<5>(f, x, ldx, y, ldy, accumulate, nthreads);
    case 6: return dense_gemv_t<6>(f, x, ldx, y, ldy, accumulate, nthreads);
    case 7: return dense_gemv_t<7>(f, x, ldx, y, ldy, accumulate, nthreads);
    default: return dense_gemv_t<8>(f, x, ldx, y, ldy, accumulate, nthreads);
  }
}

static int factor_gemv(const QFactor& f, const float* x, long ldx, int B, float* y, long ldy, int accumulate,
                       int nthreads) {
  switch (f.kind) {
    case 1:
      return qlr_grid_gemv(f.codes, f.words, f.bits, f.rows, f.cols, f.glen, f.scale, f.scale_kind, f.zero,
                           f.zero_kind, f.zero_const, f.levels, x, B, ldx, y, ldy, accumulate, nthreads);
    case 2:
      return qlr_e8p_gemv(f.e8p_codes, f.stages, f.e8p_scales, f.rows, f.cols, x, B, ldx, y, ldy, accumulate,
                          nthreads);
    case 3: case 4:
      dense_gemv(f, x, ldx, B, y, ldy, accumulate, nthreads);
      return 0;
    default:
      return -1;
  }
}


extern "C" int qlr_layer_forward(const QLayer* L, const float* x, int B, float* y, int nthreads) {
  if (B < 1 || B > 8) return -1;
  const int m = L->m, n = L->n, r = L->r;
  const float* xr = x;
  if (L->s_in) {
    float* t = scratch(0, (size_t)B * n);
    if (!t) return -2;
    memcpy(t, x, sizeof(float) * B * n);
    if (qlr_hadamard(t, B, n, n, L->b_in, L->h_in, L->s_in, NULL, 1.0f / sqrtf((float)n), nthreads)) return -1;
    xr = t;
  }
  const float* xq = xr;
  if (L->perm) {
    float* t = scratch(1, (size_t)B * n);
    if (!t) return -2;
    for (int b = 0; b < B; b++)
      for (int j = 0; j < n; j++) t[(long)b * n + j] = xr[(long)b * n + L->perm[j]];
    xq = t;
  }
  if (L->q.kind) {
    if (factor_gemv(L->q, xq, n, B, y, m, 0, nthreads)) return -1;
  } else {
    memset(y, 0, sizeof(float) * B * m);
  }
  if (r > 0) {
    float* t = scratch(2, (size_t)B * r);
    if (!t) return -2;
    if (factor_gemv(L->rf, xr, n, B, t, r, 0, nthreads)) return -1;
    if (factor_gemv(L->l, t, r, B, y, m, 1, nthreads)) return -1;
  }
  if (L->s_out) {
    if (qlr_hadamard(y, B, m, m, L->b_out, L->h_out, NULL, L->s_out, 1.0f / sqrtf((float)m), nthreads)) return -1;
  }
  if (L->bias_kind) {
    for (int b = 0; b < B; b++) {
      float* yb = y + (long)b * m;
      for (int i = 0; i < m; i++) {
        float v = L->bias_kind == 1 ? ((const float*)L->bias)[i]
                  : L->bias_kind == 2 ? half_to_float(((const uint16_t*)L->bias)[i])
                                      : bf16_to_float(((const uint16_t*)L->bias)[i]);
        yb[i] += v;
      }
    }
  }
  return 0;
}
