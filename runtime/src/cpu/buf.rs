//! The CPU backend's device buffer: f32 elements, or bf16 elements stored with the `half` crate.
//!
//! Ops never see the element type: they read a buffer through [`CpuBuf::values`] (the f32 data
//! itself, or the bf16 data widened exactly to f32) and write through [`CpuBuf::values_mut`] (the
//! f32 data itself, or a widened copy that is rounded back, nearest even, when the guard drops).
//! So an f32 buffer costs nothing extra and computes bit for bit as before, and every op on bf16
//! buffers computes in f32 and rounds its bf16 outputs once, as XLA does on the CPU.

use crate::dtype::DType;
use crate::memory::Reservation;
use half::bf16;
use half::slice::HalfFloatSliceExt;
use std::borrow::Cow;
use std::ops::{Deref, DerefMut};

#[derive(Debug)]
enum Data {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A buffer in host memory, registered with the device's memory tracker.
#[derive(Debug)]
pub struct CpuBuf {
    data: Data,
    _reservation: Reservation,
}

impl CpuBuf {
    pub(crate) fn zeros(len: usize, dtype: DType, reservation: Reservation) -> Self {
        let data = match dtype {
            DType::F32 => Data::F32(vec![0.0; len]),
            DType::Bf16 => Data::Bf16(vec![bf16::ZERO; len]),
        };
        Self { data, _reservation: reservation }
    }
    pub(crate) fn from_f32(data: Vec<f32>, reservation: Reservation) -> Self {
        Self { data: Data::F32(data), _reservation: reservation }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(v) => v.len(),
            Data::Bf16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::Bf16(_) => DType::Bf16,
        }
    }

    /// The elements as f32: borrowed for an f32 buffer, widened (exactly) for bf16.
    pub fn values(&self) -> Cow<'_, [f32]> {
        match &self.data {
            Data::F32(v) => Cow::Borrowed(v),
            Data::Bf16(v) => {
                let mut wide = vec![0.0; v.len()];
                v.convert_to_f32_slice(&mut wide);
                Cow::Owned(wide)
            }
        }
    }

    /// The elements as writable f32: the buffer itself for f32; for bf16 a widened copy that is
    /// rounded (nearest even) into the buffer when the guard drops.
    pub fn values_mut(&mut self) -> ValuesMut<'_> {
        match &mut self.data {
            Data::F32(v) => ValuesMut::F32(v),
            Data::Bf16(v) => {
                let mut wide = vec![0.0; v.len()];
                v.convert_to_f32_slice(&mut wide);
                ValuesMut::Bf16 { dst: v, wide }
            }
        }
    }

    /// The f32 elements of an f32 buffer.
    ///
    /// # Panics
    /// On a bf16 buffer: callers that may meet one read [`CpuBuf::values`] instead.
    pub fn as_slice(&self) -> &[f32] {
        match &self.data {
            Data::F32(v) => v,
            Data::Bf16(_) => panic!("CpuBuf::as_slice on a bf16 buffer: read it with values()"),
        }
    }
    /// The f32 elements of an f32 buffer, writable.
    ///
    /// # Panics
    /// On a bf16 buffer: callers that may meet one write through [`CpuBuf::values_mut`] instead.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match &mut self.data {
            Data::F32(v) => v,
            Data::Bf16(_) => panic!("CpuBuf::as_mut_slice on a bf16 buffer: write it with values_mut()"),
        }
    }
}

/// Writable f32 elements of a [`CpuBuf`] (see [`CpuBuf::values_mut`]).
pub enum ValuesMut<'a> {
    F32(&'a mut [f32]),
    Bf16 { dst: &'a mut [bf16], wide: Vec<f32> },
}

impl Deref for ValuesMut<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            ValuesMut::F32(v) => v,
            ValuesMut::Bf16 { wide, .. } => wide,
        }
    }
}

impl DerefMut for ValuesMut<'_> {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            ValuesMut::F32(v) => v,
            ValuesMut::Bf16 { wide, .. } => wide,
        }
    }
}

impl Drop for ValuesMut<'_> {
    fn drop(&mut self) {
        if let ValuesMut::Bf16 { dst, wide } = self {
            dst.convert_from_f32_slice(wide);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryTracker;

    #[test]
    fn bf16_rounds_to_nearest_even_and_widens_exactly() {
        let t = MemoryTracker::new("cpu", None);
        let mut b = CpuBuf::zeros(4, DType::Bf16, t.reserve("b", 8).unwrap());
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: ties go to 1 + 2^-6.
        let x = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -0.1, 3.0];
        b.values_mut().copy_from_slice(&x);
        let got = b.values();
        assert_eq!(got[0], 1.0);
        assert_eq!(got[1], 1.0 + 2f32.powi(-6));
        assert!((got[2] + 0.1).abs() <= 0.1 * 2f32.powi(-9) && got[2] != -0.1);
        assert_eq!(got[3], 3.0);
        assert_eq!(b.dtype(), DType::Bf16);
    }
}
