// attention.cu — fused multi-head softmax attention, FlashAttention-2 style, f32 I/O and f32 math
// (Backend::attention_forward / attention_backward).
//
// Layout (as the Backend trait): q [B, Tq, H·hd], k and v [B, Tk, H·hd], out like q; head h is the
// contiguous column slice h·hd .. (h+1)·hd of each row (W = H·hd is the row stride). lse and D are
// [B, H, Tq]. mask is null or [B, Tk] int32, non-zero = the key may be attended to. causal: query i
// sees keys j <= i (requires Tq == Tk). scale = 1/√hd is passed by the launcher.
//
// Forward (attention_fwd_f32_hd{32,64,128}): per (query tile of 64, batch·head) block, stream key/
// value tiles of 64 through shared memory with an online softmax (running max m, running sum l,
// O rescaled by e^{m_old − m_new}); write O = acc / l and lse = m + log l. Nothing of size Tq×Tk
// ever reaches global memory. Causal blocks stop at the diagonal tile.
// Backward: attention_bwd_preprocess_f32 computes D = rowsum(dO ∘ O); then two deterministic
// kernels recompute P = exp(S·scale − lse) tile by tile: attention_bwd_dkdv_f32_hd* (per key tile,
// looping over query tiles: dV += Pᵀ·dO, dK += dSᵀ·Q·scale) and attention_bwd_dq_f32_hd* (per query
// tile, looping over key tiles: dQ += dS·K·scale), with dS = P ∘ (dO·Vᵀ − D). Splitting dQ off
// costs ~40% more backward FLOPs than FA2's atomicAdd of dQ but gives bitwise-reproducible
// gradients, overwrite semantics (no zero-fill) and no atomics; fine for the fp32 parity path.
//
// All-masked rows: a query row whose every key is masked attends UNIFORMLY over all Tk keys
// (masked ones included), as JAX's finite mask bias and the CPU reference do; its lse is written
// as NaN, which the backward reads as "P = 1/Tk for every key". (Causal without a key mask never
// produces such rows; the causal tile skipping is therefore only used when mask is null.)
//
// Launch shape (all hd variants): block 256 threads as 16×16 (__launch_bounds__(ATT_NT, 2) for hd32
// and hd64 — without a minimum ptxas squeezed the hd32 forward into 64 registers and spilled — and
// (256, 1) for hd128, whose shared memory allows one block per SM anyway and whose dK+dV
// accumulators need more than 128 registers); grid (ceil(T/64), B·H) where T = Tq
// for fwd/dq and Tk for dkdv. Head dims: the _hdN variant serves any 1 <= hd <= N (columns past
// hd are zero-padded in shared memory): hd 16/32 -> hd32, 64 -> hd64, 80..128 -> hd128.
// Dynamic shared memory (floats, LD = N + 1, P = 64·65):
//   fwd:  3·64·LD + P + 64             (hd64: 66,816 B; hd128: 115,968 B; hd32: 42,240 B)
//   dkdv: 4·64·LD + 2·P + 3·64         (hd64: 100,608 B; hd128: 166,144 B; hd32: 67,840 B)
//   dq:   4·64·LD + P + 3·64           (hd64: 83,968 B;  hd128: 149,504 B; hd32: 51,200 B)
// Above 48 KiB the launcher must first raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
// (dm_kernels::launch::attention_smem_bytes gives these numbers).
// Thread (ty, tx) = (t / 16, t % 16) owns rows 4·ty .. 4·ty+3 of every 64-row tile, score columns
// tx + 16·j (j < 4) and head-dim columns tx + 16·c (c < N/16).
//
// Numerics: f32 dot products over the head dim in order, scores multiplied by `scale` after the
// dot (as the CPU's gemm alpha), accurate expf/logf. The online softmax and the tiled sums reorder
// additions relative to the CPU reference (~1e-6 relative). This is the fp32 parity path; the
// fast path is the tensor-core family in attention_tc.cu (same semantics, bf16 operands).

// ATT_T (query and key tile) and ATT_NT (threads per block) come from the Rust descriptor
// (runtime/src/ops/attention/kernels.rs) as -D defines.
#define ATT_PLD (ATT_T + 1)  // row stride of the [64][64] score tiles

// Loads a [64][hd] tile of rows row0.. of a [B, T, W] activation (head column offset `col0`) into
// shared memory with row stride LD, zero-filling rows >= T and columns >= hd.
template <int HDM>
__device__ __forceinline__ void att_load_tile(float* __restrict__ dst, const float* __restrict__ src, int b,
                                              int T, int W, int col0, int row0, int hd) {
    constexpr int LD = HDM + 1;
    for (int idx = threadIdx.x; idx < ATT_T * HDM; idx += ATT_NT) {
        const int r = idx / HDM, d = idx % HDM;
        const int row = row0 + r;
        float v = 0.0f;
        if (row < T && d < hd) v = src[((i64)b * T + row) * W + col0 + d];
        dst[r * LD + d] = v;
    }
}

// s[i][j] = Σ_d X[(4ty+i)][d] · Y[(tx+16j)][d] over two [64][LD] tiles.
template <int HDM>
__device__ __forceinline__ void att_tile_dot(float (&s)[4][4], const float* X, const float* Y, int ty, int tx) {
    constexpr int LD = HDM + 1;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
#pragma unroll 8
    for (int d = 0; d < HDM; ++d) {
        float x[4], y[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = X[(4 * ty + i) * LD + d];
#pragma unroll
        for (int j = 0; j < 4; ++j) y[j] = Y[(tx + 16 * j) * LD + d];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) s[i][j] = fmaf(x[i], y[j], s[i][j]);
    }
}

// acc[i][c] += Σ_kl P[4·ty + i][kl] · X[kl][tx + 16·c] over a 64-column tile P (row stride
// ATT_PLD) and a [64][HDM] tile X (row stride HDM + 1): this thread's 4 rows × HDM/16 columns of
// P·X, accumulated in kl order.
template <int HDM>
__device__ __forceinline__ void att_tile_matmul_acc(float (&acc)[4][HDM / 16], const float* P, const float* X,
                                                    int ty, int tx) {
    constexpr int LD = HDM + 1, NC = HDM / 16;
#pragma unroll 4
    for (int kl = 0; kl < ATT_T; ++kl) {
        float p[4], xv[NC];
#pragma unroll
        for (int i = 0; i < 4; ++i) p[i] = P[(4 * ty + i) * ATT_PLD + kl];
#pragma unroll
        for (int c = 0; c < NC; ++c) xv[c] = X[kl * LD + tx + 16 * c];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int c = 0; c < NC; ++c) acc[i][c] = fmaf(p[i], xv[c], acc[i][c]);
    }
}

// Stores this thread's rows row0 + 4·ty + i (those < T) × head-dim columns tx + 16·c (those < hd)
// of acc into head slice col0 .. of a [B, T, W] activation, each value as f(value, i).
template <int HDM, typename F>
__device__ __forceinline__ void att_store_rows(float* __restrict__ dst, const float (&acc)[4][HDM / 16], int row0,
                                               int b, int T, int W, int col0, int hd, int ty, int tx, F f) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = row0 + 4 * ty + i;
        if (row >= T) continue;
        const i64 base = ((i64)b * T + row) * W + col0;
#pragma unroll
        for (int c = 0; c < HDM / 16; ++c) {
            const int d = tx + 16 * c;
            if (d < hd) dst[base + d] = f(acc[i][c], i);
        }
    }
}

// Reductions over the 16 threads (tx) that share a row: lanes differ in their low 4 bits.
__device__ __forceinline__ float att_row_max(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(DM_FULL_MASK, v, o));
    return v;
}
__device__ __forceinline__ float att_row_sum(float v) {
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(DM_FULL_MASK, v, o);
    return v;
}

// ------------------------------------------------------------------------------------------------
// Forward. Arguments: (out, lse, q, k, v, mask, B, H, Tq, Tk, hd, causal, scale).

template <int HDM>
__device__ __forceinline__ void attention_fwd(DM_ATT_FWD_ARGS(float)) {
    constexpr int LD = HDM + 1, NC = HDM / 16;
    extern __shared__ float att_smem[];
    float *Qs = att_smem, *Ks = Qs + ATT_T * LD, *Vs = Ks + ATT_T * LD, *Ps = Vs + ATT_T * LD;
    float* kflag = Ps + ATT_T * ATT_PLD;

    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const auto [bh, b, h, W, col0, q0] = att_block<ATT_T>(H, hd);

    att_load_tile<HDM>(Qs, q, b, Tq, W, col0, q0, hd);

    float m_i[4], l_i[4], acc[4][NC];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        m_i[i] = DM_NEG_INF;
        l_i[i] = 0.0f;
    }
    zero_fill(acc);

    const int kv_end = causal ? min(Tk, q0 + ATT_T) : Tk;
    for (int k0 = 0; k0 < kv_end; k0 += ATT_T) {
        __syncthreads();  // previous tile fully consumed
        att_load_tile<HDM>(Ks, k, b, Tk, W, col0, k0, hd);
        att_load_tile<HDM>(Vs, v, b, Tk, W, col0, k0, hd);
        att_key_flags<ATT_T>(kflag, mask, b, Tk, k0);
        __syncthreads();

        float s[4][4];
        att_tile_dot<HDM>(s, Qs, Ks, ty, tx);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = q0 + 4 * ty + i;
            float mx = DM_NEG_INF;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int kl = tx + 16 * j, key = k0 + kl;
                const bool vis = kflag[kl] != 0.0f && (!causal || key <= row);
                s[i][j] = vis ? s[i][j] * scale : DM_NEG_INF;
                mx = fmaxf(mx, s[i][j]);
            }
            mx = att_row_max(mx);
            const float m_new = fmaxf(m_i[i], mx);
            float alpha = 1.0f, psum = 0.0f;
            if (m_new != DM_NEG_INF) {  // else: nothing visible yet, p = 0 and nothing rescales
                alpha = expf(m_i[i] - m_new);  // m_i = -inf -> 0 (acc and l are 0 anyway)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    s[i][j] = expf(s[i][j] - m_new);
                    psum += s[i][j];
                }
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
            }
            l_i[i] = l_i[i] * alpha + att_row_sum(psum);
            m_i[i] = m_new;
#pragma unroll
            for (int c = 0; c < NC; ++c) acc[i][c] *= alpha;
#pragma unroll
            for (int j = 0; j < 4; ++j) Ps[(4 * ty + i) * ATT_PLD + tx + 16 * j] = s[i][j];
        }
        __syncthreads();
        att_tile_matmul_acc<HDM>(acc, Ps, Vs, ty, tx);  // acc += P·V
    }

    // Rows with no visible key (l = 0): uniform attention over all Tk keys (rare; block-uniform test).
    bool uniform_row = false;
#pragma unroll
    for (int i = 0; i < 4; ++i) uniform_row |= (q0 + 4 * ty + i < Tq) && l_i[i] == 0.0f;
    if (__syncthreads_or(uniform_row)) {
        float vsum[NC];
#pragma unroll
        for (int c = 0; c < NC; ++c) vsum[c] = 0.0f;
        for (int k0 = 0; k0 < Tk; k0 += ATT_T) {
            __syncthreads();
            att_load_tile<HDM>(Vs, v, b, Tk, W, col0, k0, hd);
            __syncthreads();
            for (int kl = 0; kl < ATT_T; ++kl)
#pragma unroll
                for (int c = 0; c < NC; ++c) vsum[c] += Vs[kl * LD + tx + 16 * c];
        }
        const float inv_tk = att_recip_ge1((float)Tk);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (l_i[i] == 0.0f) {
#pragma unroll
                for (int c = 0; c < NC; ++c) acc[i][c] = vsum[c] * inv_tk;
            }
        }
    }

    float inv_l[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) inv_l[i] = l_i[i] == 0.0f ? 1.0f : att_recip_ge1(l_i[i]);
    att_store_rows<HDM>(out, acc, q0, b, Tq, W, col0, hd, ty, tx, [&](float x, int i) { return x * inv_l[i]; });
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = q0 + 4 * ty + i;
        if (tx == 0 && row < Tq) lse[(i64)bh * Tq + row] = l_i[i] == 0.0f ? DM_NAN : m_i[i] + logf(l_i[i]);
    }
}

extern "C" __global__ void __launch_bounds__(ATT_NT, 2) attention_fwd_f32_hd32(DM_ATT_FWD_ARGS(float)) { attention_fwd<32>(DM_ATT_FWD_CALL); }
extern "C" __global__ void __launch_bounds__(ATT_NT, 2) attention_fwd_f32_hd64(DM_ATT_FWD_ARGS(float)) { attention_fwd<64>(DM_ATT_FWD_CALL); }
extern "C" __global__ void __launch_bounds__(ATT_NT, 1) attention_fwd_f32_hd128(DM_ATT_FWD_ARGS(float)) { attention_fwd<128>(DM_ATT_FWD_CALL); }

// ------------------------------------------------------------------------------------------------
// Backward preprocess: attention_bwd_preprocess_f32(D, dout, out, B, H, Tq, hd)
// D[(b·H + h)·Tq + i] = Σ_d dout[b, i, h·hd + d] · out[b, i, h·hd + d].
// Launch: block 256 (8 warps, one (b, i, h) row each), grid ceil(B·Tq·H / 8). No shared memory.

extern "C" __global__ void attention_bwd_preprocess_f32(float* __restrict__ D, const float* __restrict__ dout,
                                                        const float* __restrict__ out, int B, int H, int Tq,
                                                        int hd) {
    attention_bwd_row_dot(D, dout, out, B, H, Tq, hd);  // common.cuh
}

// P and dS = P ∘ (dP − D) of this thread's 4×4 block (rows 4·ty + i, columns tx + 16·j) of a
// 64×64 score tile, with S = A·Bᵀ and dP = C·Dtᵀ over the head dim (att_tile_dot; P from the saved
// lse, common.cuh's att_bwd_prob). KEY_ROWS: the tile's rows are keys and its columns queries
// (dkdv's Sᵀ), else the reverse (dq's S). Each value goes to sink(i, j, p, ds).
template <int HDM, bool KEY_ROWS, typename Sink>
__device__ __forceinline__ void att_bwd_scores(const float* A, const float* Bt, const float* C, const float* Dt,
                                               const float* lse_s, const float* D_s, const float* kflag, int q0,
                                               int k0, int Tq, int Tk, int causal, float scale, int ty, int tx,
                                               Sink sink) {
    const float inv_tk = 1.0f / (float)Tk;
    float s[4][4], dp[4][4];
    att_tile_dot<HDM>(s, A, Bt, ty, tx);    // S (unscaled), or Sᵀ
    att_tile_dot<HDM>(dp, C, Dt, ty, tx);  // dP = dO·Vᵀ, or dPᵀ = V·dOᵀ
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float row_flag = kflag[4 * ty + i];  // the key's flag when rows are keys (else unused)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int ql = KEY_ROWS ? tx + 16 * j : 4 * ty + i, kl = KEY_ROWS ? 4 * ty + i : tx + 16 * j;
            const int row = q0 + ql, key = k0 + kl;
            const bool vis = (KEY_ROWS ? row_flag : kflag[kl]) != 0.0f && (!causal || key <= row);
            const float p = att_bwd_prob(s[i][j], lse_s[ql], row < Tq, key < Tk, vis, scale, inv_tk);
            sink(i, j, p, p * (dp[i][j] - D_s[ql]));
        }
    }
}

// ------------------------------------------------------------------------------------------------
// dK, dV. Arguments: (dk, dv, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale).
// Grid (ceil(Tk/64), B·H). Overwrites dk, dv (rows < Tk, columns < hd of its head).
// P and dS (common.cuh's att_bwd_prob) are kept transposed, [key][query], in shared memory.

template <int HDM>
__device__ __forceinline__ void attention_bwd_dkdv(DM_ATT_DKDV_ARGS(float)) {
    constexpr int LD = HDM + 1, NC = HDM / 16;
    extern __shared__ float att_smem[];
    float *Ks = att_smem, *Vs = Ks + ATT_T * LD, *Qs = Vs + ATT_T * LD, *dOs = Qs + ATT_T * LD;
    float *PT = dOs + ATT_T * LD, *dST = PT + ATT_T * ATT_PLD;  // Pᵀ and dSᵀ, [key][query]
    float *lse_s = dST + ATT_T * ATT_PLD, *D_s = lse_s + ATT_T, *kflag = D_s + ATT_T;

    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const auto [bh, b, h, W, col0, k0] = att_block<ATT_T>(H, hd);

    att_load_tile<HDM>(Ks, k, b, Tk, W, col0, k0, hd);
    att_load_tile<HDM>(Vs, v, b, Tk, W, col0, k0, hd);
    att_key_flags<ATT_T>(kflag, mask, b, Tk, k0);

    float dk_acc[4][NC], dv_acc[4][NC];
    zero_fill(dk_acc);
    zero_fill(dv_acc);

    // Causal without a key mask: queries before this key tile see none of its keys.
    const int q_begin = (causal && mask == nullptr) ? k0 : 0;
    for (int q0 = q_begin; q0 < Tq; q0 += ATT_T) {
        __syncthreads();
        att_load_tile<HDM>(Qs, q, b, Tq, W, col0, q0, hd);
        att_load_tile<HDM>(dOs, dout, b, Tq, W, col0, q0, hd);
        att_load_row_stats<ATT_T>(lse_s, D_s, lse, D, bh, Tq, q0);
        __syncthreads();

        att_bwd_scores<HDM, true>(Ks, Qs, Vs, dOs, lse_s, D_s, kflag, q0, k0, Tq, Tk, causal, scale, ty, tx,
                                  [&](int i, int j, float p, float ds) {
                                      PT[(4 * ty + i) * ATT_PLD + tx + 16 * j] = p;
                                      dST[(4 * ty + i) * ATT_PLD + tx + 16 * j] = ds;
                                  });
        __syncthreads();
#pragma unroll 4
        for (int ql = 0; ql < ATT_T; ++ql) {
            float p[4], ds[4], qv[NC], dov[NC];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                p[i] = PT[(4 * ty + i) * ATT_PLD + ql];
                ds[i] = dST[(4 * ty + i) * ATT_PLD + ql];
            }
#pragma unroll
            for (int c = 0; c < NC; ++c) {
                qv[c] = Qs[ql * LD + tx + 16 * c];
                dov[c] = dOs[ql * LD + tx + 16 * c];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int c = 0; c < NC; ++c) {
                    dv_acc[i][c] = fmaf(p[i], dov[c], dv_acc[i][c]);
                    dk_acc[i][c] = fmaf(ds[i], qv[c], dk_acc[i][c]);
                }
        }
    }

    att_store_rows<HDM>(dk, dk_acc, k0, b, Tk, W, col0, hd, ty, tx, [&](float x, int) { return x * scale; });
    att_store_rows<HDM>(dv, dv_acc, k0, b, Tk, W, col0, hd, ty, tx, [](float x, int) { return x; });
}

extern "C" __global__ void __launch_bounds__(ATT_NT, 2) attention_bwd_dkdv_f32_hd32(DM_ATT_DKDV_ARGS(float)) { attention_bwd_dkdv<32>(DM_ATT_DKDV_CALL); }
extern "C" __global__ void __launch_bounds__(ATT_NT, 2) attention_bwd_dkdv_f32_hd64(DM_ATT_DKDV_ARGS(float)) { attention_bwd_dkdv<64>(DM_ATT_DKDV_CALL); }
extern "C" __global__ void __launch_bounds__(ATT_NT, 1) attention_bwd_dkdv_f32_hd128(DM_ATT_DKDV_ARGS(float)) { attention_bwd_dkdv<128>(DM_ATT_DKDV_CALL); }

// ------------------------------------------------------------------------------------------------
// dQ. Arguments: (dq, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale).
// Grid (ceil(Tq/64), B·H). Overwrites dq (rows < Tq, columns < hd of its head).

template <int HDM>
__device__ __forceinline__ void attention_bwd_dq(DM_ATT_DQ_ARGS(float)) {
    constexpr int LD = HDM + 1, NC = HDM / 16;
    extern __shared__ float att_smem[];
    float *Qs = att_smem, *dOs = Qs + ATT_T * LD, *Ks = dOs + ATT_T * LD, *Vs = Ks + ATT_T * LD;
    float* dS = Vs + ATT_T * LD;  // [query][key]
    float *lse_s = dS + ATT_T * ATT_PLD, *D_s = lse_s + ATT_T, *kflag = D_s + ATT_T;

    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const auto [bh, b, h, W, col0, q0] = att_block<ATT_T>(H, hd);

    att_load_tile<HDM>(Qs, q, b, Tq, W, col0, q0, hd);
    att_load_tile<HDM>(dOs, dout, b, Tq, W, col0, q0, hd);
    att_load_row_stats<ATT_T>(lse_s, D_s, lse, D, bh, Tq, q0);

    float dq_acc[4][NC];
    zero_fill(dq_acc);

    const int kv_end = (causal && mask == nullptr) ? min(Tk, q0 + ATT_T) : Tk;
    for (int k0 = 0; k0 < kv_end; k0 += ATT_T) {
        __syncthreads();
        att_load_tile<HDM>(Ks, k, b, Tk, W, col0, k0, hd);
        att_load_tile<HDM>(Vs, v, b, Tk, W, col0, k0, hd);
        att_key_flags<ATT_T>(kflag, mask, b, Tk, k0);
        __syncthreads();

        att_bwd_scores<HDM, false>(Qs, Ks, dOs, Vs, lse_s, D_s, kflag, q0, k0, Tq, Tk, causal, scale, ty, tx,
                                   [&](int i, int j, float, float ds) { dS[(4 * ty + i) * ATT_PLD + tx + 16 * j] = ds; });
        __syncthreads();
        att_tile_matmul_acc<HDM>(dq_acc, dS, Ks, ty, tx);  // dq += dS·K
    }

    att_store_rows<HDM>(dq, dq_acc, q0, b, Tq, W, col0, hd, ty, tx, [&](float x, int) { return x * scale; });
}

extern "C" __global__ void __launch_bounds__(ATT_NT, 2) attention_bwd_dq_f32_hd32(DM_ATT_DQ_ARGS(float)) { attention_bwd_dq<32>(DM_ATT_DQ_CALL); }
extern "C" __global__ void __launch_bounds__(ATT_NT, 2) attention_bwd_dq_f32_hd64(DM_ATT_DQ_ARGS(float)) { attention_bwd_dq<64>(DM_ATT_DQ_CALL); }
extern "C" __global__ void __launch_bounds__(ATT_NT, 1) attention_bwd_dq_f32_hd128(DM_ATT_DQ_ARGS(float)) { attention_bwd_dq<128>(DM_ATT_DQ_CALL); }
