//! Conversion between f32 values and the on-disk dtypes (little-endian).
//!
//! f32 → f16/bf16 rounds to nearest, ties to even (the `half` crate); NaN
//! stays NaN. Decoding is exact.

use half::{bf16, f16};

use super::error::BankError;
use super::format::Dtype;

/// The value `x` becomes once stored as `dtype` and read back as f32.
pub fn round_trip(dtype: Dtype, x: f32) -> f32 {
    match dtype {
        Dtype::F32 => x,
        Dtype::F16 => f16::from_f32(x).to_f32(),
        Dtype::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// Appends `values` encoded as `dtype` (little-endian) to `out`.
pub fn encode_into(dtype: Dtype, values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())),
        Dtype::Bf16 => values
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes())),
    }
}

/// `values` encoded as `dtype`.
pub fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(dtype, values, &mut out);
    out
}

/// Decodes `bytes` (elements of `dtype`, little-endian) into `out`, which must
/// hold exactly `bytes.len() / dtype.size()` values.
pub fn decode_into(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Result<(), BankError> {
    let size = dtype.size();
    if !bytes.len().is_multiple_of(size) || bytes.len() / size != out.len() {
        return Err(BankError::InvalidInput(format!(
            "cannot decode {} bytes of {dtype} into {} values",
            bytes.len(),
            out.len()
        )));
    }
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        Dtype::Bf16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
    }
    Ok(())
}

/// Decodes `bytes` (elements of `dtype`) into f32 values.
pub fn decode(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, BankError> {
    let mut out = vec![0.0; bytes.len() / dtype.size()];
    decode_into(dtype, bytes, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings_are_little_endian() {
        assert_eq!(encode(Dtype::F32, &[1.0]), vec![0x00, 0x00, 0x80, 0x3f]);
        assert_eq!(encode(Dtype::F16, &[1.0]), vec![0x00, 0x3c]);
        assert_eq!(encode(Dtype::Bf16, &[1.0]), vec![0x80, 0x3f]);
        assert_eq!(encode(Dtype::F16, &[-2.0]), vec![0x00, 0xc0]);
    }

    #[test]
    fn decode_inverts_encode_up_to_rounding() {
        let xs = [0.0, -0.0, 1.0, -3.5, 1e-3, 65504.0, 1e30, f32::INFINITY];
        for dtype in Dtype::ALL {
            let back = decode(dtype, &encode(dtype, &xs)).unwrap();
            for (x, y) in xs.iter().zip(&back) {
                assert_eq!(round_trip(dtype, *x).to_bits(), y.to_bits(), "{dtype} {x}");
            }
        }
    }

    #[test]
    fn decode_rejects_bad_lengths() {
        assert!(decode(Dtype::F32, &[0, 0, 0]).is_err());
        assert!(decode(Dtype::F16, &[0]).is_err());
        let mut out = [0.0; 2];
        assert!(decode_into(Dtype::F16, &[0, 0], &mut out).is_err());
    }
}
