// y[M, N] = x[M, K] @ W[layer] for bf16 weights on CPUs with AVX512-BF16 (Intel Cooper Lake,
// Sapphire Rapids and later; AMD Zen 4 and later): VDPBF16PS multiplies pairs of bf16 values
// and adds both products to an f32 lane, 32 multiply-adds per instruction where AVX2's FMA
// does 8 on widened values.
//
// The weights of every layer live in one array w[L, P, K/2, 32] (P = N / 16): panel p holds
// columns 16p..16p+15 with the rows taken in pairs, each pair stored column by column
// (w[2j, c], w[2j + 1, c]), which is the operand layout of the instruction. The rows of x are
// rounded to bf16 once per call (exact when they are bf16 values already, as in a bf16
// model); each pair of a row is then broadcast against a panel's pair of rows. Products are
// exact in f32 and the sums are f32, as the AVX2 kernel's.
//
// This file is compiled with the same flags as the others; only the functions between the
// target pragmas use AVX-512, and the engine calls them only where the CPU reports
// avx512_bf16 (`batchjax.kernels.native.cpu_features`). Only the first `rows` rows of x are
// multiplied; the rest of y is zero.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;
constexpr int64_t kRows = 8;        // rows per micro-kernel: 8 x 2 panels = 16 accumulators
constexpr int64_t kRowBlock = 64;
constexpr int64_t kChunkBytes = 256 * 1024;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

// f32 -> bf16 bits, rounded to nearest even (the values here are finite).
inline uint32_t RoundBF16(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return (u + 0x7FFF + ((u >> 16) & 1)) >> 16;
}

// x[rows, K] f32 -> xb[rows, K/2] pairs of bf16 (x[2j] in the low half).
void ToBF16Pairs(const float* x, int64_t rows, int64_t k_dim, uint32_t* xb) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * k_dim;
    uint16_t* dst = reinterpret_cast<uint16_t*>(xb + r * (k_dim / 2));
    int64_t c = 0;
    for (; c + 32 <= k_dim; c += 32) {
      const __m512 lo = _mm512_loadu_ps(src + c), hi = _mm512_loadu_ps(src + c + 16);
      _mm512_storeu_si512(dst + c, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; c < k_dim; ++c) dst[c] = static_cast<uint16_t>(RoundBF16(src[c]));
  }
}

// MR rows x NP panels: acc[m][p] += sum_j xb[m, j] . w_p[j] over the K/2 pairs.
template <int MR, int NP>
__attribute__((always_inline)) inline void Micro(const uint32_t* xb, int64_t ldx,
                                                 const uint16_t* w, int64_t panel_stride,
                                                 int64_t pairs, float* y, int64_t ldy) {
  __m512 acc[MR][NP];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < pairs; ++j) {
    __m512bh b[NP];
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) {
      b[p] = (__m512bh)_mm512_loadu_si512(w + p * panel_stride + j * 2 * kPanel);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xb[m * ldx + j]));
#pragma GCC unroll 2
      for (int p = 0; p < NP; ++p) acc[m][p] = _mm512_dpbf16_ps(acc[m][p], a, b[p]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 2
    for (int p = 0; p < NP; ++p) _mm512_storeu_ps(y + m * ldy + p * kPanel, acc[m][p]);
  }
}

template <int NP>
void RowsOfPanels(const uint32_t* xb, int64_t pairs, const uint16_t* w, int64_t panel_stride,
                  float* y, int64_t n_dim, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) {
    Micro<kRows, NP>(xb + r * pairs, pairs, w, panel_stride, pairs, y + r * n_dim, n_dim);
  }
  const uint32_t* x = xb + r * pairs;
  float* yr = y + r * n_dim;
  switch (r1 - r) {
    case 7: Micro<7, NP>(x, pairs, w, panel_stride, pairs, yr, n_dim); break;
    case 6: Micro<6, NP>(x, pairs, w, panel_stride, pairs, yr, n_dim); break;
    case 5: Micro<5, NP>(x, pairs, w, panel_stride, pairs, yr, n_dim); break;
    case 4: Micro<4, NP>(x, pairs, w, panel_stride, pairs, yr, n_dim); break;
    case 3: Micro<3, NP>(x, pairs, w, panel_stride, pairs, yr, n_dim); break;
    case 2: Micro<2, NP>(x, pairs, w, panel_stride, pairs, yr, n_dim); break;
    case 1: Micro<1, NP>(x, pairs, w, panel_stride, pairs, yr, n_dim); break;
    default: break;
  }
}

struct Problem {
  const uint32_t* xb;  // [M, K/2]
  const uint16_t* w;   // this layer's panels [P, K/2, 32]
  float* y;
  int64_t m_dim, pairs, n_dim;
  int64_t row_blocks, chunk_panels, chunks;
};

void RunItem(const Problem& p, int64_t item) {
  const int64_t rb = item / p.chunks, chunk = item % p.chunks;
  const int64_t r0 = rb * kRowBlock, r1 = std::min(p.m_dim, r0 + kRowBlock);
  const int64_t p0 = chunk * p.chunk_panels;
  const int64_t p1 = std::min(p.n_dim / kPanel, p0 + p.chunk_panels);
  const int64_t stride = p.pairs * 2 * kPanel;
  int64_t panel = p0;
  for (; panel + 2 <= p1; panel += 2) {
    RowsOfPanels<2>(p.xb, p.pairs, p.w + panel * stride, stride, p.y + panel * kPanel, p.n_dim,
                    r0, r1);
  }
  if (panel < p1) {
    RowsOfPanels<1>(p.xb, p.pairs, p.w + panel * stride, stride, p.y + panel * kPanel, p.n_dim,
                    r0, r1);
  }
}

#pragma GCC pop_options

// AMX (Sapphire Rapids and later): TDPBF16PS multiplies a 16 x 32 tile of bf16 rows of x by
// a 16 x 32 tile of a panel's row pairs (the same "pairs" layout) into a 16 x 16 f32 tile,
// 8,192 multiply-adds an instruction. Each item takes 32 rows (two x tiles) against two
// panels at a time: four accumulator tiles, two x tiles and two weight tiles, all eight.
constexpr int64_t kAmxRowBlock = 128;
constexpr int64_t kTileRows = 16;

struct TileConfig {
  uint8_t palette, start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows of 64 bytes. A constant in memory: built on the stack, its stores were
// dropped by the optimiser, which does not see LDTILECFG read them.
alignas(64) const TileConfig kTileConfig = {
    1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};

// Linux hands out AMX state only to processes that ask; once per process.
bool AmxPermitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

bool UseAmx(int64_t k_dim) {
  const char* mode = std::getenv("BATCHJAX_CPU_BF16");
  if (mode != nullptr && std::strcmp(mode, "avx512") == 0) return false;
  return k_dim % 32 == 0 && __builtin_cpu_supports("amx-bf16") &&
         __builtin_cpu_supports("amx-tile") && AmxPermitted();
}

#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f")

// A worker thread's tile configuration, loaded before its first item and released after.
struct AmxThread {
  AmxThread() { _tile_loadconfig(&kTileConfig); }
  ~AmxThread() { _tile_release(); }
  AmxThread(const AmxThread&) = delete;
};

// _tile_stored names its tile by a literal.
inline void StoreTile(int tile, void* dst, int64_t stride) {
  switch (tile) {
    case 0: _tile_stored(0, dst, stride); break;
    case 1: _tile_stored(1, dst, stride); break;
    case 2: _tile_stored(2, dst, stride); break;
    default: _tile_stored(3, dst, stride); break;
  }
}

// y[r0 .. r0 + 32, 16 NP columns from panel] for x rows padded with zeros to 32.
template <int NP>
void AmxBlock(const uint16_t* xb, int64_t k_dim, const uint16_t* w, int64_t panel_stride,
              float* y, int64_t n_dim, int64_t real_rows, float* scratch) {
  _tile_zero(0);
  _tile_zero(1);
  if (NP == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int64_t x_stride = k_dim * 2;  // bytes per bf16 row of x
  for (int64_t k = 0; k < k_dim; k += 32) {
    _tile_loadd(4, xb + k, x_stride);
    _tile_loadd(5, xb + kTileRows * k_dim + k, x_stride);
    _tile_loadd(6, w + (k / 2) * 32, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (NP == 2) {
      _tile_loadd(7, w + panel_stride + (k / 2) * 32, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  // Tiles of rows that are all real go straight to y; others through scratch.
  auto store = [&](int tile, int64_t row, int64_t col) {
    const int64_t rows = std::min<int64_t>(kTileRows, real_rows - row);
    if (rows <= 0) return;
    if (rows == kTileRows) {
      StoreTile(tile, y + row * n_dim + col, n_dim * 4);
      return;
    }
    StoreTile(tile, scratch, kPanel * 4);
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(y + (row + r) * n_dim + col, scratch + r * kPanel, kPanel * 4);
    }
  };
  store(0, 0, 0);
  store(1, kTileRows, 0);
  if (NP == 2) {
    store(2, 0, kPanel);
    store(3, kTileRows, kPanel);
  }
}

#pragma GCC pop_options

struct AmxProblem {
  const uint16_t* xb;  // [M padded to 32, K] bf16
  const uint16_t* w;   // this layer's panels [P, K/2, 32]
  float* y;
  int64_t m_dim, k_dim, n_dim;
  int64_t row_blocks, chunk_panels, chunks;
};

void RunAmxItem(const AmxProblem& p, int64_t item, float* scratch) {
  const int64_t rb = item / p.chunks, chunk = item % p.chunks;
  const int64_t r0 = rb * kAmxRowBlock, r1 = std::min(p.m_dim, r0 + kAmxRowBlock);
  const int64_t p0 = chunk * p.chunk_panels;
  const int64_t p1 = std::min(p.n_dim / kPanel, p0 + p.chunk_panels);
  const int64_t stride = p.k_dim * kPanel;  // uint16 values per panel
  for (int64_t panel = p0; panel < p1; panel += 2) {
    for (int64_t r = r0; r < r1; r += 2 * kTileRows) {
      const uint16_t* x = p.xb + r * p.k_dim;
      float* y = p.y + r * p.n_dim + panel * kPanel;
      if (panel + 2 <= p1) {
        AmxBlock<2>(x, p.k_dim, p.w + panel * stride, stride, y, p.n_dim, r1 - r, scratch);
      } else {
        AmxBlock<1>(x, p.k_dim, p.w + panel * stride, stride, y, p.n_dim, r1 - r, scratch);
      }
    }
  }
}

ffi::Error AmxMatmul(ffi::ThreadPool& pool, const float* x, const uint16_t* w, float* y,
                     int64_t m_dim, int64_t k_dim, int64_t panels) {
  const int64_t padded = (m_dim + 2 * kTileRows - 1) / (2 * kTileRows) * (2 * kTileRows);
  std::vector<uint32_t> xb(padded * (k_dim / 2), 0);
  ToBF16Pairs(x, m_dim, k_dim, xb.data());
  AmxProblem p;
  p.xb = reinterpret_cast<const uint16_t*>(xb.data());
  p.w = w;
  p.y = y;
  p.m_dim = m_dim;
  p.k_dim = k_dim;
  p.n_dim = panels * kPanel;
  p.row_blocks = (m_dim + kAmxRowBlock - 1) / kAmxRowBlock;
  const int64_t threads = batchjax::NumThreads(pool);
  int64_t chunk = std::max<int64_t>(2, kChunkBytes / (k_dim * kPanel * 2));
  chunk = std::max<int64_t>(2, std::min(chunk, panels * p.row_blocks / (4 * threads)));
  chunk &= ~int64_t{1};
  p.chunk_panels = chunk;
  p.chunks = (panels + chunk - 1) / chunk;
  batchjax::ParallelFor(pool, p.row_blocks * p.chunks, [&p] {
    return [&p, amx = std::make_shared<AmxThread>(),
            scratch = std::vector<float>(kTileRows * kPanel)](int64_t item) mutable {
      RunAmxItem(p, item, scratch.data());
    };
  });
  return ffi::Error::Success();
}

ffi::Error PackedMatmulBF16Pairs(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<ffi::U16> w, ffi::Buffer<ffi::S32> layer,
                                 ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[3] != 2 * kPanel || xd[1] % 2 != 0 ||
      wd[2] * 2 != xd[1]) {
    return ffi::Error::InvalidArgument(
        "packed_matmul_bf16_pairs: want x[M, K] (K even) and w[L, N/16, K/2, 32]");
  }
  const int64_t num_layers = wd[0], panels = wd[1], k_dim = xd[1];
  const int64_t l = static_cast<int64_t>(*layer.typed_data());
  if (l < 0 || l >= num_layers) {
    return ffi::Error::InvalidArgument("packed_matmul_bf16_pairs: layer index out of range");
  }
  const int64_t m_dim = std::clamp<int64_t>(*rows.typed_data(), 0, xd[0]);
  float* const y_pad = y->typed_data() + m_dim * panels * kPanel;
  std::fill(y_pad, y_pad + (xd[0] - m_dim) * panels * kPanel, 0.0f);
  if (m_dim == 0 || panels == 0) return ffi::Error::Success();

  const uint16_t* w_layer = w.typed_data() + l * panels * k_dim * kPanel;
  if (UseAmx(k_dim)) {
    return AmxMatmul(pool, x.typed_data(), w_layer, y->typed_data(), m_dim, k_dim, panels);
  }
  std::vector<uint32_t> xb(m_dim * (k_dim / 2));
  ToBF16Pairs(x.typed_data(), m_dim, k_dim, xb.data());
  Problem p;
  p.xb = xb.data();
  p.w = w_layer;
  p.y = y->typed_data();
  p.m_dim = m_dim;
  p.pairs = k_dim / 2;
  p.n_dim = panels * kPanel;
  p.row_blocks = (m_dim + kRowBlock - 1) / kRowBlock;
  const int64_t threads = batchjax::NumThreads(pool);
  // Panels per item: as many as fit the chunk budget, but at least 4 items per thread, and
  // an even number so that items take panels two at a time.
  int64_t chunk = std::max<int64_t>(1, kChunkBytes / (k_dim * kPanel * 2));
  chunk = std::max<int64_t>(1, std::min(chunk, panels * p.row_blocks / (4 * threads)));
  if (chunk > 1) chunk &= ~int64_t{1};
  p.chunk_panels = chunk;
  p.chunks = (panels + chunk - 1) / chunk;
  batchjax::ParallelFor(pool, p.row_blocks * p.chunks, [&p] {
    return [&p](int64_t item) { RunItem(p, item); };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchjaxPackedMatmulBF16Pairs, PackedMatmulBF16Pairs,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
