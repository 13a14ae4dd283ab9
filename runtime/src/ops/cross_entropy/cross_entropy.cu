// cross_entropy.cu — softmax cross-entropy over the image vocabulary, forward and backward fused,
// in two forms (Backend::cross_entropy_fused and the vocab-parallel loss of parallel/src/layers.rs):
//
//   loss[r]      = logsumexp(x[r, :valid]) − x[r, t_r]
//   x[r, j]     <- grad_scale · (softmax(x[r, :valid])_j − [j == t_r])   for j < valid
//   x[r, j]     <- 0                                                     for valid <= j < ld
//
// Layout: logits are row-major with row stride `ld` (>= the number of valid columns). Columns at
// or beyond `valid_cols` are padding (a vocabulary padded to a multiple of tp, or of 8 for the
// GEMM): they are never read for the max or the sum and their "gradient" is written as 0, so
// padding can neither win the softmax nor receive gradient.
//
// Launch shape (every kernel): grid (rows), one block per row, block = a multiple of 32 up to
// 1024 (recommended 512 for ~16k classes: 32 columns per thread). Static shared memory 128 B.
// Rows are read up to three times (max, sum, gradient); a 64 KiB row stays in L1/L2 between
// passes, so DRAM sees about one read and one write of the logits.
//
// Numerics: max-shifted exponentials e_j = expf(x_j − max) (accurate expf, no fast math), f32 sums
// over a fixed per-thread + tree order (deterministic), logf; the gradient is e_j · (grad_scale /
// sum) − grad_scale·[j == t], the same expression as the CPU reference. A target outside
// [0, valid_cols) (fused form) yields loss NaN and no one-hot term, so a bad label is visible.

// cross_entropy_fused_f32(logits, losses, targets, rows, valid_cols, ld, grad_scale)
extern "C" __global__ void cross_entropy_fused_f32(float* __restrict__ logits, float* __restrict__ losses,
                                                   const int* __restrict__ targets, int rows,
                                                   int valid_cols, int ld, float grad_scale) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    float* x = logits + (i64)r * ld;
    const int t = targets[r];
    const bool t_ok = t >= 0 && t < valid_cols;
    const float target_logit = t_ok ? x[t] : DM_NAN;  // read before any thread overwrites x

    float m = DM_NEG_INF;
    for (int j = threadIdx.x; j < valid_cols; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m, scratch);

    float s = 0.0f;
    for (int j = threadIdx.x; j < valid_cols; j += blockDim.x) s += expf(x[j] - m);
    s = block_sum(s, scratch);  // its barriers also order the target read above before the writes

    const float k = grad_scale / s;
    for (int j = threadIdx.x; j < ld; j += blockDim.x) {
        float g = 0.0f;
        if (j < valid_cols) {
            g = expf(x[j] - m) * k;
            if (j == t) g -= grad_scale;
        }
        x[j] = g;
    }
    if (threadIdx.x == 0) losses[r] = m + logf(s) - target_logit;
}

// ---- vocab-parallel form: the logits of row r are split by columns across tp ranks; this rank
// holds global columns [vocab_start, vocab_start + valid_cols) as local columns [0, valid_cols).
// Step 1 (local max) -> all-reduce MAX -> step 2 (local sum-exp and target logit) -> all-reduce
// SUM of both -> step 3 (gradient, loss). A rank may hold no valid column (valid_cols = 0): its
// max is −inf and its sums 0, which the all-reduces absorb.

// vocab_parallel_max_f32(logits, row_max, rows, valid_cols, ld): row_max[r] = max_j<valid x[r, j].
extern "C" __global__ void vocab_parallel_max_f32(const float* __restrict__ logits, float* __restrict__ row_max,
                                                  int rows, int valid_cols, int ld) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (i64)r * ld;
    float m = DM_NEG_INF;
    for (int j = threadIdx.x; j < valid_cols; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m, scratch);
    if (threadIdx.x == 0) row_max[r] = m;
}

// vocab_parallel_sumexp_f32(logits, global_max, sum_exp, target_logit, targets, rows, valid_cols,
//                           ld, vocab_start)
// sum_exp[r] = Σ_j<valid expf(x[r, j] − global_max[r]);
// target_logit[r] = x[r, targets[r] − vocab_start] if the target is one of this rank's valid
// columns, else 0 (so the SUM all-reduce yields the target logit on every rank).
extern "C" __global__ void vocab_parallel_sumexp_f32(const float* __restrict__ logits,
                                                     const float* __restrict__ global_max,
                                                     float* __restrict__ sum_exp,
                                                     float* __restrict__ target_logit,
                                                     const int* __restrict__ targets, int rows,
                                                     int valid_cols, int ld, int vocab_start) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= rows) return;
    const float* x = logits + (i64)r * ld;
    const float m = global_max[r];
    float s = 0.0f;
    for (int j = threadIdx.x; j < valid_cols; j += blockDim.x) s += expf(x[j] - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        sum_exp[r] = s;
        const int local = targets[r] - vocab_start;
        target_logit[r] = (local >= 0 && local < valid_cols) ? x[local] : 0.0f;
    }
}

// vocab_parallel_grad_f32(logits, losses, global_max, global_sum, global_target_logit, targets,
//                         rows, valid_cols, ld, vocab_start, grad_scale)
// x[r, j] <- grad_scale · (expf(x − global_max) / global_sum − [j + vocab_start == t]) for
// j < valid_cols, 0 for padding. If `losses` is not null, losses[r] = global_max + logf(global_sum)
// − global_target_logit (then `global_target_logit` must be valid; it may be null otherwise).
extern "C" __global__ void vocab_parallel_grad_f32(float* __restrict__ logits, float* __restrict__ losses,
                                                   const float* __restrict__ global_max,
                                                   const float* __restrict__ global_sum,
                                                   const float* __restrict__ global_target_logit,
                                                   const int* __restrict__ targets, int rows,
                                                   int valid_cols, int ld, int vocab_start,
                                                   float grad_scale) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    float* x = logits + (i64)r * ld;
    const float m = global_max[r];
    const float s = global_sum[r];
    const float k = grad_scale / s;
    const int local_t = targets[r] - vocab_start;
    for (int j = threadIdx.x; j < ld; j += blockDim.x) {
        float g = 0.0f;
        if (j < valid_cols) {
            g = expf(x[j] - m) * k;
            if (j == local_t) g -= grad_scale;
        }
        x[j] = g;
    }
    if (losses != nullptr && threadIdx.x == 0) losses[r] = m + logf(s) - global_target_logit[r];
}
