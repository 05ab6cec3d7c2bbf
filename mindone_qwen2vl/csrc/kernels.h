// What the kernels' sources share (sdpa.cc defines these).
#pragma once
#include <cstdint>

namespace mindone {

// The cores this process may run on.
int Threads();

// Causal attention as CausalAttention computes it: q [gq, lq, d], k and v [gk, l, d], pos [lq] -> o [gq, lq, d],
// query i sees the keys 0..pos[i]. Throws std::bad_alloc when its tiles find no memory.
void CausalAttend(const float *q, const float *k, const float *v, const int32_t *pos, float *o, int64_t gq,
                  int64_t gk, int64_t lq, int64_t l, int64_t d);

}  // namespace mindone
