// glu.cu — GELU-GLU with the exact (erf) GELU dalle-mini uses: out = gelu(a) · b
// (Backend::gelu_glu_forward / gelu_glu_backward).
//
//   gelu(x)  = x · Φ(x),            Φ(x) = ½ (1 + erf(x / √2))
//   gelu'(x) = Φ(x) + x · φ(x),     φ(x) = e^{−x²/2} / √(2π)
//
// Launch shape: 1-D, grid-stride, any grid; recommended block 256, grid = min(ceil(n/256),
// 8 · SMs). No shared memory. a, b, out are flat [rows · ffn] buffers (the two GLU halves are
// separate buffers, as in the Backend trait).
//
// Numerics: erff/expf are CUDA's accurate versions (no fast math: erff ≤ 2 ulp, expf ≤ 2 ulp),
// so results match the CPU reference (libm erff, Cephes-style exp) to a few ulp.

#define DM_FRAC_1_SQRT_2 0.70710678118654752440f
#define DM_INV_SQRT_2PI 0.39894228040143267794f

__device__ __forceinline__ float gelu_cdf(float x) {
    return 0.5f * (1.0f + erff(x * DM_FRAC_1_SQRT_2));
}

// gelu_glu_forward_f32(out, a, b, n): out[i] = gelu(a[i]) · b[i].
extern "C" __global__ void gelu_glu_forward_f32(float* __restrict__ out, const float* __restrict__ a,
                                                const float* __restrict__ b, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    for (u64 i = tid; i < n; i += stride) {
        const float x = a[i];
        out[i] = x * gelu_cdf(x) * b[i];
    }
}

// gelu_glu_backward_f32(da, db, dout, a, b, n): da[i] = dout·b·gelu'(a), db[i] = dout·gelu(a)
// (both overwritten).
extern "C" __global__ void gelu_glu_backward_f32(float* __restrict__ da, float* __restrict__ db,
                                                 const float* __restrict__ dout,
                                                 const float* __restrict__ a,
                                                 const float* __restrict__ b, u64 n) {
    const u64 tid = global_thread_id(), stride = grid_threads();
    for (u64 i = tid; i < n; i += stride) {
        const float x = a[i], y = b[i], g = dout[i];
        const float cdf = gelu_cdf(x);
        const float grad = cdf + x * DM_INV_SQRT_2PI * expf(-0.5f * x * x);
        da[i] = g * y * grad;
        db[i] = g * (x * cdf);
    }
}
