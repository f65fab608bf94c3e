// Rounding of float to the 16-bit formats, bit-exact with cuda_fp16.h and
// cuda_bf16.h: IEEE rounding (subnormals, overflow to infinity or to the largest finite
// value as the mode says), and NaN becomes the canonical 0x7FFF that CUDA's
// conversions return.
#pragma once

#include <cstdint>
#include <cstring>

namespace bspf_emulation {

enum class Round { kNearestEven, kTowardZero, kDown, kUp };

// A binary format with `ExpBits` exponent and `MantBits` stored mantissa bits (fp16: 5,
// 10; bf16: 8, 7).
template <int ExpBits, int MantBits>
inline uint16_t round_to_16bit(float value, Round mode) {
  constexpr int kSrcMant = 23, kSrcBias = 127;
  constexpr uint64_t kSrcExpMask = 0xFF;
  uint32_t b32;
  std::memcpy(&b32, &value, 4);
  const uint64_t bits = b32;
  const bool negative = (bits >> 31) & 1;
  const uint16_t sign = negative ? 0x8000 : 0;
  const uint64_t exp_field = (bits >> kSrcMant) & kSrcExpMask;
  const uint64_t mant_field = bits & ((uint64_t{1} << kSrcMant) - 1);
  constexpr uint16_t kInf = static_cast<uint16_t>(((1u << ExpBits) - 1) << MantBits);

  if (exp_field == kSrcExpMask) return mant_field ? uint16_t{0x7FFF} : static_cast<uint16_t>(sign | kInf);
  if (exp_field == 0 && mant_field == 0) return sign;

  // value = m · 2^(e − kSrcMant), m with its implicit bit for normal numbers.
  const int e = exp_field ? static_cast<int>(exp_field) - kSrcBias : 1 - kSrcBias;
  const uint64_t m = exp_field ? (mant_field | (uint64_t{1} << kSrcMant)) : mant_field;

  // Quantise at the target's exponent te (its subnormal range below emin): q is the
  // target significand with its implicit bit, so the result's bits are
  // ((te − emin) << MantBits) + q, and a carry out of q moves into the exponent.
  constexpr int kBias = (1 << (ExpBits - 1)) - 1;
  constexpr int kEmin = 1 - kBias;
  const int te = e > kEmin ? e : kEmin;
  const int shift = kSrcMant - MantBits + (te - e);
  uint64_t q, rest, half;
  if (shift >= 64) {  // far below half the smallest subnormal
    q = 0;
    rest = m;
    half = ~uint64_t{0};
  } else {
    q = m >> shift;
    rest = m & ((uint64_t{1} << shift) - 1);
    half = shift ? uint64_t{1} << (shift - 1) : 0;
  }
  bool up = false;
  switch (mode) {
    case Round::kNearestEven: up = shift > 0 && (rest > half || (rest == half && (q & 1))); break;
    case Round::kTowardZero: up = false; break;
    case Round::kDown: up = negative && rest != 0; break;
    case Round::kUp: up = !negative && rest != 0; break;
  }
  const bool magnitude_up = mode == Round::kNearestEven || (mode == Round::kDown && negative) ||
                            (mode == Round::kUp && !negative);
  const int64_t scaled = (static_cast<int64_t>(te - kEmin) << MantBits) + static_cast<int64_t>(q + (up ? 1 : 0));
  if (scaled >= kInf) return static_cast<uint16_t>(sign | (magnitude_up ? kInf : kInf - 1));
  return static_cast<uint16_t>(sign | static_cast<uint16_t>(scaled));
}

}  // namespace bspf_emulation
