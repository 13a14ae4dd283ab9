// embedding.cu — token-embedding gather/scatter over the vocabulary rows one rank holds, and the
// learned-position add / its sum over the batch
// (Backend::{embedding_forward, embedding_backward, add_broadcast_rows, sum_broadcast_rows}).
//
// Vocabulary range: a rank holds table rows for ids in [vocab_start, vocab_end) (the whole
// vocabulary at tp = 1); row r of `table` is id vocab_start + r. Ids outside the range (including
// negative ones) produce zero rows forward and no gradient backward, so the vocab-parallel
// all-reduce of the outputs reassembles the full lookup.
//
// Numerics: gathers and copies are exact. embedding_backward_f32 uses f32 atomicAdd, so when an
// id repeats in the batch the order of its additions — hence the last bits of dtable — is not
// deterministic run to run. sum_broadcast_rows_f32 is deterministic and bitwise equal to the CPU
// reference (it adds the blocks into acc one at a time, in order).

// embedding_forward_f32(out, table, ids, n_ids, dim, vocab_start, vocab_end)
// out[i, :] = table[ids[i] − vocab_start, :] if ids[i] in range, else 0.
// Launch: grid (n_ids), block 128–256 (threads stride over dim).
extern "C" __global__ void embedding_forward_f32(float* __restrict__ out, const float* __restrict__ table,
                                                 const int* __restrict__ ids, int n_ids, int dim,
                                                 int vocab_start, int vocab_end) {
    const int i = blockIdx.x;
    if (i >= n_ids) return;
    const int id = ids[i];
    float* o = out + (i64)i * dim;
    if (id >= vocab_start && id < vocab_end) {
        const float* src = table + (i64)(id - vocab_start) * dim;
        for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = src[j];
    } else {
        for (int j = threadIdx.x; j < dim; j += blockDim.x) o[j] = 0.0f;
    }
}

// embedding_backward_f32(dtable, dout, ids, n_ids, dim, vocab_start, vocab_end)
// dtable[ids[i] − vocab_start, :] += dout[i, :] for ids in range (atomicAdd scatter).
// Launch: grid (n_ids), block 128–256.
extern "C" __global__ void embedding_backward_f32(float* __restrict__ dtable, const float* __restrict__ dout,
                                                  const int* __restrict__ ids, int n_ids, int dim,
                                                  int vocab_start, int vocab_end) {
    const int i = blockIdx.x;
    if (i >= n_ids) return;
    const int id = ids[i];
    if (id < vocab_start || id >= vocab_end) return;
    float* d = dtable + (i64)(id - vocab_start) * dim;
    const float* g = dout + (i64)i * dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) atomicAdd(d + j, g[j]);
}

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
