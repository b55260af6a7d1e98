// MLA kernels.
#include <algorithm>
#include <cfloat>

#include "kernels/device_util.cuh"
#include "kernels/mla.h"

namespace moescope::cuda {
namespace {

// One block per new token: RMSNorm of the latent (f64 sum like the CPU), then rope of k_pe
// and of the token's queries' q_pe (q, when non-null: [T, H, d_nope + d_rope]).
// norms (telemetry, when non-null): norms[t] = |cached latent| (f64 sum of squares).
__global__ void latent_append_kernel(float* cache_c, float* cache_kpe, const float* kv, const float* w, int start,
                                     int d_c, int d_rope, const float* inv_freq, float mscale, const int* d_start,
                                     float* norms, float* q, int H, int d_nope) {
    pdl_wait();
    if (d_start) start = *d_start;
    const int t = blockIdx.x, pos = start + t, half = d_rope / 2;
    const float* row = kv + int64_t(t) * (d_c + d_rope);
    double ss = 0;
    for (int i = threadIdx.x; i < d_c; i += blockDim.x) ss += double(row[i]) * double(row[i]);
    ss = block_sum(ss);
    // eps as the CPU passes it (the float 1e-6f widened to double), not the double 1e-6.
    const float r = float(1.0 / sqrt(ss / d_c + double(1e-6f)));
    float* c = cache_c + int64_t(pos) * d_c;
    double cs2 = 0;
    for (int i = threadIdx.x; i < d_c; i += blockDim.x) {
        const float v = row[i] * r * w[i];
        c[i] = v;
        cs2 += double(v) * double(v);
    }
    if (norms) {  // the same for every thread of the block
        cs2 = block_sum(cs2);
        if (threadIdx.x == 0) norms[t] = float(sqrt(cs2));
    }
    float* kp = cache_kpe + int64_t(pos) * d_rope;
    for (int p = threadIdx.x; p < half; p += blockDim.x) {
        kp[2 * p] = row[d_c + 2 * p];
        kp[2 * p + 1] = row[d_c + 2 * p + 1];
        rope_pair(kp + 2 * p, pos, inv_freq[p], mscale);
    }
    if (q) {
        float* qt = q + int64_t(t) * H * (d_nope + d_rope) + d_nope;
        for (int j = threadIdx.x; j < H * half; j += blockDim.x)
            rope_pair(qt + int64_t(j / half) * (d_nope + d_rope) + 2 * (j % half), pos, inv_freq[j % half], mscale);
    }
}

// Element (r, c) of kv_b [H*(d_nope+d_v), d_c] as the CPU holds it: f32, bf16, or an e4m3 value
// times its 128x128 block scale (the FP8 plan keeps kv_b in FP8: the product in f32 is exactly
// the CPU's dequantized weight).
template <class T>
struct DenseRows {
    const T* p;
    int64_t cols;
    __device__ float operator()(int64_t r, int64_t c) const { return to_f32(p[r * cols + c]); }
};
struct Fp8Rows {
    const uint8_t* q;
    const float* s;
    Fp8Grid g;
    __device__ float operator()(int64_t r, int64_t c) const {
        return fp8_to_f32(q[r * g.cols + c]) * s[g.scale_row(r) * g.ld() + c / kFp8Block];
    }
};

// Thread (t, h, c): q_lat[t, h, c] = sum_i q_nope[t, h, i] W_UK_h[i, c], i in the CPU's order.
template <class W>
__global__ void absorb_query_kernel(float* q_lat, const float* q, W kvb, int T, int H, int d_nope, int dq, int dkvb,
                                    int d_c) {
    pdl_wait();
    int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= int64_t(T) * H * d_c) return;
    const int c = int(idx % d_c);
    const int h = int((idx / d_c) % H);
    const int t = int(idx / (int64_t(d_c) * H));
    const float* qh = q + (int64_t(t) * H + h) * dq;
    const int64_t r0 = int64_t(h) * dkvb;
    float a = 0.0f;
    for (int i = 0; i < d_nope; ++i) a += qh[i] * kvb(r0 + i, c);
    q_lat[idx] = a;
}

constexpr int kTile = 64;       // positions scored per step
constexpr int kSplitLen = 256;  // positions per split at least (attention_splits)
constexpr int kThreads = 256;   // 8 warps
constexpr int kMaxLatent = 1024;    // d_c <= kThreads * 4
constexpr int kBlocksWanted = 128;  // about one block per SM of an H100 / H200

// Latent channels per thread (kMaxC: 2 up to d_c 512, 4 up to 1024) and heads per block
// (kMaxG = 32 / kMaxC): o[kMaxG][kMaxC] stays at 32 registers, so two blocks fit an SM.
constexpr int channels_per_thread(int d_c) { return d_c <= 2 * kThreads ? 2 : 4; }
constexpr int max_heads_per_block(int d_c) { return 32 / channels_per_thread(d_c); }

// Grid (splits, head groups, T). Block: one (token, split) and G consecutive heads h0.., so each
// cache row is read once for all of them (per head, the cache would be read H times per step).
// Online softmax over tiles of kTile positions: a warp scores a position for every head (lanes
// over d_c: each cached value is loaded once for the G queries, which sit in shared memory); a
// warp per head updates its max and sum; each thread then accumulates its own latent channels
// c = threadIdx.x + i * kThreads for every head. Writes per head the unnormalized partial o, its
// max m and sum l: partial[((t*H + h)*splits + split) * (d_c + 2) + {0..d_c-1, d_c: m, d_c+1: l}].
template <int kMaxC>
__global__ void __launch_bounds__(kThreads, 2)
    attention_kernel(float* partial, const float* q_lat, const float* q, const float* cache_c, const float* cache_kpe,
                     int T, int H, int G, int start, int splits, int d_nope, int d_rope, int d_c, float scale,
                     const int* d_start) {
    pdl_wait();
    constexpr int kMaxG = 32 / kMaxC;
    if (d_start) start = *d_start;
    extern __shared__ float smem[];
    float* sq = smem;                // [G, d_c] q_lat
    float* sqp = sq + G * d_c;       // [G, d_rope] q_pe
    float* sp = sqp + G * d_rope;    // [G, kTile] scores / probabilities
    float* sm = sp + G * kTile;      // [G] running max
    float* sl = sm + G;              // [G] running sum
    float* scorr = sl + G;           // [G] this tile's rescaling of o
    const int split = blockIdx.x, h0 = blockIdx.y * G, t = blockIdx.z;
    const int Gb = min(G, H - h0);   // heads of this block
    const int n = start + t + 1;
    const int chunk = (n + splits - 1) / splits;
    const int j0 = split * chunk, j1 = min(n, j0 + chunk);
    const int dq = d_nope + d_rope;
    for (int i = threadIdx.x; i < Gb * d_c; i += blockDim.x)
        sq[i] = q_lat[(int64_t(t) * H + h0) * d_c + i];
    for (int i = threadIdx.x; i < Gb * d_rope; i += blockDim.x)
        sqp[i] = q[(int64_t(t) * H + h0 + i / d_rope) * dq + d_nope + i % d_rope];
    if (threadIdx.x < Gb) {
        sm[threadIdx.x] = -FLT_MAX;
        sl[threadIdx.x] = 0.0f;
    }
    __syncthreads();
    float o[kMaxG][kMaxC];
#pragma unroll
    for (int g = 0; g < kMaxG; ++g)
#pragma unroll
        for (int i = 0; i < kMaxC; ++i) o[g][i] = 0.0f;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int tile = j0; tile < j1; tile += kTile) {
        const int tn = min(kTile, j1 - tile);
        for (int jj = warp; jj < tn; jj += nw) {
            const float* cj = cache_c + int64_t(tile + jj) * d_c;
            const float* kp = cache_kpe + int64_t(tile + jj) * d_rope;
            float a[kMaxG];
#pragma unroll
            for (int g = 0; g < kMaxG; ++g) a[g] = 0.0f;
            for (int c = lane; c < d_c; c += 32) {
                const float v = cj[c];
#pragma unroll
                for (int g = 0; g < kMaxG; ++g)
                    if (g < Gb) a[g] += sq[g * d_c + c] * v;
            }
            for (int i = lane; i < d_rope; i += 32) {
                const float v = kp[i];
#pragma unroll
                for (int g = 0; g < kMaxG; ++g)
                    if (g < Gb) a[g] += sqp[g * d_rope + i] * v;
            }
#pragma unroll
            for (int g = 0; g < kMaxG; ++g)
                if (g < Gb) {  // the same for the whole warp: every lane joins the shuffles
                    const float s = warp_sum(a[g]);
                    if (lane == 0) sp[g * kTile + jj] = s * scale;
                }
        }
        __syncthreads();
        for (int g = warp; g < Gb; g += nw) {
            float* pg = sp + g * kTile;
            float tmax = -FLT_MAX;
            for (int jj = lane; jj < tn; jj += 32) tmax = fmaxf(tmax, pg[jj]);
            tmax = warp_max(tmax);
            const float m_new = fmaxf(sm[g], tmax);
            float psum = 0.0f;
            for (int jj = lane; jj < tn; jj += 32) {
                const float e = expf(pg[jj] - m_new);
                pg[jj] = e;
                psum += e;
            }
            psum = warp_sum(psum);
            if (lane == 0) {
                const float corr = expf(sm[g] - m_new);
                scorr[g] = corr;
                sl[g] = sl[g] * corr + psum;
                sm[g] = m_new;
            }
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < kMaxC; ++i) {
            const int c = threadIdx.x + i * kThreads;
            if (c < d_c) {
#pragma unroll
                for (int g = 0; g < kMaxG; ++g)
                    if (g < Gb) o[g][i] *= scorr[g];
                for (int jj = 0; jj < tn; ++jj) {
                    const float v = cache_c[int64_t(tile + jj) * d_c + c];
#pragma unroll
                    for (int g = 0; g < kMaxG; ++g)
                        if (g < Gb) o[g][i] += sp[g * kTile + jj] * v;
                }
            }
        }
        __syncthreads();  // sp and scorr are rewritten by the next tile
    }
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
        if (g >= Gb) break;
        float* out = partial + ((int64_t(t) * H + h0 + g) * splits + split) * (d_c + 2);
#pragma unroll
        for (int i = 0; i < kMaxC; ++i) {
            const int c = threadIdx.x + i * kThreads;
            if (c < d_c) out[c] = o[g][i];
        }
        if (threadIdx.x == 0) {
            out[d_c] = j0 < j1 ? sm[g] : -FLT_MAX;
            out[d_c + 1] = sl[g];
        }
    }
}

// Block (t, h): merge the splits' (o, m, l) into the normalized o_lat.
__global__ void combine_kernel(float* o_lat, const float* partial, int H, int splits, int d_c) {
    pdl_wait();
    const int64_t row = blockIdx.x;  // t * H + h
    const float* p = partial + row * splits * (d_c + 2);
    float M = -FLT_MAX;
    for (int s = 0; s < splits; ++s) M = fmaxf(M, p[int64_t(s) * (d_c + 2) + d_c]);
    float L = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float* ps = p + int64_t(s) * (d_c + 2);
        if (ps[d_c + 1] > 0.0f) L += expf(ps[d_c] - M) * ps[d_c + 1];
    }
    for (int c = threadIdx.x; c < d_c; c += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float* ps = p + int64_t(s) * (d_c + 2);
            if (ps[d_c + 1] > 0.0f) a += expf(ps[d_c] - M) * ps[c];
        }
        o_lat[row * d_c + c] = a / L;
    }
}

// Warp per (t, h, i): o[t, h, i] = W_UV_h[i, :] . o_lat[t, h, :].
template <class W>
__global__ void project_values_kernel(float* o, const float* o_lat, W kvb, int T, int H, int d_nope, int d_v,
                                      int d_c) {
    pdl_wait();
    const int lane = threadIdx.x & 31;
    const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    if (wid >= int64_t(T) * H * d_v) return;
    const int i = int(wid % d_v);
    const int h = int((wid / d_v) % H);
    const int t = int(wid / (int64_t(d_v) * H));
    const int64_t r = int64_t(h) * (d_nope + d_v) + d_nope + i;
    const float* ol = o_lat + (int64_t(t) * H + h) * d_c;
    float a = 0.0f;
    for (int c = lane; c < d_c; c += 32) a += kvb(r, c) * ol[c];
    a = warp_sum(a);
    if (lane == 0) o[wid] = a;
}

// Block per (h, t) row of scores[H, T, S]: scale, softmax over [0, start + t], zero the rest.
__global__ void causal_softmax_kernel(float* scores, int T, int S, int start, float scale) {
    pdl_wait();
    const int64_t row = blockIdx.x;  // h * T + t
    const int t = int(row % T);
    const int n = start + t + 1;
    float* r = scores + row * S;
    float mx = -FLT_MAX;
    for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, r[j] * scale);
    mx = block_max(mx);
    double sum = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float e = expf(r[j] * scale - mx);
        r[j] = e;
        sum += e;
    }
    sum = block_sum(sum);
    const float inv = float(1.0 / sum);
    for (int j = threadIdx.x; j < S; j += blockDim.x) r[j] = j < n ? r[j] * inv : 0.0f;
}

}  // namespace

void latent_append(float* cache_c, float* cache_kpe, const float* kv, const float* norm_w, int T, int start,
                   const MlaShape& m, const float* inv_freq, float mscale, cudaStream_t s, const int* d_start,
                   float* norms, float* q) {
    if (T <= 0) return;
    latent_append_kernel<<<T, 128, 0, s>>>(cache_c, cache_kpe, kv, norm_w, start, m.d_c, m.d_rope, inv_freq, mscale,
                                           d_start, norms, q, m.H, m.d_nope);
    check_launch("latent_append_kernel");
}

namespace {
// Calls f with kv_b's element reader (f32, bf16 or FP8 with its block scales).
template <class F>
void with_rows(const WRef& w, F&& f) {
    if (w.fp8())
        f(Fp8Rows{static_cast<const uint8_t*>(w.ptr), w.scale, w.grid()});
    else if (w.bf16)
        f(DenseRows<__nv_bfloat16>{static_cast<const __nv_bfloat16*>(w.ptr), w.cols});
    else
        f(DenseRows<float>{static_cast<const float*>(w.ptr), w.cols});
}
}  // namespace

void absorb_query(float* q_lat, const float* q, const WRef& kv_b, int T, const MlaShape& m, cudaStream_t s) {
    const int64_t n = int64_t(T) * m.H * m.d_c;
    if (n <= 0) return;
    const int dq = m.d_nope + m.d_rope, dkvb = m.d_nope + m.d_v;
    with_rows(kv_b, [&](auto w) {
        absorb_query_kernel<<<blocks_for(n, 256), 256, 0, s>>>(q_lat, q, w, T, m.H, m.d_nope, dq, dkvb, m.d_c);
    });
    check_launch("absorb_query_kernel");
}

int attention_splits(int T, int n_max, int max_splits) {
    // Decode (few rows): split the sequence so that ~64 blocks per head run; prefill: one split.
    int by_rows = max_splits / (T > 0 ? T : 1);
    int by_len = (n_max + kSplitLen - 1) / kSplitLen;
    int s = by_rows < by_len ? by_rows : by_len;
    return s < 1 ? 1 : s;
}

int attention_heads_per_block(int H, int T, int splits, const MlaShape& m) {
    // Shared memory per head: its q_lat, q_pe, a tile of scores and three floats, within 48 KiB.
    const int by_smem = int((48 * 1024 / sizeof(float)) / size_t(m.d_c + m.d_rope + kTile + 3));
    // Fewer heads per block while that leaves fewer than kBlocksWanted blocks (decode of a model
    // with few heads): the cache is then read H / G times, but by every SM.
    const int64_t per_head = int64_t(splits) * (T > 0 ? T : 1);
    int g = int(std::min<int64_t>(max_heads_per_block(m.d_c),
                                  std::max<int64_t>(1, int64_t(H) * per_head / kBlocksWanted)));
    g = std::max(1, std::min(g, std::min(by_smem, H)));
    const int groups = (H + g - 1) / g;
    return (H + groups - 1) / groups;  // the same groups, evened out (20 heads: 10 + 10, not 16 + 4)
}

void attention_absorbed(float* o_lat, float* partial, const float* q_lat, const float* q, const float* cache_c,
                        const float* cache_kpe, int T, int start, int splits, const MlaShape& m, cudaStream_t s,
                        const int* d_start) {
    if (T <= 0) return;
    if (m.d_c > kMaxLatent) throw DeviceError("attention: kv_lora_rank above 1024 is not supported");
    const int G = attention_heads_per_block(m.H, T, splits, m);
    dim3 grid(unsigned(splits), unsigned((m.H + G - 1) / G), unsigned(T));
    const size_t smem = sizeof(float) * size_t(G) * size_t(m.d_c + m.d_rope + kTile + 3);
    if (channels_per_thread(m.d_c) == 2)
        attention_kernel<2><<<grid, kThreads, smem, s>>>(partial, q_lat, q, cache_c, cache_kpe, T, m.H, G, start,
                                                         splits, m.d_nope, m.d_rope, m.d_c, m.scale, d_start);
    else
        attention_kernel<4><<<grid, kThreads, smem, s>>>(partial, q_lat, q, cache_c, cache_kpe, T, m.H, G, start,
                                                         splits, m.d_nope, m.d_rope, m.d_c, m.scale, d_start);
    check_launch("attention_kernel");
    combine_kernel<<<unsigned(int64_t(T) * m.H), 128, 0, s>>>(o_lat, partial, m.H, splits, m.d_c);
    check_launch("combine_kernel");
}

void project_values(float* o, const float* o_lat, const WRef& kv_b, int T, const MlaShape& m, cudaStream_t s) {
    const int64_t warps = int64_t(T) * m.H * m.d_v;
    if (warps <= 0) return;
    const unsigned blocks = blocks_for(warps * 32, 256);
    with_rows(kv_b, [&](auto w) {
        project_values_kernel<<<blocks, 256, 0, s>>>(o, o_lat, w, T, m.H, m.d_nope, m.d_v, m.d_c);
    });
    check_launch("project_values_kernel");
}

void causal_softmax(float* scores, int H, int T, int S, int start, float scale, cudaStream_t s) {
    if (H * T <= 0) return;
    causal_softmax_kernel<<<unsigned(int64_t(H) * T), 256, 0, s>>>(scores, T, S, start, scale);
    check_launch("causal_softmax_kernel");
}

}  // namespace moescope::cuda
