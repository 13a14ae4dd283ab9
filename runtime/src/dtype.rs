//! Element types of device buffers. Every buffer is `f32` unless it was made with
//! [`crate::Backend::zeros_typed`]`(.., DType::Bf16)`: bf16-mixed precision stores activations and
//! weight copies in bfloat16 (8 exponent bits like f32, 8 significand bits, so ≈ 2⁻⁹ relative
//! rounding error, round-to-nearest-even). Ops compute in f32 whatever their buffers hold: they
//! read bf16 inputs exactly (a bf16 value widens to f32 without loss) and round once when they
//! write a bf16 output.

/// The element type of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DType {
    /// IEEE single precision, 4 bytes.
    #[default]
    F32,
    /// bfloat16, 2 bytes (the upper half of an f32).
    Bf16,
}

impl DType {
    /// Bytes of one element, as the memory tracker counts them.
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
