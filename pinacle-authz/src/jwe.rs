//! Compact JWE as NextAuth v4 (`dir` + `A256GCM`) and Auth.js v5 (`dir` + `A256CBC-HS512`) write
//! it: key derivation, parsing and authenticated decryption. Keys are derived once per secret.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use base64::Engine;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use cbc::cipher::{BlockDecryptMut, KeyIvInit, block_padding::Pkcs7};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256, Sha512};

use crate::secret::Secret;

/// base64url as jose 6 reads it: URL-safe alphabet, canonical `=` padding optional.
pub(crate) const B64: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

const V4_INFO: &[u8] = b"NextAuth.js Generated Encryption Key";

/// Why a JWE could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JweError {
    /// Not a compact JWE of the expected shape.
    Malformed(&'static str),
    /// `alg`/`enc` other than the format's.
    UnsupportedAlgorithm,
    /// The authentication tag did not verify.
    AuthenticationFailed,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    enc: String,
    #[serde(default)]
    kid: Option<String>,
}

/// A parsed compact JWE (`header..iv.ciphertext.tag`, empty encrypted key for `dir`).
pub(crate) struct Compact<'a> {
    header_b64: &'a str,
    pub(crate) kid: Option<String>,
    enc: String,
    iv: Vec<u8>,
    ciphertext: Vec<u8>,
    tag: Vec<u8>,
}

/// Splits and decodes a compact JWE; checks `alg` is `dir`.
pub(crate) fn parse(token: &str) -> Result<Compact<'_>, JweError> {
    let mut parts = token.split('.');
    let (Some(h), Some(key), Some(iv), Some(ct), Some(tag), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(JweError::Malformed("not five dot-separated segments"));
    };
    let header_json = B64
        .decode(h)
        .map_err(|_| JweError::Malformed("protected header is not base64url"))?;
    let header: Header = serde_json::from_slice(&header_json)
        .map_err(|_| JweError::Malformed("protected header is not a JSON object"))?;
    if header.alg != "dir" {
        return Err(JweError::UnsupportedAlgorithm);
    }
    if !key.is_empty() {
        return Err(JweError::Malformed(
            "encrypted key must be empty for alg dir",
        ));
    }
    let decode = |s: &str, what| B64.decode(s).map_err(|_| JweError::Malformed(what));
    Ok(Compact {
        header_b64: h,
        kid: header.kid,
        enc: header.enc,
        iv: decode(iv, "iv is not base64url")?,
        ciphertext: decode(ct, "ciphertext is not base64url")?,
        tag: decode(tag, "tag is not base64url")?,
    })
}

/// The NextAuth v4 content key: a ready AES-256-GCM cipher.
#[derive(Clone)]
pub(crate) struct V4Key(Aes256Gcm);

impl V4Key {
    pub(crate) fn derive(secret: &Secret) -> Self {
        let mut okm = [0u8; 32];
        // HKDF-SHA256 with an empty salt; 32 bytes is always a valid output length.
        let _ = Hkdf::<Sha256>::new(Some(&[]), secret.expose()).expand(V4_INFO, &mut okm);
        Self(Aes256Gcm::new(&okm.into()))
    }

    pub(crate) fn cipher(&self) -> &Aes256Gcm {
        &self.0
    }

    /// Decrypts a `dir` + `A256GCM` JWE; the AAD is the ASCII of the protected header segment.
    pub(crate) fn decrypt(&self, jwe: &Compact<'_>) -> Result<Vec<u8>, JweError> {
        if jwe.enc != "A256GCM" {
            return Err(JweError::UnsupportedAlgorithm);
        }
        if jwe.iv.len() != 12 {
            return Err(JweError::Malformed("A256GCM iv must be 96 bits"));
        }
        if jwe.tag.len() != 16 {
            return Err(JweError::Malformed("A256GCM tag must be 128 bits"));
        }
        let mut buffer = jwe.ciphertext.clone();
        self.0
            .decrypt_in_place_detached(
                Nonce::from_slice(&jwe.iv),
                jwe.header_b64.as_bytes(),
                &mut buffer,
                Tag::from_slice(&jwe.tag),
            )
            .map_err(|_| JweError::AuthenticationFailed)?;
        Ok(buffer)
    }
}

/// An Auth.js v5 content key for one cookie name: MAC and encryption halves, and its `kid`.
#[derive(Clone)]
pub(crate) struct V5Key {
    mac: Hmac<Sha512>,
    enc: [u8; 32],
    pub(crate) kid: String,
}

impl V5Key {
    /// HKDF-SHA256(secret, salt = cookie name, info = "Auth.js Generated Encryption Key (<name>)").
    pub(crate) fn derive(secret: &Secret, cookie_name: &str) -> Self {
        let info = format!("Auth.js Generated Encryption Key ({cookie_name})");
        let mut okm = [0u8; 64];
        // 64 bytes is within HKDF-SHA256's 8160-byte limit, so expand cannot fail.
        let _ = Hkdf::<Sha256>::new(Some(cookie_name.as_bytes()), secret.expose())
            .expand(info.as_bytes(), &mut okm);
        let (mac_key, enc_key) = okm.split_at(32);
        let mut enc = [0u8; 32];
        enc.copy_from_slice(enc_key);
        // HMAC zero-pads a short key to the block size, so the padded key is the same key; this
        // keeps the constructor infallible.
        let mut padded = [0u8; 128];
        padded[..32].copy_from_slice(mac_key);
        let mac = <Hmac<Sha512> as KeyInit>::new(&padded.into());
        Self {
            mac,
            enc,
            kid: jwk_thumbprint(&okm),
        }
    }

    /// Decrypts a `dir` + `A256CBC-HS512` JWE (RFC 7518 §5.2): verify the truncated HMAC over
    /// AAD || IV || ciphertext || AL in constant time, then AES-256-CBC with PKCS#7.
    pub(crate) fn decrypt(&self, jwe: &Compact<'_>) -> Result<Vec<u8>, JweError> {
        if jwe.enc != "A256CBC-HS512" {
            return Err(JweError::UnsupportedAlgorithm);
        }
        if jwe.iv.len() != 16 {
            return Err(JweError::Malformed("A256CBC-HS512 iv must be 128 bits"));
        }
        if jwe.tag.len() != 32 {
            return Err(JweError::Malformed("A256CBC-HS512 tag must be 256 bits"));
        }
        let aad = jwe.header_b64.as_bytes();
        let mut mac = self.mac.clone();
        mac.update(aad);
        mac.update(&jwe.iv);
        mac.update(&jwe.ciphertext);
        mac.update(&((aad.len() as u64) * 8).to_be_bytes());
        mac.verify_truncated_left(&jwe.tag)
            .map_err(|_| JweError::AuthenticationFailed)?;
        let mut buffer = jwe.ciphertext.clone();
        let plaintext_len =
            cbc::Decryptor::<aes::Aes256>::new(&self.enc.into(), jwe.iv.as_slice().into())
                .decrypt_padded_mut::<Pkcs7>(&mut buffer)
                .map_err(|_| JweError::AuthenticationFailed)?
                .len();
        buffer.truncate(plaintext_len);
        Ok(buffer)
    }
}

/// RFC 7638 thumbprint of a symmetric JWK (`{"k":..,"kty":"oct"}`) with SHA-512, as jose computes
/// the `kid` Auth.js puts in its header.
fn jwk_thumbprint(key: &[u8]) -> String {
    let canonical = format!(r#"{{"k":"{}","kty":"oct"}}"#, B64.encode(key));
    B64.encode(Sha512::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_shapes_are_told_apart_from_crypto_failures() {
        assert!(matches!(parse("a.b.c"), Err(JweError::Malformed(_))));
        assert!(matches!(parse("!!.x.y.z.w"), Err(JweError::Malformed(_))));
        let header = B64.encode(br#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#);
        assert_eq!(
            parse(&format!("{header}..AA.AA.AA")).err(),
            Some(JweError::UnsupportedAlgorithm)
        );
    }

    #[test]
    fn v5_kid_depends_on_secret_and_cookie_name() {
        let s = Secret::new("s");
        let a = V5Key::derive(&s, "authjs.session-token");
        let b = V5Key::derive(&s, "__Secure-authjs.session-token");
        let c = V5Key::derive(&Secret::new("t"), "authjs.session-token");
        assert_ne!(a.kid, b.kid);
        assert_ne!(a.kid, c.kid);
        assert_eq!(a.kid.len(), 86);
    }
}
