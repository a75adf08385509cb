// Drop-max pooling (MIRST-DM) on CPU: forward (top-2 per window) and backward (scatter-add to the indices); the same
// forward with the plain maximum is robust_ops::max_pool2d (Select::kMax), bitwise equal to ATen's max_pool2d and
// several times faster than ATen's NCHW kernel (docs/ops/max_pool2d.md).
//
// Semantics are those of robust_ops.reference.drop_max_pool2d: per window (windows as F.max_pool2d), remove the
// first occurrence (row-major window order) of the maximum and select the first occurrence of the largest remaining
// value; a single valid element selects itself; a window holding NaN selects its first NaN.
//
// The top-2 update is written branch-free over a contiguous run of independent windows (along output width for
// NCHW, along channels for channels_last) so the compiler vectorizes it. Window slots are tracked as int32 numbers
// in row-major window order and turned into flat H*W indices through a per-window offset table at the end. Windows
// that touch the padding (NCHW edges) or contain NaN take a scalar path with the same rule.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "drop_max_pool2d.h"

namespace robust_ops {
namespace {

// Window taps [lo, hi) of one dimension that fall inside the input, for a window starting at `start`.
inline void valid_taps(int64_t start, int64_t k, int64_t d, int64_t size, int64_t& lo, int64_t& hi) {
  lo = start < 0 ? (-start + d - 1) / d : 0;
  const int64_t last = size - 1 - start;
  hi = last < 0 ? 0 : std::min(k, last / d + 1);
  if (lo > hi) lo = hi;
}

// At most this many taps of a window lie inside the input (valid_taps keeps at most min(k, size) of k): the size of
// the tap buffers, which k_h * k_w would make huge for a large window over mostly padding.
inline int64_t max_window_taps(const Geometry& g) { return std::min(g.kh, g.H) * std::min(g.kw, g.W); }

// What a window selects: the drop-max element (WindowTop2) or the plain maximum (WindowMax).
enum class Select { kDropMax, kMax };

// The op a rule serves, for its error messages.
constexpr const char* op_name(Select rule) { return rule == Select::kMax ? kMaxPoolOp : kDropMaxOp; }

// ATen's max_pool2d rule, fed in row-major window order: the first occurrence of the maximum; a NaN is taken whenever
// seen, so the LAST NaN wins (ATen's `val > maxval || isnan(val)`); a window of -inf selects its first element.
template <typename acc_t>
struct WindowMax {
  acc_t m1 = 0;
  int64_t i1 = -1;

  inline void push(acc_t v, int64_t pos) {
    if (i1 < 0 || v > m1 || v != v) {
      m1 = v;
      i1 = pos;
    }
  }

  inline int64_t selected() const { return i1; }
};

template <Select rule, typename acc_t>
using WindowRule = std::conditional_t<rule == Select::kMax, WindowMax<acc_t>, WindowTop2<acc_t>>;

// Scalar selection for one window: base points at the (n, c) plane origin, sH/sW are element strides.
// Returns the flat H*W index of the selected element, or -1 for a window without any input element (possible
// only with dilation jumping over a tiny input; its output is -inf, like max_pool2d's).
template <Select rule, typename scalar_t>
int64_t select_window(const scalar_t* base, int64_t sH, int64_t sW, const Geometry& g, int64_t oh, int64_t ow) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
  int64_t ki0, ki1, kj0, kj1;
  valid_taps(hs, g.kh, g.dh, g.H, ki0, ki1);
  valid_taps(ws, g.kw, g.dw, g.W, kj0, kj1);
  WindowRule<rule, acc_t> window;
  for (int64_t ki = ki0; ki < ki1; ++ki) {
    const int64_t h = hs + ki * g.dh;
    for (int64_t kj = kj0; kj < kj1; ++kj) {
      const int64_t w = ws + kj * g.dw;
      window.push(static_cast<acc_t>(base[h * sH + w * sW]), h * g.W + w);
    }
  }
  return window.selected();
}

// Top-2 selection for `len` windows at once (lanes). Lane j's window holds the elements base[tap_off[t] + j * step]
// for the taps t = 0..ntaps-1, given in row-major window order; tap_pos[t] is the tap's flat H*W position relative
// to the window origin. Writes per lane the selected value out[j] (the first occurrence of the largest value left
// after removing the first occurrence of the maximum, or the single element) and its flat index
// idx[j] = origin + j * origin_step + tap_pos[selected]. Returns whether any element was NaN (the caller redoes
// those windows with select_window). The selected taps are tracked by number and their positions read from the int64
// table: positions carried as acc_t were rounded once they passed 2^24 in float (window extent (kh-1)*dh*W beyond it),
// which moved the indices silently. Select::kMax keeps only the first-order state: the first occurrence of the maximum.
template <Select rule, typename acc_t, typename scalar_t>
bool window_top2_scalar(const scalar_t* __restrict__ base, int64_t step, int64_t first, int64_t len,
                        const int64_t* tap_off, const int64_t* tap_pos, int64_t ntaps, scalar_t* __restrict__ out,
                        int64_t* __restrict__ idx, int64_t origin, int64_t origin_step) {
  bool nan_seen = false;
  for (int64_t j = first; j < len; ++j) {
    acc_t a1 = 0, a2 = 0;
    int64_t t1 = -1, t2 = -1;
    for (int64_t t = 0; t < ntaps; ++t) {
      const acc_t v = static_cast<acc_t>(base[tap_off[t] + j * step]);
      if constexpr (rule == Select::kMax) {
        if (t1 < 0 || v > a1) {
          a1 = v;
          t1 = t;
        }
      } else if (t1 < 0 || v > a1) {
        a2 = a1;
        t2 = t1;
        a1 = v;
        t1 = t;
      } else if (t2 < 0 || v > a2) {
        a2 = v;
        t2 = t;
      }
      nan_seen |= std::isnan(v);
    }
    out[j] = static_cast<scalar_t>(t2 >= 0 ? a2 : a1);
    idx[j] = origin + j * origin_step + tap_pos[t2 >= 0 ? t2 : t1];
  }
  return nan_seen;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define ROBUST_OPS_HAVE_AVX2_PATH 1
// float32 with AVX2, chosen at run time: the extension is compiled for the x86-64 baseline, whose SSE2 lacks the
// blend instructions this select-heavy loop needs (GCC leaves the plain loop scalar). 8 lanes per vector; a window's
// state stays in registers across its taps, and kUnroll vectors run side by side because one vector's taps form a
// dependency chain. float16 and bfloat16 (T) run the same float32 steps: widened on load (exact: every float16 and
// bfloat16 value is a float32 value, order and signed zeros kept) and narrowed on store (exact: the value stored is
// one of the window's inputs; windows holding NaN are redone by select_window, which copies the input's bits).
// float16 needs F16C (checked at run time besides AVX2); bfloat16 widens by a 16-bit shift. float64 runs the same
// steps 4 lanes a vector (__m256d; 8 with AVX-512), its positions carried as doubles, through the overloads below.
#define ROBUST_OPS_AVX2 __attribute__((target("avx2,f16c"), always_inline)) inline

// The element types the vector paths run.
template <typename T>
constexpr bool kVectorType = std::is_same_v<T, float> || std::is_same_v<T, at::Half> ||
                              std::is_same_v<T, at::BFloat16> || std::is_same_v<T, double>;

template <typename T>
inline const uint16_t* bits16(const T* p) {
  return reinterpret_cast<const uint16_t*>(p);
}

struct Top2State {
  __m256 a1, a2, t1, t2;
  __m256 sum;  // of the window's values: NaN when one is NaN (or +inf and -inf both: the scalar path then redoes it)
};

struct Top2StateD {
  __m256d a1, a2, t1, t2;
  __m256d sum;  // as Top2State's
};

// The lanes of one AVX2 vector of T, and the state of a window's top 2 in them.
template <typename T>
constexpr int kLanes8 = std::is_same_v<T, double> ? 4 : 8;
template <typename T>
using Top2StateOf = std::conditional_t<std::is_same_v<T, double>, Top2StateD, Top2State>;

// The vector operations of the steps, for float32 and float64 lanes alike (masks are vectors of all-ones lanes).
ROBUST_OPS_AVX2 __m256 splat(float x) { return _mm256_set1_ps(x); }
ROBUST_OPS_AVX2 __m256d splat(double x) { return _mm256_set1_pd(x); }
template <int kCmp>
ROBUST_OPS_AVX2 __m256 compare(__m256 a, __m256 b) { return _mm256_cmp_ps(a, b, kCmp); }
template <int kCmp>
ROBUST_OPS_AVX2 __m256d compare(__m256d a, __m256d b) { return _mm256_cmp_pd(a, b, kCmp); }
ROBUST_OPS_AVX2 __m256 blend(__m256 a, __m256 b, __m256 m) { return _mm256_blendv_ps(a, b, m); }
ROBUST_OPS_AVX2 __m256d blend(__m256d a, __m256d b, __m256d m) { return _mm256_blendv_pd(a, b, m); }
ROBUST_OPS_AVX2 __m256 vmax(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
ROBUST_OPS_AVX2 __m256d vmax(__m256d a, __m256d b) { return _mm256_max_pd(a, b); }
ROBUST_OPS_AVX2 __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
ROBUST_OPS_AVX2 __m256d vadd(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }
ROBUST_OPS_AVX2 __m256 vor(__m256 a, __m256 b) { return _mm256_or_ps(a, b); }
ROBUST_OPS_AVX2 __m256d vor(__m256d a, __m256d b) { return _mm256_or_pd(a, b); }
// The lanes whose window sum is NaN, as float32 lanes (any bit set counts).
ROBUST_OPS_AVX2 __m256 nan_sum(__m256 sum) { return _mm256_cmp_ps(sum, sum, _CMP_UNORD_Q); }
ROBUST_OPS_AVX2 __m256 nan_sum(__m256d sum) { return _mm256_castpd_ps(_mm256_cmp_pd(sum, sum, _CMP_UNORD_Q)); }

// All-ones in the lanes [0, n), zero above: the mask of a partly filled vector's loads and stores.
ROBUST_OPS_AVX2 __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// All-ones in the 64-bit lanes [0, n) of 4, zero above.
ROBUST_OPS_AVX2 __m256i first_lanes4(int64_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}

// 8 float16 / bfloat16 bit patterns widened to float32, and back (the value narrowed is one of the inputs: exact).
template <typename T>
ROBUST_OPS_AVX2 __m256 widen8(__m128i h) {
  if constexpr (std::is_same_v<T, at::Half>) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename T>
ROBUST_OPS_AVX2 __m128i narrow8(__m256 v) {
  if constexpr (std::is_same_v<T, at::Half>) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  return _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
}

template <typename T>
ROBUST_OPS_AVX2 __m256 load_lanes(const T* p, int64_t step, bool may_read_ahead) {
  if constexpr (std::is_same_v<T, float>) {
    if (step == 1) return _mm256_loadu_ps(p);
    if (step == 2 && may_read_ahead) {  // deinterleave two loads (the second reads one element past lane 7's)
      const __m256 lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8);
      const __m256 even = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));  // lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6
      return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(even), _MM_SHUFFLE(3, 1, 2, 0)));
    }
    return _mm256_setr_ps(p[0], p[step], p[2 * step], p[3 * step], p[4 * step], p[5 * step], p[6 * step],
                          p[7 * step]);
  } else {
    const uint16_t* q = bits16(p);
    if (step == 1) return widen8<T>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    if (step == 2 && may_read_ahead) {  // the low halves of 8 dwords (the last reads one element past lane 7's)
      const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      if constexpr (std::is_same_v<T, at::BFloat16>) return _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
      const __m256i lo = _mm256_and_si256(d, _mm256_set1_epi32(0xFFFF));
      return widen8<T>(_mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)));
    }
    return widen8<T>(_mm_setr_epi16(static_cast<int16_t>(q[0]), static_cast<int16_t>(q[step]),
                                    static_cast<int16_t>(q[2 * step]), static_cast<int16_t>(q[3 * step]),
                                    static_cast<int16_t>(q[4 * step]), static_cast<int16_t>(q[5 * step]),
                                    static_cast<int16_t>(q[6 * step]), static_cast<int16_t>(q[7 * step])));
  }
}

ROBUST_OPS_AVX2 __m256d load_lanes(const double* p, int64_t step, bool may_read_ahead) {
  if (step == 1) return _mm256_loadu_pd(p);
  if (step == 2 && may_read_ahead) {  // p0 p4 p2 p6 from two loads (the second reads one element past lane 3's)
    const __m256d mixed = _mm256_unpacklo_pd(_mm256_loadu_pd(p), _mm256_loadu_pd(p + 4));
    return _mm256_permute4x64_pd(mixed, _MM_SHUFFLE(3, 1, 2, 0));
  }
  return _mm256_setr_pd(p[0], p[step], p[2 * step], p[3 * step]);
}

// The window's first element: the maximum so far, no second yet. Select::kMax updates the first-order state only.
template <Select rule, typename State, typename V>
ROBUST_OPS_AVX2 void top2_first(State& st, V v, V s) {
  st.a1 = v;
  st.t1 = s;
  st.sum = v;
  if constexpr (rule == Select::kDropMax) {
    st.a2 = V{};
    if constexpr (std::is_same_v<State, Top2StateD>) {
      st.t2 = _mm256_set1_pd(-1.0);
    } else {
      st.t2 = _mm256_set1_ps(-1.0f);
    }
  }
}

// One more tap. `has_second`: every lane holds a second already (from the window's third tap on), so the "no second
// yet" test drops out. Values move by max (vmaxps returns its second operand on ties and NaN, so the earlier
// element is kept, bitwise as the blends did) and positions by blends: 9 vector operations a tap instead of 12.
template <Select rule, bool has_second, typename State, typename V>
ROBUST_OPS_AVX2 void top2_step(State& st, V v, V s) {
  const V gt1 = compare<_CMP_GT_OQ>(v, st.a1);
  st.sum = vadd(st.sum, v);
  if constexpr (rule == Select::kMax) {
    st.a1 = blend(st.a1, v, gt1);
    st.t1 = blend(st.t1, s, gt1);
    return;
  }
  V gt2 = compare<_CMP_GT_OQ>(v, st.a2);
  if constexpr (!has_second) gt2 = vor(gt2, compare<_CMP_LT_OQ>(st.t2, V{}));
  const V c2 = has_second ? vmax(v, st.a2) : blend(st.a2, v, gt2);
  st.a2 = blend(c2, st.a1, gt1);
  st.t2 = blend(blend(st.t2, s, gt2), st.t1, gt1);
  st.a1 = vmax(v, st.a1);
  st.t1 = blend(st.t1, s, gt1);
}

template <Select rule, typename T, typename R>
ROBUST_OPS_AVX2 void top2_window(Top2StateOf<T>& st, const T* p, int64_t step, bool may_read_ahead,
                                 const int64_t* tap_off, const R* tap_rel, int64_t ntaps, __m256& nan_lanes) {
  top2_first<rule>(st, load_lanes(p + tap_off[0], step, may_read_ahead), splat(tap_rel[0]));
  if (ntaps > 1) {
    top2_step<rule, false>(st, load_lanes(p + tap_off[1], step, may_read_ahead), splat(tap_rel[1]));
  }
  for (int64_t t = 2; t < ntaps; ++t) {
    top2_step<rule, true>(st, load_lanes(p + tap_off[t], step, may_read_ahead), splat(tap_rel[t]));
  }
  nan_lanes = _mm256_or_ps(nan_lanes, nan_sum(st.sum));
}

// Writes lanes [j, min(j + 8, len)): value and idx = origin + (j + lane) * origin_step + rel.
template <Select rule, typename T>
ROBUST_OPS_AVX2 void top2_store(const Top2State& st, int64_t j, int64_t len, T* out, int64_t* idx, int64_t origin,
                                int64_t origin_step, __m256i lane_step) {
  __m256 val = st.a1, pos = st.t1;
  if constexpr (rule == Select::kDropMax) {  // the second when there is one
    const __m256 second = _mm256_cmp_ps(st.t2, _mm256_setzero_ps(), _CMP_GE_OQ);
    val = _mm256_blendv_ps(st.a1, st.a2, second);
    pos = _mm256_blendv_ps(st.t1, st.t2, second);
  }
  const __m256i rel = _mm256_add_epi32(_mm256_cvttps_epi32(pos), lane_step);
  const __m256i base_idx = _mm256_set1_epi64x(origin + j * origin_step);
  const __m256i lo = _mm256_add_epi64(base_idx, _mm256_cvtepi32_epi64(_mm256_castsi256_si128(rel)));
  const __m256i hi = _mm256_add_epi64(base_idx, _mm256_cvtepi32_epi64(_mm256_extracti128_si256(rel, 1)));
  if (j + 8 <= len) {
    if constexpr (std::is_same_v<T, float>) {
      _mm256_storeu_ps(out + j, val);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), narrow8<T>(val));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j + 4), hi);
  } else {  // the last, partial vector: lanes past len belong to other windows (or lie past the output's end)
    const __m256i keep = first_lanes(len - j);
    if constexpr (std::is_same_v<T, float>) {
      _mm256_maskstore_ps(out + j, keep, val);
    } else {  // no 16-bit masked store in AVX2
      alignas(16) T lanes[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(lanes), narrow8<T>(val));
      std::memcpy(out + j, lanes, (len - j) * sizeof(T));
    }
    _mm256_maskstore_epi64(reinterpret_cast<long long*>(idx + j), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(keep)),
                           lo);
    _mm256_maskstore_epi64(reinterpret_cast<long long*>(idx + j + 4),
                           _mm256_cvtepi32_epi64(_mm256_extracti128_si256(keep, 1)), hi);
  }
}

// float64: lanes [j, min(j + 4, len)), lane_step holding the 4 lanes' offsets (int32).
template <Select rule, typename T>
ROBUST_OPS_AVX2 void top2_store(const Top2StateD& st, int64_t j, int64_t len, double* out, int64_t* idx,
                                int64_t origin, int64_t origin_step, __m128i lane_step) {
  __m256d val = st.a1, pos = st.t1;
  if constexpr (rule == Select::kDropMax) {
    const __m256d second = _mm256_cmp_pd(st.t2, _mm256_setzero_pd(), _CMP_GE_OQ);
    val = _mm256_blendv_pd(st.a1, st.a2, second);
    pos = _mm256_blendv_pd(st.t1, st.t2, second);
  }
  const __m128i rel = _mm_add_epi32(_mm256_cvttpd_epi32(pos), lane_step);
  const __m256i at = _mm256_add_epi64(_mm256_set1_epi64x(origin + j * origin_step), _mm256_cvtepi32_epi64(rel));
  if (j + 4 <= len) {
    _mm256_storeu_pd(out + j, val);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j), at);
  } else {
    const __m256i keep = first_lanes4(len - j);
    _mm256_maskstore_pd(out + j, keep, val);
    _mm256_maskstore_epi64(reinterpret_cast<long long*>(idx + j), keep, at);
  }
}

// The lanes' offsets lane * origin_step of one AVX2 vector of T, as int32.
template <typename T>
ROBUST_OPS_AVX2 auto lane_steps8(int64_t origin_step) {
  if constexpr (std::is_same_v<T, double>) {
    return _mm_mullo_epi32(_mm_setr_epi32(0, 1, 2, 3), _mm_set1_epi32(static_cast<int32_t>(origin_step)));
  } else {
    return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                              _mm256_set1_epi32(static_cast<int32_t>(origin_step)));
  }
}

// The 16-bit lanes [0, n) of 8, n <= 8, reading only those (AVX2 has no 16-bit masked load): n / 2 dwords under a
// mask (vpmaskmovd reads no masked-off element and faults on none), an odd last element blended in; the others 0.
ROBUST_OPS_AVX2 __m128i load_partial_bits8(const uint16_t* q, int64_t step, int64_t n) {
  if (step == 1) {
    __m128i h = _mm_maskload_epi32(reinterpret_cast<const int*>(q), _mm256_castsi256_si128(first_lanes(n / 2)));
    if (n % 2 == 1) {
      const __m128i last =
          _mm_cmpeq_epi16(_mm_set1_epi16(static_cast<int16_t>(n - 1)), _mm_setr_epi16(0, 1, 2, 3, 4, 5, 6, 7));
      h = _mm_blendv_epi8(h, _mm_set1_epi16(static_cast<int16_t>(q[n - 1])), last);
    }
    return h;
  }
  alignas(16) uint16_t lanes[8] = {};
  for (int64_t l = 0; l < n; ++l) lanes[l] = q[l * step];
  return _mm_load_si128(reinterpret_cast<const __m128i*>(lanes));
}

// The lanes [0, n) of a partly filled vector, n <= 8, reading only those (the lanes past them may lie past the
// input's end: the channels of the next pixel, or nothing; vmaskmovps reads no masked-off element and faults on
// none); the others are 0.
template <typename T>
ROBUST_OPS_AVX2 __m256 load_partial_lanes(const T* p, int64_t step, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (step == 1) return _mm256_maskload_ps(p, first_lanes(n));
    alignas(32) float lanes[8] = {};
    for (int64_t l = 0; l < n; ++l) lanes[l] = p[l * step];
    return _mm256_load_ps(lanes);
  } else {
    return widen8<T>(load_partial_bits8(bits16(p), step, n));
  }
}

ROBUST_OPS_AVX2 __m256d load_partial_lanes(const double* p, int64_t step, int64_t n) {
  if (step == 1) return _mm256_maskload_pd(p, first_lanes4(n));
  alignas(32) double lanes[4] = {};
  for (int64_t l = 0; l < n; ++l) lanes[l] = p[l * step];
  return _mm256_load_pd(lanes);
}

// Vector u of a block of U side by side (lanes [j + Lu, j + Lu + L), L = kLanes8<T>) for one tap; p is the tap's
// lane j. With `partial`, the last vector holds only the lanes below len and reads no others.
template <typename T, int U, bool partial>
ROBUST_OPS_AVX2 auto load_block_lanes(const T* p, int u, int64_t j, int64_t step, int64_t len, int64_t safe_len) {
  constexpr int L = kLanes8<T>;
  if (partial && u == U - 1) return load_partial_lanes(p + L * u * step, step, len - j - L * u);
  return load_lanes(p + L * u * step, step, j + L * (u + 1) < safe_len);
}

// U vectors side by side from lane j on (one vector's taps form a dependency chain), as top2_block16.
template <Select rule, typename T, int U, bool partial, typename R, typename I>
ROBUST_OPS_AVX2 void top2_block(const T* base, int64_t step, int64_t j, int64_t len, int64_t safe_len,
                                const int64_t* tap_off, const R* tap_rel, int64_t ntaps, T* out, int64_t* idx,
                                int64_t origin, int64_t origin_step, I lane_step, __m256& nan_lanes) {
  Top2StateOf<T> st[U];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    const auto v = load_block_lanes<T, U, partial>(base + tap_off[0] + j * step, u, j, step, len, safe_len);
    top2_first<rule>(st[u], v, splat(tap_rel[0]));
  }
#pragma GCC unroll 4
  for (int u = 0; u < U && ntaps > 1; ++u) {
    const auto v = load_block_lanes<T, U, partial>(base + tap_off[1] + j * step, u, j, step, len, safe_len);
    top2_step<rule, false>(st[u], v, splat(tap_rel[1]));
  }
  for (int64_t t = 2; t < ntaps; ++t) {
    const auto s = splat(tap_rel[t]);
    const T* p = base + tap_off[t] + j * step;
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      top2_step<rule, true>(st[u], load_block_lanes<T, U, partial>(p, u, j, step, len, safe_len), s);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) nan_lanes = _mm256_or_ps(nan_lanes, nan_sum(st[u].sum));
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    top2_store<rule, T>(st[u], j + kLanes8<T> * u, len, out, idx, origin, origin_step, lane_step);
  }
}

// Handles all len lanes (done = len), reading lanes below safe_len only, in blocks of up to kUnroll vectors; a partly
// filled last vector is loaded and stored under masks, as the scalar path ran those lanes ~10x slower (1 x 15 x 56 x
// 56 channels_last: 1.9x the time of 16 channels). Needs relative positions and lane offsets below 2^24 (exact in
// float and int32).
template <Select rule, typename T>
__attribute__((target("avx2,f16c"))) bool window_top2_avx2(const T* __restrict__ base, int64_t step, int64_t len,
                                                           int64_t safe_len, const int64_t* tap_off,
                                                           const at::opmath_type<T>* tap_rel, int64_t ntaps,
                                                           T* __restrict__ out, int64_t* __restrict__ idx,
                                                           int64_t origin, int64_t origin_step, int64_t& done) {
  constexpr int kUnroll = 3, L = kLanes8<T>;
  __m256 nan_lanes = _mm256_setzero_ps();
  const auto lane_step = lane_steps8<T>(origin_step);
  for (int64_t j = 0; j < len; j += L * kUnroll) {
    const int64_t vectors = std::min<int64_t>(kUnroll, (len - j + L - 1) / L);
    const bool partial = j + L * vectors > safe_len;
#define ROBUST_OPS_BLOCK8(U)                                                                                         \
  (partial ? top2_block<rule, T, U, true>(base, step, j, len, safe_len, tap_off, tap_rel, ntaps, out, idx, origin,   \
                                          origin_step, lane_step, nan_lanes)                                         \
           : top2_block<rule, T, U, false>(base, step, j, len, safe_len, tap_off, tap_rel, ntaps, out, idx, origin,  \
                                           origin_step, lane_step, nan_lanes))
    switch (vectors) {
      case 1: ROBUST_OPS_BLOCK8(1); break;
      case 2: ROBUST_OPS_BLOCK8(2); break;
      default: ROBUST_OPS_BLOCK8(3); break;
    }
#undef ROBUST_OPS_BLOCK8
  }
  done = len;
  return _mm256_movemask_ps(nan_lanes) != 0;
}

// The same with AVX-512 (16 lanes, compares into mask registers and single-uop masked moves instead of blends).
// GCC 12's own intrinsic headers trip -Wmaybe-uninitialized here (their _mm512_undefined_* placeholders).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define ROBUST_OPS_AVX512 __attribute__((target("avx512f,f16c"), always_inline)) inline

struct Top2State16 {
  __m512 a1, a2, t1, t2;
  __m512 sum;  // of the window's values, as Top2State's
};

struct Top2State8D {
  __m512d a1, a2, t1, t2;
  __m512d sum;
};

// The lanes of one AVX-512 vector of T, and the state of a window's top 2 in them.
template <typename T>
constexpr int kLanes16 = std::is_same_v<T, double> ? 8 : 16;
template <typename T>
using Top2State16Of = std::conditional_t<std::is_same_v<T, double>, Top2State8D, Top2State16>;

// The vector operations of the steps, for float32 and float64 lanes alike (compares into mask registers).
ROBUST_OPS_AVX512 __m512 splat16(float x) { return _mm512_set1_ps(x); }
ROBUST_OPS_AVX512 __m512d splat16(double x) { return _mm512_set1_pd(x); }
template <int kCmp>
ROBUST_OPS_AVX512 __mmask16 compare_mask(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, kCmp); }
template <int kCmp>
ROBUST_OPS_AVX512 __mmask8 compare_mask(__m512d a, __m512d b) { return _mm512_cmp_pd_mask(a, b, kCmp); }
ROBUST_OPS_AVX512 __m512 mask_mov(__m512 src, __mmask16 m, __m512 a) { return _mm512_mask_mov_ps(src, m, a); }
ROBUST_OPS_AVX512 __m512d mask_mov(__m512d src, __mmask8 m, __m512d a) { return _mm512_mask_mov_pd(src, m, a); }
ROBUST_OPS_AVX512 __m512 vmax(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
ROBUST_OPS_AVX512 __m512d vmax(__m512d a, __m512d b) { return _mm512_max_pd(a, b); }
ROBUST_OPS_AVX512 __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
ROBUST_OPS_AVX512 __m512d vadd(__m512d a, __m512d b) { return _mm512_add_pd(a, b); }

// 16 float16 / bfloat16 bit patterns widened to float32 (as widen8).
template <typename T>
ROBUST_OPS_AVX512 __m512 widen16(__m256i h) {
  if constexpr (std::is_same_v<T, at::Half>) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The float16 / bfloat16 bits of 16 values (each one of the inputs: exact), one per dword's low half.
template <typename T>
ROBUST_OPS_AVX512 __m512i narrow16(__m512 v) {
  if constexpr (std::is_same_v<T, at::Half>) {
    return _mm512_cvtepu16_epi32(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  return _mm512_srli_epi32(_mm512_castps_si512(v), 16);
}

template <typename T>
ROBUST_OPS_AVX512 __m512 load_lanes16(const T* p, int64_t step, bool may_read_ahead) {
  if constexpr (std::is_same_v<T, float>) {
    if (step == 1) return _mm512_loadu_ps(p);
    if (step == 2 && may_read_ahead) {  // deinterleave two loads (the second reads one element past lane 15's)
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      return _mm512_permutex2var_ps(_mm512_loadu_ps(p), even, _mm512_loadu_ps(p + 16));
    }
    alignas(64) float lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = p[l * step];
    return _mm512_load_ps(lanes);
  } else {
    const uint16_t* q = bits16(p);
    if (step == 1) return widen16<T>(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
    if (step == 2 && may_read_ahead) {  // the low halves of 16 dwords (the last reads one element past lane 15's)
      const __m512i d = _mm512_loadu_si512(q);
      if constexpr (std::is_same_v<T, at::BFloat16>) return _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
      return widen16<T>(_mm512_cvtepi32_epi16(d));
    }
    alignas(32) uint16_t lanes[16];
    for (int l = 0; l < 16; ++l) lanes[l] = q[l * step];
    return widen16<T>(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)));
  }
}

template <Select rule, typename State, typename V>
ROBUST_OPS_AVX512 void top2_first16(State& st, V v, V s) {
  st.a1 = v;
  st.t1 = s;
  st.sum = v;
  if constexpr (rule == Select::kDropMax) {
    st.a2 = V{};
    if constexpr (std::is_same_v<State, Top2State8D>) {
      st.t2 = _mm512_set1_pd(-1.0);
    } else {
      st.t2 = _mm512_set1_ps(-1.0f);
    }
  }
}

// As top2_step: values move by max (the earlier element kept on ties and NaN, bitwise as masked moves), NaN is
// found through the sum once per window, and `has_second` drops the "no second yet" test -- a per-tap NaN compare
// and masked moves for the maxima made each tap a longer chain and more compares than AVX2's (slower per lane).
template <Select rule, bool has_second, typename State, typename V>
ROBUST_OPS_AVX512 void top2_step16(State& st, V v, V s) {
  const auto gt1 = compare_mask<_CMP_GT_OQ>(v, st.a1);
  st.sum = vadd(st.sum, v);
  if constexpr (rule == Select::kMax) {
    st.a1 = vmax(v, st.a1);
    st.t1 = mask_mov(st.t1, gt1, s);
    return;
  }
  auto gt2 = compare_mask<_CMP_GT_OQ>(v, st.a2);
  if constexpr (!has_second) gt2 |= compare_mask<_CMP_LT_OQ>(st.t2, V{});
  const V c2 = has_second ? vmax(v, st.a2) : mask_mov(st.a2, gt2, v);
  st.a2 = mask_mov(c2, gt1, st.a1);
  st.t2 = mask_mov(mask_mov(st.t2, gt2, s), gt1, st.t1);
  st.a1 = vmax(v, st.a1);
  st.t1 = mask_mov(st.t1, gt1, s);
}

template <Select rule, typename T>
ROBUST_OPS_AVX512 void top2_store16(const Top2State16& st, int64_t j, int64_t len, T* out, int64_t* idx,
                                    int64_t origin, int64_t origin_step, __m512i lane_step) {
  __m512 val = st.a1, pos = st.t1;
  if constexpr (rule == Select::kDropMax) {  // the second when there is one
    const __mmask16 second = _mm512_cmp_ps_mask(st.t2, _mm512_setzero_ps(), _CMP_GE_OQ);
    val = _mm512_mask_mov_ps(st.a1, second, st.a2);
    pos = _mm512_mask_mov_ps(st.t1, second, st.t2);
  }
  const __m512i rel = _mm512_add_epi32(_mm512_cvttps_epi32(pos), lane_step);
  const __m512i base_idx = _mm512_set1_epi64(origin + j * origin_step);
  const __m512i lo = _mm512_add_epi64(base_idx, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(rel)));
  const __m512i hi = _mm512_add_epi64(base_idx, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(rel, 1)));
  const int64_t n = std::min<int64_t>(16, len - j);  // the last vector may be partial: masked stores
  const __mmask16 keep = n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
  if constexpr (std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(out + j, keep, val);
  } else {  // vpmovdw: the dwords' low halves, under the mask
    _mm512_mask_cvtepi32_storeu_epi16(out + j, keep, narrow16<T>(val));
  }
  _mm512_mask_storeu_epi64(idx + j, __mmask8(keep & 0xFF), lo);
  _mm512_mask_storeu_epi64(idx + j + 8, __mmask8(keep >> 8), hi);
}

// float64: lanes [j, min(j + 8, len)), lane_step holding the 8 lanes' offsets (int32).
template <Select rule, typename T>
ROBUST_OPS_AVX512 void top2_store16(const Top2State8D& st, int64_t j, int64_t len, double* out, int64_t* idx,
                                    int64_t origin, int64_t origin_step, __m256i lane_step) {
  __m512d val = st.a1, pos = st.t1;
  if constexpr (rule == Select::kDropMax) {
    const __mmask8 second = _mm512_cmp_pd_mask(st.t2, _mm512_setzero_pd(), _CMP_GE_OQ);
    val = _mm512_mask_mov_pd(st.a1, second, st.a2);
    pos = _mm512_mask_mov_pd(st.t1, second, st.t2);
  }
  const __m256i rel = _mm256_add_epi32(_mm512_cvttpd_epi32(pos), lane_step);
  const __m512i at = _mm512_add_epi64(_mm512_set1_epi64(origin + j * origin_step), _mm512_cvtepi32_epi64(rel));
  const int64_t n = std::min<int64_t>(8, len - j);
  const __mmask8 keep = __mmask8((1u << n) - 1);
  _mm512_mask_storeu_pd(out + j, keep, val);
  _mm512_mask_storeu_epi64(idx + j, keep, at);
}

// The lanes' offsets lane * origin_step of one AVX-512 vector of T, as int32.
template <typename T>
ROBUST_OPS_AVX512 auto lane_steps16(int64_t origin_step) {
  if constexpr (std::is_same_v<T, double>) {
    return lane_steps8<float>(origin_step);
  } else {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32(static_cast<int32_t>(origin_step)));
  }
}

ROBUST_OPS_AVX512 __m512d load_lanes16(const double* p, int64_t step, bool may_read_ahead) {
  if (step == 1) return _mm512_loadu_pd(p);
  if (step == 2 && may_read_ahead) {  // deinterleave two loads (the second reads one element past lane 7's)
    const __m512i even = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_permutex2var_pd(_mm512_loadu_pd(p), even, _mm512_loadu_pd(p + 8));
  }
  alignas(64) double lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = p[l * step];
  return _mm512_load_pd(lanes);
}

ROBUST_OPS_AVX512 __m512d load_partial_lanes16(const double* p, int64_t step, int64_t n) {
  if (step == 1) return _mm512_maskz_loadu_pd(__mmask8((1u << n) - 1), p);
  alignas(64) double lanes[8] = {};
  for (int64_t l = 0; l < n; ++l) lanes[l] = p[l * step];
  return _mm512_load_pd(lanes);
}

// The lanes [0, n) of a partly filled vector, n <= 16, reading only those (the lanes past them may lie past the
// input's end: the channels of the next pixel, or nothing); the others are 0. 16-bit elements: two halves of 8 as
// AVX2 loads them (no 16-bit masked load without AVX512BW).
template <typename T>
ROBUST_OPS_AVX512 __m512 load_partial_lanes16(const T* p, int64_t step, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (step == 1) return _mm512_maskz_loadu_ps(__mmask16((1u << n) - 1), p);
    alignas(64) float lanes[16] = {};
    for (int64_t l = 0; l < n; ++l) lanes[l] = p[l * step];
    return _mm512_load_ps(lanes);
  } else {
    const uint16_t* q = bits16(p);
    const __m128i lo = load_partial_bits8(q, step, std::min<int64_t>(n, 8));
    return widen16<T>(_mm256_set_m128i(load_partial_bits8(q + 8 * step, step, std::max<int64_t>(n - 8, 0)), lo));
  }
}

// Vector u of a block of U side by side (lanes [j + Lu, j + Lu + L), L = kLanes16<T>) for one tap; p is the tap's
// lane j. With `partial`, the last vector holds only the lanes below len and reads no others.
template <typename T, int U, bool partial>
ROBUST_OPS_AVX512 auto load_block_lanes16(const T* p, int u, int64_t j, int64_t step, int64_t len, int64_t safe_len) {
  constexpr int L = kLanes16<T>;
  if (partial && u == U - 1) return load_partial_lanes16(p + L * u * step, step, len - j - L * u);
  return load_lanes16(p + L * u * step, step, j + L * (u + 1) < safe_len);
}

// U vectors side by side (one vector's taps form a dependency chain), from lane j on; the u loops unrolled by
// pragma, as GCC kept the partial blocks' states in memory (17-31 lanes ran at half the speed of 32).
template <Select rule, typename T, int U, bool partial, typename R, typename I>
ROBUST_OPS_AVX512 void top2_block16(const T* base, int64_t step, int64_t j, int64_t len, int64_t safe_len,
                                    const int64_t* tap_off, const R* tap_rel, int64_t ntaps, T* out, int64_t* idx,
                                    int64_t origin, int64_t origin_step, I lane_step, __mmask16& nan_lanes) {
  Top2State16Of<T> st[U];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    const auto v = load_block_lanes16<T, U, partial>(base + tap_off[0] + j * step, u, j, step, len, safe_len);
    top2_first16<rule>(st[u], v, splat16(tap_rel[0]));
  }
#pragma GCC unroll 4
  for (int u = 0; u < U && ntaps > 1; ++u) {
    const auto v = load_block_lanes16<T, U, partial>(base + tap_off[1] + j * step, u, j, step, len, safe_len);
    top2_step16<rule, false>(st[u], v, splat16(tap_rel[1]));
  }
  for (int64_t t = 2; t < ntaps; ++t) {
    const auto s = splat16(tap_rel[t]);
    const T* p = base + tap_off[t] + j * step;
#pragma GCC unroll 4
    for (int u = 0; u < U; ++u) {
      top2_step16<rule, true>(st[u], load_block_lanes16<T, U, partial>(p, u, j, step, len, safe_len), s);
    }
  }
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) nan_lanes |= compare_mask<_CMP_UNORD_Q>(st[u].sum, st[u].sum);
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u) {
    top2_store16<rule, T>(st[u], j + kLanes16<T> * u, len, out, idx, origin, origin_step, lane_step);
  }
}

// Handles all len lanes (done = len): a partly filled last vector is loaded and stored under masks, as the scalar
// path ran those lanes ~10x slower (1 x 8 x 56 x 56 channels_last, every lane: 2.2x AVX2's time); blocks of up to
// kUnroll vectors, so that 17-63 lanes run side by side as well.
template <Select rule, typename T>
__attribute__((target("avx512f,f16c"))) bool window_top2_avx512(const T* __restrict__ base, int64_t step,
                                                               int64_t len, int64_t safe_len, const int64_t* tap_off,
                                                               const at::opmath_type<T>* tap_rel, int64_t ntaps,
                                                               T* __restrict__ out, int64_t* __restrict__ idx,
                                                               int64_t origin, int64_t origin_step, int64_t& done) {
  constexpr int kUnroll = 4, L = kLanes16<T>, L8 = kLanes8<T>;
  __mmask16 nan_lanes = 0;
  const auto lane_step = lane_steps16<T>(origin_step);
  for (int64_t j = 0; j < len; j += L * kUnroll) {
    if (len - j == L8 && j + L8 <= safe_len) {  // one whole AVX2 vector left: ~5% faster than a masked AVX-512 one
      __m256 nan8 = _mm256_setzero_ps();
      Top2StateOf<T> st;
      top2_window<rule, T>(st, base + j * step, step, j + L8 < safe_len, tap_off, tap_rel, ntaps, nan8);
      top2_store<rule, T>(st, j, len, out, idx, origin, origin_step, lane_steps8<T>(origin_step));
      if (_mm256_movemask_ps(nan8) != 0) nan_lanes = 1;
      break;
    }
    const int64_t vectors = std::min<int64_t>(kUnroll, (len - j + L - 1) / L);
    const bool partial = j + L * vectors > safe_len;
#define ROBUST_OPS_BLOCK16(U)                                                                                        \
  (partial ? top2_block16<rule, T, U, true>(base, step, j, len, safe_len, tap_off, tap_rel, ntaps, out, idx,       \
                                            origin, origin_step, lane_step, nan_lanes)                               \
           : top2_block16<rule, T, U, false>(base, step, j, len, safe_len, tap_off, tap_rel, ntaps, out, idx,      \
                                             origin, origin_step, lane_step, nan_lanes))
    switch (vectors) {
      case 1: ROBUST_OPS_BLOCK16(1); break;
      case 2: ROBUST_OPS_BLOCK16(2); break;
      case 3: ROBUST_OPS_BLOCK16(3); break;
      default: ROBUST_OPS_BLOCK16(4); break;
    }
#undef ROBUST_OPS_BLOCK16
  }
  done = len;
  return nan_lanes != 0;
}

#pragma GCC diagnostic pop

// $ROBUST_OPS_CPU_ISA caps the instruction set the CPU kernel uses: "avx512" (default: the best available), "avx2"
// or "scalar" -- for testing every path on one machine and for comparing them; empty counts as unset. Read once; `op`
// names the calling op (drop_max_pool2d, max_pool2d, _cpu_vector_isa) in the error, which a failed read raises again
// on the next call.
int cpu_isa_cap(const char* op) {
  static const int cap = [op] {
    const char* env = std::getenv("ROBUST_OPS_CPU_ISA");
    const std::string value = env && *env ? env : "avx512";
    TORCH_CHECK(value == "avx512" || value == "avx2" || value == "scalar", op,
                ": expected $ROBUST_OPS_CPU_ISA to be avx512, avx2 or scalar, got '", value, "'");
    return value == "avx512" ? 2 : (value == "avx2" ? 1 : 0);
  }();
  return cap;
}

bool cpu_has_avx512(const char* op) {
  static const bool has = __builtin_cpu_supports("avx512f");
  return has && cpu_isa_cap(op) >= 2;
}

bool cpu_has_avx2(const char* op) {
  static const bool has = __builtin_cpu_supports("avx2");
  return has && cpu_isa_cap(op) >= 1;
}

// The vector paths widen and narrow float16 with F16C (every AVX-512 CPU has it; some AVX2 ones may not).
template <typename T>
bool cpu_runs_vector_type() {
  static const bool f16c = __builtin_cpu_supports("f16c");
  return !std::is_same_v<T, at::Half> || f16c;
}
#endif

// `vector_ok`: relative positions and lane offsets fit the AVX2 path's exact float / int32 arithmetic; the vector
// paths read the positions as acc_t (tap_rel: float, or double for float64), the scalar path as int64 (tap_pos).
// Every floating type runs the vector paths (float16 where the CPU has F16C).
template <Select rule, typename acc_t, typename scalar_t>
bool window_top2(const scalar_t* base, int64_t step, int64_t len, int64_t safe_len, const int64_t* tap_off,
                 const acc_t* tap_rel, const int64_t* tap_pos, int64_t ntaps, scalar_t* out, int64_t* idx,
                 int64_t origin, int64_t origin_step, bool vector_ok) {
  int64_t done = 0;
  bool nan_seen = false;
#ifdef ROBUST_OPS_HAVE_AVX2_PATH
  if constexpr (kVectorType<scalar_t>) {
    vector_ok = vector_ok && cpu_runs_vector_type<scalar_t>();
    if (vector_ok && cpu_has_avx512(op_name(rule))) {
      nan_seen = window_top2_avx512<rule, scalar_t>(base, step, len, safe_len, tap_off, tap_rel, ntaps, out, idx,
                                                    origin, origin_step, done);
    } else if (vector_ok && cpu_has_avx2(op_name(rule))) {
      nan_seen = window_top2_avx2<rule, scalar_t>(base, step, len, safe_len, tap_off, tap_rel, ntaps, out, idx,
                                                  origin, origin_step, done);
    }
  }
#endif
  return window_top2_scalar<rule, acc_t, scalar_t>(base, step, done, len, tap_off, tap_pos, ntaps, out, idx, origin,
                                             origin_step) ||
         nan_seen;
}

// Relative positions (flat H*W) and lane offsets stay below 2^24: exact in float32, no int32 overflow.
bool fits_vector_path(const Geometry& g, int64_t lanes, int64_t origin_step) {
  const int64_t limit = int64_t(1) << 24;
  return g.kh * g.dh * g.W + g.kw * g.dw < limit && (lanes + 8) * origin_step < limit;
}

// NCHW: one (n, c) plane per task; per output row, the windows fully inside the input along the width are the lanes
// of window_top2 (lane = output column, loads strided by the width stride); the edge columns and rows holding NaN
// go through select_window.
template <Select rule, typename scalar_t>
void forward_nchw(const at::Tensor& input, at::Tensor& output, at::Tensor& indices, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  // Output columns whose window lies fully inside [0, W): ow*sw - pw >= 0 and ow*sw - pw + (kw-1)*dw <= W-1.
  const int64_t ow_lo = std::min(g.OW, (g.pw + g.sw - 1) / g.sw);
  const int64_t right = g.W - 1 - (g.kw - 1) * g.dw + g.pw;
  const int64_t ow_hi = std::max(ow_lo, right < 0 ? ow_lo : std::min(g.OW, right / g.sw + 1));
  const int64_t len = ow_hi - ow_lo;
  const int64_t planes = g.N * g.C, plane_in = g.H * g.W, plane_out = g.OH * g.OW;
  const scalar_t* in_end = in + planes * plane_in;

  const bool vector_ok = fits_vector_path(g, len, g.sw);

  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tap_rel(max_window_taps(g));
    std::vector<int64_t> tap_off(max_window_taps(g));
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* base = in + p * plane_in;
      scalar_t* o = out + p * plane_out;
      int64_t* ix = idx + p * plane_out;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t hs = oh * g.sh - g.ph;
        auto scalar_at = [&](int64_t ow) {
          const int64_t pos = select_window<rule>(base, g.W, 1, g, oh, ow);
          o[oh * g.OW + ow] = pos >= 0 ? base[pos] : -std::numeric_limits<scalar_t>::infinity();
          ix[oh * g.OW + ow] = pos;
        };
        for (int64_t ow = 0; ow < ow_lo; ++ow) scalar_at(ow);
        for (int64_t ow = ow_hi; ow < g.OW; ++ow) scalar_at(ow);
        int64_t ki0, ki1;
        valid_taps(hs, g.kh, g.dh, g.H, ki0, ki1);
        if (len == 0 || ki0 == ki1) {
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow) scalar_at(ow);
          continue;
        }
        int64_t ntaps = 0;
        for (int64_t ki = ki0; ki < ki1; ++ki)
          for (int64_t kj = 0; kj < g.kw; ++kj) {
            tap_off[ntaps] = ki * g.dh * g.W + kj * g.dw;
            tap_rel[ntaps] = static_cast<acc_t>(tap_off[ntaps]);
            ++ntaps;
          }
        const int64_t origin = hs * g.W + ow_lo * g.sw - g.pw;
        const scalar_t* lane0 = base + origin;
        // Lanes readable without leaving the tensor (extra lanes read further along the row and are ignored).
        const int64_t safe_len = (in_end - (lane0 + tap_off[ntaps - 1]) - 1) / g.sw + 1;
        // NCHW: tap_off is also the tap's relative H*W position, the scalar path's tap_pos.
        const bool nan_seen =
            window_top2<rule, acc_t, scalar_t>(lane0, g.sw, len, safe_len, tap_off.data(), tap_rel.data(),
                                               tap_off.data(), ntaps, o + oh * g.OW + ow_lo, ix + oh * g.OW + ow_lo,
                                               origin, g.sw, vector_ok);
        if (nan_seen) {
          for (int64_t ow = ow_lo; ow < ow_hi; ++ow) scalar_at(ow);
        }
      }
    }
  });
}

// channels_last: one task per output row (n, oh); per output pixel the C channels are the lanes of window_top2.
template <Select rule, typename scalar_t>
void forward_channels_last(const at::Tensor& input, at::Tensor& output, at::Tensor& indices, const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* in = input.const_data_ptr<scalar_t>();
  scalar_t* out = output.mutable_data_ptr<scalar_t>();
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  const int64_t C = g.C;

  const bool vector_ok = fits_vector_path(g, C, 0);

  at::parallel_for(0, g.N * g.OH, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tap_rel(max_window_taps(g));
    std::vector<int64_t> tap_pos(max_window_taps(g));
    std::vector<int64_t> tap_off(max_window_taps(g));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.OH, oh = r % g.OH;
      const scalar_t* sample = in + n * g.H * g.W * C;
      const int64_t hs = oh * g.sh - g.ph;
      int64_t ki0, ki1;
      valid_taps(hs, g.kh, g.dh, g.H, ki0, ki1);
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        scalar_t* o = out + ((n * g.OH + oh) * g.OW + ow) * C;
        int64_t* ix = idx + ((n * g.OH + oh) * g.OW + ow) * C;
        const int64_t ws = ow * g.sw - g.pw;
        int64_t kj0, kj1;
        valid_taps(ws, g.kw, g.dw, g.W, kj0, kj1);
        if (ki0 == ki1 || kj0 == kj1) {
          for (int64_t c = 0; c < C; ++c) {
            o[c] = -std::numeric_limits<scalar_t>::infinity();
            ix[c] = -1;
          }
          continue;
        }
        int64_t ntaps = 0;
        for (int64_t ki = ki0; ki < ki1; ++ki)
          for (int64_t kj = kj0; kj < kj1; ++kj) {
            tap_off[ntaps] = ((hs + ki * g.dh) * g.W + ws + kj * g.dw) * C;
            tap_pos[ntaps] = ki * g.dh * g.W + kj * g.dw;
            tap_rel[ntaps] = static_cast<acc_t>(tap_pos[ntaps]);
            ++ntaps;
          }
        const bool nan_seen = window_top2<rule, acc_t, scalar_t>(sample, 1, C, C, tap_off.data(), tap_rel.data(),
                                                                 tap_pos.data(), ntaps, o, ix, hs * g.W + ws, 0,
                                                                 vector_ok);
        if (nan_seen) {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t pos = select_window<rule>(sample + c, g.W * C, C, g, oh, ow);
            o[c] = sample[pos * C + c];
            ix[c] = pos;
          }
        }
      }
    }
  });
}

template <Select rule>
std::tuple<at::Tensor, at::Tensor> pool2d_cpu(const at::Tensor& input, c10::IntArrayRef kernel_size,
                                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                                              c10::IntArrayRef dilation, bool ceil_mode) {
  const Geometry g =
      check_drop_max_pool2d_args(input, kernel_size, stride, padding, dilation, ceil_mode, op_name(rule));
  const auto format = pool_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  // One channel is one memory order in either layout: the NCHW path, whose lanes are output columns, runs it.
  const bool channels_last = format == at::MemoryFormat::ChannelsLast && g.C > 1;
  const at::Tensor x = input.contiguous(format);
  at::Tensor output = at::empty({g.N, g.C, g.OH, g.OW}, input.options().memory_format(format));
  at::Tensor indices = at::empty({g.N, g.C, g.OH, g.OW}, input.options().dtype(at::kLong).memory_format(format));
  if (output.numel() == 0) return {output, indices};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "drop_max_pool2d_cpu", [&] {
    if (channels_last) {
      forward_channels_last<rule, scalar_t>(x, output, indices, g);
    } else {
      forward_nchw<rule, scalar_t>(x, output, indices, g);
    }
  });
  return {output, indices};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: grad_input[n, c, idx] += grad_output[n, c, oh, ow]. Windows overlap, so it accumulates; each task owns
// whole (n, c) planes (NCHW) or a channel block of one sample (channels_last), so no two tasks write one element.
// float16/bfloat16 accumulate in float and round once.

// float16 / bfloat16 <-> float32 for the accumulation, bitwise c10's conversions in every lane (tested under each
// ISA cap). Where the CPU has AVX2 (and F16C for float16) and the ISA cap allows AVX2, they run 8 at a time: the
// extension is built without F16C, so c10's scalar conversions are software (float16 by bit manipulation, NaN and
// rounding checked per element), which made the 16-bit backward ~2-7x float32's (1 x 16 x 56 x 56, one thread).
// Widening is exact (vcvtph2ps or a 16-bit shift; NaN stays NaN, sign kept, whatever the payload: the sums and the
// narrowing below see no payload). Narrowing rounds to nearest even as c10 does: float16 by vcvtps2ph, its NaN set
// to c10's 0x7E00 with the sign (vcvtps2ph keeps payload bits); bfloat16 as c10's round_to_nearest_even, bits
// (u + 0x7FFF + (u >> 16 & 1)) >> 16, NaN 0x7FC0 whatever its sign.
template <typename T>
bool runs_16bit_avx2() {
#ifdef ROBUST_OPS_HAVE_AVX2_PATH
  return cpu_runs_vector_type<T>() && cpu_has_avx2(kDropMaxBackwardOp);
#else
  return false;
#endif
}

#ifdef ROBUST_OPS_HAVE_AVX2_PATH
template <typename T>
__attribute__((target("avx2,f16c"))) int64_t widen_16bit_avx2(const T* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, widen8<T>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  return i;
}

template <typename T>
__attribute__((target("avx2,f16c"))) int64_t narrow_16bit_avx2(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(src + i);
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    __m128i h;
    if constexpr (std::is_same_v<T, at::Half>) {
      h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      if (_mm256_movemask_ps(nan) != 0) {
        const __m256i sign_bit = _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(INT32_MIN));
        const __m256i sign = _mm256_srli_epi32(sign_bit, 16);
        const __m256i canonical = _mm256_or_si256(sign, _mm256_set1_epi32(0x7E00));
        const __m256i wide = _mm256_blendv_epi8(_mm256_cvtepu16_epi32(h), canonical, _mm256_castps_si256(nan));
        h = _mm_packus_epi32(_mm256_castsi256_si128(wide), _mm256_extracti128_si256(wide, 1));
      }
    } else {
      const __m256i u = _mm256_castps_si256(v);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
      r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
      h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  return i;
}
#endif

// src as the accumulation type: src itself for float32 / float64, else widened into buf (n elements). `vector`:
// runs_16bit_avx2<T>(), asked once per task (the channels_last backward converts a row of cb elements at a time).
template <typename T, typename A>
const A* widened(const T* src, A* buf, int64_t n, bool vector) {
  if constexpr (std::is_same_v<T, A>) {
    return src;
  } else {
    int64_t i = 0;
#ifdef ROBUST_OPS_HAVE_AVX2_PATH
    if (vector) i = widen_16bit_avx2(src, buf, n);
#endif
    for (; i < n; ++i) buf[i] = static_cast<A>(src[i]);
    return buf;
  }
}

// dst[i] = static_cast<T>(src[i]) for i < n (`vector` as widened's).
template <typename T, typename A>
void narrow_floats(const A* src, T* dst, int64_t n, bool vector) {
  int64_t i = 0;
#ifdef ROBUST_OPS_HAVE_AVX2_PATH
  if constexpr (!std::is_same_v<T, A>) {
    if (vector) i = narrow_16bit_avx2(src, dst, n);
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename scalar_t>
void backward_nchw(const at::Tensor& grad_output, const at::Tensor& indices, at::Tensor& grad_input, int64_t HW,
                   std::atomic<bool>& bad_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  const int64_t planes = grad_output.size(0) * grad_output.size(1);
  const int64_t L = grad_output.size(2) * grad_output.size(3);
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(std::is_same_v<acc_t, scalar_t> ? 0 : HW);
    std::vector<acc_t> wide(std::is_same_v<acc_t, scalar_t> ? 0 : L);
    const bool vector = runs_16bit_avx2<scalar_t>();
    for (int64_t p = begin; p < end; ++p) {
      const acc_t* g = widened(go + p * L, wide.data(), L, vector);
      const int64_t* ix = idx + p * L;
      acc_t* acc = std::is_same_v<acc_t, scalar_t> ? reinterpret_cast<acc_t*>(gi + p * HW) : scratch.data();
      std::fill(acc, acc + HW, acc_t(0));
      bool bad = false;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t i = ix[l];
        if (static_cast<uint64_t>(i) < static_cast<uint64_t>(HW)) {
          acc[i] += g[l];
        } else if (i != -1) {  // -1: a window without input elements (output -inf), no gradient
          bad = true;
        }
      }
      if (bad) bad_index = true;
      if constexpr (!std::is_same_v<acc_t, scalar_t>) narrow_floats(acc, gi + p * HW, HW, vector);
    }
  });
}

template <typename scalar_t>
void backward_channels_last(const at::Tensor& grad_output, const at::Tensor& indices, at::Tensor& grad_input,
                            int64_t HW, std::atomic<bool>& bad_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* go = grad_output.const_data_ptr<scalar_t>();
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  const int64_t N = grad_output.size(0), C = grad_output.size(1);
  const int64_t L = grad_output.size(2) * grad_output.size(3);
  // Channel blocks so that small batches still use every thread; one thread takes every channel at once (a float32
  // block of them all accumulates in grad_input itself, no scratch and no copy: 1 x 32 x 56 x 56 ~2x faster).
  const int64_t threads = at::get_num_threads();
  int64_t blocks = threads == 1 ? 1 : std::max<int64_t>(1, std::min<int64_t>(C / 16, (4 * threads + N - 1) / N));
  const int64_t block = (C + blocks - 1) / blocks;
  blocks = (C + block - 1) / block;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch;
    std::vector<acc_t> wide(std::is_same_v<acc_t, scalar_t> ? 0 : block);
    const bool vector = runs_16bit_avx2<scalar_t>();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, c0 = (t % blocks) * block, c1 = std::min(C, c0 + block), cb = c1 - c0;
      const scalar_t* g = go + n * L * C + c0;
      const int64_t* ix = idx + n * L * C + c0;
      scalar_t* dst = gi + n * HW * C + c0;
      // Accumulate into a dense [HW, cb] buffer: the output itself when the block spans all channels in full
      // precision, else scratch.
      const bool direct = std::is_same_v<acc_t, scalar_t> && cb == C;
      if (!direct) scratch.assign(HW * cb, acc_t(0));
      acc_t* acc = direct ? reinterpret_cast<acc_t*>(dst) : scratch.data();
      if (direct) std::fill(acc, acc + HW * C, acc_t(0));
      bool bad = false;
      for (int64_t l = 0; l < L; ++l) {
        const acc_t* gl = widened(g + l * C, wide.data(), cb, vector);
        const int64_t* il = ix + l * C;
        for (int64_t c = 0; c < cb; ++c) {
          const int64_t i = il[c];
          if (static_cast<uint64_t>(i) < static_cast<uint64_t>(HW)) {
            acc[i * cb + c] += gl[c];
          } else if (i != -1) {
            bad = true;
          }
        }
      }
      if (bad) bad_index = true;
      if (!direct && cb == C) {
        narrow_floats(acc, dst, HW * C, vector);
      } else if (!direct) {
        for (int64_t i = 0; i < HW; ++i) narrow_floats(acc + i * cb, dst + i * C, cb, vector);
      }
    }
  });
}

at::Tensor drop_max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices,
                                        c10::IntArrayRef input_size) {
  check_drop_max_pool2d_backward_args(grad_output, indices, input_size);
  const bool channels_last = pool_channels_last(indices);
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor go = grad_output.contiguous(format);
  const at::Tensor ix = indices.contiguous(format);
  at::Tensor grad_input = at::empty(input_size, grad_output.options().memory_format(format));
  if (grad_input.numel() == 0) return grad_input;
  const int64_t HW = input_size[2] * input_size[3];
  std::atomic<bool> bad_index{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, go.scalar_type(), "drop_max_pool2d_backward_cpu", [&] {
    if (channels_last) {
      backward_channels_last<scalar_t>(go, ix, grad_input, HW, bad_index);
    } else {
      backward_nchw<scalar_t>(go, ix, grad_input, HW, bad_index);
    }
  });
  TORCH_CHECK(!bad_index.load(), kDropMaxBackwardOp, ": expected indices in [0, ", HW, ") (flat positions into H*W = ",
              input_size[2], "*", input_size[3],
              ") or -1 (a window without input elements), got an index out of range");
  return grad_input;
}

}  // namespace

std::string cpu_vector_isa() {
#ifdef ROBUST_OPS_HAVE_AVX2_PATH
  if (cpu_has_avx512("_cpu_vector_isa")) return "avx512";
  if (cpu_has_avx2("_cpu_vector_isa")) return "avx2";
#endif
  return "scalar";
}

TORCH_LIBRARY_IMPL(robust_ops, CPU, m) {
  m.impl("drop_max_pool2d", &pool2d_cpu<Select::kDropMax>);
  m.impl("max_pool2d", &pool2d_cpu<Select::kMax>);
  m.impl("_drop_max_pool2d_backward", &drop_max_pool2d_backward_cpu);
}

}  // namespace robust_ops
