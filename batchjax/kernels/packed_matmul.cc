// y[M, N] = x[M, K] @ W[layer] for weights packed in 16-column panels, on x86-64 AVX2 + FMA:
// f32 weights, or bf16 weights (as uint16 bit patterns) converted to f32 as they are read; x
// and y are f32 either way.
//
// The weights of every layer live in one array w[L, P, K, 16] (P = N / 16): panel p of layer l
// holds columns 16p..16p+15, row by row, so the inner loop reads 64 (f32) or 32 (bf16)
// contiguous bytes per k. A bf16 panel row is stored interleaved, columns 0, 8, 1, 9, ..., 7,
// 15, so that a shift and a mask split it into columns 0..7 and 8..15 with no shuffle.
// The layer is an operand, so a scan over layers passes the whole stacked array by reference
// and no per-layer slice is copied.
//
// Only the first `rows` rows of x are multiplied; the rest of y is zero. A step's token count
// is padded up to a bucket so that it reuses a compiled program, and the padding rows would
// otherwise cost as much as real ones: a decode step of 1 row ran the products of 16.
//
// Work is cut into (row block, panel chunk) items sized for the L2 cache and shared between the
// calling thread and XLA's intra-op pool (parallel.h).

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "bf16.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;   // columns per panel: two 8-lane registers
constexpr int64_t kRows = 6;     // rows per micro-kernel: 12 accumulators of 16 registers
constexpr int64_t kRowBlock = 48;
constexpr int64_t kChunkBytes = 256 * 1024;

// A panel row's 16 weights as two 8-lane f32 vectors (columns 0..7 and 8..15).
inline void LoadPanelRow(const float* w, __m256& w0, __m256& w1) {
  w0 = _mm256_loadu_ps(w);
  w1 = _mm256_loadu_ps(w + 8);
}

// bf16 panel rows are stored interleaved, so the even values are columns 0..7.
inline void LoadPanelRow(const uint16_t* w, __m256& w0, __m256& w1) {
  batchjax::WidenBF16x16(w, w0, w1);
}

template <int MR, class W>
__attribute__((always_inline)) inline void Micro(const float* x, int64_t ldx, const W* w,
                                                 int64_t k_dim, float* y, int64_t ldy) {
  __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    acc0[m] = _mm256_setzero_ps();
    acc1[m] = _mm256_setzero_ps();
  }
  for (int64_t k = 0; k < k_dim; ++k) {
    __m256 w0, w1;
    LoadPanelRow(w + k * kPanel, w0, w1);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 b = _mm256_broadcast_ss(x + m * ldx + k);
      acc0[m] = _mm256_fmadd_ps(b, w0, acc0[m]);
      acc1[m] = _mm256_fmadd_ps(b, w1, acc1[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    _mm256_storeu_ps(y + m * ldy, acc0[m]);
    _mm256_storeu_ps(y + m * ldy + 8, acc1[m]);
  }
}

template <class W>
struct Problem {
  const float* x;
  const W* w;  // this layer's panels [P, K, 16]
  float* y;
  int64_t m_dim, k_dim, n_dim;
  int64_t row_blocks, chunk_panels, chunks;
};

template <class W>
void RunItem(const Problem<W>& p, int64_t item) {
  const int64_t rb = item / p.chunks, chunk = item % p.chunks;
  const int64_t r0 = rb * kRowBlock, r1 = std::min(p.m_dim, r0 + kRowBlock);
  const int64_t p0 = chunk * p.chunk_panels;
  const int64_t p1 = std::min(p.n_dim / kPanel, p0 + p.chunk_panels);
  for (int64_t panel = p0; panel < p1; ++panel) {
    const W* w = p.w + panel * p.k_dim * kPanel;
    float* y = p.y + panel * kPanel;
    int64_t r = r0;
    for (; r + kRows <= r1; r += kRows) {
      Micro<kRows>(p.x + r * p.k_dim, p.k_dim, w, p.k_dim, y + r * p.n_dim, p.n_dim);
    }
    const float* x = p.x + r * p.k_dim;
    float* yr = y + r * p.n_dim;
    switch (r1 - r) {
      case 5: Micro<5>(x, p.k_dim, w, p.k_dim, yr, p.n_dim); break;
      case 4: Micro<4>(x, p.k_dim, w, p.k_dim, yr, p.n_dim); break;
      case 3: Micro<3>(x, p.k_dim, w, p.k_dim, yr, p.n_dim); break;
      case 2: Micro<2>(x, p.k_dim, w, p.k_dim, yr, p.n_dim); break;
      case 1: Micro<1>(x, p.k_dim, w, p.k_dim, yr, p.n_dim); break;
      default: break;
    }
  }
}

template <class W, ffi::DataType kWeightType>
ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<kWeightType> w,
                        ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> rows,
                        ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || wd[3] != kPanel || wd[2] != xd[1]) {
    return ffi::Error::InvalidArgument("packed_matmul: want x[M, K] and w[L, N/16, K, 16]");
  }
  const int64_t num_layers = wd[0], panels = wd[1], k_dim = xd[1];
  const int64_t l = static_cast<int64_t>(*layer.typed_data());
  if (l < 0 || l >= num_layers) {
    return ffi::Error::InvalidArgument("packed_matmul: layer index out of range");
  }
  const int64_t m_dim = std::clamp<int64_t>(*rows.typed_data(), 0, xd[0]);
  float* const y_pad = y->typed_data() + m_dim * panels * kPanel;
  std::fill(y_pad, y_pad + (xd[0] - m_dim) * panels * kPanel, 0.0f);
  if (m_dim == 0 || panels == 0) return ffi::Error::Success();

  Problem<W> p;
  p.x = x.typed_data();
  p.w = reinterpret_cast<const W*>(w.typed_data()) + l * panels * k_dim * kPanel;
  p.y = y->typed_data();
  p.m_dim = m_dim;
  p.k_dim = k_dim;
  p.n_dim = panels * kPanel;
  p.row_blocks = (m_dim + kRowBlock - 1) / kRowBlock;
  const int64_t threads = batchjax::NumThreads(pool);
  // Panels per item: as many as fit the chunk budget, but at least 4 items per thread.
  int64_t chunk = std::max<int64_t>(1, kChunkBytes / (k_dim * kPanel * sizeof(W)));
  chunk = std::max<int64_t>(1, std::min(chunk, panels * p.row_blocks / (4 * threads)));
  p.chunk_panels = chunk;
  p.chunks = (panels + chunk - 1) / chunk;
  batchjax::ParallelFor(pool, p.row_blocks * p.chunks, [&p] {
    return [&p](int64_t item) { RunItem(p, item); };
  });
  return ffi::Error::Success();
}

template <ffi::DataType kWeightType>
auto Binding() {
  return ffi::Ffi::Bind()
      .template Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<kWeightType>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchjaxPackedMatmulF32, (PackedMatmul<float, ffi::F32>),
                              Binding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(BatchjaxPackedMatmulBF16, (PackedMatmul<uint16_t, ffi::U16>),
                              Binding<ffi::U16>());
