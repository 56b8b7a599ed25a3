//! Minting credentials the way the dashboard does, for development (`session mint`) and tests.

use aes_gcm::aead::{AeadInPlace, OsRng, rand_core::RngCore};
use base64::Engine;

use crate::claims::Claims;
use crate::credentials::MintError;
use crate::jwe::{B64, V4Key};

const V4_HEADER: &[u8] = br#"{"alg":"dir","enc":"A256GCM"}"#;

pub(crate) fn session_v4(key: &V4Key, claims: &Claims) -> Result<String, MintError> {
    let header = B64.encode(V4_HEADER);
    let mut iv = [0u8; 12];
    OsRng.try_fill_bytes(&mut iv).map_err(|_| MintError)?;
    let mut buffer = serde_json::to_vec(&claims.0).map_err(|_| MintError)?;
    let tag = key
        .cipher()
        .encrypt_in_place_detached((&iv).into(), header.as_bytes(), &mut buffer)
        .map_err(|_| MintError)?;
    Ok(format!(
        "{header}..{}.{}.{}",
        B64.encode(iv),
        B64.encode(&buffer),
        B64.encode(tag)
    ))
}
