// Scalar format conversions that are not hot enough to inline.
#include "engine/dtype.h"

namespace moescope {

DType dtype_from_string(const std::string& s) {
    if (s == "F32") return DType::F32;
    if (s == "F16") return DType::F16;
    if (s == "BF16") return DType::BF16;
    if (s == "F8_E4M3") return DType::F8_E4M3;
    if (s == "I64") return DType::I64;
    if (s == "I32") return DType::I32;
    if (s == "U8") return DType::U8;
    return DType::Unknown;
}

const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "F32";
        case DType::F16: return "F16";
        case DType::BF16: return "BF16";
        case DType::F8_E4M3: return "F8_E4M3";
        case DType::I64: return "I64";
        case DType::I32: return "I32";
        case DType::U8: return "U8";
        default: return "unknown";
    }
}

int dtype_size(DType t) {
    switch (t) {
        case DType::F32: case DType::I32: return 4;
        case DType::F16: case DType::BF16: return 2;
        case DType::F8_E4M3: case DType::U8: return 1;
        case DType::I64: return 8;
        default: return 0;
    }
}

uint16_t f32_to_f16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000;
    if ((x & 0x7fffffff) > 0x7f800000) return uint16_t(sign | 0x7e00);
    float a = std::fabs(f);
    if (a >= 65520.0f) return uint16_t(sign | 0x7c00);
    if (a < std::ldexp(1.0f, -14)) {  // subnormal half: multiples of 2^-24, round to even
        float q = std::nearbyint(a * std::ldexp(1.0f, 24));
        return uint16_t(sign | uint32_t(q));
    }
    int e;
    float m = std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
    float q = std::nearbyint(m * 2048.0f);  // 11 significant bits
    if (q >= 2048.0f) { q /= 2; ++e; }
    uint32_t exp = uint32_t(e - 1 + 15), mant = uint32_t(q) - 1024;
    return uint16_t(sign | (exp << 10) | mant);
}

uint8_t f32_to_fp8_e4m3(float f) {
    if (std::isnan(f)) return 0x7f;
    uint8_t sign = std::signbit(f) ? 0x80 : 0;
    float a = std::fabs(f);
    if (a >= 448.0f) return sign | 0x7e;  // saturate to 448
    if (a < std::ldexp(1.0f, -6)) {       // subnormal: multiples of 2^-9
        float q = std::nearbyint(a * 512.0f);
        return sign | uint8_t(q);         // q == 8 lands exactly on the smallest normal
    }
    int e;
    float m = std::frexp(a, &e);          // 4 significant bits
    float q = std::nearbyint(m * 16.0f);
    if (q >= 16.0f) { q /= 2; ++e; }
    int exp = e - 1 + 7;
    if (exp > 15 || (exp == 15 && int(q) - 8 == 7)) return sign | 0x7e;
    return sign | uint8_t(exp << 3) | uint8_t(int(q) - 8);
}

}  // namespace moescope
