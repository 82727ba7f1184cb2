// Element-wise kernels of the ViT encoder block in bfloat16 on AVX-512 CPUs, fused around its matmuls.
//
// Under bf16 autocast, eager PyTorch spends much of a small ViT's training step between the matmuls: layer norms
// in float32 followed by casts, bias broadcasts before every addmm, a scaled float32 softmax and its casts,
// head (un)folding copies, GELU, and bias-gradient column sums. Each kernel here does one of those groups in a
// single pass over rows (parallel over rows, float32 arithmetic, bfloat16 rounding once at the output), except
// attention: attention_fwd / attention_bwd do all of it, matmuls included (AMX tiles), one image at a time. The
// kernels that produce a dense layer's output gradient also sum its weight gradient (WeightGradient).
// Python side, and the maths each kernel implements: vit_pipelines/models/fused_cpu.py.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

using at::BFloat16;
using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = 16;  // floats per AVX-512 register

inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// Loads/stores of 16 values (or the first n of them) as float32 registers.
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec widen(__m256i bf16) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16)); }
inline Vec load(const BFloat16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline Vec load(const BFloat16* p, int64_t n) { return widen(_mm256_maskz_loadu_epi16(tail_mask(n), p)); }
inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
// float32 → bfloat16 with round-to-nearest-even: one instruction where the CPU has AVX512_BF16 (the build adds
// -mavx512bf16 there), else ATen's integer rounding sequence.
inline __m256i narrow(Vec v) {
#ifdef __AVX512BF16__
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else
  return at::vec::cvtfp32_bf16(v);
#endif
}
inline void store(BFloat16* p, Vec v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
inline void store(BFloat16* p, Vec v, int64_t n) { _mm256_mask_storeu_epi16(p, tail_mask(n), narrow(v)); }
// 1 / q: the 14-bit hardware estimate refined by one Newton step (~float32 accuracy, a fraction of a division's cost).
inline Vec reciprocal(Vec q) {
  const Vec r = _mm512_rcp14_ps(q);
  return at::vec::fmadd(r, Vec(1.f) - q * r, r);
}

inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
inline float hmax(Vec v) { return _mm512_reduce_max_ps(v); }

void check_rows(const torch::Tensor& t, c10::ScalarType dtype, int64_t cols, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.dim() >= 1 && t.size(-1) == cols, name,
              ": expected a contiguous ", c10::toString(dtype), " tensor with last dimension ", cols, ", got ",
              t.scalar_type(), " ", t.sizes());
  TORCH_CHECK(cols % kLanes == 0, name, ": last dimension must be a multiple of ", kLanes, ", got ", cols);
}

// Column sums of an [M, C] matrix produced row block by row block: each worker adds its rows into its own
// float32 accumulator (`partial` row `tid`), summed at the end in a fixed order.
struct ColumnSums {
  torch::Tensor partial;
  explicit ColumnSums(int64_t cols) : partial(torch::zeros({at::get_num_threads(), cols}, torch::kFloat)) {}
  float* row(int64_t tid) { return partial.data_ptr<float>() + tid * partial.size(1); }
  // A loop here, not partial.sum(0): ATen's reduction dispatch costs more than a few hundred additions.
  torch::Tensor total() const {
    const int64_t threads = partial.size(0), cols = partial.size(1);
    auto out = torch::empty({cols}, partial.options());
    const float* p = partial.data_ptr<float>();
    float* po = out.data_ptr<float>();
    for (int64_t c = 0; c < cols; ++c) {
      float s = 0.f;
      for (int64_t t = 0; t < threads; ++t) s += p[t * cols + c];
      po[c] = s;
    }
    return out;
  }
};

constexpr int64_t kGrain = 32;  // rows per parallel task

// dst[c][r] = src[r][c] for a 16 x 16 block of bfloat16 (rows ld_src elements apart in src, ld_dst in dst): rows i
// and i + 8 share a register, 8 x 8 transposes run in each 128-bit lane (unpacks of 16, 32 then 64 bits), and a
// lane shuffle regroups each register into two output rows.
inline void transpose16x16(const BFloat16* src, int64_t ld_src, BFloat16* dst, int64_t ld_dst) {
  auto row = [&](int64_t r) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + r * ld_src)); };
  __m512i a[8], t[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm512_inserti64x4(_mm512_castsi256_si512(row(i)), row(i + 8), 1);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi16(a[i], a[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi16(a[i], a[i + 1]);
  }
  for (int h = 0; h < 8; h += 4)
    for (int i = 0; i < 2; ++i) {
      a[h + 2 * i] = _mm512_unpacklo_epi32(t[h + i], t[h + i + 2]);
      a[h + 2 * i + 1] = _mm512_unpackhi_epi32(t[h + i], t[h + i + 2]);
    }
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_epi64(a[i], a[i + 4]);
    t[2 * i + 1] = _mm512_unpackhi_epi64(a[i], a[i + 4]);
  }
  // t[j] holds column j of rows 0-7, column j + 8 of rows 0-7, column j of rows 8-15, column j + 8 of rows 8-15.
  for (int j = 0; j < 8; ++j) {
    const __m512i c = _mm512_shuffle_i64x2(t[j], t[j], _MM_SHUFFLE(3, 1, 2, 0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j * ld_dst), _mm512_castsi512_si256(c));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (j + 8) * ld_dst), _mm512_extracti64x4_epi64(c, 1));
  }
}

// dst[c * ld_dst + r] = src[r * ld_src + c] for n rows of cols (a multiple of 16) values, one column block at a
// time so that each output row receives n contiguous values.
inline void transpose_rows(const BFloat16* src, int64_t ld_src, int64_t n, int64_t cols, BFloat16* dst,
                           int64_t ld_dst) {
  const int64_t whole = n / 16 * 16;
  for (int64_t c = 0; c < cols; c += 16)
    for (int64_t r = 0; r < whole; r += 16) transpose16x16(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
  for (int64_t r = whole; r < n; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}

// One row of d values of a layer norm: y = LayerNorm(x) * w + b rounded to bfloat16, *mean and *rstd its statistics.
inline void normalize_row(const float* x, int64_t d, const float* w, const float* b, float eps, BFloat16* y,
                          float* mean, float* rstd) {
  Vec s(0.f);
  for (int64_t j = 0; j < d; j += kLanes) s += load(x + j);
  const float mu = hsum(s) / d;
  Vec ss(0.f);
  for (int64_t j = 0; j < d; j += kLanes) {
    const Vec c = load(x + j) - Vec(mu);
    ss = at::vec::fmadd(c, c, ss);
  }
  const float rs = 1.f / std::sqrt(hsum(ss) / d + eps);
  for (int64_t j = 0; j < d; j += kLanes)
    store(y + j, at::vec::fmadd((load(x + j) - Vec(mu)) * Vec(rs), load(w + j), load(b + j)));
  *mean = mu;
  *rstd = rs;
}
}  // namespace

// y = LayerNorm(x) * w + b, rounded to bfloat16; x float32 [..., D]. Returns (y, mean, rstd), the statistics
// in float32 per row for the backward pass.
std::vector<torch::Tensor> layer_norm_fwd(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                                          double eps) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  check_rows(x, torch::kFloat, d, "x");
  auto y = torch::empty(x.sizes(), x.options().dtype(torch::kBFloat16));
  auto mean = torch::empty({rows}, x.options()), rstd = torch::empty({rows}, x.options());
  const float *px = x.data_ptr<float>(), *pw = w.data_ptr<float>(), *pb = b.data_ptr<float>();
  auto* py = y.data_ptr<BFloat16>();
  float *pmean = mean.data_ptr<float>(), *prstd = rstd.data_ptr<float>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      normalize_row(px + r * d, d, pw, pb, static_cast<float>(eps), py + r * d, pmean + r, prstd + r);
  });
  return {y, mean, rstd};
}

// out = x + (y + b): the residual add after a dense layer whose matmul ran without its bias; x float32, y bfloat16.
// Given the weight and bias of the layer norm that follows (norm_w, norm_b), also that layer norm of out, as
// layer_norm_fwd returns it, from each row while it is in cache: (out, LayerNorm(out), mean, rstd).
std::vector<torch::Tensor> add_bias_residual(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& b,
                                             const c10::optional<torch::Tensor>& norm_w,
                                             const c10::optional<torch::Tensor>& norm_b, double eps) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  check_rows(x, torch::kFloat, d, "x");
  check_rows(y, torch::kBFloat16, d, "y");
  TORCH_CHECK(norm_w.has_value() == norm_b.has_value(), "the layer norm needs both its weight and its bias");
  const bool norm = norm_w.has_value();
  auto out = torch::empty_like(x);
  auto h = norm ? torch::empty(x.sizes(), x.options().dtype(torch::kBFloat16)) : torch::Tensor();
  auto mean = norm ? torch::empty({rows}, x.options()) : torch::Tensor();
  auto rstd = norm ? torch::empty({rows}, x.options()) : torch::Tensor();
  const float *px = x.data_ptr<float>(), *pb = b.data_ptr<float>();
  const BFloat16* py = y.data_ptr<BFloat16>();
  float* po = out.data_ptr<float>();
  const float *pnw = norm ? norm_w->data_ptr<float>() : nullptr, *pnb = norm ? norm_b->data_ptr<float>() : nullptr;
  BFloat16* ph = norm ? h.data_ptr<BFloat16>() : nullptr;
  float *pmean = norm ? mean.data_ptr<float>() : nullptr, *prstd = norm ? rstd.data_ptr<float>() : nullptr;
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t j = 0; j < d; j += kLanes)
        store(po + r * d + j, load(px + r * d + j) + (load(py + r * d + j) + load(pb + j)));
      if (norm) normalize_row(po + r * d, d, pnw, pnb, static_cast<float>(eps), ph + r * d, pmean + r, prstd + r);
    }
  });
  if (!norm) return {out};
  return {out, h, mean, rstd};
}

namespace {
// 2^y for y ≤ 0 (0 below -150): 2^round(y) · 2^f for f in [-1/2, 1/2], 2^f from a degree-5 polynomial (Chebyshev
// fit, relative error 1e-7) and the power of two applied by scalef; half the instructions of ATen's exp_u20.
inline Vec exp2_nonpositive(Vec y) {
  y = _mm512_max_ps(y, Vec(-150.f));
  const Vec n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), f = y - n;
  Vec p = at::vec::fmadd(f, Vec(1.34004322e-3f), Vec(9.67603710e-3f));
  p = at::vec::fmadd(f, p, Vec(5.55032721e-2f));
  p = at::vec::fmadd(f, p, Vec(2.40221074e-1f));
  p = at::vec::fmadd(f, p, Vec(6.93147207e-1f));
  p = at::vec::fmadd(f, p, Vec(1.00000008f));
  return _mm512_scalef_ps(p, n);
}
// Φ(z) and φ(z), the standard normal CDF and density: GELU(z) = z·Φ(z), GELU'(z) = Φ(z) + z·φ(z). Both come from
// one exponential: with t = |z| (capped at 6, where Φ is 1 in float32), φ = exp(-t²/2)/√(2π) and the tail
// Φ(-t) = φ(t)·R(t), R being Mills' ratio, fitted as a degree-7 polynomial in k = 1/(1 + 0.34·t) (the form of
// Abramowitz and Stegun 26.2.17, refitted by least squares reweighted towards the largest relative error: 1.3e-7 on
// [0, 6], so the tail keeps its relative accuracy far left). One exp instead of an erf and an exp for φ.
// Φ(z) = Φ(-t) for z < 0, else 1 - Φ(-t).
struct Normal {
  Vec cdf, pdf;
  explicit Normal(Vec z) {
    const Vec t = _mm512_min_ps(_mm512_abs_ps(z), Vec(6.f));
    const Vec e = exp2_nonpositive(t * (t * Vec(static_cast<float>(-0.5 * M_LOG2E))));  // exp(-t²/2)
    const Vec k = reciprocal(at::vec::fmadd(t, Vec(0.34f), Vec(1.f)));
    Vec r = at::vec::fmadd(k, Vec(4.64543380e-2f), Vec(-2.07604845e-1f));  // R(t)/√(2π) / k
    r = at::vec::fmadd(k, r, Vec(2.76629666e-1f));
    r = at::vec::fmadd(k, r, Vec(-4.23189949e-2f));
    r = at::vec::fmadd(k, r, Vec(1.62442718e-1f));
    r = at::vec::fmadd(k, r, Vec(1.28212233e-1f));
    r = at::vec::fmadd(k, r, Vec(1.36184826e-1f));
    const Vec tail = e * k * r;
    cdf = _mm512_mask_sub_ps(tail, _mm512_cmp_ps_mask(z, Vec(0.f), _CMP_GE_OQ), Vec(1.f), tail);
    pdf = e * Vec(static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2));
  }
};
}  // namespace

// GELU(h + b) with the exact (erf) GELU and its derivative GELU'(h + b), both bfloat16; h bfloat16 [..., F] from a
// matmul without bias. The backward pass needs only the derivative, and computing it here, where Φ and φ are at
// hand, costs one multiply-add, where the backward pass would have to compute both again.
std::vector<torch::Tensor> bias_gelu_fwd(const torch::Tensor& h, const torch::Tensor& b) {
  const int64_t f = h.size(-1), rows = h.numel() / f;
  check_rows(h, torch::kBFloat16, f, "h");
  auto a = torch::empty_like(h), da_dh = torch::empty_like(h);
  const BFloat16* ph = h.data_ptr<BFloat16>();
  const float* pb = b.data_ptr<float>();
  BFloat16 *pa = a.data_ptr<BFloat16>(), *pd = da_dh.data_ptr<BFloat16>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < f; j += kLanes) {
        const Vec z = load(ph + r * f + j) + load(pb + j);
        const Normal n(z);
        store(pa + r * f + j, z * n.cdf);
        store(pd + r * f + j, at::vec::fmadd(z, n.pdf, n.cdf));
      }
  });
  return {a, da_dh};
}

namespace {
// Attention with AMX: the tile unit multiplies A (16 rows x 32 bfloat16) by B (16 "pair rows", each holding 16
// columns as (b[2t][j], b[2t+1][j]) pairs) into C (16 x 16 float32) in one instruction, ~16x the work of an
// AVX-512 bf16 dot product. One (image, head) of attention at ViT sizes (N ≤ a few hundred tokens, head width 64)
// fits in L2, so each of the six matmuls of its forward and backward runs on tiles of per-thread scratch, with
// the softmax and the layout changes in between: no [B, H, N, N] tensor but the probabilities goes to memory.

// Tile registers 0-7, all 16 rows x 64 bytes (padding the operands to those sizes costs less than reconfiguring).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = 16;
  }
};

// The process may use the AMX tile state once Linux (≥ 5.16) grants it: arch_prctl(ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA). False on CPUs or kernels without AMX.
bool amx_ready() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
}
void check_amx(bool amx) {
  TORCH_CHECK(!amx || amx_ready(), "AMX asked for but unavailable (it needs Sapphire Rapids or later, Linux ≥ 5.16)");
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Asks for slice `part` of `parts` of the cache lines of [p, p + bytes) to be brought into L2. attention_fwd spreads
// the next image's qkv rows over the current image's heads: the hardware prefetcher, which follows a stream of
// reads, stops with each pause for compute, and reading an image in waited on memory (docs/performance.md).
inline void prefetch_part(const void* p, int64_t bytes, int64_t part, int64_t parts) {
  const char* c = static_cast<const char*>(p);
  const int64_t lines = (bytes + 63) / 64;
  for (int64_t l = lines * part / parts; l < lines * (part + 1) / parts; ++l) _mm_prefetch(c + l * 64, _MM_HINT_T1);
}

// Rows per block of the kernels that sum a weight gradient (WeightGradient): 128 on the AMX tiles; 256 with
// vector_block, whose float32 sums are read and written once per block. The sums are the same bits either way.
inline int64_t tile_rows(bool amx) { return amx ? 128 : 256; }
// Rows of dqkv per weight-gradient product in attention_bwd (other sizes ran alike: docs/performance.md).
constexpr int64_t kWgradRows = 128;

// c[m x n] (float32, row stride ldc) = a[m x k] (bf16, row stride lda) · b, plus c's own values where accumulate,
// with b given as pair rows (tile_pairs_of_rows / tile_pairs_of_columns, row stride ldb ≥ 2n bf16). m, n multiples
// of 16; k of 32. Each step computes a 32 x 32 block of c in four accumulator tiles from two tiles of a and two of b
// (at the last row or column of blocks, 16 wide where m or n is an odd multiple of 16: the tile ops are not asked
// for the missing half).
void tile_matmul(const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                 int64_t n, int64_t k, bool accumulate) {
  for (int64_t i = 0; i < m; i += 32) {
    const bool low = i + 16 < m;  // rows i + 16 ... i + 31 exist
    for (int64_t j = 0; j < n; j += 32) {
      const bool right = j + 16 < n;  // columns j + 16 ... j + 31 exist
      if (accumulate) {
        _tile_loadd(0, c + i * ldc + j, ldc * 4);
        if (right) _tile_loadd(1, c + i * ldc + j + 16, ldc * 4);
        if (low) _tile_loadd(2, c + (i + 16) * ldc + j, ldc * 4);
        if (low && right) _tile_loadd(3, c + (i + 16) * ldc + j + 16, ldc * 4);
      } else {
        _tile_zero(0);
        if (right) _tile_zero(1);
        if (low) _tile_zero(2);
        if (low && right) _tile_zero(3);
      }
      for (int64_t kk = 0; kk < k; kk += 32) {
        _tile_loadd(4, a + i * lda + kk, lda * 2);
        _tile_loadd(6, b + kk / 2 * ldb + 2 * j, ldb * 2);
        _tile_dpbf16ps(0, 4, 6);
        if (right) {
          _tile_loadd(7, b + kk / 2 * ldb + 2 * (j + 16), ldb * 2);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (low) {
          _tile_loadd(5, a + (i + 16) * lda + kk, lda * 2);
          _tile_dpbf16ps(2, 5, 6);
          if (right) _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, c + i * ldc + j, ldc * 4);
      if (right) _tile_stored(1, c + i * ldc + j + 16, ldc * 4);
      if (low) _tile_stored(2, c + (i + 16) * ldc + j, ldc * 4);
      if (low && right) _tile_stored(3, c + (i + 16) * ldc + j + 16, ldc * 4);
    }
  }
}

// tile_matmul without AMX: the same operands, R rows of c by C vectors of 16 columns at a time in R·C float32
// accumulators. Each step takes one bf16 pair (a[i][2t], a[i][2t + 1]) per row, broadcast, against pair row t of b
// (C vectors, held in registers across the R rows). With AVX512_BF16 (Zen 4, Cooper Lake, and the AMX CPUs) one
// vdpbf16ps does a pair's two products and adds in the order of the two FMAs of the fallback (odd element first,
// products exact in float32, so the results are bit-identical to it): twice the work per instruction, and no
// widening. 8-16 accumulators cover its latency. Without it (Skylake-X, Ice Lake), each pair is widened to float32 for
// two FMAs.
template <int R, int C>
inline void vector_block(const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb, float* c, int64_t ldc,
                         int64_t k, bool accumulate) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < C; ++v) acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + v * kLanes) : _mm512_setzero_ps();
  auto pair = [&](int r, int64_t t) {
    int32_t value;
    std::memcpy(&value, a + r * lda + 2 * t, sizeof(value));
    return _mm512_set1_epi32(value);
  };
#ifdef __AVX512BF16__
  for (int64_t t = 0; t < k / 2; ++t) {
    __m512bh bv[C];
    for (int v = 0; v < C; ++v) bv[v] = reinterpret_cast<__m512bh>(_mm512_loadu_si512(b + t * ldb + 2 * v * kLanes));
    for (int r = 0; r < R; ++r) {
      const __m512bh av = reinterpret_cast<__m512bh>(pair(r, t));
      for (int v = 0; v < C; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
#else
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xffff0000u));
  auto first = [](__m512i pairs) { return _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)); };
  auto second = [&](__m512i pairs) { return _mm512_castsi512_ps(_mm512_and_si512(pairs, high)); };
  for (int64_t t = 0; t < k / 2; ++t) {
    __m512 b0[C], b1[C];
    for (int v = 0; v < C; ++v) {
      const __m512i bv = _mm512_loadu_si512(b + t * ldb + 2 * v * kLanes);
      b0[v] = first(bv), b1[v] = second(bv);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i av = pair(r, t);
      const __m512 a0 = first(av), a1 = second(av);
      for (int v = 0; v < C; ++v) acc[r][v] = _mm512_fmadd_ps(a0, b0[v], _mm512_fmadd_ps(a1, b1[v], acc[r][v]));
    }
  }
#endif
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < C; ++v) _mm512_storeu_ps(c + r * ldc + v * kLanes, acc[r][v]);
}

// c = a · b as tile_matmul computes it (m a multiple of 8, n of 16, k of 2) from vector_block: column panels of 64 (the
// last one 16-48 wide), each panel's pair rows of b staying in L1 while the rows of a go by, 4 rows at a time (8
// in panels one or two vectors wide, to keep 8-16 accumulators busy).
void vector_matmul(const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb, float* c, int64_t ldc,
                   int64_t m, int64_t n, int64_t k, bool accumulate) {
  for (int64_t j = 0; j < n; j += 4 * kLanes) {
    const BFloat16* bj = b + 2 * j;
    auto rows = [&](auto block, int64_t step) {
      for (int64_t i = 0; i < m; i += step) block(a + i * lda, lda, bj, ldb, c + i * ldc + j, ldc, k, accumulate);
    };
    switch (std::min<int64_t>(4, (n - j) / kLanes)) {
      case 4: rows(vector_block<4, 4>, 4); break;
      case 3: rows(vector_block<4, 3>, 4); break;
      case 2: rows(vector_block<8, 2>, 8); break;
      default: rows(vector_block<8, 1>, 8); break;
    }
  }
}

// c = a · b (+ c where accumulate) on the AMX tiles (tile_matmul), or with AVX-512 vdpbf16ps or FMAs
// (vector_matmul).
void multiply(bool amx, const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb, float* c, int64_t ldc,
              int64_t m, int64_t n, int64_t k, bool accumulate) {
  (amx ? tile_matmul : vector_matmul)(a, lda, b, ldb, c, ldc, m, n, k, accumulate);
}

// B operand for a · x (x bf16 [rows][cols], rows even, cols a multiple of 32): out row t interleaves rows 2t and
// 2t + 1 of x, (x[2t][0], x[2t + 1][0], x[2t][1], ...), row stride 2 * cols.
void tile_pairs_of_rows(const BFloat16* x, int64_t rows, int64_t cols, BFloat16* out) {
  alignas(64) static const uint16_t lo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                             8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i idx_lo = _mm512_load_si512(lo), idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
  for (int64_t t = 0; t < rows / 2; ++t)
    for (int64_t c = 0; c < cols; c += 32) {
      const __m512i a = _mm512_loadu_si512(x + 2 * t * cols + c), b = _mm512_loadu_si512(x + (2 * t + 1) * cols + c);
      _mm512_storeu_si512(out + t * 2 * cols + 2 * c, _mm512_permutex2var_epi16(a, idx_lo, b));
      _mm512_storeu_si512(out + t * 2 * cols + 2 * c + 32, _mm512_permutex2var_epi16(a, idx_hi, b));
    }
}

// B operand for a · xᵀ (x bf16 [rows][cols], rows a multiple of 16, cols of 32): out row t holds the pairs
// (x[j][2t], x[j][2t + 1]) for each j, row stride 2 * rows, i.e. x transposed as a matrix of 32-bit pairs.
void tile_pairs_of_columns(const BFloat16* x, int64_t rows, int64_t cols, BFloat16* out) {
  const auto* src = reinterpret_cast<const uint32_t*>(x);
  auto* dst = reinterpret_cast<uint32_t*>(out);
  const int64_t pairs = cols / 2;
  for (int64_t j0 = 0; j0 < rows; j0 += 16)
    for (int64_t t0 = 0; t0 < pairs; t0 += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + (j0 + i) * pairs + t0);
      // 16 x 16 transpose of 32-bit values: unpacks of 32 and 64 bits, then two rounds of 128-bit lane shuffles.
      __m512i u[16];
      for (int i = 0; i < 16; i += 2) {
        u[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        u[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
      }
      for (int i = 0; i < 16; i += 4)
        for (int h = 0; h < 2; ++h) {
          r[i + h] = _mm512_unpacklo_epi64(u[i + h], u[i + h + 2]);
          r[i + h + 2] = _mm512_unpackhi_epi64(u[i + h], u[i + h + 2]);
        }
      for (int i = 0; i < 16; i += 8)
        for (int h = 0; h < 4; ++h) {
          u[i + h] = _mm512_shuffle_i32x4(r[i + h], r[i + h + 4], 0x88);
          u[i + h + 4] = _mm512_shuffle_i32x4(r[i + h], r[i + h + 4], 0xdd);
        }
      for (int h = 0; h < 8; ++h) {
        r[h] = _mm512_shuffle_i32x4(u[h], u[h + 8], 0x88);
        r[h + 8] = _mm512_shuffle_i32x4(u[h], u[h + 8], 0xdd);
      }
      // Column c of the block ended up in register kRow[c].
      static constexpr int kRow[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (t0 + i) * rows + j0, r[kRow[i]]);
    }
}

// Loads the tile configuration for the calling thread (AMX state is per thread) and releases the tiles at the end
// of the scope; does nothing where amx is false.
struct Tiles {
  const bool amx;
  explicit Tiles(bool use_amx) : amx(use_amx) {
    static const TileConfig config;
    if (amx) _tile_loadconfig(&config);
  }
  ~Tiles() {
    if (amx) _tile_release();
  }
};

// The shapes of one call: qkv [B, N, 3 * D] with D = H * Dh; per (image, head) scratch is padded to np = N and
// e = Dh rounded up to 32 (the tiles' depth, for products that sum over tokens or head columns). Products over
// token rows and columns only compute the first mp = N rounded up to 16 (a tile's height and width). Without AMX
// (vector_matmul) the products need less: their rows mr = N rounded up to 8 and their depth over tokens kt = N
// rounded up to 2, over head columns kh = Dh (65 tokens: 72 rows instead of 80, depth 66 instead of 96; the
// padding they skip is zero, so the results are the same).
struct Heads {
  int64_t batch, tokens, width, heads, dh, np, mp, e, part;  // part: q, k, v or do of all heads in scratch
  int64_t mr, kt, kh;  // the products' rows, depth over tokens and depth over head columns
  bool amx;
  Heads(const torch::Tensor& qkv, int64_t h, bool use_amx) : heads(h), amx(use_amx) {
    TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % (3 * h) == 0, "qkv: expected [B, N, 3 * heads * head width]");
    batch = qkv.size(0), tokens = qkv.size(1), width = qkv.size(2) / 3, dh = width / h;
    check_rows(qkv, torch::kBFloat16, 3 * width, "qkv");
    TORCH_CHECK(dh % kLanes == 0, "head width must be a multiple of ", kLanes, ", got ", dh);
    check_amx(amx);
    np = round_up(tokens, 32), mp = round_up(tokens, 16), e = round_up(dh, 32);
    mr = amx ? mp : round_up(tokens, 8), kt = amx ? np : round_up(tokens, 2), kh = amx ? e : dh;
    part = heads * np * e;
  }
  // c = a · b (see multiply).
  void matmul(const BFloat16* a, int64_t lda, const BFloat16* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
              int64_t n, int64_t k) const {
    multiply(amx, a, lda, b, ldb, c, ldc, m, n, k, false);
  }
  // Per worker: work() with the tiles configured (see Tiles).
  template <typename Work>
  void on_tiles(const Work& work) const {
    const Tiles tiles(amx);
    work();
  }
  // Where one part of an image goes, split into heads (see split): rows, pairs or both may be given.
  struct Part {
    BFloat16 *rows, *pairs;
  };
  // One image's N rows (x, ld values apart; plus bias where given) of parts.size() parts of D columns each (q, k, v
  // or do), each split into its heads in the layouts the products read: where rows is given, head h as [np][e] at
  // rows + h·np·e; where pairs is, as tile_pairs_of_rows's pair rows at pairs + h·np·e ([np / 2][2e], rows 2t and
  // 2t + 1 interleaved). One pass down the rows, two at a time, so the hardware prefetcher streams them, and no
  // copy or interleaving pass per head. Padding stays zero.
  void split(const BFloat16* x, int64_t ld, const float* bias, std::initializer_list<Part> parts) const {
    alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_load_si512(kInterleave);
    for (int64_t i = 0; i < tokens; i += 2) {
      const bool second = i + 1 < tokens;  // else row i + 1 is padding: zero
      int64_t c = 0;  // column in x
      for (const Part& part : parts)
        for (int64_t cp = 0; cp < width; cp += kLanes, c += kLanes) {
          Vec a = load(x + i * ld + c), b = second ? load(x + (i + 1) * ld + c) : Vec(0.f);
          if (bias != nullptr) {
            a = a + load(bias + c);
            if (second) b = b + load(bias + c);
          }
          const __m256i ra = narrow(a), rb = narrow(b);
          const int64_t head = cp / dh * np * e, col = cp % dh;
          if (part.rows != nullptr) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(part.rows + head + i * e + col), ra);
            if (second) _mm256_storeu_si256(reinterpret_cast<__m256i*>(part.rows + head + (i + 1) * e + col), rb);
          }
          if (part.pairs != nullptr) {  // pair row i / 2, 2·e values from head + i·e
            const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(ra), rb, 1);
            _mm512_storeu_si512(part.pairs + head + i * e + 2 * col, _mm512_permutexvar_epi16(interleave, both));
          }
        }
    }
  }
  // A float32 result's N rows and Dh columns (in, [np][e]) rounded to bfloat16 into columns [col, col + Dh) of x.
  void put_head(const float* in, BFloat16* x, int64_t ld, int64_t col) const {
    for (int64_t i = 0; i < tokens; ++i)
      for (int64_t d = 0; d < dh; d += kLanes) store(x + i * ld + col + d, load(in + i * e + d));
  }
};

// Per-thread scratch: zero-initialised (unless zeroed is false), and the kernels write only the valid rows and
// columns of the padded buffers, so the padding stays zero and adds nothing to the matmuls. torch's CPU allocator
// starts tensors on 64-byte boundaries and every buffer cut from these is a whole number of 64-byte lines, so each
// tile row starts a cache line: a tile load whose rows straddle two lines takes ~6x as long, which doubled the time
// per product.
struct Scratch {
  torch::Tensor bf16, f32;
  Scratch(int64_t bf16_values, int64_t f32_values, bool zeroed = true)
      : bf16(zeroed ? torch::zeros({bf16_values}, torch::kBFloat16) : torch::empty({bf16_values}, torch::kBFloat16)),
        f32(zeroed ? torch::zeros({f32_values}, torch::kFloat) : torch::empty({f32_values}, torch::kFloat)) {}
  BFloat16* values() { return bf16.data_ptr<BFloat16>(); }
  float* floats() { return f32.data_ptr<float>(); }
};

// The weight gradient gᵀ·x [out, in] (float32) of a dense layer, summed by the kernel that computes its output
// gradient g ([rows, out] bfloat16) while each block of g's rows is in cache: gᵀ never goes to memory and no
// matmul reads g back. Each worker adds its blocks into its own float32 sum on the tiles (AMX, else vector_matmul);
// total() adds those in a fixed order. x [rows, in] bfloat16 is the layer's input; out and in multiples of 16.
// A worker's first block writes its sum instead of adding to it, so the sums need no zeroing, and total() adds
// only the sums of the workers that had rows.
struct WeightGradient {
  const int64_t out, in, wp, ldk;  // wp: x's rows padded to the tiles' 32 columns; ldk: the most rows per block
  const bool amx;
  torch::Tensor sums;
  mutable std::vector<char> used;  // per worker: whether its sum holds anything
  WeightGradient(int64_t out_features, int64_t in_features, int64_t max_rows, bool use_amx)
      : out(out_features), in(in_features), wp(round_up(in, 32)), ldk(round_up(max_rows, 32)), amx(use_amx),
        sums(torch::empty({at::get_num_threads(), out, in}, torch::kFloat)), used(sums.size(0), 0) {
    TORCH_CHECK(out % 16 == 0 && in % 16 == 0, "weight gradient: widths must be multiples of 16, got ", out, " and ",
                in);
  }
  torch::Tensor total() const {
    std::vector<int64_t> workers;
    for (int64_t i = 0; i < sums.size(0); ++i)
      if (used[i]) workers.push_back(i);
    if (workers.empty()) return torch::zeros({out, in}, torch::kFloat);
    if (workers.size() == 1) return sums[workers[0]];
    auto t = sums[workers[0]] + sums[workers[1]];
    for (size_t i = 2; i < workers.size(); ++i) t.add_(sums[workers[i]]);
    return t;
  }

  // One worker's share (in the worker's thread, tiles loaded): add(g, x, count) adds g[0, count)ᵀ · x[0, count).
  class Worker {
   public:
    // The scratch is not zeroed: each block writes the rows it reads (its padding rows are zeroed per block) and
    // the product reads no column of x's pairs past in.
    explicit Worker(const WeightGradient& w)
        : w_(w), scratch_(w.out * w.ldk + 2 * w.ldk * w.wp, 0, false), id_(at::get_thread_num()),
          sum_(w.sums.data_ptr<float>() + id_ * w.out * w.in) {}
    // g's rows transposed (from cache) and x's rows in pairs, both zero-padded to 32 rows, then one product.
    void add(const BFloat16* g, const BFloat16* x, int64_t count) {
      TORCH_CHECK(count <= w_.ldk, "weight gradient: more rows than the block holds");
      const int64_t depth = round_up(count, 32);
      BFloat16 *g_t = scratch_.values(), *xs = g_t + w_.out * w_.ldk, *x_pairs = xs + w_.ldk * w_.wp;
      transpose_rows(g, w_.out, count, w_.out, g_t, w_.ldk);
      for (int64_t c = 0; c < w_.out && count < depth; ++c)
        std::memset(g_t + c * w_.ldk + count, 0, (depth - count) * sizeof(BFloat16));
      // x's rows are interleaved straight from x where no column padding is needed; the rest (an odd last row, or
      // all rows where in is not a multiple of 32, and the zero rows up to depth) goes through xs
      const int64_t direct = w_.wp == w_.in ? count / 2 * 2 : 0;
      tile_pairs_of_rows(x, direct, w_.in, x_pairs);
      for (int64_t r = direct; r < depth; ++r) {
        if (r < count)
          std::memcpy(xs + (r - direct) * w_.wp, x + r * w_.in, w_.in * sizeof(BFloat16));
        else
          std::memset(xs + (r - direct) * w_.wp, 0, w_.in * sizeof(BFloat16));
      }
      tile_pairs_of_rows(xs, depth - direct, w_.wp, x_pairs + direct * w_.wp);
      multiply(w_.amx, g_t, w_.ldk, x_pairs, 2 * w_.wp, sum_, w_.in, w_.out, w_.in, depth, w_.used[id_]);
      w_.used[id_] = 1;
    }

   private:
    const WeightGradient& w_;
    Scratch scratch_;
    int64_t id_;
    float* sum_;
  };
};

// The weight gradient of a dense layer with input x ([rows, in] bfloat16) and output gradient [rows, out], summed
// in blocks of at most max_rows rows (0: tile_rows).
WeightGradient weight_gradient(const torch::Tensor& x, int64_t rows, int64_t out, bool amx,
                               int64_t max_rows = 0) {
  check_rows(x, torch::kBFloat16, x.size(-1), "x");
  TORCH_CHECK(x.numel() / x.size(-1) == rows, "x: expected ", rows, " rows, got ", x.numel() / x.size(-1));
  check_amx(amx);
  return WeightGradient(out, x.size(-1), max_rows > 0 ? max_rows : tile_rows(amx), amx);
}

// Calls rows(std::integral_constant<int, R>(), i) for row groups [i, i + R) covering [0, n), R = 4 but at the end:
// a row's reductions (max, sum) are chains of dependent instructions, and R rows side by side keep the vector units
// busy while each chain waits.
template <typename Rows>
inline void in_row_groups(int64_t n, const Rows& rows) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) rows(std::integral_constant<int, 4>(), i);
  for (; i < n; ++i) rows(std::integral_constant<int, 1>(), i);
}

// Rows i < n of p = softmax(scale · score) (score float32 [n][ld], overwritten with the exponentials; p bfloat16
// [n][ld] and, rows n apart, p_out). In base 2: exp(x - max) = 2^((x - max)·log2(e)), log2(e) folded into scale.
void softmax_rows(float* score, int64_t n, int64_t ld, float scale, BFloat16* p, BFloat16* p_out) {
  const Vec vscale(scale * static_cast<float>(M_LOG2E));
  const int64_t vecs = (n + kLanes - 1) / kLanes, tail = n - (vecs - 1) * kLanes;  // values in the last vector
  auto count = [&](int64_t t) { return t + 1 < vecs ? kLanes : tail; };
  auto scaled = [&](const float* sr, int64_t t) {  // -inf past the row's end
    return Vec(_mm512_mask_mov_ps(Vec(-INFINITY), tail_mask(count(t)), load(sr + t * kLanes) * vscale));
  };
  auto put = [&](int64_t i, int64_t t, Vec prob) {
    store(p + i * ld + t * kLanes, prob, count(t));
    store(p_out + i * n + t * kLanes, prob, count(t));
  };
  in_row_groups(n, [&](auto group, int64_t i0) {
    constexpr int R = decltype(group)::value;
    Vec vmax[R], sum[R];
    for (int r = 0; r < R; ++r) vmax[r] = Vec(-INFINITY), sum[r] = Vec(0.f);
    for (int64_t t = 0; t < vecs; ++t)
      for (int r = 0; r < R; ++r) vmax[r] = at::vec::maximum(vmax[r], scaled(score + (i0 + r) * ld, t));
    for (int r = 0; r < R; ++r) vmax[r] = Vec(hmax(vmax[r]));
    for (int64_t t = 0; t < vecs; ++t)
      for (int r = 0; r < R; ++r) {
        float* sr = score + (i0 + r) * ld;
        const Vec x = _mm512_maskz_mov_ps(tail_mask(count(t)), exp2_nonpositive(scaled(sr, t) - vmax[r]));
        store(sr + t * kLanes, x);
        sum[r] += x;
      }
    for (int r = 0; r < R; ++r) sum[r] = Vec(1.f / hsum(sum[r]));
    for (int64_t t = 0; t < vecs; ++t)
      for (int r = 0; r < R; ++r) put(i0 + r, t, load(score + (i0 + r) * ld + t * kLanes) * sum[r]);
  });
}

// Rows i < n of ds = scale · p ⊙ (dp − Σ_j p ⊙ dp) (p, ds bfloat16 and dp float32, all [n][ld]; p's padding is 0).
void softmax_grad_rows(const BFloat16* p, const float* dp, int64_t n, int64_t ld, float scale, BFloat16* ds) {
  const Vec vscale(scale);
  in_row_groups(n, [&](auto group, int64_t i0) {
    constexpr int R = decltype(group)::value;
    Vec dot[R];
    for (int r = 0; r < R; ++r) dot[r] = Vec(0.f);
    for (int64_t j = 0; j < n; j += kLanes)
      for (int r = 0; r < R; ++r)
        dot[r] = at::vec::fmadd(load(p + (i0 + r) * ld + j), load(dp + (i0 + r) * ld + j), dot[r]);
    for (int r = 0; r < R; ++r) dot[r] = Vec(hsum(dot[r]));
    for (int64_t j = 0; j < n; j += kLanes)
      for (int r = 0; r < R; ++r) {
        const int64_t ij = (i0 + r) * ld + j;
        store(ds + ij, vscale * load(p + ij) * (load(dp + ij) - dot[r]), std::min(kLanes, n - j));
      }
  });
}
}  // namespace

// Multi-head attention forward from the qkv matmul's output (without its bias b): per image and head,
// p = softmax(scale · q·kᵀ) and o = p·v. Returns o [B, N, D] (heads side by side, the proj layer's input) and p
// [B, H, N, N], both bfloat16; scores and their softmax in float32. amx: tiles, else vector_matmul.
std::vector<torch::Tensor> attention_fwd(const torch::Tensor& qkv, const torch::Tensor& b, int64_t heads,
                                         double scale, bool amx) {
  const Heads s(qkv, heads, amx);
  const int64_t n = s.tokens, np = s.np, mp = s.mp, e = s.e, d3 = 3 * s.width;
  auto o = torch::empty({s.batch, n, s.width}, qkv.options());
  auto p = torch::empty({s.batch, heads, n, n}, qkv.options());
  const BFloat16* pqkv = qkv.data_ptr<BFloat16>();
  const float* pb = b.data_ptr<float>();
  BFloat16 *po = o.data_ptr<BFloat16>(), *pp = p.data_ptr<BFloat16>();
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    s.on_tiles([&] {
      // q and k as rows, v as pair rows, all heads; per head, k's pairs of columns, the scores and p
      Scratch w(3 * s.part + np * e + np * np, np * np + np * e);
      BFloat16 *q = w.values(), *k = q + s.part, *v = k + s.part, *kc = v + s.part, *prob = kc + np * e;
      float *score = w.floats(), *out = score + np * np;
      for (int64_t bi = first; bi < last; ++bi) {
        const BFloat16* img = pqkv + bi * n * d3;
        s.split(img, d3, pb, {{q, nullptr}, {k, nullptr}, {nullptr, v}});
        for (int64_t h = 0; h < heads; ++h) {
          if (bi + 1 < last) prefetch_part(img + n * d3, n * d3 * 2, h, heads);
          const int64_t hs = h * np * e;  // head h in q, k and v
          tile_pairs_of_columns(k + hs, mp, e, kc);
          s.matmul(q + hs, e, kc, 2 * mp, score, np, s.mr, mp, s.kh);
          softmax_rows(score, n, np, static_cast<float>(scale), prob, pp + (bi * heads + h) * n * n);
          s.matmul(prob, np, v + hs, 2 * e, out, e, s.mr, e, s.kt);
          s.put_head(out, po + bi * n * s.width, s.width, h * s.dh);
        }
      }
    });
  });
  return {o, p};
}

// Backward of attention_fwd for the output gradient do [B, N, D] (bfloat16), given x [B, N, D] (bfloat16), the input
// of the qkv layer: dqkv [B, N, 3 * D] bfloat16, the qkv weight gradient dqkvᵀ·x [3 * D, D] float32 and the bias
// gradient, dqkv's column sums. dv = pᵀ·do, dp = do·vᵀ, ds = scale · p ⊙ (dp − rowsum(p ⊙ dp)), dq = ds·k,
// dk = dsᵀ·q. The weight gradient is summed as WeightGradient does, kWgradRows or more rows of dqkv at a time
// (whole images; a multiple of 32 rows but at the end of a worker's images, the rest carried to the next block).
std::vector<torch::Tensor> attention_bwd(const torch::Tensor& dout, const torch::Tensor& qkv, const torch::Tensor& b,
                                         const torch::Tensor& p, const torch::Tensor& x, int64_t heads, double scale,
                                         bool amx) {
  const Heads s(qkv, heads, amx);
  const int64_t n = s.tokens, np = s.np, mp = s.mp, e = s.e, width = s.width, d3 = 3 * width;
  check_rows(dout, torch::kBFloat16, width, "do");
  check_rows(x, torch::kBFloat16, width, "x");
  TORCH_CHECK(p.scalar_type() == torch::kBFloat16 && p.is_contiguous() && p.numel() == s.batch * heads * n * n,
              "p: expected contiguous bfloat16 [B, H, N, N]");
  TORCH_CHECK(dout.numel() == s.batch * n * width, "do: expected ", s.batch * n, " rows, got ", dout.numel() / width);
  auto dqkv = torch::empty_like(qkv);
  const WeightGradient dw = weight_gradient(x, s.batch * n, d3, amx, kWgradRows + n);
  ColumnSums sums(d3);
  const BFloat16 *pqkv = qkv.data_ptr<BFloat16>(), *pdo = dout.data_ptr<BFloat16>(), *pp = p.data_ptr<BFloat16>();
  const BFloat16* px = x.data_ptr<BFloat16>();
  const float* pb = b.data_ptr<float>();
  BFloat16* pd = dqkv.data_ptr<BFloat16>();
  at::parallel_for(0, s.batch, 1, [&](int64_t first, int64_t last) {
    s.on_tiles([&] {
      // all heads: q, k and do as pair rows, v and do as rows; per head: v's pairs of columns, p, pᵀ, ds, dsᵀ
      Scratch w(5 * s.part + np * e + 4 * np * np, np * np + np * e);
      BFloat16 *q = w.values(), *k = q + s.part, *v = k + s.part, *dov = v + s.part, *do_pairs = dov + s.part;
      BFloat16 *vc = do_pairs + s.part, *prob = vc + np * e, *prob_t = prob + np * np, *ds = prob_t + np * np;
      BFloat16* ds_t = ds + np * np;
      float *dp = w.floats(), *out = dp + np * np, *colsum = sums.row(at::get_thread_num());
      WeightGradient::Worker weights(dw);
      int64_t done = first * n;  // rows of dqkv in the weight gradient so far
      for (int64_t bi = first; bi < last; ++bi) {
        BFloat16* grad = pd + bi * n * d3;  // this image's rows of dqkv
        const BFloat16* img = pqkv + bi * n * d3;
        s.split(img, d3, pb, {{nullptr, q}, {nullptr, k}, {v, nullptr}});
        s.split(pdo + bi * n * width, width, nullptr, {{dov, do_pairs}});
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t hs = h * np * e;  // head h in q, k, v, do
          const BFloat16* p_in = pp + (bi * heads + h) * n * n;
          for (int64_t i = 0; i < n; ++i) std::memcpy(prob + i * np, p_in + i * n, n * sizeof(BFloat16));
          tile_pairs_of_columns(v + hs, mp, e, vc);
          s.matmul(dov + hs, e, vc, 2 * mp, dp, np, s.mr, mp, s.kh);
          softmax_grad_rows(prob, dp, n, np, static_cast<float>(scale), ds);
          s.matmul(ds, np, k + hs, 2 * e, out, e, s.mr, e, s.kt);
          s.put_head(out, grad, d3, h * s.dh);  // dq
          transpose_rows(ds, np, mp, mp, ds_t, np);
          s.matmul(ds_t, np, q + hs, 2 * e, out, e, s.mr, e, s.kt);
          s.put_head(out, grad, d3, width + h * s.dh);  // dk
          transpose_rows(prob, np, mp, mp, prob_t, np);
          s.matmul(prob_t, np, do_pairs + hs, 2 * e, out, e, s.mr, e, s.kt);
          s.put_head(out, grad, d3, 2 * width + h * s.dh);  // dv
        }
        for (int64_t i = 0; i < n; ++i)  // bias gradient: the rounded values
          for (int64_t c = 0; c < d3; c += kLanes) store(colsum + c, load(colsum + c) + load(grad + i * d3 + c));
        const int64_t upto = (bi + 1) * n;
        if (bi + 1 == last || upto - done >= kWgradRows) {
          const int64_t count = bi + 1 == last ? upto - done : (upto - done) / 32 * 32;
          weights.add(pd + done * d3, px + done * width, count);
          done += count;
        }
      }
    });
  });
  return {dqkv, dw.total(), sums.total()};
}

// The kernels that compute a dense layer's output gradient g and sum its weight gradient (WeightGradient) as they go.
namespace {
// Runs body(r0, r1, tid) over blocks of up to tile_rows rows in parallel (each worker's blocks contiguous), then, where
// dw is given, adds the block's rows of g ([rows, dw->out] bfloat16, just written by body) and x to dw.
template <typename Body>
void for_row_blocks(int64_t rows, const WeightGradient* dw, const BFloat16* g, const BFloat16* x, const Body& body) {
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    const Tiles tiles(dw != nullptr && dw->amx);
    std::optional<WeightGradient::Worker> weights;
    if (dw != nullptr) weights.emplace(*dw);
    const int64_t tile = tile_rows(dw != nullptr && dw->amx);
    for (int64_t r0 = begin; r0 < end; r0 += tile) {
      const int64_t r1 = std::min(end, r0 + tile);
      body(r0, r1, at::get_thread_num());
      if (dw != nullptr) weights->add(g + r0 * dw->out, x + r0 * dw->in, r1 - r0);
    }
  });
}

// out[r][j] = value(r * cols + j) (16 float32 values from a flat index) rounded to bfloat16, over rows in parallel;
// returns out, the column sums of the float32 values and outᵀ·x: a dense layer's output gradient with its bias and
// weight gradients, x being the layer's input.
template <typename Value>
std::vector<torch::Tensor> round_with_sums(torch::Tensor out, const Value& value, const torch::Tensor& x, bool amx) {
  const int64_t cols = out.size(-1), rows = out.numel() / cols;
  auto* po = out.data_ptr<BFloat16>();
  ColumnSums sums(cols);
  const WeightGradient dw = weight_gradient(x, rows, cols, amx);
  for_row_blocks(rows, &dw, po, x.data_ptr<BFloat16>(), [&](int64_t r0, int64_t r1, int64_t tid) {
    float* s = sums.row(tid);
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t j = 0; j < cols; j += kLanes) {
        const Vec v = value(r * cols + j);
        store(po + r * cols + j, v);
        store(s + j, load(s + j) + v);
      }
  });
  return {out, sums.total(), dw.total()};
}
}  // namespace

// g in bfloat16, its column sums and gᵀ·x (x bfloat16 [rows, in]): the output, bias and weight gradients of a
// dense layer with input x from a float32 gradient.
std::vector<torch::Tensor> cast_colsum(const torch::Tensor& g, const torch::Tensor& x, bool amx) {
  check_rows(g, torch::kFloat, g.size(-1), "g");
  const float* pg = g.data_ptr<float>();
  return round_with_sums(torch::empty(g.sizes(), g.options().dtype(torch::kBFloat16)),
                         [&](int64_t i) { return load(pg + i); }, x, amx);
}

// dh = da * d (both bfloat16, e.g. a gradient and the derivative bias_gelu_fwd saved) rounded to bfloat16, the
// column sums of the float32 products and dhᵀ·x (x bfloat16 [rows, in]): the output, bias and weight gradients of
// the dense layer with input x.
std::vector<torch::Tensor> mul_colsum(const torch::Tensor& da, const torch::Tensor& d, const torch::Tensor& x,
                                      bool amx) {
  check_rows(d, torch::kBFloat16, d.size(-1), "d");
  check_rows(da, torch::kBFloat16, d.size(-1), "da");
  TORCH_CHECK(da.numel() == d.numel(), "da and d must have the same shape, got ", da.sizes(), " and ", d.sizes());
  const BFloat16 *pd = d.data_ptr<BFloat16>(), *pda = da.data_ptr<BFloat16>();
  return round_with_sums(torch::empty_like(d), [&](int64_t i) { return load(pda + i) * load(pd + i); }, x, amx);
}

// Backward of layer_norm_fwd plus the residual branch it sits on: g_out = g + dx (float32), where dx is the
// layer norm's input gradient for the output gradient dy (bfloat16). Returns (g_out, dw, db) and, given the input
// of the dense layer feeding x (bfloat16 [rows, in]), g_out in bfloat16 with its column sums and g_outᵀ·input: that
// layer's output, bias and weight gradients.
std::vector<torch::Tensor> layer_norm_bwd(const torch::Tensor& dy, const torch::Tensor& x,
                                          const torch::Tensor& mean, const torch::Tensor& rstd,
                                          const torch::Tensor& w, const torch::Tensor& g,
                                          const c10::optional<torch::Tensor>& dense_input, bool amx) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  check_rows(dy, torch::kBFloat16, d, "dy");
  check_rows(x, torch::kFloat, d, "x");
  check_rows(g, torch::kFloat, d, "g");
  const bool dense = dense_input.has_value();
  auto g_out = torch::empty_like(g);
  auto g_bf16 = dense ? torch::empty(g.sizes(), g.options().dtype(torch::kBFloat16)) : torch::Tensor();
  std::optional<WeightGradient> dense_dw;
  if (dense) dense_dw.emplace(weight_gradient(*dense_input, rows, d, amx));
  ColumnSums dw_sums(d), db_sums(d), g_sums(d);
  const auto *pdy = dy.data_ptr<BFloat16>();
  const float *px = x.data_ptr<float>(), *pg = g.data_ptr<float>(), *pw = w.data_ptr<float>();
  const float *pmean = mean.data_ptr<float>(), *prstd = rstd.data_ptr<float>();
  float* pout = g_out.data_ptr<float>();
  BFloat16* pbf = dense ? g_bf16.data_ptr<BFloat16>() : nullptr;
  const BFloat16* pin = dense ? dense_input->data_ptr<BFloat16>() : nullptr;
  for_row_blocks(rows, dense ? &*dense_dw : nullptr, pbf, pin, [&](int64_t begin, int64_t end, int64_t tid) {
    float *dw = dw_sums.row(tid), *db = db_sums.row(tid), *gs = g_sums.row(tid);
    for (int64_t r = begin; r < end; ++r) {
      const float mu = pmean[r], rs = prstd[r];
      const float* xr = px + r * d;
      const BFloat16* dyr = pdy + r * d;
      Vec s1(0.f), s2(0.f);  // sums of dy*w and dy*w*xhat over the row
      for (int64_t j = 0; j < d; j += kLanes) {
        const Vec dyv = load(dyr + j), xhat = (load(xr + j) - Vec(mu)) * Vec(rs);
        const Vec dyw = dyv * load(pw + j);
        s1 += dyw;
        s2 = at::vec::fmadd(dyw, xhat, s2);
        store(dw + j, at::vec::fmadd(dyv, xhat, load(dw + j)));
        store(db + j, load(db + j) + dyv);
      }
      const float m1 = hsum(s1) / d, m2 = hsum(s2) / d;
      for (int64_t j = 0; j < d; j += kLanes) {
        const Vec xhat = (load(xr + j) - Vec(mu)) * Vec(rs);
        const Vec dx = Vec(rs) * (load(dyr + j) * load(pw + j) - Vec(m1) - xhat * Vec(m2));
        const Vec out = load(pg + r * d + j) + dx;
        store(pout + r * d + j, out);
        if (dense) {
          store(pbf + r * d + j, out);
          store(gs + j, load(gs + j) + out);
        }
      }
    }
  });
  if (!dense) return {g_out, dw_sums.total(), db_sums.total()};
  return {g_out, dw_sums.total(), db_sums.total(), g_bf16, g_sums.total(), dense_dw->total()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_norm_fwd", &layer_norm_fwd);
  m.def("layer_norm_bwd", &layer_norm_bwd);
  m.def("add_bias_residual", &add_bias_residual);
  m.def("cast_colsum", &cast_colsum);
  m.def("bias_gelu_fwd", &bias_gelu_fwd);
  m.def("mul_colsum", &mul_colsum);
  m.def("attention_fwd", &attention_fwd);
  m.def("attention_bwd", &attention_bwd);
  m.def("amx_ready", &amx_ready);
}
