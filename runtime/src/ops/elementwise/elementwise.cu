// elementwise.cu — memory-bound elementwise ops and reductions over flat buffers
// (Backend::{fill, add, add_assign, scale, sum_squares, add_broadcast_rows, sum_broadcast_rows},
// plus the f32 <-> bf16 casts of the mixed-precision mode).
//
// Launch shape (all kernels but the broadcast rows): 1-D, grid-stride, so any grid is correct. Recommended block 256
// and grid = min(ceil(n / (256·4)), 8 · number_of_SMs) — each thread moves 4 elements per step
// on the float4 path. No shared memory except the reductions (static, 256 B).
//
// float4 path: taken when every pointer of the call is 16-byte aligned (always true for whole
// cudarc allocations; offsets into a buffer may break it); the remainder n mod 4 and unaligned
// calls use scalar loads. The choice never changes results.
//
// Numerics: one IEEE f32 operation per element, identical to the CPU reference (add, scale) —
// except sum_squares, which squares in f64 and sums per-thread in f64, then reduces over a fixed
// tree: deterministic for a fixed grid, and at least as accurate as the CPU's f32-runs-in-f64 sum.

// fill_f32(x, value, n): x[i] = value.
extern "C" __global__ void fill_f32(float* __restrict__ x, float value, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    u64 start = 0;
    if (aligned16(x)) {
        const u64 n4 = n >> 2;
        float4* x4 = reinterpret_cast<float4*>(x);
        const float4 v = make_float4(value, value, value, value);
        for (u64 i = tid; i < n4; i += stride) x4[i] = v;
        start = n4 << 2;
    }
    for (u64 i = start + tid; i < n; i += stride) x[i] = value;
}

// add_f32(out, a, b, n): out[i] = a[i] + b[i]. `out` must not alias `a` or `b` (use add_assign).
extern "C" __global__ void add_f32(float* __restrict__ out, const float* __restrict__ a,
                                   const float* __restrict__ b, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    u64 start = 0;
    if (aligned16(out) && aligned16(a) && aligned16(b)) {
        const u64 n4 = n >> 2;
        for (u64 i = tid; i < n4; i += stride) {
            const float4 x = reinterpret_cast<const float4*>(a)[i];
            const float4 y = reinterpret_cast<const float4*>(b)[i];
            reinterpret_cast<float4*>(out)[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
        }
        start = n4 << 2;
    }
    for (u64 i = start + tid; i < n; i += stride) out[i] = a[i] + b[i];
}

// add_assign_f32(acc, x, n): acc[i] += x[i].
extern "C" __global__ void add_assign_f32(float* __restrict__ acc, const float* __restrict__ x, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    u64 start = 0;
    if (aligned16(acc) && aligned16(x)) {
        const u64 n4 = n >> 2;
        for (u64 i = tid; i < n4; i += stride) {
            float4 a = reinterpret_cast<float4*>(acc)[i];
            const float4 y = reinterpret_cast<const float4*>(x)[i];
            a.x += y.x;
            a.y += y.y;
            a.z += y.z;
            a.w += y.w;
            reinterpret_cast<float4*>(acc)[i] = a;
        }
        start = n4 << 2;
    }
    for (u64 i = start + tid; i < n; i += stride) acc[i] += x[i];
}

// scale_f32(x, s, n): x[i] *= s.
extern "C" __global__ void scale_f32(float* __restrict__ x, float s, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    u64 start = 0;
    if (aligned16(x)) {
        const u64 n4 = n >> 2;
        for (u64 i = tid; i < n4; i += stride) {
            float4 a = reinterpret_cast<float4*>(x)[i];
            a.x *= s;
            a.y *= s;
            a.z *= s;
            a.w *= s;
            reinterpret_cast<float4*>(x)[i] = a;
        }
        start = n4 << 2;
    }
    for (u64 i = start + tid; i < n; i += stride) x[i] *= s;
}

// sum_squares_partial_f32(x, n, partials): pass 1 of Σ x², deterministic two-pass form.
// partials[blockIdx.x] = Σ over this block's grid-stride elements of (double)x². `partials` holds
// gridDim.x doubles. Block size: a multiple of 32, at most 1024.
extern "C" __global__ void sum_squares_partial_f32(const float* __restrict__ x, u64 n,
                                                   double* __restrict__ partials) {
    __shared__ double scratch[32];
    const u64 tid = global_thread_id(), stride = grid_threads();
    double acc = 0.0;
    for (u64 i = tid; i < n; i += stride) {
        const double v = (double)x[i];
        acc += v * v;
    }
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// sum_f64_finish(partials, count, out, accumulate): pass 2. ONE block (any multiple of 32 up to
// 1024 threads): out[0] = (accumulate ? out[0] : 0) + Σ partials[0..count), in a fixed order.
// `accumulate` lets a global gradient norm gather Σ g² over many tensors without a host round trip.
extern "C" __global__ void sum_f64_finish(const double* __restrict__ partials, int count,
                                          double* __restrict__ out, int accumulate) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) out[0] = accumulate ? out[0] + acc : acc;
}

// ---- bf16 storage: the casts (GEMM operand staging, the bf16 staging of every other op) and
// the fill of bf16 buffers. Rounding is done in integer arithmetic, bit for bit as the CPU backend
// rounds (`half::bf16::from_f32`): round to nearest even, subnormals kept, a NaN stays NaN with
// its upper payload bits and the quiet bit set (PTX cvt.rn.bf16.f32 would return the canonical NaN).
__device__ __forceinline__ bf16_t f32_to_bf16_rne(float f) {
    const unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((x >> 16) | 0x0040u);
    // Add just under half an ulp, plus one when the kept part is odd (ties go to even).
    return (bf16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// cast_f32_to_bf16(out, x, n): out[i] = bf16(x[i]), rounded as f32_to_bf16_rne.
extern "C" __global__ void cast_f32_to_bf16(bf16_t* __restrict__ out, const float* __restrict__ x, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    for (u64 i = tid; i < n; i += stride) out[i] = f32_to_bf16_rne(x[i]);
}

// cast_bf16_to_f32(out, x, n): out[i] = f32(x[i]) (exact).
extern "C" __global__ void cast_bf16_to_f32(float* __restrict__ out, const bf16_t* __restrict__ x, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    for (u64 i = tid; i < n; i += stride) out[i] = bf16_to_f32(x[i]);
}

// fill_bf16(x, value, n): x[i] = bf16(value), rounded as f32_to_bf16_rne.
extern "C" __global__ void fill_bf16(bf16_t* __restrict__ x, float value, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    const bf16_t v = f32_to_bf16_rne(value);
    for (u64 i = tid; i < n; i += stride) x[i] = v;
}

// ---- broadcast rows: the learned-position add and its sum over the batch ----
// (Backend::{add_broadcast_rows, sum_broadcast_rows}; 2-D grids, not grid-stride.)
// sum_broadcast_rows_f32 is deterministic and bitwise equal to the CPU reference (it adds the
// blocks into acc one at a time, in order).

// add_broadcast_rows_f32(out, row, n_blocks, row_len)
// out[b · row_len + j] += row[j] for b < n_blocks (positions: row_len = len · d, n_blocks = batch).
// Launch: grid (ceil(row_len / 256), n_blocks), block 256.
extern "C" __global__ void add_broadcast_rows_f32(float* __restrict__ out, const float* __restrict__ row,
                                                  int n_blocks, int row_len) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    if (j >= row_len || b >= n_blocks) return;
    out[(i64)b * row_len + j] += row[j];
}

// sum_broadcast_rows_f32(acc, x, n_blocks, row_len)
// acc[j] += x[0·row_len + j]; acc[j] += x[1·row_len + j]; … (sequentially, as the CPU does).
// Launch: grid (ceil(row_len / 256)), block 256; one thread per column j.
extern "C" __global__ void sum_broadcast_rows_f32(float* __restrict__ acc, const float* __restrict__ x,
                                                  int n_blocks, int row_len) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= row_len) return;
    float a = acc[j];
    for (int b = 0; b < n_blocks; ++b) a += x[(i64)b * row_len + j];
    acc[j] = a;
}
