// embedding.cu — token-embedding gather/scatter over the vocabulary rows one rank holds
// (Backend::{embedding_forward, embedding_backward}).
//
// Vocabulary range: a rank holds table rows for ids in [vocab_start, vocab_end) (the whole
// vocabulary at tp = 1); row r of `table` is id vocab_start + r. Ids outside the range (including
// negative ones) produce zero rows forward and no gradient backward, so the vocab-parallel
// all-reduce of the outputs reassembles the full lookup.
//
// Numerics: gathers and copies are exact. embedding_backward_f32 uses f32 atomicAdd, so when an
// id repeats in the batch the order of its additions — hence the last bits of dtable — is not
// deterministic run to run.

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
