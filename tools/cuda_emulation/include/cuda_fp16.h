// Host emulation of cuda_fp16.h: __half is a 2-byte trivially copyable type with
// CUDA's bit layout (IEEE binary16 in `__x`), and the conversions round exactly as
// CUDA's do (round to nearest even by default, canonical NaN 0x7FFF). Arithmetic on
// __half goes through float and rounds once; that is exact for + − × ÷ (float has more
// than 2·11 + 2 significand bits, so the double rounding is innocuous).
#pragma once

#include <cstdint>
#include <cstring>

#include "bspf_emulation/rounding.h"

struct __half_raw {
  unsigned short x;
};

struct __half;
inline __half __float2half_rn(float f);
inline float __half2float(__half h);

struct alignas(2) __half {
  unsigned short __x;
  __half() = default;
  __half(const __half_raw& r) : __x(r.x) {}
  __half(float f);
  operator float() const;
  operator __half_raw() const { return __half_raw{__x}; }
};

struct alignas(4) __half2 {
  __half x, y;
  __half2() = default;
  __half2(__half a, __half b) : x(a), y(b) {}
};

using half = __half;
using half2 = __half2;

namespace bspf_emulation {
inline __half half_from_bits(uint16_t bits) {
  __half h;
  h.__x = bits;
  return h;
}
inline uint16_t float_to_half_bits(float f, Round mode) { return round_to_16bit<5, 10>(f, mode); }
}  // namespace bspf_emulation

// ----------------------------------------------------------------- conversions

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.__x & 0x8000u) << 16;
  const uint32_t exp = (h.__x >> 10) & 0x1F, mant = h.__x & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    int e = 113;
    uint32_t m = mant;
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    bits = sign | (static_cast<uint32_t>(e) << 23) | ((m & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline __half __float2half_rn(float f) {
  return bspf_emulation::half_from_bits(bspf_emulation::float_to_half_bits(f, bspf_emulation::Round::kNearestEven));
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline __half __float2half_rz(float f) {
  return bspf_emulation::half_from_bits(bspf_emulation::float_to_half_bits(f, bspf_emulation::Round::kTowardZero));
}
inline __half __float2half_rd(float f) {
  return bspf_emulation::half_from_bits(bspf_emulation::float_to_half_bits(f, bspf_emulation::Round::kDown));
}
inline __half __float2half_ru(float f) {
  return bspf_emulation::half_from_bits(bspf_emulation::float_to_half_bits(f, bspf_emulation::Round::kUp));
}
inline __half::__half(float f) : __x(__float2half_rn(f).__x) {}
inline __half::operator float() const { return __half2float(*this); }

inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short bits) { return bspf_emulation::half_from_bits(bits); }
inline short __half_as_short(__half h) { return static_cast<short>(h.__x); }
inline __half __short_as_half(short bits) { return bspf_emulation::half_from_bits(static_cast<uint16_t>(bits)); }

inline __half2 __halves2half2(__half lo, __half hi) { return __half2(lo, hi); }
inline __half2 __half2half2(__half h) { return __half2(h, h); }
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2(__float2half_rn(lo), __float2half_rn(hi)); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }

// ------------------------------------------------------------------ arithmetic

inline __half __hadd(__half a, __half b) { return __float2half_rn(__half2float(a) + __half2float(b)); }
inline __half __hsub(__half a, __half b) { return __float2half_rn(__half2float(a) - __half2float(b)); }
inline __half __hmul(__half a, __half b) { return __float2half_rn(__half2float(a) * __half2float(b)); }
inline __half __hdiv(__half a, __half b) { return __float2half_rn(__half2float(a) / __half2float(b)); }
inline __half __hneg(__half a) { return bspf_emulation::half_from_bits(static_cast<uint16_t>(a.__x ^ 0x8000u)); }
inline __half __habs(__half a) { return bspf_emulation::half_from_bits(static_cast<uint16_t>(a.__x & 0x7FFFu)); }
inline bool __hisnan(__half a) { return (a.__x & 0x7FFFu) > 0x7C00u; }
inline int __hisinf(__half a) { return a.__x == 0x7C00u ? 1 : a.__x == 0xFC00u ? -1 : 0; }
inline bool __heq(__half a, __half b) { return __half2float(a) == __half2float(b); }
inline bool __hlt(__half a, __half b) { return __half2float(a) < __half2float(b); }
inline bool __hgt(__half a, __half b) { return __half2float(a) > __half2float(b); }

inline __half operator+(__half a, __half b) { return __hadd(a, b); }
inline __half operator-(__half a, __half b) { return __hsub(a, b); }
inline __half operator*(__half a, __half b) { return __hmul(a, b); }
inline __half operator/(__half a, __half b) { return __hdiv(a, b); }
inline __half operator-(__half a) { return __hneg(a); }
