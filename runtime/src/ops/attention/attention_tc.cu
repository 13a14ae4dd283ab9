// attention_tc.cu — fused multi-head attention on tensor cores (bf16 mma.sync m16n8k16, f32
// accumulation), FlashAttention-2 style: the fast path of Backend::attention_forward/backward.
// Same semantics and layouts as attention.cu (read its header): q [B, Tq, H·hd], k/v [B, Tk, H·hd],
// heads as column slices, lse and D [B, H, Tq] f32, mask null or [B, Tk] int32, causal, scale =
// 1/√hd from the launcher; all-masked rows attend uniformly over all Tk keys and get lse = NaN.
//
// I/O type: the _f32 entry points read and write f32 tensors (the Backend trait's buffers) and
// round to bf16 while staging tiles in shared memory; the _bf16 ones read and write bf16 (the
// mixed-precision activations, half the memory traffic). lse and D are always f32.
//
// Kernels (hd variants 64 and 128; a variant serves any 1 <= hd <= 64 resp. 128 by zero padding,
// but the hd32-and-below heads are cheaper on attention.cu's f32 kernels):
//   attention_tc_fwd_{f32,bf16}_hd{64,128}(out, lse, q, k, v, mask, B, H, Tq, Tk, hd, causal, scale)
//   attention_tc_bwd_preprocess_bf16(D, dout, out, B, H, Tq, hd)   (f32 I/O: attention.cu's
//       attention_bwd_preprocess_f32)
//   attention_tc_bwd_dkdv_{f32,bf16}_hd{64,128}(dk, dv, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd,
//       causal, scale)
//   attention_tc_bwd_dq_{f32,bf16}_hd{64,128}(dq, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd,
//       causal, scale)
// All overwrite their outputs (no zero fill needed); no atomics; deterministic.
//
// Launch shape: block 128 threads = 4 warps, each owning 16 rows of a 64-row tile (query rows for
// fwd and dq, key rows for dkdv); grid (ceil(T/64), B·H) with T = Tq (fwd, dq) or Tk (dkdv).
// Shared memory: fwd is static (2 tiles of 64×hd bf16 + 256 B: 16.25 KiB hd64, 32.25 KiB hd128);
// dkdv and dq take DYNAMIC shared memory of 4·64·HDM·2 + 3·64·4 bytes (33,536 B hd64; 66,304 B
// hd128, which needs CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES raised first) —
// dm_kernels::launch::attention_tc_smem_bytes.
//
// Work per block: forward — Q fragments kept in registers, then per key tile S = Q·Kᵀ (ldmatrix
// from XOR-swizzled bf16 tiles), mask, online softmax in registers (row max/sum over the 4 lanes of
// a quad), P re-packed from accumulator to A-operand layout without touching shared memory, and
// O += P·V (V read with ldmatrix.trans). dkdv — per query tile Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, Pᵀ from
// lse, dSᵀ = Pᵀ∘(dPᵀ − D), dV += Pᵀ·dO, dK += dSᵀ·Q. dq — per key tile S, dP = dO·Vᵀ, dS, dQ += dS·K.
// Tiles are loaded synchronously (no cp.async double buffering yet: the next step for speed).
//
// Numerics: Q, K, V, dO, P and dS enter the tensor cores as bf16 (round to nearest even); every
// product and sum is f32, as are the softmax statistics (max, sum, lse) and D. So results match
// the f32 kernels to bf16 precision (~3 significant digits), as FlashAttention-2's do.

// TC_T (tile rows) and TC_NT (threads per block) come from the Rust descriptor
// (runtime/src/ops/attention/kernels.rs) as -D defines.

// Offset (elements) of 16-byte chunk `chunk` of row `row` in a swizzled [64][HDM] bf16 tile:
// the 8 rows one ldmatrix phase reads (same chunk, consecutive rows) hit 8 distinct bank groups.
template <int HDM>
__device__ __forceinline__ int tc_off(int row, int chunk) {
    static_assert(HDM >= 64, "the swizzle needs at least 8 chunks per row");
    return row * HDM + ((chunk ^ (row & 7)) << 3);
}

template <typename IO>
__device__ __forceinline__ float tc_ld(const IO* p, i64 i) {
    return to_f32(p[i]);
}
__device__ __forceinline__ void tc_st(float* p, i64 i, float v) {
    p[i] = v;
}
__device__ __forceinline__ void tc_st(bf16_t* p, i64 i, float v) {
    p[i] = f32_to_bf16(v);
}

// 8 consecutive elements at p (16-byte aligned) as 4 bf16x2 words.
__device__ __forceinline__ uint4 tc_ld8(const bf16_t* p) {
    return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ uint4 tc_ld8(const float* p) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    return make_uint4(pack_bf16x2(a.x, a.y), pack_bf16x2(a.z, a.w), pack_bf16x2(b.x, b.y), pack_bf16x2(b.z, b.w));
}

// Stages rows row0 .. row0+63 of head slice [col0, col0+hd) of a [B, T, W] tensor as a swizzled
// bf16 [64][HDM] tile, zero-filling rows >= T and columns >= hd. `vec`: hd % 8 == 0 and the
// tensor is 16-byte aligned, so every 8-column chunk is either whole or absent.
template <int HDM, typename IO>
__device__ __forceinline__ void tc_load_tile(bf16_t* dst, const IO* __restrict__ src, int b, int T, int W,
                                             int col0, int row0, int hd, bool vec) {
    constexpr int CPR = HDM / 8;
    for (int id = threadIdx.x; id < TC_T * CPR; id += TC_NT) {
        const int r = id / CPR, ch = id % CPR;
        const int row = row0 + r, d0 = ch * 8;
        const i64 base = ((i64)b * T + row) * W + col0 + d0;
        uint4 w = make_uint4(0u, 0u, 0u, 0u);
        if (row < T && d0 < hd) {
            if (vec) {
                w = tc_ld8(src + base);
            } else {
                float f[8];
#pragma unroll
                for (int e = 0; e < 8; ++e) f[e] = d0 + e < hd ? tc_ld(src, base + e) : 0.0f;
                w = make_uint4(pack_bf16x2(f[0], f[1]), pack_bf16x2(f[2], f[3]), pack_bf16x2(f[4], f[5]),
                               pack_bf16x2(f[6], f[7]));
            }
        }
        *reinterpret_cast<uint4*>(dst + tc_off<HDM>(r, ch)) = w;
    }
}

// A fragment (16 rows from `row0`, k16 step `kc` over the head dim) of a [64][HDM] tile.
template <int HDM>
__device__ __forceinline__ void tc_frag_a(unsigned (&a)[4], const bf16_t* tile, int row0, int kc, int lane) {
    const int q = lane >> 3, r8 = lane & 7;
    ldsm_x4(a, smem_u32(tile + tc_off<HDM>(row0 + r8 + (q & 1) * 8, 2 * kc + (q >> 1))));
}

// B fragments for two n8 tiles (rows n0 .. n0+15 of the tile are the n index, the head dim is k):
// r[0], r[1] serve n0 .. n0+7 and r[2], r[3] serve n0+8 .. n0+15.
template <int HDM>
__device__ __forceinline__ void tc_frag_b_rows(unsigned (&r)[4], const bf16_t* tile, int n0, int kc, int lane) {
    const int q = lane >> 3, r8 = lane & 7;
    ldsm_x4(r, smem_u32(tile + tc_off<HDM>(n0 + r8 + (q >> 1) * 8, 2 * kc + (q & 1))));
}

// B fragments for two n8 tiles of the head dim (columns 16·dp ..), k = tile rows k0 .. k0+15
// (ldmatrix.trans: the tile is stored k-major).
template <int HDM>
__device__ __forceinline__ void tc_frag_b_cols(unsigned (&r)[4], const bf16_t* tile, int k0, int dp, int lane) {
    const int q = lane >> 3, r8 = lane & 7;
    ldsm_x4_trans(r, smem_u32(tile + tc_off<HDM>(k0 + r8 + (q & 1) * 8, 2 * dp + (q >> 1))));
}

// Accumulators of a 16×64 score tile (8 n8 tiles) -> A fragments of the k16 step `kc` (columns
// 16·kc .. 16·kc+15), i.e. the P (or dS) operand of the next product.
__device__ __forceinline__ void tc_c_to_a(unsigned (&a)[4], const float (&s)[8][4], int kc) {
    a[0] = pack_bf16x2(s[2 * kc][0], s[2 * kc][1]);
    a[1] = pack_bf16x2(s[2 * kc][2], s[2 * kc][3]);
    a[2] = pack_bf16x2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
    a[3] = pack_bf16x2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(DM_FULL_MASK, v, 1));
    return fmaxf(v, __shfl_xor_sync(DM_FULL_MASK, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(DM_FULL_MASK, v, 1);
    return v + __shfl_xor_sync(DM_FULL_MASK, v, 2);
}

// acc[2·np], acc[2·np+1] += A · Bᵀ for the k16 step `kc`: `a` is a warp's A fragment, B rows
// 16·np .. 16·np+15 of `tile` (one pair of n8 tiles of an S = Q·Kᵀ-shaped product).
template <int HDM>
__device__ __forceinline__ void tc_mma_rows(float (&acc)[8][4], const unsigned (&a)[4], const bf16_t* tile, int np,
                                            int kc, int lane) {
    unsigned r[4];
    tc_frag_b_rows<HDM>(r, tile, np * 16, kc, lane);
    mma_bf16_16816(acc[2 * np], a, r[0], r[1]);
    mma_bf16_16816(acc[2 * np + 1], a, r[2], r[3]);
}

// acc[2·dp], acc[2·dp+1] += A · B for the 16 tile rows of step `kc`: `a` is a warp's A fragment
// (P or dS), B head-dim columns 16·dp .. 16·dp+15 of `tile` (one pair of n8 tiles of an
// O += P·V-shaped product).
template <int HDM>
__device__ __forceinline__ void tc_mma_cols(float (&acc)[HDM / 8][4], const unsigned (&a)[4], const bf16_t* tile,
                                            int dp, int kc, int lane) {
    unsigned r[4];
    tc_frag_b_cols<HDM>(r, tile, kc * 16, dp, lane);
    mma_bf16_16816(acc[2 * dp], a, r[0], r[1]);
    mma_bf16_16816(acc[2 * dp + 1], a, r[2], r[3]);
}

// Stores this lane's part of a [16][HDM] accumulator in C-fragment layout — rows row[0], row[1]
// (those < T), head-dim columns 8·dt + 2·c + e (those < hd) — into head slice col0 .. of a
// [B, T, W] tensor, each value as f(value, hr).
template <int HDM, typename IO, typename F>
__device__ __forceinline__ void tc_store_acc(IO* __restrict__ dst, const float (&acc)[HDM / 8][4], const int (&row)[2],
                                             int b, int T, int W, int col0, int hd, int c, F f) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        if (row[hr] >= T) continue;
        const i64 base = ((i64)b * T + row[hr]) * W + col0;
#pragma unroll
        for (int dt = 0; dt < HDM / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int d = dt * 8 + 2 * c + e;
                if (d < hd) tc_st(dst, base + d, f(acc[dt][2 * hr + e], hr));
            }
    }
}

// ------------------------------------------------------------------------------------------------
// Forward.

template <int HDM, typename IO>
__device__ __forceinline__ void attention_tc_fwd(DM_ATT_FWD_ARGS(IO)) {
    constexpr int NKC = HDM / 16, NDT = HDM / 8;
    __shared__ __align__(128) bf16_t Ks[TC_T * HDM];  // also stages Q at the start
    __shared__ __align__(128) bf16_t Vs[TC_T * HDM];
    __shared__ float kflag[TC_T];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane & 3;
    const auto [bh, b, h, W, col0, q0] = att_block<TC_T>(H, hd);
    const bool vq = (hd % 8 == 0) && aligned16(q), vk = (hd % 8 == 0) && aligned16(k),
               vv = (hd % 8 == 0) && aligned16(v);
    const int row[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};

    tc_load_tile<HDM>(Ks, q, b, Tq, W, col0, q0, hd, vq);
    __syncthreads();
    unsigned qf[NKC][4];
#pragma unroll
    for (int kc = 0; kc < NKC; ++kc) tc_frag_a<HDM>(qf[kc], Ks, warp * 16, kc, lane);

    float o[NDT][4];
    zero_fill(o);
    float m[2] = {DM_NEG_INF, DM_NEG_INF}, l[2] = {0.0f, 0.0f};  // l: this lane's partial sums

    const int kv_end = causal ? min(Tk, q0 + TC_T) : Tk;
    for (int k0 = 0; k0 < kv_end; k0 += TC_T) {
        __syncthreads();  // Q fragments taken / previous K, V consumed
        tc_load_tile<HDM>(Ks, k, b, Tk, W, col0, k0, hd, vk);
        tc_load_tile<HDM>(Vs, v, b, Tk, W, col0, k0, hd, vv);
        att_key_flags<TC_T>(kflag, mask, b, Tk, k0);
        __syncthreads();

        float s[8][4];
        zero_fill(s);
#pragma unroll
        for (int kc = 0; kc < NKC; ++kc)
#pragma unroll
            for (int np = 0; np < 4; ++np) tc_mma_rows<HDM>(s, qf[kc], Ks, np, kc, lane);

        float mx[2] = {DM_NEG_INF, DM_NEG_INF};
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int kl = nt * 8 + 2 * c + (e & 1), key = k0 + kl;
                const bool vis = kflag[kl] != 0.0f && (!causal || key <= row[e >> 1]);
                s[nt][e] = vis ? s[nt][e] * scale : DM_NEG_INF;
                mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
            }
        float shift[2], alpha[2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const float m_new = fmaxf(m[hr], quad_max(mx[hr]));
            shift[hr] = m_new == DM_NEG_INF ? 0.0f : m_new;  // nothing visible yet: p = e^-inf = 0
            alpha[hr] = expf(m[hr] - shift[hr]);             // m = -inf -> 0
            m[hr] = m_new;
            l[hr] *= alpha[hr];
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nt][e] = expf(s[nt][e] - shift[e >> 1]);
                l[e >> 1] += s[nt][e];
            }
#pragma unroll
        for (int dt = 0; dt < NDT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[dt][e] *= alpha[e >> 1];
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) {
            unsigned pa[4];
            tc_c_to_a(pa, s, kc);
#pragma unroll
            for (int dp = 0; dp < NDT / 2; ++dp) tc_mma_cols<HDM>(o, pa, Vs, dp, kc, lane);
        }
    }

    float inv_l[2];
    bool uniform[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        l[hr] = quad_sum(l[hr]);
        uniform[hr] = l[hr] == 0.0f;
        inv_l[hr] = uniform[hr] ? 1.0f : att_recip_ge1(l[hr]);
    }
    // Rows with no visible key: O = mean of V over all Tk keys (rare; straight from global memory).
    if ((uniform[0] && row[0] < Tq) || (uniform[1] && row[1] < Tq)) {
        const float inv_tk = att_recip_ge1((float)Tk);
#pragma unroll
        for (int dt = 0; dt < NDT; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int d = dt * 8 + 2 * c + e;
                float acc = 0.0f;
                if (d < hd)
                    for (int key = 0; key < Tk; ++key) acc += tc_ld(v, ((i64)b * Tk + key) * W + col0 + d);
                if (uniform[0]) o[dt][e] = acc * inv_tk;
                if (uniform[1]) o[dt][2 + e] = acc * inv_tk;
            }
    }
    tc_store_acc<HDM>(out, o, row, b, Tq, W, col0, hd, c, [&](float x, int hr) { return x * inv_l[hr]; });
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
        if (c == 0 && row[hr] < Tq) lse[(i64)bh * Tq + row[hr]] = uniform[hr] ? DM_NAN : m[hr] + logf(l[hr]);
}

extern "C" __global__ void __launch_bounds__(TC_NT) attention_tc_fwd_f32_hd64(DM_ATT_FWD_ARGS(float)) { attention_tc_fwd<64>(DM_ATT_FWD_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT) attention_tc_fwd_f32_hd128(DM_ATT_FWD_ARGS(float)) { attention_tc_fwd<128>(DM_ATT_FWD_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT) attention_tc_fwd_bf16_hd64(DM_ATT_FWD_ARGS(bf16_t)) { attention_tc_fwd<64>(DM_ATT_FWD_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT) attention_tc_fwd_bf16_hd128(DM_ATT_FWD_ARGS(bf16_t)) { attention_tc_fwd<128>(DM_ATT_FWD_CALL); }

// ------------------------------------------------------------------------------------------------
// Backward preprocess for bf16 I/O: D[(b·H + h)·Tq + i] = Σ_d dout·out over head h of row (b, i),
// in f32. Launch: block 256 (8 warps, one (b, i, h) row each), grid ceil(B·Tq·H / 8).

extern "C" __global__ void attention_tc_bwd_preprocess_bf16(float* __restrict__ D, const bf16_t* __restrict__ dout,
                                                            const bf16_t* __restrict__ out, int B, int H, int Tq,
                                                            int hd) {
    attention_bwd_row_dot(D, dout, out, B, H, Tq, hd);  // common.cuh
}

// Two score-like products of this warp's 16 rows against a 64-row tile, over the head dim:
// sa = A1[rows] · B1ᵀ and sb = A2[rows] · B2ᵀ (A tiles read as mma A fragments at the warp's rows,
// B tiles as "row" B fragments), both [16][64] in C-fragment layout, overwritten.
template <int HDM>
__device__ __forceinline__ void tc_two_products(float (&sa)[8][4], float (&sb)[8][4], const bf16_t* a1,
                                                const bf16_t* b1, const bf16_t* a2, const bf16_t* b2, int warp,
                                                int lane) {
    zero_fill(sa);
    zero_fill(sb);
#pragma unroll
    for (int kc = 0; kc < HDM / 16; ++kc) {
        unsigned x1[4], x2[4];
        tc_frag_a<HDM>(x1, a1, warp * 16, kc, lane);
        tc_frag_a<HDM>(x2, a2, warp * 16, kc, lane);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
            tc_mma_rows<HDM>(sa, x1, b1, np, kc, lane);
            tc_mma_rows<HDM>(sb, x2, b2, np, kc, lane);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// dK, dV: block = 64 keys (warp w: keys 16w ..), loop over query tiles. P from the saved lse
// (common.cuh's att_bwd_prob).

template <int HDM, typename IO>
__device__ __forceinline__ void attention_tc_bwd_dkdv(DM_ATT_DKDV_ARGS(IO)) {
    constexpr int NDT = HDM / 8;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    bf16_t *Ks = reinterpret_cast<bf16_t*>(tc_smem), *Vs = Ks + TC_T * HDM, *Qs = Vs + TC_T * HDM, *dOs = Qs + TC_T * HDM;
    float *lse_s = reinterpret_cast<float*>(dOs + TC_T * HDM), *D_s = lse_s + TC_T, *kflag = D_s + TC_T;

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane & 3;
    const auto [bh, b, h, W, col0, k0] = att_block<TC_T>(H, hd);
    const float inv_tk = 1.0f / (float)Tk;
    const bool vec = hd % 8 == 0;
    const int kl_row[2] = {warp * 16 + (lane >> 2), warp * 16 + (lane >> 2) + 8};  // key within tile

    tc_load_tile<HDM>(Ks, k, b, Tk, W, col0, k0, hd, vec && aligned16(k));
    tc_load_tile<HDM>(Vs, v, b, Tk, W, col0, k0, hd, vec && aligned16(v));
    att_key_flags<TC_T>(kflag, mask, b, Tk, k0);

    float dka[NDT][4], dva[NDT][4];
    zero_fill(dka);
    zero_fill(dva);

    const int q_begin = (causal && mask == nullptr) ? k0 : 0;
    for (int q0 = q_begin; q0 < Tq; q0 += TC_T) {
        __syncthreads();
        tc_load_tile<HDM>(Qs, q, b, Tq, W, col0, q0, hd, vec && aligned16(q));
        tc_load_tile<HDM>(dOs, dout, b, Tq, W, col0, q0, hd, vec && aligned16(dout));
        att_load_row_stats<TC_T>(lse_s, D_s, lse, D, bh, Tq, q0);
        __syncthreads();

        float st[8][4], dpt[8][4];  // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ: rows = this warp's 16 keys, columns = 64 queries
        tc_two_products<HDM>(st, dpt, Ks, Qs, Vs, dOs, warp, lane);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int ql = nt * 8 + 2 * c + (e & 1), qrow = q0 + ql;
                const int kl = kl_row[e >> 1], key = k0 + kl;
                const bool vis = kflag[kl] != 0.0f && (!causal || key <= qrow);
                const float p = att_bwd_prob(st[nt][e], lse_s[ql], qrow < Tq, key < Tk, vis, scale, inv_tk);
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - D_s[ql]);
            }
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) {  // k = queries 16·kc ..
            unsigned pa[4], dsa[4];
            tc_c_to_a(pa, st, kc);
            tc_c_to_a(dsa, dpt, kc);
#pragma unroll
            for (int dp = 0; dp < NDT / 2; ++dp) {
                tc_mma_cols<HDM>(dva, pa, dOs, dp, kc, lane);
                tc_mma_cols<HDM>(dka, dsa, Qs, dp, kc, lane);
            }
        }
    }

    const int key[2] = {k0 + kl_row[0], k0 + kl_row[1]};
    tc_store_acc<HDM>(dk, dka, key, b, Tk, W, col0, hd, c, [&](float x, int) { return x * scale; });
    tc_store_acc<HDM>(dv, dva, key, b, Tk, W, col0, hd, c, [](float x, int) { return x; });
}

extern "C" __global__ void __launch_bounds__(TC_NT, 1) attention_tc_bwd_dkdv_f32_hd64(DM_ATT_DKDV_ARGS(float)) { attention_tc_bwd_dkdv<64>(DM_ATT_DKDV_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT, 1) attention_tc_bwd_dkdv_f32_hd128(DM_ATT_DKDV_ARGS(float)) { attention_tc_bwd_dkdv<128>(DM_ATT_DKDV_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT, 1) attention_tc_bwd_dkdv_bf16_hd64(DM_ATT_DKDV_ARGS(bf16_t)) { attention_tc_bwd_dkdv<64>(DM_ATT_DKDV_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT, 1) attention_tc_bwd_dkdv_bf16_hd128(DM_ATT_DKDV_ARGS(bf16_t)) { attention_tc_bwd_dkdv<128>(DM_ATT_DKDV_CALL); }

// ------------------------------------------------------------------------------------------------
// dQ: block = 64 queries (warp w: queries 16w ..), loop over key tiles.

template <int HDM, typename IO>
__device__ __forceinline__ void attention_tc_bwd_dq(DM_ATT_DQ_ARGS(IO)) {
    constexpr int NDT = HDM / 8;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    bf16_t *Qs = reinterpret_cast<bf16_t*>(tc_smem), *dOs = Qs + TC_T * HDM, *Ks = dOs + TC_T * HDM, *Vs = Ks + TC_T * HDM;
    float* kflag = reinterpret_cast<float*>(Vs + TC_T * HDM);

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane & 3;
    const auto [bh, b, h, W, col0, q0] = att_block<TC_T>(H, hd);
    const float inv_tk = 1.0f / (float)Tk;
    const bool vec = hd % 8 == 0;
    const int row[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};
    float lse_r[2], D_r[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        lse_r[hr] = row[hr] < Tq ? lse[(i64)bh * Tq + row[hr]] : 0.0f;
        D_r[hr] = row[hr] < Tq ? D[(i64)bh * Tq + row[hr]] : 0.0f;
    }

    tc_load_tile<HDM>(Qs, q, b, Tq, W, col0, q0, hd, vec && aligned16(q));
    tc_load_tile<HDM>(dOs, dout, b, Tq, W, col0, q0, hd, vec && aligned16(dout));

    float dqa[NDT][4];
    zero_fill(dqa);

    const int kv_end = (causal && mask == nullptr) ? min(Tk, q0 + TC_T) : Tk;
    for (int k0 = 0; k0 < kv_end; k0 += TC_T) {
        __syncthreads();
        tc_load_tile<HDM>(Ks, k, b, Tk, W, col0, k0, hd, vec && aligned16(k));
        tc_load_tile<HDM>(Vs, v, b, Tk, W, col0, k0, hd, vec && aligned16(v));
        att_key_flags<TC_T>(kflag, mask, b, Tk, k0);
        __syncthreads();

        float s[8][4], dp[8][4];  // S = Q·Kᵀ and dP = dO·Vᵀ: rows = this warp's 16 queries, columns = 64 keys
        tc_two_products<HDM>(s, dp, Qs, Ks, dOs, Vs, warp, lane);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int kl = nt * 8 + 2 * c + (e & 1), key = k0 + kl, hr = e >> 1;
                const bool vis = kflag[kl] != 0.0f && (!causal || key <= row[hr]);
                const float p = att_bwd_prob(s[nt][e], lse_r[hr], row[hr] < Tq, key < Tk, vis, scale, inv_tk);
                dp[nt][e] = p * (dp[nt][e] - D_r[hr]);
            }
#pragma unroll
        for (int kc = 0; kc < 4; ++kc) {  // k = keys 16·kc ..
            unsigned dsa[4];
            tc_c_to_a(dsa, dp, kc);
#pragma unroll
            for (int dpi = 0; dpi < NDT / 2; ++dpi) tc_mma_cols<HDM>(dqa, dsa, Ks, dpi, kc, lane);
        }
    }

    tc_store_acc<HDM>(dq, dqa, row, b, Tq, W, col0, hd, c, [&](float x, int) { return x * scale; });
}

extern "C" __global__ void __launch_bounds__(TC_NT) attention_tc_bwd_dq_f32_hd64(DM_ATT_DQ_ARGS(float)) { attention_tc_bwd_dq<64>(DM_ATT_DQ_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT) attention_tc_bwd_dq_f32_hd128(DM_ATT_DQ_ARGS(float)) { attention_tc_bwd_dq<128>(DM_ATT_DQ_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT) attention_tc_bwd_dq_bf16_hd64(DM_ATT_DQ_ARGS(bf16_t)) { attention_tc_bwd_dq<64>(DM_ATT_DQ_CALL); }
extern "C" __global__ void __launch_bounds__(TC_NT) attention_tc_bwd_dq_bf16_hd128(DM_ATT_DQ_ARGS(bf16_t)) { attention_tc_bwd_dq<128>(DM_ATT_DQ_CALL); }
