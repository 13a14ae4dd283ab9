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
from emulate_attention import reference, close  # noqa: E402
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


def zeros(n):
    return [[[0.0] * 4 for _ in range(32)] for _ in range(n)]


def quad(vals, op):
    """vals[lane] -> the quad reduction (lanes sharing lane >> 2), as the xor-1, xor-2 shuffles."""
    return [op(op(vals[l], vals[l ^ 1]), op(vals[l ^ 2], vals[l ^ 3])) for l in range(32)]


def flags(mask, b, tk, k0):
    return [1.0 if (k0 + kl < tk and (mask is None or mask[b][k0 + kl] != 0)) else 0.0 for kl in range(T)]


def fwd(q, k, v, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    W, ndt, nkc = H * hd, hdm // 8, hdm // 16
    out = [[[0.0] * W for _ in range(Tq)] for _ in range(B)]
    lse = [[[0.0] * Tq for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            col0 = h * hd
            for q0 in range(0, Tq, T):
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
                        kf = flags(mask, b, Tk, k0)
                        s = zeros(8)
                        for kc in range(nkc):
                            for np_ in range(4):
                                (b0, b1), (b2, b3) = frag_b_rows(Ks, hdm, np_ * 16, kc)
                                mma(s[2 * np_], qf[kc], b0, b1)
                                mma(s[2 * np_ + 1], qf[kc], b2, b3)
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
                            for dp in range(ndt // 2):
                                (b0, b1), (b2, b3) = frag_b_cols(Vs, hdm, kc * 16, dp)
                                mma(o[2 * dp], pa, b0, b1)
                                mma(o[2 * dp + 1], pa, b2, b3)
                    for hr in range(2):
                        red = quad([lsum[l][hr] for l in range(32)], lambda x, y: x + y)
                        for l in range(32):
                            lsum[l][hr] = red[l]
                    for l in range(32):
                        c = l & 3
                        uniform = [lsum[l][0] == 0.0, lsum[l][1] == 0.0]
                        if (uniform[0] and rows[l][0] < Tq) or (uniform[1] and rows[l][1] < Tq):
                            for dt in range(ndt):
                                for e in range(2):
                                    d = dt * 8 + 2 * c + e
                                    acc = sum(v[b][key][col0 + d] for key in range(Tk)) if d < hd else 0.0
                                    if uniform[0]:
                                        o[dt][l][e] = acc / Tk
                                    if uniform[1]:
                                        o[dt][l][2 + e] = acc / Tk
                        for hr in range(2):
                            row = rows[l][hr]
                            if row >= Tq:
                                continue
                            inv = 1.0 if uniform[hr] else 1.0 / lsum[l][hr]
                            for dt in range(ndt):
                                for e in range(2):
                                    d = dt * 8 + 2 * c + e
                                    if d < hd:
                                        out[b][row][col0 + d] = o[dt][l][2 * hr + e] * inv
                            if c == 0:
                                lse[b][h][row] = NAN if uniform[hr] else m[l][hr] + math.log(lsum[l][hr])
    return out, lse


def prob(s, lse_row, row_ok, key_exists, vis, scale, tk):
    if not row_ok or not key_exists:
        return 0.0
    if math.isnan(lse_row):
        return 1.0 / tk
    return math.exp(s * scale - lse_row) if vis else 0.0


def bwd_dkdv(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    W, ndt, nkc = H * hd, hdm // 8, hdm // 16
    dk = [[[0.0] * W for _ in range(Tk)] for _ in range(B)]
    dv = [[[0.0] * W for _ in range(Tk)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            col0 = h * hd
            for k0 in range(0, Tk, T):
                Ks = load_tile(k, b, Tk, col0, k0, hd, hdm)
                Vs = load_tile(v, b, Tk, col0, k0, hd, hdm)
                kf = flags(mask, b, Tk, k0)
                for warp in range(4):
                    klr = [[warp * 16 + (l >> 2), warp * 16 + (l >> 2) + 8] for l in range(32)]
                    dka, dva = zeros(ndt), zeros(ndt)
                    q_begin = k0 if (causal and mask is None) else 0
                    for q0 in range(q_begin, Tq, T):
                        Qs = load_tile(q, b, Tq, col0, q0, hd, hdm)
                        dOs = load_tile(dout, b, Tq, col0, q0, hd, hdm)
                        lse_s = [lse[b][h][q0 + r] if q0 + r < Tq else 0.0 for r in range(T)]
                        D_s = [D[b][h][q0 + r] if q0 + r < Tq else 0.0 for r in range(T)]
                        st, dpt = zeros(8), zeros(8)
                        for kc in range(nkc):
                            ka = frag_a(Ks, hdm, warp * 16, kc)
                            va = frag_a(Vs, hdm, warp * 16, kc)
                            for np_ in range(4):
                                (b0, b1), (b2, b3) = frag_b_rows(Qs, hdm, np_ * 16, kc)
                                mma(st[2 * np_], ka, b0, b1)
                                mma(st[2 * np_ + 1], ka, b2, b3)
                                (b0, b1), (b2, b3) = frag_b_rows(dOs, hdm, np_ * 16, kc)
                                mma(dpt[2 * np_], va, b0, b1)
                                mma(dpt[2 * np_ + 1], va, b2, b3)
                        for l in range(32):
                            c = l & 3
                            for nt in range(8):
                                for e in range(4):
                                    ql = nt * 8 + 2 * c + (e & 1)
                                    kl = klr[l][e >> 1]
                                    key = k0 + kl
                                    vis = kf[kl] != 0.0 and (not causal or key <= q0 + ql)
                                    p = prob(st[nt][l][e], lse_s[ql], q0 + ql < Tq, key < Tk, vis, scale, Tk)
                                    st[nt][l][e] = p
                                    dpt[nt][l][e] = p * (dpt[nt][l][e] - D_s[ql])
                        for kc in range(4):
                            pa, dsa = c_to_a(st, kc), c_to_a(dpt, kc)
                            for dp in range(ndt // 2):
                                (b0, b1), (b2, b3) = frag_b_cols(dOs, hdm, kc * 16, dp)
                                mma(dva[2 * dp], pa, b0, b1)
                                mma(dva[2 * dp + 1], pa, b2, b3)
                                (b0, b1), (b2, b3) = frag_b_cols(Qs, hdm, kc * 16, dp)
                                mma(dka[2 * dp], dsa, b0, b1)
                                mma(dka[2 * dp + 1], dsa, b2, b3)
                    for l in range(32):
                        c = l & 3
                        for hr in range(2):
                            key = k0 + klr[l][hr]
                            if key >= Tk:
                                continue
                            for dt in range(ndt):
                                for e in range(2):
                                    d = dt * 8 + 2 * c + e
                                    if d < hd:
                                        dk[b][key][col0 + d] = dka[dt][l][2 * hr + e] * scale
                                        dv[b][key][col0 + d] = dva[dt][l][2 * hr + e]
    return dk, dv


def bwd_dq(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    W, ndt, nkc = H * hd, hdm // 8, hdm // 16
    dq = [[[0.0] * W for _ in range(Tq)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            col0 = h * hd
            for q0 in range(0, Tq, T):
                Qs = load_tile(q, b, Tq, col0, q0, hd, hdm)
                dOs = load_tile(dout, b, Tq, col0, q0, hd, hdm)
                for warp in range(4):
                    rows = [[q0 + warp * 16 + (l >> 2), q0 + warp * 16 + (l >> 2) + 8] for l in range(32)]
                    lse_r = [[lse[b][h][r] if r < Tq else 0.0 for r in rr] for rr in rows]
                    D_r = [[D[b][h][r] if r < Tq else 0.0 for r in rr] for rr in rows]
                    dqa = zeros(ndt)
                    kv_end = min(Tk, q0 + T) if (causal and mask is None) else Tk
                    for k0 in range(0, kv_end, T):
                        Ks = load_tile(k, b, Tk, col0, k0, hd, hdm)
                        Vs = load_tile(v, b, Tk, col0, k0, hd, hdm)
                        kf = flags(mask, b, Tk, k0)
                        s, dp = zeros(8), zeros(8)
                        for kc in range(nkc):
                            qa = frag_a(Qs, hdm, warp * 16, kc)
                            da = frag_a(dOs, hdm, warp * 16, kc)
                            for np_ in range(4):
                                (b0, b1), (b2, b3) = frag_b_rows(Ks, hdm, np_ * 16, kc)
                                mma(s[2 * np_], qa, b0, b1)
                                mma(s[2 * np_ + 1], qa, b2, b3)
                                (b0, b1), (b2, b3) = frag_b_rows(Vs, hdm, np_ * 16, kc)
                                mma(dp[2 * np_], da, b0, b1)
                                mma(dp[2 * np_ + 1], da, b2, b3)
                        for l in range(32):
                            c = l & 3
                            for nt in range(8):
                                for e in range(4):
                                    kl = nt * 8 + 2 * c + (e & 1)
                                    hr = e >> 1
                                    row = rows[l][hr]
                                    vis = kf[kl] != 0.0 and (not causal or k0 + kl <= row)
                                    p = prob(s[nt][l][e], lse_r[l][hr], row < Tq, k0 + kl < Tk, vis, scale, Tk)
                                    dp[nt][l][e] = p * (dp[nt][l][e] - D_r[l][hr])
                        for kc in range(4):
                            dsa = c_to_a(dp, kc)
                            for dpi in range(ndt // 2):
                                (b0, b1), (b2, b3) = frag_b_cols(Ks, hdm, kc * 16, dpi)
                                mma(dqa[2 * dpi], dsa, b0, b1)
                                mma(dqa[2 * dpi + 1], dsa, b2, b3)
                    for l in range(32):
                        c = l & 3
                        for hr in range(2):
                            row = rows[l][hr]
                            if row >= Tq:
                                continue
                            for dt in range(ndt):
                                for e in range(2):
                                    d = dt * 8 + 2 * c + e
                                    if d < hd:
                                        dq[b][row][col0 + d] = dqa[dt][l][2 * hr + e] * scale
    return dq


def run(B, H, Tq, Tk, hd, hdm, causal, mask_kind, rng):
    W = H * hd

    def rnd(rows):
        return [[[rng.uniform(-1, 1) for _ in range(W)] for _ in range(rows)] for _ in range(B)]

    q, k, v, dout = rnd(Tq), rnd(Tk), rnd(Tk), rnd(Tq)
    mask = None
    if mask_kind == "padding":
        mask = [[1 if j < Tk - 5 * bb else 0 for j in range(Tk)] for bb in range(B)]
    elif mask_kind == "all-masked-row":
        mask = [[0] * Tk] + [[1 if j % 3 else 0 for j in range(Tk)] for _ in range(B - 1)]
    out, lse = fwd(q, k, v, mask, B, H, Tq, Tk, hd, causal, hdm)
    D = [[[sum(dout[b][i][h * hd + d] * out[b][i][h * hd + d] for d in range(hd)) for i in range(Tq)]
          for h in range(H)] for b in range(B)]
    dk, dv = bwd_dkdv(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm)
    dq = bwd_dq(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm)
    r_out, r_dq, r_dk, r_dv = reference(q, k, v, dout, mask, B, H, Tq, Tk, hd, causal)
    close(out, r_out, "out")
    close(dq, r_dq, "dq")
    close(dk, r_dk, "dk")
    close(dv, r_dv, "dv")
    if mask_kind == "all-masked-row":
        assert all(math.isnan(x) for x in lse[0][0])
    print(f"ok  B={B} H={H} Tq={Tq} Tk={Tk} hd={hd} (variant {hdm}) causal={causal} mask={mask_kind}")


def main():
    rng = random.Random(11)
    run(1, 2, 70, 70, 24, 64, True, None, rng)
    run(2, 1, 20, 75, 64, 64, False, "padding", rng)
    run(2, 1, 66, 66, 40, 64, True, "all-masked-row", rng)
    run(1, 1, 17, 30, 72, 128, False, None, rng)
    print("all tensor-core attention emulations match the reference")


if __name__ == "__main__":
    main()
