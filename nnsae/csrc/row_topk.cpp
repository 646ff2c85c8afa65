// Indices of the k largest entries of each float32 row (by |x| if `absolute`), unordered: the native form of
// `nnsae.kernels.row_topk` (`torch.topk(h, k, sorted=False).indices`, ties aside).
//
// The same two stages as the torch path, done while the row sits in L1: view the row as g strided slices of
// width w (entry c of slice i is x[i·w + c]); the group maxima m_c = max_i x[i·w + c] are elementwise vector maxima
// (no horizontal reductions). With t the k-th largest m_c, at least k entries are ≥ t, so every top-k entry is ≥ t
// and lies in a group whose maximum is ≥ t (or in the s − g·w tail): only those entries are candidates, and the k
// largest candidates are the answer. Why native: as torch ops these stages are four passes over the (n, d_sae)
// matrix, a sixth of a TopK training step.
//
// NaN compares false and is never selected (torch.topk would rank it first); a row with fewer than k non-NaN
// entries returns NaN positions for the missing ones.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

typedef float v16f __attribute__((vector_size(64)));

inline v16f load16(const float* p, bool absolute) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return absolute ? (v < 0 ? -v : v) : v;
}

inline void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }

// Bit i set where v[i] >= t.
inline uint32_t at_least(v16f v, float t) {
#if defined(__AVX512F__)
  __m512 x;
  std::memcpy(&x, &v, sizeof x);
  return _mm512_cmp_ps_mask(x, _mm512_set1_ps(t), _CMP_GE_OQ);
#elif defined(__AVX__)
  __m256 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  const __m256 tt = _mm256_set1_ps(t);
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(lo, tt, _CMP_GE_OQ))) |
         static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(hi, tt, _CMP_GE_OQ))) << 8;
#else
  uint32_t bits = 0;
  for (int i = 0; i < 16; ++i) bits |= static_cast<uint32_t>(v[i] >= t) << i;
  return bits;
#endif
}

inline float key(float v, bool absolute) { return absolute ? std::fabs(v) : v; }

struct Entry {
  float key;
  int64_t index;
};

struct Scratch {
  std::vector<float> maxima, sorted;
  std::vector<Entry> candidates;
};

// Number of m[0..w) that are >= t.
inline int64_t count_at_least(const float* m, int64_t w, float t) {
  int32_t n = 0;
  for (int64_t c = 0; c < w; ++c) n += m[c] >= t;
  return n;
}

// A t <= the k-th largest of m[0..w) with count(m >= t) >= k, close to it: bisection on the values (branch-free
// counting passes), where nth_element's unpredictable branches cost several times the whole row scan.
inline float kth_bound(const float* m, int64_t w, int64_t k, Scratch& sc) {
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t c = 0; c < w; ++c) {
    lo = m[c] < lo ? m[c] : lo;
    hi = m[c] > hi ? m[c] : hi;
  }
  if (!std::isfinite(lo) || !std::isfinite(hi)) {  // -inf maxima (all-NaN groups) or inf entries: exact selection
    std::copy(m, m + w, sc.sorted.begin());
    std::nth_element(sc.sorted.begin(), sc.sorted.begin() + (k - 1), sc.sorted.begin() + w, std::greater<float>());
    return sc.sorted[k - 1];
  }
  if (count_at_least(m, w, hi) >= k) return hi;
  for (int i = 0; i < 12; ++i) {  // invariant: count(>= lo) >= k > count(>= hi)
    const float mid = lo + (hi - lo) * 0.5f;
    if (!(mid > lo && mid < hi)) break;
    (count_at_least(m, w, mid) >= k ? lo : hi) = mid;
  }
  return lo;
}

void select_row(const float* row, int64_t s, int64_t k, int64_t g, bool absolute, Scratch& sc, int64_t* out) {
  const int64_t w = g > 1 ? s / g : 0;
  std::vector<Entry>& cand = sc.candidates;
  cand.clear();
  float t = -INFINITY;
  if (w >= k) {
    float* m = sc.maxima.data();
    int64_t c = 0;
    const v16f lowest = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                         -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    for (; c + 16 <= w; c += 16) {
      v16f v = lowest;
      for (int64_t i = 0; i < g; ++i) {
        const v16f x = load16(row + i * w + c, absolute);
        v = x > v ? x : v;
      }
      store16(m + c, v);
    }
    for (; c < w; ++c) {
      float v = -INFINITY;
      for (int64_t i = 0; i < g; ++i) {
        const float x = key(row[i * w + c], absolute);
        v = x > v ? x : v;
      }
      m[c] = v;
    }
    t = kth_bound(m, w, k, sc);
    // every entry >= t, by one vectorised pass over the row (still in L1): about k + a few per row
    const int64_t body = g * w;
    int64_t j = 0;
    for (; j + 16 <= body; j += 16) {
      for (uint32_t bits = at_least(load16(row + j, absolute), t); bits; bits &= bits - 1) {
        const int64_t i = j + __builtin_ctz(bits);
        cand.push_back({key(row[i], absolute), i});
      }
    }
    for (; j < body; ++j) {
      const float x = key(row[j], absolute);
      if (x >= t) cand.push_back({x, j});
    }
  }
  for (int64_t j = g * w; j < s; ++j) {  // the tail (or the whole row when it is too short to group)
    const float x = key(row[j], absolute);
    if (x >= t) cand.push_back({x, j});
  }
  const int64_t n = std::min<int64_t>(k, static_cast<int64_t>(cand.size()));
  if (static_cast<int64_t>(cand.size()) > k) {
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(),
                     [](const Entry& a, const Entry& b) { return a.key > b.key; });
  }
  for (int64_t j = 0; j < n; ++j) out[j] = cand[j].index;
  int64_t filled = n;
  for (int64_t j = 0; filled < k && j < s; ++j) {  // fewer than k non-NaN entries: NaN positions
    if (row[j] != row[j]) out[filled++] = j;
  }
}

}  // namespace

extern "C" int nnsae_row_topk(int64_t rows, int64_t s, int64_t row_stride, const float* h, int64_t k, int absolute,
                              int64_t* indices) {
  if (k <= 0 || k > s) return 1;
  // the most slices that leave at least 2k groups: fewer group maxima to rank, at most k·g candidates to scan
  int64_t g = 1;
  for (int64_t c : {32, 16, 8, 4, 2}) {
    if (s / c >= 2 * k) {
      g = c;
      break;
    }
  }
  Scratch sc;
  sc.maxima.resize(s);
  sc.sorted.resize(s);
  sc.candidates.reserve(s);
  for (int64_t r = 0; r < rows; ++r) select_row(h + r * row_stride, s, k, g, absolute != 0, sc, indices + r * k);
  return 0;
}
