//! [`Bytes`]: data of the v3 data requests, encoded as one run of bytes.

use serde::{Deserialize, Serialize};

/// A byte buffer encoded as one length-prefixed run of bytes (postcard's `bytes`), not as a
/// sequence of `u8` values: a 1 MiB data request decodes with one copy.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bytes({} bytes)", self.0.len())
    }
}

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        decode, decode_response, encode, Reply, ResponseFrame, MAX_DATA_BYTES, MAX_FRAME_BYTES,
        PROTOCOL_VERSION,
    };

    #[test]
    fn data_is_one_run_of_bytes() {
        // postcard `bytes`: a varint length, then the bytes (not one value per byte)
        let data = Bytes((0..=255u8).cycle().take(4096).collect());
        let body = postcard::to_stdvec(&data).unwrap();
        assert_eq!(body.len(), 2 + 4096);
        assert_eq!(&body[2..], &data.0[..]);
        assert_eq!(decode::<Bytes>(&body).unwrap(), data);
        // a largest read reply fits a frame
        let frame = ResponseFrame {
            version: PROTOCOL_VERSION,
            result: Ok(Reply::Data(Bytes(vec![0; MAX_DATA_BYTES as usize]))),
        };
        assert!(encode(&frame).unwrap().len() < MAX_FRAME_BYTES as usize);
        let too_long = ResponseFrame {
            version: PROTOCOL_VERSION,
            result: Ok(Reply::Data(Bytes(vec![0; MAX_DATA_BYTES as usize + 1]))),
        };
        assert!(decode_response(&encode(&too_long).unwrap()[4..]).is_err());
    }
}
