// A decoder layer over a prompt (one sequence of T positions) in two float32 "aot" operators for MindSpore's
// CPU backend. Through the backend's own kernels a layer is about 35 kernels in two dynamic-shape graphs, each
// kernel paying shape inference and a launch; here a layer is one graph call of these two.
//   PromptProject(x [T, E], cos, sin [T, N, D], input_norm [E], q_w [H D, E], q_b [H D], k_w [KVH D, E], k_b,
//                 v_w, v_b [KVH D], eps [1]) -> qkv [N, T, D], N = H + 2 KVH, heads first: RMSNorm, the three
//     projections, then the rotary tables (they carry the query scale; value rows are cos 1, sin 0).
//   PromptAttend(x [T, E], qkv [N, T, D], rows [Sq] int32, o_w [E, H D], post_norm [E], gate_w, up_w [I, E],
//                down_w [E, I], eps [1]) -> [Sq, E]: the rest of the layer for the positions `rows`, each
//     attending the keys up to its own position.
// The matrix products are oneDNN's sgemm, found in the oneDNN library MindSpore's CPU backend has loaded (the
// library behind its MatMul), on x86-64; LayerKernelsReady() says whether it was found. Without it the operators
// fail (the model does not call them then).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>
#include <dlfcn.h>

#include "kernels.h"

namespace {

// oneDNN's C API: row-major C = alpha op(A) op(B) + beta C; returns dnnl_success (0) or an error status.
typedef int (*SgemmFn)(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                       int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

SgemmFn Sgemm() {
#if !defined(__x86_64__)
  // Measured on x86-64 only, where MindSpore's own MatMul is oneDNN's; elsewhere the model keeps MindSpore's steps.
  return nullptr;
#endif
  // Looked up until found: MindSpore may load its CPU backend (and oneDNN) after this library.
  static std::atomic<SgemmFn> found(nullptr);
  SgemmFn fn = found.load();
  if (fn) return fn;
  // RTLD_NOLOAD: only a library already in the process (MindSpore's), never another copy found on the path.
  if (void *lib = dlopen("libdnnl.so.3", RTLD_NOW | RTLD_NOLOAD)) {
    fn = reinterpret_cast<SgemmFn>(dlsym(lib, "dnnl_sgemm"));
    dlclose(lib);  // drops the reference NOLOAD took; MindSpore's own keeps the library loaded
    found.store(fn);
  }
  return fn;
}

// MindSpore's oneDNN runs sgemm on the calling thread. Products of 32M multiply-adds or more are split
// over the cores: on the development CPU (AMD EPYC, 2 cores) 2000x1536x1536 took 44 ms on two threads against
// 86 on one, while 1000x128x64 (8M) was faster on one (0.16 against 0.18 ms: starting a thread costs more).
constexpr double kParallelMacs = 32.0 * (1 << 20);

enum ProjectInput { kX, kCos, kSin, kInputNorm, kQW, kQB, kKW, kKB, kVW, kVB, kProjectEps, kProjectInputs };

int Project(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != kProjectInputs + 1 || !mindone::AllFloat32(0, kProjectInputs, dtypes)) return 1;
  if (ndims[kX] != 2 || ndims[kCos] != 3 || ndims[kSin] != 3 || ndims[kQW] != 2 || ndims[kKW] != 2) return 1;
  const int64_t t = shapes[kX][0], e = shapes[kX][1], n = shapes[kCos][1], d = shapes[kCos][2];
  const int64_t hd = shapes[kQW][0], kvd = shapes[kKW][0];
  if (shapes[kCos][0] != t || shapes[kSin][0] != t || shapes[kSin][1] != n || shapes[kSin][2] != d || d % 2 ||
      hd + 2 * kvd != n * d || shapes[kQW][1] != e || shapes[kKW][1] != e || shapes[kVW][0] != kvd ||
      ndims[kVW] != 2 || shapes[kVW][1] != e)
    return 1;
  auto size = [&](int i) { return mindone::Elements(ndims[i], shapes[i]); };
  if (size(kInputNorm) != e || size(kQB) != hd || size(kKB) != kvd || size(kVB) != kvd || size(kProjectEps) < 1)
    return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const float *cos = in(kCos), *sin = in(kSin);
  float *out = static_cast<float *>(params[kProjectInputs]);
  std::vector<float> norm(t * e), qkv(t * n * d);
  mindone::RmsNorm(in(kX), t, e, in(kInputNorm), in(kProjectEps)[0], norm.data());
  // q, k and v side by side in each row, as the rotary tables are laid out: three products into one buffer.
  const int64_t widths[3] = {hd, kvd, kvd}, offsets[3] = {0, hd, hd + kvd};
  const int weight[3] = {kQW, kKW, kVW}, bias[3] = {kQB, kKB, kVB};
  for (int p = 0; p < 3; ++p) {
    float *into = qkv.data() + offsets[p];
    if (!mindone::Product(norm.data(), e, t, e, in(weight[p]), widths[p], 0.f, into, n * d)) return 1;
    mindone::AddBias(into, t, widths[p], n * d, in(bias[p]));
  }
  // Rotated, written heads first.
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = i * n + j;
      mindone::Rotate(qkv.data() + r * d, cos + r * d, sin + r * d, d, out + (j * t + i) * d);
    }
  return 0;
}

enum AttendInput { kAX, kQkv, kRows, kOW, kPostNorm, kGateW, kUpW, kDownW, kAttendEps, kAttendInputs };

// Rows of the MLP computed at once: its gate and up products hold rows x I floats each.
constexpr int64_t kMlpFloats = 1 << 21;

int Attend(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != kAttendInputs + 1 || std::strcmp(dtypes[kRows], "int32") != 0) return 1;
  if (!mindone::AllFloat32(0, kRows, dtypes) || !mindone::AllFloat32(kOW, kAttendInputs, dtypes)) return 1;
  if (ndims[kAX] != 2 || ndims[kQkv] != 3 || ndims[kRows] != 1 || ndims[kOW] != 2 || ndims[kGateW] != 2) return 1;
  const int64_t t = shapes[kAX][0], e = shapes[kAX][1], n = shapes[kQkv][0], d = shapes[kQkv][2];
  const int64_t sq = shapes[kRows][0], inter = shapes[kGateW][0];
  if (d == 0 || shapes[kOW][0] != e || shapes[kOW][1] % d) return 1;
  const int64_t h = shapes[kOW][1] / d, kvh = (n - h) / 2;
  if (shapes[kQkv][1] != t || kvh <= 0 || h + 2 * kvh != n || h % kvh || shapes[kGateW][1] != e ||
      ndims[kUpW] != 2 || ndims[kDownW] != 2 || shapes[kUpW][0] != inter || shapes[kUpW][1] != e ||
      shapes[kDownW][0] != e || shapes[kDownW][1] != inter ||
      mindone::Elements(ndims[kPostNorm], shapes[kPostNorm]) != e ||
      mindone::Elements(ndims[kAttendEps], shapes[kAttendEps]) < 1)
    return 1;
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  const float *x = in(kAX), *qkv = in(kQkv), *post_norm = in(kPostNorm), eps = in(kAttendEps)[0];
  const int32_t *rows = static_cast<const int32_t *>(params[kRows]);
  float *out = static_cast<float *>(params[kAttendInputs]);
  bool all = sq == t;
  for (int64_t i = 0; i < sq; ++i) {
    if (rows[i] < 0 || rows[i] >= t) return 1;
    all = all && rows[i] == i;
  }
  // The queries of `rows` (all of them: q as it is), attending heads first.
  std::vector<float> q_rows;
  const float *q = qkv;
  if (!all) {
    q_rows.resize(h * sq * d);
    for (int64_t j = 0; j < h; ++j)
      for (int64_t i = 0; i < sq; ++i)
        std::memcpy(&q_rows[(j * sq + i) * d], qkv + (j * t + rows[i]) * d, d * sizeof(float));
    q = q_rows.data();
  }
  std::vector<float> heads(h * sq * d), attn(sq * h * d), y(sq * e);
  mindone::CausalAttend(q, qkv + h * t * d, qkv + (h + kvh) * t * d, rows, heads.data(), h, kvh, sq, t, d);
  for (int64_t i = 0; i < sq; ++i)
    for (int64_t j = 0; j < h; ++j)
      std::memcpy(&attn[(i * h + j) * d], &heads[(j * sq + i) * d], d * sizeof(float));
  // y = x + attention o_w^T, then out = y + MLP(norm(y)) in blocks of rows.
  for (int64_t i = 0; i < sq; ++i) std::memcpy(&y[i * e], x + rows[i] * e, e * sizeof(float));
  if (!mindone::Product(attn.data(), h * d, sq, h * d, in(kOW), e, 1.f, y.data(), e)) return 1;
  const int64_t block = std::max<int64_t>(64, kMlpFloats / std::max<int64_t>(1, inter));
  const int64_t rows_at_once = std::min(sq, block);
  std::vector<float> norm(rows_at_once * e), gate(rows_at_once * inter), up(rows_at_once * inter);
  for (int64_t i0 = 0; i0 < sq; i0 += block) {
    const int64_t r = std::min(block, sq - i0);
    mindone::RmsNorm(&y[i0 * e], r, e, post_norm, eps, norm.data());
    if (!mindone::Product(norm.data(), e, r, e, in(kGateW), inter, 0.f, gate.data(), inter) ||
        !mindone::Product(norm.data(), e, r, e, in(kUpW), inter, 0.f, up.data(), inter))
      return 1;
    for (int64_t m = 0; m < r * inter; ++m) gate[m] = gate[m] / (1.f + std::exp(-gate[m])) * up[m];
    std::memcpy(out + i0 * e, &y[i0 * e], r * e * sizeof(float));
    if (!mindone::Product(gate.data(), inter, r, inter, in(kDownW), e, 1.f, out + i0 * e, e)) return 1;
  }
  return 0;
}

}  // namespace

// c [m, n] (row stride ldc) = a [m, k] (row stride lda) w^T + beta c, w [n, k] as torch stores a Linear's weight.
// The threads split the larger of m and n: a short prompt's products at real widths (100 rows against 8960
// outputs) would give each thread a sliver of rows and the whole weight to read.
bool mindone::Product(const float *a, int64_t lda, int64_t m, int64_t k, const float *w, int64_t n, float beta,
                      float *c, int64_t ldc) {
  if (m == 0 || n == 0) return true;
  const SgemmFn sgemm = Sgemm();
  if (!sgemm) return false;
  std::atomic<bool> ok(true);
  auto part = [&](int64_t r0, int64_t r1, int64_t o0, int64_t o1) {
    if (r0 >= r1 || o0 >= o1) return;
    float *cp = c + r0 * ldc + o0;
    const float *ap = a + r0 * lda, *wp = w + o0 * k;
    if (sgemm('N', 'T', r1 - r0, o1 - o0, k, 1.f, ap, lda, wp, k, beta, cp, ldc) != 0) ok = false;
  };
  const double work = static_cast<double>(m) * n * k;
  if (m >= n)
    mindone::ForRanges(m, work >= kParallelMacs, [&](int64_t r0, int64_t r1) { part(r0, r1, 0, n); });
  else
    mindone::ForRanges(n, work >= kParallelMacs, [&](int64_t o0, int64_t o1) { part(0, m, o0, o1); });
  return ok.load();
}

class AotExtra;

extern "C" int LayerKernelsReady() { return Sgemm() != nullptr; }

extern "C" int PromptProject(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                             void *stream, void *extra) {
  return mindone::Guarded([&] { return Project(nparam, params, ndims, shapes, dtypes); });
}

extern "C" std::vector<int64_t> PromptProjectInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return {shapes[kCos][1], shapes[kX][0], shapes[kCos][2]};
}

extern "C" int PromptAttend(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                            void *stream, void *extra) {
  return mindone::Guarded([&] { return Attend(nparam, params, ndims, shapes, dtypes); });
}

extern "C" std::vector<int64_t> PromptAttendInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return {shapes[kRows][0], shapes[kAX][1]};
}
