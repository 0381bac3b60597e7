// Ragged paged attention on x86-64 AVX2 + FMA, for f32 pools and for bf16 pools (kept as
// uint16 bit patterns; the arithmetic is f32 either way).
//
// A step's query tokens are flat rows q[T, Hq, D]. Sequence n owns rows
// q_start[n] .. q_start[n] + q_len[n] and the first kv_len[n] keys of its page table, read in
// place from the stacked pool k[L, N, page, Hkv, D] of layer `layer`: no gathered copy of the
// context. Causal: its query i sits at key kv_len - q_len + i and sees the keys up to it (a
// sequence's own part); otherwise every query sees all kv_len keys (a group's queries over
// its shared prefix: one dense problem, each page read once for all of them). Padding
// sequences have q_len 0, and the page loop stops where an item's last query stops seeing,
// so the fixed-size tables a step carries cost nothing past their real contents.
//
// A sequence's queries are cut into items of up to kItemQueries; an item keeps the running
// max, sum and output of each of its queries (an online softmax) and reads each page whole
// (all KV heads, contiguous), in tiles of 3 query rows x 4 keys for the scores and 3 query
// rows x 32 columns for the weighted values, while the next page is prefetched. Items are
// shared between the calling thread and XLA's intra-op pool (parallel.h). Returns
// out [T, Hq, D] and lse [T, Hq]; rows with no key (or no owner) give out 0 and lse -1e30,
// as the jnp reference does.
//
// bf16 pools are read 16 values at a time and split into two 8-lane f32 vectors, the even and
// the odd columns (a shift and a mask, no shuffle); the row's scaled queries and its running
// output are kept in that same column order (`Slot`) and put back in order at the end.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "bf16.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kMaskValue = -1e30f;
constexpr int64_t kMaxPage = 256;
// The next page. With two ahead (and the prefetch spread over score tiles only), 16 f32
// decode rows over 576 keys (SmolLM2, 24 KiB pages) spent 10-20% longer in this kernel; bf16
// rows took the same time either way.
constexpr int64_t kPrefetchPages = 1;

// e^x for 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-6 polynomial (relative error
// about 2e-7); lanes below -87 give 0.
inline __m256 Exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  x = _mm256_min_ps(x, _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float HorizontalMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// How a pool's element type is read: Load fills kVecs 8-lane f32 vectors from 8 * kVecs
// consecutive values; Slot(c) is where column c of a row's queries and output is kept so that
// lane i of vector j holds the column the load put there.
struct F32Pool {
  using T = float;
  static constexpr int kVecs = 1;
  static inline void Load(const float* p, __m256* v) { v[0] = _mm256_loadu_ps(p); }
  static int64_t Slot(int64_t c) { return c; }
};

struct BF16Pool {
  using T = uint16_t;  // the bits of a bf16, which are the top half of an f32's
  static constexpr int kVecs = 2;
  static inline void Load(const uint16_t* p, __m256* v) {
    batchjax::WidenBF16x16(p, v[0], v[1]);  // columns 0, 2, ..., 14, then 1, 3, ..., 15
  }
  static int64_t Slot(int64_t c) { return (c & ~15) + (c & 1) * 8 + ((c & 15) >> 1); }
};

template <class Pool>
inline float Score1(const float* q, const typename Pool::T* k, int64_t d) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 8 * Pool::kVecs) {
    __m256 kc[Pool::kVecs];
    Pool::Load(k + c, kc);
#pragma GCC unroll 2
    for (int h = 0; h < Pool::kVecs; ++h) {
      a = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8 * h), kc[h], a);
    }
  }
  return HorizontalSum(a);
}

// Pulls a page's keys and values toward the cache a few lines per call of Step(), so that
// the reads are spread over the arithmetic of the page before it.
struct Prefetcher {
  const char* k = nullptr;
  const char* v = nullptr;
  int64_t line = 0, lines = 0, per_step = 0;

  void Start(const void* k_page, const void* v_page, int64_t page_lines, int64_t steps) {
    k = reinterpret_cast<const char*>(k_page);
    v = reinterpret_cast<const char*>(v_page);
    line = 0;
    lines = k_page == nullptr ? 0 : page_lines;
    per_step = (page_lines + steps - 1) / steps;
  }

  void Step() {
    for (const int64_t end = std::min(lines, line + per_step); line < end; ++line) {
      _mm_prefetch(k + 64 * line, _MM_HINT_T0);
      _mm_prefetch(v + 64 * line, _MM_HINT_T0);
    }
  }
};

// Query rows handled together: their scores share each key's loads and their weighted sums
// each value's, and a tile keeps kTileRows * 4 independent sums in flight, where one row at a
// time kept few enough that each product waited on the one before.
constexpr int kTileRows = 3;

// s[r * kMaxPage + u] = q[r] . k[u * k_stride] for MR query rows and 4 keys.
template <int MR, class Pool>
inline void ScoresTile(const float* q, int64_t d, const typename Pool::T* k, int64_t k_stride,
                       float* s) {
  __m256 a[MR][4];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) a[r][u] = _mm256_setzero_ps();
  }
  for (int64_t c = 0; c < d; c += 8 * Pool::kVecs) {
    __m256 kc[4][Pool::kVecs];
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) Pool::Load(k + u * k_stride + c, kc[u]);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < Pool::kVecs; ++h) {
        const __m256 qc = _mm256_loadu_ps(q + r * d + c + 8 * h);
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) a[r][u] = _mm256_fmadd_ps(qc, kc[u][h], a[r][u]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    // [a0 lo, a1 lo, a2 lo, a3 lo, a0 hi, a1 hi, a2 hi, a3 hi], halves summed: 4 dot products.
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[r][0], a[r][1]),
                                    _mm256_hadd_ps(a[r][2], a[r][3]));
    _mm_storeu_ps(s + r * kMaxPage,
                  _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
}

// Scores of MR query rows against a page's first `keys` keys: 4 at a time where the page has
// 4 slots left (a slot past `keys` is masked by the caller), then one by one.
template <int MR, class Pool>
inline void ScoreRows(const float* q, int64_t d, const typename Pool::T* k, int64_t k_stride,
                      int64_t keys, int64_t page, float* s, Prefetcher& prefetch) {
  int64_t t = 0;
  for (; t < keys && t + 4 <= page; t += 4) {
    prefetch.Step();
    ScoresTile<MR, Pool>(q, d, k + t * k_stride, k_stride, s + t);
  }
  for (; t < keys; ++t) {
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      s[r * kMaxPage + t] = Score1<Pool>(q + r * d, k + t * k_stride, d);
    }
  }
}

// acc[r] += sum_t p[r][t] * v[t] for MR query rows over NC vectors of 8 slots from slot c.
template <int MR, int NC, class Pool>
inline void ValuesTile(float* acc, int64_t d, int64_t c, const float* p,
                       const typename Pool::T* v, int64_t v_stride, int64_t keys) {
  static_assert(NC % Pool::kVecs == 0, "whole loads only");
  __m256 a[MR][NC];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < NC; ++u) a[r][u] = _mm256_loadu_ps(acc + r * d + c + 8 * u);
  }
  for (int64_t t = 0; t < keys; ++t) {
    const typename Pool::T* vt = v + t * v_stride + c;
    if constexpr (Pool::kVecs == 1) {
      // f32: each product reads its value from memory, which keeps 12 sums in registers.
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m256 pr = _mm256_broadcast_ss(p + r * kMaxPage + t);
#pragma GCC unroll 4
        for (int u = 0; u < NC; ++u) {
          a[r][u] = _mm256_fmadd_ps(pr, _mm256_loadu_ps(vt + 8 * u), a[r][u]);
        }
      }
    } else {
      // Converted once per key, used by every row.
      __m256 vc[NC];
#pragma GCC unroll 4
      for (int u = 0; u < NC; u += Pool::kVecs) Pool::Load(vt + 8 * u, vc + u);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m256 pr = _mm256_broadcast_ss(p + r * kMaxPage + t);
#pragma GCC unroll 4
        for (int u = 0; u < NC; ++u) a[r][u] = _mm256_fmadd_ps(pr, vc[u], a[r][u]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int u = 0; u < NC; ++u) _mm256_storeu_ps(acc + r * d + c + 8 * u, a[r][u]);
  }
}

// Vectors per value tile: 3 rows x 4 f32 vectors leave registers for the broadcast; bf16
// values converted once per key need registers of their own, so 3 rows x 2.
template <class Pool>
constexpr int kValueVecs = Pool::kVecs == 1 ? 4 : 2;

template <int MR, class Pool>
inline void AccumulateValues(float* acc, int64_t d, const float* p, const typename Pool::T* v,
                             int64_t v_stride, int64_t keys) {
  constexpr int kWide = kValueVecs<Pool>, kNarrow = Pool::kVecs;
  int64_t c = 0;
  for (; c + 8 * kWide <= d; c += 8 * kWide) {
    ValuesTile<MR, kWide, Pool>(acc, d, c, p, v, v_stride, keys);
  }
  for (; c < d; c += 8 * kNarrow) ValuesTile<MR, kNarrow, Pool>(acc, d, c, p, v, v_stride, keys);
}

// Runs f<MR>() for a tile of rows rows (1 <= rows <= kTileRows).
template <typename F>
inline void ForTile(int64_t rows, F&& f) {
  static_assert(kTileRows == 3, "one case per tile size");
  switch (rows) {
    case 3: f(std::integral_constant<int, 3>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    default: f(std::integral_constant<int, 1>()); break;
  }
}

template <class Pool>
struct Problem {
  using T = typename Pool::T;
  const float* q;  // [T, Hq, D]
  const T* k;      // this layer's pool [N, page, Hkv, D]
  const T* v;
  const int32_t* table;    // [S, P]
  const int32_t* kv_len;   // [S]
  const int32_t* q_start;  // [S]
  const int32_t* q_len;    // [S]
  float* out;              // [T, Hq, D]
  float* lse;              // [T, Hq]
  bool causal;
  int64_t tokens, seqs, hq, hkv, d, page, pages_per_row, num_pages;
  std::atomic<bool> bad_page{false};
};

// One work item: queries [i0, i0 + nq) of sequence n, query rows [r0, r1) of them.
struct Item {
  int64_t n, i0, nq, r0, r1;
};

// Scratch of one row: scaled queries, scores of one page, running max / sum / output, each
// indexed by query row (KV head, query, head within the KV head's group); queries and output
// in the pool's column order (`Slot`).
struct Scratch {
  std::vector<float> q, s, m, l, acc, k, v;
};

template <class T>
struct Tag {
  using type = T;
};

// A page of n values widened to f32 in the order Load leaves them (`Slot` within each head).
template <class Pool>
void Widen(const typename Pool::T* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 8 * Pool::kVecs) {
    __m256 v[Pool::kVecs];
    Pool::Load(src + i, v);
#pragma GCC unroll 2
    for (int h = 0; h < Pool::kVecs; ++h) _mm256_storeu_ps(dst + i + 8 * h, v[h]);
  }
}

// Query rows [r0, r1) of queries [i0, i0 + nq) of sequence n (rows indexed as in Scratch).
// Query i sees the first lim0 + i keys (causal) or all kv_len of them.
template <class Pool>
void RunItem(Problem<Pool>& p, const Item& item, Scratch& w) {
  const int64_t n = item.n, r0 = item.r0, r1 = item.r1, nq = item.nq;
  const int64_t g = p.hq / p.hkv, per_head = nq * g, nr = p.hkv * per_head;
  const int64_t d = p.d, ps = p.page, key_stride = p.hkv * d, page_floats = ps * key_stride;
  const int64_t kv = std::max<int32_t>(0, p.kv_len[n]);
  const int64_t lim0 = p.causal ? kv - p.q_len[n] + item.i0 + 1 : kv;
  auto limit = [&](int64_t i) { return std::clamp<int64_t>(lim0 + i, 0, kv); };
  auto limit_of_row = [&](int64_t r) { return p.causal ? limit((r / g) % nq) : kv; };
  const int64_t len = limit(p.causal ? nq - 1 : 0);  // keys the item reads at most
  const int64_t row0 = p.q_start[n] + item.i0;  // the token row of query 0
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  w.q.resize(nr * d);
  w.s.resize(nr * kMaxPage);
  w.m.assign(nr, kMaskValue);
  w.l.assign(nr, 0.0f);
  w.acc.assign(nr * d, 0.0f);
  for (int64_t h = 0; h < p.hkv; ++h) {
    for (int64_t i = 0; i < nq; ++i) {
      for (int64_t j = 0; j < g; ++j) {
        const int64_t r = (h * nq + i) * g + j;
        if (r < r0 || r >= r1) continue;
        const float* src = p.q + ((row0 + i) * p.hq + h * g + j) * d;
        float* dst = w.q.data() + r * d;
        for (int64_t c = 0; c < d; ++c) dst[Pool::Slot(c)] = src[c] * scale;
      }
    }
  }
  // The KV heads whose query rows this item holds, and its score tiles per page.
  const int64_t h0 = r0 / per_head, h1 = (r1 + per_head - 1) / per_head;
  int64_t tiles = 0;
  for (int64_t h = h0; h < h1; ++h) {
    const int64_t rows = std::min(r1, (h + 1) * per_head) - std::max(r0, h * per_head);
    tiles += (rows + kTileRows - 1) / kTileRows;
  }
  const int64_t used = std::min<int64_t>((len + ps - 1) / ps, p.pages_per_row);
  const int32_t* table = p.table + n * p.pages_per_row;
  // The page kPrefetchPages ahead is pulled toward the cache a few lines per score tile and
  // per value tile, so its reads overlap this page's arithmetic: the hardware's own
  // prefetching does not cross from one page to the next, prefetching a whole page in one
  // burst gained nothing, and spreading it over the score tiles alone left f32 decode rows
  // about a fifth slower than over both.
  // Step() calls per page: one per score tile of 4 keys, one per value tile.
  const int64_t prefetch_steps = tiles * (ps / 4 + 1);
  const int64_t page_lines = page_floats * static_cast<int64_t>(sizeof(typename Pool::T)) / 64;
  // A bf16 page that more than one tile of a KV head's query rows reads (rows of several
  // queries) is widened to f32 once, not once per tile.
  const bool widen = Pool::kVecs > 1 && per_head > kTileRows;
  if (widen) {
    w.k.resize(page_floats);
    w.v.resize(page_floats);
  }
  Prefetcher prefetch;
  for (int64_t j = 0; j < used; ++j) {
    const int64_t page = table[j];
    if (page < 0 || page >= p.num_pages) {
      p.bad_page.store(true);
      return;
    }
    const int64_t keys = std::min(ps, len - j * ps);
    const int64_t keys8 = (keys + 7) / 8 * 8;
    const typename Pool::T* kb = p.k + page * page_floats;
    const typename Pool::T* vb = p.v + page * page_floats;
    const int64_t next = j + kPrefetchPages < used ? table[j + kPrefetchPages] : -1;
    const bool ahead = next >= 0 && next < p.num_pages;
    prefetch.Start(ahead ? p.k + next * page_floats : nullptr,
                   ahead ? p.v + next * page_floats : nullptr, page_lines,
                   std::max<int64_t>(1, prefetch_steps));
    // Every KV head's query rows against this page, read as P from k_page and v_page.
    auto heads = [&](auto tag, const auto* k_page, const auto* v_page) {
      using P = typename decltype(tag)::type;
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t first = std::max(r0, h * per_head), end = std::min(r1, (h + 1) * per_head);
        // Scores, kTileRows of the head's query rows at a time; slots past `keys` masked.
        for (int64_t r = first; r < end; r += kTileRows) {
          ForTile(std::min<int64_t>(kTileRows, end - r), [&](auto mr) {
            ScoreRows<decltype(mr)::value, P>(w.q.data() + r * d, d, k_page + h * d, key_stride,
                                              keys, ps, w.s.data() + r * kMaxPage, prefetch);
          });
        }
        for (int64_t r = first; r < end; ++r) {
          float* s = w.s.data() + r * kMaxPage;
          // Keys of this page the row sees: all `keys`, or fewer past a causal query.
          const int64_t seen = std::min(keys, limit_of_row(r) - j * ps);
          if (seen <= 0) {  // none: weights 0, its running state unchanged
            std::fill(s, s + keys8, 0.0f);
            continue;
          }
          for (int64_t t = seen; t < keys8; ++t) s[t] = kMaskValue;
          // Online softmax: new max, rescale what came before, probabilities in place.
          __m256 mx8 = _mm256_set1_ps(w.m[r]);
          for (int64_t t = 0; t < keys8; t += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + t));
          const float mx = HorizontalMax(mx8);
          const float rescale = std::exp(w.m[r] - mx);
          const __m256 mv = _mm256_set1_ps(mx);
          __m256 sum = _mm256_setzero_ps();
          for (int64_t t = 0; t < keys8; t += 8) {
            const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
            _mm256_storeu_ps(s + t, e);
            sum = _mm256_add_ps(sum, e);
          }
          w.l[r] = w.l[r] * rescale + HorizontalSum(sum);
          w.m[r] = mx;
          if (rescale != 1.0f) {
            float* acc = w.acc.data() + r * d;
            const __m256 rs = _mm256_set1_ps(rescale);
            for (int64_t c = 0; c < d; c += 8) {
              _mm256_storeu_ps(acc + c, _mm256_mul_ps(_mm256_loadu_ps(acc + c), rs));
            }
          }
        }
        // Values: acc[r] += sum_t p[r, t] v[t], kTileRows of the head's query rows at a time.
        for (int64_t r = first; r < end; r += kTileRows) {
          prefetch.Step();
          ForTile(std::min<int64_t>(kTileRows, end - r), [&](auto mr) {
            AccumulateValues<decltype(mr)::value, P>(w.acc.data() + r * d, d,
                                                     w.s.data() + r * kMaxPage, v_page + h * d,
                                                     key_stride, keys);
          });
        }
      }
    };
    if (widen) {
      Widen<Pool>(kb, page_floats, w.k.data());
      Widen<Pool>(vb, page_floats, w.v.data());
      heads(Tag<F32Pool>(), w.k.data(), w.v.data());
    } else {
      heads(Tag<Pool>(), kb, vb);
    }
  }
  for (int64_t h = 0; h < p.hkv; ++h) {
    for (int64_t i = 0; i < nq; ++i) {
      for (int64_t j = 0; j < g; ++j) {
        const int64_t r = (h * nq + i) * g + j, head = (row0 + i) * p.hq + h * g + j;
        if (r < r0 || r >= r1) continue;
        float* o = p.out + head * d;
        if (limit_of_row(r) == 0) {
          std::fill(o, o + d, 0.0f);
          p.lse[head] = kMaskValue;
          continue;
        }
        const float inv = 1.0f / w.l[r];
        for (int64_t c = 0; c < d; ++c) o[c] = w.acc[r * d + Pool::Slot(c)] * inv;
        p.lse[head] = w.m[r] + std::log(w.l[r]);
      }
    }
  }
}

// Queries per work item: a sequence's chunk is cut into items of at most this many queries,
// each reading its pages once for all of its queries (and, causal, only as far as its last
// query sees).
constexpr int64_t kItemQueries = 64;

template <class Pool, ffi::DataType kPoolType>
ffi::Error RaggedPagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                ffi::Buffer<kPoolType> k, ffi::Buffer<kPoolType> v,
                                ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> kv_len,
                                ffi::Buffer<ffi::S32> q_start, ffi::Buffer<ffi::S32> q_len,
                                ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> causal,
                                ffi::ResultBuffer<ffi::F32> out,
                                ffi::ResultBuffer<ffi::F32> lse) {
  const auto qd = q.dimensions(), kd = k.dimensions(), td = table.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || td.size() != 2 || kd[4] != qd[2] ||
      qd[1] % kd[3] != 0 || qd[2] % (8 * Pool::kVecs) != 0 || kd[2] > kMaxPage ||
      v.element_count() != k.element_count() || kv_len.element_count() != td[0] ||
      q_start.element_count() != td[0] || q_len.element_count() != td[0]) {
    return ffi::Error::InvalidArgument(
        "ragged_paged_attention: want q[T, Hq, D], pools[L, N, page<=256, Hkv, D], "
        "table[S, P], kv_len/q_start/q_len[S], D % 8 == 0 (f32) or D % 16 == 0 (bf16), "
        "Hq % Hkv == 0");
  }
  const int64_t l = static_cast<int64_t>(*layer.typed_data());
  if (l < 0 || l >= kd[0]) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: layer index out of range");
  }
  Problem<Pool> p;
  const int64_t layer_size = kd[1] * kd[2] * kd[3] * kd[4];
  p.q = q.typed_data();
  p.k = reinterpret_cast<const typename Pool::T*>(k.typed_data()) + l * layer_size;
  p.v = reinterpret_cast<const typename Pool::T*>(v.typed_data()) + l * layer_size;
  p.table = table.typed_data();
  p.kv_len = kv_len.typed_data();
  p.q_start = q_start.typed_data();
  p.q_len = q_len.typed_data();
  p.out = out->typed_data();
  p.lse = lse->typed_data();
  p.causal = *causal.typed_data() != 0;
  p.tokens = qd[0];
  p.hq = qd[1];
  p.d = qd[2];
  p.seqs = td[0];
  p.num_pages = kd[1];
  p.page = kd[2];
  p.hkv = kd[3];
  p.pages_per_row = td[1];
  const int64_t g = p.hq / p.hkv;
  // Each sequence's queries in items of at most kItemQueries; rows no sequence owns (padding,
  // or tokens outside every group) come out as "no keys".
  std::vector<char> owned(p.tokens, 0);
  std::vector<Item> items;
  for (int64_t n = 0; n < p.seqs; ++n) {
    const int64_t start = p.q_start[n], count = p.q_len[n];
    if (count <= 0) continue;
    if (start < 0 || start + count > p.tokens) {
      return ffi::Error::InvalidArgument("ragged_paged_attention: query rows out of range");
    }
    for (int64_t i0 = 0; i0 < count; i0 += kItemQueries) {
      const int64_t nq = std::min(kItemQueries, count - i0);
      items.push_back({n, i0, nq, 0, p.hkv * nq * g});
    }
    std::fill(owned.begin() + start, owned.begin() + start + count, 1);
  }
  for (int64_t t = 0; t < p.tokens; ++t) {
    if (owned[t]) continue;
    std::fill(p.out + t * p.hq * p.d, p.out + (t + 1) * p.hq * p.d, 0.0f);
    std::fill(p.lse + t * p.hq, p.lse + (t + 1) * p.hq, kMaskValue);
  }
  // Fewer items than twice the threads (a step's one or two prefix groups) are cut into parts
  // of whole score tiles, so that every thread has work: a part reads the pages of its own
  // KV heads only, at the cost of reading a head's pages once per part that holds its rows.
  const int64_t threads = batchjax::NumThreads(pool);
  const int64_t want = items.empty() ? 1 : (2 * threads + items.size() - 1) / items.size();
  std::vector<Item> parts;
  for (const Item& it : items) {
    const int64_t per_head = it.nq * g, tiles_per_head = (per_head + kTileRows - 1) / kTileRows;
    const int64_t units = p.hkv * tiles_per_head, n_parts = std::min(units, want);
    const int64_t hkv = p.hkv;
    auto unit_row = [=](int64_t u) {  // first query row of score tile u (head-major)
      return u >= units ? hkv * per_head
                        : (u / tiles_per_head) * per_head + (u % tiles_per_head) * kTileRows;
    };
    for (int64_t part = 0; part < n_parts; ++part) {
      parts.push_back({it.n, it.i0, it.nq, unit_row(part * units / n_parts),
                       unit_row((part + 1) * units / n_parts)});
    }
  }
  batchjax::ParallelFor(pool, parts.size(), [&p, &parts] {
    return [&p, &parts, scratch = Scratch()](int64_t i) mutable { RunItem(p, parts[i], scratch); };
  });
  if (p.bad_page.load()) {
    return ffi::Error::InvalidArgument("ragged_paged_attention: page index out of range");
  }
  return ffi::Error::Success();
}

template <ffi::DataType kPoolType>
auto Binding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<kPoolType>>()
      .template Arg<ffi::Buffer<kPoolType>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchjaxRaggedPagedAttentionF32,
                              (RaggedPagedAttention<F32Pool, ffi::F32>), Binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchjaxRaggedPagedAttentionBF16,
                              (RaggedPagedAttention<BF16Pool, ffi::U16>), Binding<ffi::U16>());
