// Token permutation by expert and the combine of the expert outputs (DeepSeekMoE dispatch).
// A slot is (token t, choice i) = t * k + i. Rows of the permuted buffers are grouped by
// expert (expert 0's rows first), slots in ascending order within an expert, so the layout
// is deterministic and matches the CPU's per-expert row lists.
#pragma once
#include "kernels/common.h"

namespace moescope::cuda {

// What the dispatch writes from ids [T, k]: counts [E] (the load), offsets [E + 1], perm [T*k]
// (row -> slot), row_of_slot [T*k], row_expert [T*k] (row -> expert).
struct DispatchOut {
    int *counts, *offsets, *perm, *row_of_slot, *row_expert;
};

// One block; E <= 1024.
void dispatch(const DispatchOut& d, const int* ids, int T, int k, int E, cudaStream_t s);

// xin[row] = x[perm[row] / k] for rows < T*k; x [T, D], xin [T*k, D].
void gather_rows(float* xin, const float* x, const int* perm, int R, int k, int D, cudaStream_t s);

// h[t] += shared[t] (when non-null) + sum over t's slots in ascending expert id of w * y[row_of_slot],
// the CPU's accumulation order. y [T*k, D]; ids, weights [T, k].
void combine(float* h, const float* shared, const float* y, const int* ids, const float* weights,
             const int* row_of_slot, int T, int k, int D, cudaStream_t s);

}  // namespace moescope::cuda
