// matmul.cu — dense matrix products C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] + beta · C
// (Backend::matmul with MatmulSpec: beta = 0 overwrites, beta = 1 accumulates).
//
// Layouts (row-major, explicit leading dimensions, as BLAS):
//   A stored [M, K] (lda >= K) — "n"  — or [K, M] (lda >= M) when transposed — "t";
//   B stored [K, N] (ldb >= N) — "n"  — or [N, K] (ldb >= K) when transposed — "t";
//   C stored [M, N] (ldc >= N), f32.
// Entry-point suffix = (A, B) transposes: nn is y = x·W, nt is dx = dy·Wᵀ, tn is dW = xᵀ·dy.
// Every kernel takes: (C, A, B, M, N, K, lda, ldb, ldc, alpha, beta).
//
// beta == 0 never reads C (NaN/garbage in C is fine). Split-K: gridDim.z = S > 1 splits the K
// loop into S ranges of whole K tiles; each split then ADDS alpha·partial into C with atomicAdd and
// ignores beta — the caller zero-fills (or pre-scales) C first. Split-K sums are not bitwise
// deterministic; with gridDim.z == 1 every kernel here is.
//
// ---- matmul_bf16_{nn,nt,tn,tt}_{128x128,64x64}: tensor cores, bf16 inputs, f32 accumulation ----
// Launch: grid (ceil(N/BN), ceil(M/BM), S), block 256 (128×128 tile, 8 warps as 2×4, each warp
// 64×32) or 128 (64×64 tile, 4 warps as 2×2, each warp 32×32). K tile 32, 3-stage cp.async
// pipeline, static shared memory 48 KiB (128×128) / 24 KiB (64×64): no opt-in needed.
// Inner loop: ldmatrix(.trans) fragments from XOR-swizzled shared tiles (conflict-free), then
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (inline PTX; mma.h is not used).
// A K-contiguous operand (A "n", B "t") is staged as [rows][32] and read with ldmatrix; an
// M/N-contiguous one (A "t", B "n") as [32][BM|BN] and read with ldmatrix.trans — so no operand is
// ever transposed in memory.
// Sizes: any M, N, K >= 0. Fast path (16-byte cp.async, zero-filling the ragged edge of K, M or N)
// per operand when its leading dimension is a multiple of 8 elements and its base is 16-byte
// aligned; otherwise that operand is staged element by element with bounds checks (correct, slower:
// launchers should pad leading dimensions to multiples of 8, e.g. ffn 2730 -> ld 2736).
// Numerics: products of bf16 values are exact in f32; sums are f32 in the tensor core's order.
// Performance note: on Hopper, mma.sync reaches only about 2/3 of the wgmma peak that cuBLAS uses;
// getting within 10% of cuBLAS there needs a wgmma + TMA (sm_90a) kernel, not written yet.
//
// ---- matmul_f32_{nn,nt,tn,tt}: SIMT f32 for the fp32 parity mode ----
// Launch: grid (ceil(N/64), ceil(M/64), S), block 256; 64×64 tile, K tile 16, each thread 4×4
// outputs (rows ty + 16i, columns tx + 16j). Static shared memory 8.3 KiB. Any sizes (bounds-checked
// loads); any leading dimensions. Numerics: f32 FMAs, K summed in order within a split.

// Every entry point's parameter list (T = bf16_t or float), and the argument list forwarding it.
#define DM_GEMM_ARGS(T)                                                                             \
    float *__restrict__ C, const T *__restrict__ A, const T *__restrict__ B, int M, int N, int K, int lda, \
        int ldb, int ldc, float alpha, float beta
#define DM_GEMM_CALL_ARGS C, A, B, M, N, K, lda, ldb, ldc, alpha, beta

// ------------------------------------------------------------------------------------------------
// Shared-memory tile layouts (element offsets), both swizzled at 16-byte-chunk granularity so that
// the 8 row addresses of one ldmatrix 8×8 matrix fall in 8 distinct bank groups.
//
// K-major tile: rows = M (or N) index, 32 bf16 (4 chunks) per row; chunk c of row r is stored at
// chunk c ^ ((r >> 1) & 3).
__device__ __forceinline__ int kmajor_off(int row, int chunk) {
    return row * 32 + ((chunk ^ ((row >> 1) & 3)) << 3);
}
// MN-major tile: rows = k (32 of them), W bf16 per row (W/8 >= 8 chunks); chunk c of row r is
// stored at chunk c ^ (r & 7).
template <int W>
__device__ __forceinline__ int mnmajor_off(int row, int chunk) {
    return row * W + ((chunk ^ (row & 7)) << 3);
}

// Stages one operand tile (ROWS_MN × 32 of the logical [MN, K] operand) into shared memory.
// KMAJOR: the operand is stored K-contiguous (element (i, k) at g[i·ld + k]); else MN-contiguous
// (element (i, k) at g[k·ld + i]). `fast`: ld % 8 == 0 and g 16-byte aligned.
template <int ROWS_MN, int NT, bool KMAJOR>
__device__ __forceinline__ void load_tile_bf16(bf16_t* tile, const bf16_t* __restrict__ g, int ld, int mn0,
                                               int k0, int MN, int K, bool fast) {
    constexpr int CHUNKS = ROWS_MN * 32 / 8;
    static_assert(CHUNKS % NT == 0, "tile chunks must divide evenly among threads");
#pragma unroll
    for (int it = 0; it < CHUNKS / NT; ++it) {
        const int id = threadIdx.x + it * NT;
        int row, chunk, i, k, valid;  // valid = elements of this 8-wide chunk inside the matrix
        if (KMAJOR) {
            row = id >> 2;
            chunk = id & 3;
            i = mn0 + row;
            k = k0 + chunk * 8;
            valid = (i < MN) ? min(max(K - k, 0), 8) : 0;
        } else {
            constexpr int CPR = ROWS_MN / 8;  // chunks per row
            row = id / CPR;
            chunk = id % CPR;
            k = k0 + row;
            i = mn0 + chunk * 8;
            valid = (k < K) ? min(max(MN - i, 0), 8) : 0;
        }
        const int off = KMAJOR ? kmajor_off(row, chunk) : mnmajor_off<ROWS_MN>(row, chunk);
        const i64 goff = KMAJOR ? (i64)i * ld + k : (i64)k * ld + i;
        if (fast) {
            cp_async_16(smem_u32(tile + off), valid > 0 ? (const void*)(g + goff) : (const void*)g, valid * 2);
        } else {
            unsigned short v[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) v[e] = e < valid ? g[goff + e] : (unsigned short)0;
            uint4 packed;
            packed.x = v[0] | ((unsigned)v[1] << 16);
            packed.y = v[2] | ((unsigned)v[3] << 16);
            packed.z = v[4] | ((unsigned)v[5] << 16);
            packed.w = v[6] | ((unsigned)v[7] << 16);
            *reinterpret_cast<uint4*>(tile + off) = packed;
        }
    }
}

// This split's range [kt_begin, kt_end) of the ceil(K/BK) K tiles (gridDim.z splits; may be empty).
template <int BK>
__device__ __forceinline__ void split_k_tiles(int K, int& kt_begin, int& kt_end) {
    const int k_tiles_total = (K + BK - 1) / BK;
    const int per_split = (k_tiles_total + gridDim.z - 1) / gridDim.z;
    kt_begin = blockIdx.z * per_split;
    kt_end = min(k_tiles_total, kt_begin + per_split);
}

// Writes alpha·acc (= v) into C at c: atomically added under split-K, else v + beta·C (beta = 0:
// C is not read).
__device__ __forceinline__ void store_c(float* c, float v, bool split, float beta) {
    if (split) {
        atomicAdd(c, v);
    } else {
        *c = beta != 0.0f ? v + beta * *c : v;
    }
}

template <int BM, int BN, int WARPS_M, int WARPS_N, int STAGES, bool TA, bool TB>
__device__ __forceinline__ void gemm_bf16_tc(DM_GEMM_ARGS(bf16_t)) {
    constexpr int BK = MM_BF16_BK;
    constexpr int NT = WARPS_M * WARPS_N * 32;
    constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
    constexpr int MI = WTM / 16, NI = WTN / 8;              // mma tiles per warp
    static_assert(NI % 2 == 0, "B fragments are loaded for pairs of n8 tiles");
    static_assert(BM % 64 == 0 && BN % 64 == 0, "MN-major swizzle needs >= 8 chunks per row");

    __shared__ __align__(128) bf16_t sA[STAGES][BM * BK];
    __shared__ __align__(128) bf16_t sB[STAGES][BN * BK];

    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    const bool fast_a = (lda % 8 == 0) && aligned16(A);
    const bool fast_b = (ldb % 8 == 0) && aligned16(B);

    int kt_begin, kt_end;
    split_k_tiles<BK>(K, kt_begin, kt_end);
    const int k_tiles = max(kt_end - kt_begin, 0);

    float acc[MI][NI][4];
    zero_fill(acc);

    auto load_stage = [&](int stage, int kt) {
        const int k0 = (kt_begin + kt) * BK;
        load_tile_bf16<BM, NT, !TA>(sA[stage], A, lda, m0, k0, M, K, fast_a);
        load_tile_bf16<BN, NT, TB>(sB[stage], B, ldb, n0, k0, N, K, fast_b);
    };

    // Prologue: fill STAGES-1 stages (always commit, so group counting stays uniform).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        cp_async_commit();
    }

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt landed for everyone; stage (kt-1) % STAGES is free again
        {
            const int next = kt + STAGES - 1;
            if (next < k_tiles) load_stage(next % STAGES, next);
            cp_async_commit();
        }
        const bf16_t* tA = sA[kt % STAGES];
        const bf16_t* tB = sB[kt % STAGES];
        const int q = lane >> 3, r8 = lane & 7;  // which 8×8 matrix this lane addresses, and its row
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            unsigned af[MI][4];
            unsigned bf[NI][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                const int mb = warp_m * WTM + mi * 16;
                if (!TA) {  // [m][k]: matrices (m0-7,k0-7) (m8-15,k0-7) (m0-7,k8-15) (m8-15,k8-15)
                    const int row = mb + r8 + (q & 1) * 8;
                    const int chunk = (kk >> 3) + (q >> 1);
                    ldsm_x4(af[mi], smem_u32(tA + kmajor_off(row, chunk)));
                } else {  // [k][m], transposed on load
                    const int krow = kk + r8 + (q >> 1) * 8;
                    const int chunk = (mb >> 3) + (q & 1);
                    ldsm_x4_trans(af[mi], smem_u32(tA + mnmajor_off<BM>(krow, chunk)));
                }
            }
#pragma unroll
            for (int np = 0; np < NI / 2; ++np) {
                const int nb = warp_n * WTN + np * 16;
                unsigned r[4];
                if (TB) {  // [n][k]: matrices (n0-7,k0-7) (n0-7,k8-15) (n8-15,k0-7) (n8-15,k8-15)
                    const int row = nb + r8 + (q >> 1) * 8;
                    const int chunk = (kk >> 3) + (q & 1);
                    ldsm_x4(r, smem_u32(tB + kmajor_off(row, chunk)));
                } else {  // [k][n], transposed on load
                    const int krow = kk + r8 + (q & 1) * 8;
                    const int chunk = (nb >> 3) + (q >> 1);
                    ldsm_x4_trans(r, smem_u32(tB + mnmajor_off<BN>(krow, chunk)));
                }
                bf[2 * np][0] = r[0];
                bf[2 * np][1] = r[1];
                bf[2 * np + 1][0] = r[2];
                bf[2 * np + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < NI; ++ni) mma_bf16_16816(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: accumulator (mi, ni) holds rows +lane/4 (+8) and columns 2·(lane%4) (+1).
    const bool split = gridDim.z > 1;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
            const int col = n0 + warp_n * WTN + ni * 8 + (lane & 3) * 2;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + warp_m * WTM + mi * 16 + (lane >> 2) + h * 8;
                if (row >= M) continue;
                float* c = C + (i64)row * ldc + col;
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    if (col + e < N) store_c(c + e, alpha * acc[mi][ni][2 * h + e], split, beta);
            }
        }
    }
}

// The two tile shapes' template arguments (tile, tile, warps_m, warps_n) from the Rust descriptor.
#define DM_GEMM_L MM_BF16_L_TILE, MM_BF16_L_TILE, MM_BF16_L_WARPS_M, MM_BF16_L_WARPS_N
#define DM_GEMM_S MM_BF16_S_TILE, MM_BF16_S_TILE, MM_BF16_S_WARPS_M, MM_BF16_S_WARPS_N

extern "C" __global__ void __launch_bounds__(MM_BF16_L_THREADS) matmul_bf16_nn_128x128(DM_GEMM_ARGS(bf16_t)) { gemm_bf16_tc<DM_GEMM_L, 3, false, false>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_BF16_L_THREADS) matmul_bf16_nt_128x128(DM_GEMM_ARGS(bf16_t)) { gemm_bf16_tc<DM_GEMM_L, 3, false, true>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_BF16_L_THREADS) matmul_bf16_tn_128x128(DM_GEMM_ARGS(bf16_t)) { gemm_bf16_tc<DM_GEMM_L, 3, true, false>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_BF16_L_THREADS) matmul_bf16_tt_128x128(DM_GEMM_ARGS(bf16_t)) { gemm_bf16_tc<DM_GEMM_L, 3, true, true>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_BF16_S_THREADS) matmul_bf16_nn_64x64(DM_GEMM_ARGS(bf16_t)) { gemm_bf16_tc<DM_GEMM_S, 3, false, false>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_BF16_S_THREADS) matmul_bf16_nt_64x64(DM_GEMM_ARGS(bf16_t)) { gemm_bf16_tc<DM_GEMM_S, 3, false, true>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_BF16_S_THREADS) matmul_bf16_tn_64x64(DM_GEMM_ARGS(bf16_t)) { gemm_bf16_tc<DM_GEMM_S, 3, true, false>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_BF16_S_THREADS) matmul_bf16_tt_64x64(DM_GEMM_ARGS(bf16_t)) { gemm_bf16_tc<DM_GEMM_S, 3, true, true>(DM_GEMM_CALL_ARGS); }

// ------------------------------------------------------------------------------------------------
// f32 SIMT GEMM (parity mode).

// Stages the [BK][ROWS + 1] f32 tile sA[k][i] = op(X)[mn0 + i][k0 + k] (zero outside MN × K).
// KMAJOR: X stored K-contiguous (element (i, k) at g[i·ld + k]: consecutive threads walk k); else
// MN-contiguous (at g[k·ld + i]: consecutive threads walk i).
template <int ROWS, bool KMAJOR>
__device__ __forceinline__ void load_tile_f32(float (&tile)[MM_F32_BK][ROWS + 1], const float* __restrict__ g, int ld,
                                              int mn0, int k0, int MN, int K) {
    constexpr int BK = MM_F32_BK, NT = MM_F32_THREADS;
#pragma unroll
    for (int e = 0; e < ROWS * BK / NT; ++e) {
        const int id = threadIdx.x + e * NT;
        int i, k;
        if (KMAJOR) {
            i = id / BK;
            k = id % BK;
        } else {
            k = id / ROWS;
            i = id % ROWS;
        }
        const int gi = mn0 + i, gk = k0 + k;
        float v = 0.0f;
        if (gi < MN && gk < K) v = KMAJOR ? g[(i64)gi * ld + gk] : g[(i64)gk * ld + gi];
        tile[k][i] = v;
    }
}

template <bool TA, bool TB>
__device__ __forceinline__ void gemm_f32_simt(DM_GEMM_ARGS(float)) {
    constexpr int BM = MM_F32_TILE, BN = MM_F32_TILE, BK = MM_F32_BK;
    __shared__ float sA[BK][BM + 1];  // [k][m]; +1 breaks the bank pattern of transposed stores
    __shared__ float sB[BK][BN + 1];  // [k][n]
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    int kt_begin, kt_end;
    split_k_tiles<BK>(K, kt_begin, kt_end);

    float acc[4][4];
    zero_fill(acc);

    for (int kt = kt_begin; kt < kt_end; ++kt) {
        const int k0 = kt * BK;
        load_tile_f32<BM, !TA>(sA, A, lda, m0, k0, M, K);  // A "n" is [m][k]: K-contiguous
        load_tile_f32<BN, TB>(sB, B, ldb, n0, k0, N, K);   // B "t" is [n][k]
        __syncthreads();
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) a[i] = sA[k][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; ++j) b[j] = sB[k][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    const bool split = gridDim.z > 1;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = m0 + ty + 16 * i;
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx + 16 * j;
            if (col >= N) continue;
            store_c(C + (i64)row * ldc + col, alpha * acc[i][j], split, beta);
        }
    }
}

extern "C" __global__ void __launch_bounds__(MM_F32_THREADS) matmul_f32_nn(DM_GEMM_ARGS(float)) { gemm_f32_simt<false, false>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_F32_THREADS) matmul_f32_nt(DM_GEMM_ARGS(float)) { gemm_f32_simt<false, true>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_F32_THREADS) matmul_f32_tn(DM_GEMM_ARGS(float)) { gemm_f32_simt<true, false>(DM_GEMM_CALL_ARGS); }
extern "C" __global__ void __launch_bounds__(MM_F32_THREADS) matmul_f32_tt(DM_GEMM_ARGS(float)) { gemm_f32_simt<true, true>(DM_GEMM_CALL_ARGS); }
