// One-thread forwards of the AVX2 path (its products 8 or 16 lanes wide) on `pairs`
// (batch, head) pairs of random normal inputs, each call timed whole and, where the source
// tree has them, by stage (csrc/cpu/avx2/stage_clock.h). Built and run by
// tools/profile_cpu_stages.py, which explains the output.
//
//   cpu_stages N D BLOCK KEEP PAIRS REPS PATH SEED    (PATH: avx2 or avx512)
//
// Prints one line per stage, "<stage> <median ticks per pair>", then "total …" and a
// checksum of the mask words and the output's bits (two builds that should compute the
// same thing must print the same checksum).
#include <x86intrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "cpu/kernels.h"
#if __has_include("cpu/avx2/stage_clock.h")  // a tree from before the stage marks times whole calls only
#include "cpu/avx2/stage_clock.h"
#else
#undef BSPF_STAGE_TIMES
#endif

using namespace bspf;
using namespace bspf::cpu;

namespace {

// A float buffer on 64-byte lines, as torch allocates tensors: the forward reads V in place
// only when its rows start on lines (avx2/forward.cpp), so a vector's 16-byte alignment
// would time a gather the op does not run.
struct Floats {
  float* data;
  size_t size;
  explicit Floats(size_t count)
      : data(static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64))), size(count) {}
  ~Floats() { std::free(data); }
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
  float* begin() { return data; }
  float* end() { return data + size; }
};

double median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values.empty() ? 0.0 : values[values.size() / 2];
}

// avx2::forward_pair of this tree for one thread alone: with a shared and an own workspace
// and a team since 2026-12-07, with one workspace before.
template <typename ForwardPair>
avx2::Outcome forward_alone(ForwardPair* forward_pair, const ForwardParams& fp, const avx2::KeepCounts& keep,
                            const avx2::Products& products, int64_t pair, avx2::Workspace* ws) {
  if constexpr (std::is_invocable_v<ForwardPair*, const ForwardParams&, const avx2::KeepCounts&,
                                    const avx2::Products&, int64_t, avx2::Workspace*>)
    return forward_pair(fp, keep, products, pair, ws);
  else
    return forward_pair(fp, keep, products, pair, ws, ws, {0, 1, nullptr});
}

uint64_t mix(uint64_t hash, const void* data, size_t bytes) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < bytes; ++i) hash = (hash ^ p[i]) * 1099511628211ull;  // FNV-1a
  return hash;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: cpu_stages N D BLOCK KEEP PAIRS REPS avx2|avx512 SEED\n");
    return 2;
  }
  const int64_t n = std::atoll(argv[1]), d = std::atoll(argv[2]), block = std::atoll(argv[3]);
  const double keep_ratio = std::atof(argv[4]);
  const int64_t pairs = std::atoll(argv[5]), reps = std::atoll(argv[6]);
  const bool wide = std::strcmp(argv[7], "avx512") == 0;
  const unsigned seed = static_cast<unsigned>(std::atoll(argv[8]));
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") ||
      (wide && !__builtin_cpu_supports("avx512f"))) {
    std::fprintf(stderr, "this CPU cannot run the %s path\n", argv[7]);
    return 2;
  }
  const avx2::Products& products = wide ? avx512::kProducts : avx2::kProducts;

  Problem p;
  p.batch = pairs;
  p.heads = 1;
  p.seqlen = n;
  p.head_dim = d;
  p.value_dim = d;
  p.block_size = static_cast<int32_t>(block);
  p.scale = 1.0 / std::sqrt(static_cast<double>(d));
  const int64_t chunks = p.num_chunks(), last = n - (chunks - 1) * block;

  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  Floats qk(pairs * n * d), v(pairs * n * d), out(pairs * n * d);
  for (float& x : qk) x = normal(rng);
  for (float& x : v) x = normal(rng);
  std::vector<uint64_t> mask_words(pairs * n * chunks);
  std::vector<int32_t> match(pairs * n);
  std::vector<float> rho(pairs * n), lse(pairs * n), log_row_sum(pairs * n);
  const float box[9] = {1 / 9.f, 1 / 9.f, 1 / 9.f, 1 / 9.f, 1 / 9.f, 1 / 9.f, 1 / 9.f, 1 / 9.f, 1 / 9.f};

  ForwardParams fp;
  fp.p = p;
  fp.keep_ratio = keep_ratio;
  fp.qk = qk.data;
  fp.v = v.data;
  const int64_t stride[4] = {n * d, n * d, d, 1};
  std::memcpy(fp.qk_stride, stride, sizeof stride);
  std::memcpy(fp.v_stride, stride, sizeof stride);
  fp.score_kernel = box;
  fp.out = out.data;
  fp.saved.mask_words = mask_words.data();
  fp.saved.match = match.data();
  fp.saved.rho = rho.data();
  fp.saved.lse = lse.data();
  fp.saved.log_row_sum = log_row_sum.data();
  avx2::KeepCounts keep;
  keep.full = keep_count(keep_ratio, block, block);
  keep.tail = keep_count(keep_ratio, block, last);

  avx2::Workspace* workspace = avx2::create_workspace();
  static const char* const kNames[] = {"start", "logits", "mask", "match", "exps", "rows", "values"};
  constexpr int kNamed = sizeof kNames / sizeof kNames[0];
  std::vector<std::vector<double>> stage(kNamed);
  std::vector<double> total;
  for (int64_t rep = -1; rep < reps; ++rep) {  // rep -1 warms up
#ifdef BSPF_STAGE_TIMES
    std::fill(std::begin(avx2::stage_ticks), std::end(avx2::stage_ticks), 0);
#endif
    uint64_t ticks = 0;
    for (int64_t pair = 0; pair < pairs; ++pair) {
      const uint64_t start = __rdtsc();
      const avx2::Outcome outcome = forward_alone(&avx2::forward_pair, fp, keep, products, pair, workspace);
      ticks += __rdtsc() - start;
      if (outcome != avx2::Outcome::kDone) {
        std::fprintf(stderr, "pair %lld: not computed by the vector path (outcome %d)\n",
                     static_cast<long long>(pair), static_cast<int>(outcome));
        return 1;
      }
    }
    if (rep < 0) continue;
    total.push_back(static_cast<double>(ticks) / pairs);
#ifdef BSPF_STAGE_TIMES
    for (int s = 1; s < kNamed && s < avx2::kStages; ++s)
      stage[s].push_back(static_cast<double>(avx2::stage_ticks[s]) / pairs);
#endif
  }
  avx2::destroy_workspace(workspace);
  for (int s = 1; s < kNamed; ++s)
    if (!stage[s].empty()) std::printf("%s %.0f\n", kNames[s], median(stage[s]));
  std::printf("total %.0f\n", median(total));
  uint64_t hash = 1469598103934665603ull;
  hash = mix(hash, mask_words.data(), mask_words.size() * sizeof(uint64_t));
  hash = mix(hash, out.data, out.size * sizeof(float));
  std::printf("checksum %016llx\n", static_cast<unsigned long long>(hash));
  return 0;
}
