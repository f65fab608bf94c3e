// The AVX2 path's backward for one (batch, head) pair (SPEC §4).
#include <immintrin.h>

#include "../kernels.h"
#include "gemm.h"
#include "softmax_fusion.h"
#include "workspace.h"

namespace bspf::cpu::avx2 {
namespace {

// D (n×n, row stride ld, n a multiple of 8) becomes scale · (D + Dᵀ), in place: each pair of
// mirrored 8×8 tiles is read once and written once (a transposed copy and a pass adding it
// read and wrote the square three times).
void symmetrize(float* d, int64_t ld, int64_t n, float scale) {
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t a = 0; a < n; a += 8)
    for (int64_t b = a; b < n; b += 8) {
      float* upper = d + a * ld + b;
      float* lower = d + b * ld + a;
      __m256 s[8];
      for (int i = 0; i < 8; ++i) s[i] = _mm256_loadu_ps(lower + i * ld);
      transpose8_in_registers(s);
      for (int i = 0; i < 8; ++i) {
        s[i] = _mm256_mul_ps(vscale, _mm256_add_ps(_mm256_loadu_ps(upper + i * ld), s[i]));
        _mm256_storeu_ps(upper + i * ld, s[i]);
      }
      transpose8_in_registers(s);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(lower + i * ld, s[i]);
    }
}

}  // namespace

Outcome backward_pair(const BackwardParams& bp, const Products& products, int64_t pair, Workspace* workspace) {
  Workspace& ws = *workspace;
  const Geometry g(bp.p);
  const int64_t N = g.n, ld = g.ld, C = g.chunks;
  if (!reserve_forward(g, ws) || !ws.vt.reserve(g.dvp * ld) || !ws.g.reserve(ld * g.dvp) ||
      !ws.dx.reserve(ld * g.dp) || !ws.bitmap.reserve(ld * bitmap_words(g)) ||
      !ws.lists.reserve((ld / 2 + 1) * (ld + kLanes)) || !ws.dv.reserve(ld * g.dvp) || !ws.weights.reserve(g.square()) || !ws.grad.reserve(g.square()) ||
      !ws.work.reserve(g.square()) || !ws.column.reserve(ld))
    return Outcome::kNoMemory;
  const uint64_t* words = bp.saved.mask_words + pair * N * C;
  const int32_t* match = bp.saved.match + pair * N;
  const float* rho = static_cast<const float*>(bp.saved.rho) + pair * N;
  const float* lse = static_cast<const float*>(bp.saved.lse) + pair * N;
  const float* log_row_sum = static_cast<const float*>(bp.saved.log_row_sum) + pair * N;
  for (int64_t i = 0; i < N; ++i)
    if (!(log_row_sum[i] >= kSmallestLogRowSum)) return Outcome::kNeedsPortable;
  float* grad_qk = static_cast<float*>(bp.grad_qk) + pair * N * g.d;
  float* grad_v = static_cast<float*>(bp.grad_v) + pair * N * g.dv;
  const float scale = static_cast<float>(bp.p.scale);
  const int64_t heads = bp.p.heads;

  float* probs = ws.logits.data;
  float* weights = ws.weights.data;  // R (A = R / Z is never formed: 1 / Z scales G's rows instead)
  float* grad = ws.grad.data;        // G Vᵀ, then dR, dP, dL, S
  float* work = ws.work.data;        // Rᵀ

  load_logits(g, products, static_cast<const float*>(bp.qk), bp.qk_stride, pair, heads, scale, Mirror::kAll, ws);
  gather(static_cast<const float*>(bp.v), bp.v_stride, pair, heads, N, g.dv, 0, ld, g.dvp, ws.v.data);
  gather(static_cast<const float*>(bp.grad_out), bp.grad_out_stride, pair, heads, N, g.dv, 0, ld, g.dvp, ws.g.data);
  transpose(ws.v.data, g.dvp, ld, g.dvp, ws.vt.data, ld);

  products.probs_rows(probs, ld, N, lse);

  // R rebuilt from P and the saved choices (the forward's own code); A = R / Z. Each row's
  // bitmap lands at its own place, for dR and dV below.
  uint64_t* bitmaps = ws.bitmap.data;
  for (int64_t m = 0; m < C; ++m)
    chunk_weights(g, products, m, probs, words, match, rho, bp.p.fuse, bitmaps + g.begin(m) * bitmap_words(g),
                  weights + g.begin(m) * ld);
  std::memset(weights + N * ld, 0, sizeof(float) * (ld - N) * ld);
  float* inv_row_sum = ws.column.data;  // 1 / Z_i (the column is free until dρ below)
  for (int64_t i = 0; i < N; ++i) inv_row_sum[i] = __builtin_expf(-log_row_sum[i]);

  // dA = G Vᵀ (dense: only kept entries are used), then
  // dR(i, j) = M(i, j) · (dA(i, j) − Σ_k A(i, k) dA(i, k)) / Z_i, with Σ_k A(i, k) dA(i, k)
  // = Σ_k R(i, k) dA(i, k) / Z_i.
  products.gemm(ws.g.data, g.dvp, ws.vt.data, ld, g.dv, grad, ld, ld, ld, 1.0f, /*upper=*/false);
  for (int64_t i = 0; i < N; ++i) {
    const float* r = weights + i * ld;
    float* dr = grad + i * ld;
    const __m256 inv = _mm256_set1_ps(inv_row_sum[i]), a_dot_da = _mm256_set1_ps(dot(r, dr, ld) * inv_row_sum[i]);
    const uint64_t* bitmap = bitmaps + i * bitmap_words(g);
    for (int64_t j = 0; j < ld; j += kLanes) {
      const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(dr + j), a_dot_da), inv);
      _mm256_storeu_ps(dr + j, _mm256_and_ps(expand_bits(bitmap_byte(bitmap, j)), v));
    }
  }
  std::memset(grad + N * ld, 0, sizeof(float) * (ld - N) * ld);

  // dV_j = Σ_i A(i, j) G_i = Σ_i R(i, j) (G_i / Z_i) over kept (i, j): scaling G's rows
  // costs an N × Dv pass where forming A cost an N × N one. M is symmetric, so row j's kept
  // columns are exactly the i with (i, j) kept, and Rᵀ makes the coefficients contiguous.
  // Rows of a whole number of vectors go straight to grad_v, as the forward's output does.
  for (int64_t i = 0; i < N; ++i) {
    const __m256 inv = _mm256_set1_ps(inv_row_sum[i]);
    float* gi = ws.g.data + i * g.dvp;
    for (int64_t k = 0; k < g.dvp; k += kLanes) _mm256_storeu_ps(gi + k, _mm256_mul_ps(inv, _mm256_loadu_ps(gi + k)));
  }
  transpose(weights, ld, ld, ld, work, ld);
  const bool dv_in_place = g.dv == g.dvp;
  products.sparse_rows(work, ld, ws.bitmap.data, bitmap_words(g), ld, ws.g.data, g.dvp, g.dvp, nullptr, N,
                       ws.lists.data, dv_in_place ? grad_v : ws.dv.data, dv_in_place ? g.dv : g.dvp);
  if (!dv_in_place) copy_rows(ws.dv.data, g.dvp, N, g.dv, grad_v, g.dv);

  // dP = M ⊙ dR plus, on pruned (i, j), ρ_i · H · dR(b(i), j); and dρ_i (SPEC §4).
  // In place: the writes go to pruned entries, the reads to kept ones.
  float* grad_rho = ws.column.data;
  const ChunkGrid grid = g.grid();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t q = match[i];
    grad_rho[i] = bp.p.fuse && q != i && rho[i] > 0.0f
                      ? products.fused_grad_row(grid, words + i * C, words + q * C, rho[i], probs + i * ld,
                                                grad + q * ld, grad + i * ld)
                      : 0.0f;
  }

  // dL = P ⊙ (dP − Σ_k P(i, k) dP(i, k)).
  for (int64_t i = 0; i < N; ++i) {
    const float* p = probs + i * ld;
    float* dl = grad + i * ld;
    const __m256 vs = _mm256_set1_ps(dot(p, dl, ld));
    for (int64_t j = 0; j < ld; j += kLanes)
      _mm256_storeu_ps(dl + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(dl + j), vs)));
  }

  // dX = S X with S = scale · (dL + dLᵀ).
  symmetrize(grad, ld, ld, scale);
  // Rows of a whole number of vectors go straight to grad_qk: the GEMM's 4-row tiles but
  // the last, ragged one, which goes through the scratch.
  const bool dx_in_place = g.d == g.dp;
  float* dx = dx_in_place ? grad_qk : ws.dx.data;
  const int64_t ldx = g.dp, whole = dx_in_place ? N & ~int64_t{3} : ld;
  products.gemm(grad, ld, ws.x.data, g.dp, N, dx, ldx, whole, g.dp, 1.0f, /*upper=*/false);
  if (whole < N) {
    products.gemm(grad + whole * ld, ld, ws.x.data, g.dp, N, ws.dx.data, g.dp, 4, g.dp, 1.0f, /*upper=*/false);
    copy_rows(ws.dx.data, g.dp, N - whole, g.d, dx + whole * ldx, ldx);
  }

  // The cosine behind ρ_i = max(cos(x_i, x_b(i)), 0) (SPEC §4, last line).
  const float* x = ws.x.data;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t q = match[i];
    if (q == i || !(rho[i] > 0.0f) || grad_rho[i] == 0.0f) continue;
    const float* xi = x + i * g.dp;
    const float* xq = x + q * g.dp;
    const float nx = __builtin_sqrtf(dot(xi, xi, g.dp)), nq = __builtin_sqrtf(dot(xq, xq, g.dp));
    const float prod = nx * nq, gr = grad_rho[i];
    float* gi = dx + i * ldx;
    float* gq = dx + q * ldx;
    if (prod >= kCosEps) {
      const float cos = dot(xi, xq, g.dp) / prod;
      const __m256 a = _mm256_set1_ps(gr / prod), bi = _mm256_set1_ps(gr * cos / (nx * nx)),
                   bq = _mm256_set1_ps(gr * cos / (nq * nq));
      for (int64_t k = 0; k < g.dp; k += kLanes) {
        const __m256 vi = _mm256_loadu_ps(xi + k), vq = _mm256_loadu_ps(xq + k);
        _mm256_storeu_ps(gi + k, _mm256_fnmadd_ps(bi, vi, _mm256_fmadd_ps(a, vq, _mm256_loadu_ps(gi + k))));
        _mm256_storeu_ps(gq + k, _mm256_fnmadd_ps(bq, vq, _mm256_fmadd_ps(a, vi, _mm256_loadu_ps(gq + k))));
      }
    } else {
      const __m256 a = _mm256_set1_ps(gr / kCosEps);
      for (int64_t k = 0; k < g.dp; k += kLanes) {
        _mm256_storeu_ps(gi + k, _mm256_fmadd_ps(a, _mm256_loadu_ps(xq + k), _mm256_loadu_ps(gi + k)));
        _mm256_storeu_ps(gq + k, _mm256_fmadd_ps(a, _mm256_loadu_ps(xi + k), _mm256_loadu_ps(gq + k)));
      }
    }
  }
  if (!dx_in_place) copy_rows(dx, g.dp, N, g.d, grad_qk, g.d);
  return Outcome::kDone;
}

}  // namespace bspf::cpu::avx2
