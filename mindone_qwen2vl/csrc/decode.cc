// One decoder layer for one token per row, and the final norm with the vocabulary projection, for MindSpore's CPU
// backend (float32 "aot" custom operators). A decode step has little arithmetic; on the CPU backend its cost is
// the ~47 kernels a layer launches, and oneDNN's matrix-vector product over the 151936-row embedding table runs
// at a fraction of the memory bandwidth. Both are one pass over the weights here.
//   DecodeLayer(x [B, E], cos, sin [B, H + 2 KVH, D], mask [B, 1, 1, L], rows [B, KVH] int32,
//               key_cache, value_cache [B' * KVH * L, D] (B' >= B), input_norm [E], q_w [H D, E], q_b [H D],
//               k_w [KVH D, E], k_b, v_w, v_b [KVH D], o_w [E, H D], post_norm [E], gate_w, up_w [I, E],
//               down_w [E, I], eps [1]) -> [B, E]
//     Qwen2's layer as modeling_text computes it: the rotary tables carry the query scale (value rows: cos 1,
//     sin 0), the token's key and value are written into the caches at `rows` (in place) before attending, a
//     key whose mask is float32's minimum weighs nothing and is not read.
//   DecodeHead(x [R, E], norm [E], weight [V, E], eps [1]) -> [R, V]: RMSNorm, then x W^T.
// Weights are [out, in] as torch stores them: each output is a dot product over a contiguous weight row.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels.h"

namespace {

// Products of 256K multiply-adds or more (1 MB of float32 weights) use every core. On the development CPU (AMD
// EPYC, 2 cores) a `2b-slice` decode step took 52-53 ms so, against 65-69 on one thread; the threshold itself is
// a guess, not tuned.
constexpr int64_t kParallelWeights = 1 << 18;

inline float Dot(const float *a, const float *b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y [R, N] = x [R, K] w^T (+ b), w [N, K]; each weight row is read once for up to four rows of x.
void Linear(const float *x, int64_t r, int64_t k, const float *w, const float *b, int64_t n, float *y) {
  mindone::ForRanges(n, n * k >= kParallelWeights, [=](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const float *wo = w + o * k;
      const float bias = b ? b[o] : 0.f;
      int64_t i = 0;
      for (; i + 4 <= r; i += 4) {
        const float *x0 = x + i * k, *x1 = x0 + k, *x2 = x1 + k, *x3 = x2 + k;
        float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
        for (int64_t e = 0; e < k; ++e) {
          const float we = wo[e];
          s0 += x0[e] * we;
          s1 += x1[e] * we;
          s2 += x2[e] * we;
          s3 += x3[e] * we;
        }
        y[i * n + o] = s0 + bias;
        y[(i + 1) * n + o] = s1 + bias;
        y[(i + 2) * n + o] = s2 + bias;
        y[(i + 3) * n + o] = s3 + bias;
      }
      for (; i < r; ++i) y[i * n + o] = Dot(x + i * k, wo, k) + bias;
    }
  });
}

enum LayerInput {
  kX, kCos, kSin, kMask, kRows, kKeyCache, kValueCache, kInputNorm, kQW, kQB, kKW, kKB, kVW, kVB, kOW, kPostNorm,
  kGateW, kUpW, kDownW, kEps, kLayerInputs
};

int Layer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != kLayerInputs + 1 || std::strcmp(dtypes[kRows], "int32") != 0) return 1;
  if (!mindone::AllFloat32(0, kRows, dtypes) || !mindone::AllFloat32(kKeyCache, kLayerInputs, dtypes)) return 1;
  if (ndims[kX] != 2 || ndims[kCos] != 3 || ndims[kMask] != 4 || ndims[kRows] != 2 || ndims[kKeyCache] != 2)
    return 1;
  const int64_t b = shapes[kX][0], e = shapes[kX][1], n = shapes[kCos][1], d = shapes[kCos][2];
  const int64_t kvh = shapes[kRows][1], l = shapes[kMask][3], h = n - 2 * kvh, inter = shapes[kGateW][0];
  // The cache may hold more rows than the step runs (the engine's first rows): its row r starts at r * kvh * l.
  const int64_t cache_rows = shapes[kKeyCache][0];
  if (h <= 0 || h % kvh || cache_rows < b * kvh * l || cache_rows % (kvh * l) || shapes[kKeyCache][1] != d ||
      shapes[kQW][0] != h * d || shapes[kKW][0] != kvh * d || shapes[kOW][1] != h * d)
    return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const float *x = in(kX), *cos = in(kCos), *sin = in(kSin), *mask = in(kMask);
  const int32_t *rows = static_cast<const int32_t *>(params[kRows]);
  float *key_cache = static_cast<float *>(params[kKeyCache]), *value_cache = static_cast<float *>(params[kValueCache]);
  const float eps = in(kEps)[0];
  float *out = static_cast<float *>(params[kLayerInputs]);

  std::vector<float> norm(b * e), qkv(b * n * d), rotated(b * n * d), attn(b * h * d), hidden(b * e);
  std::vector<float> gate(b * inter), up(b * inter);
  mindone::RmsNorm(x, b, e, in(kInputNorm), eps, norm.data());
  // q, k and v side by side per row, as the rotary tables are laid out.
  std::vector<float> part(b * std::max(h, kvh) * d);
  const int64_t widths[3] = {h * d, kvh * d, kvh * d}, offsets[3] = {0, h * d, (h + kvh) * d};
  const int weight[3] = {kQW, kKW, kVW}, bias[3] = {kQB, kKB, kVB};
  for (int p = 0; p < 3; ++p) {
    Linear(norm.data(), b, e, in(weight[p]), in(bias[p]), widths[p], part.data());
    for (int64_t i = 0; i < b; ++i)
      std::memcpy(&qkv[i * n * d + offsets[p]], &part[i * widths[p]], widths[p] * sizeof(float));
  }
  for (int64_t r = 0; r < b * n; ++r) mindone::Rotate(&qkv[r * d], cos + r * d, sin + r * d, d, &rotated[r * d]);
  for (int64_t i = 0; i < b * kvh; ++i)
    if (rows[i] < 0 || rows[i] >= cache_rows) return 1;  // before any write: nothing half-written
  for (int64_t i = 0; i < b; ++i)
    for (int64_t g = 0; g < kvh; ++g) {
      const int64_t row = rows[i * kvh + g];
      std::memcpy(key_cache + row * d, &rotated[(i * n + h + g) * d], d * sizeof(float));
      std::memcpy(value_cache + row * d, &rotated[(i * n + h + kvh + g) * d], d * sizeof(float));
    }
  // Attention, one (row, head) a task; at the 2B widths (12 heads of 128 over thousands of positions) the tasks
  // are worth spreading over the cores.
  const int64_t rep = h / kvh;
  int64_t visible = 0;  // (row, position) pairs the mask shows
  for (int64_t p = 0; p < b * l; ++p) visible += mask[p] != -FLT_MAX;
  mindone::ForRanges(b * h, 2 * visible * h * d >= kParallelWeights, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores(l);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i = t / h, j = t % h;
      const float *m = mask + i * l;
      const int64_t base = (i * kvh + j / rep) * l;
      const float *q = &rotated[(i * n + j) * d];
      float top = -FLT_MAX;
      for (int64_t p = 0; p < l; ++p) {
        if (m[p] == -FLT_MAX) continue;
        scores[p] = Dot(q, key_cache + (base + p) * d, d) + m[p];
        top = std::max(top, scores[p]);
      }
      float *o = &attn[t * d];
      std::fill(o, o + d, 0.f);
      float sum = 0.f;
      for (int64_t p = 0; p < l; ++p) {
        if (m[p] == -FLT_MAX) continue;
        const float w = std::exp(scores[p] - top);
        sum += w;
        const float *v = value_cache + (base + p) * d;
        for (int64_t c = 0; c < d; ++c) o[c] += w * v[c];
      }
      const float inv = sum > 0.f ? 1.f / sum : 0.f;
      for (int64_t c = 0; c < d; ++c) o[c] *= inv;
    }
  });
  Linear(attn.data(), b, h * d, in(kOW), nullptr, e, hidden.data());
  for (int64_t i = 0; i < b * e; ++i) hidden[i] += x[i];
  mindone::RmsNorm(hidden.data(), b, e, in(kPostNorm), eps, norm.data());
  Linear(norm.data(), b, e, in(kGateW), nullptr, inter, gate.data());
  Linear(norm.data(), b, e, in(kUpW), nullptr, inter, up.data());
  for (int64_t i = 0; i < b * inter; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  Linear(gate.data(), b, inter, in(kDownW), nullptr, e, out);
  for (int64_t i = 0; i < b * e; ++i) out[i] += hidden[i];
  return 0;
}

int Head(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 5 || !mindone::AllFloat32(0, 4, dtypes) || ndims[0] != 2 || ndims[2] != 2) return 1;
  const int64_t r = shapes[0][0], e = shapes[0][1], v = shapes[2][0];
  if (shapes[2][1] != e || mindone::Elements(ndims[1], shapes[1]) != e) return 1;
  std::vector<float> norm(r * e);
  mindone::RmsNorm(static_cast<const float *>(params[0]), r, e, static_cast<const float *>(params[1]),
          static_cast<const float *>(params[3])[0], norm.data());
  Linear(norm.data(), r, e, static_cast<const float *>(params[2]), nullptr, v, static_cast<float *>(params[4]));
  return 0;
}

}  // namespace

class AotExtra;

extern "C" int DecodeLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  return mindone::Guarded([&] { return Layer(nparam, params, ndims, shapes, dtypes); });
}

extern "C" std::vector<int64_t> DecodeLayerInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return std::vector<int64_t>(shapes[kX], shapes[kX] + ndims[kX]);
}

extern "C" int DecodeHead(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                          void *stream, void *extra) {
  return mindone::Guarded([&] { return Head(nparam, params, ndims, shapes, dtypes); });
}

extern "C" std::vector<int64_t> DecodeHeadInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return {shapes[0][0], shapes[2][0]};
}
