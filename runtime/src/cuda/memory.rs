//! Device buffers of the CUDA backend. Every allocation is registered with the device's
//! [`MemoryTracker`] first (so a budget refusal names the tensor and allocates nothing), then
//! made with cudarc's stream-ordered allocator on the backend's compute stream.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use super::device::driver_err;
use crate::dtype::DType;
use crate::error::Result;
use crate::memory::{MemoryTracker, Reservation};

/// `len` elements in device memory: f32, or bf16 ([`DType::Bf16`], raw 16-bit patterns as
/// `half::bf16` stores them) for bf16-mixed activations and weight copies.
///
/// A zero-length buffer still owns a one-element allocation (CUDA refuses 0-byte allocations);
/// [`CudaBuf::len`] is the logical length and the tracker is charged `len ·` [`DType::bytes`].
#[derive(Debug)]
pub struct CudaBuf {
    pub(crate) data: DeviceData,
    pub(crate) len: usize,
    _reservation: Reservation,
}

/// The allocation of a [`CudaBuf`], by element type.
#[derive(Debug)]
pub(crate) enum DeviceData {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// `len` i32 elements (token ids, masks) in device memory, with a host copy: ids are few, and
/// the copy lets ops validate them (e.g. cross-entropy targets) without a device round trip.
#[derive(Debug)]
pub struct CudaIds {
    pub(crate) data: CudaSlice<i32>,
    pub(crate) host: Vec<i32>,
    _reservation: Reservation,
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.data {
            DeviceData::F32(_) => DType::F32,
            DeviceData::Bf16(_) => DType::Bf16,
        }
    }
    /// The underlying cudarc allocation of an f32 buffer (at least `max(len, 1)` elements).
    /// `None` for a bf16 buffer (its callers use [`CudaBuf::device_ptr`] and [`CudaBuf::dtype`]).
    pub fn slice(&self) -> Option<&CudaSlice<f32>> {
        match &self.data {
            DeviceData::F32(s) => Some(s),
            DeviceData::Bf16(_) => None,
        }
    }
    /// Mutable access to an f32 allocation, e.g. for NCCL or custom kernel calls.
    /// `None` for a bf16 buffer, as [`CudaBuf::slice`].
    pub fn slice_mut(&mut self) -> Option<&mut CudaSlice<f32>> {
        match &mut self.data {
            DeviceData::F32(s) => Some(s),
            DeviceData::Bf16(_) => None,
        }
    }
    /// The raw device address (`CUdeviceptr`) of element 0 (f32 or bf16 elements: [`CudaBuf::dtype`]).
    pub fn device_ptr(&self) -> u64 {
        match &self.data {
            DeviceData::F32(s) => raw_ptr(s),
            DeviceData::Bf16(s) => raw_ptr(s),
        }
    }
    /// The device address of element `i` (`i ≤ len`), by the buffer's element size.
    pub(crate) fn elem_ptr(&self, i: usize) -> u64 {
        self.device_ptr() + (i as u64) * self.dtype().bytes()
    }
}

impl CudaIds {
    pub fn len(&self) -> usize {
        self.host.len()
    }
    pub fn is_empty(&self) -> bool {
        self.host.is_empty()
    }
    /// The ids as uploaded.
    pub fn host(&self) -> &[i32] {
        &self.host
    }
    pub fn slice(&self) -> &CudaSlice<i32> {
        &self.data
    }
    /// The raw device address of element 0.
    pub fn device_ptr(&self) -> u64 {
        raw_ptr(&self.data)
    }
}

/// The raw device address of a cudarc allocation. The backend disables cudarc's per-buffer event
/// tracking (one compute stream orders everything), so no event is recorded here.
pub(crate) fn raw_ptr<T>(s: &CudaSlice<T>) -> u64 {
    let stream = s.stream().clone();
    let (ptr, _sync) = s.device_ptr(&stream);
    ptr
}

/// Allocates `len` (at least 1) elements on `stream` after reserving `bytes` under `name`.
fn alloc<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    memory: &MemoryTracker,
    name: &str,
    len: usize,
) -> Result<(CudaSlice<T>, Reservation)> {
    let reservation = memory.reserve(name, (len * std::mem::size_of::<T>()) as u64)?;
    // SAFETY: every caller initialises the allocation (memset or copy) before handing it out.
    let data = unsafe { stream.alloc::<T>(len.max(1)) }.map_err(|e| driver_err(&format!("allocating `{name}`"), e))?;
    Ok((data, reservation))
}

pub(crate) fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    memory: &MemoryTracker,
    name: &str,
    len: usize,
) -> Result<(CudaSlice<T>, Reservation)> {
    let (mut data, reservation) = alloc::<T>(stream, memory, name, len)?;
    stream.memset_zeros(&mut data).map_err(|e| driver_err(&format!("zeroing `{name}`"), e))?;
    Ok((data, reservation))
}

pub(crate) fn upload<T: DeviceRepr>(
    stream: &Arc<CudaStream>,
    memory: &MemoryTracker,
    name: &str,
    host: &[T],
) -> Result<(CudaSlice<T>, Reservation)> {
    let (mut data, reservation) = alloc::<T>(stream, memory, name, host.len())?;
    if !host.is_empty() {
        stream.memcpy_htod(host, &mut data).map_err(|e| driver_err(&format!("uploading `{name}`"), e))?;
    }
    Ok((data, reservation))
}

impl CudaBuf {
    pub(crate) fn zeros(stream: &Arc<CudaStream>, memory: &MemoryTracker, name: &str, len: usize) -> Result<Self> {
        Self::zeros_typed(stream, memory, name, len, DType::F32)
    }
    /// A zero-filled buffer of `len` elements of `dtype` (the tracker is charged `len · dtype.bytes()`).
    pub(crate) fn zeros_typed(
        stream: &Arc<CudaStream>,
        memory: &MemoryTracker,
        name: &str,
        len: usize,
        dtype: DType,
    ) -> Result<Self> {
        let (data, res) = match dtype {
            DType::F32 => {
                let (d, r) = zeros::<f32>(stream, memory, name, len)?;
                (DeviceData::F32(d), r)
            }
            DType::Bf16 => {
                let (d, r) = zeros::<u16>(stream, memory, name, len)?;
                (DeviceData::Bf16(d), r)
            }
        };
        Ok(Self { data, len, _reservation: res })
    }
    pub(crate) fn upload(stream: &Arc<CudaStream>, memory: &MemoryTracker, name: &str, host: &[f32]) -> Result<Self> {
        let (data, res) = upload(stream, memory, name, host)?;
        Ok(Self { data: DeviceData::F32(data), len: host.len(), _reservation: res })
    }
}

impl CudaIds {
    pub(crate) fn upload(stream: &Arc<CudaStream>, memory: &MemoryTracker, name: &str, host: &[i32]) -> Result<Self> {
        let (data, res) = upload(stream, memory, name, host)?;
        Ok(Self { data, host: host.to_vec(), _reservation: res })
    }
}
