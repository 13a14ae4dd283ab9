//! Device buffers of the CUDA backend. Every allocation is registered with the device's
//! [`MemoryTracker`] first (so a budget refusal names the tensor and allocates nothing), then
//! made with cudarc's stream-ordered allocator on the backend's compute stream.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, ValidAsZeroBits};

use super::device::driver_err;
use crate::error::Result;
use crate::memory::{MemoryTracker, Reservation};

/// `len` f32 elements in device memory.
///
/// A zero-length buffer still owns a one-element allocation (CUDA refuses 0-byte allocations);
/// [`CudaBuf::len`] is the logical length and the tracker is charged `4·len` bytes.
#[derive(Debug)]
pub struct CudaBuf {
    pub(crate) data: CudaSlice<f32>,
    pub(crate) len: usize,
    _reservation: Reservation,
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
    /// The underlying cudarc allocation (at least `max(len, 1)` elements).
    pub fn slice(&self) -> &CudaSlice<f32> {
        &self.data
    }
    /// Mutable access to the allocation, e.g. for NCCL or custom kernel calls.
    pub fn slice_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.data
    }
    /// The raw device address (`CUdeviceptr`) of element 0.
    pub fn device_ptr(&self) -> u64 {
        raw_ptr(&self.data)
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
        let (data, res) = zeros::<f32>(stream, memory, name, len)?;
        Ok(Self { data, len, _reservation: res })
    }
    pub(crate) fn upload(stream: &Arc<CudaStream>, memory: &MemoryTracker, name: &str, host: &[f32]) -> Result<Self> {
        let (data, res) = upload(stream, memory, name, host)?;
        Ok(Self { data, len: host.len(), _reservation: res })
    }
}

impl CudaIds {
    pub(crate) fn upload(stream: &Arc<CudaStream>, memory: &MemoryTracker, name: &str, host: &[i32]) -> Result<Self> {
        let (data, res) = upload(stream, memory, name, host)?;
        Ok(Self { data, host: host.to_vec(), _reservation: res })
    }
}
