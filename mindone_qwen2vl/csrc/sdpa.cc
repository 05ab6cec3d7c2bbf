// Fused float32 attention for MindSpore's CPU backend (an "aot" custom operator): softmax(q k^T) v computed
// block by block with a running maximum and sum, so the scores are never held in memory. Queries arrive
// already scaled. Layouts, G = groups of queries that share keys (heads, or heads x frames):
//   FrameAttention(q [Gq, Lq, D], k [Gk, L, D], v [Gk, L, D]) -> [Gq, Lq, D], every key visible;
//   CausalAttention(q, k, v, pos [Lq] int32) -> [Gq, Lq, D], query i sees the keys 0..pos[i].
// Query group g reads key group g / (Gq / Gk) (grouped-query attention: consecutive query heads share a KV head).
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <system_error>
#include <thread>
#include <vector>
#include <sched.h>

#include "kernels.h"

namespace {

constexpr int kRows = 8;     // query rows computed together: each key tile is loaded once for all of them
constexpr int kKeys = 128;   // keys per tile: a tile's scores for kRows rows stay in L1
constexpr int kTaskRows = 32;

struct Problem {
  const float *q, *k, *v;
  const int32_t *pos;  // null: no causal limit
  float *o;
  int64_t gq, gk, lq, l, d;
  int64_t qs, ks;  // rows between one group's queries (and outputs) and the next's, and between its keys' (values')
  float *kt;    // the keys transposed tile by tile: [gk, tiles, d, kKeys] (keys past l are zeros, never seen)
  int64_t tiles;
};

typedef float Vec __attribute__((vector_size(64), aligned(4)));  // 16 floats; two AVX2 registers without AVX-512
constexpr int kLanes = 16;

// One task: the query rows q0..q0+nq-1 of query group g against all the keys they see. D > 0: the head size
// as a constant (the common sizes), so that a row block's accumulators stay in registers; D == 0: p.d.
template <int D>
void RunTask(const Problem &p, int64_t g, int64_t q0, int64_t nq, std::vector<float> &scratch) {
  const int64_t d = D > 0 ? D : p.d;
  const int64_t rep = p.gq / p.gk;
  const float *kt = p.kt + (g / rep) * p.tiles * d * kKeys;
  const float *vg = p.v + (g / rep) * p.ks * d;
  scratch.resize(kTaskRows * kKeys + kTaskRows * d + 2 * kTaskRows);
  float *s = scratch.data();
  float *acc = s + kTaskRows * kKeys;
  float *m = acc + kTaskRows * d, *sum = m + kTaskRows;
  int64_t last[kTaskRows];
  int64_t reach = 0;
  for (int64_t r = 0; r < nq; ++r) {
    last[r] = p.pos ? std::min<int64_t>(p.pos[q0 + r], p.l - 1) : p.l - 1;
    reach = std::max(reach, last[r] + 1);
    m[r] = -FLT_MAX;
    sum[r] = 0.f;
  }
  std::fill(acc, acc + nq * d, 0.f);
  const float *qg = p.q + (g * p.qs + q0) * d;
  for (int64_t k0 = 0; k0 < reach; k0 += kKeys) {
    const int64_t nk = std::min<int64_t>(kKeys, reach - k0);
    const int64_t chunks = (nk + kLanes - 1) / kLanes;
    for (int64_t r0 = 0; r0 < nq; r0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, nq - r0));
      int64_t block_last = last[r0];
      for (int r = 1; r < rows; ++r) block_last = std::max(block_last, last[r0 + r]);
      if (k0 > block_last) continue;  // no row of this block sees these keys
      // Scores of the rows against the tile, a vector of keys at a time.
      const float *qp[kRows];  // rows past the block's end repeat its first row (computed, never stored)
      for (int r = 0; r < kRows; ++r) qp[r] = qg + (r0 + (r < rows ? r : 0)) * d;
      for (int64_t c = 0; c < chunks; ++c) {
        Vec a[kRows] = {};
        const float *col = kt + (k0 / kKeys) * d * kKeys + c * kLanes;
        for (int64_t e = 0; e < d; ++e) {
          Vec kv;
          std::memcpy(&kv, col + e * kKeys, sizeof(Vec));
          for (int r = 0; r < kRows; ++r) a[r] += qp[r][e] * kv;
        }
        for (int r = 0; r < rows; ++r) std::memcpy(s + (r0 + r) * kKeys + c * kLanes, &a[r], sizeof(Vec));
      }
      // Running maximum and sum; the accumulated outputs rescaled to the new maximum.
      for (int r = 0; r < rows; ++r) {
        const int64_t i = r0 + r;
        float *sr = s + i * kKeys;
        const int64_t seen = std::max<int64_t>(0, std::min<int64_t>(nk, last[i] + 1 - k0));
        if (seen == 0) {
          std::fill(sr, sr + nk, 0.f);
          continue;
        }
        float mx = m[i];
        for (int64_t j = 0; j < seen; ++j) mx = std::max(mx, sr[j]);
        float part = 0.f;
        for (int64_t j = 0; j < seen; ++j) {
          sr[j] = expf(sr[j] - mx);
          part += sr[j];
        }
        for (int64_t j = seen; j < nk; ++j) sr[j] = 0.f;
        const float alpha = expf(m[i] - mx);
        sum[i] = sum[i] * alpha + part;
        m[i] = mx;
        float *ar = acc + i * d;
        for (int64_t e = 0; e < d; ++e) ar[e] *= alpha;
      }
      // The probabilities times the values, into the rows' accumulators.
      if (D > 0 && rows == kRows) {
        // A vector of output columns at a time, its kRows accumulators in registers over the whole tile.
        for (int64_t c = 0; c < d; c += kLanes) {
          Vec a[kRows];
          for (int r = 0; r < kRows; ++r) std::memcpy(&a[r], acc + (r0 + r) * d + c, sizeof(Vec));
          const float *pr = s + r0 * kKeys;
          for (int64_t j = 0; j < nk; ++j) {
            Vec vv;
            std::memcpy(&vv, vg + (k0 + j) * d + c, sizeof(Vec));
            for (int r = 0; r < kRows; ++r) a[r] += pr[r * kKeys + j] * vv;
          }
          for (int r = 0; r < kRows; ++r) std::memcpy(acc + (r0 + r) * d + c, &a[r], sizeof(Vec));
        }
      } else {
        for (int64_t j = 0; j < nk; ++j) {
          const float *vj = vg + (k0 + j) * d;
          for (int r = 0; r < rows; ++r) {
            const float pr = s[(r0 + r) * kKeys + j];
            float *ar = acc + (r0 + r) * d;
            for (int64_t e = 0; e < d; ++e) ar[e] += pr * vj[e];
          }
        }
      }
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    float *out = p.o + (g * p.qs + q0 + r) * d;
    const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;
    for (int64_t e = 0; e < d; ++e) out[e] = acc[r * d + e] * inv;
  }
}

void Task(const Problem &p, int64_t g, int64_t q0, int64_t nq, std::vector<float> &scratch) {
  switch (p.d) {
    case 16: return RunTask<16>(p, g, q0, nq, scratch);
    case 32: return RunTask<32>(p, g, q0, nq, scratch);
    case 64: return RunTask<64>(p, g, q0, nq, scratch);
    case 48: return RunTask<48>(p, g, q0, nq, scratch);
    case 80: return RunTask<80>(p, g, q0, nq, scratch);
    case 96: return RunTask<96>(p, g, q0, nq, scratch);
    case 128: return RunTask<128>(p, g, q0, nq, scratch);
    default: return RunTask<0>(p, g, q0, nq, scratch);
  }
}

// The keys transposed tile by tile, as RunTask reads them.
std::vector<float> KeyTiles(Problem &p) {
  p.tiles = (p.l + kKeys - 1) / kKeys;
  std::vector<float> kt(p.gk * p.tiles * p.d * kKeys, 0.f);
  for (int64_t g = 0; g < p.gk; ++g)
    for (int64_t j = 0; j < p.l; ++j)
      for (int64_t e = 0; e < p.d; ++e)
        kt[((g * p.tiles + j / kKeys) * p.d + e) * kKeys + j % kKeys] = p.k[(g * p.ks + j) * p.d + e];
  return kt;
}

// Runs fn(t, scratch) for every task t < tasks on up to `threads` threads (this one included), each thread with
// a scratch buffer of its own.
template <typename F>
void ForTasks(int64_t tasks, int threads, F fn) {
  std::atomic<int64_t> next(0);
  auto worker = [&]() {
    std::vector<float> scratch;
    for (int64_t t = next++; t < tasks; t = next++) fn(t, scratch);
  };
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) {
    try {
      pool.emplace_back(worker);
    } catch (const std::system_error &) {
      break;  // no more threads to be had: the ones running (this one included) take every task
    }
  }
  worker();
  for (auto &t : pool) t.join();
}

// Work in multiply-adds; below about a million a second thread costs more than it saves.
int ThreadsFor(double work, int64_t tasks) {
  return static_cast<int>(std::min<int64_t>(work < 1e6 ? 1 : mindone::Threads(), tasks));
}

void Run(Problem p) {
  std::vector<float> kt = KeyTiles(p);
  p.kt = kt.data();
  const int64_t per_group = (p.lq + kTaskRows - 1) / kTaskRows;
  const int64_t tasks = p.gq * per_group;
  const double work = static_cast<double>(p.gq) * p.lq * p.l * p.d;
  ForTasks(tasks, ThreadsFor(work, tasks), [&](int64_t t, std::vector<float> &scratch) {
    // Causal rows near the end see the most keys: hand out the last query blocks first.
    const int64_t g = t % p.gq, b = per_group - 1 - t / p.gq;
    const int64_t q0 = b * kTaskRows;
    Task(p, g, q0, std::min<int64_t>(kTaskRows, p.lq - q0), scratch);
  });
}

bool Read(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool causal, Problem *p) {
  const int want = causal ? 5 : 4;
  if (nparam != want || ndims[0] < 3 || ndims[1] != ndims[0] || ndims[2] != ndims[0]) return false;
  for (int i = 0; i < 3; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  const int nd = ndims[0];
  int64_t gq = 1, gk = 1;
  for (int i = 0; i < nd - 2; ++i) {
    gq *= shapes[0][i];
    gk *= shapes[1][i];
  }
  p->q = static_cast<const float *>(params[0]);
  p->k = static_cast<const float *>(params[1]);
  p->v = static_cast<const float *>(params[2]);
  p->pos = causal ? static_cast<const int32_t *>(params[3]) : nullptr;
  p->o = static_cast<float *>(params[want - 1]);
  p->gq = gq;
  p->gk = gk;
  p->lq = p->qs = shapes[0][nd - 2];
  p->l = p->ks = shapes[1][nd - 2];
  p->d = shapes[0][nd - 1];
  if (gk == 0 || gq % gk || shapes[1][nd - 1] != p->d || shapes[2][nd - 2] != p->l) return false;
  if (causal && (ndims[3] != 1 || shapes[3][0] != p->lq)) return false;
  return true;
}

}  // namespace

int mindone::Threads() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

namespace {

// qs, ks: rows from one group's queries (outputs) to the next's, and from its keys (values) to the next's.
Problem Make(const float *q, const float *k, const float *v, const int32_t *pos, float *o, int64_t gq, int64_t gk,
             int64_t lq, int64_t l, int64_t d, int64_t qs, int64_t ks) {
  Problem p;
  p.q = q;
  p.k = k;
  p.v = v;
  p.pos = pos;
  p.o = o;
  p.gq = gq;
  p.gk = gk;
  p.lq = lq;
  p.l = l;
  p.d = d;
  p.qs = qs;
  p.ks = ks;
  return p;
}

}  // namespace

void mindone::CausalAttend(const float *q, const float *k, const float *v, const int32_t *pos, float *o,
                           int64_t gq, int64_t gk, int64_t lq, int64_t l, int64_t d) {
  Run(Make(q, k, v, pos, o, gq, gk, lq, l, d, lq, l));
}

void mindone::SegmentAttend(const float *q, const float *k, const float *v, float *o, int64_t gq, int64_t gk,
                            int64_t n, int64_t d, const int32_t *bounds, int64_t segments) {
  std::vector<Problem> parts;
  std::vector<std::vector<float>> tiles;
  std::vector<int64_t> first;  // index of each segment's first task
  int64_t tasks = 0;
  double work = 0.0;
  for (int64_t s = 0; s < segments; ++s) {
    const int64_t a = bounds[s], len = bounds[s + 1] - bounds[s];
    if (len <= 0) continue;
    Problem p = Make(q + a * d, k + a * d, v + a * d, nullptr, o + a * d, gq, gk, len, len, d, n, n);
    tiles.push_back(KeyTiles(p));
    p.kt = tiles.back().data();
    parts.push_back(p);
    first.push_back(tasks);
    tasks += gq * ((len + kTaskRows - 1) / kTaskRows);
    work += static_cast<double>(gq) * len * len * d;
  }
  ForTasks(tasks, ThreadsFor(work, tasks), [&](int64_t t, std::vector<float> &scratch) {
    const int64_t s = std::upper_bound(first.begin(), first.end(), t) - first.begin() - 1;
    const Problem &p = parts[s];
    const int64_t local = t - first[s], g = local % p.gq, q0 = local / p.gq * kTaskRows;
    Task(p, g, q0, std::min<int64_t>(kTaskRows, p.lq - q0), scratch);
  });
}

class AotExtra;

namespace {

int Attend(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool causal) {
  Problem p;
  if (!Read(nparam, params, ndims, shapes, dtypes, causal, &p)) return 1;
  return mindone::Guarded([&] {
    Run(p);
    return 0;
  });
}

}  // namespace

extern "C" int FrameAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                              void *stream, void *extra) {
  return Attend(nparam, params, ndims, shapes, dtypes, false);
}

extern "C" int CausalAttention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  return Attend(nparam, params, ndims, shapes, dtypes, true);
}

// The output has the queries' shape (MindSpore calls these when a graph's shapes are dynamic).
extern "C" std::vector<int64_t> FrameAttentionInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}

extern "C" std::vector<int64_t> CausalAttentionInferShape(int *ndims, int64_t **shapes, AotExtra *) {
  return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
