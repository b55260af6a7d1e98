// Backward of multi-head latent attention (the naive, decompressing path of mla.cpp), for
// whole sequences starting at position 0: o_proj, softmax attention, kv_b, kv_a_layernorm,
// kv_a_proj_with_mqa, rope (its transpose), and q_b / q_a_layernorm / q_a (or q_proj).
#include <algorithm>
#include <cstring>

#include "engine/model/backward.h"
#include "engine/model/ops.h"

namespace moescope {

void mla_backward(float* dx, AttentionWeights& dw, const float* dout, const AttentionWeights& w, const MlaDims& d,
                  const Rope& rope, const MlaActs& a, bool accumulate_dx) {
    const int B = a.B, T = a.T, N = B * T, H = d.H, dq = d.d_nope + d.d_rope, dkvb = d.d_nope + d.d_v;
    const int dkv = d.d_c + d.d_rope;
    std::vector<float> dO(size_t(N) * H * d.d_v);  // [N, H, d_v]
    linear_backward(dO.data(), &dw.o_proj, dout, a.o.data(), w.o_proj, N);
    std::vector<float> dQ(size_t(N) * H * dq, 0.0f);     // [N, H, dq] (after rope)
    std::vector<float> dKV(size_t(N) * H * dkvb, 0.0f);  // [N, H, d_nope + d_v]
    std::vector<float> dKP(size_t(N) * d.d_rope, 0.0f);  // [N, d_rope] (after rope)
    // Sequences are independent; heads of one sequence share dKP, so split by sequence.
    parallel_for(B, int64_t(B) * H * T * T * dq > (1 << 17) ? num_threads() : 1, [&](int b) {
        std::vector<float> dp(static_cast<size_t>(T));
        for (int h = 0; h < H; ++h) {
            const float* P = a.p.data() + (size_t(b) * H + h) * T * T;  // [T, T]
            for (int i = 0; i < T; ++i) {
                const size_t ni = size_t(b) * T + i;
                const float* doh = dO.data() + (ni * H + h) * d.d_v;
                const float* qh = a.q.data() + (ni * H + h) * dq;
                float* dqh = dQ.data() + (ni * H + h) * dq;
                const float* pi = P + size_t(i) * T;
                double sum = 0;
                for (int j = 0; j <= i; ++j) {
                    const size_t nj = size_t(b) * T + j;
                    const float* vh = a.kv.data() + (nj * H + h) * dkvb + d.d_nope;
                    float* dvh = dKV.data() + (nj * H + h) * dkvb + d.d_nope;
                    float s = 0;
                    for (int c = 0; c < d.d_v; ++c) {
                        s += doh[c] * vh[c];
                        dvh[c] += pi[j] * doh[c];
                    }
                    dp[size_t(j)] = s;
                    sum += double(pi[j]) * s;
                }
                for (int j = 0; j <= i; ++j) {
                    const size_t nj = size_t(b) * T + j;
                    const float ds = pi[j] * (dp[size_t(j)] - float(sum)) * d.scale;
                    if (ds == 0.0f) continue;
                    const float* kh = a.kv.data() + (nj * H + h) * dkvb;
                    float* dkh = dKV.data() + (nj * H + h) * dkvb;
                    for (int c = 0; c < d.d_nope; ++c) {
                        dqh[c] += ds * kh[c];
                        dkh[c] += ds * qh[c];
                    }
                    const float* kp = a.kpe.data() + nj * d.d_rope;
                    float* dkp = dKP.data() + nj * d.d_rope;
                    for (int c = 0; c < d.d_rope; ++c) {
                        dqh[d.d_nope + c] += ds * kp[c];
                        dkp[c] += ds * qh[d.d_nope + c];
                    }
                }
            }
        }
    });
    // kv = kv_b(c); c = RMSNorm_kva(kva[:, :d_c]); kpe = rope(kva[:, d_c:])
    std::vector<float> dC(size_t(N) * d.d_c);  // [N, d_c]
    linear_backward(dC.data(), &dw.kv_b_proj, dKV.data(), a.c.data(), w.kv_b_proj, N);
    std::vector<float> dKVA(size_t(N) * dkv);  // [N, d_c + d_rope]
    for (int n = 0; n < N; ++n) {
        const int pos = n % T;
        float* row = dKVA.data() + size_t(n) * dkv;
        rmsnorm_backward(row, dw.kv_a_layernorm.ptr(), dC.data() + size_t(n) * d.d_c,
                         a.kva.data() + size_t(n) * dkv, w.kv_a_layernorm.ptr(), 1, d.d_c, 1e-6f);
        std::memcpy(row + d.d_c, dKP.data() + size_t(n) * d.d_rope, sizeof(float) * size_t(d.d_rope));
        rope.apply_transpose(row + d.d_c, 1, d.d_rope, pos);
        rope.apply_transpose(dQ.data() + size_t(n) * H * dq + d.d_nope, H, dq, pos);
    }
    linear_backward(dx, &dw.kv_a_proj_with_mqa, dKVA.data(), a.x.data(), w.kv_a_proj_with_mqa, N, accumulate_dx);
    if (d.q_lora > 0) {
        std::vector<float> dQAn(size_t(N) * d.q_lora), dQA(size_t(N) * d.q_lora);  // [N, q_lora]
        linear_backward(dQAn.data(), &dw.q_b_proj, dQ.data(), a.qa_n.data(), w.q_b_proj, N);
        rmsnorm_backward(dQA.data(), dw.q_a_layernorm.ptr(), dQAn.data(), a.qa.data(), w.q_a_layernorm.ptr(), N,
                         d.q_lora, 1e-6f);
        linear_backward(dx, &dw.q_a_proj, dQA.data(), a.x.data(), w.q_a_proj, N, true);
    } else {
        linear_backward(dx, &dw.q_proj, dQ.data(), a.x.data(), w.q_proj, N, true);
    }
}

}  // namespace moescope
