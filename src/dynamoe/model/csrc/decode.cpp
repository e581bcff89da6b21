// Decode kernels: products that stream their weights at memory speed, the selected experts of a token in one
// call, a transformer block's two halves (attention, router and experts) each in one call, and a model's whole
// decode step of one token in one call (Decoder).
//
// Decoding one token reads every weight it needs once, so its speed is how fast the weights stream
// from memory, plus a fixed cost per kernel call. Weights are stored in panels of 16 output columns,
// [panels, rows, 16]: a panel is one contiguous stream of memory and its 16 sums stay in registers.
// fp32 panels, or int8 panels with one fp32 scale per output column (weight-only quantization), their rows
// interleaved in pairs for integer products with x rounded to int16 (kernels.h, pass_int8).
//
// The instruction set is chosen at run time (AVX-512, AVX2+FMA, or plain C++), so one build runs on any
// x86-64 CPU; select_isa caps it (tests compare every level with torch). Threads split the panels
// through ATen's thread pool, so torch.set_num_threads governs them. dynamoe/model/fused.py states the
// Python each fused op stands for; the tests hold the two to the same outputs.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/ScopeExit.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int64_t kPanel = 16;  // output columns per panel: one 64-byte cache line of fp32
constexpr int64_t kMinWeightsPerThread = 1 << 15;  // below this a thread's share costs more to start than to run
// Row pairs of x per int16 quantization block (Quantized): 256 rows, whose 32-bit sums cannot overflow
// (128 pairs * 2 * 32767 * 127 < 2^31).
constexpr int64_t kBlockPairs = 128;
constexpr int64_t kAheadRows = 2;  // how far ahead non-temporal passes hint their rows (1 to 6 measured alike)

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

Isa supported_isa() {
#if defined(__x86_64__)
  __builtin_cpu_init();  // the checks below include the OS's support for the wider registers
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
  return kScalar;
}

Isa active_isa = supported_isa();

// In place over n values: exp(v - max) / sum.
void softmax(float* v, int64_t n) {
  const float top = *std::max_element(v, v + n);
  float total = 0.0f;
  for (int64_t i = 0; i < n; ++i) total += (v[i] = std::exp(v[i] - top));
  for (int64_t i = 0; i < n; ++i) v[i] /= total;
}

// ---------------------------------------------------------------------------------------------------
// The inner loops (kernels.h), written once over 16 lanes of fp32 and compiled here for each instruction set,
// each in its own namespace.

namespace plain {
struct Lanes {
  float v[kPanel];
};
inline Lanes zero() { return Lanes{}; }
inline Lanes load(const float* p) {
  Lanes lanes;
  std::copy_n(p, kPanel, lanes.v);
  return lanes;
}
inline Lanes fmadd(float x, Lanes w, Lanes sum) {
  for (int64_t j = 0; j < kPanel; ++j) sum.v[j] += x * w.v[j];
  return sum;
}
inline Lanes multiply_add(Lanes a, Lanes b, Lanes sum) {
  for (int64_t j = 0; j < kPanel; ++j) sum.v[j] += a.v[j] * b.v[j];
  return sum;
}
inline Lanes add(Lanes a, Lanes b) { return fmadd(1.0f, a, b); }
inline Lanes mul(Lanes a, Lanes b) {
  for (int64_t j = 0; j < kPanel; ++j) a.v[j] *= b.v[j];
  return a;
}
inline float sum(Lanes lanes) { return std::accumulate(lanes.v, lanes.v + kPanel, 0.0f); }
inline void store(float* p, Lanes lanes) { std::copy_n(lanes.v, kPanel, p); }
struct Ints {
  int32_t v[kPanel];
};
struct Wide {
  int32_t v[2 * kPanel];  // column c's two rows at 2c and 2c + 1
};
inline Ints izero() { return Ints{}; }
inline Wide widen_pair(const int8_t* p) {
  Wide w;
  std::copy_n(p, 2 * kPanel, w.v);
  return w;
}
inline Wide widen_single(const int8_t* p) {
  Wide w{};
  for (int64_t c = 0; c < kPanel; ++c) w.v[2 * c] = p[c];
  return w;
}
inline Ints madd(const Wide& w, const int16_t* x, Ints sum) {
  for (int64_t c = 0; c < kPanel; ++c) sum.v[c] += w.v[2 * c] * x[0] + w.v[2 * c + 1] * x[1];
  return sum;
}
inline Lanes to_lanes(const Ints& ints) {
  Lanes lanes;
  for (int64_t c = 0; c < kPanel; ++c) lanes.v[c] = static_cast<float>(ints.v[c]);
  return lanes;
}
#include "kernels.h"
}  // namespace plain

#if defined(__x86_64__)
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
struct Lanes {
  __m512 v;
};
inline Lanes zero() { return {_mm512_setzero_ps()}; }
inline Lanes load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Lanes fmadd(float x, Lanes w, Lanes sum) { return {_mm512_fmadd_ps(_mm512_set1_ps(x), w.v, sum.v)}; }
inline Lanes multiply_add(Lanes a, Lanes b, Lanes sum) { return {_mm512_fmadd_ps(a.v, b.v, sum.v)}; }
inline Lanes add(Lanes a, Lanes b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Lanes mul(Lanes a, Lanes b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline float sum(Lanes lanes) { return _mm512_reduce_add_ps(lanes.v); }
inline void store(float* p, Lanes lanes) { _mm512_storeu_ps(p, lanes.v); }
struct Ints {
  __m512i v;
};
struct Wide {
  __m512i v;  // 32 int16: column c's two rows in lanes 2c and 2c + 1
};
inline Ints izero() { return {_mm512_setzero_si512()}; }
inline Wide widen_pair(const int8_t* p) {
  return {_mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline Wide widen_single(const int8_t* p) {  // each weight in a 32-bit lane: its upper int16 is its sign, times x's 0
  return {_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}
inline Ints madd(const Wide& w, const int16_t* x, Ints sum) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof pair);
  return {_mm512_add_epi32(sum.v, _mm512_madd_epi16(w.v, _mm512_set1_epi32(pair)))};
}
inline Lanes to_lanes(const Ints& ints) { return {_mm512_cvtepi32_ps(ints.v)}; }
#include "kernels.h"
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {  // a panel's 16 lanes as two 8-wide registers
#pragma GCC push_options
#pragma GCC target("avx2,fma")
struct Lanes {
  __m256 lo, hi;
};
inline Lanes zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Lanes load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Lanes fmadd(float x, Lanes w, Lanes sum) {
  const __m256 broadcast = _mm256_set1_ps(x);
  return {_mm256_fmadd_ps(broadcast, w.lo, sum.lo), _mm256_fmadd_ps(broadcast, w.hi, sum.hi)};
}
inline Lanes multiply_add(Lanes a, Lanes b, Lanes sum) {
  return {_mm256_fmadd_ps(a.lo, b.lo, sum.lo), _mm256_fmadd_ps(a.hi, b.hi, sum.hi)};
}
inline Lanes add(Lanes a, Lanes b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Lanes mul(Lanes a, Lanes b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline float sum(Lanes lanes) {
  const __m256 eight = _mm256_add_ps(lanes.lo, lanes.hi);
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
inline void store(float* p, Lanes lanes) {
  _mm256_storeu_ps(p, lanes.lo);
  _mm256_storeu_ps(p + 8, lanes.hi);
}
struct Ints {
  __m256i lo, hi;
};
struct Wide {
  __m256i lo, hi;  // columns 0-7 and 8-15, each column's two rows side by side
};
inline Ints izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline __m256i widen16(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline Wide widen_pair(const int8_t* p) { return {widen16(p), widen16(p + 16)}; }
inline __m256i widen32(const int8_t* p) {  // see avx512::widen_single
  return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline Wide widen_single(const int8_t* p) { return {widen32(p), widen32(p + 8)}; }
inline Ints madd(const Wide& w, const int16_t* x, Ints sum) {
  int32_t pair;
  std::memcpy(&pair, x, sizeof pair);
  const __m256i broadcast = _mm256_set1_epi32(pair);
  return {_mm256_add_epi32(sum.lo, _mm256_madd_epi16(w.lo, broadcast)),
          _mm256_add_epi32(sum.hi, _mm256_madd_epi16(w.hi, broadcast))};
}
inline Lanes to_lanes(const Ints& ints) { return {_mm256_cvtepi32_ps(ints.lo), _mm256_cvtepi32_ps(ints.hi)}; }
#include "kernels.h"
#pragma GCC pop_options
}  // namespace avx2
#endif

// Panels one pass reads for one row x, or rows of x one pass takes through a panel: as many memory streams in
// flight as stream fastest on one core (measured here in whole decode steps, interleaved): four fp32 panels (six or
// eight were 2-8% slower), eight int8 ones (15-25% faster than four, their streams being a quarter as long).
constexpr int64_t kStreams = 8;  // at most
constexpr int64_t kFp32Streams = 4, kInt8Streams = 8;

template <bool kRowsOfOnePanel, int kCount>
void pass_on_isa(const float* x, int64_t x_stride, const float* const* panels, int64_t rows, const float* const* scales,
                 float* const* outs, bool non_temporal) {
#if defined(__x86_64__)
  if (active_isa == kAvx512) return avx512::pass<kRowsOfOnePanel, kCount>(x, x_stride, panels, rows, scales, outs, non_temporal);
  if (active_isa == kAvx2) return avx2::pass<kRowsOfOnePanel, kCount>(x, x_stride, panels, rows, scales, outs, non_temporal);
#endif
  plain::pass<kRowsOfOnePanel, kCount>(x, x_stride, panels, rows, scales, outs, non_temporal);
}

template <bool kRowsOfOnePanel, int kCount>
void pass_int8_on_isa(const int16_t* xq, int64_t xq_stride, const float* x_scales, int64_t scale_stride,
                      const int8_t* const* panels, int64_t rows, const float* const* scales, float* const* outs) {
#if defined(__x86_64__)
  if (active_isa == kAvx512) {
    return avx512::pass_int8<kRowsOfOnePanel, kCount>(xq, xq_stride, x_scales, scale_stride, panels, rows, scales, outs);
  }
  if (active_isa == kAvx2) {
    return avx2::pass_int8<kRowsOfOnePanel, kCount>(xq, xq_stride, x_scales, scale_stride, panels, rows, scales, outs);
  }
#endif
  plain::pass_int8<kRowsOfOnePanel, kCount>(xq, xq_stride, x_scales, scale_stride, panels, rows, scales, outs);
}

void attend_on_isa(const float* q, const float* keys, const float* values, int64_t positions, int64_t head_dim,
                   float scale, float* scores, float* out) {
#if defined(__x86_64__)
  if (active_isa == kAvx512) return avx512::attend(q, keys, values, positions, head_dim, scale, scores, out);
  if (active_isa == kAvx2) return avx2::attend(q, keys, values, positions, head_dim, scale, scores, out);
#endif
  plain::attend(q, keys, values, positions, head_dim, scale, scores, out);
}

// f(std::integral_constant<int, count>) for count in [1, kStreams]: the passes take their count as a template argument.
template <typename F>
void with_count(int64_t count, F&& f) {
  switch (count) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    default: return f(std::integral_constant<int, 8>{});
  }
}

// ---------------------------------------------------------------------------------------------------
// Weights in panels, fp32 or int8 with per-column scales: everything a product with them needs. Outputs are
// whole panels of 16 values (callers pad them).

// Rows of x as int16, for the products with int8 panels: each block of 2 * kBlockPairs values scaled by its largest
// magnitude onto [-32767, 32767] (a relative error of at most 2^-16 of that magnitude per value), each row padded
// to an even length with a 0 (the partner of an odd last row).
struct Quantized {
  std::vector<int16_t> values;
  std::vector<float> scales;
  int64_t value_stride = 0, scale_stride = 0;
};

Quantized quantize_rows(const float* x, int64_t x_stride, int64_t count, int64_t rows) {
  constexpr int64_t kBlockRows = 2 * kBlockPairs;
  Quantized q;
  q.value_stride = rows + rows % 2;
  q.scale_stride = (rows + kBlockRows - 1) / kBlockRows;
  q.values.assign(count * q.value_stride, 0);
  q.scales.assign(count * q.scale_stride, 0.0f);
  for (int64_t n = 0; n < count; ++n) {
    for (int64_t block = 0; block < q.scale_stride; ++block) {
      const float* v = x + n * x_stride + block * kBlockRows;
      const int64_t length = std::min(kBlockRows, rows - block * kBlockRows);
      float largest = 0.0f;
      for (int64_t i = 0; i < length; ++i) largest = std::max(largest, std::abs(v[i]));
      if (largest == 0.0f) continue;  // zeros, scale 0
      const float inverse = 32767.0f / largest;
      int16_t* out = q.values.data() + n * q.value_stride + block * kBlockRows;
      for (int64_t i = 0; i < length; ++i) out[i] = static_cast<int16_t>(std::nearbyint(v[i] * inverse));
      q.scales[n * q.scale_stride + block] = largest / 32767.0f;
    }
  }
  return q;
}

// Rows of x as a product with some panels reads them: row n at x + n * stride, and for int8 panels also quantized
// (once per call, not once per panel).
struct Inputs {
  const float* x;
  int64_t stride;
  Quantized q;  // empty for fp32 panels
};

struct Panels {
  const void* data = nullptr;
  const float* scale = nullptr;  // null for fp32
  bool int8 = false;
  int64_t rows = 0;
  // fp32 weights read once per decode step of a model larger than the last-level cache (see Decoder): measured
  // here, a step of the 63M-parameter peer model (84 MB a step, 32 MB of L3) took 25% less time with the hint.
  // Not for int8 (no difference measured), nor where the weights are read again soon (batches: dot_rows).
  bool non_temporal = false;

  // How many panels (or rows of x) a pass takes at once.
  int64_t streams() const { return int8 ? kInt8Streams : kFp32Streams; }

  // `count` rows of x, `stride` apart, as the products with these panels read them.
  Inputs inputs(const float* x, int64_t stride, int64_t count) const {
    return {x, stride, int8 ? quantize_rows(x, stride, count, rows) : Quantized{}};
  }

  // outs[k][0:16] += (row `row` of in) @ (panel ids[k]) for k < count <= streams(): one row, several panels, one pass.
  void dot(const Inputs& in, int64_t row, const int64_t* ids, int64_t count, float* const* outs) const {
    run<false>(in, row, ids, count, outs);
  }

  // outs[n][0:16] += (row first + n of in) @ (panel id) for n < count <= streams(): several rows, one panel.
  void dot_rows(const Inputs& in, int64_t first, int64_t id, int64_t count, float* const* outs) const {
    run<true>(in, first, &id, count, outs);
  }

 private:
  template <bool kRowsOfOnePanel>
  void run(const Inputs& in, int64_t row, const int64_t* ids, int64_t count, float* const* outs) const {
    if (int8) return run_int8<kRowsOfOnePanel>(in.q, row, ids, count, outs);
    const float* panels[kStreams];
    for (int64_t k = 0; k < (kRowsOfOnePanel ? 1 : count); ++k) panels[k] = static_cast<const float*>(data) + ids[k] * rows * kPanel;
    const float* const no_scales[kStreams] = {};
    with_count(count, [&](auto n) {
      pass_on_isa<kRowsOfOnePanel, n.value>(in.x + row * in.stride, in.stride, panels, rows, no_scales, outs,
                                            non_temporal && !kRowsOfOnePanel);
    });
  }

  template <bool kRowsOfOnePanel>
  void run_int8(const Quantized& q, int64_t row, const int64_t* ids, int64_t count, float* const* outs) const {
    const int8_t* panels[kStreams];
    const float* scales[kStreams];
    for (int64_t k = 0; k < (kRowsOfOnePanel ? 1 : count); ++k) {
      panels[k] = static_cast<const int8_t*>(data) + ids[k] * rows * kPanel;
      scales[k] = scale + ids[k] * kPanel;
    }
    const int16_t* xq = q.values.data() + row * q.value_stride;
    const float* x_scales = q.scales.data() + row * q.scale_stride;
    with_count(count, [&](auto n) {
      pass_int8_on_isa<kRowsOfOnePanel, n.value>(xq, q.value_stride, x_scales, q.scale_stride, panels, rows, scales, outs);
    });
  }
};

// Set while a Decoder step whose weights outgrow the last-level cache runs on this thread: the Panels made on it
// take the non-temporal hint (their threads see it through the Panels, not through this variable).
thread_local bool t_weights_outgrow_cache = false;

Panels panels_of(const at::Tensor& panels, const std::optional<at::Tensor>& scale, const char* name) {
  TORCH_CHECK(panels.device().is_cpu() && panels.is_contiguous() && panels.dim() >= 3 && panels.size(-1) == kPanel, name,
              ": expected contiguous CPU panels [..., rows, 16]");
  const bool int8 = panels.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || panels.scalar_type() == at::kFloat, name, ": panels must be float32 or int8");
  TORCH_CHECK(int8 == scale.has_value(), name, ": int8 panels need per-column scales, float32 panels none");
  if (scale) {
    TORCH_CHECK(scale->is_contiguous() && scale->scalar_type() == at::kFloat, name, ": scales must be contiguous float32");
    TORCH_CHECK(scale->numel() * panels.size(-2) == panels.numel(), name, ": one scale per column");
  }
  return Panels{panels.data_ptr(), scale ? scale->data_ptr<float>() : nullptr, int8, panels.size(-2),
                t_weights_outgrow_cache && !int8};
}

// Items per thread at least; an item of no weights (a token routed to no expert) counts as one weight, never a
// division by zero.
int64_t grain(int64_t weights_per_item) {
  return std::max<int64_t>(1, kMinWeightsPerThread / std::max<int64_t>(1, weights_per_item));
}

int64_t panels_for(int64_t columns) { return (columns + kPanel - 1) / kPanel; }

// out[n][0:16 n_panels] += x[n][0:rows] @ W for n < count (out rows out_stride apart, whole panels), W's panels
// split over threads: one row reads streams() panels in each pass; several rows share each panel's pass.
void matmul_add(const float* x, int64_t count, const Panels& w, int64_t n_panels, float* out, int64_t out_stride) {
  const Inputs in = w.inputs(x, w.rows, count);
  const int64_t streams = w.streams(), per_item = count == 1 ? streams : 1;  // panels per work item
  at::parallel_for(0, (n_panels + per_item - 1) / per_item, grain(per_item * count * w.rows * kPanel),
                   [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t first = item * per_item, panels = std::min(per_item, n_panels - first);
      int64_t ids[kStreams];
      float* outs[kStreams];
      if (count == 1) {
        for (int64_t k = 0; k < panels; ++k) ids[k] = first + k, outs[k] = out + (first + k) * kPanel;
        w.dot(in, 0, ids, panels, outs);
        continue;
      }
      for (int64_t i = 0; i < count; i += streams) {  // the panel stays in cache for the later rows
        const int64_t block = std::min(streams, count - i);
        for (int64_t n = 0; n < block; ++n) outs[n] = out + (i + n) * out_stride + first * kPanel;
        w.dot_rows(in, i, first, block, outs);
      }
    }
  });
}

// out[0:16 n_panels] += x[0:rows] @ W for one row x.
void matvec_add(const float* x, const Panels& w, int64_t n_panels, float* out) { matmul_add(x, 1, w, n_panels, out, 0); }

// A [1, D] tensor like x holding the first D values of a padded row.
at::Tensor row_of(const std::vector<float>& values, const at::Tensor& x) {
  at::Tensor out = at::empty_like(x);
  std::copy_n(values.begin(), out.numel(), out.data_ptr<float>());
  return out;
}

// n values (or zeros) followed by zeros up to whole panels: the kernels write whole panels.
std::vector<float> padded(const float* values, int64_t n) {
  std::vector<float> out(panels_for(n) * kPanel, 0.0f);
  if (values) std::copy_n(values, n, out.begin());
  return out;
}

at::Tensor checked_rows(const at::Tensor& x, int64_t width, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == width &&
                  x.is_contiguous(),
              name, ": expected contiguous float32 [N, ", width, "]");
  return x;
}

const float* optional_data(const std::optional<at::Tensor>& t, int64_t numel, const char* name) {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == numel, name,
              ": expected contiguous float32 of ", numel, " values");
  return t->data_ptr<float>();
}

// out = x * rsqrt(mean(x^2) + eps) * weight (RMSNorm, as F.rms_norm in fp32).
std::vector<float> rms_norm(const float* x, const at::Tensor& weight, int64_t n, double eps) {
  const float* w = optional_data(weight, n, "norm weight");
  float squares = 0.0f;
  for (int64_t i = 0; i < n; ++i) squares += x[i] * x[i];
  const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(n) + static_cast<float>(eps));
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inverse * w[i];
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Experts: the selected experts of one token in two passes over their weights, gate and up projections
// with silu(gate) * up * routing weight, then the down projections summed into out.
// gate_up panels [E, 2 * FP, D, 16] (FP gate panels, then FP up panels), down [E, DP, F, 16].

struct ExpertWeights {
  Panels gate_up, down;
  int64_t n_experts, hidden_panels, out_panels;
};

ExpertWeights experts_of(const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_scale, const at::Tensor& down,
                         const std::optional<at::Tensor>& down_scale) {
  TORCH_CHECK(gate_up.dim() == 4 && down.dim() == 4 && gate_up.size(0) == down.size(0) && gate_up.size(1) % 2 == 0,
              "experts: expected [E, panels, rows, 16] weights");
  ExpertWeights w{panels_of(gate_up, gate_up_scale, "experts gate_up"), panels_of(down, down_scale, "experts down"),
                  gate_up.size(0), gate_up.size(1) / 2, down.size(1)};
  TORCH_CHECK(w.hidden_panels * kPanel >= w.down.rows && w.out_panels * kPanel >= w.gate_up.rows,
              "experts: weight shapes disagree");
  return w;
}

// out (whole panels) += sum over the token's experts j < used of weights[j] * expert ids[j](x): gate and up panels
// pass together (streams() / 2 of each per work item), then each group of streams() output panels through every
// expert.
void run_experts(const float* x, const ExpertWeights& w, const int64_t* ids, const float* weights, int64_t used, float* out) {
  for (int64_t j = 0; j < used; ++j) TORCH_CHECK(0 <= ids[j] && ids[j] < w.n_experts, "experts: expert id out of range");
  if (used == 0) return;  // a token routed to no expert (ReLU, null experts) adds nothing
  const int64_t pair_streams = w.gate_up.streams() / 2, out_streams = w.down.streams();
  const int64_t dim = w.gate_up.rows, hidden = w.down.rows, stride = w.hidden_panels * kPanel;
  const int64_t pair_groups = (w.hidden_panels + pair_streams - 1) / pair_streams;
  const int64_t out_groups = (w.out_panels + out_streams - 1) / out_streams;
  std::vector<float> hidden_values(used * stride);
  float* h_data = hidden_values.data();
  const Inputs in = w.gate_up.inputs(x, dim, 1);
  at::parallel_for(0, used * pair_groups, grain(2 * pair_streams * dim * kPanel), [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t j = item / pair_groups, first = item % pair_groups * pair_streams;
      const int64_t pairs = std::min(pair_streams, w.hidden_panels - first), base = ids[j] * 2 * w.hidden_panels + first;
      float gate[kStreams / 2][kPanel] = {}, up[kStreams / 2][kPanel] = {};
      int64_t panel_ids[kStreams];
      float* outs[kStreams];
      for (int64_t q = 0; q < pairs; ++q) {
        panel_ids[q] = base + q, outs[q] = gate[q];
        panel_ids[pairs + q] = base + w.hidden_panels + q, outs[pairs + q] = up[q];
      }
      w.gate_up.dot(in, 0, panel_ids, 2 * pairs, outs);
      for (int64_t q = 0; q < pairs; ++q) {
        float* h = h_data + j * stride + (first + q) * kPanel;
        for (int64_t c = 0; c < kPanel; ++c) h[c] = gate[q][c] / (1.0f + std::exp(-gate[q][c])) * up[q][c] * weights[j];
      }
    }
  });
  const Inputs hidden_in = w.down.inputs(h_data, stride, used);
  at::parallel_for(0, out_groups, grain(used * out_streams * hidden * kPanel), [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * out_streams, panels = std::min(out_streams, w.out_panels - first);
      int64_t panel_ids[kStreams];
      float* outs[kStreams];
      for (int64_t k = 0; k < panels; ++k) outs[k] = out + (first + k) * kPanel;
      for (int64_t j = 0; j < used; ++j) {
        for (int64_t k = 0; k < panels; ++k) panel_ids[k] = ids[j] * w.out_panels + first + k;
        w.down.dot(hidden_in, j, panel_ids, panels, outs);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// Routing of one token, as dynamoe.model.router: top-k of a softmax (threshold <= 0), or the smallest top set
// whose probability mass reaches the threshold (top-p, with the dynamic router's per-token temperature, or on
// logits standardised with a gain: DTop-p), or as many top experts as a need score asks for (the need router).

struct Router {
  int64_t slots;  // top_k, or k_max for a threshold router
  int64_t k_min;
  double threshold;  // <= 0: static top-k
  bool renormalize, static_weights;
  const float* temperature_weight;  // null: temperature 1 (top-k, top-p)
  float temperature_bias;
  double temperature_input_scale, temperature_min, temperature_max, temperature_scale;
  const float* logit_norm_gain;  // null: logits as they are; else standardised over the experts, times the gain
  // null: no need head. Else its score h.w + bias, standardised by the running moments (mean, variance) times the
  // spread, less the controller's price, asks for experts: slot j runs when j < k_min or the ask exceeds j + 1/2.
  const float* need_weight;
  const float *need_bias, *need_moments, *k_penalty;
  float need_spread;
};

// F.layer_norm over one row without an affine part (eps 1e-5, biased variance), times the gain.
void standardize(std::vector<float>& v, float gain) {
  const int64_t n = static_cast<int64_t>(v.size());
  float mean = 0.0f, variance = 0.0f;
  for (float value : v) mean += value;
  mean /= static_cast<float>(n);
  for (float value : v) variance += (value - mean) * (value - mean);
  const float inverse = 1.0f / std::sqrt(variance / static_cast<float>(n) + 1e-5f);
  for (float& value : v) value = (value - mean) * inverse * gain;
}

// Fills ids[0:slots], weights[0:slots]; returns k.
int64_t route(const Router& r, const float* h, int64_t dim, std::vector<float> logits, int64_t* ids, float* weights) {
  const int64_t n_experts = static_cast<int64_t>(logits.size());
  if (r.temperature_weight) {  // softplus(bias + scale * h.w) + min, clamped at max, times the dial's scale
    float dot = 0.0f;
    for (int64_t i = 0; i < dim; ++i) dot += h[i] * r.temperature_weight[i];
    const float raw = r.temperature_bias + static_cast<float>(r.temperature_input_scale) * dot;
    const float softplus = raw > 20.0f ? raw : std::log1p(std::exp(raw));
    float temperature = std::min(softplus + static_cast<float>(r.temperature_min), static_cast<float>(r.temperature_max));
    if (r.temperature_scale != 1.0) temperature *= static_cast<float>(r.temperature_scale);
    for (float& logit : logits) logit /= temperature;
  }
  if (r.logit_norm_gain) standardize(logits, *r.logit_norm_gain);
  softmax(logits.data(), n_experts);
  std::vector<int64_t> order(n_experts);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + r.slots, order.end(),
                    [&](int64_t a, int64_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  float total = 0.0f;
  for (int64_t j = 0; j < r.slots; ++j) total += logits[order[j]];
  int64_t k = r.slots;
  if (r.need_weight) {  // slot j runs when the extra experts asked for exceed j + 1/2: a prefix, as the bars rise
    float need = *r.need_bias;
    for (int64_t i = 0; i < dim; ++i) need += h[i] * r.need_weight[i];
    // As NeedRouter.select: need_spread * (need - mean) / std - price, as scale * need - offset.
    const float scale = r.need_spread * (1.0f / std::sqrt(std::max(r.need_moments[1], 1e-12f)));
    const float offset = *r.k_penalty + r.need_moments[0] * scale;
    const float extra = need * scale - offset;
    for (k = 0; k < r.slots && (k < r.k_min || extra > static_cast<float>(k) + 0.5f); ++k) {}
  } else if (r.threshold > 0) {  // an expert is kept while the mass before it is below the threshold; the first k_min always
    double before = 0.0;  // torch's cumsum adds in double on CPU
    for (k = 0; k < r.slots && (k < r.k_min || static_cast<float>(before) < static_cast<float>(r.threshold)); ++k) {
      before += logits[order[k]];
    }
  }
  float kept = 0.0f;
  for (int64_t j = 0; j < k; ++j) kept += logits[order[j]];
  const bool static_k = r.threshold <= 0 && !r.need_weight;
  const float divisor = static_k ? (r.renormalize ? total : 1.0f)
                                 : (!r.static_weights ? kept : (r.renormalize ? total : 1.0f));
  for (int64_t j = 0; j < r.slots; ++j) {
    ids[j] = order[j];
    weights[j] = j < k ? logits[order[j]] / divisor : 0.0f;
  }
  return k;
}

// ---------------------------------------------------------------------------------------------------
// The ops.

// out[N, out_features] = x[N, D] @ W (+ bias) (+ residual), W in panels [ceil(out_features / 16), D, 16]; with a
// norm weight, each row of x goes through RMSNorm first (the final norm and the output head in one call).
at::Tensor linear(const at::Tensor& x, const at::Tensor& panels, const std::optional<at::Tensor>& scale,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual, int64_t out_features,
                  const std::optional<at::Tensor>& norm_weight, double eps) {
  TORCH_CHECK(panels.dim() == 3 && panels.size(0) * kPanel >= out_features, "linear: panels do not cover the outputs");
  const Panels weight = panels_of(panels, scale, "linear");
  checked_rows(x, weight.rows, "linear: x");
  const int64_t n = x.size(0), n_panels = panels_for(out_features), width = n_panels * kPanel;
  std::vector<float> normed;
  if (norm_weight) {
    for (int64_t i = 0; i < n; ++i) {
      const std::vector<float> row = rms_norm(x.data_ptr<float>() + i * weight.rows, *norm_weight, weight.rows, eps);
      normed.insert(normed.end(), row.begin(), row.end());
    }
  }
  const float* rows = norm_weight ? normed.data() : x.data_ptr<float>();
  at::Tensor out = at::zeros({n, width}, x.options());  // whole panels; the padding is cut off below
  at::Tensor columns = out.narrow(1, 0, out_features);
  if (residual) columns.copy_(checked_rows(*residual, out_features, "linear: residual"));
  if (bias) columns.add_(*bias);
  matmul_add(rows, n, weight, n_panels, out.data_ptr<float>(), width);
  return width == out_features ? out : columns.contiguous();
}

// Sum over each token's first k experts of routing weight * expert(x).
at::Tensor moe(const at::Tensor& x, const at::Tensor& experts, const at::Tensor& weights, const at::Tensor& k,
               const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_scale, const at::Tensor& down,
               const std::optional<at::Tensor>& down_scale) {
  const ExpertWeights w = experts_of(gate_up, gate_up_scale, down, down_scale);
  const int64_t dim = w.gate_up.rows;
  checked_rows(x, dim, "moe: x");
  const int64_t n = x.size(0), slots = experts.size(1);
  const at::Tensor ids = experts.to(at::kLong).contiguous(), counts = k.to(at::kLong).contiguous();
  const at::Tensor routing_weights = weights.to(at::kFloat).contiguous();
  TORCH_CHECK(experts.size(0) == n && routing_weights.sizes() == ids.sizes() && counts.numel() == n,
              "moe: routing shapes disagree");
  at::Tensor out = at::empty({n, dim}, x.options());
  for (int64_t i = 0; i < n; ++i) {
    const int64_t used = counts.data_ptr<int64_t>()[i];
    TORCH_CHECK(0 <= used && used <= slots, "moe: k outside [0, slots]");
    std::vector<float> sum = padded(nullptr, dim);
    run_experts(x.data_ptr<float>() + i * dim, w, ids.data_ptr<int64_t>() + i * slots,
                routing_weights.data_ptr<float>() + i * slots, used, sum.data());
    std::copy_n(sum.begin(), dim, out.data_ptr<float>() + i * dim);
  }
  return out;
}

// x [1, D] -> x + wo(attention(rms_norm(x))): one token at position `pos` of a batch of one, its key and value
// written into the cache [1, Hkv, S, d]; RoPE from the tables' row at position (half-split layout, signed sin).
at::Tensor attend_token(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& wqkv,
                        const std::optional<at::Tensor>& wqkv_scale, const std::optional<at::Tensor>& qkv_bias,
                        const at::Tensor& wo, const std::optional<at::Tensor>& wo_scale,
                        const std::optional<at::Tensor>& wo_bias, at::Tensor k_cache, at::Tensor v_cache, int64_t pos,
                        const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads, std::optional<double> clip) {
  const Panels qkv_weights = panels_of(wqkv, wqkv_scale, "attention wqkv"), out_weights = panels_of(wo, wo_scale, "attention wo");
  const int64_t dim = qkv_weights.rows;
  checked_rows(x, dim, "attention: x");
  TORCH_CHECK(x.size(0) == 1 && k_cache.dim() == 4 && k_cache.size(0) == 1 && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "attention: expected one token and float32 caches [1, kv_heads, S, head_dim]");
  const int64_t kv_heads = k_cache.size(1), length = k_cache.size(2), head_dim = k_cache.size(3);
  const int64_t q_width = n_heads * head_dim, kv_width = kv_heads * head_dim, width = q_width + 2 * kv_width;
  TORCH_CHECK(n_heads % kv_heads == 0 && out_weights.rows == q_width && head_dim % 2 == 0, "attention: head shapes disagree");
  TORCH_CHECK(0 <= pos && pos < length && pos < cos.size(0) && cos.size(1) == head_dim && cos.sizes() == sin.sizes() &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat,
              "attention: position outside the cache or the RoPE tables");

  std::vector<float> h = rms_norm(x.data_ptr<float>(), norm_weight, dim, eps);
  std::vector<float> qkv = padded(optional_data(qkv_bias, width, "attention qkv bias"), width);
  matvec_add(h.data(), qkv_weights, panels_for(width), qkv.data());
  if (clip) {
    for (float& v : qkv) v = std::clamp(v, static_cast<float>(-*clip), static_cast<float>(*clip));
  }
  // RoPE on the query and key heads: v * cos + roll(v, half) * signed sin.
  const float* c = cos.data_ptr<float>() + pos * head_dim;
  const float* s = sin.data_ptr<float>() + pos * head_dim;
  const int64_t half = head_dim / 2;
  for (int64_t head = 0; head < n_heads + kv_heads; ++head) {
    float* v = qkv.data() + head * head_dim;
    std::vector<float> rotated(head_dim);
    for (int64_t i = 0; i < head_dim; ++i) rotated[i] = v[i] * c[i] + v[(i + half) % head_dim] * s[i];
    std::copy(rotated.begin(), rotated.end(), v);
  }
  float* keys = k_cache.data_ptr<float>();
  float* values = v_cache.data_ptr<float>();
  for (int64_t kv = 0; kv < kv_heads; ++kv) {
    std::copy_n(qkv.data() + q_width + kv * head_dim, head_dim, keys + (kv * length + pos) * head_dim);
    std::copy_n(qkv.data() + q_width + kv_width + kv * head_dim, head_dim, values + (kv * length + pos) * head_dim);
  }
  // Each query head over the cached positions 0..pos of its key-value head (grouped-query: heads share in order).
  std::vector<float> attended(q_width, 0.0f);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  // Heads split over threads only for long contexts: a short cache is in cache, and a head's work costs less than
  // waking a thread (counted in 16-lane steps against kMinWeightsPerThread's weights streamed from memory).
  at::parallel_for(0, n_heads, grain(2 * (pos + 1) * head_dim / kPanel + 1), [&](int64_t begin, int64_t end) {
    std::vector<float> scores(pos + 1);
    for (int64_t head = begin; head < end; ++head) {
      const int64_t kv = head / (n_heads / kv_heads), cached = kv * length * head_dim;
      attend_on_isa(qkv.data() + head * head_dim, keys + cached, values + cached, pos + 1, head_dim, scale, scores.data(),
                    attended.data() + head * head_dim);
    }
  });
  std::vector<float> sum = padded(x.data_ptr<float>(), dim);
  if (const float* b = optional_data(wo_bias, dim, "attention wo bias")) {
    for (int64_t i = 0; i < dim; ++i) sum[i] += b[i];
  }
  matvec_add(attended.data(), out_weights, panels_for(dim), sum.data());
  return row_of(sum, x);
}

// attend_token at a position given as a tensor of one value.
at::Tensor attention_decode(const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& wqkv,
                            const std::optional<at::Tensor>& wqkv_scale, const std::optional<at::Tensor>& qkv_bias,
                            const at::Tensor& wo, const std::optional<at::Tensor>& wo_scale,
                            const std::optional<at::Tensor>& wo_bias, at::Tensor k_cache, at::Tensor v_cache,
                            const at::Tensor& position, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads,
                            std::optional<double> clip) {
  TORCH_CHECK(position.numel() == 1, "attention: one position");
  return attend_token(x, norm_weight, eps, wqkv, wqkv_scale, qkv_bias, wo, wo_scale, wo_bias, std::move(k_cache),
                      std::move(v_cache), position.to(at::kLong).item<int64_t>(), cos, sin, n_heads, clip);
}

// x [1, D] -> (x + experts(rms_norm(x)), expert ids [1, slots], weights [1, slots], k [1]): router and experts.
// The router's state tensors are read at each call (the need head's bias, the moments of its scores and the
// controller's price; DTop-p's threshold, which then replaces `threshold`), the compute dial (threshold,
// temperature_scale) is passed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_decode(
    const at::Tensor& x, const at::Tensor& norm_weight, double eps, const at::Tensor& gate, int64_t n_experts,
    int64_t slots, int64_t k_min, bool renormalize, bool static_weights, const std::optional<at::Tensor>& temperature_weight,
    const std::optional<at::Tensor>& temperature_bias, double temperature_input_scale, double temperature_min,
    double temperature_max, const std::optional<at::Tensor>& logit_norm_gain, const std::optional<at::Tensor>& need_weight,
    const std::optional<at::Tensor>& need_bias, const std::optional<at::Tensor>& need_moments,
    const std::optional<at::Tensor>& k_penalty, double need_spread, const std::optional<at::Tensor>& routing_threshold,
    const at::Tensor& gate_up, const std::optional<at::Tensor>& gate_up_scale, const at::Tensor& down,
    const std::optional<at::Tensor>& down_scale, double threshold, double temperature_scale) {
  const ExpertWeights w = experts_of(gate_up, gate_up_scale, down, down_scale);
  const Panels gate_weights = panels_of(gate, std::nullopt, "router gate");
  const int64_t dim = w.gate_up.rows;
  checked_rows(x, dim, "moe_decode: x");
  TORCH_CHECK(x.size(0) == 1 && gate_weights.rows == dim && n_experts == w.n_experts && 1 <= slots && slots <= n_experts,
              "moe_decode: expected one token, and a router that fits the experts");
  const float* bias = optional_data(temperature_bias, 1, "temperature bias");
  if (const float* state = optional_data(routing_threshold, 1, "routing threshold")) threshold = *state;
  const float* need = optional_data(need_weight, dim, "need weight");
  TORCH_CHECK(!need || (need_bias && need_moments && k_penalty), "moe_decode: a need head needs its bias, moments and price");
  const Router router{slots, k_min, threshold, renormalize, static_weights,
                      optional_data(temperature_weight, dim, "temperature weight"), bias ? *bias : 0.0f,
                      temperature_input_scale, temperature_min, temperature_max, temperature_scale,
                      optional_data(logit_norm_gain, 1, "logit norm gain"), need,
                      optional_data(need_bias, 1, "need bias"), optional_data(need_moments, 2, "need moments"),
                      optional_data(k_penalty, 1, "price"), static_cast<float>(need_spread)};
  std::vector<float> h = rms_norm(x.data_ptr<float>(), norm_weight, dim, eps);
  std::vector<float> logits = padded(nullptr, n_experts);
  matvec_add(h.data(), gate_weights, panels_for(n_experts), logits.data());
  logits.resize(n_experts);
  at::Tensor ids = at::empty({1, slots}, x.options().dtype(at::kLong));
  at::Tensor weights = at::empty({1, slots}, x.options());
  const int64_t k = route(router, h.data(), dim, std::move(logits), ids.data_ptr<int64_t>(), weights.data_ptr<float>());
  std::vector<float> sum = padded(x.data_ptr<float>(), dim);
  run_experts(h.data(), w, ids.data_ptr<int64_t>(), weights.data_ptr<float>(), k, sum.data());
  return {row_of(sum, x), ids, weights, at::full({1}, k, x.options().dtype(at::kLong))};
}

// ---------------------------------------------------------------------------------------------------
// A packed model's whole decode step of one token in one call: its embedding row, each block's attention and
// feed-forward half (the ops above, called here without the dispatcher), the final norm and the head. Python's
// FusedDecoder builds it from the tensors it would pass the ops, once, and checks their freshness before each step.

struct AttentionHalf {
  at::Tensor norm_weight;
  double eps;
  at::Tensor wqkv;
  std::optional<at::Tensor> wqkv_scale, qkv_bias;
  at::Tensor wo;
  std::optional<at::Tensor> wo_scale, wo_bias;
  int64_t n_heads;
  std::optional<double> clip;
};

struct MoeHalf {
  at::Tensor norm_weight;
  double eps;
  at::Tensor gate;
  int64_t n_experts, slots, k_min;
  bool renormalize, static_weights;
  std::optional<at::Tensor> temperature_weight, temperature_bias;
  double temperature_input_scale, temperature_min, temperature_max;
  std::optional<at::Tensor> logit_norm_gain, need_weight, need_bias, need_moments, k_penalty;
  double need_spread;
  std::optional<at::Tensor> routing_threshold;
  at::Tensor gate_up;
  std::optional<at::Tensor> gate_up_scale;
  at::Tensor down;
  std::optional<at::Tensor> down_scale;
};

struct DenseHalf {  // a SwiGLU: gate and up projections (with the norm), silu(gate) * up, the down projection
  at::Tensor norm_weight;
  double eps;
  at::Tensor gate_up;
  std::optional<at::Tensor> gate_up_scale;
  int64_t hidden;
  at::Tensor down;
  std::optional<at::Tensor> down_scale;
  int64_t dim;
};

struct Layer {
  AttentionHalf attention;
  std::optional<MoeHalf> moe;
  std::optional<DenseHalf> dense;
};

constexpr int64_t kSettingsPerMoe = 2;  // moe_decode's compute dial: threshold, temperature scale

class Decoder : public torch::CustomClassHolder {
 public:
  void add_attention(at::Tensor norm_weight, double eps, at::Tensor wqkv, std::optional<at::Tensor> wqkv_scale,
                     std::optional<at::Tensor> qkv_bias, at::Tensor wo, std::optional<at::Tensor> wo_scale,
                     std::optional<at::Tensor> wo_bias, int64_t n_heads, std::optional<double> clip) {
    layers_.push_back({AttentionHalf{std::move(norm_weight), eps, std::move(wqkv), std::move(wqkv_scale), std::move(qkv_bias),
                                     std::move(wo), std::move(wo_scale), std::move(wo_bias), n_heads, clip},
                       std::nullopt, std::nullopt});
  }

  // The last added block's feed-forward half: router and experts (as moe_decode's arguments, but for the settings).
  void add_moe(at::Tensor norm_weight, double eps, at::Tensor gate, int64_t n_experts, int64_t slots, int64_t k_min,
               bool renormalize, bool static_weights, std::optional<at::Tensor> temperature_weight,
               std::optional<at::Tensor> temperature_bias, double temperature_input_scale, double temperature_min,
               double temperature_max, std::optional<at::Tensor> logit_norm_gain, std::optional<at::Tensor> need_weight,
               std::optional<at::Tensor> need_bias, std::optional<at::Tensor> need_moments,
               std::optional<at::Tensor> k_penalty, double need_spread, std::optional<at::Tensor> routing_threshold,
               at::Tensor gate_up, std::optional<at::Tensor> gate_up_scale, at::Tensor down,
               std::optional<at::Tensor> down_scale) {
    TORCH_CHECK(!layers_.empty(), "Decoder: add a block's attention before its feed-forward half");
    layers_.back().moe = MoeHalf{std::move(norm_weight), eps, std::move(gate), n_experts, slots, k_min, renormalize,
                                 static_weights, std::move(temperature_weight), std::move(temperature_bias),
                                 temperature_input_scale, temperature_min, temperature_max, std::move(logit_norm_gain),
                                 std::move(need_weight), std::move(need_bias), std::move(need_moments),
                                 std::move(k_penalty), need_spread, std::move(routing_threshold), std::move(gate_up),
                                 std::move(gate_up_scale), std::move(down), std::move(down_scale)};
  }

  void add_dense(at::Tensor norm_weight, double eps, at::Tensor gate_up, std::optional<at::Tensor> gate_up_scale,
                 int64_t hidden, at::Tensor down, std::optional<at::Tensor> down_scale, int64_t dim) {
    TORCH_CHECK(!layers_.empty(), "Decoder: add a block's attention before its feed-forward half");
    layers_.back().dense = DenseHalf{std::move(norm_weight), eps, std::move(gate_up), std::move(gate_up_scale), hidden,
                                     std::move(down), std::move(down_scale), dim};
  }

  // The embedding table, the output head with the final norm, and the size of the CPU's last-level cache.
  void set_head(at::Tensor embedding, at::Tensor panels, std::optional<at::Tensor> scale, int64_t out_features,
                at::Tensor norm_weight, double eps, int64_t cache_bytes) {
    TORCH_CHECK(embedding.dim() == 2 && embedding.scalar_type() == at::kFloat && embedding.is_contiguous(),
                "Decoder: expected a contiguous float32 embedding table");
    embedding_ = std::move(embedding), head_ = std::move(panels), head_scale_ = std::move(scale);
    head_features_ = out_features, head_norm_ = std::move(norm_weight), head_eps_ = eps;
    outgrows_cache_ = bytes_per_step() > cache_bytes;
  }

  // Whether the weights a step reads outgrow the last-level cache (then they take the non-temporal hint: Panels).
  bool outgrows_cache() const { return outgrows_cache_; }

  // A tensor the step depends on (directly, or as the source its packed copy was made from), with its stamp when
  // the copy was made: its version (in-place writes) and its storage (`.data = ...`), as dynamoe.model.packed.stamp.
  void watch(at::Tensor tensor, int64_t version, int64_t data) { watched_.push_back({std::move(tensor), version, data}); }

  // Whether every watched tensor still has its stamp: the step computes what the modules would.
  bool unchanged() const {
    return std::all_of(watched_.begin(), watched_.end(), [](const Watched& w) {
      return static_cast<int64_t>(w.tensor._version()) == w.version &&
             reinterpret_cast<int64_t>(w.tensor.data_ptr()) == w.data;
    });
  }

  // (logits [1, V], for each MoE block in order: expert ids [1, slots], weights [1, slots], k [1]; and the mean k
  // over them [1, 1], 0 without any) for `token` at `position`, each block's key and value written into its caches
  // (k and v of block i at 2i and 2i + 1), each MoE block at its kSettingsPerMoe settings (moe_decode's last).
  std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> step(
      int64_t token, int64_t position, const at::Tensor& cos, const at::Tensor& sin, const std::vector<at::Tensor>& caches,
      const std::vector<double>& settings) {
    TORCH_CHECK(embedding_.defined() && caches.size() == 2 * layers_.size(), "Decoder: head or caches missing");
    TORCH_CHECK(0 <= token && token < embedding_.size(0), "Decoder: token id outside the vocabulary");
    const bool previous = std::exchange(t_weights_outgrow_cache, outgrows_cache_);
    const auto restore = c10::make_scope_exit([previous] { t_weights_outgrow_cache = previous; });
    at::Tensor x = embedding_.narrow(0, token, 1).clone();
    std::vector<at::Tensor> ids, weights, ks;
    size_t setting = 0;
    int64_t experts = 0;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& layer = layers_[i];
      const AttentionHalf& a = layer.attention;
      Clock::time_point start = Clock::now();
      x = attend_token(x, a.norm_weight, a.eps, a.wqkv, a.wqkv_scale, a.qkv_bias, a.wo, a.wo_scale, a.wo_bias,
                       caches[2 * i], caches[2 * i + 1], position, cos, sin, a.n_heads, a.clip);
      start = lap(kAttention, start);
      if (layer.moe) {
        const MoeHalf& m = *layer.moe;
        TORCH_CHECK(setting + kSettingsPerMoe <= settings.size(), "Decoder: too few routing settings");
        const double* s = settings.data() + setting;
        setting += kSettingsPerMoe;
        auto [y, block_ids, block_weights, k] = moe_decode(
            x, m.norm_weight, m.eps, m.gate, m.n_experts, m.slots, m.k_min, m.renormalize, m.static_weights,
            m.temperature_weight, m.temperature_bias, m.temperature_input_scale, m.temperature_min, m.temperature_max,
            m.logit_norm_gain, m.need_weight, m.need_bias, m.need_moments, m.k_penalty, m.need_spread,
            m.routing_threshold, m.gate_up, m.gate_up_scale, m.down, m.down_scale, s[0], s[1]);
        x = std::move(y);
        experts += k.item<int64_t>();
        ids.push_back(std::move(block_ids)), weights.push_back(std::move(block_weights)), ks.push_back(std::move(k));
      } else {
        TORCH_CHECK(layer.dense.has_value(), "Decoder: block ", i, " has no feed-forward half");
        x = dense_half(*layer.dense, x);
      }
      lap(kFeedForward, start);
    }
    const Clock::time_point start = Clock::now();
    at::Tensor logits = linear(x, head_, head_scale_, std::nullopt, std::nullopt, head_features_, head_norm_, head_eps_);
    lap(kHead, start);
    const float mean_k = ks.empty() ? 0.0f : static_cast<float>(experts) / static_cast<float>(ks.size());
    return {logits, ids, weights, ks, at::full({1, 1}, mean_k, logits.options())};
  }

  // Seconds spent in each part of the steps since the last call: attention halves, feed-forward halves (router and
  // experts), final norm and head. For profiles of a step without a profiler's overhead (benchmarks/peer_llamacpp.py).
  std::vector<double> seconds() {
    std::vector<double> out(seconds_.begin(), seconds_.end());
    seconds_.fill(0.0);
    return out;
  }

 private:
  static at::Tensor dense_half(const DenseHalf& d, const at::Tensor& x) {
    const at::Tensor gate_up = linear(x, d.gate_up, d.gate_up_scale, std::nullopt, std::nullopt, 2 * d.hidden,
                                      d.norm_weight, d.eps);
    at::Tensor h = at::empty({1, d.hidden}, x.options());
    const float* g = gate_up.data_ptr<float>();
    float* out = h.data_ptr<float>();
    for (int64_t i = 0; i < d.hidden; ++i) out[i] = g[i] / (1.0f + std::exp(-g[i])) * g[d.hidden + i];
    return linear(h, d.down, d.down_scale, std::nullopt, x, d.dim, std::nullopt, 0.0);
  }

  using Clock = std::chrono::steady_clock;
  enum Part { kAttention, kFeedForward, kHead };

  // Adds the time since start to a part; now.
  Clock::time_point lap(Part part, Clock::time_point start) {
    const Clock::time_point now = Clock::now();
    seconds_[part] += std::chrono::duration<double>(now - start).count();
    return now;
  }

  // Bytes of weights a step reads at most (every slot of each router used).
  int64_t bytes_per_step() const {
    int64_t bytes = head_.nbytes();
    for (const Layer& layer : layers_) {
      bytes += layer.attention.wqkv.nbytes() + layer.attention.wo.nbytes();
      if (layer.moe) {
        const MoeHalf& m = *layer.moe;
        bytes += m.gate.nbytes() + (m.gate_up.nbytes() + m.down.nbytes()) / m.n_experts * m.slots;
      }
      if (layer.dense) bytes += layer.dense->gate_up.nbytes() + layer.dense->down.nbytes();
    }
    return bytes;
  }

  struct Watched {
    at::Tensor tensor;
    int64_t version, data;
  };

  std::vector<Watched> watched_;
  bool outgrows_cache_ = false;
  std::array<double, 3> seconds_{};
  std::vector<Layer> layers_;
  at::Tensor embedding_, head_, head_norm_;
  std::optional<at::Tensor> head_scale_;
  int64_t head_features_ = 0;
  double head_eps_ = 0.0;
};

// An uninitialized tensor on memory aligned to 2 MiB and advised to use huge pages: streaming weights through
// 4 KiB pages costs a translation per page (measured here: the experts read 22 GB/s on 4 KiB pages, 25-30 on 2 MiB).
at::Tensor empty_on_huge_pages(at::IntArrayRef size, at::ScalarType dtype) {
  constexpr size_t kHugePage = size_t{2} << 20;
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(size)) * c10::elementSize(dtype);
  const size_t rounded = std::max<size_t>(1, (bytes + kHugePage - 1) / kHugePage) * kHugePage;
  void* data = std::aligned_alloc(kHugePage, rounded);
  TORCH_CHECK(data != nullptr, "empty_on_huge_pages: out of memory");
#if defined(__linux__)
  madvise(data, rounded, MADV_HUGEPAGE);  // a request: without transparent huge pages it changes nothing
#endif
  return at::from_blob(data, size, [](void* p) { std::free(p); }, at::TensorOptions().dtype(dtype));
}

// Cap the instruction set (0 plain C++, 1 AVX2+FMA, 2 AVX-512; negative: the best this CPU has); returns the level in use.
int64_t select_isa(int64_t cap) {
  const Isa best = supported_isa();
  active_isa = cap < 0 ? best : static_cast<Isa>(std::min<int64_t>(cap, best));
  return active_isa;
}

}  // namespace

TORCH_LIBRARY(dynamoe, m) {
  m.class_<Decoder>("Decoder")
      .def(torch::init<>())
      .def("add_attention", &Decoder::add_attention)
      .def("add_moe", &Decoder::add_moe)
      .def("add_dense", &Decoder::add_dense)
      .def("set_head", &Decoder::set_head)
      .def("step", &Decoder::step)
      .def("seconds", &Decoder::seconds)
      .def("outgrows_cache", &Decoder::outgrows_cache)
      .def("watch", &Decoder::watch)
      .def("unchanged", &Decoder::unchanged);
  m.def("select_isa(int cap) -> int", &select_isa);
  m.def("empty_on_huge_pages(int[] size, ScalarType dtype) -> Tensor", &empty_on_huge_pages);
  m.def("linear(Tensor x, Tensor panels, Tensor? scale, Tensor? bias, Tensor? residual, int out_features, "
        "Tensor? norm_weight=None, float eps=0.0) -> Tensor");
  m.def("moe(Tensor x, Tensor experts, Tensor weights, Tensor k, Tensor gate_up, Tensor? gate_up_scale, Tensor down, "
        "Tensor? down_scale) -> Tensor");
  m.def("attention_decode(Tensor x, Tensor norm_weight, float eps, Tensor wqkv, Tensor? wqkv_scale, Tensor? qkv_bias, "
        "Tensor wo, Tensor? wo_scale, Tensor? wo_bias, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor position, Tensor cos, "
        "Tensor sin, int n_heads, float? clip) -> Tensor");
  m.def("moe_decode(Tensor x, Tensor norm_weight, float eps, Tensor gate, int n_experts, int slots, int k_min, "
        "bool renormalize, bool static_weights, Tensor? temperature_weight, Tensor? temperature_bias, "
        "float temperature_input_scale, float temperature_min, float temperature_max, Tensor? logit_norm_gain, "
        "Tensor? need_weight, Tensor? need_bias, Tensor? need_moments, Tensor? k_penalty, float need_spread, "
        "Tensor? routing_threshold, Tensor gate_up, Tensor? gate_up_scale, Tensor down, Tensor? down_scale, "
        "float threshold, float temperature_scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dynamoe, CPU, m) {
  m.impl("linear", &linear);
  m.impl("moe", &moe);
  m.impl("attention_decode", &attention_decode);
  m.impl("moe_decode", &moe_decode);
}
