// Counter-based random task orders, the same on the CPU and the GPU: Philox4x32-10 (Salmon et
// al., SC 2011, "Parallel random numbers: as easy as 1, 2, 3"; the generator behind cuRAND's
// and torch's CUDA RNG) keyed by a 64-bit seed, with the counter (step, problem, row, draw).
// A state tensor [seed, step] lives on the Gram's device and is advanced there, so drawing
// needs no host value: sync-free, and a CUDA graph replay draws fresh orders each time.
// The spec is mtlfast/ops/solvers.py: pcgrad_orders_reference (pure Python integers).
#pragma once

#include <cstdint>

#include "team.h"  // MTLFAST_HD, MTLFAST_FORCEINLINE

namespace mtlfast {
namespace core {

MTLFAST_HD MTLFAST_FORCEINLINE void philox4x32_10(const uint32_t ctr_in[4], uint64_t seed,
                                                  uint32_t out[4]) {
  uint32_t c0 = ctr_in[0], c1 = ctr_in[1], c2 = ctr_in[2], c3 = ctr_in[3];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// Row `row` of problem `problem`'s orders at step `step`: a uniformly random permutation of
// 0..T-1 by Fisher-Yates (position j = T-1 .. 1 takes draw d = T-1-j). Draw d is word d % 4 of
// Philox at counter (d / 4, row, problem, low 32 bits of step), keyed by the seed XOR the high
// 32 bits of step; the index is floor(word * (j + 1) / 2^32) (Lemire; bias below 2^-25).
MTLFAST_HD inline void random_order(uint64_t seed, uint64_t step, uint32_t problem,
                                    uint32_t row, int T, int64_t* order) {
  for (int i = 0; i < T; ++i) order[i] = i;
  const uint64_t key = seed ^ (step & 0xFFFFFFFF00000000ull);
  uint32_t words[4];
  for (int j = T - 1, d = 0; j >= 1; --j, ++d) {
    if ((d & 3) == 0) {
      const uint32_t ctr[4] = {static_cast<uint32_t>(d >> 2), row, problem,
                               static_cast<uint32_t>(step)};
      philox4x32_10(ctr, key, words);
    }
    const uint32_t pick =
        static_cast<uint32_t>((static_cast<uint64_t>(words[d & 3]) * (j + 1)) >> 32);
    const int64_t tmp = order[j];
    order[j] = order[pick];
    order[pick] = tmp;
  }
}

}  // namespace core
}  // namespace mtlfast
