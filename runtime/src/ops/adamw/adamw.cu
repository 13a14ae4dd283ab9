// adamw.cu — one AdamW step exactly as optax.adamw (eps_root 0, decay on every entry), fused over
// parameter, gradient and both moments (Backend::adamw):
//
//   g = s · grad;  m = (1−b1)·g + b1·m;  v = (1−b2)·g² + b2·v
//   u = (m / bc1) / (√(v / bc2) + eps) + wd · p;   p = p − lr · u
//
// with bc1 = 1 − b1^step, bc2 = 1 − b2^step computed by the LAUNCHER in f64 and rounded to f32
// (as the CPU reference does), and s = grad_scale, or *grad_scale_dev when that pointer is not
// null (a device-side scale, e.g. from a clip computed on the GPU, avoiding a host round trip;
// then the `grad_scale` argument is ignored).
//
// fp32 master weights and moments. The *_bf16copy variant also writes bf16(p) (round to nearest
// even) for the bf16 compute copy of the parameters, saving a separate cast pass.
//
// Launch shape: 1-D, grid-stride, any grid; recommended block 256, grid = min(ceil(n/256),
// 8 · SMs). No shared memory. Under ZeRO-1 `n` is this rank's shard length.
//
// Numerics: IEEE division and sqrt (no fast math); FMA contraction may fuse (1−b1)·g + b1·m,
// ~1 ulp from the CPU reference.

__device__ __forceinline__ float adamw_update(float* __restrict__ param, const float* __restrict__ grad,
                                              float* __restrict__ m, float* __restrict__ v, u64 i,
                                              float lr, float b1, float b2, float eps, float wd,
                                              float bc1, float bc2, float s) {
    const float g = grad[i] * s;
    const float mi = (1.0f - b1) * g + b1 * m[i];
    const float vi = (1.0f - b2) * (g * g) + b2 * v[i];
    m[i] = mi;
    v[i] = vi;
    const float p = param[i];
    const float u = (mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p;
    const float np = p + (-lr) * u;
    param[i] = np;
    return np;
}

// adamw_f32(param, grad, m, v, n, lr, b1, b2, eps, weight_decay, bc1, bc2, grad_scale, grad_scale_dev)
extern "C" __global__ void adamw_f32(float* __restrict__ param, const float* __restrict__ grad,
                                     float* __restrict__ m, float* __restrict__ v, u64 n, float lr,
                                     float b1, float b2, float eps, float weight_decay, float bc1,
                                     float bc2, float grad_scale,
                                     const float* __restrict__ grad_scale_dev) {
    const float s = grad_scale_dev != nullptr ? *grad_scale_dev : grad_scale;
    const u64 tid = global_thread_id(), stride = grid_threads();
    for (u64 i = tid; i < n; i += stride)
        adamw_update(param, grad, m, v, i, lr, b1, b2, eps, weight_decay, bc1, bc2, s);
}

// adamw_f32_bf16copy(param, grad, m, v, param_bf16, n, lr, b1, b2, eps, weight_decay, bc1, bc2,
//                    grad_scale, grad_scale_dev): as adamw_f32, and param_bf16[i] = bf16(param[i]).
extern "C" __global__ void adamw_f32_bf16copy(float* __restrict__ param, const float* __restrict__ grad,
                                              float* __restrict__ m, float* __restrict__ v,
                                              bf16_t* __restrict__ param_bf16, u64 n, float lr,
                                              float b1, float b2, float eps, float weight_decay,
                                              float bc1, float bc2, float grad_scale,
                                              const float* __restrict__ grad_scale_dev) {
    const float s = grad_scale_dev != nullptr ? *grad_scale_dev : grad_scale;
    const u64 tid = global_thread_id(), stride = grid_threads();
    for (u64 i = tid; i < n; i += stride)
        param_bf16[i] =
            f32_to_bf16(adamw_update(param, grad, m, v, i, lr, b1, b2, eps, weight_decay, bc1, bc2, s));
}
