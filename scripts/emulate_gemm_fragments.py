#!/usr/bin/env python3
"""CPU emulation of the index math of runtime/src/ops/matmul/matmul.cu's tensor-core GEMM.

No GPU is needed: this mirrors, line for line, how `gemm_bf16_tc` stages tiles into shared memory
(XOR swizzles, K-major vs MN-major, zero-filled ragged edges, split-K ranges), which addresses each
lane hands to ldmatrix(.trans), and how mma.m16n8k16.row.col fragments map to matrix elements (per
the PTX ISA), then checks C = A·B exactly (small integers, so no rounding) for all four transpose
combinations, both tile configurations and awkward sizes. It also checks that every ldmatrix phase
is bank-conflict free and that the swizzles are bijections.

Keep it in step with matmul.cu when the kernel changes. Pure Python (no numpy); ~1 minute.
Usage: python3 scripts/emulate_gemm_fragments.py
"""

import random

BK = 32


def kmajor_off(row, chunk):
    return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3)


def mnmajor_off(w, row, chunk):
    return row * w + ((chunk ^ (row & 7)) << 3)


def load_tile(tile, g, ld, mn0, k0, MN, K, rows_mn, nt, kmajor):
    """load_tile_bf16<ROWS_MN, NT, KMAJOR>; returns the set of written offsets."""
    chunks = rows_mn * 32 // 8
    assert chunks % nt == 0
    written = set()
    for id_ in range(chunks):
        if kmajor:
            row, chunk = id_ >> 2, id_ & 3
            i, k = mn0 + row, k0 + chunk * 8
            valid = min(max(K - k, 0), 8) if i < MN else 0
            off = kmajor_off(row, chunk)
            goff = i * ld + k
        else:
            cpr = rows_mn // 8
            row, chunk = id_ // cpr, id_ % cpr
            k, i = k0 + row, mn0 + chunk * 8
            valid = min(max(MN - i, 0), 8) if k < K else 0
            off = mnmajor_off(rows_mn, row, chunk)
            goff = k * ld + i
        assert off % 8 == 0
        for e in range(8):
            assert off + e not in written, "two chunks map to one shared slot"
            written.add(off + e)
            tile[off + e] = g[goff + e] if e < valid else 0
    assert len(written) == rows_mn * 32


def ldmatrix(tile, addrs, trans):
    """ldmatrix.x4(.trans): addrs[l] = row start (element offset) given by lane l."""
    mats = []
    for q in range(4):
        rows = [addrs[8 * q + r] for r in range(8)]
        # bank check: the 8 rows of one matrix are read in one phase; 16-byte units mod 8 distinct
        units = {(a * 2 // 16) % 8 for a in rows}
        assert len(units) == 8, f"bank conflict in ldmatrix phase: {rows}"
        mats.append([[tile[a + c] for c in range(8)] for a in rows])
    regs = []
    for t in range(32):
        g, c = t // 4, t % 4
        if trans:
            regs.append([(m[2 * c][g], m[2 * c + 1][g]) for m in mats])
        else:
            regs.append([(m[g][2 * c], m[g][2 * c + 1]) for m in mats])
    return regs


def mma(acc, a, b0, b1):
    """mma.m16n8k16.row.col: per-lane fragments -> D = A·B + C (per-lane accumulators)."""
    A = [[None] * 16 for _ in range(16)]
    B = [[None] * 8 for _ in range(16)]
    for t in range(32):
        g, c = t // 4, t % 4
        A[g][2 * c], A[g][2 * c + 1] = a[t][0]
        A[g + 8][2 * c], A[g + 8][2 * c + 1] = a[t][1]
        A[g][2 * c + 8], A[g][2 * c + 9] = a[t][2]
        A[g + 8][2 * c + 8], A[g + 8][2 * c + 9] = a[t][3]
        B[2 * c][g], B[2 * c + 1][g] = b0[t]
        B[2 * c + 8][g], B[2 * c + 9][g] = b1[t]
    D = [[sum(A[i][k] * B[k][j] for k in range(16)) for j in range(8)] for i in range(16)]
    for t in range(32):
        g, c = t // 4, t % 4
        acc[t][0] += D[g][2 * c]
        acc[t][1] += D[g][2 * c + 1]
        acc[t][2] += D[g + 8][2 * c]
        acc[t][3] += D[g + 8][2 * c + 1]


def gemm_block(C, A, B, M, N, K, lda, ldb, ldc, alpha, beta, bm, bn, wm, wn, ta, tb, bx, by, bz, gz):
    nt = wm * wn * 32
    wtm, wtn = bm // wm, bn // wn
    mi_n, ni_n = wtm // 16, wtn // 8
    m0, n0 = by * bm, bx * bn
    kt_total = (K + BK - 1) // BK
    per = (kt_total + gz - 1) // gz
    kb = bz * per
    ke = min(kt_total, kb + per)
    # acc[warp][mi][ni][lane][4]
    acc = [[[[[0] * 4 for _ in range(32)] for _ in range(ni_n)] for _ in range(mi_n)] for _ in range(wm * wn)]
    for kt in range(kb, ke):
        k0 = kt * BK
        sA = [None] * (bm * BK)
        sB = [None] * (bn * BK)
        load_tile(sA, A, lda, m0, k0, M, K, bm, nt, not ta)
        load_tile(sB, B, ldb, n0, k0, N, K, bn, nt, tb)
        for warp in range(wm * wn):
            warp_m, warp_n = warp // wn, warp % wn
            for kk in (0, 16):
                af = []
                for mi in range(mi_n):
                    mb = warp_m * wtm + mi * 16
                    addrs = []
                    for lane in range(32):
                        q, r8 = lane >> 3, lane & 7
                        if not ta:
                            addrs.append(kmajor_off(mb + r8 + (q & 1) * 8, (kk >> 3) + (q >> 1)))
                        else:
                            addrs.append(mnmajor_off(bm, kk + r8 + (q >> 1) * 8, (mb >> 3) + (q & 1)))
                    af.append(ldmatrix(sA, addrs, ta))
                bf = [None] * ni_n
                for np_ in range(ni_n // 2):
                    nb = warp_n * wtn + np_ * 16
                    addrs = []
                    for lane in range(32):
                        q, r8 = lane >> 3, lane & 7
                        if tb:
                            addrs.append(kmajor_off(nb + r8 + (q >> 1) * 8, (kk >> 3) + (q & 1)))
                        else:
                            addrs.append(mnmajor_off(bn, kk + r8 + (q & 1) * 8, (nb >> 3) + (q >> 1)))
                    r = ldmatrix(sB, addrs, not tb)
                    bf[2 * np_] = ([r[t][0] for t in range(32)], [r[t][1] for t in range(32)])
                    bf[2 * np_ + 1] = ([r[t][2] for t in range(32)], [r[t][3] for t in range(32)])
                for mi in range(mi_n):
                    for ni in range(ni_n):
                        mma(acc[warp][mi][ni], af[mi], bf[ni][0], bf[ni][1])
    for warp in range(wm * wn):
        warp_m, warp_n = warp // wn, warp % wn
        for mi in range(mi_n):
            for ni in range(ni_n):
                for lane in range(32):
                    col = n0 + warp_n * wtn + ni * 8 + (lane & 3) * 2
                    for h in range(2):
                        row = m0 + warp_m * wtm + mi * 16 + (lane >> 2) + h * 8
                        if row >= M:
                            continue
                        for e in range(2):
                            if col + e >= N:
                                continue
                            v = alpha * acc[warp][mi][ni][lane][2 * h + e]
                            idx = row * ldc + col + e
                            if gz > 1:
                                C[idx] += v
                            else:
                                C[idx] = v + beta * C[idx] if beta != 0 else v


def run_case(M, N, K, ta, tb, cfg, splits, beta, rng):
    bm, bn, wm, wn = cfg
    lda = (M if ta else K) + rng.choice([0, 3, 8])
    ldb = (K if tb else N) + rng.choice([0, 5, 8])
    ldc = N + rng.choice([0, 2])
    # stored operands with padding columns filled with junk that must never be read into the result
    a_rows, a_cols = (K, M) if ta else (M, K)
    b_rows, b_cols = (N, K) if tb else (K, N)
    A = [rng.randint(-4, 4) if (i % lda) < a_cols else 999 for i in range(a_rows * lda)] + [777] * 16
    B = [rng.randint(-4, 4) if (i % ldb) < b_cols else 999 for i in range(b_rows * ldb)] + [777] * 16
    C0 = [rng.randint(-3, 3) for _ in range(M * ldc)]
    C = list(C0)
    if splits > 1:  # the launcher pre-scales C by beta
        C = [beta * c for c in C]

    def a_at(m, k):
        return A[k * lda + m] if ta else A[m * lda + k]

    def b_at(k, n):
        return B[n * ldb + k] if tb else B[k * ldb + n]

    alpha = 2
    for by in range((M + bm - 1) // bm):
        for bx in range((N + bn - 1) // bn):
            for bz in range(splits):
                gemm_block(C, A, B, M, N, K, lda, ldb, ldc, alpha, beta, bm, bn, wm, wn, ta, tb, bx, by, bz, splits)
    for m in range(M):
        for n in range(ldc):
            idx = m * ldc + n
            if n >= N:
                assert C[idx] == (beta * C0[idx] if splits > 1 else C0[idx]), "wrote outside N"
                continue
            want = alpha * sum(a_at(m, k) * b_at(k, n) for k in range(K)) + beta * C0[idx]
            assert C[idx] == want, f"C[{m},{n}] = {C[idx]}, want {want} (ta={ta} tb={tb} cfg={cfg})"


def main():
    rng = random.Random(7)
    cases = [
        # (M, N, K, config (BM, BN, WARPS_M, WARPS_N), splits, beta)
        (64, 64, 32, (64, 64, 2, 2), 1, 0),
        (70, 72, 45, (64, 64, 2, 2), 1, 1),
        (33, 130, 70, (64, 64, 2, 2), 2, 1),
        (128, 128, 48, (128, 128, 2, 4), 1, 0),
        (136, 20, 17, (128, 128, 2, 4), 1, 1),
    ]
    for M, N, K, cfg, splits, beta in cases:
        for ta in (False, True):
            for tb in (False, True):
                run_case(M, N, K, ta, tb, cfg, splits, beta, rng)
                print(f"ok  M={M} N={N} K={K} tile={cfg[0]}x{cfg[1]} ta={int(ta)} tb={int(tb)} "
                      f"splits={splits} beta={beta}")
    print("all GEMM fragment emulations match")


if __name__ == "__main__":
    main()
