// MLA kernels.
#include <cfloat>

#include "kernels/device_util.cuh"
#include "kernels/mla.h"

namespace moescope::cuda {
namespace {

// One block per new token: RMSNorm of the latent (f64 sum like the CPU), then rope of k_pe.
__global__ void latent_append_kernel(float* cache_c, float* cache_kpe, const float* kv, const float* w, int start,
                                     int d_c, int d_rope, const float* inv_freq, float mscale, const int* d_start) {
    if (d_start) start = *d_start;
    const int t = blockIdx.x;
    const float* row = kv + int64_t(t) * (d_c + d_rope);
    double ss = 0;
    for (int i = threadIdx.x; i < d_c; i += blockDim.x) ss += double(row[i]) * double(row[i]);
    ss = block_sum(ss);
    // eps as the CPU passes it (the float 1e-6f widened to double), not the double 1e-6.
    const float r = float(1.0 / sqrt(ss / d_c + double(1e-6f)));
    float* c = cache_c + int64_t(start + t) * d_c;
    for (int i = threadIdx.x; i < d_c; i += blockDim.x) c[i] = row[i] * r * w[i];
    float* kp = cache_kpe + int64_t(start + t) * d_rope;
    for (int p = threadIdx.x; p < d_rope / 2; p += blockDim.x) {
        const float theta = float(start + t) * inv_freq[p];
        const float cs = cosf(theta) * mscale, sn = sinf(theta) * mscale;
        const float a = row[d_c + 2 * p], b = row[d_c + 2 * p + 1];
        kp[2 * p] = a * cs - b * sn;
        kp[2 * p + 1] = a * sn + b * cs;
    }
}

// Thread (t, h, c): q_lat[t, h, c] = sum_i q_nope[t, h, i] W_UK_h[i, c], i in the CPU's order.
template <class W>
__global__ void absorb_query_kernel(float* q_lat, const float* q, const W* kvb, int T, int H, int d_nope, int dq,
                                    int dkvb, int d_c) {
    int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= int64_t(T) * H * d_c) return;
    const int c = int(idx % d_c);
    const int h = int((idx / d_c) % H);
    const int t = int(idx / (int64_t(d_c) * H));
    const float* qh = q + (int64_t(t) * H + h) * dq;
    const W* wuk = kvb + int64_t(h) * dkvb * d_c + c;
    float a = 0.0f;
    for (int i = 0; i < d_nope; ++i) a += qh[i] * to_f32(wuk[int64_t(i) * d_c]);
    q_lat[idx] = a;
}

constexpr int kTile = 256;     // positions scored per step
constexpr int kThreads = 256;  // 8 warps
constexpr int kMaxC = 4;       // d_c <= kThreads * kMaxC = 1024

// Grid (splits, H, T). Block: one (token, head, split). Online softmax over tiles of kTile
// positions: warps score positions (lanes over d_c), then each thread accumulates its own
// latent channels c = threadIdx.x + i * kThreads. Writes the unnormalized partial o, its max m
// and its sum l: partial[((t*H + h)*splits + split) * (d_c + 2) + {0..d_c-1, d_c: m, d_c+1: l}].
__global__ void attention_kernel(float* partial, const float* q_lat, const float* q, const float* cache_c,
                                 const float* cache_kpe, int T, int H, int start, int splits, int d_nope, int d_rope,
                                 int d_c, float scale, const int* d_start) {
    if (d_start) start = *d_start;
    extern __shared__ float smem[];
    float* sq = smem;               // [d_c] q_lat
    float* sqp = sq + d_c;          // [d_rope] q_pe
    float* sp = sqp + d_rope;       // [kTile] scores / probabilities
    const int split = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    const int n = start + t + 1;
    const int chunk = (n + splits - 1) / splits;
    const int j0 = split * chunk, j1 = min(n, j0 + chunk);
    const int dq = d_nope + d_rope;
    for (int i = threadIdx.x; i < d_c; i += blockDim.x) sq[i] = q_lat[(int64_t(t) * H + h) * d_c + i];
    for (int i = threadIdx.x; i < d_rope; i += blockDim.x) sqp[i] = q[(int64_t(t) * H + h) * dq + d_nope + i];
    __syncthreads();
    float m = -FLT_MAX, l = 0.0f;
    float o[kMaxC];
#pragma unroll
    for (int i = 0; i < kMaxC; ++i) o[i] = 0.0f;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int tile = j0; tile < j1; tile += kTile) {
        const int tn = min(kTile, j1 - tile);
        for (int jj = warp; jj < tn; jj += nw) {
            const float* cj = cache_c + int64_t(tile + jj) * d_c;
            const float* kp = cache_kpe + int64_t(tile + jj) * d_rope;
            float a = 0.0f;
            for (int c = lane; c < d_c; c += 32) a += sq[c] * cj[c];
            for (int i = lane; i < d_rope; i += 32) a += sqp[i] * kp[i];
            a = warp_sum(a);
            if (lane == 0) sp[jj] = a * scale;
        }
        __syncthreads();
        float tmax = -FLT_MAX;
        for (int jj = threadIdx.x; jj < tn; jj += blockDim.x) tmax = fmaxf(tmax, sp[jj]);
        tmax = block_max(tmax);
        const float m_new = fmaxf(m, tmax);
        const float corr = expf(m - m_new);
        __syncthreads();
        for (int jj = threadIdx.x; jj < tn; jj += blockDim.x) sp[jj] = expf(sp[jj] - m_new);
        __syncthreads();
        float psum = 0.0f;
        for (int jj = threadIdx.x; jj < tn; jj += blockDim.x) psum += sp[jj];
        psum = block_sum(psum);
        l = l * corr + psum;
        m = m_new;
#pragma unroll
        for (int i = 0; i < kMaxC; ++i) {
            const int c = threadIdx.x + i * kThreads;
            if (c < d_c) {
                float acc = o[i] * corr;
                for (int jj = 0; jj < tn; ++jj) acc += sp[jj] * cache_c[int64_t(tile + jj) * d_c + c];
                o[i] = acc;
            }
        }
        __syncthreads();  // sp is rewritten by the next tile
    }
    float* out = partial + ((int64_t(t) * H + h) * splits + split) * (d_c + 2);
#pragma unroll
    for (int i = 0; i < kMaxC; ++i) {
        const int c = threadIdx.x + i * kThreads;
        if (c < d_c) out[c] = o[i];
    }
    if (threadIdx.x == 0) {
        out[d_c] = j0 < j1 ? m : -FLT_MAX;
        out[d_c + 1] = l;
    }
}

// Block (t, h): merge the splits' (o, m, l) into the normalized o_lat.
__global__ void combine_kernel(float* o_lat, const float* partial, int H, int splits, int d_c) {
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
__global__ void project_values_kernel(float* o, const float* o_lat, const W* kvb, int T, int H, int d_nope, int d_v,
                                      int d_c) {
    const int lane = threadIdx.x & 31;
    const int64_t wid = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    if (wid >= int64_t(T) * H * d_v) return;
    const int i = int(wid % d_v);
    const int h = int((wid / d_v) % H);
    const int t = int(wid / (int64_t(d_v) * H));
    const W* row = kvb + (int64_t(h) * (d_nope + d_v) + d_nope + i) * d_c;
    const float* ol = o_lat + (int64_t(t) * H + h) * d_c;
    float a = 0.0f;
    for (int c = lane; c < d_c; c += 32) a += to_f32(row[c]) * ol[c];
    a = warp_sum(a);
    if (lane == 0) o[wid] = a;
}

// Block per (h, t) row of scores[H, T, S]: scale, softmax over [0, start + t], zero the rest.
__global__ void causal_softmax_kernel(float* scores, int T, int S, int start, float scale) {
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
                   const MlaShape& m, const float* inv_freq, float mscale, cudaStream_t s, const int* d_start) {
    if (T <= 0) return;
    latent_append_kernel<<<T, 128, 0, s>>>(cache_c, cache_kpe, kv, norm_w, start, m.d_c, m.d_rope, inv_freq, mscale,
                                           d_start);
    check_launch("latent_append_kernel");
}

void absorb_query(float* q_lat, const float* q, const WRef& kv_b, int T, const MlaShape& m, cudaStream_t s) {
    const int64_t n = int64_t(T) * m.H * m.d_c;
    if (n <= 0) return;
    if (kv_b.fp8()) throw DeviceError("absorb_query: kv_b must be BF16 or F32 (the FP8 plan keeps it BF16)");
    const int dq = m.d_nope + m.d_rope, dkvb = m.d_nope + m.d_v;
    if (kv_b.bf16)
        absorb_query_kernel<<<blocks_for(n, 256), 256, 0, s>>>(q_lat, q, static_cast<const __nv_bfloat16*>(kv_b.ptr),
                                                               T, m.H, m.d_nope, dq, dkvb, m.d_c);
    else
        absorb_query_kernel<<<blocks_for(n, 256), 256, 0, s>>>(q_lat, q, static_cast<const float*>(kv_b.ptr), T, m.H,
                                                               m.d_nope, dq, dkvb, m.d_c);
    check_launch("absorb_query_kernel");
}

int attention_splits(int T, int n_max, int max_splits) {
    // Decode (few rows): split the sequence so that ~64 blocks per head run; prefill: one split.
    int by_rows = max_splits / (T > 0 ? T : 1);
    int by_len = (n_max + kTile - 1) / kTile;
    int s = by_rows < by_len ? by_rows : by_len;
    return s < 1 ? 1 : s;
}

void attention_absorbed(float* o_lat, float* partial, const float* q_lat, const float* q, const float* cache_c,
                        const float* cache_kpe, int T, int start, int splits, const MlaShape& m, cudaStream_t s,
                        const int* d_start) {
    if (T <= 0) return;
    if (m.d_c > kThreads * kMaxC) throw DeviceError("attention: kv_lora_rank above 1024 is not supported");
    dim3 grid(unsigned(splits), unsigned(m.H), unsigned(T));
    const size_t smem = sizeof(float) * size_t(m.d_c + m.d_rope + kTile);
    attention_kernel<<<grid, kThreads, smem, s>>>(partial, q_lat, q, cache_c, cache_kpe, T, m.H, start, splits,
                                                   m.d_nope, m.d_rope, m.d_c, m.scale, d_start);
    check_launch("attention_kernel");
    combine_kernel<<<unsigned(int64_t(T) * m.H), 128, 0, s>>>(o_lat, partial, m.H, splits, m.d_c);
    check_launch("combine_kernel");
}

void project_values(float* o, const float* o_lat, const WRef& kv_b, int T, const MlaShape& m, cudaStream_t s) {
    const int64_t warps = int64_t(T) * m.H * m.d_v;
    if (warps <= 0) return;
    if (kv_b.fp8()) throw DeviceError("project_values: kv_b must be BF16 or F32 (the FP8 plan keeps it BF16)");
    const unsigned blocks = blocks_for(warps * 32, 256);
    if (kv_b.bf16)
        project_values_kernel<<<blocks, 256, 0, s>>>(o, o_lat, static_cast<const __nv_bfloat16*>(kv_b.ptr), T, m.H,
                                                     m.d_nope, m.d_v, m.d_c);
    else
        project_values_kernel<<<blocks, 256, 0, s>>>(o, o_lat, static_cast<const float*>(kv_b.ptr), T, m.H, m.d_nope,
                                                     m.d_v, m.d_c);
    check_launch("project_values_kernel");
}

void causal_softmax(float* scores, int H, int T, int S, int start, float scale, cudaStream_t s) {
    if (H * T <= 0) return;
    causal_softmax_kernel<<<unsigned(int64_t(H) * T), 256, 0, s>>>(scores, T, S, start, scale);
    check_launch("causal_softmax_kernel");
}

}  // namespace moescope::cuda
