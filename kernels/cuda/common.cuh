// common.cuh — the prelude dm-kernels prepends to every kernel family before NVRTC compiles it
// (the families are separate NVRTC programs; nothing here is a kernel).
//
// It also holds the inline-PTX wrappers for ldmatrix, mma.sync (bf16, f32 accumulate) and cp.async
// shared by matmul.cu and attention_tc.cu (mma.h is not used: the pip header wheels lack what it
// needs).
//
// It is self-contained on purpose: no #include at all, so a family compiles with nothing but
// libnvrtc (its built-in declarations cover threadIdx, atomics, erff/expf/logf, shuffles). bf16 is
// handled as raw 16-bit patterns (`bf16_t`, bit-compatible with Rust's `half::bf16`) converted with
// PTX `cvt.rn.bf16.f32` (round to nearest even, sm_80+), so cuda_bf16.h is not needed either.
//
// Numerics of every family: compiled WITHOUT --use_fast_math, so NVRTC's defaults hold: IEEE
// division and square root (prec-div, prec-sqrt), denormals kept (no ftz), the accurate expf/logf/
// erff (a few ulp), and FMA contraction on (fmad=true) — the only deliberate departure from the
// CPU reference's operation-by-operation f32 rounding, worth ~1 ulp per contracted multiply-add.
//
// Integer conventions: element counts of flat buffers are `u64` (a whole parameter set can exceed
// 2^31 elements); matrix dimensions are `int`; every offset into a matrix is formed in 64 bits.

typedef unsigned short bf16_t;
typedef unsigned long long u64;
typedef long long i64;

#define DM_NEG_INF (__int_as_float(0xff800000))
#define DM_NAN (__int_as_float(0x7fffffff))
#define DM_FULL_MASK 0xffffffffu

// ---- bf16 <-> f32 -------------------------------------------------------------------------
__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((unsigned)h) << 16);
}

// An f32 or bf16 element as f32 (lets one template serve f32 and bf16 I/O).
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16_t x) { return bf16_to_f32(x); }

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    unsigned short r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// ---- warp and block reductions (deterministic: fixed butterfly order) -----------------------
struct dm_add {
    template <typename T>
    __device__ __forceinline__ T operator()(T a, T b) const {
        return a + b;
    }
};
struct dm_max {
    __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// op over the 32 lanes of the warp, returned to every lane.
template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(DM_FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) { return warp_reduce(v, dm_add()); }
__device__ __forceinline__ double warp_sum_f64(double v) { return warp_reduce(v, dm_add()); }
__device__ __forceinline__ float warp_max(float v) { return warp_reduce(v, dm_max()); }

// op over the whole block, returned to every thread (`identity` fills the lanes past the last
// warp). `scratch` is >= 32 values of shared memory; blockDim.x must be a multiple of 32.
// Contains two __syncthreads(), so every thread of the block must call it.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_reduce(v, op);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_reduce(lane < nwarps ? scratch[lane] : identity, op);
}

__device__ __forceinline__ float block_sum(float v, float* scratch) { return block_reduce(v, scratch, 0.0f, dm_add()); }
__device__ __forceinline__ float block_max(float v, float* scratch) {
    return block_reduce(v, scratch, DM_NEG_INF, dm_max());
}
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    return block_reduce(v, scratch, 0.0, dm_add());
}

// Two sums at once (one pair of barriers instead of two).
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();
    if (lane == 0) scratch[warp] = make_float2(a, b);
    __syncthreads();
    float2 s = lane < nwarps ? scratch[lane] : make_float2(0.0f, 0.0f);
    return make_float2(warp_sum(s.x), warp_sum(s.y));
}

// ---- grid-stride helpers ---------------------------------------------------------------------
__device__ __forceinline__ u64 global_thread_id() {
    return (u64)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ u64 grid_threads() {
    return (u64)gridDim.x * blockDim.x;
}

__device__ __forceinline__ bool aligned16(const void* p) {
    return (((u64)p) & 15) == 0;
}

// ---- tensor-core and async-copy PTX (sm_80+; used by matmul.cu and attention_tc.cu) -----------

__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, int src_bytes) {
    // src_bytes < 16 zero-fills the rest of the 16-byte destination (0 = pure zero fill).
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// d += a · b for one 16×8×16 tile (A row-major 16×16, B "col" 16×8, f32 accumulators).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats as one bf16x2 register: `lo` in the low half (the lower k index of an mma fragment).
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// ---- register arrays ---------------------------------------------------------------------------
// Zeroes an accumulator array held in registers (fully unrolled).
template <int N, int M>
__device__ __forceinline__ void zero_fill(float (&a)[N][M]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int j = 0; j < M; ++j) a[i][j] = 0.0f;
}
template <int N, int M, int L>
__device__ __forceinline__ void zero_fill(float (&a)[N][M][L]) {
#pragma unroll
    for (int i = 0; i < N; ++i) zero_fill(a[i]);
}

// ---- attention (shared by attention.cu's f32 and attention_tc.cu's tensor-core kernels) ----------
// The entry points' parameter lists (IO = float or bf16_t; lse and D are always f32), and the
// argument lists that forward them to the kernels' templates.
#define DM_ATT_FWD_ARGS(IO)                                                                             \
    IO *__restrict__ out, float *__restrict__ lse, const IO *__restrict__ q, const IO *__restrict__ k, \
        const IO *__restrict__ v, const int *__restrict__ mask, int B, int H, int Tq, int Tk, int hd,  \
        int causal, float scale
#define DM_ATT_FWD_CALL out, lse, q, k, v, mask, B, H, Tq, Tk, hd, causal, scale
#define DM_ATT_DKDV_ARGS(IO)                                                                               \
    IO *__restrict__ dk, IO *__restrict__ dv, const IO *__restrict__ dout, const IO *__restrict__ q,       \
        const IO *__restrict__ k, const IO *__restrict__ v, const float *__restrict__ lse,                 \
        const float *__restrict__ D, const int *__restrict__ mask, int B, int H, int Tq, int Tk, int hd, \
        int causal, float scale
#define DM_ATT_DKDV_CALL dk, dv, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale
#define DM_ATT_DQ_ARGS(IO)                                                                                 \
    IO *__restrict__ dq, const IO *__restrict__ dout, const IO *__restrict__ q, const IO *__restrict__ k, \
        const IO *__restrict__ v, const float *__restrict__ lse, const float *__restrict__ D,             \
        const int *__restrict__ mask, int B, int H, int Tq, int Tk, int hd, int causal, float scale
#define DM_ATT_DQ_CALL dq, dout, q, k, v, lse, D, mask, B, H, Tq, Tk, hd, causal, scale

// What this block works on — grid (ceil(T/TILE), B·H): batch·head bh = b·H + h, where the head
// sits in a [B, T, W] activation (W = H·hd the row stride, col0 = h·hd its first column) and row0,
// the first row of its tile (a query for fwd and dq, a key for dkdv).
struct AttBlock {
    int bh, b, h, W, col0, row0;
};
template <int TILE>
__device__ __forceinline__ AttBlock att_block(int H, int hd) {
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    return AttBlock{bh, b, h, H * hd, h * hd, (int)blockIdx.x * TILE};
}

// Validity flags of keys k0 .. k0+TILE-1 (1 when the key exists and the mask allows it), written
// by the first TILE threads.
template <int TILE>
__device__ __forceinline__ void att_key_flags(float* flags, const int* __restrict__ mask, int b, int Tk, int k0) {
    if (threadIdx.x < TILE) {
        const int key = k0 + threadIdx.x;
        bool ok = key < Tk;
        if (ok && mask != nullptr) ok = mask[(i64)b * Tk + key] != 0;
        flags[threadIdx.x] = ok ? 1.0f : 0.0f;
    }
}

// lse and D of query rows q0 .. q0+TILE-1 into shared memory (rows >= Tq get 0: they are masked).
template <int TILE>
__device__ __forceinline__ void att_load_row_stats(float* lse_s, float* D_s, const float* __restrict__ lse,
                                                   const float* __restrict__ D, int bh, int Tq, int q0) {
    if (threadIdx.x < TILE) {
        const int row = q0 + threadIdx.x;
        lse_s[threadIdx.x] = row < Tq ? lse[(i64)bh * Tq + row] : 0.0f;
        D_s[threadIdx.x] = row < Tq ? D[(i64)bh * Tq + row] : 0.0f;
    }
}

// 1/x for x >= 1 (the softmax normaliser l always is: its largest term is e^0): hardware
// reciprocal plus one Newton step, within 1 ulp of 1.0f/x (almost always exact). Unlike IEEE
// division it has no slow-path subroutine, whose call forced register spills in the hd32 variant.
__device__ __forceinline__ float att_recip_ge1(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return fmaf(r, fmaf(-x, r, 1.0f), r);
}

// P of the backward from the saved lse: 1/Tk (inv_tk) for uniform (NaN-lse) rows, else
// exp(s·scale − lse) where visible, else 0 (and 0 for rows or keys past the end).
__device__ __forceinline__ float att_bwd_prob(float s, float lse_row, bool row_ok, bool key_exists, bool vis,
                                              float scale, float inv_tk) {
    if (!row_ok || !key_exists) return 0.0f;
    if (isnan(lse_row)) return inv_tk;
    return vis ? expf(s * scale - lse_row) : 0.0f;
}

// ---- attention backward preprocess (attention.cu's f32 and attention_tc.cu's bf16 entry point) ---
// D[(b·H + h)·Tq + i] = Σ_d dout[b, i, h·hd + d] · out[b, i, h·hd + d], in f32: one warp per
// (b, i, h) row of a [B, Tq, H·hd] activation, h fastest, so a warp's reads are contiguous.
template <typename IO>
__device__ __forceinline__ void attention_bwd_row_dot(float* __restrict__ D, const IO* __restrict__ dout,
                                                      const IO* __restrict__ out, int B, int H, int Tq, int hd) {
    const i64 row = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= (i64)B * Tq * H) return;
    const int h = (int)(row % H);
    const i64 bi = row / H;
    const int i = (int)(bi % Tq), b = (int)(bi / Tq);
    const i64 base = bi * ((i64)H * hd) + (i64)h * hd;
    float s = 0.0f;
    for (int d = lane; d < hd; d += 32) s += to_f32(dout[base + d]) * to_f32(out[base + d]);
    s = warp_sum(s);
    if (lane == 0) D[((i64)b * H + h) * Tq + i] = s;
}
