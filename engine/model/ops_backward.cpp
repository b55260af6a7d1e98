// Backward passes of the elementary ops (linear, RMSNorm, SwiGLU, cross-entropy, embedding).
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "engine/model/backward.h"
#include "engine/model/ops.h"

namespace moescope {

void matmul_nt_backward(float* dx, float* dW, const float* dy, const float* x, const float* W, int T, int out,
                        int in, bool accumulate_dx) {
    if (T <= 0) return;
    if (fixed_order_products()) {  // training: fixed column blocks (ops.h FixedOrderProducts)
        if (dx)  // dx[:, i0:i1] = dy W[:, i0:i1]
            for_each_fixed_block(in, [&](int i0, int i1) {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, i1 - i0, out, 1.0f, dy, out, W + i0, in,
                            accumulate_dx ? 1.0f : 0.0f, dx + i0, in);
            });
        if (dW)  // dW[o0:o1, :] += dy[:, o0:o1]^T x
            for_each_fixed_block(out, [&](int o0, int o1) {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, o1 - o0, in, T, 1.0f, dy + o0, out, x, in, 1.0f,
                            dW + size_t(o0) * size_t(in), in);
            });
        return;
    }
    if (dx)  // dx[T, in] = dy[T, out] W[out, in]
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, in, out, 1.0f, dy, out, W, in,
                    accumulate_dx ? 1.0f : 0.0f, dx, in);
    if (dW)  // dW[out, in] += dy^T[out, T] x[T, in]
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, T, 1.0f, dy, out, x, in, 1.0f, dW, in);
}

void linear_backward(float* dx, Tensor* dW, const float* dy, const float* x, const Tensor& W, int T,
                     bool accumulate_dx) {
    matmul_nt_backward(dx, dW ? dW->ptr() : nullptr, dy, x, W.ptr(), T, int(W.shape[0]), int(W.shape[1]),
                       accumulate_dx);
}

void rmsnorm_backward(float* dx, float* dw, const float* dy, const float* x, const float* w, int T, int n,
                      float eps, bool accumulate_dx) {
    for (int t = 0; t < T; ++t) {
        const float* xt = x + int64_t(t) * n;
        const float* dyt = dy + int64_t(t) * n;
        float* dxt = dx + int64_t(t) * n;
        double ss = 0;
        for (int i = 0; i < n; ++i) ss += double(xt[i]) * xt[i];
        const double r = 1.0 / std::sqrt(ss / n + eps);
        double dot = 0;  // sum_j dy_j w_j x_j
        for (int i = 0; i < n; ++i) dot += double(dyt[i]) * w[i] * xt[i];
        const double c = r * r * r / n * dot;
        if (dw)
            for (int i = 0; i < n; ++i) dw[i] += float(double(dyt[i]) * xt[i] * r);
        for (int i = 0; i < n; ++i) {
            const float g = float(r * dyt[i] * w[i] - c * xt[i]);
            dxt[i] = accumulate_dx ? dxt[i] + g : g;
        }
    }
}

void swiglu_backward(float* dg, float* du, const float* dout, const float* g, const float* u, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float s = sigmoid(g[i]);
        const float silu_g = g[i] * s;
        const float dsilu = s * (1.0f + g[i] * (1.0f - s));  // d/dg of g * sigmoid(g)
        const float d = dout[i];
        du[i] = d * silu_g;
        dg[i] = d * u[i] * dsilu;
    }
}

double cross_entropy_forward_backward(float* logits, const int* targets, int T, int V, float weight) {
    double loss = 0;
    for (int t = 0; t < T; ++t) {
        float* lg = logits + int64_t(t) * V;
        const int y = targets[t];
        if (y < 0) {
            std::fill(lg, lg + V, 0.0f);
            continue;
        }
        float m = lg[0];
        for (int v = 1; v < V; ++v) m = std::max(m, lg[v]);
        double s = 0;
        for (int v = 0; v < V; ++v) s += std::exp(double(lg[v] - m));
        const double lse = m + std::log(s);
        loss += weight * (lse - lg[y]);
        for (int v = 0; v < V; ++v) lg[v] = float(weight * std::exp(double(lg[v]) - lse));
        lg[y] -= weight;
    }
    return loss;
}

void embedding_backward(Tensor& dE, const float* dh, const int* tokens, int T) {
    const int64_t D = dE.shape[1];
    for (int t = 0; t < T; ++t) {
        float* row = dE.ptr() + int64_t(tokens[t]) * D;
        const float* g = dh + int64_t(t) * D;
        for (int64_t i = 0; i < D; ++i) row[i] += g[i];
    }
}

}  // namespace moescope
