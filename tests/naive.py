"""SPEC §3 transcribed literally, one entry at a time, for tiny inputs: a check on the
vectorised reference itself (it is the oracle for everything else)."""

from __future__ import annotations

import math

import torch


def naive_bspf(x, v, w, block_size, keep_ratio, fuse=True, scale=None, exact=False):
    """x (N, D), v (N, Dv), w (3, 3), all float64. Returns (out, mask, match).

    exact: P, R and A in 50-digit arithmetic (mpmath), where no probability underflows:
    SPEC §3 at extreme logits, for SPEC §6's "evaluated in log space"."""
    if exact:
        import mpmath

        with mpmath.workdps(50):
            return _naive(x, v, w, block_size, keep_ratio, fuse, scale, lambda t: mpmath.exp(mpmath.mpf(t)))
    return _naive(x, v, w, block_size, keep_ratio, fuse, scale, math.exp)


def _naive(x, v, w, block_size, keep_ratio, fuse, scale, exp):
    n, d = x.shape
    scale = d**-0.5 if scale is None else scale
    L = [[scale * float(x[i] @ x[j]) for j in range(n)] for i in range(n)]
    chunks = [list(range(s, min(s + block_size, n))) for s in range(0, n, block_size)]
    chunk_of = [i // block_size for i in range(n)]

    M = [[False] * n for _ in range(n)]
    for m, rows in enumerate(chunks):
        for i in rows:
            for j in rows:
                M[i][j] = True
        for c in range(m + 1, len(chunks)):
            cols = chunks[c]
            entries = []
            for a, i in enumerate(rows):
                for b, j in enumerate(cols):
                    s = 0.0
                    for da in (-1, 0, 1):
                        for db in (-1, 0, 1):
                            if 0 <= a + da < len(rows) and 0 <= b + db < len(cols):
                                s += float(w[da + 1, db + 1]) * L[rows[a + da]][cols[b + db]]
                    entries.append((-s, a * len(cols) + b, i, j))
            k = math.ceil(keep_ratio * len(rows) * len(cols) - 1e-9)
            for _, _, i, j in sorted(entries)[:k]:
                M[i][j] = M[j][i] = True

    P = []
    for i in range(n):
        mx = max(L[i])
        e = [exp(l - mx) for l in L[i]]
        P.append([t / sum(e) for t in e])

    match, rho = list(range(n)), [0.0] * n
    for rows in chunks:
        for i in rows:
            best, best_cos = None, None
            for j in rows:
                if j == i:
                    continue
                c = float(x[i] @ x[j]) / max(float(x[i].norm()) * float(x[j].norm()), 1e-8)
                if best is None or c > best_cos:
                    best, best_cos = j, c
            if best is not None:
                match[i], rho[i] = best, max(best_cos, 0.0)

    R = [[P[i][j] if M[i][j] else 0.0 for j in range(n)] for i in range(n)]
    if fuse:
        for i in range(n):
            p = match[i]
            for j in range(n):
                if M[i][j] or not M[p][j]:
                    continue
                cols = chunks[chunk_of[j]]
                hamming = sum(M[i][t] != M[p][t] for t in cols)
                R[p][j] += rho[i] * (1 - hamming / len(cols)) * P[i][j]
    A = [[float(r / sum(row)) for r in row] for row in R]
    out = torch.tensor(A, dtype=torch.float64) @ v
    return out, torch.tensor(M), torch.tensor(match)
