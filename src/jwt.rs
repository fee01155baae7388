//! JWTs: the signing keys from config (several, by `kid`, one of them signing and the rest
//! verify-only, so keys rotate without refusing live tokens), ephemeral credentials minted by
//! services for their end users, the short-lived identity JWT signed for upstreams, and the public
//! keys as a JWKS.
//!
//! Verification never trusts the token's header to choose how to verify: the `kid` is looked up
//! among the configured keys only, and the algorithm is the one that key was configured with. A
//! header naming another algorithm (`none`, or HS256 over an asymmetric key's public half) is refused.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::KeyPair;
use serde::{Deserialize, Serialize};

use crate::auth::AttributeView;
use crate::store::Attributes;

/// What the `tg` claim says a token is for, so an identity JWT meant for upstreams is never
/// accepted as a credential (their audiences differ too).
pub const EPHEMERAL: &str = "ephemeral";
/// The `tg` claim of the identity JWT sent to upstreams.
pub const IDENTITY: &str = "identity";

/// The algorithms a key may be configured with.
pub const ALGORITHMS: [(&str, Algorithm); 4] = [
    ("EdDSA", Algorithm::EdDSA),
    ("ES256", Algorithm::ES256),
    ("RS256", Algorithm::RS256),
    ("HS256", Algorithm::HS256),
];

/// The name of an algorithm as written in config and in JWT headers.
pub fn algorithm_name(alg: Algorithm) -> &'static str {
    ALGORITHMS.iter().find(|(_, a)| *a == alg).map_or("unsupported", |(n, _)| n)
}

/// Why a JWT is refused. Every kind is a 401 for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts with a JSON header, or too long.
    #[error("malformed JWT")]
    Malformed,
    /// No `kid`, or one no configured key has.
    #[error("unknown signing key")]
    UnknownKey,
    /// The header names another algorithm than the key's.
    #[error("algorithm not allowed for this key")]
    WrongAlgorithm,
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Past `exp` (plus the leeway).
    #[error("expired")]
    Expired,
    /// A required claim is missing or wrong (`iss`, `aud`, `nbf`, `tg`, ...).
    #[error("invalid claims")]
    Claims,
}

impl JwtError {
    /// A short label for logs.
    pub fn label(self) -> &'static str {
        match self {
            JwtError::Malformed => "jwt_malformed",
            JwtError::UnknownKey => "jwt_unknown_key",
            JwtError::WrongAlgorithm => "jwt_wrong_algorithm",
            JwtError::BadSignature => "jwt_bad_signature",
            JwtError::Expired => "jwt_expired",
            JwtError::Claims => "jwt_claims",
        }
    }
}

/// One configured key.
pub struct JwtKey {
    /// The `kid` in headers and in the JWKS.
    pub kid: String,
    /// The only algorithm this key signs or verifies with.
    pub algorithm: Algorithm,
    encoding: Option<EncodingKey>,
    decoding: DecodingKey,
    jwk: Option<serde_json::Value>,
    fingerprint: blake3::Hash,
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .field("can_sign", &self.encoding.is_some())
            .finish_non_exhaustive()
    }
}

/// Where a key's material comes from.
pub enum KeyMaterial<'a> {
    /// A PEM file's text: a PKCS#8 private key (`BEGIN PRIVATE KEY`, or `BEGIN RSA PRIVATE KEY`
    /// for RS256), or a public key (`BEGIN PUBLIC KEY`, EdDSA and ES256) for a verify-only key.
    Pem(&'a str),
    /// An HS256 shared secret.
    Secret(&'a [u8]),
}

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32-byte key follows.
const ED25519_SPKI: &[u8] = &[0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
/// The DER prefix of a P-256 SubjectPublicKeyInfo; the 65-byte uncompressed point follows.
const P256_SPKI: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
    0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn spki_key<'a>(der: &'a [u8], prefix: &[u8], len: usize) -> Result<&'a [u8], String> {
    der.strip_prefix(prefix)
        .filter(|k| k.len() == len)
        .ok_or_else(|| "the public key is not of the configured algorithm".to_string())
}

impl JwtKey {
    /// Loads a key, checking that its material fits its algorithm.
    pub fn load(kid: &str, algorithm: Algorithm, material: KeyMaterial<'_>) -> Result<JwtKey, String> {
        let mut fingerprint = blake3::Hasher::new();
        fingerprint.update(algorithm_name(algorithm).as_bytes());
        fingerprint.update(&[0]);
        fingerprint.update(kid.as_bytes());
        fingerprint.update(&[0]);
        let (encoding, decoding, jwk) = match material {
            KeyMaterial::Secret(secret) => {
                if algorithm != Algorithm::HS256 {
                    return Err("a shared secret is only for HS256; give key_file".into());
                }
                if secret.len() < 32 {
                    return Err("an HS256 secret needs at least 32 bytes".into());
                }
                fingerprint.update(secret);
                (Some(EncodingKey::from_secret(secret)), DecodingKey::from_secret(secret), None)
            }
            KeyMaterial::Pem(text) => {
                if algorithm == Algorithm::HS256 {
                    return Err("HS256 takes secret_file or secret_env, not key_file".into());
                }
                let block = pem::parse(text).map_err(|e| format!("not a PEM key: {e}"))?;
                let der = block.contents();
                fingerprint.update(der);
                Self::asymmetric(algorithm, block.tag(), der, text)?
            }
        };
        let jwk = jwk.map(|mut j: serde_json::Value| {
            j["kid"] = kid.into();
            j["alg"] = algorithm_name(algorithm).into();
            j["use"] = "sig".into();
            j
        });
        Ok(JwtKey {
            kid: kid.to_string(),
            algorithm,
            encoding,
            decoding,
            jwk,
            fingerprint: fingerprint.finalize(),
        })
    }

    #[allow(clippy::type_complexity)]
    fn asymmetric(
        algorithm: Algorithm,
        tag: &str,
        der: &[u8],
        text: &str,
    ) -> Result<(Option<EncodingKey>, DecodingKey, Option<serde_json::Value>), String> {
        let bad = |e: &dyn fmt::Display| format!("not a usable {} key: {e}", algorithm_name(algorithm));
        let private = match tag {
            "PRIVATE KEY" | "RSA PRIVATE KEY" => true,
            "PUBLIC KEY" => false,
            other => return Err(format!("a PEM block of type {other:?} is not a key Tollgate reads")),
        };
        let pem = text.as_bytes();
        match algorithm {
            Algorithm::EdDSA => {
                let public = if private {
                    let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
                        .map_err(|e| bad(&e))?;
                    pair.public_key().as_ref().to_vec()
                } else {
                    spki_key(der, ED25519_SPKI, 32)?.to_vec()
                };
                let encoding =
                    if private { Some(EncodingKey::from_ed_pem(pem).map_err(|e| bad(&e))?) } else { None };
                let jwk = serde_json::json!({ "kty": "OKP", "crv": "Ed25519", "x": b64(&public) });
                Ok((encoding, DecodingKey::from_ed_der(&public), Some(jwk)))
            }
            Algorithm::ES256 => {
                let point = if private {
                    let rng = ring::rand::SystemRandom::new();
                    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
                        &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                        der,
                        &rng,
                    )
                    .map_err(|e| bad(&e))?;
                    pair.public_key().as_ref().to_vec()
                } else {
                    spki_key(der, P256_SPKI, 65)?.to_vec()
                };
                let encoding =
                    if private { Some(EncodingKey::from_ec_pem(pem).map_err(|e| bad(&e))?) } else { None };
                // The uncompressed point is 0x04 || x || y.
                let jwk = serde_json::json!({
                    "kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65]),
                });
                Ok((encoding, DecodingKey::from_ec_der(&point), Some(jwk)))
            }
            Algorithm::RS256 => {
                if !private {
                    return Err("an RS256 key is given as its private key (PKCS#8 or PKCS#1 PEM)".into());
                }
                let pair = if tag == "RSA PRIVATE KEY" {
                    ring::rsa::KeyPair::from_der(der)
                } else {
                    ring::rsa::KeyPair::from_pkcs8(der)
                }
                .map_err(|e| bad(&e))?;
                let parts = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
                let encoding = EncodingKey::from_rsa_pem(pem).map_err(|e| bad(&e))?;
                let jwk = serde_json::json!({ "kty": "RSA", "n": b64(&parts.n), "e": b64(&parts.e) });
                Ok((Some(encoding), DecodingKey::from_rsa_raw_components(&parts.n, &parts.e), Some(jwk)))
            }
            other => Err(format!("algorithm {other:?} is not supported")),
        }
    }

    /// Whether this key can sign (it has a private part or a secret).
    pub fn can_sign(&self) -> bool {
        self.encoding.is_some()
    }
}

/// The validated `jwt` section of the config.
#[derive(Debug)]
pub struct JwtSettings {
    /// `iss` of everything Tollgate signs.
    pub issuer: String,
    /// `aud` of ephemeral credentials.
    pub audience: String,
    /// `aud` of the identity JWT sent to upstreams.
    pub upstream_audience: String,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Lifetime of a credential minted without `ttl_seconds`.
    pub default_ttl: Duration,
    /// Longest lifetime a credential may be minted with.
    pub max_ttl: Duration,
    /// Lifetime of the identity JWT sent to upstreams (at most a minute).
    pub upstream_ttl: Duration,
    /// Every key, signing or verify-only.
    pub keys: Vec<Arc<JwtKey>>,
    /// The index of the signing key in `keys`.
    pub signing: usize,
}

/// The claims of an ephemeral credential.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EphemeralClaims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// The end user, as the minting service named them.
    pub sub: String,
    /// Issued at (seconds).
    pub iat: i64,
    /// Not before (seconds).
    pub nbf: i64,
    /// Expiry (seconds).
    pub exp: i64,
    /// Unique id, shown as the token id.
    pub jti: String,
    /// The org.
    pub org: String,
    /// The one project it works on.
    pub project: String,
    /// The id of the service that minted it.
    pub svc: String,
    /// The id of the service token that minted it.
    pub tid: String,
    /// What the token is: always [`EPHEMERAL`].
    pub tg: String,
    /// The end user's email, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// The id of the org user it was minted for (by `user_email`), checked on every use: that
    /// user's suspension or removal stops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// The end user's attributes, injected for the upstream.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub attrs: Attributes,
    /// Narrowing below the service's permissions on the project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Vec<String>>,
    /// Environments it may be used in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
}

/// Whether the claims that travel in the upstream's headers as they are (`sub`, `jti`, `email`)
/// are what minting lets through: 1 to 256 printable ASCII characters. Minting checks them; a JWT
/// signed elsewhere with a configured key (an HS256 secret shared with another system) may hold
/// anything, which must be a `401`, never a failed request.
fn header_claims(claims: &EphemeralClaims) -> bool {
    is_claim_text(&claims.sub)
        && is_claim_text(&claims.jti)
        && claims.email.as_deref().is_none_or(is_claim_text)
}

/// 1 to 256 printable ASCII characters, no space at either end: what a claim that travels in a
/// header may be (one an upstream reads as it was sent).
pub(crate) fn is_claim_text(s: &str) -> bool {
    !s.is_empty() && s.len() <= 256 && crate::proxy::headers::arrives_unchanged(s)
}

/// The claims of the identity JWT a route can send to its upstream (`X-Auth-Jwt`).
#[derive(Debug, Serialize)]
pub struct IdentityClaims<'a> {
    /// Issuer.
    pub iss: &'a str,
    /// Audience ([`JwtSettings::upstream_audience`]).
    pub aud: &'a str,
    /// `user:<id>`, `service:<name>` or `ephemeral:<sub>`.
    pub sub: &'a str,
    /// Issued at (seconds).
    pub iat: i64,
    /// Expiry (seconds), within a minute.
    pub exp: i64,
    /// The request id.
    pub jti: &'a str,
    /// Always [`IDENTITY`].
    pub tg: &'static str,
    /// The route's org.
    pub org: &'a str,
    /// The route's project.
    pub project: &'a str,
    /// The route's environment.
    pub environment: &'a str,
    /// `pat`, `service` or `ephemeral`.
    pub kind: &'a str,
    /// The token id.
    pub token_id: &'a str,
    /// The role in effect.
    pub role: &'a str,
    /// Effective permissions.
    pub permissions: Vec<&'a str>,
    /// The email, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<&'a str>,
    /// The attributes.
    pub attributes: &'a AttributeView<'a>,
}

/// The longest JWT the gateway will look at (and so the longest it mints).
pub const MAX_JWT_LEN: usize = 8 * 1024;

/// Whether an algorithm signs with a shared secret (HS256/384/512): whoever verifies can also sign.
pub fn is_hmac(algorithm: Algorithm) -> bool {
    matches!(algorithm, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl JwtSettings {
    /// The signing key.
    pub fn signing_key(&self) -> &Arc<JwtKey> {
        &self.keys[self.signing]
    }

    /// A configured key by `kid`.
    pub fn key(&self, kid: &str) -> Option<&Arc<JwtKey>> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// Signs claims with the signing key.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, jsonwebtoken::errors::Error> {
        let key = self.signing_key();
        let mut header = Header::new(key.algorithm);
        header.kid = Some(key.kid.clone());
        match &key.encoding {
            Some(encoding) => jsonwebtoken::encode(&header, claims, encoding),
            None => Err(ErrorKind::InvalidKeyFormat.into()),
        }
    }

    /// Verifies an ephemeral credential: key by `kid` among the configured ones, that key's
    /// algorithm only, signature, `exp`/`nbf` with the leeway, `iss`, `aud`, and `tg`. Returns the
    /// claims and the fingerprint of the key that verified them.
    pub fn verify(&self, token: &str) -> Result<(EphemeralClaims, KeyFingerprint), JwtError> {
        if token.len() > MAX_JWT_LEN {
            return Err(JwtError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Malformed)?;
        let key = header.kid.as_deref().and_then(|kid| self.key(kid)).ok_or(JwtError::UnknownKey)?;
        if header.alg != key.algorithm {
            return Err(JwtError::WrongAlgorithm);
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<EphemeralClaims>(token, &key.decoding, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::ExpiredSignature => JwtError::Expired,
                ErrorKind::InvalidSignature => JwtError::BadSignature,
                ErrorKind::InvalidAlgorithm => JwtError::WrongAlgorithm,
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => JwtError::Malformed,
                _ => JwtError::Claims,
            },
        )?;
        let now = crate::store::now_millis() / 1000;
        // jsonwebtoken lets `exp + leeway == now` pass: the boundary a cached credential is held
        // to ([`JwtSettings::still_valid`]) decides here too.
        if self.expired(data.claims.exp, now) {
            return Err(JwtError::Expired);
        }
        if data.claims.tg != EPHEMERAL
            || !self.lifetime_allowed(&data.claims, now)
            || !header_claims(&data.claims)
        {
            return Err(JwtError::Claims);
        }
        Ok((data.claims, KeyFingerprint { kid: key.kid.clone(), hash: key.fingerprint }))
    }

    /// Whether claims verified earlier (and cached) still hold at `now` (seconds) under these
    /// settings: the key that verified them is still configured with the same material, and the
    /// time and audience checks pass again.
    pub fn still_valid(
        &self,
        claims: &EphemeralClaims,
        key: &KeyFingerprint,
        now: i64,
    ) -> Result<(), JwtError> {
        match self.key(&key.kid) {
            Some(k) if k.fingerprint == key.hash => {}
            _ => return Err(JwtError::UnknownKey),
        }
        if self.expired(claims.exp, now) {
            return Err(JwtError::Expired);
        }
        let leeway = self.leeway.as_secs() as i64;
        if claims.nbf.saturating_sub(leeway) > now
            || claims.iss != self.issuer
            || claims.aud != self.audience
            || !self.lifetime_allowed(claims, now)
        {
            return Err(JwtError::Claims);
        }
        Ok(())
    }

    /// Whether a credential expiring at `exp` is expired at `now` (seconds): on and after `exp`
    /// plus the leeway, as RFC 7519 has it with none.
    fn expired(&self, exp: i64, now: i64) -> bool {
        exp.saturating_add(self.leeway.as_secs() as i64) <= now
    }

    /// Whether a credential's lifetime (from `iat` to `exp`) is within `max_ttl` as configured
    /// now: lowering `jwt.max_ttl` stops longer credentials already minted, whatever their age.
    /// An `iat` after `now` (seconds) is refused, and so is an `exp` further than `max_ttl` from
    /// now: a holder of a shared HS256 secret cannot stretch a lifetime by dating it ahead.
    fn lifetime_allowed(&self, claims: &EphemeralClaims, now: i64) -> bool {
        let leeway = self.leeway.as_secs() as i64;
        let max = i64::try_from(self.max_ttl.as_secs()).unwrap_or(i64::MAX).saturating_add(leeway);
        claims.iat <= now.saturating_add(leeway)
            && claims.exp.saturating_sub(claims.iat) <= max
            && claims.exp.saturating_sub(now) <= max
    }

    /// The public keys as a JSON Web Key Set. HS256 keys are secret and never published.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<&serde_json::Value> = self.keys.iter().filter_map(|k| k.jwk.as_ref()).collect();
        serde_json::json!({ "keys": keys })
    }
}

/// Which key verified a token, to tell later whether it is still configured unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFingerprint {
    kid: String,
    hash: blake3::Hash,
}

/// Generates a private key for `algorithm` (EdDSA or ES256) as PKCS#8 PEM, for `tollgate keygen`.
pub fn generate_key(algorithm: Algorithm) -> Result<String, String> {
    let rng = ring::rand::SystemRandom::new();
    let der = match algorithm {
        Algorithm::EdDSA => {
            ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| e.to_string())?
        }
        Algorithm::ES256 => ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &rng,
        )
        .map_err(|e| e.to_string())?,
        Algorithm::HS256 => {
            return Err("HS256 keys are not generated here: an HS256 key is a shared secret of 32 bytes \
                        or more, made with `(umask 077; openssl rand -base64 32 > secret)` and listed with `secret_file:` \
                        (or `secret_env:`); or use EdDSA or ES256"
                .into())
        }
        other => {
            return Err(format!(
                "{} keys are not generated here; use EdDSA or ES256, or `openssl genpkey`",
                algorithm_name(other)
            ))
        }
    };
    Ok(pem::encode(&pem::Pem::new("PRIVATE KEY", der.as_ref().to_vec())))
}

/// A JWT's claims as sent, read without verifying anything: only to name what it claims to be
/// (its issuer, the token that minted it), never to trust it.
pub fn unverified_claims(jwt: &str) -> Option<serde_json::Value> {
    let payload = jwt.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

/// Whether a presented credential has the shape of a JWT (three base64url parts), so it goes to
/// JWT verification instead of the opaque-token parser.
pub fn looks_like_jwt(presented: &str) -> bool {
    presented.starts_with("eyJ") && presented.bytes().filter(|&b| b == b'.').count() == 2
}

#[cfg(test)]
mod tests;
