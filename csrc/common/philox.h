// Philox4x32-10 and the attention-dropout counter layout, bit-identical to longattn/_dropout.py (whose
// module doc is the specification) and triton_kernels/_dropout.py.
//
//   key     k0 = seed & 0xffffffff, k1 = seed >> 32
//   c0:c1   (offset >> 2) + b*H + h            (uint64, wrapping; c0 low word)
//   c2      key-group word: j >> 2 (band key j), 0x80000000 | (g >> 2) (side key g)
//   c3      row word: i (query i), 0x80000000 | s (Longformer global row of slot s; its keys j are side keys)
//   lane    j & 3 / g & 3 selects output word x, y, z or w
//   keep    bits >= threshold, threshold = ceil(p * 2^32) (uint32); kept probabilities scaled 1 / (1 - p)
//
// Four consecutive keys 4q..4q+3 of a row share one Philox call. In an mma.m16n8k16 accumulator fragment a
// lane holds columns (2t, 2t+1) of rows r and r+8, so lanes 2u and 2u+1 together hold one 4-key group for
// two rows: each computes philox4 for one of the two rows and they swap the other row's two words with
// __shfl_xor_sync(mask, word, 1). No Philox output is wasted.
//
// Everything is __host__ __device__ (plain inline in a host compiler), so tests compile this header with g++
// and compare its bits against the torch reference.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LONGATTN_PHILOX_FN __host__ __device__ __forceinline__
#else
#define LONGATTN_PHILOX_FN inline
#endif

namespace longattn {
namespace philox {

// Random123's PHILOX_M4x32_0/1 (round multipliers) and PHILOX_W32_0/1 (Weyl key increments).
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
// Flag bits of the key-group word (side keys) and of the row word (Longformer global rows).
constexpr uint32_t kSideKeyFlag = 0x80000000u;
constexpr uint32_t kGlobalRowFlag = 0x80000000u;

struct Words4 {
  uint32_t x, y, z, w;
};

LONGATTN_PHILOX_FN uint32_t mulhi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// philox4x32_R(10, ctr, {k0, k1}) of Random123.
LONGATTN_PHILOX_FN Words4 philox4x32_10(Words4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = mulhi(kM1, c.z), lo1 = kM1 * c.z;
    c = Words4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kW0;
    k1 += kW1;
  }
  return c;
}

// The per-(batch, head) part of the counter and the key: computed once per program / thread block.
struct DropoutRng {
  uint32_t k0, k1;  // key = seed
  uint32_t c0, c1;  // (offset >> 2) + bh
};

// seed, offset: uint64 (torch's Generator.philox_state values; kernels read them from the int64 [seed, offset]
// device tensor, so CUDA-graph replays see refilled values). bh = b * H + h.
LONGATTN_PHILOX_FN DropoutRng dropout_rng(uint64_t seed, uint64_t offset, uint32_t bh) {
  const uint64_t base = (offset >> 2) + bh;
  return DropoutRng{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), static_cast<uint32_t>(base),
                    static_cast<uint32_t>(base >> 32)};
}

LONGATTN_PHILOX_FN DropoutRng dropout_rng(const int64_t* rng, uint32_t bh) {
  return dropout_rng(static_cast<uint64_t>(rng[0]), static_cast<uint64_t>(rng[1]), bh);
}

// Key-group words (c2) of band key position j and side key g; row words (c3) of query i and of the global row
// of slot s (whose keys, all tokens j, use side_group_word(j)).
LONGATTN_PHILOX_FN uint32_t band_group_word(int64_t j) { return static_cast<uint32_t>(j >> 2); }
LONGATTN_PHILOX_FN uint32_t side_group_word(int64_t g) { return kSideKeyFlag | static_cast<uint32_t>(g >> 2); }
LONGATTN_PHILOX_FN uint32_t row_word(int64_t i) { return static_cast<uint32_t>(i); }
LONGATTN_PHILOX_FN uint32_t global_row_word(int64_t s) { return kGlobalRowFlag | static_cast<uint32_t>(s); }

// Bits of keys 4q..4q+3 (x, y, z, w) of one row: group = band_group_word / side_group_word, row = row_word /
// global_row_word.
LONGATTN_PHILOX_FN Words4 dropout_bits4(const DropoutRng& r, uint32_t group, uint32_t row) {
  return philox4x32_10(Words4{r.c0, r.c1, group, row}, r.k0, r.k1);
}

LONGATTN_PHILOX_FN uint32_t lane_of(const Words4& v, uint32_t lane) {
  return lane == 0 ? v.x : lane == 1 ? v.y : lane == 2 ? v.z : v.w;
}

// Bits of one entry (band key j, or side key g with `side`): a full Philox call for one word.
LONGATTN_PHILOX_FN uint32_t dropout_bits(const DropoutRng& r, int64_t key, bool side, uint32_t row) {
  const uint32_t group = side ? side_group_word(key) : band_group_word(key);
  return lane_of(dropout_bits4(r, group, row), static_cast<uint32_t>(key & 3));
}

LONGATTN_PHILOX_FN bool keep(uint32_t bits, uint32_t threshold) { return bits >= threshold; }

// Host side: the uint32 threshold of probability p in [0, 1): ceil(p * 2^32), at most 2^32 - 1.
inline uint32_t keep_threshold(double p) {
  const double t = p * 4294967296.0;  // exact: a power-of-two scaling
  const uint64_t c = static_cast<uint64_t>(t) + (static_cast<double>(static_cast<uint64_t>(t)) < t ? 1 : 0);
  return c > 0xFFFFFFFFull ? 0xFFFFFFFFu : static_cast<uint32_t>(c);
}

}  // namespace philox
}  // namespace longattn

#undef LONGATTN_PHILOX_FN
