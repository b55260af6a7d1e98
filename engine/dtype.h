// Scalar formats of checkpoints: BF16, F16 and FP8 e4m3fn decoding/encoding to f32.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace moescope {

enum class DType { F32, F16, BF16, F8_E4M3, I64, I32, U8, Unknown };

DType dtype_from_string(const std::string& s);
const char* dtype_name(DType t);
int dtype_size(DType t);  // bytes per element; 0 for Unknown

inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return uint16_t(bits >> 16);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    float v;
    if (exp == 0) {
        v = std::ldexp(float(mant), -24);
    } else if (exp == 31) {
        v = mant ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    } else {
        v = std::ldexp(float(mant | 0x400), int(exp) - 25);
    }
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    bits |= sign;
    std::memcpy(&v, &bits, 4);
    return v;
}

uint16_t f32_to_f16(float f);

// e4m3fn: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN.
inline float fp8_e4m3_to_f32(uint8_t v) {
    int sign = v >> 7, exp = (v >> 3) & 0xf, mant = v & 7;
    float mag;
    if (exp == 0xf && mant == 7) return std::numeric_limits<float>::quiet_NaN();
    if (exp == 0) mag = std::ldexp(float(mant), -9);          // subnormal: mant/8 * 2^-6
    else mag = std::ldexp(float(8 + mant), exp - 10);          // (1 + mant/8) * 2^(exp-7)
    return sign ? -mag : mag;
}

uint8_t f32_to_fp8_e4m3(float f);  // round to nearest even, saturating at +-448

}  // namespace moescope
