// The emulator's E4M3 conversions (cuda_fp8.h): decode by the format's definition, encode by
// nearest value with ties to even mantissa and saturation to 448 as __NV_SATFINITE.
#pragma once
#include "emu.h"
#include "cuda_fp16.h"
typedef uint8_t __nv_fp8_storage_t;
typedef uint16_t __nv_fp8x2_storage_t;
enum __nv_fp8_interpretation_t { __NV_E4M3, __NV_E5M2 };
enum __nv_saturation_t { __NV_NOSAT, __NV_SATFINITE };
inline float emu_e4m3_to_f32(uint8_t b) {
    const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v;
    if (e == 15 && m == 7) v = NAN;
    else if (e == 0) v = std::ldexp(float(m), -9);
    else v = std::ldexp(float(8 + m), e - 10);
    return s ? -v : v;
}
inline __half_raw __nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t b, __nv_fp8_interpretation_t) { return {emu_e4m3_to_f32(b)}; }
inline __half2_raw __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t v, __nv_fp8_interpretation_t) {
    return {emu_e4m3_to_f32(uint8_t(v & 0xff)), emu_e4m3_to_f32(uint8_t(v >> 8))};
}
// Brute force over the 127 codes: slow but obviously the nearest, ties to even mantissa.
inline __nv_fp8_storage_t __nv_cvt_float_to_fp8(float x, __nv_saturation_t sat, __nv_fp8_interpretation_t) {
    if (std::isnan(x)) return 0x7f;
    const uint8_t sign = std::signbit(x) ? 0x80 : 0;
    float a = std::fabs(x);
    if (a >= 464.0f) return sat == __NV_SATFINITE ? uint8_t(sign | 0x7e) : uint8_t(sign | 0x7f);

    int best = 0; float bd = INFINITY;
    for (int c = 0; c <= 0x7e; ++c) {
        float d = std::fabs(emu_e4m3_to_f32(uint8_t(c)) - a);
        if (d < bd || (d == bd && (c & 1) == 0)) { bd = d; best = c; }
    }
    return uint8_t(sign | best);
}
