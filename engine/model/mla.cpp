// MLA forward. Naive: decompress kv_b(c) for every cached position into per-head keys and
// values. Absorbed: fold W_UK into the query (q_lat_h = W_UK_h^T q_nope_h), score against
// cached c directly, accumulate the output in latent space and apply W_UV once.
#include "engine/model/mla.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/model/ops.h"

namespace moescope {

MlaDims::MlaDims(const ModelConfig& c)
    : D(c.hidden_size), H(c.num_attention_heads), d_nope(c.qk_nope_head_dim), d_rope(c.qk_rope_head_dim),
      d_v(c.v_head_dim), d_c(c.kv_lora_rank), q_lora(c.q_lora_rank), scale(float(c.softmax_scale())),
      eps(float(c.rms_norm_eps)) {}

namespace {

// q[T, H, d_nope + d_rope] with rope applied to each head's q_pe.
void project_queries(std::vector<float>& q, const float* x, int T, int start, const AttentionWeights& w,
                     const MlaDims& d, const Rope& rope) {
    const int dq = d.d_nope + d.d_rope;
    q.resize(size_t(T) * d.H * dq);
    if (d.q_lora > 0) {
        std::vector<float> qa(size_t(T) * d.q_lora);
        linear_forward(qa.data(), x, w.q_a_proj, T);
        rmsnorm_forward(qa.data(), qa.data(), w.q_a_layernorm.ptr(), T, d.q_lora, 1e-6f);
        linear_forward(q.data(), qa.data(), w.q_b_proj, T);
    } else {
        linear_forward(q.data(), x, w.q_proj, T);
    }
    for (int t = 0; t < T; ++t) rope.apply(q.data() + size_t(t) * d.H * dq + d.d_nope, d.H, dq, start + t);
}

// Appends the T new latents (kv_a_layernorm(c)) and rope'd k_pe to the cache.
void append_latents(LatentCache& cache, const float* x, int T, int start, const AttentionWeights& w, const MlaDims& d,
                    const Rope& rope) {
    const int dkv = d.d_c + d.d_rope;
    std::vector<float> kv(size_t(T) * dkv);
    linear_forward(kv.data(), x, w.kv_a_proj_with_mqa, T);
    cache.c.resize(size_t(start + T) * d.d_c);
    cache.k_pe.resize(size_t(start + T) * d.d_rope);
    for (int t = 0; t < T; ++t) {
        const float* row = kv.data() + size_t(t) * dkv;
        rmsnorm_forward(cache.c.data() + size_t(start + t) * d.d_c, row, w.kv_a_layernorm.ptr(), 1, d.d_c, 1e-6f);
        float* kp = cache.k_pe.data() + size_t(start + t) * d.d_rope;
        std::memcpy(kp, row + d.d_c, sizeof(float) * size_t(d.d_rope));
        rope.apply(kp, 1, d.d_rope, start + t);
    }
}

}  // namespace

void mla_forward(float* out, const float* x, int T, int start, const AttentionWeights& w, const MlaDims& d,
                 const Rope& rope, LatentCache& cache, bool absorbed) {
    const int H = d.H, dq = d.d_nope + d.d_rope, S = start + T;
    std::vector<float> q;
    project_queries(q, x, T, start, w, d, rope);
    append_latents(cache, x, T, start, w, d, rope);
    const float* C = cache.c.data();     // [S, d_c]
    const float* KP = cache.k_pe.data(); // [S, d_rope]
    std::vector<float> o(size_t(T) * H * d.d_v);  // [T, H, d_v]
    const int dkvb = d.d_nope + d.d_v;
    if (!absorbed) {
        // Scores of a head as one product Q_h K_h^T (keys = [k_nope_h | k_pe] made contiguous),
        // heads in parallel; each head writes its own slice of o.
        std::vector<float> kv(size_t(S) * H * dkvb);  // [S, H, d_nope + d_v]
        linear_forward(kv.data(), C, w.kv_b_proj, S);
        // Short prompts stay on this thread: the pool would contend with OpenBLAS's threads,
        // still polling after the projections, for a few microseconds of work.
        const int64_t work = int64_t(H) * T * S * (dq + d.d_v);
        parallel_range(H, work >= (int64_t(1) << 20) ? work : 0, [&](int h0, int h1) {
            std::vector<float> K(size_t(S) * dq), Qh(size_t(T) * dq), P(static_cast<size_t>(S));  // [S, dq], [T, dq], [S]
            for (int h = h0; h < h1; ++h) {
                for (int j = 0; j < S; ++j) {
                    std::memcpy(K.data() + size_t(j) * dq, kv.data() + (size_t(j) * H + h) * dkvb,
                                sizeof(float) * size_t(d.d_nope));
                    std::memcpy(K.data() + size_t(j) * dq + d.d_nope, KP + size_t(j) * d.d_rope,
                                sizeof(float) * size_t(d.d_rope));
                }
                for (int t = 0; t < T; ++t)
                    std::memcpy(Qh.data() + size_t(t) * dq, q.data() + (size_t(t) * H + h) * dq, sizeof(float) * size_t(dq));
                for (int t = 0; t < T; ++t) {
                    const int n = start + t + 1;
                    matmul_nt_rows(P.data(), Qh.data() + size_t(t) * dq, K.data(), 1, n, dq);
                    for (int j = 0; j < n; ++j) P[size_t(j)] *= d.scale;
                    softmax_fast(P.data(), n);
                    float* oh = o.data() + (size_t(t) * H + h) * d.d_v;
                    matvec_t(oh, P.data(), kv.data() + size_t(h) * dkvb + d.d_nope, n, d.d_v, int64_t(H) * dkvb);
                }
            }
        });
    } else {
        // Per position t (computed the same way whatever T, so verifying drafts reproduces
        // one-token decoding): q_lat of every head, scores of all heads against the cached
        // latents as one product (each c_j read once for all heads), softmax and the latent
        // output per head in parallel, then W_UV.
        // W_UK / W_UV slices of kv_b_proj [H*(d_nope+d_v), d_c], f32 or BF16-stored (same results).
        const Tensor& Wkvb = w.kv_b_proj;
        auto uk_times = [&](float* y, const float* qh, size_t off) {  // y[d_c] = W_UK_h^T q_nope_h
            if (Wkvb.is_bf16()) matvec_t_bf16(y, qh, Wkvb.bf16.data() + off, d.d_nope, d.d_c, d.d_c);
            else matvec_t(y, qh, Wkvb.ptr() + off, d.d_nope, d.d_c, d.d_c);
        };
        auto uv_times = [&](float* y, const float* ol, size_t off) {  // y[d_v] = W_UV_h ol
            if (Wkvb.is_bf16()) matmul_nt_rows_bf16(y, ol, Wkvb.bf16.data() + off, 1, d.d_v, d.d_c);
            else matmul_nt_rows(y, ol, Wkvb.ptr() + off, 1, d.d_v, d.d_c);
        };
        std::vector<float> qlat(size_t(H) * d.d_c), qpe(size_t(H) * d.d_rope);  // [H, d_c], [H, d_rope]
        std::vector<float> P(size_t(H) * S), sr(size_t(H) * S), olat(size_t(H) * d.d_c);  // [H, n], [H, n], [H, d_c]
        for (int t = 0; t < T; ++t) {
            const int n = start + t + 1;
            for (int h = 0; h < H; ++h) {
                const float* qh = q.data() + (size_t(t) * H + h) * dq;
                uk_times(qlat.data() + size_t(h) * d.d_c, qh, size_t(h) * dkvb * d.d_c);  // W_UK_h [d_nope, d_c]
                std::memcpy(qpe.data() + size_t(h) * d.d_rope, qh + d.d_nope, sizeof(float) * size_t(d.d_rope));
            }
            matmul_nt_rows(P.data(), qlat.data(), C, H, n, d.d_c);       // [H, n]
            matmul_nt_rows(sr.data(), qpe.data(), KP, H, n, d.d_rope);   // [H, n]
            parallel_range(H, int64_t(H) * n * d.d_c, [&](int h0, int h1) {
                for (int h = h0; h < h1; ++h) {
                    float* p = P.data() + size_t(h) * n;
                    const float* r = sr.data() + size_t(h) * n;
                    for (int j = 0; j < n; ++j) p[j] = (p[j] + r[j]) * d.scale;
                    softmax_fast(p, n);
                    float* ol = olat.data() + size_t(h) * d.d_c;
                    matvec_t(ol, p, C, n, d.d_c, d.d_c);
                    uv_times(o.data() + (size_t(t) * H + h) * d.d_v, ol,
                             (size_t(h) * dkvb + d.d_nope) * d.d_c);  // W_UV_h [d_v, d_c]
                }
            });
        }
    }
    linear_forward(out, o.data(), w.o_proj, T);
}

}  // namespace moescope
