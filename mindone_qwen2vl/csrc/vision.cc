// A vision block as one float32 "aot" operator for MindSpore's CPU backend, in place of two dynamic-shape graphs
// of about 30 kernels and the gathers that lay out frames:
//   VisionBlock(x [N, E], cos, sin [N, 3, 1, D], bounds [S + 1] int32, kind [1] int32, w0 .. w11) -> [N, E]
//     The rows bounds[s]..bounds[s+1]-1 (frames, or Qwen2.5-VL's windows, in the order the blocks see the patches)
//     attend to each other only. The rotary tables have a row for each of q, k and v (they carry the query scale;
//     value rows are cos 1, sin 0). kind 0, Qwen2-VL, weights in VisionBlockWeights' order: LayerNorms with bias
//     and fc2(quick_gelu(fc1(x))); kind 1, Qwen2.5-VL (its weights() order): RMSNorms and
//     down(silu(gate(x)) * up(x)), every projection with a bias.
// Products run on oneDNN's sgemm (prompt.cc's Product); the norms' epsilon is 1e-6, as in both models.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <vector>

#include "kernels.h"

namespace {

constexpr float kEps = 1e-6f;

// LayerNorm with bias b (Qwen2-VL), RMSNorm without (Qwen2.5-VL).
void Norm(const float *x, int64_t r, int64_t e, const float *w, const float *b, float *y) {
  if (!b) return mindone::RmsNorm(x, r, e, w, kEps, y);
  for (int64_t i = 0; i < r; ++i) {
    const float *xi = x + i * e;
    float *yi = y + i * e;
    float mean = 0.f, var = 0.f;
    for (int64_t j = 0; j < e; ++j) mean += xi[j];
    mean /= static_cast<float>(e);
    for (int64_t j = 0; j < e; ++j) var += (xi[j] - mean) * (xi[j] - mean);
    const float scale = 1.f / std::sqrt(var / static_cast<float>(e) + kEps);
    for (int64_t j = 0; j < e; ++j) yi[j] = (xi[j] - mean) * scale * w[j] + b[j];
  }
}

enum Input { kX, kCos, kSin, kBounds, kKind, kW0, kInputs = kW0 + 12 };

// Where each weight sits in the two models' bundles.
struct Layout {
  int norm1_w, norm1_b, qkv_w, qkv_b, proj_w, proj_b, norm2_w, norm2_b;
};
constexpr Layout kQwen2{0, 1, 2, 3, 4, 5, 6, 7};
constexpr Layout kQwen25{0, -1, 1, 2, 3, 4, 5, -1};

// Rows of the MLP computed at once: its hidden products hold rows x I floats (two of them for Qwen2.5-VL).
constexpr int64_t kMlpFloats = 1 << 21;

int Block(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != kInputs + 1 || std::strcmp(dtypes[kBounds], "int32") != 0 || std::strcmp(dtypes[kKind], "int32"))
    return 1;
  for (int i = 0; i < kInputs; ++i)
    if (i != kBounds && i != kKind && std::strcmp(dtypes[i], "float32") != 0) return 1;
  if (ndims[kX] != 2 || ndims[kCos] != 4 || ndims[kSin] != 4 || ndims[kBounds] != 1) return 1;
  if (mindone::Elements(ndims[kKind], shapes[kKind]) != 1) return 1;
  const int kind = static_cast<const int32_t *>(params[kKind])[0];
  if (kind != 0 && kind != 1) return 1;
  const Layout &at = kind == 0 ? kQwen2 : kQwen25;
  auto w = [&](int i) { return i < 0 ? nullptr : static_cast<const float *>(params[kW0 + i]); };
  auto shape = [&](int i) { return shapes[kW0 + i]; };
  const int64_t n = shapes[kX][0], e = shapes[kX][1], d = shapes[kCos][3];
  const int64_t segments = shapes[kBounds][0] - 1;
  if (d == 0 || d % 2 || e % d || ndims[kW0 + at.qkv_w] != 2 || ndims[kW0 + at.proj_w] != 2 ||
      shape(at.qkv_w)[0] != 3 * e || shape(at.qkv_w)[1] != e || shape(at.proj_w)[0] != e ||
      shape(at.proj_w)[1] != e || segments < 0)
    return 1;
  for (int i = kCos; i <= kSin; ++i)
    if (shapes[i][0] != n || shapes[i][1] != 3 || shapes[i][2] != 1 || shapes[i][3] != d) return 1;
  // MLP: kind 0 fc1 [I, E], fc1 bias, fc2 [E, I], fc2 bias; kind 1 gate, up [I, E] and down [E, I], with biases.
  const int first_mlp = kind == 0 ? 8 : 6;
  const int down = 10;
  for (int i : {first_mlp, down, kind == 1 ? 8 : down})
    if (ndims[kW0 + i] != 2) return 1;
  const int64_t inter = shape(first_mlp)[0];
  if (shape(first_mlp)[1] != e || shape(down)[0] != e || shape(down)[1] != inter ||
      (kind == 1 && (shape(8)[0] != inter || shape(8)[1] != e)))
    return 1;
  // Every vector (norms, biases) the length it is read with.
  auto size = [&](int i) { return i < 0 ? -1 : mindone::Elements(ndims[kW0 + i], shape(i)); };
  const int vectors[] = {at.norm1_w, at.norm1_b, at.qkv_b, at.proj_b, at.norm2_w, at.norm2_b, first_mlp + 1, down + 1};
  const int64_t lengths[] = {e, e, 3 * e, e, e, e, inter, e};
  for (int i = 0; i < 8; ++i)
    if (vectors[i] >= 0 && size(vectors[i]) != lengths[i]) return 1;
  if (kind == 1 && size(9) != inter) return 1;
  const int32_t *bounds = static_cast<const int32_t *>(params[kBounds]);
  if (segments > 0 && (bounds[0] != 0 || bounds[segments] != n)) return 1;
  if (segments == 0 && n != 0) return 1;
  for (int64_t s = 0; s < segments; ++s)
    if (bounds[s + 1] < bounds[s]) return 1;
  const float *x = static_cast<const float *>(params[kX]);
  const float *cos = static_cast<const float *>(params[kCos]), *sin = static_cast<const float *>(params[kSin]);
  float *out = static_cast<float *>(params[kInputs]);
  const int64_t heads = e / d;

  std::vector<float> h(n * e), qkv(n * 3 * e), rotated(3 * e * n);
  Norm(x, n, e, w(at.norm1_w), w(at.norm1_b), h.data());
  if (!mindone::Product(h.data(), e, n, e, w(at.qkv_w), 3 * e, 0.f, qkv.data(), 3 * e)) return 1;
  mindone::AddBias(qkv.data(), n, 3 * e, 3 * e, w(at.qkv_b));
  // Rotated and heads first: [3, heads, N, D].
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < 3; ++p) {
      const float *c = cos + (i * 3 + p) * d, *s = sin + (i * 3 + p) * d;
      for (int64_t j = 0; j < heads; ++j) {
        mindone::Rotate(&qkv[(i * 3 + p) * e + j * d], c, s, d, &rotated[((p * heads + j) * n + i) * d]);
      }
    }
  std::vector<float> attn_heads(heads * n * d);
  const float *q = rotated.data(), *k = q + heads * n * d, *v = k + heads * n * d;
  mindone::SegmentAttend(q, k, v, attn_heads.data(), heads, heads, n, d, bounds, segments);
  // Back to rows (qkv's buffer is free now), then y = x + attention proj^T + bias.
  float *attn = qkv.data();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < heads; ++j)
      std::memcpy(attn + (i * heads + j) * d, &attn_heads[(j * n + i) * d], d * sizeof(float));
  std::vector<float>().swap(attn_heads);
  std::vector<float>().swap(rotated);
  float *y = h.data();  // the norm's buffer, free too
  std::memcpy(y, x, n * e * sizeof(float));
  if (!mindone::Product(attn, e, n, e, w(at.proj_w), e, 1.f, y, e)) return 1;
  mindone::AddBias(y, n, e, e, w(at.proj_b));
  // out = y + MLP(norm2(y)), a block of rows at a time.
  const int64_t block = std::min(n, std::max<int64_t>(64, kMlpFloats / std::max<int64_t>(1, inter)));
  std::vector<float> norm(block * e), a(block * inter), b(kind == 1 ? block * inter : 0);
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t r = std::min(block, n - i0);
    Norm(y + i0 * e, r, e, w(at.norm2_w), w(at.norm2_b), norm.data());
    if (!mindone::Product(norm.data(), e, r, e, w(first_mlp), inter, 0.f, a.data(), inter)) return 1;
    mindone::AddBias(a.data(), r, inter, inter, w(first_mlp + 1));
    if (kind == 0) {
      for (int64_t m = 0; m < r * inter; ++m) a[m] = a[m] / (1.f + std::exp(-1.702f * a[m]));  // quick GELU
    } else {
      if (!mindone::Product(norm.data(), e, r, e, w(8), inter, 0.f, b.data(), inter)) return 1;
      mindone::AddBias(b.data(), r, inter, inter, w(9));
      for (int64_t m = 0; m < r * inter; ++m) a[m] = a[m] / (1.f + std::exp(-a[m])) * b[m];
    }
    std::memcpy(out + i0 * e, y + i0 * e, r * e * sizeof(float));
    if (!mindone::Product(a.data(), inter, r, inter, w(down), e, 1.f, out + i0 * e, e)) return 1;
    mindone::AddBias(out + i0 * e, r, e, e, w(down + 1));
  }
  return 0;
}

}  // namespace

class AotExtra;

extern "C" int VisionBlock(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                           void *stream, void *extra) {
  return mindone::Guarded([&] { return Block(nparam, params, ndims, shapes, dtypes); });
}

extern "C" std::vector<int64_t> VisionBlockInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return std::vector<int64_t>(shapes[kX], shapes[kX] + ndims[kX]);
}
