#!/usr/bin/env python3
"""CPU emulation of the control flow of runtime/src/ops/attention/attention.cu (f32 FlashAttention-2 kernels).

No GPU is needed: each kernel is ported at tile level — same 64-row tiles, same loop bounds (causal
tile skipping, key-tile ranges), same masking, online-softmax updates, uniform-row fallback and NaN
lse convention, same lse/D indexing — and compared with a naive implementation of the CPU
reference's semantics (runtime/src/cpu/attention.rs) on awkward shapes: ragged lengths, Tq != Tk,
head dims below the compiled variant (zero padding), key masks, all-masked rows, causal with and
without a key mask. Thread-level details (which lane holds what) are not modelled here; they are a
plain bijection (rows 4·ty+i, columns tx+16·j).

Keep it in step with attention.cu when the kernel changes. Pure Python, ~30 s.
Usage: python3 scripts/emulate_attention.py
"""

import math
import random
import sys

T = 64  # ATT_T
NAN = float("nan")


def grid(n0, n1, n2):
    """An n0 × n1 × n2 nested list of zeros (an output tensor)."""
    return [[[0.0] * n2 for _ in range(n1)] for _ in range(n0)]


def heads(B, H, hd):
    """(batch, head, first column of the head) for every head of every batch row: the kernels'
    grid over (b, h)."""
    return [(b, h, h * hd) for b in range(B) for h in range(H)]


def blocks(B, H, hd, rows):
    """(b, h, col0, row0) of every block: the kernels' grid (ceil(rows/64), B·H), row0 the block's
    first query (fwd, dq) or key (dkdv)."""
    return [(b, h, col0, r0) for b, h, col0 in heads(B, H, hd) for r0 in range(0, rows, T)]


def store_rows(dst, acc, b, row0, rows, col0, hd, f):
    """att_store_rows / tc_store_acc: dst[b][row0 + r][col0 + d] = f(acc[r][d]) for the rows < `rows`
    and the head's hd columns."""
    for r in range(T):
        if row0 + r >= rows:
            continue
        for d in range(hd):
            dst[b][row0 + r][col0 + d] = f(r, acc[r][d])


def tile(src, b, rows, width, col0, row0, hd, hdm):
    """att_load_tile: [64][hdm] with zero padding."""
    return [[src[b][row0 + r][col0 + d] if row0 + r < rows and d < hd else 0.0 for d in range(hdm)] for r in range(T)]


def key_flags(mask, b, tk, k0):
    return [1.0 if (k0 + kl < tk and (mask is None or mask[b][k0 + kl] != 0)) else 0.0 for kl in range(T)]


def dot(x, y):
    return sum(a * c for a, c in zip(x, y))


def fwd(q, k, v, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    W = H * hd
    out = grid(B, Tq, W)
    lse = grid(B, H, Tq)
    for b, h, col0, q0 in blocks(B, H, hd, Tq):
        Qs = tile(q, b, Tq, W, col0, q0, hd, hdm)
        m = [-math.inf] * T
        l = [0.0] * T
        acc = [[0.0] * hdm for _ in range(T)]
        kv_end = min(Tk, q0 + T) if causal else Tk
        for k0 in range(0, kv_end, T):
            Ks = tile(k, b, Tk, W, col0, k0, hd, hdm)
            Vs = tile(v, b, Tk, W, col0, k0, hd, hdm)
            kf = key_flags(mask, b, Tk, k0)
            for r in range(T):
                row = q0 + r
                s = []
                for kl in range(T):
                    vis = kf[kl] != 0.0 and (not causal or k0 + kl <= row)
                    s.append(dot(Qs[r], Ks[kl]) * scale if vis else -math.inf)
                mx = max(s)
                m_new = max(m[r], mx)
                if m_new != -math.inf:
                    alpha = math.exp(m[r] - m_new) if m[r] != -math.inf else 0.0
                    p = [math.exp(x - m_new) if x != -math.inf else 0.0 for x in s]
                else:
                    alpha, p = 1.0, [0.0] * T
                l[r] = l[r] * alpha + sum(p)
                m[r] = m_new
                acc[r] = [a * alpha + dot(p, [Vs[kl][d] for kl in range(T)]) for d, a in enumerate(acc[r])]
        if any(q0 + r < Tq and l[r] == 0.0 for r in range(T)):
            vsum = [0.0] * hdm
            for k0 in range(0, Tk, T):
                Vs = tile(v, b, Tk, W, col0, k0, hd, hdm)
                for kl in range(T):
                    vsum = [a + Vs[kl][d] for d, a in enumerate(vsum)]
            for r in range(T):
                if l[r] == 0.0:
                    acc[r] = [x / Tk for x in vsum]
        inv = [1.0 if l[r] == 0.0 else 1.0 / l[r] for r in range(T)]
        store_rows(out, acc, b, q0, Tq, col0, hd, lambda r, x: x * inv[r])
        for r in range(min(T, Tq - q0)):
            lse[b][h][q0 + r] = NAN if l[r] == 0.0 else m[r] + math.log(l[r])
    return out, lse


def preprocess(dout, out, B, H, Tq, hd):
    return [[[dot(dout[b][i][h * hd:(h + 1) * hd], out[b][i][h * hd:(h + 1) * hd]) for i in range(Tq)]
             for h in range(H)] for b in range(B)]


def bwd_prob(s, lse_row, row_ok, key_exists, vis, scale, tk):
    if not row_ok or not key_exists:
        return 0.0
    if math.isnan(lse_row):
        return 1.0 / tk
    return math.exp(s * scale - lse_row) if vis else 0.0


def q_tile_state(q, dout, lse, D, b, h, Tq, W, col0, q0, hd, hdm):
    """A query tile's Q, dO (padded to hdm columns) and its rows' lse and D (0 past Tq)."""
    Qs = tile(q, b, Tq, W, col0, q0, hd, hdm)
    dOs = tile(dout, b, Tq, W, col0, q0, hd, hdm)
    lse_s = [lse[b][h][q0 + r] if q0 + r < Tq else 0.0 for r in range(T)]
    D_s = [D[b][h][q0 + r] if q0 + r < Tq else 0.0 for r in range(T)]
    return Qs, dOs, lse_s, D_s


def p_and_ds(q_row, k_row, v_row, do_row, lse_r, D_r, row, key, flag, Tq, Tk, causal, scale):
    """P and dS = P·(dO·V − D) of one (query row, key) pair, as both backward kernels do."""
    vis = flag != 0.0 and (not causal or key <= row)
    p = bwd_prob(dot(q_row, k_row), lse_r, row < Tq, key < Tk, vis, scale, Tk)
    return p, p * (dot(do_row, v_row) - D_r)


def bwd_dkdv(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    W = H * hd
    dk, dv = grid(B, Tk, W), grid(B, Tk, W)
    for b, h, col0, k0 in blocks(B, H, hd, Tk):
        Ks = tile(k, b, Tk, W, col0, k0, hd, hdm)
        Vs = tile(v, b, Tk, W, col0, k0, hd, hdm)
        kf = key_flags(mask, b, Tk, k0)
        dka = [[0.0] * hdm for _ in range(T)]
        dva = [[0.0] * hdm for _ in range(T)]
        q_begin = k0 if (causal and mask is None) else 0
        for q0 in range(q_begin, Tq, T):
            Qs, dOs, lse_s, D_s = q_tile_state(q, dout, lse, D, b, h, Tq, W, col0, q0, hd, hdm)
            for kl in range(T):
                for ql in range(T):
                    p, ds = p_and_ds(Qs[ql], Ks[kl], Vs[kl], dOs[ql], lse_s[ql], D_s[ql], q0 + ql, k0 + kl,
                                     kf[kl], Tq, Tk, causal, scale)
                    for d in range(hdm):
                        dva[kl][d] += p * dOs[ql][d]
                        dka[kl][d] += ds * Qs[ql][d]
        store_rows(dk, dka, b, k0, Tk, col0, hd, lambda r, x: x * scale)
        store_rows(dv, dva, b, k0, Tk, col0, hd, lambda r, x: x)
    return dk, dv


def bwd_dq(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm):
    scale = 1.0 / math.sqrt(hd)
    dq = grid(B, Tq, H * hd)
    for b, h, col0, q0 in blocks(B, H, hd, Tq):
        Qs, dOs, lse_s, D_s = q_tile_state(q, dout, lse, D, b, h, Tq, H * hd, col0, q0, hd, hdm)
        dqa = [[0.0] * hdm for _ in range(T)]
        kv_end = min(Tk, q0 + T) if (causal and mask is None) else Tk
        for k0 in range(0, kv_end, T):
            Ks = tile(k, b, Tk, H * hd, col0, k0, hd, hdm)
            Vs = tile(v, b, Tk, H * hd, col0, k0, hd, hdm)
            kf = key_flags(mask, b, Tk, k0)
            for ql, kl in ((ql, kl) for ql in range(T) for kl in range(T)):
                _, ds = p_and_ds(Qs[ql], Ks[kl], Vs[kl], dOs[ql], lse_s[ql], D_s[ql], q0 + ql, k0 + kl, kf[kl],
                                 Tq, Tk, causal, scale)
                dqa[ql] = [a + ds * x for a, x in zip(dqa[ql], Ks[kl])]
        store_rows(dq, dqa, b, q0, Tq, col0, hd, lambda r, x: x * scale)
    return dq


def reference(q, k, v, dout, mask, B, H, Tq, Tk, hd, causal):
    """Naive semantics of runtime/src/cpu/attention.rs (full P matrices)."""
    scale = 1.0 / math.sqrt(hd)
    W = H * hd
    out = grid(B, Tq, W)
    dq = grid(B, Tq, W)
    dk = grid(B, Tk, W)
    dv = grid(B, Tk, W)
    for b in range(B):
        for h in range(H):
            sl = slice(h * hd, (h + 1) * hd)
            P = []
            for i in range(Tq):
                vis = [(not causal or j <= i) and (mask is None or mask[b][j] != 0) for j in range(Tk)]
                if not any(vis):
                    P.append([1.0 / Tk] * Tk)
                    continue
                s = [dot(q[b][i][sl], k[b][j][sl]) * scale for j in range(Tk)]
                mx = max(s[j] for j in range(Tk) if vis[j])
                e = [math.exp(s[j] - mx) if vis[j] else 0.0 for j in range(Tk)]
                tot = sum(e)
                P.append([x / tot for x in e])
            for i in range(Tq):
                for d in range(hd):
                    out[b][i][h * hd + d] = sum(P[i][j] * v[b][j][h * hd + d] for j in range(Tk))
            for i in range(Tq):
                Di = dot(dout[b][i][sl], out[b][i][sl])
                dS = [P[i][j] * (dot(dout[b][i][sl], v[b][j][sl]) - Di) for j in range(Tk)]
                for d in range(hd):
                    dq[b][i][h * hd + d] += scale * sum(dS[j] * k[b][j][h * hd + d] for j in range(Tk))
                for j in range(Tk):
                    for d in range(hd):
                        dk[b][j][h * hd + d] += scale * dS[j] * q[b][i][h * hd + d]
                        dv[b][j][h * hd + d] += P[i][j] * dout[b][i][h * hd + d]
    return out, dq, dk, dv


def close(a, b, what, tol=1e-9):
    flat_a = [x for m in a for r in m for x in r]
    flat_b = [x for m in b for r in m for x in r]
    worst = max(abs(x - y) for x, y in zip(flat_a, flat_b))
    assert worst < tol, f"{what}: max abs diff {worst}"


def run(B, H, Tq, Tk, hd, hdm, causal, mask_kind, rng, kernels=None, pad_step=3):
    """One case: random inputs, the emulated kernels (`kernels`' fwd/bwd_dkdv/bwd_dq, this
    module's by default) against the naive reference; `pad_step` keys fewer per batch padded."""
    kern = kernels or sys.modules[__name__]
    W = H * hd

    def rnd(rows):
        return [[[rng.uniform(-1, 1) for _ in range(W)] for _ in range(rows)] for _ in range(B)]

    q, k, v, dout = rnd(Tq), rnd(Tk), rnd(Tk), rnd(Tq)
    mask = None
    if mask_kind == "padding":
        mask = [[1 if j < Tk - pad_step * bb else 0 for j in range(Tk)] for bb in range(B)]
    elif mask_kind == "all-masked-row":  # batch 0 has no visible key at all
        mask = [[0] * Tk] + [[1 if j % 3 else 0 for j in range(Tk)] for _ in range(B - 1)]
    out, lse = kern.fwd(q, k, v, mask, B, H, Tq, Tk, hd, causal, hdm)
    D = preprocess(dout, out, B, H, Tq, hd)
    dk, dv = kern.bwd_dkdv(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm)
    dq = kern.bwd_dq(dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, hdm)
    r_out, r_dq, r_dk, r_dv = reference(q, k, v, dout, mask, B, H, Tq, Tk, hd, causal)
    close(out, r_out, "out")
    close(dq, r_dq, "dq")
    close(dk, r_dk, "dk")
    close(dv, r_dv, "dv")
    if mask_kind == "all-masked-row":
        assert all(math.isnan(x) for x in lse[0][0]), "all-masked rows must have NaN lse"
    print(f"ok  B={B} H={H} Tq={Tq} Tk={Tk} hd={hd} (variant {hdm}) causal={causal} mask={mask_kind}")


def check_all(cases, seed, what, kernels=None, pad_step=3):
    """Runs every case (see `run`) from one seeded generator."""
    rng = random.Random(seed)
    for case in cases:
        run(*case, rng, kernels=kernels, pad_step=pad_step)
    print(f"all {what} emulations match the reference")


CASES = [  # (B, H, Tq, Tk, hd, hdm, causal, mask)
    (2, 2, 70, 70, 16, 32, True, None), (2, 1, 70, 70, 16, 32, True, "padding"),
    (2, 2, 5, 67, 16, 32, False, "padding"), (2, 1, 66, 20, 20, 32, False, "all-masked-row"),
    (2, 1, 65, 65, 8, 32, True, "all-masked-row"), (1, 1, 64, 130, 40, 64, False, None),
]


def main():
    check_all(CASES, 3, "attention")


if __name__ == "__main__":
    main()
