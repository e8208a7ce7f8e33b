// glmv's fused CPU operators for the bf16 decoder, and the linear products of bf16 layers and of
// --quantization int8 (registered as torch.ops.glmv.*).
//
// Each replaces a chain of small PyTorch calls whose per-call overhead dominates a decode step
// on a few cores. Rounding follows the PyTorch code they replace (glmv/layers/*.py): values are
// widened to fp32, sums are added in the order ATen adds them, and results are rounded to bf16
// wherever the PyTorch chain rounds, so norms, rotary and the KV write match it bit for bit.
// Two differ on purpose: SwiGLU's exp is a polynomial (within an ulp of libm's, so silu may
// land one bf16 ulp away), and decode attention keeps fp32 throughout where the PyTorch path
// rounds its probabilities to bf16.
//
// Plain loops over uint16 bf16 bits with fixed-width accumulator arrays, so that gcc -O3
// vectorises them for the machine it runs on; the linear products (AVX512-VNNI, bf16 pairs on
// AVX-512, and AMX tiles from a few rows up) and both attentions (bf16 pairs; AMX for
// segments) use intrinsics, each with a plain fallback. Threads come from ATen's pool
// (at::parallel_for).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace {

constexpr int kLanes = 16;

inline float bf2f(uint16_t v) {
  uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, NaN kept quiet: c10::BFloat16's conversion.
inline uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float round_bf(float f) { return bf2f(f2bf(f)); }

// exp(x) to ~1 ulp (Cephes expf): range reduction by ln 2, degree-6 polynomial. Written
// without calls so loops using it vectorise.
inline float exp_approx(float x) {
  constexpr float kHi = 88.72283935546875f, kLo = -103.972084045410f;
  float xc = std::min(std::max(x, kLo), kHi);
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n in two halves so that n down to -150 (denormal results) stays representable.
  int32_t ni = int32_t(n);
  int32_t a = ni / 2, b = ni - ni / 2;
  uint32_t ea = uint32_t(a + 127) << 23, eb = uint32_t(b + 127) << 23;
  float fa, fb;
  std::memcpy(&fa, &ea, sizeof fa);
  std::memcpy(&fb, &eb, sizeof fb);
  float y = p * fa * fb;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return x < kLo ? 0.0f : y;
}

#if defined(__AVX512F__)
// exp_approx on 16 lanes (2^n by scalef, which also gives the denormal results)
inline __m512 exp512(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.972084045410f)),
                                  _mm512_set1_ps(88.72283935546875f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(xc, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// 16 bf16 values (their bits) widened to fp32
inline __m512 widen_bf16x16(__m256i bits) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// 16 bf16 values widened to fp32
inline __m512 load_bf16x16(const uint16_t* x) {
  return widen_bf16x16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}

// f2bf on 16 lanes, bit for bit (round to nearest even, NaN -> 0x7fc0; denormals kept, which
// vcvtneps2bf16 would flush), as fp32 lanes holding the bf16 values (the low 16 bits zero)
inline __m512 round_bf16x16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  r = _mm512_and_si512(r, _mm512_set1_epi32(int32_t(0xffff0000u)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q),
                            _mm512_set1_epi32(0x7fc00000));
  return _mm512_castsi512_ps(r);
}

// 16 fp32 lanes that hold bf16 values (round_bf16x16) stored as bf16
inline void store_bf16x16(uint16_t* out, __m512 rounded) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}
#endif

// bf16 pairs on 16 lanes: the dot product and the rounding the products, attentions and
// SwiGLU are written with. On AVX512-BF16 they are vdpbf16ps and vcvtneps2bf16; on CPUs with
// AVX-512 but without it (Skylake-SP to Ice Lake, and hosts that hide it) the same arithmetic
// in AVX512F: each pair's odd then even product (exact in fp32) added to the lane in that
// order, the order Intel's manual gives for vdpbf16ps, and round to nearest even (denormals
// kept, as PyTorch keeps them, where vcvtneps2bf16 flushes them to zero).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define GLMV_BF16_LANES 1
#if defined(__AVX512BF16__)
using bf16x32 = __m512bh;  // 16 pairs of bf16
inline bf16x32 as_bf16x32(__m512i v) { return (__m512bh)v; }
inline __m512 dot_bf16(__m512 acc, bf16x32 a, bf16x32 b) { return _mm512_dpbf16_ps(acc, a, b); }
inline __m256i cvt_bf16x16(__m512 f) { return (__m256i)_mm512_cvtneps_pbh(f); }
constexpr bool kBf16Instructions = true;
#else
using bf16x32 = __m512i;
inline bf16x32 as_bf16x32(__m512i v) { return v; }
inline __m512 dot_bf16(__m512 acc, bf16x32 a, bf16x32 b) {
  const __m512i odd = _mm512_set1_epi32(int32_t(0xffff0000u));
  acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(a, odd)),
                        _mm512_castsi512_ps(_mm512_and_si512(b, odd)), acc);
  return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(a, 16)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), acc);
}
inline __m256i cvt_bf16x16(__m512 f) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(round_bf16x16(f)), 16));
}
constexpr bool kBf16Instructions = false;
#endif
#else
#define GLMV_BF16_LANES 0
constexpr bool kBf16Instructions = false;
#endif

const uint16_t* bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
uint16_t* mbits(const at::Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>());
}

void check_bf16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, name, " must be bfloat16");
}

// Rows of a 2-D tensor: contiguous along the last dimension, any row stride.
void check_rows(const at::Tensor& t, const char* name, int64_t width) {
  check_bf16(t, name);
  TORCH_CHECK(t.dim() == 2 && t.size(1) == width && t.stride(1) == 1, name,
              " must be [rows, ", width, "] with unit stride along the row");
}

// Lanes of the Vectorized<float> that ATen's sum runs with: 8 (its AVX2 kernel, which torch
// keeps using on AVX512 machines, and the default build's 32-byte vectors).
constexpr int kSumLanes = 8;

int ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int bits = 0;
  for (uint64_t v = uint64_t(x) - 1; v != 0; v >>= 1) ++bits;
  return bits;
}

// sum(x^2) of one row in fp32, adding in the order of ATen's vectorised inner sum (SumKernel:
// vectors of L lanes in groups of 4 accumulated over a cascade of 4 levels, groups folded
// together, the scalar tail, then the lanes one by one), so that the result is the same
// float that `x.float().pow(2).mean(-1)` sums to. Squares of bf16 values are exact in fp32.
template <int L>
float sum_squares(const uint16_t* x, int64_t n) {
  constexpr int kIlp = 4, kLevels = 4;
  int64_t vecs = n / L, groups = vecs / kIlp;
  int level_power = std::max(4, ceil_log2(groups) / kLevels);
  int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  float acc[kLevels][kIlp][L] = {};
  auto add_vec = [&](float* dst, int64_t v) {
    const uint16_t* p = x + v * L;
    for (int l = 0; l < L; ++l) {
      float f = bf2f(p[l]);
      dst[l] += f * f;
    }
  };
  int64_t i = 0;
  while (i + level_step <= groups) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kIlp; ++k) add_vec(acc[0][k], i * kIlp + k);
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k)
        for (int l = 0; l < L; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < groups; ++i)
    for (int k = 0; k < kIlp; ++k) add_vec(acc[0][k], i * kIlp + k);
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k)
      for (int l = 0; l < L; ++l) acc[0][k][l] += acc[j][k][l];
  float* part = acc[0][0];
  for (int64_t v = groups * kIlp; v < vecs; ++v) add_vec(part, v);
  for (int k = 1; k < kIlp; ++k)
    for (int l = 0; l < L; ++l) part[l] += acc[0][k][l];
  float total = 0.0f;
  for (int64_t t = vecs * L; t < n; ++t) total += bf2f(x[t]) * bf2f(x[t]);
  for (int l = 0; l < L; ++l) total += part[l];
  return total;
}

#if defined(__AVX512F__)
// sum_squares<8> with each 8-lane vector in one register: the same additions in the same
// order (squares of bf16 values are exact, so a product and a sum are what the loop adds).
inline __m256 squares8(const uint16_t* p) {
  const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  return _mm256_mul_ps(f, f);
}

float sum_squares8(const uint16_t* x, int64_t n) {
  constexpr int L = 8, kIlp = 4, kLevels = 4;
  int64_t vecs = n / L, groups = vecs / kIlp;
  int level_power = std::max(4, ceil_log2(groups) / kLevels);
  int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  __m256 acc[kLevels][kIlp];
  for (auto& level : acc)
    for (auto& a : level) a = _mm256_setzero_ps();
  int64_t i = 0;
  while (i + level_step <= groups) {
    for (int64_t j = 0; j < level_step; ++j, ++i)
      for (int k = 0; k < kIlp; ++k)
        acc[0][k] = _mm256_add_ps(acc[0][k], squares8(x + (i * kIlp + k) * L));
    for (int j = 1; j < kLevels; ++j) {
      for (int k = 0; k < kIlp; ++k) {
        acc[j][k] = _mm256_add_ps(acc[j][k], acc[j - 1][k]);
        acc[j - 1][k] = _mm256_setzero_ps();
      }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < groups; ++i)
    for (int k = 0; k < kIlp; ++k)
      acc[0][k] = _mm256_add_ps(acc[0][k], squares8(x + (i * kIlp + k) * L));
  for (int j = 1; j < kLevels; ++j)
    for (int k = 0; k < kIlp; ++k) acc[0][k] = _mm256_add_ps(acc[0][k], acc[j][k]);
  __m256 part = acc[0][0];
  for (int64_t v = groups * kIlp; v < vecs; ++v) part = _mm256_add_ps(part, squares8(x + v * L));
  for (int k = 1; k < kIlp; ++k) part = _mm256_add_ps(part, acc[0][k]);
  float total = 0.0f;
  for (int64_t t = vecs * L; t < n; ++t) total += bf2f(x[t]) * bf2f(x[t]);
  alignas(32) float lanes[L];
  _mm256_store_ps(lanes, part);
  for (int l = 0; l < L; ++l) total += lanes[l];
  return total;
}
#endif

// 1 / sqrt(mean(x^2) + eps) of one row, in fp32, rounded as torch rounds it.
float inv_rms(const uint16_t* x, int64_t n, float eps) {
#if defined(__AVX512F__)
  static_assert(kSumLanes == 8);
  float sum = sum_squares8(x, n);
#else
  float sum = sum_squares<kSumLanes>(x, n);
#endif
  return 1.0f / std::sqrt(sum / float(n) + eps);
}

// out = bf16(weight * bf16(x * inv_rms(x))), as glmv.layers.norm.RMSNorm rounds.
void norm_row(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t n, float eps) {
  float scale = inv_rms(x, n, eps);
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512 vs = _mm512_set1_ps(scale);
  for (; i + 16 <= n; i += 16) {
    const __m512 normed = round_bf16x16(_mm512_mul_ps(load_bf16x16(x + i), vs));
    store_bf16x16(out + i, round_bf16x16(_mm512_mul_ps(load_bf16x16(w + i), normed)));
  }
#endif
  for (; i < n; ++i) out[i] = f2bf(bf2f(w[i]) * round_bf(bf2f(x[i]) * scale));
}

// out = bf16(a + b) over n values
void add_row(const uint16_t* a, const uint16_t* b, uint16_t* out, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    store_bf16x16(out + i, round_bf16x16(_mm512_add_ps(load_bf16x16(a + i),
                                                       load_bf16x16(b + i))));
#endif
  for (; i < n; ++i) out[i] = f2bf(bf2f(a[i]) + bf2f(b[i]));
}

constexpr int64_t kRowGrain = 32;  // rows per thread task: small batches run on one thread

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  int64_t n = weight.size(0);
  check_rows(x, "x", n);
  check_bf16(weight, "weight");
  TORCH_CHECK(weight.is_contiguous(), "weight must be contiguous");
  auto out = at::empty({x.size(0), n}, x.options());
  const uint16_t* xp = bits(x);
  const uint16_t* wp = bits(weight);
  uint16_t* op = mbits(out);
  int64_t xs = x.stride(0);
  at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) norm_row(xp + r * xs, wp, op + r * n, n, float(eps));
  });
  return out;
}

// h = residual + (weight_x ? norm(x, weight_x) : x); out = norm(h, weight_out) if given.
void add_norm_impl(const at::Tensor& x, const at::Tensor& residual,
                   const c10::optional<at::Tensor>& weight_x, const at::Tensor* weight_out,
                   const at::Tensor& h, const at::Tensor* out, double eps) {
  int64_t n = residual.size(1);
  check_rows(x, "x", n);
  check_rows(residual, "residual", n);
  TORCH_CHECK(x.size(0) == residual.size(0), "x and residual must have the same rows");
  const uint16_t* wx = nullptr;
  if (weight_x.has_value()) {
    check_bf16(*weight_x, "weight_x");
    TORCH_CHECK(weight_x->is_contiguous() && weight_x->numel() == n, "weight_x must be [", n, "]");
    wx = bits(*weight_x);
  }
  const uint16_t* wo = nullptr;
  if (weight_out != nullptr) {
    check_bf16(*weight_out, "weight_out");
    TORCH_CHECK(weight_out->is_contiguous() && weight_out->numel() == n,
                "weight_out must be [", n, "]");
    wo = bits(*weight_out);
  }
  const uint16_t* xp = bits(x);
  const uint16_t* rp = bits(residual);
  uint16_t* hp = mbits(h);
  uint16_t* op = out != nullptr ? mbits(*out) : nullptr;
  int64_t xs = x.stride(0), rs = residual.stride(0);
  at::parallel_for(0, x.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> normed(wx != nullptr ? n : 0);
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* xr = xp + r * xs;
      if (wx != nullptr) {
        norm_row(xr, wx, normed.data(), n, float(eps));
        xr = normed.data();
      }
      const uint16_t* rr = rp + r * rs;
      uint16_t* hr = hp + r * n;
      add_row(rr, xr, hr, n);
      if (wo != nullptr) norm_row(hr, wo, op + r * n, n, float(eps));
    }
  });
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const c10::optional<at::Tensor>& weight_x,
                                                const at::Tensor& weight_out, double eps) {
  auto h = at::empty({residual.size(0), residual.size(1)}, residual.options());
  auto out = at::empty_like(h);
  add_norm_impl(x, residual, weight_x, &weight_out, h, &out, eps);
  return {h, out};
}

at::Tensor norm_add(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight,
                    double eps) {
  auto h = at::empty({residual.size(0), residual.size(1)}, residual.options());
  add_norm_impl(x, residual, weight, nullptr, h, nullptr, eps);
  return h;
}

#if GLMV_BF16_LANES
// bf16(bf16(silu(g)) * u) on 16 lanes of bf16 values g, u (held as fp32), as silu_and_mul
// rounds: exp512 is exp_approx's polynomial with fused multiply-adds.
inline __m256i swiglu16(__m512 gv, __m512 uv) {
  const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
  const __m512 sv = widen_bf16x16(
      cvt_bf16x16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e))));
  return cvt_bf16x16(_mm512_mul_ps(sv, uv));
}
#endif

// x [rows, 2 I] (gate | up) -> bf16(bf16(silu(gate)) * up), as F.silu(gate) * up rounds.
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "x must be [rows, 2 * width]");
  int64_t width = x.size(1) / 2;
  check_rows(x, "x", 2 * width);
  auto out = at::empty({x.size(0), width}, x.options());
  const uint16_t* xp = bits(x);
  uint16_t* op = mbits(out);
  int64_t xs = x.stride(0);
  // Split along the row too: a batch of a few rows still has thousands of exps per row.
  constexpr int64_t kChunk = 512;
  int64_t chunks = (width + kChunk - 1) / kChunk;
  at::parallel_for(0, x.size(0) * chunks, 4, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      int64_t r = task / chunks, c0 = (task % chunks) * kChunk;
      int64_t c1 = std::min(width, c0 + kChunk);
      const uint16_t* g = xp + r * xs;
      const uint16_t* u = g + width;
      uint16_t* o = op + r * width;
      int64_t i = c0;
#if GLMV_BF16_LANES
      for (; i + 16 <= c1; i += 16)  // the same steps 16 at a time
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + i),
                            swiglu16(load_bf16x16(g + i), load_bf16x16(u + i)));
#endif
      for (; i < c1; ++i) {
        float gv = bf2f(g[i]);
        float s = round_bf(gv / (1.0f + exp_approx(-gv)));
        o[i] = f2bf(s * bf2f(u[i]));
      }
    }
  });
  return out;
}

#if defined(__AVX512F__)
// rotary_ on 16 lanes (rotary_dim a multiple of 32, at most 256), bf16 tables (T =
// uint16_t) or fp32 ones (float): the same products, roundings and sums as its loop below,
// so the same bits; rot(x) by a lane permutation (interleaved: swap each pair, negate the
// first) or by whole vectors (NeoX).
inline __m512 load_table16(const uint16_t* p) { return load_bf16x16(p); }
inline __m512 load_table16(const float* p) { return _mm512_loadu_ps(p); }

template <typename T>
void rotary_512(uint16_t* qp, int64_t tokens, int64_t heads, int64_t ts, int64_t hs,
                const T* cp, int64_t cs, const T* sp, int64_t ss, int64_t rd, bool interleaved) {
  const int64_t nv = rd / 16;  // vectors per head (2 to 16)
  // the sign bit of every even lane (the low half of each 64-bit lane)
  const __m512i first_of_pair = _mm512_set1_epi64(int64_t(0x80000000u));
  const __m512i sign = _mm512_set1_epi32(int32_t(0x80000000u));
  at::parallel_for(0, tokens, 16, [&](int64_t t0, int64_t t1) {
    __m512 c[16], sn[16], x[16];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t j = 0; j < nv; ++j) {
        c[j] = load_table16(cp + t * cs + 16 * j);
        sn[j] = load_table16(sp + t * ss + 16 * j);
      }
      for (int64_t h = 0; h < heads; ++h) {
        uint16_t* v = qp + t * ts + h * hs;
        for (int64_t j = 0; j < nv; ++j) x[j] = load_bf16x16(v + 16 * j);
        for (int64_t j = 0; j < nv; ++j) {
          __m512 rot;
          if (interleaved) {
            rot = _mm512_castsi512_ps(_mm512_xor_si512(
                _mm512_castps_si512(_mm512_permute_ps(x[j], 0xB1)), first_of_pair));
          } else if (j < nv / 2) {
            rot = _mm512_castsi512_ps(
                _mm512_xor_si512(_mm512_castps_si512(x[j + nv / 2]), sign));
          } else {
            rot = x[j - nv / 2];
          }
          if constexpr (std::is_same_v<T, float>) {
            store_bf16x16(v + 16 * j, round_bf16x16(_mm512_add_ps(_mm512_mul_ps(x[j], c[j]),
                                                                   _mm512_mul_ps(rot, sn[j]))));
          } else {
            const __m512 a = round_bf16x16(_mm512_mul_ps(x[j], c[j]));
            const __m512 b = round_bf16x16(_mm512_mul_ps(rot, sn[j]));
            store_bf16x16(v + 16 * j, round_bf16x16(_mm512_add_ps(a, b)));
          }
        }
      }
    }
  });
}
#endif

// In place on qk [tokens, heads, head_dim] (unit stride along head_dim): the first
// rotary_dim = cos.size(1) dims of every head become bf16(bf16(x cos) + bf16(rot(x) sin)),
// rot pairing (x0, x1) GPT-J style ("interleaved") or the two halves NeoX style. With fp32
// cos/sin (the vision tower's rotary, which the reference applies in fp32) they become
// bf16(x cos + rot(x) sin) with fp32 products and sum instead.
void rotary_(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin,
             bool interleaved) {
  check_bf16(qk, "qk");
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1, "qk must be [tokens, heads, head_dim]");
  int64_t tokens = qk.size(0), heads = qk.size(1);
  int64_t rd = cos.size(1);
  const bool fp32 = cos.scalar_type() == at::kFloat;
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == cos.scalar_type() &&
                    (fp32 || t->scalar_type() == at::kBFloat16),
                "cos and sin must both be bfloat16 or both float32 CPU tensors");
    TORCH_CHECK(t->dim() == 2 && t->size(1) == rd && t->stride(1) == 1,
                "cos/sin must be [tokens, rotary_dim] with unit stride along the row");
  }
  TORCH_CHECK(cos.size(0) == tokens && sin.size(0) == tokens, "cos/sin must have a row per token");
  TORCH_CHECK(rd % 2 == 0 && rd <= qk.size(2), "rotary_dim must be even and <= head_dim");
  uint16_t* qp = mbits(qk);
  const char* cp = static_cast<const char*>(cos.data_ptr());
  const char* sp = static_cast<const char*>(sin.data_ptr());
  const int64_t elem = cos.element_size();
  int64_t ts = qk.stride(0), hs = qk.stride(1), cs = cos.stride(0), ss = sin.stride(0);
  int64_t half = rd / 2;
#if defined(__AVX512F__)
  if (rd % 32 == 0 && rd <= 256) {
    if (fp32) {
      rotary_512(qp, tokens, heads, ts, hs, reinterpret_cast<const float*>(cp), cs,
                 reinterpret_cast<const float*>(sp), ss, rd, interleaved);
    } else {
      rotary_512(qp, tokens, heads, ts, hs, reinterpret_cast<const uint16_t*>(cp), cs,
                 reinterpret_cast<const uint16_t*>(sp), ss, rd, interleaved);
    }
    return;
  }
#endif
  at::parallel_for(0, tokens * heads, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> x(rd), c(rd), s(rd), r(rd);
    int64_t row = -1;
    for (int64_t task = begin; task < end; ++task) {
      int64_t t = task / heads, h = task % heads;
      if (t != row) {  // this token's cos/sin as floats
        row = t;
        const char* cr = cp + t * cs * elem;
        const char* sr = sp + t * ss * elem;
        for (int64_t i = 0; i < rd; ++i) {
          c[i] = fp32 ? reinterpret_cast<const float*>(cr)[i]
                      : bf2f(reinterpret_cast<const uint16_t*>(cr)[i]);
          s[i] = fp32 ? reinterpret_cast<const float*>(sr)[i]
                      : bf2f(reinterpret_cast<const uint16_t*>(sr)[i]);
        }
      }
      uint16_t* v = qp + t * ts + h * hs;
      for (int64_t i = 0; i < rd; ++i) x[i] = bf2f(v[i]);
      // rot(x) first, then one branch-free loop per rounding (so that both vectorise)
      float* rot = r.data();
      if (interleaved) {
        for (int64_t i = 0; i < rd; i += 2) {
          rot[i] = -x[i + 1];
          rot[i + 1] = x[i];
        }
      } else {
        for (int64_t i = 0; i < half; ++i) rot[i] = -x[i + half];
        for (int64_t i = half; i < rd; ++i) rot[i] = x[i - half];
      }
      if (fp32) {
        for (int64_t i = 0; i < rd; ++i) {
          float a = x[i] * c[i];
          float b = rot[i] * s[i];
          v[i] = f2bf(a + b);
        }
      } else {
        for (int64_t i = 0; i < rd; ++i)
          v[i] = f2bf(round_bf(x[i] * c[i]) + round_bf(rot[i] * s[i]));
      }
    }
  });
}

void check_cache(const at::Tensor& kv_cache) {
  check_bf16(kv_cache, "kv_cache");
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [2, blocks, block_size, kv_heads, head_dim]");
}

// kv_cache[0/1] slot slot_mapping[t] <- k[t], v[t]; k, v [tokens, kv_heads, head_dim], each
// token's heads contiguous (views into the fused qkv output are fine).
void write_kv(const at::Tensor& kv_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  check_cache(kv_cache);
  check_bf16(k, "k");
  check_bf16(v, "v");
  int64_t kvh = kv_cache.size(3), d = kv_cache.size(4);
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(t->dim() == 3 && t->size(1) == kvh && t->size(2) == d && t->stride(2) == 1 &&
                    t->stride(1) == d,
                "k and v must be [tokens, kv_heads, head_dim] with each token's heads contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == k.size(0) && v.size(0) == k.size(0),
              "slot_mapping must be int64 with one slot per token");
  int64_t row = kvh * d;
  int64_t slots = kv_cache.size(1) * kv_cache.size(2);
  uint16_t* kc = mbits(kv_cache);
  uint16_t* vc = kc + slots * row;
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  const uint16_t* kp = bits(k);
  const uint16_t* vp = bits(v);
  int64_t ks = k.stride(0), vs = v.stride(0);
  for (int64_t t = 0; t < k.size(0); ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "slot ", slot[t], " out of range");
  at::parallel_for(0, k.size(0), 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + slot[t] * row, kp + t * ks, row * sizeof(uint16_t));
      std::memcpy(vc + slot[t] * row, vp + t * vs, row * sizeof(uint16_t));
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Linear layers on lane blocks: y = x W^T (+ b), for the int8 product of --quantization int8
// and the bf16 product of every bf16 linear layer on a CPU with AVX-512.
//
// Weights come in blocks [Np / 16][Kp / G][16][G]: for 16 output channels, each group of G
// inputs that one 32-bit lane holds (int8: G = 4, bf16: G = 2). One 512-bit load is then one
// 64-byte line of 16 channels x G inputs, and a 32-bit broadcast of a row's G inputs multiplies
// it (vpdpbusd: 64 int8 products, vdpbf16ps: 32 bf16 products per instruction), accumulating
// 16 outputs per register with no horizontal sums. A thread's share of the channels is one
// sequential stream of lines, which the hardware prefetchers follow at the speed of a plain
// sum: at one row (decode) oneDNN's packed bf16 products read the same weights ~20% slower on
// AVX512-BF16 machines. A block of 8 rows x 32 channels keeps 16 accumulators; a strip of 32
// channels' weights stays in L1/L2 while every block of rows passes over it, so a batch reads
// the weights from memory once (and prefill-sized bf16 batches run at oneDNN's speed).
// N and K are padded (Np to 16, Kp to G) with zero weights; per-channel vectors to Np.

constexpr int64_t kLaneChannels = 16;

#if GLMV_BF16_LANES
// two bf16 at `x` in every 32-bit lane (a broadcast from memory: one load, no shuffle)
inline bf16x32 bcast_pair(const uint16_t* x) {
  float pair;
  std::memcpy(&pair, x, sizeof pair);
  return as_bf16x32(_mm512_castps_si512(_mm512_set1_ps(pair)));
}

// The two dot products (D): accumulator type, the group of inputs per lane, and the steps.
#if defined(__AVX512VNNI__)
struct Int8Dot {
  using Acc = __m512i;
  using Vec = __m512i;
  using W = int8_t;
  using X = uint8_t;
  static constexpr int64_t kGroup = 4;
  static Acc zero() { return _mm512_setzero_si512(); }
  static Vec bcast(const X* x) {  // a row's 4 inputs in every 32-bit lane
    int32_t quad;
    std::memcpy(&quad, x, sizeof quad);
    return _mm512_set1_epi32(quad);
  }
  static Vec load(const W* w) { return _mm512_loadu_si512(w); }
  static Acc dot(Acc acc, Vec x, Vec w) { return _mm512_dpbusd_epi32(acc, x, w); }
  static Acc add(Acc a, Acc b) { return _mm512_add_epi32(a, b); }
};
#endif

#if defined(__AVX512BF16__)
struct Bf16Dot {
  using Acc = __m512;
  using Vec = bf16x32;
  using W = uint16_t;
  using X = uint16_t;
  static constexpr int64_t kGroup = 2;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Vec bcast(const X* x) { return bcast_pair(x); }
  static Vec load(const W* w) { return as_bf16x32(_mm512_loadu_si512(w)); }
  static Acc dot(Acc acc, Vec x, Vec w) { return dot_bf16(acc, x, w); }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
};
#else
// dot_bf16's arithmetic with each operand widened once: a line of weights into its odd and
// even inputs' fp32 values as it is loaded (shared by every row of a block), and the rows'
// inputs staged as fp32 (bf16_product), so that a row's pair is two broadcasts from memory.
// A block of 8 rows then spends 4 integer operations per pair of lines beside its 32 fused
// multiply-adds, where widening at every product took 20.
struct Bf16Dot {
  struct Vec {
    __m512 odd, even;
  };
  using Acc = __m512;
  using W = uint16_t;
  using X = float;
  static constexpr int64_t kGroup = 2;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Vec bcast(const X* x) { return {_mm512_set1_ps(x[1]), _mm512_set1_ps(x[0])}; }
  static Vec load(const W* w) {
    const __m512i line = _mm512_loadu_si512(w);
    const __m512i odd = _mm512_and_si512(line, _mm512_set1_epi32(int32_t(0xffff0000u)));
    return {_mm512_castsi512_ps(odd), _mm512_castsi512_ps(_mm512_slli_epi32(line, 16))};
  }
  static Acc dot(Acc acc, const Vec& x, const Vec& w) {
    return _mm512_fmadd_ps(x.even, w.even, _mm512_fmadd_ps(x.odd, w.odd, acc));
  }
  static Acc add(Acc a, Acc b) { return _mm512_add_ps(a, b); }
};
#endif

// Lines of a channel block's weights requested this many groups before a block of rows
// multiplies them. A block of 8 rows (16 dot instructions per pair of lines) fills the core's
// window with arithmetic, so without it only the lines a few groups ahead are in flight: at
// 8-64 rows over weights in memory (a decode batch) the products read 35-45 GB/s where a
// single row's stream reads ~70. 64 groups (4 KiB a stream): 16 rows over the 12 layers
// 9.5 -> 8.1 ms and the LM head 9.2 -> 8.5 ms, 64 rows 23.9 -> 22.5 and 25.8 -> 23.0
// (2 vCPU AMD EPYC, AVX512-BF16); 32 and 128 groups were slower than 64. Prefill-sized
// batches (weights in L2 after the first block of rows) run as fast as before. Blocks of 1-4
// rows request theirs as well: there the hardware prefetchers alone kept up on that EPYC,
// but on a Xeon (2 vCPU, AVX512F without BF16, weights in 2 MiB pages) their streams stopped
// at every 4 KiB boundary: one row over the LM head 12.0-12.5 -> 10.0-10.3 ms (25 -> 30 GB/s,
// the rate of torch.sum over huge pages), 12 layers' products 22.5-23.4 -> 18.8-19.5 ms, and
// 2-4 rows 23-25% faster.
constexpr int64_t kPrefetchGroups = 64;

inline void prefetch_line(const void* p) {
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
}

// What a block of rows requests from memory beside its arithmetic: the lines of its own
// channel blocks kPrefetchGroups groups ahead (`own`: the first block of rows over them; the
// later ones find them in L2), and a share of the next channel blocks' lines (into L2), so
// that below kStreamRows rows the next strip streams in while the arithmetic over this one
// runs. Without it the first block of rows over a strip waited for memory while the others
// computed from L2: 64 rows over weights in memory ran at ~75% of the instruction's rate.
// 2 vCPU AMD EPYC (Zen 5, AVX512-BF16, 28-45 GB/s), in-process and interleaved, best of 12:
// 12 layers' products of the bench checkpoint at 64 rows 24.0 -> 21.4 ms and its LM head
// 25.0 -> 22.7, 32 rows 14.0 -> 11.6, 16 rows 8.5 -> 7.3; 1-8 rows unchanged.
struct Ahead {
  const char* next = nullptr;  // the first of `lines` 64-byte lines to request
  int64_t lines = 0;
  bool own = true;
};

// An Ahead's `lines` requested evenly over a pass of `groups` groups: step() once per group.
struct AheadStream {
  const char* p;
  int64_t lines, groups, due = 0;
  AheadStream(const Ahead& ahead, int64_t num_groups)
      : p(ahead.next), lines(ahead.lines), groups(num_groups) {}
  void step() {
    for (due += lines; due >= groups; due -= groups, p += 64) _mm_prefetch(p, _MM_HINT_T1);
  }
};

// run(): pass<own, stream> with the requests an Ahead asks for compiled in, so that a block of
// rows that makes none (prefill-sized batches) runs the bare loop.
#define GLMV_AHEAD_DISPATCH(a, m0, nb0, ahead, acc)                        \
  if (ahead.lines > 0) {                                                   \
    if (ahead.own) pass<true, true>(a, m0, nb0, ahead, acc);               \
    else pass<false, true>(a, m0, nb0, ahead, acc);                        \
  } else {                                                                 \
    if (ahead.own) pass<true, false>(a, m0, nb0, ahead, acc);              \
    else pass<false, false>(a, m0, nb0, ahead, acc);                       \
  }

// acc[i][j] = sum over K of x row m0 + i times the weights of channel block nb0 + j, for
// arguments A with x [M, xs] (groups of inputs), w (blocks), kp and xs.
template <class D, int MB, int NB>
struct LaneAccumulate {
  template <class A>
  static void run(const A& a, int64_t m0, int64_t nb0, const Ahead& ahead,
                  typename D::Acc (&acc)[MB][NB]) {
    GLMV_AHEAD_DISPATCH(a, m0, nb0, ahead, acc)
  }
  template <bool kOwn, bool kStream, class A>
  static void pass(const A& a, int64_t m0, int64_t nb0, const Ahead& ahead,
                   typename D::Acc (&acc)[MB][NB]) {
    const int64_t groups = a.kp / D::kGroup;
    for (int i = 0; i < MB; ++i)
      for (int j = 0; j < NB; ++j) acc[i][j] = D::zero();
    const typename D::W* wb = a.w + nb0 * groups * 64 / sizeof(typename D::W);
    AheadStream next(ahead, groups);
    for (int64_t g = 0; g < groups; ++g) {
      typename D::Vec wv[NB];
      if constexpr (kOwn) {
        for (int j = 0; j < NB; ++j)
          prefetch_line(wb + (j * groups + g + kPrefetchGroups) * 64 / sizeof(*wb));
      }
      if constexpr (kStream) next.step();
      for (int j = 0; j < NB; ++j) wv[j] = D::load(wb + (j * groups + g) * 64 / sizeof(*wb));
      for (int i = 0; i < MB; ++i) {
        const typename D::Vec xv = D::bcast(a.x + (m0 + i) * a.xs + g * D::kGroup);
        for (int j = 0; j < NB; ++j) acc[i][j] = D::dot(acc[i][j], xv, wv[j]);
      }
    }
  }
};

// One row (decode): two chains per channel block (even and odd groups), so that the dot
// instruction's latency never holds the stream back.
template <class D>
struct LaneAccumulate<D, 1, 2> {
  template <class A>
  static void run(const A& a, int64_t m0, int64_t nb0, const Ahead&,
                  typename D::Acc (&acc)[1][2]) {
    constexpr int64_t line = 64 / sizeof(typename D::W);
    const int64_t groups = a.kp / D::kGroup;
    const typename D::W* w0 = a.w + nb0 * groups * line;
    const typename D::W* w1 = w0 + groups * line;
    const typename D::X* x = a.x + m0 * a.xs;
    typename D::Acc c0 = D::zero(), c1 = c0, d0 = c0, d1 = c0;
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
      prefetch_line(w0 + (g + kPrefetchGroups) * line);
      prefetch_line(w1 + (g + kPrefetchGroups) * line);
      prefetch_line(w0 + (g + 1 + kPrefetchGroups) * line);
      prefetch_line(w1 + (g + 1 + kPrefetchGroups) * line);
      const typename D::Vec x0 = D::bcast(x + g * D::kGroup);
      const typename D::Vec x1 = D::bcast(x + (g + 1) * D::kGroup);
      c0 = D::dot(c0, x0, D::load(w0 + g * line));
      c1 = D::dot(c1, x0, D::load(w1 + g * line));
      d0 = D::dot(d0, x1, D::load(w0 + (g + 1) * line));
      d1 = D::dot(d1, x1, D::load(w1 + (g + 1) * line));
    }
    if (g < groups) {
      const typename D::Vec x0 = D::bcast(x + g * D::kGroup);
      c0 = D::dot(c0, x0, D::load(w0 + g * line));
      c1 = D::dot(c1, x0, D::load(w1 + g * line));
    }
    acc[0][0] = D::add(c0, d0);
    acc[0][1] = D::add(c1, d1);
  }
};

// The hot block (8 rows x 32 channels) with its 16 accumulators as named variables: from the
// array above gcc 12 copied accumulators between registers and spilled two to the stack on
// every iteration (the dot instructions' accumulator is both input and output).
template <class D>
struct LaneAccumulate<D, 8, 2> {
  template <class A>
  static void run(const A& a, int64_t m0, int64_t nb0, const Ahead& ahead,
                  typename D::Acc (&acc)[8][2]) {
    GLMV_AHEAD_DISPATCH(a, m0, nb0, ahead, acc)
  }
  template <bool kOwn, bool kStream, class A>
  static void pass(const A& a, int64_t m0, int64_t nb0, const Ahead& ahead,
                   typename D::Acc (&acc)[8][2]) {
    constexpr int64_t line = 64 / sizeof(typename D::W);
    const int64_t groups = a.kp / D::kGroup, xs = a.xs;
    typename D::Acc c00 = D::zero(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
                    c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00,
                    c60 = c00, c61 = c00, c70 = c00, c71 = c00;
    const typename D::W* w0p = a.w + nb0 * groups * line;
    const typename D::W* w1p = w0p + groups * line;
    const typename D::X* x = a.x + m0 * xs;
    AheadStream next(ahead, groups);
    for (int64_t g = 0; g < groups; ++g) {
      if constexpr (kOwn) {
        prefetch_line(w0p + (g + kPrefetchGroups) * line);
        prefetch_line(w1p + (g + kPrefetchGroups) * line);
      }
      if constexpr (kStream) next.step();
      const typename D::Vec w0 = D::load(w0p + g * line);
      const typename D::Vec w1 = D::load(w1p + g * line);
      const typename D::X* xg = x + g * D::kGroup;
#define GLMV_LANE_ROW(i, lo, hi)                              \
  {                                                           \
    const typename D::Vec xv = D::bcast(xg + (i) * xs);       \
    lo = D::dot(lo, xv, w0);                                  \
    hi = D::dot(hi, xv, w1);                                  \
  }
      GLMV_LANE_ROW(0, c00, c01) GLMV_LANE_ROW(1, c10, c11)
      GLMV_LANE_ROW(2, c20, c21) GLMV_LANE_ROW(3, c30, c31)
      GLMV_LANE_ROW(4, c40, c41) GLMV_LANE_ROW(5, c50, c51)
      GLMV_LANE_ROW(6, c60, c61) GLMV_LANE_ROW(7, c70, c71)
#undef GLMV_LANE_ROW
    }
    acc[0][0] = c00; acc[0][1] = c01; acc[1][0] = c10; acc[1][1] = c11;
    acc[2][0] = c20; acc[2][1] = c21; acc[3][0] = c30; acc[3][1] = c31;
    acc[4][0] = c40; acc[4][1] = c41; acc[5][0] = c50; acc[5][1] = c51;
    acc[6][0] = c60; acc[6][1] = c61; acc[7][0] = c70; acc[7][1] = c71;
  }
};

// the lanes of [n, n + 16) below total (output channels, keys); none when n >= total
inline __mmask16 channel_mask(int64_t n, int64_t total) {
  return total - n >= kLaneChannels ? __mmask16(0xffff)
         : total > n                ? __mmask16((1u << (total - n)) - 1)
                                    : __mmask16(0);
}
#endif


// -- int8 (W8A8, --quantization int8): y = x W^T + b with W int8 per output channel (scale
// sw[n]) and x quantized per row here (symmetric, scale sx[m]):
//   y[m, n] = (sum_k (xq[m, k] + 128) w[n, k] - 128 wsum[n]) * sx[m] * sw[n] + b[n]
// The +128 makes the activations unsigned for AVX512-VNNI's u8 x s8 dot (the weights used as
// stored); wsum[n] = sum_k w[n, k] removes it. Blocks [Np / 16][Kp / 4][16][4].

constexpr int64_t kInt8Group = 4;

// out_stride 0: out in AMX's tiles (amx_x_layout: per 16 rows, one 1 KiB tile of 64 inputs
// per K step), else rows out_stride bytes apart.
void quantize_rows(const uint16_t* x, int64_t rows, int64_t k, int64_t kp, int64_t stride,
                   int64_t out_stride, uint8_t* out, float* scale) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> staged(out_stride == 0 ? kp : 0);
    for (int64_t m = r0; m < r1; ++m) {
      const uint16_t* r = x + m * stride;
      // max |x| on the bits (for finite values and inf the order of |x|; NaNs skipped, as
      // std::max(amax, NaN) would): an integer reduction that vectorises
      uint16_t top = 0;
      for (int64_t i = 0; i < k; ++i) {
        const uint16_t a = r[i] & 0x7fff;
        top = std::max<uint16_t>(top, a > 0x7f80 ? 0 : a);
      }
      const float amax = bf2f(top);
      float s = amax > 0.f ? amax / 127.f : 1.f;
      float inv = 1.f / s;
      uint8_t* o = out_stride == 0 ? staged.data() : out + m * out_stride;
      int64_t i = 0;
#if defined(__AVX512BW__)
      // the same products and round-to-nearest-even as the loop below, 16 at a time
      const __m512 vinv = _mm512_set1_ps(inv);
      const __m512i offset = _mm512_set1_epi32(128);
      for (; i + 16 <= k; i += 16) {
        const __m512i bf = _mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + i)));
        const __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(bf, 16));
        const __m512i q = _mm512_add_epi32(
            _mm512_cvt_roundps_epi32(_mm512_mul_ps(xv, vinv),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
            offset);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i), _mm512_cvtepi32_epi8(q));
      }
#endif
      for (; i < k; ++i) {
        o[i] = uint8_t(int32_t(std::nearbyint(bf2f(r[i]) * inv)) + 128);
      }
      for (int64_t i = k; i < kp; ++i) o[i] = 128;
      if (out_stride == 0) {  // the row's 64-input pieces into its tiles
        uint8_t* tiles = out + m / 16 * kp * 16 + m % 16 * 64;
        for (int64_t j = 0; j < kp; j += 64) std::memcpy(tiles + j * 16, o + j, 64);
      }
      scale[m] = s;
    }
  });
}

struct Int8Args {
  const uint8_t* x;     // [M, Kp] quantized rows, +128
  const int8_t* w;      // VNNI blocks
  const float* sx;      // [M]
  const float* sw;      // [Np]
  const int32_t* wsum;  // [Np]
  const float* bias;    // [Np] or null
  uint16_t* y;          // [M, N] bf16
  int64_t kp, n;
  int64_t xs;           // row stride of x: Kp plus 64 bytes, so that the rows of a block do not
                        // share L1 sets (Kp a multiple of 4096 made them alias and thrash)
};

#if defined(__AVX512VNNI__) && GLMV_BF16_LANES
// The int8 product's epilogue for the 16 channels from n (both kernels, VNNI and AMX): a row's
// int32 sums to y = (sum - 128 wsum) * sx * sw + bias, rounded to bf16.
struct Int8Epilogue {
  const Int8Args& a;
  int64_t n;
  __mmask16 keep;
  __m512i offset;
  __m512 sw, bias;
  Int8Epilogue(const Int8Args& args, int64_t n0)
      : a(args), n(n0), keep(channel_mask(n0, args.n)),
        offset(_mm512_mullo_epi32(_mm512_loadu_si512(args.wsum + n0), _mm512_set1_epi32(128))),
        sw(_mm512_loadu_ps(args.sw + n0)),
        bias(args.bias != nullptr ? _mm512_loadu_ps(args.bias + n0) : _mm512_setzero_ps()) {}
  void store(__m512i sums, int64_t m) const {
    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, offset));
    v = _mm512_fmadd_ps(_mm512_mul_ps(v, _mm512_set1_ps(a.sx[m])), sw, bias);
    _mm256_mask_storeu_epi16(a.y + m * a.n + n, keep, cvt_bf16x16(v));
  }
};

template <int MB, int NB>
void lane_block(const Int8Args& a, int64_t m0, int64_t nb0, const Ahead& ahead) {
  __m512i acc[MB][NB];
  LaneAccumulate<Int8Dot, MB, NB>::run(a, m0, nb0, ahead, acc);
  for (int j = 0; j < NB; ++j) {
    const int64_t n = (nb0 + j) * kLaneChannels;
    if (n >= a.n) break;
    const Int8Epilogue out(a, n);
    for (int i = 0; i < MB; ++i) out.store(acc[i][j], m0 + i);
  }
}
constexpr bool kVnniKernel = true;
#else
template <int MB, int NB>
void lane_block(const Int8Args& a, int64_t m0, int64_t nb0, const Ahead&) {
  const int64_t quads = a.kp / kInt8Group;
  for (int j = 0; j < NB; ++j) {
    const int8_t* wb = a.w + (nb0 + j) * quads * 64;
    for (int64_t lane = 0; lane < kLaneChannels; ++lane) {
      const int64_t n = (nb0 + j) * kLaneChannels + lane;
      if (n >= a.n) break;
      for (int i = 0; i < MB; ++i) {
        int32_t dot = 0;
        const uint8_t* xr = a.x + (m0 + i) * a.xs;
        for (int64_t q = 0; q < quads; ++q)
          for (int64_t t = 0; t < kInt8Group; ++t)
            dot += int32_t(xr[q * kInt8Group + t]) *
                   int32_t(wb[(q * kLaneChannels + lane) * kInt8Group + t]);
        float v = float(dot - 128 * a.wsum[n]) * a.sx[m0 + i] * a.sw[n];
        if (a.bias != nullptr) v += a.bias[n];
        a.y[(m0 + i) * a.n + n] = f2bf(v);
      }
    }
  }
}
constexpr bool kVnniKernel = false;
#endif

// -- bf16: y = bf16(x W^T + b), fp32 sums, the bias added in fp32.
// Blocks [Np / 16][Kp / 2][16][2].

constexpr int64_t kBf16Group = 2;

// One row's argmax over some channels, as torch.argmax takes it: the largest value, the first
// index among equal ones, and any NaN before everything (the first NaN).
struct RowBest {
  float value = 0.0f;
  int64_t index = -1;  // -1: no channel seen yet
  int64_t nan = -1;    // the first NaN's channel, -1: none

  // fold in the channels of `other` (another range of channels, before or after these)
  void merge(const RowBest& other) {
    if (other.nan >= 0 && (nan < 0 || other.nan < nan)) nan = other.nan;
    if (other.index >= 0 && (index < 0 || other.value > value ||
                             (other.value == value && other.index < index))) {
      value = other.value;
      index = other.index;
    }
  }
};

// The rows' inputs as the lane kernel reads them: bf16, or fp32 where it widens them first.
#if GLMV_BF16_LANES
using Bf16X = Bf16Dot::X;
#else
using Bf16X = uint16_t;
#endif

struct Bf16Args {
  const Bf16X* x;      // [M, xs] rows, zero past K (AMX: uint16_t tiles)
  const uint16_t* w;   // blocks
  const float* bias;   // [Np] or null
  uint16_t* y;         // [M, n]
  int64_t kp, n, xs;   // xs: Kp plus 32 elements, so that a block's rows do not share L1 sets
  // SwiGLU weights (glmv.layers.linear.swiglu_order): each pair of blocks is 16 gate and
  // the same 16 up channels, and y [M, n] is bf16(bf16(silu(gate)) * up), n channels wide.
  bool swiglu = false;
  // Greedy choice instead of y: each thread keeps, per row, the index of the largest bf16
  // value among the channels it multiplies (best[thread * m + row]; y is not written).
  RowBest* best = nullptr;
  int64_t m = 0;
};

#if GLMV_BF16_LANES
// The bf16 product's epilogue for the 16 channels from n (both kernels, AVX512 and AMX): a
// row's fp32 sums plus the bias, rounded to bf16.
struct Bf16Epilogue {
  const Bf16Args& a;
  int64_t n;
  __mmask16 keep;
  __m512 bias;
  Bf16Epilogue(const Bf16Args& args, int64_t n0)
      : a(args), n(n0), keep(channel_mask(n0, args.n)),
        bias(args.bias != nullptr ? _mm512_loadu_ps(args.bias + n0) : _mm512_setzero_ps()) {}
  void store(__m512 sums, int64_t m) const {
    const __m256i rounded = cvt_bf16x16(_mm512_add_ps(sums, bias));
    if (a.best != nullptr) {
      choose(rounded, a.best[int64_t(at::get_thread_num()) * a.m + m]);
    } else {
      _mm256_mask_storeu_epi16(a.y + m * a.n + n, keep, rounded);
    }
  }
  // the greedy choice among 16 more channels (from n, after the row's earlier ones)
  void choose(__m256i rounded, RowBest& b) const {
    const __m512 v = widen_bf16x16(rounded);
    const __mmask16 nan = _mm512_mask_cmp_ps_mask(keep, v, v, _CMP_UNORD_Q);
    if (nan != 0) {
      if (b.nan < 0) b.nan = n + __builtin_ctz(nan);
      return;
    }
    const float top = _mm512_mask_reduce_max_ps(keep, v);
    if (b.index < 0 || top > b.value) {
      const __mmask16 at = _mm512_mask_cmp_ps_mask(keep, v, _mm512_set1_ps(top), _CMP_EQ_OQ);
      b.value = top;
      b.index = n + __builtin_ctz(at);
    }
  }
};

// The epilogue of a SwiGLU pair of blocks (gate then up channels 16 q .. 16 q + 15): a row's
// two fp32 sums plus their biases, each rounded to bf16 as the product rounds it, then
// silu(gate) * up as silu_and_mul rounds it.
struct SwigluEpilogue {
  const Bf16Args& a;
  int64_t n;
  __mmask16 keep;
  __m512 gate_bias, up_bias;
  SwigluEpilogue(const Bf16Args& args, int64_t pair)
      : a(args), n(pair * kLaneChannels), keep(channel_mask(n, args.n)),
        gate_bias(bias_at(args, 2 * n)), up_bias(bias_at(args, 2 * n + kLaneChannels)) {}
  static __m512 bias_at(const Bf16Args& args, int64_t c) {
    return args.bias != nullptr ? _mm512_loadu_ps(args.bias + c) : _mm512_setzero_ps();
  }
  static __m512 rounded(__m512 sums, __m512 bias) {
    return widen_bf16x16(cvt_bf16x16(_mm512_add_ps(sums, bias)));
  }
  void store(__m512 gate, __m512 up, int64_t m) const {
    _mm256_mask_storeu_epi16(a.y + m * a.n + n, keep,
                             swiglu16(rounded(gate, gate_bias), rounded(up, up_bias)));
  }
};

template <int MB, int NB>
void lane_block(const Bf16Args& a, int64_t m0, int64_t nb0, const Ahead& ahead) {
  __m512 acc[MB][NB];
  LaneAccumulate<Bf16Dot, MB, NB>::run(a, m0, nb0, ahead, acc);
  if constexpr (NB == 2) {
    if (a.swiglu) {
      const SwigluEpilogue out(a, nb0 / 2);
      for (int i = 0; i < MB; ++i) out.store(acc[i][0], acc[i][1], m0 + i);
      return;
    }
  }
  for (int j = 0; j < NB; ++j) {
    const int64_t n = (nb0 + j) * kLaneChannels;
    if (n >= a.n) break;
    const Bf16Epilogue out(a, n);
    for (int i = 0; i < MB; ++i) out.store(acc[i][j], m0 + i);
  }
}
constexpr bool kBf16Linear = true;
#else
template <int MB, int NB>
void lane_block(const Bf16Args& a, int64_t m0, int64_t nb0, const Ahead&) {
  const int64_t pairs = a.kp / kBf16Group;
  TORCH_CHECK(!a.swiglu, "glmv: SwiGLU products need AVX-512");
  for (int j = 0; j < NB; ++j) {
    const uint16_t* wb = a.w + (nb0 + j) * pairs * 32;
    for (int64_t lane = 0; lane < kLaneChannels; ++lane) {
      const int64_t n = (nb0 + j) * kLaneChannels + lane;
      if (n >= a.n) break;
      for (int i = 0; i < MB; ++i) {
        const uint16_t* xr = a.x + (m0 + i) * a.xs;
        float dot = 0.f;
        for (int64_t p = 0; p < pairs; ++p)
          for (int64_t t = 0; t < kBf16Group; ++t)
            dot += bf2f(xr[p * kBf16Group + t]) * bf2f(wb[(p * kLaneChannels + lane) * 2 + t]);
        if (a.bias != nullptr) dot += a.bias[n];
        a.y[(m0 + i) * a.n + n] = f2bf(dot);
      }
    }
  }
}
constexpr bool kBf16Linear = false;
#endif

// Rows [0, m) of channel blocks nb0 .. nb0 + NB - 1, in blocks of 8, 4, 2 and 1 rows;
// lane_block<MB, NB>(a, m0, nb0) is each product's own (it computes and stores one block).
// With `next` (the lines of the thread's next channel blocks), the blocks of rows share out
// requesting them (Ahead; a single row's stream keeps to its own lines). From kStreamRows rows
// (prefill) the arithmetic over a strip hides its reads anyway, and each block of rows
// requests its own lines only: the requests' bookkeeping in the loop cost 2-5% there.
constexpr int64_t kStreamRows = 128;
template <int NB, class A>
void lane_rows(const A& a, int64_t m, int64_t nb0, const char* next = nullptr,
               int64_t next_lines = 0) {
  const int64_t blocks = m / 8 + m % 8 / 4 + m % 4 / 2 + m % 2;
  if (m >= kStreamRows) next = nullptr;
  int64_t i = 0, b = 0;
  auto ahead = [&] {  // block b's share (the first block of rows, i = 0, also its own lines)
    Ahead h;
    if (next != nullptr) {
      const int64_t lo = b * next_lines / blocks, hi = (b + 1) * next_lines / blocks;
      h.next = next + lo * 64;
      h.lines = hi - lo;
    }
    h.own = i == 0 || next == nullptr;
    ++b;
    return h;
  };
  for (; i + 8 <= m; i += 8) lane_block<8, NB>(a, i, nb0, ahead());
  for (; i + 4 <= m; i += 4) lane_block<4, NB>(a, i, nb0, ahead());
  for (; i + 2 <= m; i += 2) lane_block<2, NB>(a, i, nb0, ahead());
  for (; i < m; ++i) lane_block<1, NB>(a, i, nb0, ahead());
}

// All rows x all channel blocks, the pairs of blocks split over the threads.
template <class A>
void lane_product(const A& a, int64_t m, int64_t nblocks) {
  const int64_t pairs = (nblocks + 1) / 2;
  const int64_t block_lines = a.kp * int64_t(sizeof(*a.w)) / 4;  // 16 channels, 64-byte lines
  const char* w = reinterpret_cast<const char*>(a.w);
  at::parallel_for(0, pairs, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      // the thread's next pair of channel blocks, if any
      const int64_t after = p + 1 < p1 ? std::min<int64_t>(2, nblocks - 2 * p - 2) : 0;
      const char* next = after > 0 ? w + (2 * p + 2) * block_lines * 64 : nullptr;
      if (2 * p + 1 < nblocks) {
        lane_rows<2>(a, m, 2 * p, next, after * block_lines);
      } else {
        lane_rows<1>(a, m, 2 * p, next, after * block_lines);
      }
    }
  });
}

// -- AMX (Sapphire Rapids and later): the same blocks as tiles. A tile row is 64 bytes, so
// one channel block's 16 lines of a K stretch (bf16: 32 inputs, int8: 64) are one B tile of
// 16 rows, stored contiguously (row stride 64 bytes) — the layout TDPBF16PS and TDPBUSD take
// with no repacking; Kp is padded to a whole tile (glmv.layers.linear.lane_blocks). x is
// copied into tiles the same way (amx_x_layout: rows padded to 16, each A tile 1 KiB in
// sequence). Each step multiplies 32 rows x 32 channels in four
// accumulator tiles. Used from a few rows on (prefill, batched decode): there the products
// are compute-bound and AMX does 8x the work per cycle of AVX512; single rows stay on the
// AVX512 stream above. Sums run in another order than vdpbf16ps (tile rows of 32 inputs), so
// bf16 results may differ in the last bit between the two paths; int8 sums are exact.

constexpr int64_t kTileRows = 16;
// Rows from which each product takes AMX (linear_amx_rows): below them the AVX512 kernels are
// as fast (bf16: 4 rows even, 8 rows 1.8x faster on AMX; int8: 8 rows 10% slower on AMX).
int64_t g_amx_rows_bf16 = 8, g_amx_rows_int8 = 16;

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__) && \
    defined(__AVX512BF16__) && defined(__AVX512VNNI__)
#define GLMV_AMX 1
constexpr bool kAmxBuilt = true;

// Linux hands out the tile state only on request (once per process).
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tiles 0-3: accumulators (rows 0-15 x block 0, 0-15 x 1, 16-31 x 0, 16-31 x 1); 4, 5: x
// rows; 6, 7: weight blocks. All 64 bytes wide; accumulators and x `rows` high (fewer than 16
// for a product of fewer rows), weights 16. Tile 5 is 16 high either way: x rows 16-31 exist
// only in products of more than 16 rows, and below that amx_quad loads weights into it.
void load_tile_config(int64_t rows = kTileRows) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = t < 5 ? uint8_t(rows) : uint8_t(kTileRows);
  }
  _tile_loadconfig(&cfg);
}

constexpr int64_t kAmxPrefetchSteps = 4;

// accumulator tile c += a . b: int8 (u8 x s8 -> int32) or bf16 (-> fp32). A macro: the tile
// intrinsics paste their tile numbers into the instruction text, so they must be literals.
#define GLMV_TILE_DOT(int8, c, a, b) \
  do {                               \
    if constexpr (int8) {            \
      _tile_dpbusd(c, a, b);         \
    } else {                         \
      _tile_dpbf16ps(c, a, b);       \
    }                                \
  } while (0)

// acc tiles += x rows [m0, m0 + 16 MT) . channel blocks [nb0, nb0 + NT), over all of Kp.
// B: bytes per tile of one block (16 lines), X: bytes per x element.
// Steps [s0, s1) of the K stretch; the accumulators start at zero, or from `acc` (a [32][32]
// block of sums as store_tiles leaves it) when it is given. after_step(i) runs after the
// dots of the stretch's i-th step (vector work that then overlaps the tiles').
struct NoStepWork {
  void operator()(int64_t) const {}
};

template <bool Int8, int MT, int NT, class StepWork = NoStepWork>
void amx_tiles(const uint8_t* x, int64_t x_next, const uint8_t* w, int64_t block_bytes,
               int64_t s0, int64_t s1, const void* acc = nullptr,
               const StepWork& after_step = NoStepWork()) {
  if (acc == nullptr) {
    _tile_zero(0);
    if (NT > 1) _tile_zero(1);
    if (MT > 1) _tile_zero(2);
    if (MT > 1 && NT > 1) _tile_zero(3);
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(acc);
    _tile_loadd(0, c, 128);
    if (NT > 1) _tile_loadd(1, c + 64, 128);
    if (MT > 1) _tile_loadd(2, c + 16 * 128, 128);
    if (MT > 1 && NT > 1) _tile_loadd(3, c + 16 * 128 + 64, 128);
  }
  const uint8_t* x1 = x + x_next;
  const uint8_t* w1 = w + block_bytes;
  for (int64_t s = s0; s < s1; ++s) {
    // The weights stream from memory (decode batches: once per step); tile loads alone
    // wait for each line, so the lines a few steps ahead are requested now.
    const uint8_t* ahead = w + (s + kAmxPrefetchSteps) * 1024;
    for (int l = 0; l < 16; ++l) {
      _mm_prefetch(reinterpret_cast<const char*>(ahead + l * 64), _MM_HINT_T0);
      if (NT > 1)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + block_bytes + l * 64), _MM_HINT_T0);
    }
    _tile_loadd(4, x + s * 1024, 64);
    _tile_loadd(6, w + s * 1024, 64);
    if (NT > 1) _tile_loadd(7, w1 + s * 1024, 64);
    if (MT > 1) _tile_loadd(5, x1 + s * 1024, 64);
    GLMV_TILE_DOT(Int8, 0, 4, 6);
    if (NT > 1) GLMV_TILE_DOT(Int8, 1, 4, 7);
    if (MT > 1) GLMV_TILE_DOT(Int8, 2, 5, 6);
    if (MT > 1 && NT > 1) GLMV_TILE_DOT(Int8, 3, 5, 7);
    after_step(s - s0);
  }
}

// the accumulators into acc [32][32] (4-byte sums: fp32 or int32), row stride 128 bytes
template <int MT, int NT>
void store_tiles(void* acc) {
  uint8_t* c = static_cast<uint8_t*>(acc);
  _tile_stored(0, c, 128);
  if (NT > 1) _tile_stored(1, c + 64, 128);
  if (MT > 1) _tile_stored(2, c + 16 * 128, 128);
  if (MT > 1 && NT > 1) _tile_stored(3, c + 16 * 128 + 64, 128);
}

// The epilogues of the two products on one 16-channel block of `rows` rows: acc rows of
// 32 sums, output row i at y + i * n.
void finish_block(const Bf16Args& a, const float* acc, int64_t m0, int64_t rows, int64_t nb) {
  const Bf16Epilogue out(a, nb * kLaneChannels);
  for (int64_t i = 0; i < rows; ++i) out.store(_mm512_loadu_ps(acc + i * 32), m0 + i);
}

void finish_block(const Int8Args& a, const int32_t* acc, int64_t m0, int64_t rows,
                  int64_t nb) {
  const Int8Epilogue out(a, nb * kLaneChannels);
  for (int64_t i = 0; i < rows; ++i) out.store(_mm512_loadu_si512(acc + i * 32), m0 + i);
}

template <class A> struct AmxTraits;
template <> struct AmxTraits<Bf16Args> {
  static constexpr bool kInt8 = false;
  using Sum = float;
  static constexpr int64_t kElement = 2;
};
template <> struct AmxTraits<Int8Args> {
  static constexpr bool kInt8 = true;
  using Sum = int32_t;
  static constexpr int64_t kElement = 1;
};

// The epilogue of a pair of channel blocks' sums (store_tiles' layout: row i's sums for the
// two blocks at acc + i * 32 and 16 further) of rows [m0, end) (at most 32), both blocks
// holding channels, a few rows at a time if need be. Each row takes its two blocks in order
// (the greedy choice's first-of-equals rule).
template <class A, class Sum>
struct PairEpilogue;

template <class Sum>
struct PairEpilogue<Int8Args, Sum> {
  const Sum* acc;
  int64_t m0, rows;
  Int8Epilogue out0, out1;
  PairEpilogue(const Int8Args& args, const Sum* sums, int64_t row0, int64_t end, int64_t nb0)
      : acc(sums), m0(row0), rows(std::min<int64_t>(end - row0, 2 * kTileRows)),
        out0(args, nb0 * kLaneChannels), out1(args, (nb0 + 1) * kLaneChannels) {}
  void operator()(int64_t i0, int64_t i1) const {  // rows [i0, i1) of the block
    for (int64_t i = i0; i < std::min(i1, rows); ++i) {
      out0.store(_mm512_loadu_si512(acc + i * 32), m0 + i);
      out1.store(_mm512_loadu_si512(acc + i * 32 + 16), m0 + i);
    }
  }
};

template <class Sum>
struct PairEpilogue<Bf16Args, Sum> {
  const Sum* acc;
  int64_t m0, rows;
  bool swiglu;
  Bf16Epilogue out0, out1;
  SwigluEpilogue glu;
  PairEpilogue(const Bf16Args& args, const Sum* sums, int64_t row0, int64_t end, int64_t nb0)
      : acc(sums), m0(row0), rows(std::min<int64_t>(end - row0, 2 * kTileRows)),
        swiglu(args.swiglu), out0(args, nb0 * kLaneChannels),
        out1(args, (nb0 + 1) * kLaneChannels), glu(args, nb0 / 2) {}
  void operator()(int64_t i0, int64_t i1) const {  // rows [i0, i1) of the block
    for (int64_t i = i0; i < std::min(i1, rows); ++i) {
      if (swiglu) {
        glu.store(_mm512_loadu_ps(acc + i * 32), _mm512_loadu_ps(acc + i * 32 + 16), m0 + i);
      } else {
        out0.store(_mm512_loadu_ps(acc + i * 32), m0 + i);
        out1.store(_mm512_loadu_ps(acc + i * 32 + 16), m0 + i);
      }
    }
  }
};

// The epilogue of a block of 32 x 32 sums (acc as store_tiles leaves it)
template <int MT, int NT, class A, class Sum>
void finish_tiles(const A& a, const Sum* acc, int64_t m, int64_t m0, int64_t nb0) {
  const int64_t end = std::min<int64_t>(m, m0 + MT * kTileRows);
  if constexpr (NT == 2) {
    PairEpilogue<A, Sum>(a, acc, m0, end, nb0)(0, MT * kTileRows);
  } else {
    const int64_t r0 = std::min<int64_t>(end - m0, kTileRows);
    finish_block(a, acc, m0, r0, nb0);
    if (MT > 1) finish_block(a, acc + 16 * 32, m0 + kTileRows, end - m0 - r0, nb0);
  }
}

// x's tiles from row m0 (a multiple of 16): AMX products take x as whole tiles, the 16 rows
// of one K step (1 KiB) after another (amx_x_layout), so each tile load reads 1 KiB in
// sequence instead of 16 lines a row apart.
template <class A>
const uint8_t* amx_x_tiles(const A& a, int64_t m0) {
  const int64_t steps = a.kp * AmxTraits<A>::kElement / 64;
  return reinterpret_cast<const uint8_t*>(a.x) + m0 / kTileRows * steps * 1024;
}

// Up to 16 rows (a decode batch) x four channel blocks (two pairs) over all of Kp, the sums
// in tiles 0-3 and the weights through tiles 5-7 (tile 5 again for the fourth block). Such
// products only stream their weights; each thread reading four blocks' lines at once instead
// of a pair's two keeps more of them in flight: the 151552-channel LM head at 16 rows 11.6-11.9
// -> 10.8-11.3 ms, a decoder layer's products 4-5% faster (interleaved runs).
template <class A>
void amx_quad(const A& a, int64_t m, int64_t nb0) {
  using T = AmxTraits<A>;
  const int64_t kp_bytes = a.kp * T::kElement, steps = kp_bytes / 64;
  const int64_t bb = kp_bytes * kLaneChannels;  // bytes of one block
  const uint8_t* x = amx_x_tiles(a, 0);
  const uint8_t* w = reinterpret_cast<const uint8_t*>(a.w) + nb0 * bb;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t s = 0; s < steps; ++s) {
    // kAmxPrefetchSteps ahead in each of the four blocks; in the last steps, the first steps
    // of the next four (block b + 4 after block b), which the next quad starts on
    const int64_t sa = s + kAmxPrefetchSteps;
    const uint8_t* ahead = sa < steps ? w + sa * 1024 : w + 4 * bb + (sa - steps) * 1024;
    for (int l = 0; l < 16; ++l)
      for (int b = 0; b < 4; ++b)
        _mm_prefetch(reinterpret_cast<const char*>(ahead + b * bb + l * 64), _MM_HINT_T0);
    const uint8_t* ws = w + s * 1024;
    _tile_loadd(4, x + s * 1024, 64);
    _tile_loadd(5, ws, 64);
    GLMV_TILE_DOT(T::kInt8, 0, 4, 5);
    _tile_loadd(6, ws + bb, 64);
    GLMV_TILE_DOT(T::kInt8, 1, 4, 6);
    _tile_loadd(7, ws + 2 * bb, 64);
    GLMV_TILE_DOT(T::kInt8, 2, 4, 7);
    _tile_loadd(5, ws + 3 * bb, 64);  // after the first dot has read it
    GLMV_TILE_DOT(T::kInt8, 3, 4, 5);
  }
  // each pair's sums as store_tiles leaves them: [rows][32], row stride 128 bytes
  alignas(64) typename T::Sum acc[2][16 * 32];
  _tile_stored(0, acc[0], 128);
  _tile_stored(1, acc[0] + 16, 128);
  _tile_stored(2, acc[1], 128);
  _tile_stored(3, acc[1] + 16, 128);
  finish_tiles<1, 2>(a, acc[0], m, 0, nb0);
  finish_tiles<1, 2>(a, acc[1], m, 0, nb0 + 2);
}

template <int MT, int NT, class A>
void amx_block(const A& a, int64_t m, int64_t m0, int64_t nb0) {
  using T = AmxTraits<A>;
  const int64_t kp_bytes = a.kp * T::kElement, steps = kp_bytes / 64;
  const int64_t block_bytes = kp_bytes * kLaneChannels;
  amx_tiles<T::kInt8, MT, NT>(amx_x_tiles(a, m0), steps * 1024,
                              reinterpret_cast<const uint8_t*>(a.w) + nb0 * block_bytes,
                              block_bytes, 0, steps);
  alignas(64) typename T::Sum acc[32 * 32];
  store_tiles<MT, NT>(acc);
  finish_tiles<MT, NT>(a, acc, m, m0, nb0);
}

// Rows [0, m) (x padded to whole tiles of rows) x all channel blocks, in panels of rows
// whose x stays in L2 while every pair of channel blocks passes over it (each pair's weights
// read once per panel, from cache for every further 32 rows). Two ways to share the work:
// - batches of a few rows (decode): threads take pairs of channel blocks, panels as tall as
//   keep x within ~1.5 MiB (kPanelBytes, 64 to 1024 rows; taller panels read the weights
//   fewer times);
// - from kRowSplitRows rows on (prefill): threads take runs of rows and each multiplies its
//   own rows by every pair, panels of ~1 MiB of x (kRowPanelBytes). Each thread then reads
//   only x rows it laid out itself (amx_x_layout splits the rows the same way), from its own
//   L2; split by channels, half of every panel came from the other core's cache, and tiles
//   waiting on it held the products back. The weights, read by both threads now, are read
//   by both at about the same time and the second read finds them in the shared L3. Products
//   of 1024-2048 rows: 1.7-1.9 -> 2.0-2.3 TF/s on the two-core host of docs/benchmarks.md.
constexpr int64_t kPanelBytes = int64_t(3) << 19, kPanelMinRows = 64, kPanelMaxRows = 1024;
constexpr int64_t kRowPanelBytes = int64_t(1) << 20, kRowSplitRows = 256;
constexpr int64_t kChunkSteps = 8;  // K steps per stretch of a pair's weights kept in L1

// One pair of channel blocks over the row blocks [p0, p1) in stretches of K: each stretch of
// the pair's weights (8 steps: 16 KiB) stays in L1 while every row block passes over it, the
// sums going to `cbuf` between stretches. Over the whole of K at once every step loads its x
// and weight tiles from L2 and the products wait on it: stretches make prefill-sized
// products 5-25% faster (8 steps measured best of 4-32). The epilogue of each block of rows
// runs during the next block's last stretch (PairEpilogue, a few rows after each step): its
// conversions and output stores then overlap the dots instead of following the tiles
// (prefill products 5-6% faster: eight of a layer's products at 512 and 2048 rows 28.0-29.5
// -> 26.4-27.7 ms).
template <class A, class Sum>
void amx_pair_chunked(const A& a, int64_t p0, int64_t p1, int64_t q, int64_t steps, Sum* cbuf) {
  using T = AmxTraits<A>;
  const int64_t block_bytes = steps * 1024;
  const uint8_t* w = reinterpret_cast<const uint8_t*>(a.w) + 2 * q * block_bytes;
  for (int64_t s0 = 0; s0 < steps; s0 += kChunkSteps) {
    const int64_t s1 = std::min(steps, s0 + kChunkSteps);
    const bool last = s1 == steps;
    // In the last stretch, each block of rows runs the epilogue of the block before it a few
    // rows per step, so that its vector work and output stores overlap the tiles' dots.
    const int64_t rows_per_step = (2 * kTileRows + (s1 - s0) - 1) / (s1 - s0);
    for (int64_t r = p0; r < p1; r += 2 * kTileRows) {
      Sum* acc = cbuf + (r - p0) / (2 * kTileRows) * 1024;
      const void* from = s0 == 0 ? nullptr : acc;
      const bool tall = p1 - r > kTileRows;
      auto tiles = [&](const auto& after_step) {
        if (tall) {
          amx_tiles<T::kInt8, 2, 2>(amx_x_tiles(a, r), block_bytes, w, block_bytes, s0, s1, from,
                                    after_step);
          store_tiles<2, 2>(acc);
        } else {
          amx_tiles<T::kInt8, 1, 2>(amx_x_tiles(a, r), block_bytes, w, block_bytes, s0, s1, from,
                                    after_step);
          store_tiles<1, 2>(acc);
        }
      };
      if (last && r > p0) {
        const PairEpilogue<A, Sum> before(a, acc - 1024, r - 2 * kTileRows, r, 2 * q);
        tiles([&](int64_t i) { before(i * rows_per_step, (i + 1) * rows_per_step); });
      } else {
        tiles(NoStepWork());
      }
    }
  }
  // the last block of rows
  const int64_t r_last = p0 + (p1 - p0 - 1) / (2 * kTileRows) * (2 * kTileRows);
  finish_tiles<2, 2>(a, cbuf + (r_last - p0) / (2 * kTileRows) * 1024, p1, r_last, 2 * q);
}

// Rows [p0, p1) of channel pair q (its second block where it has one)
template <class A, class Sum>
void amx_pair(const A& a, int64_t m, int64_t p0, int64_t p1, int64_t q, int64_t nblocks,
              Sum* cbuf) {
  const int64_t steps = a.kp * AmxTraits<A>::kElement / 64;
  const bool two = 2 * q + 1 < nblocks;
  if (two && p1 - p0 > 4 * kTileRows && steps > kChunkSteps) {
    amx_pair_chunked(a, p0, p1, q, steps, cbuf);
    return;
  }
  for (int64_t r = p0; r < p1; r += 2 * kTileRows) {
    const bool tall = p1 - r > kTileRows;
    if (two && tall) amx_block<2, 2>(a, m, r, 2 * q);
    else if (two) amx_block<1, 2>(a, m, r, 2 * q);
    else if (tall) amx_block<2, 1>(a, m, r, 2 * q);
    else amx_block<1, 1>(a, m, r, 2 * q);
  }
}

// The sums between a chunked pair's stretches (amx_pair_chunked): 4 KiB per 32 rows of a
// panel, 64-byte aligned
template <class Sum>
struct PanelSums {
  std::unique_ptr<Sum[]> store;  // uninitialised: every stretch writes its sums first
  Sum* data;
  explicit PanelSums(int64_t panel)
      : store(new Sum[panel / (2 * kTileRows) * 1024 + 16]) {
    data = reinterpret_cast<Sum*>((reinterpret_cast<uintptr_t>(store.get()) + 63) &
                                  ~uintptr_t(63));
  }
};

inline int64_t panel_rows(int64_t bytes, int64_t row_bytes) {
  return std::clamp<int64_t>(bytes / row_bytes / (2 * kTileRows) * (2 * kTileRows),
                             kPanelMinRows, kPanelMaxRows);
}

template <class A>
void amx_product(const A& a, int64_t m, int64_t nblocks) {
  using Sum = typename AmxTraits<A>::Sum;
  const int64_t pairs = (nblocks + 1) / 2;
  const int64_t row_bytes = a.kp * AmxTraits<A>::kElement;
  if (m >= kRowSplitRows) {  // threads take runs of 32-row blocks
    const int64_t panel = panel_rows(kRowPanelBytes, row_bytes);
    at::parallel_for(0, (m + 2 * kTileRows - 1) / (2 * kTileRows), 1,
                     [&](int64_t b0, int64_t b1) {
      PanelSums<Sum> sums(panel);
      load_tile_config(kTileRows);
      const int64_t r1 = std::min(m, b1 * 2 * kTileRows);
      for (int64_t p0 = b0 * 2 * kTileRows; p0 < r1; p0 += panel) {
        for (int64_t q = 0; q < pairs; ++q)
          amx_pair(a, m, p0, std::min(r1, p0 + panel), q, nblocks, sums.data);
      }
      _tile_release();
    });
    return;
  }
  const int64_t panel = panel_rows(kPanelBytes, row_bytes);
  for (int64_t p0 = 0; p0 < m; p0 += panel) {
    const int64_t p1 = std::min(m, p0 + panel);
    at::parallel_for(0, pairs, 1, [&](int64_t q0, int64_t q1) {
      PanelSums<Sum> sums(panel);
      load_tile_config(std::min(m, kTileRows));
      for (int64_t q = q0; q < q1; ++q) {
        if (m <= kTileRows && q + 1 < q1 && 2 * q + 3 < nblocks) {  // two whole pairs
          amx_quad(a, m, 2 * q);
          ++q;
          continue;
        }
        amx_pair(a, m, p0, p1, q, nblocks, sums.data);
      }
      _tile_release();
    });
  }
}

bool amx_ready() { return amx_permitted(); }
#else
#define GLMV_AMX 0
constexpr bool kAmxBuilt = false;
bool amx_ready() { return false; }
void load_tile_config(int64_t = 0) {}
template <class A>
void amx_product(const A&, int64_t, int64_t) {
  TORCH_CHECK(false, "glmv: built without AMX");
}
#endif

// The buffers the products copy their rows into (slot 0: x, slot 1: int8 row scales) and
// segment attention packs its keys and values into (slots 2 and 3): per thread, kept from
// call to call up to 32 MiB each. A fresh allocation of a megabyte or more is a
// fresh mapping, whose first touch costs a page fault per 4 KiB (~300 for a 512-row prefill
// product, ~8% of its time); larger products (big vision batches) allocate for the call.
constexpr size_t kKeptBufferBytes = size_t(32) << 20;

struct RowBuffer {
  at::Tensor owned;  // defined for buffers allocated for one call
  uint8_t* data;
};

RowBuffer row_buffer(int slot, size_t bytes) {
  if (bytes > kKeptBufferBytes) {
    at::Tensor owned = at::empty({int64_t(bytes)}, at::TensorOptions().dtype(at::kByte));
    return {owned, owned.data_ptr<uint8_t>()};
  }
  struct Buffer {
    uint8_t* data = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffers[4];
  Buffer& b = buffers[slot];
  if (bytes > b.size) {
    const size_t size = (bytes + (size_t(1) << 20) - 1) & ~((size_t(1) << 20) - 1);
    uint8_t* data = static_cast<uint8_t*>(std::aligned_alloc(64, size));
    TORCH_CHECK(data != nullptr, "glmv: out of memory for a ", size, "-byte product buffer");
    std::free(b.data);
    b.data = data;
    b.size = size;
  }
  return {at::Tensor(), b.data};
}

// bf16 rows [m, k] (row stride `stride`) as AMX takes them: per block of 16 rows, the tiles of
// its K steps (32 inputs each) one after another, a tile's 16 rows 64 bytes apart; rows past m
// and inputs past k are zero. The threads split the rows in runs of 32 as amx_product's row
// split does, so that each lays out the rows it will multiply.
void amx_x_layout(const uint16_t* src, int64_t m, int64_t k, int64_t stride, int64_t kp,
                  uint16_t* dst) {
  constexpr int64_t kStep = 32;  // inputs per tile row
  const int64_t steps = kp / kStep, blocks = (m + kTileRows - 1) / kTileRows;
  at::parallel_for(0, (blocks + 1) / 2, 2, [&](int64_t u0, int64_t u1) {
    for (int64_t b = 2 * u0; b < std::min(blocks, 2 * u1); ++b) {
      uint16_t* tiles = dst + b * steps * kTileRows * kStep;
      for (int64_t i = 0; i < kTileRows; ++i) {
        const int64_t r = b * kTileRows + i;
        const uint16_t* row = src + r * stride;
        const int64_t full = r < m ? k / kStep : 0;  // whole tile rows of x
        int64_t s = 0;
#if defined(__AVX512BW__)
        for (; s < full; ++s) {
          _mm512_storeu_si512(tiles + (s * kTileRows + i) * kStep,
                              _mm512_loadu_si512(row + s * kStep));
        }
#endif
        for (; s < steps; ++s) {
          uint16_t* out = tiles + (s * kTileRows + i) * kStep;
          const int64_t n = r < m ? std::clamp<int64_t>(k - s * kStep, 0, kStep) : 0;
          if (n > 0) std::memcpy(out, row + s * kStep, n * sizeof(uint16_t));
          if (n < kStep) std::memset(out + n, 0, (kStep - n) * sizeof(uint16_t));
        }
      }
    }
  });
}

bool use_amx(int64_t m, bool int8) {
  return m >= (int8 ? g_amx_rows_int8 : g_amx_rows_bf16) && amx_ready();
}

// The least numbers of rows that take AMX from now on, bf16 and int8 (a large number: never);
// returns the previous ones.
std::vector<int64_t> linear_amx_rows(int64_t bf16, int64_t int8) {
  std::vector<int64_t> previous{g_amx_rows_bf16, g_amx_rows_int8};
  g_amx_rows_bf16 = std::max<int64_t>(bf16, 1);
  g_amx_rows_int8 = std::max<int64_t>(int8, 1);
  return previous;
}

bool linear_amx() { return kAmxBuilt && amx_ready(); }

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                       const at::Tensor& w_sum, const c10::optional<at::Tensor>& bias,
                       int64_t out_features) {
  check_bf16(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "int8_linear: x must be [M, K], rows contiguous");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 4 && w.is_contiguous() &&
                  w.size(2) == kLaneChannels && w.size(3) == kInt8Group,
              "int8_linear: w must be contiguous int8 VNNI blocks [Np/16, Kp/4, 16, 4]");
  const int64_t m = x.size(0), k = x.size(1), nblocks = w.size(0), kp = w.size(1) * kInt8Group;
  const int64_t n = out_features, np = nblocks * kLaneChannels;
  TORCH_CHECK(kp >= k && kp - k < kInt8Group * kLaneChannels && kp % (kInt8Group * kLaneChannels) == 0,
              "int8_linear: w's blocks must cover K = ", k, " in whole tiles of 64 inputs");
  TORCH_CHECK(np >= n && np - n < kLaneChannels, "int8_linear: w's blocks must cover N = ", n);
  auto check_vec = [np](const at::Tensor& t, at::ScalarType type, const char* name) {
    TORCH_CHECK(t.scalar_type() == type && t.numel() == np && t.is_contiguous(),
                "int8_linear: ", name, " must be a contiguous [Np] vector of the right type");
  };
  check_vec(w_scale, at::kFloat, "w_scale");
  check_vec(w_sum, at::kInt, "w_sum");
  if (bias.has_value()) check_vec(*bias, at::kFloat, "bias");
  const int64_t xs = kp + 64;
  const bool amx = use_amx(m, true);
  // AMX: x in tiles, rows padded to 16 (the padding rows' sums are never stored)
  const int64_t mp = amx ? (m + kTileRows - 1) / kTileRows * kTileRows : m;
  const RowBuffer xq_buffer = row_buffer(0, amx ? mp * kp : m * xs);
  const RowBuffer sx_buffer = row_buffer(1, m * sizeof(float));
  uint8_t* xq = xq_buffer.data;
  float* sx = reinterpret_cast<float*>(sx_buffer.data);
  quantize_rows(reinterpret_cast<const uint16_t*>(x.data_ptr()), m, k, kp, x.stride(0),
                amx ? 0 : xs, xq, sx);
  auto y = at::empty({m, n}, x.options());
  const Int8Args a{xq, w.data_ptr<int8_t>(), sx,
                   w_scale.data_ptr<float>(), w_sum.data_ptr<int32_t>(),
                   bias.has_value() ? bias->data_ptr<float>() : nullptr,
                   reinterpret_cast<uint16_t*>(y.data_ptr()), kp, n, xs};
  if (amx) {
    amx_product(a, m, nblocks);
  } else {
    lane_product(a, m, nblocks);
  }
  return y;
}

bool int8_vnni() { return kVnniKernel; }

// y = x W^T + b, or with `swiglu` (W and b as glmv.layers.linear.swiglu_order lays out a
// [gate | up] projection of out_features channels each) y = silu(gate) * up in one pass, the
// same bits as silu_and_mul over the [gate | up] product.
// With `best` (at::get_num_threads() * M states), y is not written: each thread's greedy
// choice among its channels goes there instead.
at::Tensor bf16_product(const at::Tensor& x, const at::Tensor& w,
                        const c10::optional<at::Tensor>& bias, int64_t out_features,
                        bool swiglu, RowBest* best = nullptr) {
  check_bf16(x, "x");
  check_bf16(w, "w");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "bf16_linear: x must be [M, K], rows contiguous");
  TORCH_CHECK(w.dim() == 4 && w.is_contiguous() && w.size(2) == kLaneChannels &&
                  w.size(3) == kBf16Group,
              "bf16_linear: w must be contiguous bf16 blocks [Np/16, Kp/2, 16, 2]");
  const int64_t m = x.size(0), k = x.size(1), nblocks = w.size(0), kp = w.size(1) * kBf16Group;
  const int64_t n = out_features, np = nblocks * kLaneChannels;
  TORCH_CHECK(kp >= k && kp - k < kBf16Group * kLaneChannels && kp % (kBf16Group * kLaneChannels) == 0,
              "bf16_linear: w's blocks must cover K = ", k, " in whole tiles of 32 inputs");
  if (swiglu) {
    TORCH_CHECK(kBf16Linear, "bf16_linear_swiglu: needs AVX-512");
    TORCH_CHECK(nblocks % 2 == 0 && np / 2 >= n && np / 2 - n < kLaneChannels,
                "bf16_linear_swiglu: w's blocks must be gate/up pairs covering N = ", n);
  } else {
    TORCH_CHECK(np >= n && np - n < kLaneChannels, "bf16_linear: w's blocks must cover N = ", n);
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == np && bias->is_contiguous(),
                "bf16_linear: bias must be a contiguous float32 [Np] vector");
  }
  auto y = at::empty({best != nullptr ? 0 : m, n}, x.options());
  if (m == 0) return y;
  const int64_t xs = kp + 32;
  const bool amx = use_amx(m, false);
  const uint16_t* src = bits(x);
  const Bf16X* staged;
  RowBuffer buffer;
  if (amx) {
    const int64_t mp = (m + kTileRows - 1) / kTileRows * kTileRows;
    buffer = row_buffer(0, mp * kp * sizeof(uint16_t));
    uint16_t* dst = reinterpret_cast<uint16_t*>(buffer.data);
    amx_x_layout(src, m, k, x.stride(0), kp, dst);
    staged = reinterpret_cast<const Bf16X*>(dst);
  } else {
    buffer = row_buffer(0, m * xs * sizeof(Bf16X));
    Bf16X* dst = reinterpret_cast<Bf16X*>(buffer.data);
    at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const uint16_t* row = src + r * x.stride(0);
        if constexpr (std::is_same_v<Bf16X, float>) {
          for (int64_t i = 0; i < k; ++i) dst[r * xs + i] = bf2f(row[i]);
        } else {
          std::memcpy(dst + r * xs, row, k * sizeof(uint16_t));
        }
        std::memset(dst + r * xs + k, 0, (xs - k) * sizeof(Bf16X));
      }
    });
    staged = dst;
  }
  const Bf16Args a{staged, bits(w), bias.has_value() ? bias->data_ptr<float>() : nullptr,
                   mbits(y), kp, n, xs, swiglu, best, m};
  if (amx) {
    amx_product(a, m, nblocks);
  } else {
    lane_product(a, m, nblocks);
  }
  return y;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w,
                       const c10::optional<at::Tensor>& bias, int64_t out_features) {
  return bf16_product(x, w, bias, out_features, false);
}

at::Tensor bf16_linear_swiglu(const at::Tensor& x, const at::Tensor& w,
                              const c10::optional<at::Tensor>& bias, int64_t out_features) {
  return bf16_product(x, w, bias, out_features, true);
}

// argmax_rows(bf16_linear(x, w, None, out_features)) without writing the product out: the
// greedy token of each row straight from the LM head (the same index: the same sums, rounded
// the same way, the same first-of-equals and NaN rules).
at::Tensor bf16_linear_argmax(const at::Tensor& x, const at::Tensor& w, int64_t out_features) {
  TORCH_CHECK(kBf16Linear, "bf16_linear_argmax: needs AVX-512");
  TORCH_CHECK(out_features > 0, "bf16_linear_argmax: no channels to choose from");
  const int64_t m = x.dim() == 2 ? x.size(0) : 0, threads = at::get_num_threads();
  std::vector<RowBest> best(threads * std::max<int64_t>(m, 1));
  bf16_product(x, w, c10::nullopt, out_features, false, best.data());
  auto out = at::empty({m}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < m; ++r) {
    RowBest row;
    for (int64_t t = 0; t < threads; ++t) row.merge(best[t * m + r]);
    op[r] = row.nan >= 0 ? row.nan : row.index;
  }
  return out;
}

bool bf16_linear_native() { return kBf16Linear; }
bool bf16_instructions() { return kBf16Instructions; }

// ---------------------------------------------------------------------------------------------
// Attention within segments: the vision tower's images and video frames (bidirectional), and
// the decoder's prefill chunks (causal, grouped-query):
//   out[t, h] = sum_s softmax_s(q[t, h] . k[s, h / group] * scale) v[s, h / group]
// with s over the keys of t's segment; causal: only the keys up to t's own position, the
// segment's queries being its last keys (a chunk after cached ones: bottom-right aligned).
// q [Tq, heads, head_dim], k, v [Tk, kv_heads, head_dim] with unit stride along head_dim
// (views of the fused qkv output are fine), out a contiguous [Tq, heads, head_dim]; cu_q and
// cu_k int64 [segments + 1] delimit each segment's queries and keys.
// Scores and softmax in fp32; the probabilities are rounded to bf16 for the P.V product and
// the result divided by their fp32 sum at the end, as ATen's CPU flash attention does for
// bf16. With AVX-512 both products run on bf16 pairs (vdpbf16ps: 32 bf16 products per
// instruction, or the same sums on AVX512F) over keys and values packed once per segment and
// KV head; otherwise in plain loops.
// A query row's result depends only on its own keys: the same whether its segment's other
// queries come in the same call or not (chunked prefill gives the same bits).

struct VarlenArgs {
  const uint16_t *q, *k, *v;
  uint16_t* out;
  const int64_t *cu, *cuk;
  int64_t heads, group, d;
  int64_t qts, qhs, kts, khs, vts, vhs;  // token and head strides
  float scale;
  bool causal;
};

// Keys and values of one (segment, KV head), padded to `lp` rows with zeros:
//   kp [lp/16][d/2][16][2]: kp[b][p][l][t] = k[16 b + l][2 p + t]  (16 keys per register)
//   vp [d/16][lp/2][16][2]: vp[g][j][c][t] = v[2 j + t][16 g + c]  (key pairs per column)
#if defined(__AVX512F__)
// r[i][j] <- r[j][i] for a 16 x 16 block of 32-bit lanes
inline void transpose16x16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// 16 keys as one lane block [pairs][16][2] (out): key l's row is row(l) for l < n, zeros
// past n; their 32-bit (input pair) words transposed 16 x 16 at a time.
template <class Row>
inline void pack_keys16(Row row, int64_t n, int64_t pairs, uint16_t* out) {
  for (int64_t c = 0; c < pairs / 16; ++c) {
    __m512i r[16];
    for (int64_t l = 0; l < 16; ++l)
      r[l] = l < n ? _mm512_loadu_si512(row(l) + 32 * c) : _mm512_setzero_si512();
    transpose16x16(r);
    for (int64_t p = 0; p < 16; ++p) _mm512_storeu_si512(out + (16 * c + p) * 32, r[p]);
  }
}
#endif

void pack_kv(const VarlenArgs& a, int64_t start, int64_t len, int64_t h, int64_t lp,
             uint16_t* kp, uint16_t* vp) {
  const int64_t d = a.d, pairs = d / 2;
#if defined(__AVX512F__)
  if (d % 32 == 0) {
    // The same layouts 16 keys at a time (pack_keys16); two keys' values interleaved 16
    // columns at a time.
    for (int64_t r0 = 0; r0 < lp; r0 += 16) {
      const uint16_t* k0 = a.k + (start + r0) * a.kts + h * a.khs;
      pack_keys16([&](int64_t l) { return k0 + l * a.kts; }, len - r0, pairs,
                  kp + (r0 / 16) * pairs * 32);
      for (int64_t r = r0; r < r0 + 16; r += 2) {
        const uint16_t* v0 = a.v + (start + r) * a.vts + h * a.vhs;
        const uint16_t* v1 = v0 + a.vts;
        for (int64_t c = 0; c < d; c += 16) {
          const __m512i lo = r < len ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                           reinterpret_cast<const __m256i*>(v0 + c)))
                                     : _mm512_setzero_si512();
          const __m512i hi = r + 1 < len ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                               reinterpret_cast<const __m256i*>(v1 + c)))
                                         : _mm512_setzero_si512();
          _mm512_storeu_si512(vp + (c / 16) * lp * 16 + (r / 2) * 32,
                              _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
      }
    }
    return;
  }
#endif
  for (int64_t r = 0; r < lp; ++r) {
    uint16_t* kb = kp + (r / 16) * pairs * 32 + (r % 16) * 2;
    uint16_t* vb = vp + (r / 2) * 32 + (r % 2);
    if (r >= len) {
      for (int64_t p = 0; p < pairs; ++p) kb[p * 32] = kb[p * 32 + 1] = 0;
      for (int64_t c = 0; c < d; ++c) vb[(c / 16) * lp * 16 + (c % 16) * 2] = 0;
      continue;
    }
    const uint16_t* kr = a.k + (start + r) * a.kts + h * a.khs;
    const uint16_t* vr = a.v + (start + r) * a.vts + h * a.vhs;
    for (int64_t p = 0; p < pairs; ++p) {
      kb[p * 32] = kr[2 * p];
      kb[p * 32 + 1] = kr[2 * p + 1];
    }
    for (int64_t c = 0; c < d; ++c) vb[(c / 16) * lp * 16 + (c % 16) * 2] = vr[c];
  }
}

// s[0, len) <- exp(s - max(s)) in place; returns their sum. Max and sum lane by lane so that
// the loops vectorise (fp32 sums are not reassociated).
float exp_shifted(float* s, int64_t len) {
  float lanes[kLanes];
  std::fill_n(lanes, kLanes, -std::numeric_limits<float>::infinity());
  int64_t n = 0;
  for (; n + kLanes <= len; n += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], s[n + l]);
  float m = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < kLanes; ++l) m = std::max(m, lanes[l]);
  for (; n < len; ++n) m = std::max(m, s[n]);
  for (n = 0; n < len; ++n) s[n] = exp_approx(s[n] - m);
  std::fill_n(lanes, kLanes, 0.0f);
  for (n = 0; n + kLanes <= len; n += kLanes)
    for (int l = 0; l < kLanes; ++l) lanes[l] += s[n + l];
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  for (; n < len; ++n) total += s[n];
  return total;
}

// softmax numerators of rows [0, rows) of s (row stride lp, `len` valid columns) as bf16 in
// p (zeros past len); returns 1 / sum per row in inv.
void softmax_rows(float* s, uint16_t* p, float* inv, int64_t rows, int64_t len, int64_t lp) {
  for (int64_t i = 0; i < rows; ++i) {
    float* sr = s + i * lp;
    uint16_t* pr = p + i * lp;
    inv[i] = 1.0f / exp_shifted(sr, len);
    int64_t n = 0;
    for (; n < len; ++n) pr[n] = f2bf(sr[n]);
    for (; n < lp; ++n) pr[n] = 0;
  }
}

#if GLMV_BF16_LANES
// max(sr[0, len)) on 16 lanes
inline float row_max512(const float* sr, int64_t len) {
  __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t n = 0;
  for (; n + 16 <= len; n += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sr + n));
  const __mmask16 tail = channel_mask(n, len);
  if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, sr + n));
  return _mm512_reduce_max_ps(vmax);
}

// exp(s[n] - max) of one row on 16 lanes, handed to store(n, e) for n in [0, lp) in steps of
// 16 (zeros past len); returns the sum over [0, len). lp a multiple of 16.
template <typename Store>
float exp_row512(const float* sr, int64_t len, int64_t lp, Store store) {
  const __m512 m = _mm512_set1_ps(row_max512(sr, len));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t n = 0; n < lp; n += 16) {
    const __m512 e = _mm512_maskz_mov_ps(channel_mask(n, len),
                                         exp512(_mm512_sub_ps(_mm512_loadu_ps(sr + n), m)));
    sum = _mm512_add_ps(sum, e);
    store(n, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// 2^t on 16 lanes: t = n + f with n an integer and |f| <= 1/2, 2^f by a degree-5 polynomial
// (relative error 2.4e-7, fitted on [-1/2, 1/2]), 2^n by scalef (0 far below, no clamps).
inline __m512 exp2_512(__m512 t) {
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.327647129073739e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675540961325169e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713092088699e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

constexpr float kLog2e = 1.44269504088896341f;

// Softmax numerators of rows [0, rows) of raw scores s (the products q . k, rows ls apart, len
// valid columns) as bf16 in p (rows ls apart, zeros from len to lp, a multiple of 16):
// exp(scale * (s - max)) = 2^(s c - max c) with c = scale log2(e), one multiply-add and the
// exp2 above. The row maxima come in rmax where the caller has them (else a first pass finds
// them); 1 / the row sums go to inv.
// (P: uint16_t bf16 bits, or float for fp32 lanes holding the same bf16 values)
template <typename P>
void softmax_rows512(const float* s, P* p, float* inv, int64_t rows, int64_t len,
                     int64_t lp, int64_t ls, float scale, const float* rmax) {
  const __m512 c = _mm512_set1_ps(scale * kLog2e);
  for (int64_t i = 0; i < rows; ++i) {
    const float* sr = s + i * ls;
    P* pr = p + i * ls;
    const float m = rmax != nullptr ? rmax[i] : row_max512(sr, len);
    const __m512 mc = _mm512_mul_ps(_mm512_set1_ps(m), c);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t n = 0; n < lp; n += 16) {
      const __m512 e = _mm512_maskz_mov_ps(
          channel_mask(n, len), exp2_512(_mm512_fmsub_ps(_mm512_loadu_ps(sr + n), c, mc)));
      sum = _mm512_add_ps(sum, e);
      if constexpr (std::is_same_v<P, float>) {
        _mm512_storeu_ps(pr + n, round_bf16x16(e));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(pr + n), cvt_bf16x16(e));
      }
    }
    inv[i] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}

constexpr bool kBf16Attention = true;
constexpr int64_t kAttnRows = 8;  // query rows per register block (x 2 registers of 16)

// scores s[i][n] = q_i . k_n (unscaled: the softmax scales them) for 8 rows of qb (contiguous
// rows of d, Bf16X: fp32 where the lane products widen their rows first, Bf16Dot) and the
// first nkeys keys (a multiple of 32; row stride of s: lp)
void attn_scores(const Bf16X* qb, const uint16_t* kp, float* s, int64_t d, int64_t lp,
                 int64_t nkeys) {
  const int64_t pairs = d / 2;
  for (int64_t nb = 0; nb < nkeys / 16; nb += 2) {
    __m512 acc[kAttnRows][2];
    for (auto& row : acc)
      for (auto& r : row) r = _mm512_setzero_ps();
    const uint16_t* kb = kp + nb * pairs * 32;
    for (int64_t p = 0; p < pairs; ++p) {
      const Bf16Dot::Vec b0 = Bf16Dot::load(kb + p * 32);
      const Bf16Dot::Vec b1 = Bf16Dot::load(kb + (pairs + p) * 32);
      for (int i = 0; i < kAttnRows; ++i) {
        const Bf16Dot::Vec a = Bf16Dot::bcast(qb + i * d + 2 * p);
        acc[i][0] = Bf16Dot::dot(acc[i][0], a, b0);
        acc[i][1] = Bf16Dot::dot(acc[i][1], a, b1);
      }
    }
    for (int i = 0; i < kAttnRows; ++i)
      for (int j = 0; j < 2; ++j)
        _mm512_storeu_ps(s + i * lp + (nb + j) * 16, acc[i][j]);
  }
}

// out rows = (p . v) * inv for 8 rows of p (row stride lp, Bf16X), columns [c0, c0 + 16 NC)
template <int NC>
void attn_values(const Bf16X* p, const uint16_t* vp, const float* inv, int64_t rows,
                 int64_t d, int64_t lp, int64_t len, int64_t c0, uint16_t* out, int64_t ors) {
  __m512 acc[kAttnRows][NC];
  for (auto& row : acc)
    for (auto& r : row) r = _mm512_setzero_ps();
  const int64_t key_pairs = (len + 1) / 2;
  for (int64_t j = 0; j < key_pairs; ++j) {
    Bf16Dot::Vec b[NC];
    for (int c = 0; c < NC; ++c) b[c] = Bf16Dot::load(vp + ((c0 / 16 + c) * lp / 2 + j) * 32);
    for (int i = 0; i < kAttnRows; ++i) {
      const Bf16Dot::Vec a = Bf16Dot::bcast(p + i * lp + 2 * j);
      for (int c = 0; c < NC; ++c) acc[i][c] = Bf16Dot::dot(acc[i][c], a, b[c]);
    }
  }
  for (int i = 0; i < kAttnRows; ++i)  // a fixed trip count keeps acc in registers
    for (int c = 0; c < NC; ++c) {
      if (i >= rows) break;
      const __m512 o = _mm512_mul_ps(acc[i][c], _mm512_set1_ps(inv[i]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * ors + c0 + 16 * c),
                          cvt_bf16x16(o));
    }
}

#else
constexpr bool kBf16Attention = false;
#endif

#if GLMV_AMX
// The two products of attn_scores / attn_values on AMX tiles, 32 query rows at a time (the
// tile configuration of the linear products: all tiles 16 rows x 64 bytes; four accumulators
// of 16 rows x 16 keys or columns, so that every key or value tile read from L2 serves two
// query tiles). The packed keys are lane blocks of 16 keys x head_dim and the packed values
// lane blocks of 16 columns x keys: 32 head_dim values (32 keys) of a block are one B tile
// as they lie. Rows of qb: d apart; of s and p: ls apart (lp, the padded keys, or more).
constexpr int64_t kAmxAttnRows = 32;

// Raw scores (q . k) of 32 query rows (qs apart in qb); with rmax, also each row's maximum
// over the first len keys (read back from L1 right after each tile store; padded keys past
// len left out).
void amx_attn_scores(const uint16_t* qb, int64_t qs, const uint16_t* kp, float* s, int64_t d,
                     int64_t ls, int64_t nkeys, float* rmax, int64_t len) {
  const int64_t pairs = d / 2, steps = d / 32;
  const uint16_t* qb1 = qb + 16 * qs;
  float* s1 = s + 16 * ls;
  alignas(64) float lanes[kAmxAttnRows * 16];
  if (rmax) std::fill_n(lanes, kAmxAttnRows * 16, -std::numeric_limits<float>::infinity());
  for (int64_t nb = 0; nb < nkeys / 16; nb += 2) {
    const uint16_t* k0 = kp + nb * pairs * 32;
    const uint16_t* k1 = k0 + pairs * 32;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t c = 0; c < steps; ++c) {
      _tile_loadd(4, qb + c * 32, qs * 2);
      _tile_loadd(6, k0 + c * 512, 64);
      _tile_loadd(7, k1 + c * 512, 64);
      _tile_loadd(5, qb1 + c * 32, qs * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, s + nb * 16, ls * 4);
    _tile_stored(1, s + nb * 16 + 16, ls * 4);
    _tile_stored(2, s1 + nb * 16, ls * 4);
    _tile_stored(3, s1 + nb * 16 + 16, ls * 4);
    if (!rmax) continue;
    for (int64_t h = 0; h < 2; ++h) {
      const int64_t k = (nb + h) * 16;
      if (k >= len) break;
      const __mmask16 keep = channel_mask(k, len);
      for (int64_t i = 0; i < kAmxAttnRows; ++i) {
        const __m512 cur = _mm512_load_ps(lanes + i * 16);
        _mm512_store_ps(lanes + i * 16,
                        _mm512_mask_max_ps(cur, keep, cur, _mm512_loadu_ps(s + i * ls + k)));
      }
    }
  }
  if (rmax) {
    for (int64_t i = 0; i < kAmxAttnRows; ++i)
      rmax[i] = _mm512_reduce_max_ps(_mm512_load_ps(lanes + i * 16));
  }
}

// out rows [0, rows) = (p . v) * inv over the first nkeys keys (a multiple of 32)
void amx_attn_values(const uint16_t* p, const uint16_t* vp, const float* inv, int64_t rows,
                     int64_t d, int64_t lp, int64_t nkeys, uint16_t* out, int64_t ors,
                     int64_t ls) {
  alignas(64) float acc[kAmxAttnRows * 32];
  const uint16_t* p1 = p + 16 * ls;
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    const uint16_t* v0 = vp + (c0 / 16) * lp * 16;
    const uint16_t* v1 = v0 + lp * 16;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t j = 0; j < nkeys / 32; ++j) {
      _tile_loadd(4, p + j * 32, ls * 2);
      _tile_loadd(6, v0 + j * 512, 64);
      _tile_loadd(7, v1 + j * 512, 64);
      _tile_loadd(5, p1 + j * 32, ls * 2);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, acc, 128);
    _tile_stored(1, acc + 16, 128);
    _tile_stored(2, acc + 16 * 32, 128);
    _tile_stored(3, acc + 16 * 32 + 16, 128);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t h = 0; h < 2; ++h) {
        const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(acc + i * 32 + h * 16),
                                       _mm512_set1_ps(inv[i]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * ors + c0 + 16 * h),
                            cvt_bf16x16(o));
      }
  }
}
constexpr bool kAmxAttention = true;
#else
constexpr int64_t kAmxAttnRows = 32;
void amx_attn_scores(const uint16_t*, int64_t, const uint16_t*, float*, int64_t, int64_t,
                     int64_t, float*, int64_t) {
  TORCH_CHECK(false, "glmv: built without AMX");
}
void amx_attn_values(const uint16_t*, const uint16_t*, const float*, int64_t, int64_t, int64_t,
                     int64_t, uint16_t*, int64_t, int64_t) {
  TORCH_CHECK(false, "glmv: built without AMX");
}
constexpr bool kAmxAttention = false;
#endif

#if GLMV_BF16_LANES
// Decode attention for one (sequence, KV head) on AVX-512. krows/vrows: the len cached key
// and value rows of this KV head; q: the group's query rows (stride qhs). Scores on bf16 pairs
// over keys packed 16 at a time ([d/2][16][2] in kp, the varlen kernel's layout); softmax and
// the weighted sum of the values in fp32; one rounding to bf16 at the end.

// Scores of GW query rows against NG groups of 16 packed keys (group j at kp + j * 32 pairs).
// Two groups at once give the unit twice the independent accumulators: with one, it waited on
// four chains of dependent dot products (12 layers of 64 sequences x 180 tokens with the rows
// in cache: 3.0-3.4 -> 2.5-2.8 ms); each score is the same sum in the same order either way.
template <int GW, int NG>
void decode_scores(const uint16_t* q, int64_t qhs, const uint16_t* kp, int64_t pairs,
                   float scale, float* s, int64_t lp) {
  __m512 acc[GW][NG];
  for (auto& row : acc)
    for (auto& r : row) r = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    bf16x32 b[NG];
    for (int j = 0; j < NG; ++j) b[j] = as_bf16x32(_mm512_loadu_si512(kp + (j * pairs + p) * 32));
    for (int g = 0; g < GW; ++g) {
      const bf16x32 a = bcast_pair(q + g * qhs + 2 * p);
      for (int j = 0; j < NG; ++j) acc[g][j] = dot_bf16(acc[g][j], a, b[j]);
    }
  }
  for (int g = 0; g < GW; ++g)
    for (int j = 0; j < NG; ++j)
      _mm512_storeu_ps(s + g * lp + 16 * j, _mm512_mul_ps(acc[g][j], _mm512_set1_ps(scale)));
}

// decode_scores for gw (1-4) rows and ng (1-2) key groups
template <int NG>
void decode_scores_rows(int64_t gw, const uint16_t* q, int64_t qhs, const uint16_t* kp,
                        int64_t pairs, float scale, float* s, int64_t lp) {
  switch (gw) {
    case 4: decode_scores<4, NG>(q, qhs, kp, pairs, scale, s, lp); break;
    case 3: decode_scores<3, NG>(q, qhs, kp, pairs, scale, s, lp); break;
    case 2: decode_scores<2, NG>(q, qhs, kp, pairs, scale, s, lp); break;
    default: decode_scores<1, NG>(q, qhs, kp, pairs, scale, s, lp); break;
  }
}

// out[g][c0 + 16c] = sum_t p[g][t] v[t][c0 + 16c] for GW query rows, NC x 16 columns
// (feed: called every 32 keys, see NextRows)
template <int GW, int NC, typename Feed>
void decode_values(const float* p, int64_t lp, const uint16_t* const* vrows, int64_t len,
                   int64_t c0, uint16_t* out, int64_t ohs, Feed&& feed) {
  __m512 acc[GW][NC];
  for (auto& row : acc)
    for (auto& r : row) r = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    if ((t & 31) == 0) feed();
    __m512 v[NC];
    for (int c = 0; c < NC; ++c) v[c] = load_bf16x16(vrows[t] + c0 + 16 * c);
    for (int g = 0; g < GW; ++g) {
      const __m512 pg = _mm512_set1_ps(p[g * lp + t]);
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm512_fmadd_ps(pg, v[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GW; ++g)
    for (int c = 0; c < NC; ++c)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * ohs + c0 + 16 * c),
                          cvt_bf16x16(acc[g][c]));
}

// decode_values for gw (1-4) rows and NC x 16 columns
template <int NC, typename Feed>
void decode_values_rows(int64_t gw, const float* p, int64_t lp, const uint16_t* const* vrows,
                        int64_t len, int64_t c0, uint16_t* out, int64_t ohs, Feed&& feed) {
  switch (gw) {
    case 4: decode_values<4, NC>(p, lp, vrows, len, c0, out, ohs, feed); break;
    case 3: decode_values<3, NC>(p, lp, vrows, len, c0, out, ohs, feed); break;
    case 2: decode_values<2, NC>(p, lp, vrows, len, c0, out, ohs, feed); break;
    default: decode_values<1, NC>(p, lp, vrows, len, c0, out, ohs, feed); break;
  }
}

// softmax of rows [0, rows) of s in place (row stride lp, `len` valid columns), normalised
void softmax_rows_f32(float* s, int64_t rows, int64_t len, int64_t lp) {
  for (int64_t i = 0; i < rows; ++i) {
    float* sr = s + i * lp;
    const float total = exp_row512(sr, len, lp, [sr](int64_t n, __m512 e) {
      _mm512_storeu_ps(sr + n, e);
    });
    const __m512 inv = _mm512_set1_ps(1.0f / total);
    for (int64_t n = 0; n < lp; n += 16)
      _mm512_storeu_ps(sr + n, _mm512_mul_ps(_mm512_loadu_ps(sr + n), inv));
  }
}

// The keys and values (every KV head's: whole rows of the blocks) of the sequence this thread
// takes next, requested into L2 a share at a time while it computes the current one: memory
// then works while the core does, where a burst at the sequence's start left it waiting
// first and computing after. Shares at even points of each task (decode_task_feeds): bigger,
// fewer bursts filled the core's queue of misses and stalled the arithmetic behind it.
struct NextRows {
  const int32_t* table = nullptr;  // its block ids
  const char *k = nullptr, *v = nullptr;  // the cache's key and value halves
  int64_t block_bytes = 0, rows_bytes = 0;  // one block's bytes (one half); bytes to request
  int64_t done = 0;  // bytes requested so far
  int64_t share = 0;  // bytes per feed()
  int64_t block = 0, at = 0;  // where `done` is: block number, bytes into it
  void feed() {
    int64_t left = std::min(rows_bytes - done, share);
    done += left;
    while (left > 0) {
      const int64_t n = std::min(left, block_bytes - at);
      const int64_t base = int64_t(table[block]) * block_bytes + at;
      for (int64_t l = 0; l < n; l += 64) {
        _mm_prefetch(k + base + l, _MM_HINT_T1);
        _mm_prefetch(v + base + l, _MM_HINT_T1);
      }
      left -= n;
      at += n;
      if (at == block_bytes) at = 0, ++block;
    }
  }
};

struct DecodeScratch {
  NextRows next;
  int64_t fed_rows = 0;  // rows of this task's sequence the previous sequence requested
  std::vector<const uint16_t*> krows, vrows;
  std::vector<uint16_t> kp;
  std::vector<float> s;
};

void decode_task512(const uint16_t* q, int64_t qhs, uint16_t* out, int64_t ohs, int64_t group,
                    int64_t d, int64_t len, float scale, DecodeScratch& w, int64_t kh,
                    int64_t kvh) {
  const int64_t pairs = d / 2, lp = (len + 15) / 16 * 16;
  w.kp.resize(pairs * 64);
  w.s.resize(group * lp);
  // The rows are scattered over the cache's blocks, where the hardware prefetchers lose
  // them: while one group of 32 keys is scored, the next group's keys are requested, and
  // this group's values (into L2, for the weighted sum after the softmax).
  // The first KV head of a token's row requests the whole row (every KV head's keys and
  // values, adjacent in the cache): the sibling heads, the tasks this thread takes next, then
  // find their rows in cache.
  const int64_t row_lines = (kh == 0 ? kvh : 1) * d * 2 / 64, back = kh * d;
  // Besides, the first KV head requests the rows' first 4 MiB of keys and values up front
  // (into L2, spilling to L3), less the rows the previous sequence already requested
  // (NextRows): this stream alone keeps too few lines in flight for memory's latency.
  // 64 sequences x 180 cached tokens (2 KV heads of 128) over 12 layers, caches in 2 MiB
  // pages: 6.5-6.9 ms with the burst alone, 4.7-5.1 with NextRows and two key groups at once;
  // 1,000 tokens 41-43 -> 33-34 ms, 4,000 tokens 200 -> 178 ms (2 vCPU AMD EPYC, Zen 5,
  // L2 1 MiB, L3 32 MiB).
  if (kh == 0) {
    const int64_t burst = std::min<int64_t>(len, (int64_t(4) << 20) / (row_lines * 128));
    for (int64_t t = w.fed_rows; t < burst; ++t)
      for (int64_t l = 0; l < row_lines; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(w.krows[t]) + 64 * l, _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w.vrows[t]) + 64 * l, _MM_HINT_T1);
      }
  }
  for (int64_t t0 = 0; t0 < len; t0 += 32) {
    const int64_t n = std::min<int64_t>(32, len - t0);
    w.next.feed();
    for (int64_t t = t0 + 32; t < std::min(len, t0 + 64); ++t)
      for (int64_t l = 0; l < row_lines; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(w.krows[t] - back) + 64 * l, _MM_HINT_T0);
    for (int64_t t = t0; t < t0 + n; ++t)
      for (int64_t l = 0; l < row_lines; ++l)
        _mm_prefetch(reinterpret_cast<const char*>(w.vrows[t] - back) + 64 * l, _MM_HINT_T1);
    pack_keys16([&](int64_t l) { return w.krows[t0 + l]; }, std::min<int64_t>(16, n), pairs,
                w.kp.data());
    w.next.feed();
    if (n > 16)
      pack_keys16([&](int64_t l) { return w.krows[t0 + 16 + l]; }, n - 16, pairs,
                  w.kp.data() + pairs * 32);
    w.next.feed();
    for (int64_t g0 = 0; g0 < group; g0 += 4) {
      const uint16_t* qg = q + g0 * qhs;
      float* sg = w.s.data() + g0 * lp + t0;
      const int64_t gw = std::min<int64_t>(4, group - g0);
      if (n > 16)
        decode_scores_rows<2>(gw, qg, qhs, w.kp.data(), pairs, scale, sg, lp);
      else
        decode_scores_rows<1>(gw, qg, qhs, w.kp.data(), pairs, scale, sg, lp);
    }
  }
  softmax_rows_f32(w.s.data(), group, len, lp);
  w.next.feed();
  const uint16_t* const* vrows = w.vrows.data();
  auto feed = [&] { w.next.feed(); };
  for (int64_t g0 = 0; g0 < group; g0 += 4) {
    const float* pg = w.s.data() + g0 * lp;
    uint16_t* og = out + g0 * ohs;
    const int64_t gw = std::min<int64_t>(4, group - g0);
    for (int64_t c0 = 0; c0 < d; c0 += 64) {
      if (d - c0 >= 64)
        decode_values_rows<4>(gw, pg, lp, vrows, len, c0, og, ohs, feed);
      else  // d % 64 == 32
        decode_values_rows<2>(gw, pg, lp, vrows, len, c0, og, ohs, feed);
    }
  }
}

// How many times decode_task512 calls w.next.feed() for one (sequence, KV head): three per
// 32 keys scored, one after the softmax, one per 32 keys of each 64 columns of each 4 query
// rows' weighted sum.
int64_t decode_task_feeds(int64_t len, int64_t group, int64_t d) {
  const int64_t chunks = (len + 31) / 32;
  return 3 * chunks + 1 + (group + 3) / 4 * ((d + 63) / 64) * chunks;
}
#endif

// Decode attention straight from the paged cache: for decode sequence i (one new token at row
// token_idx[i] of q), attend over the seq_lens[i] cached keys listed by
// block_tables[seq_idx[i]] and write out[token_idx[i]]. q, out [tokens, heads, head_dim]
// (unit stride along head_dim); grouped-query heads share their KV head. Scores, softmax and
// the weighted sum stay in fp32; one rounding to bf16 at the end. With AVX-512 and a head_dim
// that divides by 32 the scores run on bf16 pairs (decode_task512), else plain loops.
void paged_decode_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_idx,
                            const at::Tensor& token_idx, const at::Tensor& seq_lens,
                            double scale) {
  check_cache(kv_cache);
  check_bf16(q, "q");
  check_bf16(out, "out");
  int64_t block_size = kv_cache.size(2), kvh = kv_cache.size(3), d = kv_cache.size(4);
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.size(2) == d, "q must be [tokens, heads, ",
              d, "]");
  int64_t heads = q.size(1);
  TORCH_CHECK(heads % kvh == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(out.dim() == 3 && out.size(1) == heads && out.size(2) == d && out.stride(2) == 1,
              "out must be shaped like q");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.is_contiguous(),
              "block_tables must be a contiguous int32 [seqs, max_blocks]");
  for (const at::Tensor* t : {&seq_idx, &token_idx, &seq_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 1 &&
                    t->numel() == seq_idx.numel(),
                "seq_idx, token_idx and seq_lens must be int64 vectors of the same length");
  int64_t num = seq_idx.numel();
  int64_t max_blocks = block_tables.size(1);
  int64_t num_blocks = kv_cache.size(1);
  const int64_t* si = seq_idx.data_ptr<int64_t>();
  const int64_t* ti = token_idx.data_ptr<int64_t>();
  const int64_t* sl = seq_lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < num; ++i) {
    TORCH_CHECK(si[i] >= 0 && si[i] < block_tables.size(0), "seq_idx out of range");
    TORCH_CHECK(ti[i] >= 0 && ti[i] < q.size(0) && ti[i] < out.size(0), "token_idx out of range");
    TORCH_CHECK(sl[i] >= 1 && sl[i] <= max_blocks * block_size, "seq_len out of range");
    const int32_t* table = block_tables.data_ptr<int32_t>() + si[i] * max_blocks;
    for (int64_t b = 0; b < (sl[i] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(table[b] >= 0 && table[b] < kv_cache.size(1), "block id ", table[b],
                  " out of range");
  }
  const int32_t* bt = block_tables.data_ptr<int32_t>();
  const uint16_t* kc = bits(kv_cache);
  const uint16_t* vc = kc + num_blocks * block_size * kvh * d;
  const uint16_t* qp = bits(q);
  uint16_t* op = mbits(out);
  int64_t group = heads / kvh;
  int64_t qts = q.stride(0), qhs = q.stride(1), ots = out.stride(0), ohs = out.stride(1);
  int64_t slot_row = kvh * d;
  float fscale = float(scale);

#if GLMV_BF16_LANES
  if (d % 32 == 0) {
    at::parallel_for(0, num * kvh, 1, [&](int64_t begin, int64_t end) {
      DecodeScratch w;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / kvh, kh = task % kvh, len = sl[i];
        const int32_t* table = bt + si[i] * max_blocks;
        if (kh == 0) {
          // The rows of this sequence that its predecessor on this thread requested (none
          // for the thread's first); then the next sequence's first 1 MiB of keys and
          // values, spread over the feeds of this sequence's tasks.
          w.fed_rows = task == begin ? 0 : w.next.rows_bytes / (slot_row * 2);
          w.next = NextRows{};
          if ((i + 1) * kvh < end) {
            const int64_t rows = std::min<int64_t>(sl[i + 1], (int64_t(1) << 20) / (slot_row * 4));
            const int64_t feeds = kvh * decode_task_feeds(len, group, d);
            w.next.table = bt + si[i + 1] * max_blocks;
            w.next.k = reinterpret_cast<const char*>(kc);
            w.next.v = reinterpret_cast<const char*>(vc);
            w.next.block_bytes = block_size * slot_row * 2;
            w.next.rows_bytes = rows * slot_row * 2;
            // (whole lines, enough that the feeds cover every byte)
            w.next.share = ((w.next.rows_bytes + feeds - 1) / feeds + 63) / 64 * 64;
          }
        }
        w.krows.resize(len);
        w.vrows.resize(len);
        for (int64_t t0 = 0, b = 0; t0 < len; t0 += block_size, ++b) {
          const int64_t first = int64_t(table[b]) * block_size * slot_row + kh * d;
          const int64_t n = std::min(block_size, len - t0);
          for (int64_t t = 0; t < n; ++t) {
            w.krows[t0 + t] = kc + first + t * slot_row;
            w.vrows[t0 + t] = vc + first + t * slot_row;
          }
        }
        decode_task512(qp + ti[i] * qts + kh * group * qhs, qhs,
                       op + ti[i] * ots + kh * group * ohs, ohs, group, d, len,
                       fscale, w, kh, kvh);
      }
    });
    return;
  }
#endif
  // Plain loops
  at::parallel_for(0, num * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, scores, acc;
    for (int64_t task = begin; task < end; ++task) {
      int64_t i = task / kvh, kh = task % kvh;
      int64_t len = sl[i];
      const int32_t* table = bt + si[i] * max_blocks;
      qf.assign(group * d, 0.0f);
      scores.resize(group * len);
      acc.assign(group * d, 0.0f);
      for (int64_t g = 0; g < group; ++g) {
        const uint16_t* qr = qp + ti[i] * qts + (kh * group + g) * qhs;
        for (int64_t j = 0; j < d; ++j) qf[g * d + j] = bf2f(qr[j]) * fscale;
      }
      for (int64_t t = 0; t < len; ++t) {
        int64_t block = table[t / block_size];
        const uint16_t* kr = kc + (block * block_size + t % block_size) * slot_row + kh * d;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = qf.data() + g * d;
          float lanes[kLanes] = {};
          int64_t j = 0;
          for (; j + kLanes <= d; j += kLanes)
            for (int l = 0; l < kLanes; ++l) lanes[l] += qg[j + l] * bf2f(kr[j + l]);
          float s = 0.0f;
          for (int l = 0; l < kLanes; ++l) s += lanes[l];
          for (; j < d; ++j) s += qg[j] * bf2f(kr[j]);
          scores[g * len + t] = s;
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        float* sg = scores.data() + g * len;
        const float inv = 1.0f / exp_shifted(sg, len);
        for (int64_t t = 0; t < len; ++t) sg[t] *= inv;
      }
      for (int64_t t = 0; t < len; ++t) {
        int64_t block = table[t / block_size];
        const uint16_t* vr = vc + (block * block_size + t % block_size) * slot_row + kh * d;
        for (int64_t g = 0; g < group; ++g) {
          float p = scores[g * len + t];
          float* ag = acc.data() + g * d;
          for (int64_t j = 0; j < d; ++j) ag[j] += p * bf2f(vr[j]);
        }
      }
      for (int64_t g = 0; g < group; ++g) {
        uint16_t* orow = op + ti[i] * ots + (kh * group + g) * ohs;
        for (int64_t j = 0; j < d; ++j) orow[j] = f2bf(acc[g * d + j]);
      }
    }
  });
}



void varlen_attention(const at::Tensor& out, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
                      double scale, bool causal) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    check_bf16(*t, "q, k and v");
    TORCH_CHECK(t->dim() == 3 && t->stride(2) == 1 && t->size(2) == q.size(2),
                "q, k and v must be [tokens, heads, head_dim], unit stride along head_dim");
  }
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  check_bf16(out, "out");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == q.sizes(),
              "out must be a contiguous [tokens, heads, head_dim]");
  const int64_t heads = q.size(1), kv_heads = k.size(1), d = q.size(2);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "query heads must be a multiple of KV heads");
  for (const at::Tensor* t : {&cu_q, &cu_k})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous() &&
                    t->numel() == cu_q.numel() && t->numel() >= 1,
                "cu_q and cu_k must be contiguous int64 vectors of the same length");
  const int64_t segments = cu_q.numel() - 1;
  const int64_t* cu = cu_q.data_ptr<int64_t>();
  const int64_t* cuk = cu_k.data_ptr<int64_t>();
  TORCH_CHECK(cu[0] == 0 && cu[segments] == q.size(0), "cu_q must run from 0 to q's tokens");
  TORCH_CHECK(cuk[0] == 0 && cuk[segments] == k.size(0), "cu_k must run from 0 to k's tokens");
  for (int64_t s = 0; s < segments; ++s) {
    TORCH_CHECK(cu[s + 1] > cu[s] && cuk[s + 1] > cuk[s], "segments must not be empty");
    TORCH_CHECK(!causal || cuk[s + 1] - cuk[s] >= cu[s + 1] - cu[s],
                "causal: a segment needs at least as many keys as queries");
  }
  const VarlenArgs a{bits(q), bits(k), bits(v), mbits(out), cu, cuk, heads, heads / kv_heads, d,
                     q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
                     v.stride(1), float(scale), causal};
  // Query rows per task: as many as keep the task's scores within ~512 KiB (the L2), and at
  // least the 32 rows AMX takes at once.
  auto rows_for = [](int64_t lp) {
    return std::max<int64_t>(kAmxAttnRows,
                             std::min<int64_t>(64, (int64_t(1) << 17) / lp / 4 * 4));
  };
  auto padded = [](int64_t len) { return (len + 63) / 64 * 64; };
  std::vector<int64_t> task_start{0};  // first task of each segment
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t lq = cu[s + 1] - cu[s], rows = rows_for(padded(cuk[s + 1] - cuk[s]));
    task_start.push_back(task_start.back() + heads * ((lq + rows - 1) / rows));
  }
  const int64_t tasks = task_start.back();
  const int64_t ors = heads * d;
  // The keys query row r (0-based in its segment) attends to: all, or causally its own
  // position and those before it.
  auto keys_of = [&a](int64_t s, int64_t r) {
    const int64_t lk = a.cuk[s + 1] - a.cuk[s];
    return a.causal ? lk - (a.cu[s + 1] - a.cu[s]) + r + 1 : lk;
  };
#if GLMV_BF16_LANES
  if (d % 16 == 0) {
    // Pack every (segment, KV head)'s keys and values once.
    std::vector<int64_t> pack_off{0};
    for (int64_t s = 0; s < segments; ++s)
      pack_off.push_back(pack_off.back() + padded(cuk[s + 1] - cuk[s]) * kv_heads * d);
    const size_t pack_bytes = size_t(pack_off.back()) * sizeof(uint16_t);
    const RowBuffer kbuf = row_buffer(2, pack_bytes), vbuf = row_buffer(3, pack_bytes);
    uint16_t* const kpack = reinterpret_cast<uint16_t*>(kbuf.data);
    uint16_t* const vpack = reinterpret_cast<uint16_t*>(vbuf.data);
    at::parallel_for(0, segments * kv_heads, 1, [&](int64_t b, int64_t e) {
      for (int64_t sh = b; sh < e; ++sh) {
        const int64_t s = sh / kv_heads, h = sh % kv_heads;
        const int64_t lk = cuk[s + 1] - cuk[s], lp = padded(lk);
        const int64_t off = pack_off[s] + h * lp * d;
        pack_kv(a, cuk[s], lk, h, lp, kpack + off, vpack + off);
      }
    });
    // Segments of at least the bf16 products' AMX rows take AMX tiles (head_dim a multiple
    // of 32), 16 query rows at a time; the others bf16 pairs, 8 rows at a time.
    auto on_amx = [&](int64_t s) {
      return kAmxAttention && d % 32 == 0 && use_amx(cu[s + 1] - cu[s], false);
    };
    bool any_amx = false;
    for (int64_t s = 0; s < segments; ++s) any_amx = any_amx || on_amx(s);
    at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
      std::vector<float> sbuf;
      std::vector<Bf16X> pbuf, qbuf;  // AMX only where Bf16X is bf16
      float inv[kAmxAttnRows], rmax[kAmxAttnRows];
      if (any_amx) load_tile_config();
      for (int64_t task = b; task < e; ++task) {
        const int64_t s = std::upper_bound(task_start.begin(), task_start.end(), task) -
                          task_start.begin() - 1;
        const int64_t lq = cu[s + 1] - cu[s], lk = cuk[s + 1] - cuk[s], lp = padded(lk);
        const int64_t rows = rows_for(lp), blocks = (lq + rows - 1) / rows;
        const int64_t h = (task - task_start[s]) / blocks;
        const int64_t r0 = (task - task_start[s]) % blocks * rows;
        const int64_t r1 = std::min(lq, r0 + rows);
        const int64_t off = pack_off[s] + (h / a.group) * lp * d;
        const bool amx = on_amx(s);
        const int64_t step = amx ? kAmxAttnRows : kAttnRows;
        // AMX rows of scores and probabilities one line past a multiple of 4 KiB apart:
        // at lp floats (a 1024-key segment: exactly 4 KiB) every row of a tile store or load
        // fell in the same L1 set
        const int64_t ls = amx ? lp + 32 : lp;
        sbuf.resize(kAmxAttnRows * ls);
        pbuf.resize(kAmxAttnRows * ls);
        qbuf.resize(kAmxAttnRows * d);
        for (int64_t i0 = r0; i0 < r1; i0 += step) {
          const int64_t n = std::min(step, r1 - i0);
          // AMX loads a whole block's query rows where they lie; other blocks copy them
          const uint16_t* qrows = a.q + (cu[s] + i0) * a.qts + h * a.qhs;
          const bool in_place = amx && n == step;
          if (!in_place) {
            if (n < step) std::fill(qbuf.begin(), qbuf.end(), Bf16X(0));
            for (int64_t i = 0; i < n; ++i) {
              if constexpr (std::is_same_v<Bf16X, float>) {
                for (int64_t c = 0; c < d; ++c) qbuf[i * d + c] = bf2f(qrows[i * a.qts + c]);
              } else {
                std::memcpy(qbuf.data() + i * d, qrows + i * a.qts, d * sizeof(uint16_t));
              }
            }
          }
          const int64_t kmax = keys_of(s, i0 + n - 1);  // the block's widest row
          const int64_t nkeys = std::min(lp, (kmax + 31) / 32 * 32);
          // Without a mask, the AMX scores come with their row maxima.
          const bool fused_max = amx && !causal;
          if (amx) {
            amx_attn_scores(in_place ? qrows : reinterpret_cast<const uint16_t*>(qbuf.data()),
                            in_place ? a.qts : d,
                            kpack + off, sbuf.data(), d, ls, nkeys,
                            fused_max ? rmax : nullptr, lk);
          } else {
            attn_scores(qbuf.data(), kpack + off, sbuf.data(), d, lp, nkeys);
          }
          if (causal) {
            for (int64_t i = 0; i < step; ++i)
              softmax_rows512(sbuf.data() + i * ls, pbuf.data() + i * ls, inv + i, 1,
                              keys_of(s, std::min(i0 + i, i0 + n - 1)), lp, ls, a.scale,
                              nullptr);
          } else {
            softmax_rows512(sbuf.data(), pbuf.data(), inv, step, lk, lp, ls, a.scale,
                            fused_max ? rmax : nullptr);
          }
          uint16_t* orow = a.out + (cu[s] + i0) * ors + h * d;
          if (amx) {
            amx_attn_values(reinterpret_cast<const uint16_t*>(pbuf.data()), vpack + off, inv,
                            n, d, lp, nkeys, orow, ors, ls);
            continue;
          }
          for (int64_t c0 = 0; c0 < d; c0 += 32) {
            if (d - c0 >= 32) {
              attn_values<2>(pbuf.data(), vpack + off, inv, n, d, lp, kmax, c0, orow, ors);
            } else {
              attn_values<1>(pbuf.data(), vpack + off, inv, n, d, lp, kmax, c0, orow, ors);
            }
          }
        }
      }
#if GLMV_AMX
      if (any_amx) _tile_release();
#endif
    });
    return;
  }
#endif
  // Plain loops: the same arithmetic one query row at a time.
  at::parallel_for(0, tasks, 1, [&](int64_t b, int64_t e) {
    std::vector<float> srow, acc, qf;
    std::vector<uint16_t> prow;
    for (int64_t task = b; task < e; ++task) {
      const int64_t s = std::upper_bound(task_start.begin(), task_start.end(), task) -
                        task_start.begin() - 1;
      const int64_t lq = cu[s + 1] - cu[s], lp = padded(cuk[s + 1] - cuk[s]);
      const int64_t rows = rows_for(lp), blocks = (lq + rows - 1) / rows;
      const int64_t h = (task - task_start[s]) / blocks, kh = h / a.group;
      const int64_t r0 = (task - task_start[s]) % blocks * rows;
      const int64_t r1 = std::min(lq, r0 + rows);
      srow.resize(lp);
      prow.resize(lp);
      qf.resize(d);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t len = keys_of(s, r);
        const uint16_t* qr = a.q + (cu[s] + r) * a.qts + h * a.qhs;
        for (int64_t c = 0; c < d; ++c) qf[c] = bf2f(qr[c]);
        for (int64_t n = 0; n < len; ++n) {
          const uint16_t* kr = a.k + (cuk[s] + n) * a.kts + kh * a.khs;
          float dot = 0.0f;
          for (int64_t c = 0; c < d; ++c) dot += qf[c] * bf2f(kr[c]);
          srow[n] = dot * a.scale;
        }
        float inv;
        softmax_rows(srow.data(), prow.data(), &inv, 1, len, lp);
        acc.assign(d, 0.0f);
        for (int64_t n = 0; n < len; ++n) {
          const uint16_t* vr = a.v + (cuk[s] + n) * a.vts + kh * a.vhs;
          const float pn = bf2f(prow[n]);
          for (int64_t c = 0; c < d; ++c) acc[c] += pn * bf2f(vr[c]);
        }
        uint16_t* orow = a.out + (cu[s] + r) * ors + h * d;
        for (int64_t c = 0; c < d; ++c) orow[c] = f2bf(acc[c] * inv);
      }
    }
  });
}

bool bf16_attention() { return kBf16Attention; }

// ---------------------------------------------------------------------------------------------
// Greedy sampling: the index of each row's largest value, as torch.argmax gives it (the first
// of equal maxima; the first NaN if the row has one), straight from bf16 logits. Converting
// [64, 151552] logits to fp32 first and taking torch's argmax cost ~12 ms a step.

int64_t argmax_row(const uint16_t* x, int64_t n) {
  int64_t best = 0;
  float top = bf2f(x[0]);
  if (std::isnan(top)) return 0;
  int64_t i = 1;
#if GLMV_BF16_LANES
  if (n >= 32) {
    __m512 vmax = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __m512i vidx = _mm512_set1_epi32(0);
    __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m512 v = load_bf16x16(x + j);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      const __mmask16 up = _mm512_cmp_ps_mask(v, vmax, _CMP_GT_OQ);  // strictly: first wins
      vmax = _mm512_mask_mov_ps(vmax, up, v);
      vidx = _mm512_mask_mov_epi32(vidx, up, idx);
      idx = _mm512_add_epi32(idx, step);
    }
    if (nan) {  // rare: the first NaN, found by the plain scan below
      i = 0;
      top = -std::numeric_limits<float>::infinity();
    } else {
      alignas(64) float vals[16];
      alignas(64) int32_t idxs[16];
      _mm512_store_ps(vals, vmax);
      _mm512_store_si512(idxs, vidx);
      top = -std::numeric_limits<float>::infinity();
      best = -1;
      for (int l = 0; l < 16; ++l)
        if (vals[l] > top || (vals[l] == top && idxs[l] < best)) top = vals[l], best = idxs[l];
      if (best < 0) best = 0, top = bf2f(x[0]);  // every value -inf
      i = j;
    }
  }
#endif
  for (; i < n; ++i) {
    const float v = bf2f(x[i]);
    if (std::isnan(v)) return i;
    if (v > top) top = v, best = i;
  }
  return best;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  check_bf16(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1 &&
                  x.size(1) < std::numeric_limits<int32_t>::max(),
              "x must be [rows, n] with 0 < n < 2^31 and unit stride along n");
  auto out = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const uint16_t* xp = bits(x);
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t n = x.size(1), rs = x.stride(0);
  at::parallel_for(0, x.size(0), 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) op[r] = argmax_row(xp + r * rs, n);
  });
  return out;
}


// ---------------------------------------------------------------------------------------------
// The dense GLM-4 decoder layers over decode tokens (one new token per sequence), all of
// them in one call: the same operators as glmv/models/glm4v.py's layer calls one by one from
// Python, in the same order on the same values, so the result is bit for bit the same; what
// goes is the Python and dispatcher time between them (a decode step on two cores spent ~10%
// of its time there with one call per operator, ~0.6 ms per step with one call per layer).

// A linear layer's packed weight as glmv.layers passes it: [blocks, bias?] (bf16 blocks) or
// [blocks, bias?, scale, row_sum] (int8 blocks); `p` points at its `size` entries.
at::Tensor packed_product(const at::Tensor& x, const c10::optional<at::Tensor>* p, int64_t size,
                          int64_t out_features) {
  TORCH_CHECK(size == 2 || size == 4,
              "a packed weight is [blocks, bias] or [blocks, bias, scale, row_sum]");
  const c10::optional<at::Tensor>& w = p[0];
  const c10::optional<at::Tensor>& bias = p[1];
  TORCH_CHECK(w.has_value(), "a packed weight needs its blocks");
  if (size == 2) return bf16_linear(x, *w, bias, out_features);
  TORCH_CHECK(p[2].has_value() && p[3].has_value(), "int8 blocks need scale and row_sum");
  return int8_linear(x, *w, *p[2], *p[3], bias, out_features);
}

// What every layer of one decode step shares: rotary tables, heads, where each sequence's
// rows and cache slots are.
struct DecodeStep {
  const at::Tensor& cos;
  const at::Tensor& sin;
  bool interleaved;
  int64_t nh, nkv, d;
  const at::Tensor& slot_mapping;
  const at::Tensor& block_tables;
  const at::Tensor& seq_idx;
  const at::Tensor& token_idx;
  const at::Tensor& seq_lens;
  double scale, eps;
  bool swiglu;
};

// One layer. norms: input, post_self_attn, post_attention, post_mlp weights; products: qkv, o,
// gate_up, down as packed_product takes them (sizes: entries of each); out_features of each.
// swiglu: gate_up holds SwiGLU pairs of bf16 blocks (bf16_linear_swiglu), its out_features
// the MLP's width.
at::Tensor decode_layer(const at::Tensor& x, const at::Tensor* norms,
                        const c10::optional<at::Tensor>* const* products, const int64_t* sizes,
                        const int64_t* out_features, const at::Tensor& kv_cache,
                        const DecodeStep& s) {
  const int64_t n = x.size(0), nh = s.nh, nkv = s.nkv, d = s.d;
  TORCH_CHECK(out_features[0] == (nh + 2 * nkv) * d && out_features[1] == x.size(1),
              "decode_layers: qkv/o widths do not match the heads");
  const at::Tensor normed = rms_norm(x, norms[0], s.eps);
  const at::Tensor mixed = packed_product(normed, products[0], sizes[0], out_features[0]);
  rotary_(mixed.narrow(1, 0, (nh + nkv) * d).view({n, nh + nkv, d}), s.cos, s.sin,
          s.interleaved);
  const at::Tensor q = mixed.narrow(1, 0, nh * d).view({n, nh, d});
  write_kv(kv_cache, mixed.narrow(1, nh * d, nkv * d).view({n, nkv, d}),
           mixed.narrow(1, (nh + nkv) * d, nkv * d).view({n, nkv, d}), s.slot_mapping);
  const at::Tensor attn = at::empty({n, nh, d}, x.options());
  paged_decode_attention(attn, q, kv_cache, s.block_tables, s.seq_idx, s.token_idx, s.seq_lens,
                         s.scale);
  const at::Tensor projected =
      packed_product(attn.view({n, nh * d}), products[1], sizes[1], out_features[1]);
  auto [h, normed_h] = add_rms_norm(projected, x, norms[1], norms[2], s.eps);
  at::Tensor act;
  if (s.swiglu) {
    TORCH_CHECK(sizes[2] == 2 && products[2][0].has_value(),
                "decode_layers: SwiGLU pairs are bf16 blocks [blocks, bias]");
    act = bf16_linear_swiglu(normed_h, *products[2][0], products[2][1], out_features[2]);
  } else {
    act = silu_and_mul(packed_product(normed_h, products[2], sizes[2], out_features[2]));
  }
  return norm_add(packed_product(act, products[3], sizes[3], out_features[3]), h, norms[3],
                  s.eps);
}

// Layer after layer over x. Per layer: four norms, four products (their entries one after
// another in `products`, product_sizes[4 l + j] entries for product j), four out_features and
// its KV cache. heads: query heads, KV heads, head_dim. The decode rows of seq_idx/token_idx/
// seq_lens must cover every token of x.
at::Tensor decode_layers(const at::Tensor& x, at::TensorList norms,
                         const c10::List<c10::optional<at::Tensor>>& products,
                         at::IntArrayRef product_sizes, at::IntArrayRef out_features,
                         const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                         at::IntArrayRef heads, at::TensorList kv_caches,
                         const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                         const at::Tensor& seq_idx, const at::Tensor& token_idx,
                         const at::Tensor& seq_lens, double scale, double eps, bool swiglu) {
  const int64_t layers = int64_t(kv_caches.size());
  TORCH_CHECK(int64_t(norms.size()) == 4 * layers && int64_t(product_sizes.size()) == 4 * layers &&
                  int64_t(out_features.size()) == 4 * layers && heads.size() == 3,
              "decode_layers: per layer four norms, four products and four out_features; heads "
              "(heads, kv_heads, head_dim)");
  TORCH_CHECK(seq_idx.numel() == x.size(0), "decode_layers: every token must be a decode token");
  std::vector<c10::optional<at::Tensor>> entries(products.begin(), products.end());
  int64_t total = 0;
  for (int64_t size : product_sizes) total += size;
  TORCH_CHECK(total == int64_t(entries.size()), "decode_layers: product_sizes must add up to "
              "the entries of products");
  const DecodeStep step{cos,     sin,       interleaved, heads[0], heads[1], heads[2],
                        slot_mapping, block_tables, seq_idx, token_idx, seq_lens, scale,
                        eps,     swiglu};
  at::Tensor h = x;
  const c10::optional<at::Tensor>* next = entries.data();
  for (int64_t l = 0; l < layers; ++l) {
    const c10::optional<at::Tensor>* p[4];
    for (int j = 0; j < 4; ++j) {
      p[j] = next;
      next += product_sizes[4 * l + j];
    }
    h = decode_layer(h, norms.data() + 4 * l, p, product_sizes.data() + 4 * l,
                     out_features.data() + 4 * l, kv_caches[l], step);
  }
  return h;
}

}  // namespace

TORCH_LIBRARY(glmv, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor? weight_x, Tensor weight_out, float eps)"
        " -> (Tensor, Tensor)");
  m.def("norm_add(Tensor x, Tensor residual, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("rotary_(Tensor(a!) qk, Tensor cos, Tensor sin, bool interleaved) -> ()");
  m.def("write_kv(Tensor(a!) kv_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()");
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_tables,"
        " Tensor seq_idx, Tensor token_idx, Tensor seq_lens, float scale) -> ()");
  m.def("int8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor w_sum, Tensor? bias,"
        " int out_features) -> Tensor");
  m.def("int8_vnni() -> bool", &int8_vnni);  // whether int8_linear has its VNNI kernel
  m.def("bf16_linear(Tensor x, Tensor w, Tensor? bias, int out_features) -> Tensor");
  m.def("bf16_linear_swiglu(Tensor x, Tensor w, Tensor? bias, int out_features) -> Tensor");
  m.def("bf16_linear_argmax(Tensor x, Tensor w, int out_features) -> Tensor");
  m.def("bf16_linear_native() -> bool", &bf16_linear_native);  // AVX-512 lane blocks
  m.def("bf16_instructions() -> bool", &bf16_instructions);  // ... on vdpbf16ps
  m.def("linear_amx() -> bool", &linear_amx);  // whether the products can run on AMX tiles
  m.def("linear_amx_rows(int bf16, int int8) -> int[]", &linear_amx_rows);  // AMX from these rows
  m.def("varlen_attention(Tensor(a!) out, Tensor q, Tensor k, Tensor v, Tensor cu_q,"
        " Tensor cu_k, float scale, bool causal) -> ()");
  m.def("bf16_attention() -> bool", &bf16_attention);  // whether it runs on bf16 pairs
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] norms, Tensor?[] products, int[] product_sizes,"
        " int[] out_features, Tensor cos, Tensor sin, bool interleaved, int[] heads,"
        " Tensor(a!)[] kv_caches, Tensor slot_mapping, Tensor block_tables, Tensor seq_idx,"
        " Tensor token_idx, Tensor seq_lens, float scale, float eps, bool swiglu=False)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(glmv, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("norm_add", &norm_add);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_", &rotary_);
  m.impl("write_kv", &write_kv);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("int8_linear", &int8_linear);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("bf16_linear_swiglu", &bf16_linear_swiglu);
  m.impl("bf16_linear_argmax", &bf16_linear_argmax);
  m.impl("varlen_attention", &varlen_attention);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("decode_layers", &decode_layers);
}
