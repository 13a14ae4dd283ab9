//! Fused multi-head attention on the CPU, one (batch, head) pair per rayon task.
//!
//! Forward: S = QKᵀ/√d, masked softmax P, O = PV; only O and the row log-sum-exp are kept.
//! Backward recomputes P from the log-sum-exp (as FlashAttention does), so no `[T, T]` tensor
//! outlives one task: dP = dO·Vᵀ, dS = P∘(dP − rowsum(dO∘O)), dQ = dS·K/√d, dK = dSᵀ·Q/√d,
//! dV = Pᵀ·dO. Heads are column slices of the `[batch, len, heads·head_dim]` activations and
//! are addressed through strides, never copied.

use crate::backend::AttentionShape;
use crate::ops::math::{exp, exp_shifted_in_place, max};
use crate::ops::matmul::cpu::{gemm_strided, View};
use rayon::prelude::*;

thread_local! {
    /// Per-thread `[q_len, kv_len]` score buffers, reused across tasks and calls: fresh
    /// allocations of this size would be page-faulted in on every (batch, head) task.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with two scratch slices of `len` elements from this thread's pool.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (a, b) = &mut *guard;
        if a.len() < len {
            a.resize(len, 0.0);
            b.resize(len, 0.0);
        }
        f(&mut a[..len], &mut b[..len])
    })
}

/// Raw base pointer shared by tasks that write disjoint (batch, head) slices.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: tasks write disjoint regions only (each owns one (batch, head) pair); see callers.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    /// Through a method, so closures capture the wrapper (Sync), not the raw field.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

#[derive(Clone, Copy)]
struct SharedConst(*const f32);
// SAFETY: read-only access from every task.
unsafe impl Send for SharedConst {}
unsafe impl Sync for SharedConst {}
impl SharedConst {
    fn at(self, offset: usize) -> *const f32 {
        self.0.wrapping_add(offset)
    }
}

pub struct Inputs<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub mask: Option<&'a [i32]>,
}

pub struct Grads<'a> {
    pub dq: &'a mut [f32],
    pub dk: &'a mut [f32],
    pub dv: &'a mut [f32],
}

/// Which keys query row `i` of batch `b` may see.
struct Visibility<'a> {
    mask: Option<&'a [i32]>,
    causal: bool,
    kv_len: usize,
}

impl Visibility<'_> {
    #[inline]
    fn visible(&self, b: usize, i: usize, j: usize) -> bool {
        (!self.causal || j <= i) && self.mask.is_none_or(|m| m[b * self.kv_len + j] != 0)
    }
    /// Number of keys a row may see at most (causal rows stop at the diagonal).
    #[inline]
    fn span(&self, i: usize) -> usize {
        if self.causal {
            i + 1
        } else {
            self.kv_len
        }
    }
}

/// Computes the scaled scores of one (b, h) into `s` (`[q_len, kv_len]`).
///
/// # Safety
/// `q`, `k` must address buffers of the shapes in `sh`.
unsafe fn scores(s: &mut [f32], q: *const f32, k: *const f32, b: usize, h: usize, sh: &AttentionShape) {
    let w = sh.width() as isize;
    let hd = sh.head_dim;
    let q0 = q.wrapping_add(b * sh.q_len * sh.width() + h * hd);
    let k0 = k.wrapping_add(b * sh.kv_len * sh.width() + h * hd);
    let alpha = 1.0 / (hd as f32).sqrt();
    // SAFETY: the views stay inside the (b, h) slices of q and k; `s` is a separate buffer.
    unsafe {
        gemm_strided(
            sh.q_len,
            sh.kv_len,
            hd,
            s.as_mut_ptr(),
            sh.kv_len as isize,
            1,
            false,
            View { ptr: q0, rs: w, cs: 1 },
            View { ptr: k0, rs: 1, cs: w }, // Kᵀ: (d, j) at j·w + d
            alpha,
        )
    }
}

/// Turns the scores of one (b, h) into probabilities in place; returns row log-sum-exps via `lse`.
fn softmax_rows(s: &mut [f32], lse: &mut [f32], b: usize, vis: &Visibility, kv_len: usize) {
    for (i, row) in s.chunks_mut(kv_len).enumerate() {
        let mut any = false;
        for (j, x) in row.iter_mut().enumerate() {
            if vis.visible(b, i, j) {
                any = true;
            } else {
                *x = f32::NEG_INFINITY;
            }
        }
        if !any {
            // Every key masked: JAX's finite mask bias makes all scores equal, i.e. uniform.
            row.fill(1.0 / kv_len as f32);
            lse[i] = f32::NAN; // marks the row as uniform for the backward
            continue;
        }
        let span = vis.span(i);
        let m = max(&row[..span]);
        let sum = exp_shifted_in_place(&mut row[..span], m);
        row[span..].fill(0.0);
        let inv = 1.0 / sum;
        row[..span].iter_mut().for_each(|p| *p *= inv);
        lse[i] = m + sum.ln();
    }
}

pub fn forward(
    out: &mut [f32],
    lse: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<&[i32]>,
    sh: AttentionShape,
) {
    let vis = Visibility { mask, causal: sh.causal, kv_len: sh.kv_len };
    let (qp, kp, vp) = (SharedConst(q.as_ptr()), SharedConst(k.as_ptr()), SharedConst(v.as_ptr()));
    let op = SharedMut(out.as_mut_ptr());
    let w = sh.width() as isize;
    lse.par_chunks_mut(sh.q_len).enumerate().for_each(|(bh, lse)| {
        let (b, h) = (bh / sh.heads, bh % sh.heads);
        with_scratch(sh.q_len * sh.kv_len, |s, _| {
            // SAFETY: q, k, v, out have the lengths checked by the backend for `sh`; this task writes
            // only the (b, h) column slice of `out`, which no other task touches.
            unsafe {
                scores(s, qp.at(0), kp.at(0), b, h, &sh);
                softmax_rows(s, lse, b, &vis, sh.kv_len);
                let v0 = vp.at(b * sh.kv_len * sh.width() + h * sh.head_dim);
                let o0 = op.at(b * sh.q_len * sh.width() + h * sh.head_dim);
                gemm_strided(
                    sh.q_len,
                    sh.head_dim,
                    sh.kv_len,
                    o0,
                    w,
                    1,
                    false,
                    View { ptr: s.as_ptr(), rs: sh.kv_len as isize, cs: 1 },
                    View { ptr: v0, rs: w, cs: 1 },
                    1.0,
                );
            }
        })
    });
}

pub fn backward(g: Grads, dout: &[f32], x: Inputs, out: &[f32], lse: &[f32], sh: AttentionShape) {
    let vis = Visibility { mask: x.mask, causal: sh.causal, kv_len: sh.kv_len };
    let (qp, kp, vp) = (SharedConst(x.q.as_ptr()), SharedConst(x.k.as_ptr()), SharedConst(x.v.as_ptr()));
    let (dop, outp) = (SharedConst(dout.as_ptr()), SharedConst(out.as_ptr()));
    let (dqp, dkp, dvp) = (SharedMut(g.dq.as_mut_ptr()), SharedMut(g.dk.as_mut_ptr()), SharedMut(g.dv.as_mut_ptr()));
    let w = sh.width();
    let ws = w as isize;
    let (tq, tk, hd) = (sh.q_len, sh.kv_len, sh.head_dim);
    let alpha = 1.0 / (hd as f32).sqrt();
    lse.par_chunks(tq).enumerate().for_each(|(bh, lse)| {
        let (b, h) = (bh / sh.heads, bh % sh.heads);
        let q_off = b * tq * w + h * hd;
        let k_off = b * tk * w + h * hd;
        with_scratch(tq * tk, |p, dp| {
            // SAFETY: all pointers address buffers whose lengths the backend checked against `sh`;
            // this task reads shared inputs and writes only the (b, h) slices of dq, dk, dv.
            unsafe {
                // Recompute P from the saved log-sum-exp.
                scores(p, qp.at(0), kp.at(0), b, h, &sh);
                for i in 0..tq {
                    let row = &mut p[i * tk..(i + 1) * tk];
                    if lse[i].is_nan() {
                        row.fill(1.0 / tk as f32);
                        continue;
                    }
                    for (j, s) in row.iter_mut().enumerate() {
                        *s = if vis.visible(b, i, j) { exp(*s - lse[i]) } else { 0.0 };
                    }
                }
                // dP = dO · Vᵀ
                gemm_strided(
                    tq,
                    tk,
                    hd,
                    dp.as_mut_ptr(),
                    tk as isize,
                    1,
                    false,
                    View { ptr: dop.at(q_off), rs: ws, cs: 1 },
                    View { ptr: vp.at(k_off), rs: 1, cs: ws },
                    1.0,
                );
                // dS = P ∘ (dP − D), D_i = Σ_d dO[i, d]·O[i, d]
                for i in 0..tq {
                    let base = q_off + i * w;
                    let mut d = 0.0f32;
                    for c in 0..hd {
                        d += *dop.at(base + c) * *outp.at(base + c);
                    }
                    for j in 0..tk {
                        let idx = i * tk + j;
                        dp[idx] = p[idx] * (dp[idx] - d);
                    }
                }
                // dQ = dS · K / √d
                gemm_strided(
                    tq,
                    hd,
                    tk,
                    dqp.at(q_off),
                    ws,
                    1,
                    false,
                    View { ptr: dp.as_ptr(), rs: tk as isize, cs: 1 },
                    View { ptr: kp.at(k_off), rs: ws, cs: 1 },
                    alpha,
                );
                // dK = dSᵀ · Q / √d
                gemm_strided(
                    tk,
                    hd,
                    tq,
                    dkp.at(k_off),
                    ws,
                    1,
                    false,
                    View { ptr: dp.as_ptr(), rs: 1, cs: tk as isize },
                    View { ptr: qp.at(q_off), rs: ws, cs: 1 },
                    alpha,
                );
                // dV = Pᵀ · dO
                gemm_strided(
                    tk,
                    hd,
                    tq,
                    dvp.at(k_off),
                    ws,
                    1,
                    false,
                    View { ptr: p.as_ptr(), rs: 1, cs: tk as isize },
                    View { ptr: dop.at(q_off), rs: ws, cs: 1 },
                    1.0,
                );
            }
        })
    });
}
