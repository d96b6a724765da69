// The CPU decode step in C++: the whole model forward for a batch of single-token decodes.
//
// Why: a batch-1 decode step of SmolLM2 (30 layers) is ~1,300 small torch ops driven from Python;
// their dispatch cost more than the weights' reads (benchmarks/results/kernels.md). Here the same
// layer loop runs with no Python in it, and the small ops are fused into four loops:
//
//   add_rms_norm     x += delta; y = w * rmsnorm(x)                       x fp32 [B, H], y [B, H] dtype
//   rope_store       rotate q and k of qkv in place, write k and v into their KV slots
//   paged_attention  one query per sequence over its blocks, read in place (no gather, no mask)
//   silu_mul         gate_up [B, 2I] -> silu(gate) * up [B, I]
//
// Quantized matmuls are ours (vnni_gemv: int8 activations, AVX512-VNNI dot products; any number of rows,
// so kernels/linear.py runs prompts through it too; torch's int4 / int8 kernels read the weights at under
// half the memory bandwidth at one row); the
// rest stay torch's (int4 / int8 weight-only packs, bf16/fp32 GEMM, fp16 GEMV).
//
// Numerics follow the Python path (splitserve/engine/model.py, kernels/ops.py) op for op where
// it rounds to the model's dtype; sums are fp32. The Python shell is splitserve/kernels/cpu_decode.py.
//
// Memory layout read here (engine/kv_cache.py):
//
//   kv_cache[l]: [num_blocks, 2, bs, Hkv, D]     token p of a sequence: block_table[p / bs], slot p % bs
//
//   one block:  | K slot 0 [Hkv, D] | ... | K slot bs-1 | V slot 0 [Hkv, D] | ... | V slot bs-1 |

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;
using c10::BFloat16;

inline float to_f(float v) { return v; }
inline float to_f(BFloat16 v) { return static_cast<float>(v); }
template <typename T> inline T from_f(float v) { return static_cast<T>(v); }
template <typename T> inline float round_to(float v) { return to_f(from_f<T>(v)); }  // v as T would hold it

// exp for x <= 88 (Cephes' polynomial after range reduction; ~1 ulp): branch-free, so loops over it vectorize.
inline float exp_approx(float x) {
  x = std::max(std::min(x, 88.0f), -87.0f);
  float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  float y = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

// ------------------------------------------------------------------------------------ fused small ops

// x [B, H] fp32 (updated in place: x += delta), delta [B, H] (any row stride) or undefined, w [H] -> y [B, H]
template <typename T>
void add_rms_norm_impl(Tensor& x, const Tensor& delta, const Tensor& w, double eps, Tensor& y) {
  const int64_t rows = x.size(0), h = x.size(1);
  float* xp = x.data_ptr<float>();
  const T* wp = w.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r) {
    float* xr = xp + r * h;
    if (delta.defined()) {
      const T* dr = delta.data_ptr<T>() + r * delta.stride(0);
      for (int64_t i = 0; i < h; ++i) xr[i] += to_f(dr[i]);
    }
    float ss = 0.0f;
    for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
    T* yr = yp + r * h;
    for (int64_t i = 0; i < h; ++i) yr[i] = from_f<T>(to_f(wp[i]) * round_to<T>(xr[i] * rstd));
  }
}

Tensor add_rms_norm(Tensor& x, const c10::optional<Tensor>& delta, const Tensor& w, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "residual must be contiguous fp32");
  Tensor d = delta.has_value() ? *delta : Tensor();
  TORCH_CHECK(!d.defined() || (d.scalar_type() == w.scalar_type() && d.stride(1) == 1), "delta: rows of w's dtype");
  Tensor y = at::empty(x.sizes(), x.options().dtype(w.scalar_type()));
  if (w.scalar_type() == at::kBFloat16) add_rms_norm_impl<BFloat16>(x, d, w, eps, y);
  else add_rms_norm_impl<float>(x, d, w, eps, y);
  return y;
}

// qkv [B, (Hq + 2 Hkv) D] (row stride any): q and k rotated in place; k, v written to kv_layer's slots.
template <typename T>
void rope_store_impl(Tensor& qkv, const Tensor& positions, const Tensor& cos, const Tensor& ssin,
                     Tensor& kv_layer, const Tensor& slot_blocks, const Tensor& slot_offsets,
                     int64_t num_heads, int64_t num_kv_heads) {
  const int64_t b = qkv.size(0), d = kv_layer.size(4), half = d / 2, bs = kv_layer.size(2);
  const int64_t row_stride = qkv.stride(0);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* blocks = slot_blocks.data_ptr<int64_t>();
  const int64_t* offsets = slot_offsets.data_ptr<int64_t>();
  T* kv = kv_layer.data_ptr<T>();
  std::vector<float> tmp(d);
  for (int64_t r = 0; r < b; ++r) {
    T* row = qkv.data_ptr<T>() + r * row_stride;
    const T* c = cos.data_ptr<T>() + pos[r] * d;
    const T* s = ssin.data_ptr<T>() + pos[r] * d;
    for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {  // q heads, then k heads
      T* x = row + h * d;
      for (int64_t i = 0; i < d; ++i) {
        const float swapped = to_f(x[i < half ? i + half : i - half]);
        tmp[i] = round_to<T>(to_f(x[i]) * to_f(c[i])) + swapped * to_f(s[i]);  // (x cos) + flip(x) ssin
      }
      for (int64_t i = 0; i < d; ++i) x[i] = from_f<T>(tmp[i]);
    }
    const int64_t slot = ((blocks[r] * 2) * bs + offsets[r]) * num_kv_heads * d;  // K of this token
    const T* k = row + num_heads * d;
    std::memcpy(kv + slot, k, num_kv_heads * d * sizeof(T));
    std::memcpy(kv + slot + bs * num_kv_heads * d, k + num_kv_heads * d, num_kv_heads * d * sizeof(T));  // V
  }
}

void rope_store(Tensor& qkv, const Tensor& positions, const Tensor& cos, const Tensor& ssin, Tensor& kv_layer,
                const Tensor& slot_blocks, const Tensor& slot_offsets, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(qkv.stride(1) == 1 && kv_layer.is_contiguous() && cos.is_contiguous() && ssin.is_contiguous(),
              "rope_store: contiguous rows expected");
  TORCH_CHECK(qkv.scalar_type() == kv_layer.scalar_type() && cos.scalar_type() == qkv.scalar_type(),
              "rope_store: qkv, cache and tables must share a dtype");
  TORCH_CHECK(qkv.size(1) >= (num_heads + 2 * num_kv_heads) * kv_layer.size(4), "rope_store: qkv too narrow");
  if (qkv.scalar_type() == at::kBFloat16)
    rope_store_impl<BFloat16>(qkv, positions, cos, ssin, kv_layer, slot_blocks, slot_offsets, num_heads, num_kv_heads);
  else
    rope_store_impl<float>(qkv, positions, cos, ssin, kv_layer, slot_blocks, slot_offsets, num_heads, num_kv_heads);
}

// q: rows of qkv [B, Hq * D ...] (row stride any); out [B, Hq, D]. One task per (sequence, query head).
template <typename T>
void paged_attention_impl(const Tensor& q, const Tensor& kv_layer, const Tensor& block_tables,
                          const Tensor& context_lens, int64_t num_heads, Tensor& out) {
  const int64_t b = q.size(0), bs = kv_layer.size(2), hkv = kv_layer.size(3), d = kv_layer.size(4);
  const int64_t group = num_heads / hkv, width = block_tables.size(1);
  const int64_t q_stride = q.stride(0), token_stride = hkv * d, block_stride = 2 * bs * token_stride;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  const T* kv = kv_layer.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, b * num_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf(d), acc(d);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / num_heads, h = task % num_heads, g = h / group, len = lens[r];
      const int64_t* table = tables + r * width;
      for (int64_t i = 0; i < d; ++i) qf[i] = to_f(qp[r * q_stride + h * d + i]) * scale;
      scores.resize(len);
      float best = -INFINITY;
      for (int64_t t = 0; t < len; ++t) {
        const T* k = kv + table[t / bs] * block_stride + (t % bs) * token_stride + g * d;
        float dot = 0.0f;
        for (int64_t i = 0; i < d; ++i) dot += qf[i] * to_f(k[i]);
        scores[t] = dot;
        best = std::max(best, dot);
      }
      float total = 0.0f;
      for (int64_t t = 0; t < len; ++t) {
        scores[t] = exp_approx(scores[t] - best);
        total += scores[t];
      }
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t = 0; t < len; ++t) {
        const T* v = kv + table[t / bs] * block_stride + bs * token_stride + (t % bs) * token_stride + g * d;
        const float p = scores[t];
        for (int64_t i = 0; i < d; ++i) acc[i] += p * to_f(v[i]);
      }
      T* o = op + (r * num_heads + h) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = from_f<T>(acc[i] / total);
    }
  });
}

Tensor paged_attention(const Tensor& q, const Tensor& kv_layer, const Tensor& block_tables,
                       const Tensor& context_lens, int64_t num_heads) {
  TORCH_CHECK(q.stride(1) == 1 && kv_layer.is_contiguous() && block_tables.is_contiguous(),
              "paged_attention: contiguous rows expected");
  TORCH_CHECK(q.scalar_type() == kv_layer.scalar_type(), "paged_attention: q and the cache must share a dtype");
  TORCH_CHECK(num_heads % kv_layer.size(3) == 0, "paged_attention: query heads must be a multiple of KV heads");
  Tensor out = at::empty({q.size(0), num_heads, kv_layer.size(4)}, q.options());
  if (q.scalar_type() == at::kBFloat16)
    paged_attention_impl<BFloat16>(q, kv_layer, block_tables, context_lens, num_heads, out);
  else
    paged_attention_impl<float>(q, kv_layer, block_tables, context_lens, num_heads, out);
  return out;
}

// gate_up [B, 2I] (row stride any) -> silu(gate) * up [B, I], each product rounded as torch's two ops would
template <typename T>
void silu_mul_impl(const Tensor& gate_up, Tensor& out) {
  const int64_t b = out.size(0), n = out.size(1), stride = gate_up.stride(0);
  for (int64_t r = 0; r < b; ++r) {
    const T* g = gate_up.data_ptr<T>() + r * stride;
    const T* u = g + n;
    T* o = out.data_ptr<T>() + r * n;
    for (int64_t i = 0; i < n; ++i) {
      const float x = to_f(g[i]);
      o[i] = from_f<T>(round_to<T>(x / (1.0f + exp_approx(-x))) * to_f(u[i]));
    }
  }
}

Tensor silu_mul(const Tensor& gate_up) {
  TORCH_CHECK(gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0, "silu_mul: rows of even width expected");
  Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16) silu_mul_impl<BFloat16>(gate_up, out);
  else silu_mul_impl<float>(gate_up, out);
  return out;
}

// ------------------------------------------------------------------------------------ VNNI GEMV
//
// Matrix-vector products for a few rows of activations against int8 / int4 weights, with the
// activations quantized to int8 per group of 32 (one fp32 scale each, as llama.cpp's Q8 activations)
// and the dot products on AVX512-VNNI (vpdpbusd: 64 u8 x s8 products per instruction). The weights are
// in tiles of 16 output rows (cpu_decode.py packs them once, from the quantized linears):
//
//   int8  w [N/16, K/4, 16, 4] u8 = weight + 128     row scale [N] fp32
//   int4  w [N/16, K/8, 16, 4] u8: byte i of row r in chunk c = q[r, 8c + i] | q[r, 8c + 4 + i] << 4
//         scale, zero [N/16, K/g, 16] bf16 (w = (q - 8) scale + zero, torch's int4 convention)
//
// so one 64-byte load is 4 (int8) or 8 (int4) columns of 16 rows, and the 4 activations of a column
// quadruple are one broadcast int32. Per group of 32 columns the int32 sums become fp32:
//
//   int8  out[n] = s[n] sum_g dx_g (sum_k (w+128) xq - 128 sum_k xq)
//   int4  out[n] = sum_g (s[n,g] dx_g (sum_k q xq - 8 sum_k xq) + zero[n,g] sum_k x)

constexpr int64_t kActGroup = 32;

// x [M, K] -> q [M, K] int8, and per group of 32: dx (x ~ q dx), qsum (sum of q), xsum (sum of x)
struct QuantizedActs {
  std::vector<int8_t> q;
  std::vector<float> dx, qsum, xsum;
};

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {  // 16 bf16 -> 16 fp32 (bf16 is fp32's high half)
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#endif

template <typename T>
QuantizedActs quantize_acts(const Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1), groups = k / kActGroup;
  QuantizedActs a{std::vector<int8_t>(m * k), std::vector<float>(m * groups), std::vector<float>(m * groups),
                  std::vector<float>(m * groups)};
  for (int64_t g = 0; g < m * groups; ++g) {
    const T* src = x.data_ptr<T>() + (g / groups) * x.stride(0) + (g % groups) * kActGroup;
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    // the scalar loop below, 16 lanes at a time (a prompt's rows: the scalar loop cost more than the GEMM)
    const __m512 v0 = load16(src), v1 = load16(src + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vinv));  // round to nearest even, as nearbyint
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vinv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q.data() + g * kActGroup), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q.data() + g * kActGroup + 16), _mm512_cvtsepi32_epi8(q1));
    a.dx[g] = amax / 127.0f;
    a.qsum[g] = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    a.xsum[g] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
#else
    float v[kActGroup];
    float amax = 0.0f, sum = 0.0f;
    for (int64_t i = 0; i < kActGroup; ++i) {
      v[i] = to_f(src[i]);
      amax = std::max(amax, std::fabs(v[i]));
      sum += v[i];
    }
    const float dx = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t qsum = 0;
    for (int64_t i = 0; i < kActGroup; ++i) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(v[i] * inv));
      a.q[g * kActGroup + i] = static_cast<int8_t>(q);
      qsum += q;
    }
    a.dx[g] = dx;
    a.qsum[g] = static_cast<float>(qsum);
    a.xsum[g] = sum;
#endif
  }
  return a;
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
constexpr bool kHasVnni = true;

inline __m512 load_bf16(const uint16_t* p) {  // 16 bf16 -> 16 fp32
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline __m512i bcast4(const int8_t* p) {  // 4 int8 activations as one int32, in every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// MR rows of activations (starting at row m0) x the 16 output rows of each of the NT tiles from tile t
// -> out[m0 + i, 16 (t + j) ...]. One broadcast of 4 activations feeds NT products, one weight load MR.
template <int MR, int NT, bool INT4, typename O>
void vnni_tile(const uint8_t* w, const uint16_t* s4, const uint16_t* z4, const float* row_scale,
               const QuantizedActs& a, int64_t m0, int64_t k, int64_t t, O* out, int64_t ld) {
  constexpr int64_t group = kActGroup;
  const int64_t groups = k / group, per_col = INT4 ? 8 : 4, tile_bytes = (k / per_col) * 64;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  __m512 facc[MR][NT];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NT; ++j) facc[i][j] = _mm512_setzero_ps();
  const uint8_t* wt = w + t * tile_bytes;
  for (int64_t g = 0; g < groups; ++g) {
    __m512i acc[MR][NT];
    for (int i = 0; i < MR; ++i) {
      // the sums start at -128 sum xq (int8: the weights are stored + 128) or -8 sum xq (int4: q - 8),
      // so they end as sum w xq, exact in int32, with no correction after
      const int32_t start = -(INT4 ? 8 : 128) * static_cast<int32_t>(a.qsum[(m0 + i) * groups + g]);
      for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_set1_epi32(start);
    }
    for (int64_t c = g * group; c < (g + 1) * group; c += per_col) {
      const int64_t off = (c / per_col) * 64;
      if (INT4) {
        __m512i lo[NT], hi[NT];
        for (int j = 0; j < NT; ++j) {
          const __m512i v = _mm512_loadu_si512(wt + j * tile_bytes + off);
          lo[j] = _mm512_and_si512(v, nib);
          hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
        }
        for (int i = 0; i < MR; ++i) {
          const int8_t* xq = a.q.data() + (m0 + i) * k + c;
          const __m512i x0 = bcast4(xq), x1 = bcast4(xq + 4);
          for (int j = 0; j < NT; ++j) {
            acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], lo[j], x0);
            acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], hi[j], x1);
          }
        }
      } else {
        __m512i v[NT];
        for (int j = 0; j < NT; ++j) v[j] = _mm512_loadu_si512(wt + j * tile_bytes + off);
        for (int i = 0; i < MR; ++i) {
          const __m512i x = bcast4(a.q.data() + (m0 + i) * k + c);
          for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], v[j], x);
        }
      }
    }
    for (int i = 0; i < MR; ++i) {
      const int64_t idx = (m0 + i) * groups + g;  // weight group == activation group
      const __m512 dx = _mm512_set1_ps(a.dx[idx]);
      if (INT4) {
        // sum (q - 8) xq times dx, then the group's scale; centring before the scale keeps the activation
        // rounding error proportional to |q - 8| <= 8, not to q <= 15; the zero takes the exact sum of x
        const __m512 xs = _mm512_set1_ps(a.xsum[idx]);
        for (int j = 0; j < NT; ++j) {
          const __m512 sc = load_bf16(s4 + ((t + j) * groups + g) * 16), zc = load_bf16(z4 + ((t + j) * groups + g) * 16);
          facc[i][j] = _mm512_fmadd_ps(sc, _mm512_mul_ps(_mm512_cvtepi32_ps(acc[i][j]), dx), facc[i][j]);
          facc[i][j] = _mm512_fmadd_ps(zc, xs, facc[i][j]);
        }
      } else {
        for (int j = 0; j < NT; ++j) facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), dx, facc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NT; ++j) {
      __m512 r = facc[i][j];
      if (!INT4) r = _mm512_mul_ps(r, _mm512_loadu_ps(row_scale + (t + j) * 16));
      O* o = out + (m0 + i) * ld + (t + j) * 16;
      if constexpr (std::is_same_v<O, float>) {
        _mm512_storeu_ps(o, r);
      } else {
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, r);
        for (int jj = 0; jj < 16; ++jj) o[jj] = from_f<O>(tmp[jj]);
      }
    }
}

template <int NT, bool INT4, typename O>
void vnni_rows(const uint8_t* w, const uint16_t* s4, const uint16_t* z4, const float* row_scale,
               const QuantizedActs& a, int64_t m0, int64_t mr, int64_t k, int64_t t, O* out, int64_t ld) {
  switch (mr) {
    case 1: return vnni_tile<1, NT, INT4>(w, s4, z4, row_scale, a, m0, k, t, out, ld);
    case 2: return vnni_tile<2, NT, INT4>(w, s4, z4, row_scale, a, m0, k, t, out, ld);
    case 3: return vnni_tile<3, NT, INT4>(w, s4, z4, row_scale, a, m0, k, t, out, ld);
    default: return vnni_tile<4, NT, INT4>(w, s4, z4, row_scale, a, m0, k, t, out, ld);
  }
}

template <typename T>
void vnni_gemv_impl(const Tensor& x, const Tensor& w, const Tensor& scale, const c10::optional<Tensor>& zero,
                    Tensor& out) {
  const bool int4 = zero.has_value();
  const int64_t m = x.size(0), k = x.size(1), tiles = w.size(0);
  const QuantizedActs a = quantize_acts<T>(x);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* s4 = int4 ? reinterpret_cast<const uint16_t*>(scale.data_ptr<BFloat16>()) : nullptr;
  const uint16_t* z4 = int4 ? reinterpret_cast<const uint16_t*>(zero->data_ptr<BFloat16>()) : nullptr;
  const float* rs = int4 ? nullptr : scale.data_ptr<float>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, (tiles + 1) / 2, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = 2 * begin; t < std::min(2 * end, tiles); t += 2)  // 2 tiles' weights stay in L1 while x streams by
      for (int64_t m0 = 0; m0 < m; m0 += 4) {  // 4 rows of x per pass over them
        const int64_t mr = std::min<int64_t>(4, m - m0);
        const bool two = t + 1 < tiles;
        if (int4 && two) vnni_rows<2, true>(wp, s4, z4, rs, a, m0, mr, k, t, op, tiles * 16);
        else if (int4) vnni_rows<1, true>(wp, s4, z4, rs, a, m0, mr, k, t, op, tiles * 16);
        else if (two) vnni_rows<2, false>(wp, s4, z4, rs, a, m0, mr, k, t, op, tiles * 16);
        else vnni_rows<1, false>(wp, s4, z4, rs, a, m0, mr, k, t, op, tiles * 16);
      }
  });
}
#else
constexpr bool kHasVnni = false;
#endif

// x [M, K]; int8: w [N/16, K/4, 16, 4] u8, scale [N/16 * 16] fp32; int4: w [N/16, K/8, 16, 4] u8, scale and
// zero [N/16, K/32, 16] bf16. -> [M, N/16 * 16] in x's dtype (bf16 or fp32)
Tensor vnni_gemv(const Tensor& x, const Tensor& w, const Tensor& scale, const c10::optional<Tensor>& zero,
                 int64_t group) {
  TORCH_CHECK(kHasVnni, "vnni_gemv: this build has no AVX512-VNNI");
  const bool int4 = zero.has_value();
  const int64_t m = x.size(0), k = x.size(1), tiles = w.size(0);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) * (int4 ? 8 : 4) == k,
              "vnni_gemv: weight tiles do not match x's width");
  TORCH_CHECK(k % kActGroup == 0 && (!int4 || group == kActGroup),
              "vnni_gemv: K must be a multiple of 32, and int4 groups 32 wide");
  TORCH_CHECK(x.stride(1) == 1 && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "vnni_gemv: x must be bf16 or fp32 rows");
  Tensor out = at::empty({m, tiles * 16}, x.options());
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  if (x.scalar_type() == at::kBFloat16) vnni_gemv_impl<BFloat16>(x, w, scale, zero, out);
  else vnni_gemv_impl<float>(x, w, scale, zero, out);
#endif
  return out;
}

// ------------------------------------------------------------------------------------ the model

enum LinearKind : int64_t { kDense = 0, kInt8 = 1, kInt4 = 2 };

struct Linear {
  int64_t kind = kDense;
  Tensor weight;         // dense: [N, K] in the model's dtype; int8: [N, K] int8; int4: torch's packed tiles
  Tensor scale;          // int8: [N] bf16; int4: scales and zeros [K/g, N + pad, 2] bf16
  Tensor bias;           // [N] in the model's dtype, or undefined
  Tensor weight_f16;     // dense bf16 only: the fp16 copy for single-row GEMV, or undefined
  int64_t out_features = 0, group_size = 0;
  double fp16_limit = 0;  // single-row fp16 GEMV is safe while max|x| < fp16_limit (cpu_linear.py's bound)
  Tensor packed, packed_scale, packed_zero;  // quantized: vnni_gemv's tiles (undefined: torch's kernels)
};

struct Layer {
  Tensor input_norm, post_norm;
  Linear qkv, o, gate_up, down;
};

class DecodeModel {
 public:
  DecodeModel(int64_t num_heads, int64_t num_kv_heads, double eps, bool bf16)
      : num_heads_(num_heads), num_kv_heads_(num_kv_heads), eps_(eps), dtype_(bf16 ? at::kBFloat16 : at::kFloat) {}

  static Linear make_linear(int64_t kind, Tensor weight, c10::optional<Tensor> scale, c10::optional<Tensor> bias,
                            c10::optional<Tensor> weight_f16, int64_t out_features, int64_t group_size,
                            double fp16_limit, c10::optional<Tensor> packed, c10::optional<Tensor> packed_scale,
                            c10::optional<Tensor> packed_zero) {
    Linear l;
    l.kind = kind;
    l.weight = weight;
    if (scale) l.scale = *scale;
    if (bias) l.bias = *bias;
    if (weight_f16) l.weight_f16 = *weight_f16;
    l.out_features = out_features;
    l.group_size = group_size;
    l.fp16_limit = fp16_limit;
    if (packed) l.packed = *packed;
    if (packed_scale) l.packed_scale = *packed_scale;
    if (packed_zero) l.packed_zero = *packed_zero;
    return l;
  }

  void set_embedding(Tensor weight, c10::optional<Tensor> scale) {
    embed_ = weight;
    embed_scale_ = scale ? *scale : Tensor();
  }
  void add_layer(Tensor input_norm, Tensor post_norm, Linear qkv, Linear o, Linear gate_up, Linear down) {
    layers_.push_back(Layer{input_norm, post_norm, qkv, o, gate_up, down});
  }
  void set_head(Tensor norm, Linear head) {
    norm_ = norm;
    head_ = head;
  }

  // One decode step; every argument is the runner's (engine/runner.py prepare_step). -> logits [B, V] fp32
  Tensor forward(const Tensor& input_ids, const Tensor& positions, const Tensor& slot_blocks,
                 const Tensor& slot_offsets, const Tensor& block_tables, const Tensor& context_lens,
                 Tensor& kv_cache, const Tensor& cos, const Tensor& ssin) {
    TORCH_CHECK(kv_cache.size(0) == static_cast<int64_t>(layers_.size()), "kv_cache has the wrong number of layers");
    const int64_t q_size = num_heads_ * kv_cache.size(5);
    Tensor x = embed(input_ids);  // [B, H] fp32 residual stream
    Tensor delta;                  // the previous layer's MLP output, added at the next norm
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      Tensor kv_layer = kv_cache[i];
      Tensor h = add_rms_norm(x, opt(delta), layer.input_norm, eps_);
      Tensor qkv = run(layer.qkv, h);  // [B, (Hq + 2 Hkv) D]
      rope_store(qkv, positions, cos, ssin, kv_layer, slot_blocks, slot_offsets, num_heads_, num_kv_heads_);
      Tensor attn = paged_attention(qkv, kv_layer, block_tables, context_lens, num_heads_);  // [B, Hq, D]
      h = add_rms_norm(x, run(layer.o, attn.view({attn.size(0), q_size})), layer.post_norm, eps_);
      delta = run(layer.down, silu_mul(run(layer.gate_up, h)));
    }
    Tensor y = add_rms_norm(x, delta, norm_, eps_);
    return run(head_, y).to(at::kFloat);
  }

 private:
  static c10::optional<Tensor> opt(const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

  Tensor embed(const Tensor& ids) const {
    if (embed_scale_.defined())  // int8 rows, one scale each
      return embed_.index_select(0, ids).to(at::kFloat).mul_(embed_scale_.index_select(0, ids).unsqueeze(1));
    return embed_.index_select(0, ids).to(at::kFloat);
  }

  // x [M, K] in the model's dtype -> [M, N] in the model's dtype (a view for int4's padded N)
  Tensor run(const Linear& l, const Tensor& x) const {
    Tensor out;
    if (l.kind == kDense) {
      if (l.weight_f16.defined() && x.size(0) == 1 && x.abs().max().item<float>() < l.fp16_limit) {
        out = at::linear(x.to(at::kHalf), l.weight_f16).to(dtype_);
      } else {
        out = at::linear(x.to(l.weight.scalar_type()), l.weight);
      }
    } else if (l.packed.defined()) {  // faster than torch's at every batch measured (1-64 rows)
      out = vnni_gemv(x, l.packed, l.packed_scale, opt(l.packed_zero), l.group_size);
      if (out.size(1) != l.out_features) out = out.narrow(1, 0, l.out_features);
    } else if (l.kind == kInt8) {
      out = at::_weight_int8pack_mm(x.to(at::kBFloat16), l.weight, l.scale);
    } else {
      out = at::_weight_int4pack_mm_for_cpu(x.to(at::kBFloat16), l.weight, l.group_size, l.scale);
      if (out.size(1) != l.out_features) out = out.narrow(1, 0, l.out_features);
    }
    if (out.scalar_type() != dtype_) out = out.to(dtype_);
    if (l.bias.defined()) out = out + l.bias;
    return out;
  }

  int64_t num_heads_, num_kv_heads_;
  double eps_;
  at::ScalarType dtype_;
  Tensor embed_, embed_scale_, norm_;
  std::vector<Layer> layers_;
  Linear head_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "splitserve's CPU decode step (splitserve/kernels/cpu_decode.py)";
  m.def("add_rms_norm", &add_rms_norm);
  m.def("rope_store", &rope_store);
  m.def("paged_attention", &paged_attention);
  m.def("silu_mul", &silu_mul);
  m.def("vnni_gemv", &vnni_gemv, py::call_guard<py::gil_scoped_release>());  // a prompt's matmuls: others run meanwhile
  m.attr("has_vnni") = kHasVnni;
  py::class_<Linear>(m, "Linear");
  py::class_<DecodeModel>(m, "DecodeModel")
      .def(py::init<int64_t, int64_t, double, bool>())
      .def_static("make_linear", &DecodeModel::make_linear)
      .def("set_embedding", &DecodeModel::set_embedding)
      .def("add_layer", &DecodeModel::add_layer)
      .def("set_head", &DecodeModel::set_head)
      .def("forward", &DecodeModel::forward, py::call_guard<py::gil_scoped_release>());  // other threads run meanwhile
}
