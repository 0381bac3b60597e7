// bf16 values, kept as uint16 bit patterns (the top half of an f32's), widened to f32 in
// registers: this CPU has no bf16 arithmetic, so the kernels do f32 arithmetic on them.
#ifndef BATCHJAX_KERNELS_BF16_H_
#define BATCHJAX_KERNELS_BF16_H_

#include <immintrin.h>

#include <cstdint>

namespace batchjax {

// 16 consecutive bf16 values as two 8-lane f32 vectors: the even-indexed ones (0, 2, ..., 14)
// and the odd-indexed ones (1, 3, ..., 15). A shift and a mask, no shuffle: callers store or
// keep their data in that order.
inline void WidenBF16x16(const uint16_t* p, __m256& even, __m256& odd) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(-65536)));
}

}  // namespace batchjax

#endif  // BATCHJAX_KERNELS_BF16_H_
