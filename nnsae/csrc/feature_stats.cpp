// One batch of `nnsae.extract.FeatureStats.update`: the native form of its torch path, with the same results bit
// for bit (same float32 comparisons, float64 sums in the same order, same slot assignment).
//
// Why native: a batch touches each of its ~n·k entries a few times; as torch ops it is dozens of passes, sorts and
// scatters (~15-30 ms per SAE per 1024 tokens), here a few passes over the entries (2-10 ms, most of it writing the
// windows of entries that enter the top lists, which grow rarer as the lists fill).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// The activations of one batch by (row, feature): a hash table (open addressing, linear probing, power-of-two size at
// most half full), behind a bit set of the pairs present when that set is at most 8x the table's size (bigger, it
// costs more to clear than it saves; a small table is quick to probe anyway). Windows mostly ask for absent pairs,
// and a window's bits sit one stride apart, which the prefetcher follows. A pair's first entry wins, as in a scan of
// its row (an SAE gives each pair once anyway).
class EntryTable {
 public:
  EntryTable(int64_t m, const int64_t* rows, const int64_t* feats, const float* vals, int64_t n, int64_t d)
      : d_(d), words_((d + 63) / 64) {
    int bits = 4;
    while ((int64_t{1} << bits) < 2 * m) ++bits;
    shift_ = 64 - bits;
    mask_ = (uint64_t{1} << bits) - 1;
    keys_.assign(mask_ + 1, -1);
    vals_.resize(mask_ + 1);
    if (n * words_ <= 8 * static_cast<int64_t>(mask_ + 1)) present_.assign(n * words_, 0);
    for (int64_t p = 0; p < m; ++p) {
      const int64_t key = rows[p] * d + feats[p];
      uint64_t at = slot(key);
      while (keys_[at] != -1 && keys_[at] != key) at = (at + 1) & mask_;
      if (keys_[at] == -1) {
        keys_[at] = key;
        vals_[at] = vals[p];
      }
      if (!present_.empty()) present_[rows[p] * words_ + (feats[p] >> 6)] |= uint64_t{1} << (feats[p] & 63);
    }
  }

  float get(int64_t row, int64_t f) const {
    if (!present_.empty() && !((present_[row * words_ + (f >> 6)] >> (f & 63)) & 1)) return 0.0f;
    const int64_t key = row * d_ + f;
    for (uint64_t at = slot(key);; at = (at + 1) & mask_) {
      if (keys_[at] == key) return vals_[at];
      if (keys_[at] == -1) return 0.0f;
    }
  }

 private:
  uint64_t slot(int64_t key) const { return (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ull) >> shift_; }

  int64_t d_, words_;
  std::vector<int64_t> keys_;
  std::vector<float> vals_;
  std::vector<uint64_t> present_;
  uint64_t mask_;
  int shift_;
};

}  // namespace

extern "C" int nnsae_feature_stats(
    int64_t m, const int64_t* rows, const int64_t* feats, const float* vals,  // entries, grouped by ascending row
    int64_t B, int64_t T, const int64_t* tokens,                              // (B, T)
    const uint8_t* counted,                                                   // (B*T) or null: all counted
    int64_t first_index, float threshold, int64_t d, const double* edges, int64_t n_edges, int64_t N, int64_t w,
    int64_t* firing_count, double* activation_sum, float* max_activation, int64_t* histogram,
    float* top_values, int64_t* top_index, int64_t* top_slot, int32_t* window_tokens, float* window_acts) {
  const int64_t n = B * T, nb = n_edges + 1, width = 2 * w + 1;
  for (int64_t p = 0; p < m; ++p)
    if (rows[p] < 0 || rows[p] >= n || feats[p] < 0 || feats[p] >= d || (p && rows[p] < rows[p - 1])) return -1;

  // Counted entries: firing count, float64 sum (batch sum first, in entry order, like torch.bincount), max,
  // histogram of positive values; and the top-context candidates (above the batch-start floor of their feature).
  std::vector<double> batch_sum(d, 0.0);
  std::vector<int64_t> cand;
  for (int64_t p = 0; p < m; ++p) {
    const float v = vals[p];
    if (!(std::fabs(v) > threshold) || (counted && !counted[rows[p]])) continue;
    const int64_t f = feats[p];
    ++firing_count[f];
    batch_sum[f] += double(v);
    if (v > max_activation[f] || v != v) max_activation[f] = v;
    if (v > 0) ++histogram[f * nb + (std::upper_bound(edges, edges + n_edges, double(v)) - edges)];
    if (N && v > threshold && v > top_values[f * N + N - 1]) cand.push_back(p);
  }
  for (int64_t f = 0; f < d; ++f) activation_sum[f] += batch_sum[f];
  if (cand.empty()) return 0;

  // Candidates by feature (a stable counting sort: row order kept within a feature).
  std::vector<int64_t> start(d + 1, 0), by_feat(cand.size());
  for (int64_t p : cand) ++start[feats[p] + 1];
  for (int64_t f = 0; f < d; ++f) start[f + 1] += start[f];
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t p : cand) by_feat[fill[feats[p]]++] = p;
  }

  // A feature's activation at a row, for the windows of the entries that enter the top lists (a scan of the rows'
  // entries cost 4-7x more).
  const EntryTable table(m, rows, feats, vals, n, d);

  std::vector<int64_t> fresh_rows;
  std::vector<float> merged_vals(N);
  std::vector<int64_t> merged_src(N), merged_slot(N), new_index(N);
  std::vector<uint8_t> used(N);
  for (int64_t f = 0; f < d; ++f) {
    const int64_t lo = start[f], hi = start[f + 1];
    if (lo == hi) continue;
    // New entries by value desc, then row asc (entries are in row order), at most N of them.
    std::sort(by_feat.begin() + lo, by_feat.begin() + hi,
              [&](int64_t a, int64_t b) { return vals[a] > vals[b] || (vals[a] == vals[b] && a < b); });
    const int64_t n_new = std::min(hi - lo, N);
    // Merge with the old list (sorted desc; existing entries win ties: they are earlier tokens). src >= 0: old
    // rank; src < 0: new entry -1 - q.
    float* tv = top_values + f * N;
    int64_t* ti = top_index + f * N;
    int64_t* ts = top_slot + f * N;
    int64_t a = 0, q = 0;
    for (int64_t r = 0; r < N; ++r) {
      if (q < n_new && !(tv[a] >= vals[by_feat[lo + q]])) {
        merged_vals[r] = vals[by_feat[lo + q]];
        merged_src[r] = -1 - q++;
      } else {
        merged_vals[r] = tv[a];
        merged_src[r] = a++;
      }
    }
    // Slots: kept entries keep theirs; entries that enter take the free ones, lowest first, in rank order.
    std::fill(used.begin(), used.end(), 0);
    for (int64_t r = 0; r < N; ++r)
      if (merged_src[r] >= 0) used[ts[merged_src[r]]] = 1;
    int64_t next_free = 0;
    fresh_rows.clear();
    for (int64_t r = 0; r < N; ++r) {
      if (merged_src[r] >= 0) {
        merged_slot[r] = ts[merged_src[r]];
        new_index[r] = ti[merged_src[r]];
      } else {
        while (used[next_free]) ++next_free;
        merged_slot[r] = next_free++;
        const int64_t row = rows[by_feat[lo + (-1 - merged_src[r])]];
        new_index[r] = first_index + row;
        fresh_rows.push_back(r);
      }
    }
    for (int64_t r = 0; r < N; ++r) {
      tv[r] = merged_vals[r];
      ti[r] = new_index[r];
      ts[r] = merged_slot[r];
    }
    // Windows of the entries that entered: tokens and this feature's activations within the token's chunk.
    for (int64_t r : fresh_rows) {
      const int64_t row = rows[by_feat[lo + (-1 - merged_src[r])]], b = row / T, pos = row % T;
      int32_t* wt = window_tokens + (f * N + merged_slot[r]) * width;
      float* wa = window_acts + (f * N + merged_slot[r]) * width;
      for (int64_t o = -w; o <= w; ++o) {
        const int64_t at = pos + o;
        if (at < 0 || at >= T) {
          wt[o + w] = -1;
          wa[o + w] = 0;
          continue;
        }
        wt[o + w] = static_cast<int32_t>(tokens[b * T + at]);
        wa[o + w] = table.get(b * T + at, f);
      }
    }
  }
  return 0;
}
