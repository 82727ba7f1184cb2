// Element-wise kernels of the ViT encoder block in bfloat16 on AVX-512 CPUs, fused around its matmuls.
//
// Under bf16 autocast, eager PyTorch spends ~40% of a small ViT's training step between the matmuls: layer norms
// in float32 followed by casts, bias broadcasts before every addmm, a scaled float32 softmax and its casts,
// head (un)folding copies, GELU, and bias-gradient column sums. Each kernel here does one of those groups in a
// single pass over rows (parallel over rows, float32 arithmetic, bfloat16 rounding once at the output).
// Python side, and the maths each kernel implements: vit_pipelines/models/fused_cpu.py.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <cmath>
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
  torch::Tensor total() const { return partial.sum(0); }
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

// dst[c * ld_dst + r] = src[r * cols + c] for n rows of cols (a multiple of 16) values, one column block at a time
// so that each output row receives n contiguous values.
inline void transpose_rows(const BFloat16* src, int64_t n, int64_t cols, BFloat16* dst, int64_t ld_dst) {
  const int64_t whole = n / 16 * 16;
  for (int64_t c = 0; c < cols; c += 16)
    for (int64_t r = 0; r < whole; r += 16) transpose16x16(src + r * cols + c, cols, dst + c * ld_dst + r, ld_dst);
  for (int64_t r = whole; r < n; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * cols + c];
}

// Runs body(r0, r1, tid) over tiles of kTile rows in parallel; where dst_t is given, then copies the tile's rows of
// src ([rows, cols] bfloat16, just written by body and still in L2) transposed into dst_t ([cols, rows]). The
// weight gradient gᵀ·x of a dense layer runs up to twice as fast with gᵀ stored than with g's transposed view.
constexpr int64_t kTile = 128;
template <typename Body>
void for_row_tiles(int64_t rows, int64_t cols, const BFloat16* src, BFloat16* dst_t, const Body& body) {
  at::parallel_for(0, (rows + kTile - 1) / kTile, 1, [&](int64_t first, int64_t last) {
    const int64_t tid = at::get_thread_num();
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t r0 = tile * kTile, r1 = std::min(rows, r0 + kTile);
      body(r0, r1, tid);
      if (dst_t != nullptr) transpose_rows(src + r0 * cols, r1 - r0, cols, dst_t + r0, rows);
    }
  });
}

torch::Tensor empty_transposed(const torch::Tensor& t) {
  return torch::empty({t.size(-1), t.numel() / t.size(-1)}, t.options());
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
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = px + r * d;
      Vec s(0.f);
      for (int64_t j = 0; j < d; j += kLanes) s += load(xr + j);
      const float mu = hsum(s) / d;
      Vec ss(0.f);
      for (int64_t j = 0; j < d; j += kLanes) {
        const Vec c = load(xr + j) - Vec(mu);
        ss = at::vec::fmadd(c, c, ss);
      }
      const float rs = 1.f / std::sqrt(hsum(ss) / d + static_cast<float>(eps));
      for (int64_t j = 0; j < d; j += kLanes)
        store(py + r * d + j, at::vec::fmadd((load(xr + j) - Vec(mu)) * Vec(rs), load(pw + j), load(pb + j)));
      pmean[r] = mu;
      prstd[r] = rs;
    }
  });
  return {y, mean, rstd};
}

// Backward of layer_norm_fwd plus the residual branch it sits on: g_out = g + dx (float32), where dx is the
// layer norm's input gradient for the output gradient dy (bfloat16). Returns (g_out, dw, db) and, when asked,
// g_out in bfloat16, also transposed ([D, rows]), and its column sums (the gradient and bias gradient of the
// dense layer feeding x).
std::vector<torch::Tensor> layer_norm_bwd(const torch::Tensor& dy, const torch::Tensor& x,
                                          const torch::Tensor& mean, const torch::Tensor& rstd,
                                          const torch::Tensor& w, const torch::Tensor& g, bool want_bf16) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  check_rows(dy, torch::kBFloat16, d, "dy");
  check_rows(x, torch::kFloat, d, "x");
  check_rows(g, torch::kFloat, d, "g");
  auto g_out = torch::empty_like(g);
  auto g_bf16 = want_bf16 ? torch::empty(g.sizes(), g.options().dtype(torch::kBFloat16)) : torch::Tensor();
  auto g_bf16_t = want_bf16 ? empty_transposed(g_bf16) : torch::Tensor();
  ColumnSums dw_sums(d), db_sums(d), g_sums(d);
  const auto *pdy = dy.data_ptr<BFloat16>();
  const float *px = x.data_ptr<float>(), *pg = g.data_ptr<float>(), *pw = w.data_ptr<float>();
  const float *pmean = mean.data_ptr<float>(), *prstd = rstd.data_ptr<float>();
  float* pout = g_out.data_ptr<float>();
  BFloat16* pbf = want_bf16 ? g_bf16.data_ptr<BFloat16>() : nullptr;
  for_row_tiles(rows, d, pbf, want_bf16 ? g_bf16_t.data_ptr<BFloat16>() : nullptr, [&](int64_t begin, int64_t end,
                                                                                   int64_t tid) {
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
        if (pbf != nullptr) {
          store(pbf + r * d + j, out);
          store(gs + j, load(gs + j) + out);
        }
      }
    }
  });
  std::vector<torch::Tensor> result{g_out, dw_sums.total(), db_sums.total()};
  if (want_bf16) {
    result.push_back(g_bf16);
    result.push_back(g_bf16_t);
    result.push_back(g_sums.total());
  }
  return result;
}

// x + (y + b): the residual add after a dense layer whose matmul ran without its bias; x float32, y bfloat16.
torch::Tensor add_bias_residual(const torch::Tensor& x, const torch::Tensor& y, const torch::Tensor& b) {
  const int64_t d = x.size(-1), rows = x.numel() / d;
  check_rows(x, torch::kFloat, d, "x");
  check_rows(y, torch::kBFloat16, d, "y");
  auto out = torch::empty_like(x);
  const float *px = x.data_ptr<float>(), *pb = b.data_ptr<float>();
  const BFloat16* py = y.data_ptr<BFloat16>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < d; j += kLanes)
        store(po + r * d + j, load(px + r * d + j) + (load(py + r * d + j) + load(pb + j)));
  });
  return out;
}

// g in bfloat16 and its column sums: the output and bias gradient of a dense layer from a float32 gradient.
std::vector<torch::Tensor> cast_colsum(const torch::Tensor& g) {
  const int64_t d = g.size(-1), rows = g.numel() / d;
  check_rows(g, torch::kFloat, d, "g");
  auto out = torch::empty(g.sizes(), g.options().dtype(torch::kBFloat16));
  ColumnSums sums(d);
  const float* pg = g.data_ptr<float>();
  BFloat16* po = out.data_ptr<BFloat16>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    float* s = sums.row(at::get_thread_num());
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < d; j += kLanes) {
        const Vec v = load(pg + r * d + j);
        store(po + r * d + j, v);
        store(s + j, load(s + j) + v);
      }
  });
  return {out, sums.total()};
}

namespace {
// erf(u) for float32 as a rational function u·P(u²)/Q(u²) on u clamped to [-4, 4] (beyond, erf is ±1 in float32):
// the minimax approximation of Eigen's and XLA's float erf, accurate to a few float32 ulps without an exp.
inline Vec erf_rational(Vec u) {
  const Vec x = at::vec::clamp(u, Vec(-4.f), Vec(4.f)), x2 = x * x;
  Vec p = at::vec::fmadd(x2, Vec(-2.72614225801306e-10f), Vec(2.77068142495902e-08f));
  p = at::vec::fmadd(x2, p, Vec(-2.10102402082508e-06f));
  p = at::vec::fmadd(x2, p, Vec(-5.69250639462346e-05f));
  p = at::vec::fmadd(x2, p, Vec(-7.34990630326855e-04f));
  p = at::vec::fmadd(x2, p, Vec(-2.95459980854025e-03f));
  p = at::vec::fmadd(x2, p, Vec(-1.60960333262415e-02f));
  Vec q = at::vec::fmadd(x2, Vec(-1.45660718464996e-05f), Vec(-2.13374055278905e-04f));
  q = at::vec::fmadd(x2, q, Vec(-1.68282697438203e-03f));
  q = at::vec::fmadd(x2, q, Vec(-7.37332916720468e-03f));
  q = at::vec::fmadd(x2, q, Vec(-1.42647390514189e-02f));
  return x * p * reciprocal(q);
}
// Φ(z), the standard normal CDF: GELU(z) = z·Φ(z). Its density φ(z) = exp(-z²/2)/√(2π) gives GELU'(z) = Φ + z·φ.
inline Vec normal_cdf(Vec z) { return Vec(0.5f) + Vec(0.5f) * erf_rational(z * Vec(static_cast<float>(M_SQRT1_2))); }
inline Vec normal_pdf(Vec z) {
  return (Vec(-0.5f) * z * z).exp_u20() * Vec(static_cast<float>(0.5 * M_2_SQRTPI * M_SQRT1_2));
}
inline Vec gelu(Vec z) { return z * normal_cdf(z); }
}  // namespace

// GELU(h + b) with the exact (erf) GELU; h bfloat16 [..., F] from a matmul without bias.
torch::Tensor bias_gelu_fwd(const torch::Tensor& h, const torch::Tensor& b) {
  const int64_t f = h.size(-1), rows = h.numel() / f;
  check_rows(h, torch::kBFloat16, f, "h");
  auto a = torch::empty_like(h);
  const BFloat16* ph = h.data_ptr<BFloat16>();
  const float* pb = b.data_ptr<float>();
  BFloat16* pa = a.data_ptr<BFloat16>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < f; j += kLanes) {
        const Vec z = load(ph + r * f + j) + load(pb + j);
        store(pa + r * f + j, gelu(z));
      }
  });
  return a;
}

// dh = da * GELU'(h + b) in bfloat16, also transposed ([F, rows]), and the column sums of dh (the bias gradient);
// and GELU(h + b) again, transposed (a_t, [F, rows]), bit-identical to bias_gelu_fwd's output: the weight gradient
// of the layer it feeds runs faster as a_t·g than as gᵀ·a, and recomputing it costs one multiply, so the forward
// pass need not keep it.
std::vector<torch::Tensor> bias_gelu_bwd(const torch::Tensor& da, const torch::Tensor& h, const torch::Tensor& b) {
  const int64_t f = h.size(-1), rows = h.numel() / f;
  check_rows(h, torch::kBFloat16, f, "h");
  check_rows(da, torch::kBFloat16, f, "da");
  auto dh = torch::empty_like(h), dh_t = empty_transposed(h), a_t = empty_transposed(h);
  ColumnSums sums(f);
  const BFloat16 *ph = h.data_ptr<BFloat16>(), *pda = da.data_ptr<BFloat16>();
  const float* pb = b.data_ptr<float>();
  BFloat16 *pdh = dh.data_ptr<BFloat16>(), *pa_t = a_t.data_ptr<BFloat16>();
  std::vector<BFloat16> scratch(at::get_num_threads() * kTile * f);  // a, row-major, one tile per thread
  for_row_tiles(rows, f, pdh, dh_t.data_ptr<BFloat16>(), [&](int64_t begin, int64_t end, int64_t tid) {
    float* s = sums.row(tid);
    BFloat16* a = scratch.data() + tid * kTile * f;
    for (int64_t r = begin; r < end; ++r)
      for (int64_t j = 0; j < f; j += kLanes) {
        const Vec z = load(ph + r * f + j) + load(pb + j), cdf = normal_cdf(z);
        const Vec g = load(pda + r * f + j) * at::vec::fmadd(z, normal_pdf(z), cdf);
        store(pdh + r * f + j, g);
        store(s + j, load(s + j) + g);
        store(a + (r - begin) * f + j, z * cdf);
      }
    transpose_rows(a, end - begin, f, pa_t + begin, rows);
  });
  return {dh, dh_t, a_t, sums.total()};
}

// softmax(scale * s) over the last dimension; s bfloat16, any row length.
torch::Tensor scaled_softmax_fwd(const torch::Tensor& s, double scale) {
  TORCH_CHECK(s.scalar_type() == torch::kBFloat16 && s.is_contiguous(), "s: expected contiguous bfloat16");
  const int64_t n = s.size(-1), rows = s.numel() / n;
  auto p = torch::empty_like(s);
  const BFloat16* ps = s.data_ptr<BFloat16>();
  BFloat16* pp = p.data_ptr<BFloat16>();
  const Vec vscale(static_cast<float>(scale));
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    std::vector<float> e(n + kLanes);
    for (int64_t r = begin; r < end; ++r) {
      const BFloat16* sr = ps + r * n;
      Vec vmax(-INFINITY);
      int64_t j = 0;
      for (; j + kLanes <= n; j += kLanes) vmax = at::vec::maximum(vmax, load(sr + j) * vscale);
      float mx = hmax(vmax);
      for (; j < n; ++j) mx = std::max(mx, static_cast<float>(sr[j]) * static_cast<float>(scale));
      Vec sum(0.f);
      for (j = 0; j < n; j += kLanes) {
        const int64_t m = std::min(kLanes, n - j);
        const Vec ex = (load(sr + j, m) * vscale - Vec(mx)).exp_u20();
        const Vec kept = _mm512_maskz_mov_ps(tail_mask(m), ex);
        store(e.data() + j, kept);
        sum += kept;
      }
      const Vec inv(1.f / hsum(sum));
      for (j = 0; j < n; j += kLanes) store(pp + r * n + j, load(e.data() + j) * inv, std::min(kLanes, n - j));
    }
  });
  return p;
}

// Gradient of scaled_softmax_fwd: ds = scale * p * (dp - sum(p * dp)), in bfloat16.
torch::Tensor scaled_softmax_bwd(const torch::Tensor& dp, const torch::Tensor& p, double scale) {
  TORCH_CHECK(dp.scalar_type() == torch::kBFloat16 && p.scalar_type() == torch::kBFloat16 && dp.is_contiguous() &&
                  p.is_contiguous() && dp.sizes() == p.sizes(),
              "dp, p: expected contiguous bfloat16 tensors of one shape");
  const int64_t n = p.size(-1), rows = p.numel() / n;
  auto ds = torch::empty_like(p);
  const BFloat16 *pdp = dp.data_ptr<BFloat16>(), *pp = p.data_ptr<BFloat16>();
  BFloat16* pds = ds.data_ptr<BFloat16>();
  at::parallel_for(0, rows, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      Vec dot(0.f);
      for (int64_t j = 0; j < n; j += kLanes) {
        const int64_t m = std::min(kLanes, n - j);
        dot = at::vec::fmadd(load(pp + r * n + j, m), load(pdp + r * n + j, m), dot);
      }
      const Vec sum(hsum(dot)), vscale(static_cast<float>(scale));
      for (int64_t j = 0; j < n; j += kLanes) {
        const int64_t m = std::min(kLanes, n - j);
        store(pds + r * n + j, vscale * load(pp + r * n + j, m) * (load(pdp + r * n + j, m) - sum), m);
      }
    }
  });
  return ds;
}

// qkv + b, [B, N, 3, H, Dh] bfloat16 from a matmul without bias → contiguous q, k, v of shape [B, H, N, Dh].
std::vector<torch::Tensor> split_heads(const torch::Tensor& qkv, const torch::Tensor& b, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 3, "qkv: expected [B, N, 3 * D]");
  const int64_t batch = qkv.size(0), tokens = qkv.size(1), width = qkv.size(2) / 3, dh = width / heads;
  check_rows(qkv, torch::kBFloat16, 3 * width, "qkv");
  TORCH_CHECK(dh * heads == width && dh % kLanes == 0, "head width must be a multiple of ", kLanes);
  std::vector<torch::Tensor> out;
  for (int i = 0; i < 3; ++i) out.push_back(torch::empty({batch, heads, tokens, dh}, qkv.options()));
  const BFloat16* pin = qkv.data_ptr<BFloat16>();
  const float* pb = b.data_ptr<float>();
  BFloat16* pout[3] = {out[0].data_ptr<BFloat16>(), out[1].data_ptr<BFloat16>(), out[2].data_ptr<BFloat16>()};
  at::parallel_for(0, batch * tokens, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bi = row / tokens, t = row % tokens;
      const BFloat16* src = pin + row * 3 * width;
      for (int64_t which = 0, c = 0; which < 3; ++which)
        for (int64_t h = 0; h < heads; ++h) {
          BFloat16* dst = pout[which] + ((bi * heads + h) * tokens + t) * dh;
          for (int64_t j = 0; j < dh; j += kLanes, c += kLanes) store(dst + j, load(src + c) + load(pb + c));
        }
    }
  });
  return out;
}

// Inverse layout of split_heads for the gradients: dq, dk, dv [B, H, N, Dh] → dqkv [B, N, 3 * D] bfloat16, also
// transposed ([3 * D, B * N]), and its column sums (the qkv bias gradient).
std::vector<torch::Tensor> merge_heads(const torch::Tensor& dq, const torch::Tensor& dk, const torch::Tensor& dv) {
  const int64_t batch = dq.size(0), heads = dq.size(1), tokens = dq.size(2), dh = dq.size(3), width = heads * dh;
  for (const auto* t : {&dq, &dk, &dv}) check_rows(*t, torch::kBFloat16, dh, "dq/dk/dv");
  auto dqkv = torch::empty({batch, tokens, 3 * width}, dq.options()), dqkv_t = empty_transposed(dqkv);
  ColumnSums sums(3 * width);
  const BFloat16* pin[3] = {dq.data_ptr<BFloat16>(), dk.data_ptr<BFloat16>(), dv.data_ptr<BFloat16>()};
  BFloat16* pout = dqkv.data_ptr<BFloat16>();
  for_row_tiles(batch * tokens, 3 * width, pout, dqkv_t.data_ptr<BFloat16>(), [&](int64_t begin, int64_t end,
                                                                                 int64_t tid) {
    float* s = sums.row(tid);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t bi = row / tokens, t = row % tokens;
      BFloat16* dst = pout + row * 3 * width;
      for (int64_t which = 0, c = 0; which < 3; ++which)
        for (int64_t h = 0; h < heads; ++h) {
          const BFloat16* src = pin[which] + ((bi * heads + h) * tokens + t) * dh;
          for (int64_t j = 0; j < dh; j += kLanes, c += kLanes) {
            const Vec v = load(src + j);
            store(dst + c, v);
            store(s + c, load(s + c) + v);
          }
        }
    }
  });
  return {dqkv, dqkv_t, sums.total()};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("layer_norm_fwd", &layer_norm_fwd);
  m.def("layer_norm_bwd", &layer_norm_bwd);
  m.def("add_bias_residual", &add_bias_residual);
  m.def("cast_colsum", &cast_colsum);
  m.def("bias_gelu_fwd", &bias_gelu_fwd);
  m.def("bias_gelu_bwd", &bias_gelu_bwd);
  m.def("scaled_softmax_fwd", &scaled_softmax_fwd);
  m.def("scaled_softmax_bwd", &scaled_softmax_bwd);
  m.def("split_heads", &split_heads);
  m.def("merge_heads", &merge_heads);
}
