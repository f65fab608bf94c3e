// The AVX2 path's backward for one (batch, head) pair (SPEC §4).
#include <immintrin.h>

#include "../kernels.h"
#include "gemm.h"
#include "softmax_fusion.h"
#include "workspace.h"

namespace bspf::cpu::avx2 {
namespace {

// Band a of D (n×n, row stride ld, n and a multiples of 8) becomes scale · (D + Dᵀ) in
// place: its tiles (a, b) for b ≥ a and their mirrors (b, a). Each pair of mirrored 8×8
// tiles is read once and written once (a transposed copy and a pass adding it read and
// wrote the square three times); the bands together take every pair once.
void symmetrize_band(float* d, int64_t ld, int64_t n, float scale, int64_t a) {
  const __m256 vscale = _mm256_set1_ps(scale);
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

bool reserve_backward(const Geometry& g, Workspace& ws) {
  return reserve_forward(g, ws) && ws.vt.reserve(g.dvp * g.ld) && ws.g.reserve(g.ld * g.dvp) &&
         ws.dx.reserve(g.ld * g.dp) && ws.bitmap.reserve(g.ld * bitmap_words(g)) && ws.dv.reserve(g.ld * g.dvp) &&
         ws.weights.reserve(g.square()) && ws.grad.reserve(g.square()) && ws.work.reserve(g.square()) &&
         ws.column.reserve(g.ld);
}

}  // namespace

bool reserve_workspace(const BackwardParams& params, Workspace* workspace, Holding holding) {
  const Geometry g(params.p);
  // A worker's own scratch: sparse_rows' lists for one chunk of rows (Ω ≤ 64).
  return holding == Holding::kOwnScratch ? workspace->lists.reserve(32 * (g.ld + kLanes))
                                         : reserve_backward(g, *workspace);
}

Outcome backward_pair(const BackwardParams& bp, const Products& products, int64_t pair, Workspace* shared,
                      Workspace* own, const Team& team) {
  Workspace& sh = *shared;  // the pair's buffers
  Workspace& ws = *own;     // this worker's scratch (the lists of sparse_rows)
  const Geometry g(bp.p);
  const int64_t N = g.n, ld = g.ld, C = g.chunks, bw = bitmap_words(g);
  if (team.workers == 1 && !reserve_backward(g, ws)) return Outcome::kNoMemory;
  const uint64_t* words = bp.saved.mask_words + pair * N * C;
  const int32_t* match = bp.saved.match + pair * N;
  const float* rho = static_cast<const float*>(bp.saved.rho) + pair * N;
  const float* lse = static_cast<const float*>(bp.saved.lse) + pair * N;
  const float* log_row_sum = static_cast<const float*>(bp.saved.log_row_sum) + pair * N;
  // Every worker of a team finds the same here, before any meeting.
  for (int64_t i = 0; i < N; ++i)
    if (!(log_row_sum[i] >= kSmallestLogRowSum)) return Outcome::kNeedsPortable;
  float* grad_qk = static_cast<float*>(bp.grad_qk) + pair * N * g.d;
  float* grad_v = static_cast<float*>(bp.grad_v) + pair * N * g.dv;
  const float scale = static_cast<float>(bp.p.scale);
  const int64_t heads = bp.p.heads;

  float* probs = sh.logits.data;
  float* weights = sh.weights.data;  // R (A = R / Z is never formed: 1 / Z scales G's rows instead)
  float* grad = sh.grad.data;        // G Vᵀ, then dR, dP, dL, S
  float* work = sh.work.data;        // Rᵀ
  uint64_t* bitmaps = sh.bitmap.data;  // row i's kept columns at bitmaps + i · bw
  float* column = sh.column.data;      // row i's 1 / Z_i, then its dρ_i

  // A team shares the pair out by chunks of rows (for_my_bands, for_my_chunks: workspace.h),
  // and a step that reads what others wrote in the one before starts after they meet. Alone
  // or not, every entry is computed the same way, so the results are the same bits.
  for_my_bands(g, team, 0, [&](int64_t i0) {
    gather_x_band(g, static_cast<const float*>(bp.qk), bp.qk_stride, pair, heads, i0, sh.x.data);
    gather(static_cast<const float*>(bp.v), bp.v_stride, pair, heads, N, g.dv, i0, i0 + 8, g.dvp, sh.v.data);
    gather(static_cast<const float*>(bp.grad_out), bp.grad_out_stride, pair, heads, N, g.dv, i0, i0 + 8, g.dvp,
           sh.g.data);
  });
  for_my_bands(g, team, 0, [&](int64_t i0) {
    transpose_x_band(g, i0, sh.x.data, sh.xt.data);
    transpose(sh.v.data + i0 * g.dvp, g.dvp, 8, g.dvp, sh.vt.data + i0, ld);
  });
  meet(team);
  // L's upper tiles, and dA = G Vᵀ (dense: only kept entries are used).
  for_my_bands(g, team, 0, [&](int64_t i0) {
    logits_band(g, products, sh.x.data, sh.xt.data, scale, i0, probs);
    products.gemm(sh.g.data + i0 * g.dvp, g.dvp, sh.vt.data, ld, g.dv, grad + i0 * ld, ld, 8, ld, 1.0f,
                  /*upper=*/false);
  });
  meet(team);
  for_my_bands(g, team, 8, [&](int64_t i0) { mirror_band(g, Mirror::kAll, i0, probs); });
  meet(team);  // P takes L's place

  // One chunk of rows at a time, from P to dL (b(i) is in i's chunk, so what a row reads of
  // another row was written by the same worker):
  const ChunkGrid grid = g.grid();
  for_my_chunks(g, team, [&](int64_t m) {
    const int64_t r0 = g.begin(m), r1 = r0 + g.size(m);
    const bool last = m == C - 1;  // its worker also takes the padding rows [N, ld)
    products.probs_rows(probs, ld, N, lse, r0, last ? ld : r1);

    // R rebuilt from P and the saved choices (the forward's own code), each row's bitmap at
    // its own place, for dR and dV.
    chunk_weights(g, products, m, probs, words, match, rho, bp.p.fuse, bitmaps + r0 * bw, weights + r0 * ld);
    if (last) std::memset(weights + N * ld, 0, sizeof(float) * (ld - N) * ld);
    for (int64_t i = r0; i < r1; ++i) column[i] = __builtin_expf(-log_row_sum[i]);

    // dR(i, j) = M(i, j) · (dA(i, j) − Σ_k A(i, k) dA(i, k)) / Z_i, with Σ_k A(i, k) dA(i, k)
    // = Σ_k R(i, k) dA(i, k) / Z_i.
    for (int64_t i = r0; i < r1; ++i) {
      const float* r = weights + i * ld;
      float* dr = grad + i * ld;
      const __m256 inv = _mm256_set1_ps(column[i]), a_dot_da = _mm256_set1_ps(dot(r, dr, ld) * column[i]);
      const uint64_t* bitmap = bitmaps + i * bw;
      for (int64_t j = 0; j < ld; j += kLanes) {
        const __m256 v = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(dr + j), a_dot_da), inv);
        _mm256_storeu_ps(dr + j, _mm256_and_ps(expand_bits(bitmap_byte(bitmap, j)), v));
      }
    }
    if (last) std::memset(grad + N * ld, 0, sizeof(float) * (ld - N) * ld);

    // dV_j = Σ_i A(i, j) G_i = Σ_i R(i, j) (G_i / Z_i) over kept (i, j) (below): scaling G's
    // rows costs an N × Dv pass where forming A cost an N × N one.
    for (int64_t i = r0; i < r1; ++i) {
      const __m256 inv = _mm256_set1_ps(column[i]);
      float* gi = sh.g.data + i * g.dvp;
      for (int64_t k = 0; k < g.dvp; k += kLanes) _mm256_storeu_ps(gi + k, _mm256_mul_ps(inv, _mm256_loadu_ps(gi + k)));
    }

    // dP = M ⊙ dR plus, on pruned (i, j), ρ_i · H · dR(b(i), j); and dρ_i (SPEC §4).
    // In place: the writes go to pruned entries, the reads to kept ones.
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t q = match[i];
      column[i] = bp.p.fuse && q != i && rho[i] > 0.0f
                      ? products.fused_grad_row(grid, words + i * C, words + q * C, rho[i], probs + i * ld,
                                                grad + q * ld, grad + i * ld)
                      : 0.0f;
    }

    // dL = P ⊙ (dP − Σ_k P(i, k) dP(i, k)).
    for (int64_t i = r0; i < r1; ++i) {
      const float* p = probs + i * ld;
      float* dl = grad + i * ld;
      const __m256 vs = _mm256_set1_ps(dot(p, dl, ld));
      for (int64_t j = 0; j < ld; j += kLanes)
        _mm256_storeu_ps(dl + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(dl + j), vs)));
    }
  });
  meet(team);

  // Rᵀ, which makes dV's coefficients contiguous (M is symmetric, so row j's kept columns
  // are exactly the i with (i, j) kept), and S = scale · (dL + dLᵀ).
  for_my_bands(g, team, 0, [&](int64_t i0) {
    transpose(weights + i0 * ld, ld, 8, ld, work + i0, ld);
    symmetrize_band(grad, ld, ld, scale, i0);
  });
  meet(team);

  // dV, and dX = S X. Rows of a whole number of vectors go straight to grad_v and grad_qk,
  // as the forward's output does; of dX, the GEMM's 4-row tiles but the last, ragged one,
  // which goes through the scratch.
  const bool dv_in_place = g.dv == g.dvp;
  for_my_chunks(g, team, [&](int64_t m) {
    const int64_t r0 = g.begin(m), rows = g.size(m);
    float* dv = dv_in_place ? grad_v + r0 * g.dv : sh.dv.data + r0 * g.dvp;
    products.sparse_rows(work + r0 * ld, ld, bitmaps + r0 * bw, bw, ld, sh.g.data, g.dvp, g.dvp, nullptr, rows,
                         ws.lists.data, dv, dv_in_place ? g.dv : g.dvp);
    if (!dv_in_place) copy_rows(dv, g.dvp, rows, g.dv, grad_v + r0 * g.dv, g.dv);
  });
  const bool dx_in_place = g.d == g.dp;
  float* dx = dx_in_place ? grad_qk : sh.dx.data;
  const int64_t ldx = g.dp, whole = dx_in_place ? N & ~int64_t{3} : ld;
  for_my_bands(g, team, 0, [&](int64_t i0) {
    const int64_t end = i0 + 8 < whole ? i0 + 8 : whole;
    if (end > i0)
      products.gemm(grad + i0 * ld, ld, sh.x.data, g.dp, N, dx + i0 * ldx, ldx, end - i0, g.dp, 1.0f,
                    /*upper=*/false);
    if (whole < N && i0 <= whole && whole < i0 + 8) {
      products.gemm(grad + whole * ld, ld, sh.x.data, g.dp, N, sh.dx.data, g.dp, 4, g.dp, 1.0f, /*upper=*/false);
      copy_rows(sh.dx.data, g.dp, N - whole, g.d, dx + whole * ldx, ldx);
    }
  });
  meet(team);

  // The cosine behind ρ_i = max(cos(x_i, x_b(i)), 0) (SPEC §4, last line), by chunk: it
  // adds to dX's rows i and b(i).
  const float* x = sh.x.data;
  for_my_chunks(g, team, [&](int64_t m) {
    const int64_t r0 = g.begin(m), r1 = r0 + g.size(m);
    for (int64_t i = r0; i < r1; ++i) {
      const int64_t q = match[i];
      const float gr = column[i];
      if (q == i || !(rho[i] > 0.0f) || gr == 0.0f) continue;
      const float* xi = x + i * g.dp;
      const float* xq = x + q * g.dp;
      const float nx = __builtin_sqrtf(dot(xi, xi, g.dp)), nq = __builtin_sqrtf(dot(xq, xq, g.dp));
      const float prod = nx * nq;
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
    if (!dx_in_place) copy_rows(dx + r0 * ldx, g.dp, r1 - r0, g.d, grad_qk + r0 * g.d, g.d);
  });
  return Outcome::kDone;
}

}  // namespace bspf::cpu::avx2
