//! GELU-GLU, the gated feed-forward activation of DalleBart: `out = gelu(a) · b` with the exact
//! (erf) GELU. [`Forward`] overwrites `out`; [`Backward`] overwrites `da`, `db`. All buffers are
//! `n` long. CPU: [`cpu`]; CUDA: `glu.cu` (grid-stride, one element a thread).

pub mod cpu;
pub(crate) mod cuda;
pub mod kernels;

use crate::error::Result;
use crate::ops::checks::check_len;
use crate::ops::Storage;

/// [`crate::Backend::gelu_glu_forward`].
pub struct Forward<'a, T> {
    pub out: &'a mut T,
    pub a: &'a T,
    pub b: &'a T,
}

/// [`crate::Backend::gelu_glu_backward`].
pub struct Backward<'a, T> {
    pub da: &'a mut T,
    pub db: &'a mut T,
    pub dout: &'a T,
    pub a: &'a T,
    pub b: &'a T,
}

impl<T: Storage> Forward<'_, T> {
    pub fn check(&self) -> Result<()> {
        let n = self.out.elems();
        check_len("gelu_glu_forward", "a", self.a.elems(), n)?;
        check_len("gelu_glu_forward", "b", self.b.elems(), n)
    }
}

impl<T: Storage> Backward<'_, T> {
    pub fn check(&self) -> Result<()> {
        let n = self.dout.elems();
        for (what, len) in
            [("da", self.da.elems()), ("db", self.db.elems()), ("a", self.a.elems()), ("b", self.b.elems())]
        {
            check_len("gelu_glu_backward", what, len, n)?;
        }
        Ok(())
    }
}
