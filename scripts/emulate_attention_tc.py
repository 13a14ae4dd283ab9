#!/usr/bin/env python3
"""CPU emulation of runtime/src/ops/attention/attention_tc.cu (tensor-core FlashAttention-2) at warp level.

Mirrors the kernels' swizzled bf16 tiles, the lane addresses given to ldmatrix(.trans), the
mma.m16n8k16 fragment layouts (emulated as in emulate_gemm_fragments.py), the accumulator ->
A-fragment re-packing of P and dS, the quad reductions of the online softmax, masking, causal tile
skipping and the uniform-row fallback — and compares out, lse, dq, dk, dv with the naive reference
of emulate_attention.py. Values stay float64 (no bf16 rounding), so any index error shows up as a
large mismatch. Also asserts every ldmatrix phase is bank-conflict free.

Keep it in step with attention_tc.cu. Pure Python, ~1-2 minutes.
Usage: python3 scripts/emulate_attention_tc.py
"""

import math
import os
import random
import sys

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from emulate_attention import blocks, bwd_prob, check_all, grid, key_flags  # noqa: E402
from emulate_gemm_fragments import ldmatrix, mma  # noqa: E402

T = 64
NAN = float("nan")


def tc_off(hdm, row, chunk):
    return row * hdm + ((chunk ^ (row & 7)) << 3)


def load_tile(src, b, rows, col0, row0, hd, hdm):
    tile = [0.0] * (T * hdm)
    for r in range(T):
        for ch in range(hdm // 8):
            for e in range(8):
                d = ch * 8 + e
                row = row0 + r
                tile[tc_off(hdm, r, ch) + e] = src[b][row][col0 + d] if row < rows and d < hd else 0.0
    return tile


def frag_a(tile, hdm, row0, kc):
    addrs = [tc_off(hdm, row0 + (l & 7) + ((l >> 3) & 1) * 8, 2 * kc + (l >> 4)) for l in range(32)]
    return ldmatrix(tile, addrs, False)


def frag_b_rows(tile, hdm, n0, kc):
    addrs = [tc_off(hdm, n0 + (l & 7) + (l >> 4) * 8, 2 * kc + ((l >> 3) & 1)) for l in range(32)]
    r = ldmatrix(tile, addrs, False)
    return ([x[0] for x in r], [x[1] for x in r]), ([x[2] for x in r], [x[3] for x in r])


def frag_b_cols(tile, hdm, k0, dp):
    addrs = [tc_off(hdm, k0 + (l & 7) + ((l >> 3) & 1) * 8, 2 * dp + (l >> 4)) for l in range(32)]
    r = ldmatrix(tile, addrs, True)
    return ([x[0] for x in r], [x[1] for x in r]), ([x[2] for x in r], [x[3] for x in r])


def c_to_a(s, kc):
    return [[(s[2 * kc][l][0], s[2 * kc][l][1]), (s[2 * kc][l][2], s[2 * kc][l][3]),
             (s[2 * kc + 1][l][0], s[2 * kc + 1][l][1]), (s[2 * kc + 1][l][2], s[2 * kc + 1][l][3])]
            for l in range(32)]


def accumulate_rows(acc, a, tile, hdm, kc):
    """acc += A·Bᵀ for one k-chunk: `a` a warp's A fragment, B the 64 rows of `tile` (the
    kernel's S = Q·Kᵀ-shaped mma loop over four 16-row pairs)."""
    for np_ in range(4):
        (b0, b1), (b2, b3) = frag_b_rows(tile, hdm, np_ * 16, kc)
        mma(acc[2 * np_], a, b0, b1)
        mma(acc[2 * np_ + 1], a, b2, b3)


def accumulate_cols(acc, a, tile, hdm, kc, ndt):
    """acc += A·B for one 16-key chunk `kc`: B the head-dim columns of `tile` (the kernel's
    O += P·V-shaped mma loop over the ndt/2 column pairs)."""
    for dp in range(ndt // 2):
        (b0, b1), (b2, b3) = frag_b_cols(tile, hdm, kc * 16, dp)
        mma(acc[2 * dp], a, b0, b1)
        mma(acc[2 * dp + 1], a, b2, b3)


def two_warp_products(a1, b1, a2, b2, hdm, warp, nkc):
    """A1·B1ᵀ and A2·B2ᵀ over the head dim for one warp's 16 rows of A (the backward kernels'
    S and dP: Kᵀ-side S = K·Qᵀ and dP = V·dOᵀ for dK/dV, Q·Kᵀ and dO·Vᵀ for dQ)."""
    c1, c2 = zeros(8), zeros(8)
    for kc in range(nkc):
        accumulate_rows(c1, frag_a(a1, hdm, warp * 16, kc), b1, hdm, kc)
        accumulate_rows(c2, frag_a(a2, hdm, warp * 16, kc), b2, hdm, kc)
    return c1, c2


def zeros(n):
    return grid(n, 32, 4)


def quad(vals, op):
    """vals[lane] -> the quad reduction (lanes sharing lane >> 2), as the xor-1, xor-2 shuffles."""
    return [op(op(vals[l], vals[l ^ 1]), op(vals[l ^ 2], vals[l ^ 3])) for l in range(32)]


def store_frags(dst, acc, b, rows, rows_of_lane, col0, hd, ndt, f):
    """tc_store_acc: each lane's C-fragment values of a [16][hdm] accumulator into its rows
    rows_of_lane[l] (those < `rows`), head-dim columns 8·dt + 2·c + e (those < hd), as f(l, hr, value)."""
    for l in range(32):
        c = l & 3
        for hr in range(2):
            row = rows_of_lane[l][hr]
            if row >= rows:
                continue
            for dt in range(ndt):
                for e in range(2):
                    d = dt * 8 + 2 * c + e
                    if d < hd:
                        dst[b][row][col0 + d] = f(l, hr, acc[dt][l][2 * hr + e])


def fwd(q, k, v, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    W, ndt, nkc = H * hd, hdm // 8, hdm // 16
    out, lse = grid(B, Tq, W), grid(B, H, Tq)
    for b, h, col0, q0 in blocks(B, H, hd, Tq):
        Qs = load_tile(q, b, Tq, col0, q0, hd, hdm)
        for warp in range(4):
            rows = [[q0 + warp * 16 + (l >> 2), q0 + warp * 16 + (l >> 2) + 8] for l in range(32)]
            qf = [frag_a(Qs, hdm, warp * 16, kc) for kc in range(nkc)]
            o = zeros(ndt)
            m = [[-math.inf, -math.inf] for _ in range(32)]
            lsum = [[0.0, 0.0] for _ in range(32)]
            kv_end = min(Tk, q0 + T) if causal else Tk
            for k0 in range(0, kv_end, T):
                Ks = load_tile(k, b, Tk, col0, k0, hd, hdm)
                Vs = load_tile(v, b, Tk, col0, k0, hd, hdm)
                kf = key_flags(mask, b, Tk, k0)
                s = zeros(8)
                for kc in range(nkc):
                    accumulate_rows(s, qf[kc], Ks, hdm, kc)
                mx = [[-math.inf, -math.inf] for _ in range(32)]
                for l in range(32):
                    c = l & 3
                    for nt in range(8):
                        for e in range(4):
                            kl = nt * 8 + 2 * c + (e & 1)
                            vis = kf[kl] != 0.0 and (not causal or k0 + kl <= rows[l][e >> 1])
                            s[nt][l][e] = s[nt][l][e] * scale if vis else -math.inf
                            mx[l][e >> 1] = max(mx[l][e >> 1], s[nt][l][e])
                for hr in range(2):
                    red = quad([mx[l][hr] for l in range(32)], max)
                    for l in range(32):
                        m_new = max(m[l][hr], red[l])
                        shift = 0.0 if m_new == -math.inf else m_new
                        alpha = math.exp(m[l][hr] - shift) if m[l][hr] != -math.inf else 0.0
                        m[l][hr] = m_new
                        lsum[l][hr] *= alpha
                        for dt in range(ndt):
                            o[dt][l][2 * hr] *= alpha
                            o[dt][l][2 * hr + 1] *= alpha
                        for nt in range(8):
                            for e in (2 * hr, 2 * hr + 1):
                                x = s[nt][l][e]
                                s[nt][l][e] = math.exp(x - shift) if x != -math.inf else 0.0
                                lsum[l][hr] += s[nt][l][e]
                for kc in range(4):
                    pa = c_to_a(s, kc)
                    accumulate_cols(o, pa, Vs, hdm, kc, ndt)
            for hr in range(2):
                red = quad([lsum[l][hr] for l in range(32)], lambda x, y: x + y)
                for l in range(32):
                    lsum[l][hr] = red[l]
            uniform = [[lsum[l][0] == 0.0, lsum[l][1] == 0.0] for l in range(32)]
            for l in range(32):
                c = l & 3
                if (uniform[l][0] and rows[l][0] < Tq) or (uniform[l][1] and rows[l][1] < Tq):
                    for dt in range(ndt):
                        for e in range(2):
                            d = dt * 8 + 2 * c + e
                            acc = sum(v[b][key][col0 + d] for key in range(Tk)) if d < hd else 0.0
                            if uniform[l][0]:
                                o[dt][l][e] = acc / Tk
                            if uniform[l][1]:
                                o[dt][l][2 + e] = acc / Tk
            inv = [[1.0 if uniform[l][hr] else 1.0 / lsum[l][hr] for hr in range(2)] for l in range(32)]
            store_frags(out, o, b, Tq, rows, col0, hd, ndt, lambda l, hr, x: x * inv[l][hr])
            for l, hr in ((l, hr) for l in range(0, 32, 4) for hr in range(2)):
                if rows[l][hr] < Tq:
                    lse[b][h][rows[l][hr]] = NAN if uniform[l][hr] else m[l][hr] + math.log(lsum[l][hr])
    return out, lse


def bwd_dkdv(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    ndt, nkc = hdm // 8, hdm // 16
    dk, dv = grid(B, Tk, H * hd), grid(B, Tk, H * hd)
    for b, h, col0, k0 in blocks(B, H, hd, Tk):
        Ks = load_tile(k, b, Tk, col0, k0, hd, hdm)
        Vs = load_tile(v, b, Tk, col0, k0, hd, hdm)
        kf = key_flags(mask, b, Tk, k0)
        for warp in range(4):
            klr = [[warp * 16 + (l >> 2), warp * 16 + (l >> 2) + 8] for l in range(32)]
            dka, dva = zeros(ndt), zeros(ndt)
            q_begin = k0 if (causal and mask is None) else 0
            for q0 in range(q_begin, Tq, T):
                Qs = load_tile(q, b, Tq, col0, q0, hd, hdm)
                dOs = load_tile(dout, b, Tq, col0, q0, hd, hdm)
                lse_s = [lse[b][h][q0 + r] if q0 + r < Tq else 0.0 for r in range(T)]
                D_s = [D[b][h][q0 + r] if q0 + r < Tq else 0.0 for r in range(T)]
                st, dpt = two_warp_products(Ks, Qs, Vs, dOs, hdm, warp, nkc)
                for l in range(32):
                    c = l & 3
                    for nt in range(8):
                        for e in range(4):
                            ql = nt * 8 + 2 * c + (e & 1)
                            kl = klr[l][e >> 1]
                            key = k0 + kl
                            vis = kf[kl] != 0.0 and (not causal or key <= q0 + ql)
                            p = bwd_prob(st[nt][l][e], lse_s[ql], q0 + ql < Tq, key < Tk, vis, scale, Tk)
                            st[nt][l][e] = p
                            dpt[nt][l][e] = p * (dpt[nt][l][e] - D_s[ql])
                for kc in range(4):
                    pa, dsa = c_to_a(st, kc), c_to_a(dpt, kc)
                    accumulate_cols(dva, pa, dOs, hdm, kc, ndt)
                    accumulate_cols(dka, dsa, Qs, hdm, kc, ndt)
            keys = [[k0 + kl for kl in pair] for pair in klr]
            store_frags(dk, dka, b, Tk, keys, col0, hd, ndt, lambda l, hr, x: x * scale)
            store_frags(dv, dva, b, Tk, keys, col0, hd, ndt, lambda l, hr, x: x)
    return dk, dv


def bwd_dq(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    dq = grid(B, Tq, H * hd)
    for b, h, col0, q0 in blocks(B, H, hd, Tq):
        Qs = load_tile(q, b, Tq, col0, q0, hd, hdm)
        dOs = load_tile(dout, b, Tq, col0, q0, hd, hdm)
        for warp in range(4):
            rows = [[q0 + warp * 16 + (l >> 2), q0 + warp * 16 + (l >> 2) + 8] for l in range(32)]
            lse_r = [[lse[b][h][r] if r < Tq else 0.0 for r in rr] for rr in rows]
            D_r = [[D[b][h][r] if r < Tq else 0.0 for r in rr] for rr in rows]
            dqa = zeros(hdm // 8)
            kv_end = min(Tk, q0 + T) if (causal and mask is None) else Tk
            for k0 in range(0, kv_end, T):
                Ks = load_tile(k, b, Tk, col0, k0, hd, hdm)
                Vs = load_tile(v, b, Tk, col0, k0, hd, hdm)
                kf = key_flags(mask, b, Tk, k0)
                s, dp = two_warp_products(Qs, Ks, dOs, Vs, hdm, warp, hdm // 16)
                for l, nt, e in ((l, nt, e) for l in range(32) for nt in range(8) for e in range(4)):
                    kl, hr = nt * 8 + 2 * (l & 3) + (e & 1), e >> 1
                    row = rows[l][hr]
                    vis = kf[kl] != 0.0 and (not causal or k0 + kl <= row)
                    p = bwd_prob(s[nt][l][e], lse_r[l][hr], row < Tq, k0 + kl < Tk, vis, scale, Tk)
                    dp[nt][l][e] = p * (dp[nt][l][e] - D_r[l][hr])
                for kc in range(4):
                    accumulate_cols(dqa, c_to_a(dp, kc), Ks, hdm, kc, hdm // 8)
            store_frags(dq, dqa, b, Tq, rows, col0, hd, hdm // 8, lambda l, hr, x: x * scale)
    return dq


CASES = [  # (B, H, Tq, Tk, hd, hdm, causal, mask)
    (1, 2, 70, 70, 24, 64, True, None), (2, 1, 20, 75, 64, 64, False, "padding"),
    (2, 1, 66, 66, 40, 64, True, "all-masked-row"), (1, 1, 17, 30, 72, 128, False, None),
]


def main():
    check_all(CASES, 11, "tensor-core attention", kernels=sys.modules[__name__], pad_step=5)


if __name__ == "__main__":
    main()
