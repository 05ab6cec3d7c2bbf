// What the kernels' sources share (sdpa.cc defines these).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

namespace mindone {

// The cores this process may run on.
int Threads();

// Causal attention as CausalAttention computes it: q [gq, lq, d], k and v [gk, l, d], pos [lq] -> o [gq, lq, d],
// query i sees the keys 0..pos[i]. Throws std::bad_alloc when its tiles find no memory.
void CausalAttend(const float *q, const float *k, const float *v, const int32_t *pos, float *o, int64_t gq,
                  int64_t gk, int64_t lq, int64_t l, int64_t d);

// c [m, n] (row stride ldc) = a [m, k] (row stride lda) w^T + beta c, w [n, k] as torch stores a Linear's weight,
// on oneDNN's sgemm (prompt.cc); false when sgemm is not to be had or fails.
bool Product(const float *a, int64_t lda, int64_t m, int64_t k, const float *w, int64_t n, float beta, float *c,
             int64_t ldc);

// Attention within segments: q [gq, n, d], k and v [gk, n, d] -> o [gq, n, d]; the rows bounds[s]..bounds[s+1]-1
// (s < segments) attend to each other only, every key of their segment visible. Throws std::bad_alloc.
void SegmentAttend(const float *q, const float *k, const float *v, float *o, int64_t gq, int64_t gk, int64_t n,
                   int64_t d, const int32_t *bounds, int64_t segments);

// The number of elements of a tensor of shape[0..nd-1].
inline int64_t Elements(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

// Whether the inputs from..to-1 are all float32 (MindSpore passes each input's dtype by name).
inline bool AllFloat32(int from, int to, const char **dtypes) {
  for (int i = from; i < to; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

// Qwen2's RMSNorm of r rows of e: y = x / sqrt(mean(x^2) + eps) * w.
inline void RmsNorm(const float *x, int64_t r, int64_t e, const float *w, float eps, float *y) {
  for (int64_t i = 0; i < r; ++i) {
    const float *xi = x + i * e;
    float *yi = y + i * e;
    float ss = 0.f;
    for (int64_t j = 0; j < e; ++j) ss += xi[j] * xi[j];
    const float scale = 1.f / std::sqrt(ss / static_cast<float>(e) + eps);
    for (int64_t j = 0; j < e; ++j) yi[j] = xi[j] * scale * w[j];
  }
}

// One head's rotary embedding: o = v cos + rotate_half(v) sin, rotate_half(v1, v2) = (-v2, v1), d even.
inline void Rotate(const float *v, const float *c, const float *s, int64_t d, float *o) {
  const int64_t half = d / 2;
  for (int64_t m = 0; m < half; ++m) {
    o[m] = v[m] * c[m] - v[m + half] * s[m];
    o[m + half] = v[m + half] * c[m + half] + v[m] * s[m + half];
  }
}

// b [width] added to the first `width` floats of r rows `stride` floats apart.
inline void AddBias(float *y, int64_t r, int64_t width, int64_t stride, const float *b) {
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < width; ++j) y[i * stride + j] += b[j];
}

// fn(a, z) over [0, n) in one range per core when `parallel`, else in one range on this thread.
template <typename F>
void ForRanges(int64_t n, bool parallel, F fn) {
  const int threads = parallel ? static_cast<int>(std::min<int64_t>(Threads(), n)) : 1;
  if (threads <= 1) return fn(0, n);
  std::vector<std::thread> pool;
  const int64_t step = (n + threads - 1) / threads;
  for (int t = 1; t < threads; ++t) {
    const int64_t a = std::min(n, t * step), z = std::min(n, a + step);
    try {
      pool.emplace_back([=] { fn(a, z); });
    } catch (const std::system_error &) {
      fn(a, z);  // no thread to be had: this one takes the range
    }
  }
  fn(0, std::min(n, step));
  for (auto &t : pool) t.join();
}

// An operator's body, its exceptions (no memory for the work buffers) turned into the error status MindSpore
// reports: one crossing the C call would abort the process.
template <typename F>
int Guarded(F fn) {
  try {
    return fn();
  } catch (const std::exception &) {
    return 1;
  }
}

}  // namespace mindone
