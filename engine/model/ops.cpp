// Elementary CPU ops.
#include "engine/model/ops.h"

#include <cblas.h>

#include <algorithm>
#include <cstring>
#include <thread>

namespace moescope {

void matmul_nt(float* y, const float* x, const float* W, int T, int out, int in, bool accumulate) {
    // Up to 4 rows go through one matrix-vector product each, so a row's result does not
    // depend on how many rows share the call: MTP verification (2 positions) then gives the
    // same logits as decoding one token at a time, and greedy output is identical either way.
    if (T <= 4) {
        for (int t = 0; t < T; ++t)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, out, in, 1.0f, W, in, x + size_t(t) * in, 1,
                        accumulate ? 1.0f : 0.0f, y + size_t(t) * out, 1);
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, out, in, 1.0f, x, in, W, in, accumulate ? 1.0f : 0.0f, y,
                out);
}

void linear_forward(float* y, const float* x, const Tensor& W, int T, bool accumulate) {
    matmul_nt(y, x, W.ptr(), T, int(W.shape[0]), int(W.shape[1]), accumulate);
}

void rmsnorm_forward(float* out, const float* x, const float* w, int T, int n, float eps) {
    for (int t = 0; t < T; ++t) {
        const float* xt = x + int64_t(t) * n;
        float* ot = out + int64_t(t) * n;
        double ss = 0;
        for (int i = 0; i < n; ++i) ss += double(xt[i]) * xt[i];
        float r = float(1.0 / std::sqrt(ss / n + eps));
        for (int i = 0; i < n; ++i) ot[i] = xt[i] * r * w[i];
    }
}

void swiglu_forward(float* out, const float* g, const float* u, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] = silu(g[i]) * u[i];
}

void softmax_inplace(float* x, int n) {
    float m = x[0];
    for (int i = 1; i < n; ++i) m = std::max(m, x[i]);
    double s = 0;
    for (int i = 0; i < n; ++i) {
        x[i] = std::exp(x[i] - m);
        s += x[i];
    }
    float inv = float(1.0 / s);
    for (int i = 0; i < n; ++i) x[i] *= inv;
}

void set_num_threads(int n) {
    if (n <= 0) n = int(std::max(1u, std::thread::hardware_concurrency()));
    openblas_set_num_threads(n);
}

int num_threads() { return openblas_get_num_threads(); }

}  // namespace moescope
