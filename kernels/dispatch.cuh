// The dispatch of one block (dispatch.h), shared by the dispatch kernel and the router's
// route-and-dispatch kernel of decode.
#pragma once
#include "kernels/dispatch.h"

namespace moescope::cuda {

// Thread e (< E) scans every slot in order: counts, then (after a serial scan of E <= 1024
// counts by thread 0) its rows. O(E * slots) work, microseconds at decode sizes, and
// deterministic. Every thread of the block must call it (it synchronizes).
__device__ inline void dispatch_block(const DispatchOut& d, const int* ids, int slots, int E) {
    const int e = threadIdx.x;
    int n = 0;
    if (e < E)
        for (int s = 0; s < slots; ++s) n += ids[s] == e;
    if (e < E) d.counts[e] = n;
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int i = 0; i < E; ++i) {
            d.offsets[i] = acc;
            acc += d.counts[i];
        }
        d.offsets[E] = acc;
    }
    __syncthreads();
    if (e < E) {
        int row = d.offsets[e];
        for (int s = 0; s < slots; ++s) {
            if (ids[s] == e) {
                d.perm[row] = s;
                d.row_of_slot[s] = row;
                d.row_expert[row] = e;
                ++row;
            }
        }
    }
}

}  // namespace moescope::cuda
