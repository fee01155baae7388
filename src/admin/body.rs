//! Request bodies: JSON, read whole, refused with a JSON error naming what is wrong.

use std::collections::HashSet;
use std::fmt;

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::Json;
use serde::de::{DeserializeOwned, Error as _, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

use super::ApiError;

/// A JSON body whose rejection is a JSON error naming what is wrong. An object naming a key twice,
/// at any depth, is refused: serde_json would keep the last one silently, so
/// `{"attributes": {"team": "a", "team": "b"}}` would store `b`, and a map of project roles its
/// last role for a project, where a struct's field named twice is refused already. So is an integer
/// beyond 64 bits (see [`check_json`]).
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // Too large (413) and not JSON (415) keep their status; every other unreadable body,
        // axum's 422 for a field of the wrong type included, is a 400 like the API's own.
        let refused = |e: axum::extract::rejection::JsonRejection| {
            let status = match e.status() {
                s @ (StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE) => s,
                _ => StatusCode::BAD_REQUEST,
            };
            ApiError::Body(status, e.body_text())
        };
        // (Already read whole, within the limit, by `body_in_time`; kept to be read twice.)
        let (parts, bytes) = read_whole(req).await?;
        let req = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
        let Json(value) = Json::<T>::from_request(req, state).await.map_err(refused)?;
        if let Err(e) = check_json(&bytes) {
            let message = format!("Failed to deserialize the JSON body into the target type: {e}");
            return Err(ApiError::Body(StatusCode::BAD_REQUEST, message));
        }
        Ok(Body(value))
    }
}

/// A request's head and its whole body.
async fn read_whole(req: Request) -> Result<(axum::http::request::Parts, axum::body::Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, super::MAX_BODY_BYTES)
        .await
        .map_err(|e| ApiError::Body(StatusCode::BAD_REQUEST, format!("the body could not be read: {e}")))?;
    Ok((parts, bytes))
}

/// A [`Body`] that may be left out (a `DELETE`'s, or one whose every field is optional: a
/// revocation's reason, a suspension's): none at all is `T::default()`; one sent is read
/// as `Body` reads it, never ignored.
pub struct OptionalBody<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, bytes) = read_whole(req).await?;
        if bytes.is_empty() {
            return Ok(OptionalBody(T::default()));
        }
        let Body(value) = Body::from_request(Request::from_parts(parts, bytes.into()), state).await?;
        Ok(OptionalBody(value))
    }
}

/// Whether a JSON text is one the admin API keeps as sent: no object names a key twice, at any
/// depth, and no integer is beyond 64 bits: serde_json reads one as a double, so
/// `{"customer_id": 123456789012345678901}` and `…902` would both be stored, and sent upstream,
/// as `123456789012345680000`. (A number written with a fraction or an exponent is a double as
/// sent.) The CLI checks its `--attributes` with it before sending, as it parses them.
pub fn check_json(bytes: &[u8]) -> Result<(), String> {
    serde_json::from_slice::<UniqueKeys>(bytes).map_err(|e| e.to_string())?;
    match integers(bytes).find(|n| n.parse::<i64>().is_err() && n.parse::<u64>().is_err()) {
        Some(n) => Err(format!(
            "the integer {n} is beyond 64 bits and would not be kept exactly; send it as a string"
        )),
        None => Ok(()),
    }
}

/// The integer literals of a JSON text (numbers with neither a fraction nor an exponent), outside
/// its strings.
fn integers(bytes: &[u8]) -> impl Iterator<Item = &str> {
    let (mut at, mut in_string, mut escaped) = (0, false, false);
    std::iter::from_fn(move || {
        while at < bytes.len() {
            let b = bytes[at];
            match (in_string, escaped, b) {
                (true, true, _) => escaped = false,
                (true, false, b'\\') => escaped = true,
                (_, _, b'"') => in_string = !in_string,
                (false, _, b'-' | b'0'..=b'9') => {
                    let start = at;
                    while at < bytes.len()
                        && matches!(bytes[at], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                    {
                        at += 1;
                    }
                    let number = std::str::from_utf8(&bytes[start..at]).unwrap_or_default();
                    if !number.contains(['.', 'e', 'E']) {
                        return Some(number);
                    }
                    continue;
                }
                _ => {}
            }
            at += 1;
        }
        None
    })
}

/// Any JSON value, read only to refuse what [`check_json`] refuses.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(A::Error::custom(format_args!("the key {key:?} is given twice")));
            }
            map.next_value::<UniqueKeys>()?;
            seen.insert(key);
        }
        Ok(self)
    }
}
