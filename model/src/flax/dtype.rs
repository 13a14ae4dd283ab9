//! numpy dtype names as flax writes them (`arr.dtype.name`), their sizes and conversion of raw
//! little-endian bytes to f32 / i64.

/// An element type of a Flax array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FlaxDtype {
    Bool,
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F16,
    BF16,
    F32,
    F64,
}

const ALL: [FlaxDtype; 13] = [
    FlaxDtype::Bool,
    FlaxDtype::I8,
    FlaxDtype::I16,
    FlaxDtype::I32,
    FlaxDtype::I64,
    FlaxDtype::U8,
    FlaxDtype::U16,
    FlaxDtype::U32,
    FlaxDtype::U64,
    FlaxDtype::F16,
    FlaxDtype::BF16,
    FlaxDtype::F32,
    FlaxDtype::F64,
];

impl FlaxDtype {
    /// numpy's name (`float32`, `bfloat16`, …).
    pub fn name(self) -> &'static str {
        match self {
            FlaxDtype::Bool => "bool",
            FlaxDtype::I8 => "int8",
            FlaxDtype::I16 => "int16",
            FlaxDtype::I32 => "int32",
            FlaxDtype::I64 => "int64",
            FlaxDtype::U8 => "uint8",
            FlaxDtype::U16 => "uint16",
            FlaxDtype::U32 => "uint32",
            FlaxDtype::U64 => "uint64",
            FlaxDtype::F16 => "float16",
            FlaxDtype::BF16 => "bfloat16",
            FlaxDtype::F32 => "float32",
            FlaxDtype::F64 => "float64",
        }
    }

    /// The dtype numpy calls `name`, if supported.
    pub fn from_name(name: &str) -> Option<Self> {
        ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn itemsize(self) -> usize {
        match self {
            FlaxDtype::Bool | FlaxDtype::I8 | FlaxDtype::U8 => 1,
            FlaxDtype::I16 | FlaxDtype::U16 | FlaxDtype::F16 | FlaxDtype::BF16 => 2,
            FlaxDtype::I32 | FlaxDtype::U32 | FlaxDtype::F32 => 4,
            FlaxDtype::I64 | FlaxDtype::U64 | FlaxDtype::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, FlaxDtype::F16 | FlaxDtype::BF16 | FlaxDtype::F32 | FlaxDtype::F64)
    }

    /// Little-endian bytes (a whole number of elements) as f32: exact for every float and for
    /// integers up to 2^24; float64 is rounded to nearest.
    pub fn to_f32(self, bytes: &[u8]) -> Vec<f32> {
        let n = self.itemsize();
        let it = bytes.chunks_exact(n);
        match self {
            FlaxDtype::F32 => it.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            FlaxDtype::BF16 => it.map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            FlaxDtype::F16 => it.map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            FlaxDtype::F64 => it.map(|c| f64::from_le_bytes(le8(c)) as f32).collect(),
            _ => self.to_i64(bytes).into_iter().map(|v| v as f32).collect(),
        }
    }

    /// Little-endian bytes as i64 (integers and bools; floats are truncated toward zero;
    /// uint64 above i64::MAX saturates).
    pub fn to_i64(self, bytes: &[u8]) -> Vec<i64> {
        let it = bytes.chunks_exact(self.itemsize());
        match self {
            FlaxDtype::Bool | FlaxDtype::U8 => bytes.iter().map(|&b| b as i64).collect(),
            FlaxDtype::I8 => bytes.iter().map(|&b| b as i8 as i64).collect(),
            FlaxDtype::I16 => it.map(|c| i16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            FlaxDtype::U16 => it.map(|c| u16::from_le_bytes([c[0], c[1]]) as i64).collect(),
            FlaxDtype::I32 => it.map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            FlaxDtype::U32 => it.map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64).collect(),
            FlaxDtype::I64 => it.map(|c| i64::from_le_bytes(le8(c))).collect(),
            FlaxDtype::U64 => it.map(|c| i64::try_from(u64::from_le_bytes(le8(c))).unwrap_or(i64::MAX)).collect(),
            FlaxDtype::F16 | FlaxDtype::BF16 | FlaxDtype::F32 | FlaxDtype::F64 => {
                self.to_f32_exact(bytes).into_iter().map(|v| v as i64).collect()
            }
        }
    }

    fn to_f32_exact(self, bytes: &[u8]) -> Vec<f64> {
        match self {
            FlaxDtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes(le8(c))).collect(),
            _ => self.to_f32(bytes).into_iter().map(f64::from).collect(),
        }
    }
}

fn le8(c: &[u8]) -> [u8; 8] {
    let mut a = [0u8; 8];
    a.copy_from_slice(c);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in ALL {
            assert_eq!(FlaxDtype::from_name(d.name()), Some(d));
        }
        assert_eq!(FlaxDtype::from_name("complex64"), None);
    }

    #[test]
    fn converts_half_precisions_exactly() {
        let bf = half::bf16::from_f32(-1.5).to_le_bytes();
        assert_eq!(FlaxDtype::BF16.to_f32(&bf), vec![-1.5]);
        let f = half::f16::from_f32(0.25).to_le_bytes();
        assert_eq!(FlaxDtype::F16.to_f32(&f), vec![0.25]);
        assert_eq!(FlaxDtype::I32.to_i64(&(-7i32).to_le_bytes()), vec![-7]);
    }
}
