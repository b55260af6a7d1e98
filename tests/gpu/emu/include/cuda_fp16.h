// The emulator's half types: only what the FP8 decode returns; the value is kept as f32, which
// is exact for every E4M3 value, so conversions through half lose nothing here either.
#pragma once
#include "emu.h"
struct __half_raw { float f; };
struct __half2_raw { float a, b; };
struct __half { float f; __half() = default; __half(__half_raw r) : f(r.f) {} };
struct __half2 { float a, b; __half2() = default; __half2(__half2_raw r) : a(r.a), b(r.b) {} };
inline float __half2float(__half h) { return h.f; }
inline float2 __half22float2(__half2 h) { return {h.a, h.b}; }
