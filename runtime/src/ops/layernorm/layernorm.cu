// layernorm.cu — LayerNorm over the last dimension, eps 1e-5, biased variance
// (Backend::layernorm_forward / layernorm_backward, and the tensor-parallel form whose row
// statistics are summed across ranks: the GLU middle LN over the sharded ffn dimension).
//
//   forward:  x̂ = (x − mean)·rstd,  rstd = 1/√(var + 1e-5),  out = x̂·scale + bias
//   backward: ŷ = dy·scale (dy when no scale),  dbias += Σ_rows dy,  dscale += Σ_rows dy·x̂,
//             dx (= | +=) rstd · (ŷ − mean(ŷ) − x̂ · mean(ŷ·x̂))
//
// `scale` may be null everywhere: dalle-mini's bias-only LayerNorm (then dscale is not touched).
//
// Single-device form:
//   layernorm_forward_f32            one warp per row, two-pass statistics (mean, then Σ(x−mean)²)
//   layernorm_backward_f32           one block per chunk of rows, threads over columns; writes
//                                    dx and per-block partial (dscale, dbias) rows
//   layernorm_param_grads_f32        sums the partials (fixed order) into dscale/dbias (+=)
//
// Sharded-statistics form (each tp rank holds `dim` of the row's `dim_global` columns):
//   forward:  layernorm_sharded_sums_f32(center = null) → all-reduce SUM → layernorm_sharded_stats_f32
//             [exact two-pass variant: then layernorm_sharded_sums_f32(center = mean) → all-reduce →
//              layernorm_sharded_stats_f32(center = mean) again] → layernorm_apply_f32
//   backward: layernorm_backward_sums_f32 → all-reduce SUM → layernorm_backward_f32(row_sums = the
//             reduced sums, dim_global) → layernorm_param_grads_f32
//
// Numerics: f32 throughout, deterministic (fixed reduction trees, no atomics). The single-device
// forward matches the CPU reference's two-pass statistics; rstd = 1/sqrtf(var + eps) with IEEE
// division and sqrt, as the CPU computes it. The one-pass sharded statistics (var = E[x²] − mean²)
// lose accuracy when |mean| >> std; the two-pass variant (centred at the first-pass mean) does not.

#define LN_EPS 1e-5f
// LN_CPT (a -D define from runtime/src/ops/layernorm/kernels.rs): columns each thread of
// layernorm_backward_f32 keeps in registers, dim <= blockDim.x · LN_CPT.

// layernorm_forward_f32(out, mean, rstd, x, scale, bias, rows, dim)
// Launch: block 256 (8 warps = 8 rows), grid ceil(rows / 8); any multiple of 32 works
// (rows per block = blockDim.x / 32).
extern "C" __global__ void layernorm_forward_f32(float* __restrict__ out, float* __restrict__ mean,
                                                 float* __restrict__ rstd, const float* __restrict__ x,
                                                 const float* __restrict__ scale,
                                                 const float* __restrict__ bias, int rows, int dim) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float* xr = x + (i64)row * dim;
    float s = 0.0f;
    for (int j = lane; j < dim; j += 32) s += xr[j];
    const float mu = warp_sum(s) / (float)dim;
    float q = 0.0f;
    for (int j = lane; j < dim; j += 32) {
        const float d = xr[j] - mu;
        q += d * d;
    }
    const float var = warp_sum(q) / (float)dim;
    const float rs = 1.0f / sqrtf(var + LN_EPS);
    if (lane == 0) {
        mean[row] = mu;
        rstd[row] = rs;
    }
    float* o = out + (i64)row * dim;
    if (scale != nullptr) {
        for (int j = lane; j < dim; j += 32) o[j] = (xr[j] - mu) * rs * scale[j] + bias[j];
    } else {
        for (int j = lane; j < dim; j += 32) o[j] = (xr[j] - mu) * rs + bias[j];
    }
}

// layernorm_backward_f32(dx, partials, dout, x, mean, rstd, scale, row_sums, rows, dim, dim_global,
//                        accumulate_dx)
// Block b handles rows [b·R, min(rows, (b+1)·R)), R = ceil(rows / gridDim.x); thread t owns
// columns t, t + blockDim.x, … (at most LN_CPT of them: REQUIRES dim <= blockDim.x · LN_CPT, else
// the kernel traps). Per row: loads dy and x̂ into registers, reduces (Σŷ, Σŷ·x̂) over the block
// — or, when `row_sums` is not null, takes them from row_sums[2r], row_sums[2r+1] (the
// all-reduced sums of the sharded form; they must cover `dim_global` columns) — then writes dx.
// dscale/dbias partials accumulate in registers over the block's rows and are written to
// partials[(b·2 + 0)·dim + j] (dscale) and partials[(b·2 + 1)·dim + j] (dbias): `partials` holds
// gridDim.x · 2 · dim floats, every entry written (zeros for blocks without rows).
// Launch: block = min(1024, max(64, round_up(ceil(dim / LN_CPT), 32))) — e.g. 256 for dim <= 4096 —
// grid ≈ 2 · SMs (fewer partial rows to reduce; more rows per block). Static smem 256 B.
extern "C" __global__ void layernorm_backward_f32(float* __restrict__ dx, float* __restrict__ partials,
                                                  const float* __restrict__ dout,
                                                  const float* __restrict__ x,
                                                  const float* __restrict__ mean,
                                                  const float* __restrict__ rstd,
                                                  const float* __restrict__ scale,
                                                  const float* __restrict__ row_sums, int rows,
                                                  int dim, int dim_global, int accumulate_dx) {
    __shared__ float2 scratch[32];
    if (dim > (int)blockDim.x * LN_CPT) __trap();
    const int rows_per_block = (rows + gridDim.x - 1) / gridDim.x;
    const int r0 = blockIdx.x * rows_per_block;
    const int r1 = min(rows, r0 + rows_per_block);
    const float inv_n = 1.0f / (float)dim_global;

    float ds[LN_CPT], db[LN_CPT], sc[LN_CPT];
#pragma unroll
    for (int c = 0; c < LN_CPT; ++c) {
        const int j = threadIdx.x + c * blockDim.x;
        ds[c] = 0.0f;
        db[c] = 0.0f;
        sc[c] = (scale != nullptr && j < dim) ? scale[j] : 1.0f;
    }

    for (int r = r0; r < r1; ++r) {
        const float mu = mean[r], rs = rstd[r];
        const float* g = dout + (i64)r * dim;
        const float* xr = x + (i64)r * dim;
        float dyh[LN_CPT], xh[LN_CPT];
        float s1 = 0.0f, s2 = 0.0f;
#pragma unroll
        for (int c = 0; c < LN_CPT; ++c) {
            const int j = threadIdx.x + c * blockDim.x;
            dyh[c] = 0.0f;
            xh[c] = 0.0f;
            if (j < dim) {
                const float gj = g[j];
                xh[c] = (xr[j] - mu) * rs;
                db[c] += gj;
                ds[c] += gj * xh[c];
                dyh[c] = gj * sc[c];
                s1 += dyh[c];
                s2 += dyh[c] * xh[c];
            }
        }
        if (row_sums != nullptr) {
            s1 = row_sums[2 * (i64)r];
            s2 = row_sums[2 * (i64)r + 1];
        } else {
            const float2 s = block_sum2(s1, s2, scratch);
            s1 = s.x;
            s2 = s.y;
        }
        const float mean_dy = s1 * inv_n, mean_dy_xh = s2 * inv_n;
        float* d = dx + (i64)r * dim;
#pragma unroll
        for (int c = 0; c < LN_CPT; ++c) {
            const int j = threadIdx.x + c * blockDim.x;
            if (j < dim) {
                const float v = rs * (dyh[c] - mean_dy - xh[c] * mean_dy_xh);
                d[j] = accumulate_dx ? d[j] + v : v;
            }
        }
    }
    float* p = partials + (i64)blockIdx.x * 2 * dim;
#pragma unroll
    for (int c = 0; c < LN_CPT; ++c) {
        const int j = threadIdx.x + c * blockDim.x;
        if (j < dim) {
            p[j] = ds[c];
            p[dim + j] = db[c];
        }
    }
}

// layernorm_param_grads_f32(dscale, dbias, partials, n_parts, dim)
// dscale[j] += Σ_p partials[(p·2)·dim + j] (skipped when dscale is null);
// dbias[j]  += Σ_p partials[(p·2 + 1)·dim + j]; p in order 0..n_parts.
// Launch: grid ceil(dim / 256), block 256.
extern "C" __global__ void layernorm_param_grads_f32(float* __restrict__ dscale, float* __restrict__ dbias,
                                                     const float* __restrict__ partials, int n_parts,
                                                     int dim) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= dim) return;
    float s = 0.0f, b = 0.0f;
    for (int p = 0; p < n_parts; ++p) {
        s += partials[(i64)p * 2 * dim + j];
        b += partials[(i64)p * 2 * dim + dim + j];
    }
    if (dscale != nullptr) dscale[j] += s;
    dbias[j] += b;
}

// layernorm_sharded_sums_f32(x, center, sums, rows, dim)
// sums[2r] = Σ_j (x[r,j] − c_r), sums[2r+1] = Σ_j (x[r,j] − c_r)² over this rank's `dim` columns,
// c_r = center[r], or 0 when center is null.
// Launch: block 256 (8 rows), grid ceil(rows / 8).
extern "C" __global__ void layernorm_sharded_sums_f32(const float* __restrict__ x,
                                                      const float* __restrict__ center,
                                                      float* __restrict__ sums, int rows, int dim) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float c = center != nullptr ? center[row] : 0.0f;
    const float* xr = x + (i64)row * dim;
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = lane; j < dim; j += 32) {
        const float d = xr[j] - c;
        s1 += d;
        s2 += d * d;
    }
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    if (lane == 0) {
        sums[2 * (i64)row] = s1;
        sums[2 * (i64)row + 1] = s2;
    }
}

// layernorm_sharded_stats_f32(sums, center, mean, rstd, rows, dim_global)
// From all-reduced sums (about centre c, or 0 when center is null):
// mean = c + S1/n, var = max(S2/n − (S1/n)², 0), rstd = 1/√(var + 1e-5). `mean` may alias
// `center` (each thread reads its row's centre before writing).
// Launch: grid ceil(rows / 256), block 256.
extern "C" __global__ void layernorm_sharded_stats_f32(const float* __restrict__ sums, const float* center,
                                                       float* mean, float* __restrict__ rstd,
                                                       int rows, int dim_global) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float inv_n = 1.0f / (float)dim_global;
    const float c = center != nullptr ? center[r] : 0.0f;
    const float m1 = sums[2 * (i64)r] * inv_n;
    const float var = fmaxf(sums[2 * (i64)r + 1] * inv_n - m1 * m1, 0.0f);
    mean[r] = c + m1;
    rstd[r] = 1.0f / sqrtf(var + LN_EPS);
}

// layernorm_apply_f32(out, x, mean, rstd, scale, bias, rows, dim)
// out = (x − mean)·rstd·scale + bias over this rank's columns (scale, bias: its slices).
// Launch: block 256 (8 rows), grid ceil(rows / 8).
extern "C" __global__ void layernorm_apply_f32(float* __restrict__ out, const float* __restrict__ x,
                                               const float* __restrict__ mean,
                                               const float* __restrict__ rstd,
                                               const float* __restrict__ scale,
                                               const float* __restrict__ bias, int rows, int dim) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float mu = mean[row], rs = rstd[row];
    const float* xr = x + (i64)row * dim;
    float* o = out + (i64)row * dim;
    if (scale != nullptr) {
        for (int j = lane; j < dim; j += 32) o[j] = (xr[j] - mu) * rs * scale[j] + bias[j];
    } else {
        for (int j = lane; j < dim; j += 32) o[j] = (xr[j] - mu) * rs + bias[j];
    }
}

// layernorm_backward_sums_f32(dout, x, mean, rstd, scale, sums, rows, dim)
// sums[2r] = Σ_j ŷ, sums[2r+1] = Σ_j ŷ·x̂ over this rank's columns (ŷ = dy·scale, or dy).
// Launch: block 256 (8 rows), grid ceil(rows / 8).
extern "C" __global__ void layernorm_backward_sums_f32(const float* __restrict__ dout,
                                                       const float* __restrict__ x,
                                                       const float* __restrict__ mean,
                                                       const float* __restrict__ rstd,
                                                       const float* __restrict__ scale,
                                                       float* __restrict__ sums, int rows, int dim) {
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float mu = mean[row], rs = rstd[row];
    const float* g = dout + (i64)row * dim;
    const float* xr = x + (i64)row * dim;
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = lane; j < dim; j += 32) {
        const float dyh = scale != nullptr ? g[j] * scale[j] : g[j];
        s1 += dyh;
        s2 += dyh * ((xr[j] - mu) * rs);
    }
    s1 = warp_sum(s1);
    s2 = warp_sum(s2);
    if (lane == 0) {
        sums[2 * (i64)row] = s1;
        sums[2 * (i64)row + 1] = s2;
    }
}
