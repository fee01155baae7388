//! The one place where a refused request becomes an HTTP response: JSON body
//! (`error`, `error_description`, `request_id`), RFC 6750 `WWW-Authenticate` on 401 and 403,
//! `Retry-After` on 503.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::auth::{AuthError, Invalid};
use crate::policy::Forbidden;
use crate::store::StoreError;

/// Why the gateway answers a request itself instead of forwarding it.
#[derive(Debug, Clone)]
pub enum Rejection {
    /// No route matches the host and path.
    NoRoute,
    /// A protected route and no credential.
    Missing,
    /// The credential header is not even text.
    Malformed,
    /// The request is ambiguous (several credentials, duplicated headers).
    BadRequest(&'static str),
    /// The credential is refused.
    Invalid(Invalid),
    /// The credential is valid but not allowed here.
    Forbidden(Forbidden),
    /// The store is needed and unreachable.
    Unavailable,
    /// A record the credential needs is in the store but this build cannot read it (written by
    /// another version, or by hand): no retry helps, so no `Retry-After`.
    Unreadable,
    /// The token's first verification would wait too long (argon2 is busy).
    Busy,
    /// Not a refusal: the request was let through and proxying it failed with this status (the
    /// upstream unreachable: 502). Answered in the same JSON; never kept as the request's outcome.
    ProxyFailed(StatusCode),
}

impl From<AuthError> for Rejection {
    fn from(e: AuthError) -> Rejection {
        match e {
            AuthError::Invalid(i) => Rejection::Invalid(i),
            AuthError::Unavailable(StoreError::Corrupt { .. }) => Rejection::Unreadable,
            AuthError::Unavailable(_) => Rejection::Unavailable,
            AuthError::Busy => Rejection::Busy,
        }
    }
}

/// Seconds a client is asked to wait when the store is unreachable.
const RETRY_AFTER_SECONDS: &str = "1";

impl Rejection {
    /// Status, error code and description.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Rejection::NoRoute => {
                (StatusCode::NOT_FOUND, "not_found", "no route matches this host and path".into())
            }
            Rejection::Missing => {
                (StatusCode::UNAUTHORIZED, "unauthorized", "this route requires an access token".into())
            }
            Rejection::Malformed => {
                (StatusCode::UNAUTHORIZED, "invalid_token", Invalid::Malformed.description().into())
            }
            Rejection::BadRequest(why) => (StatusCode::BAD_REQUEST, "invalid_request", (*why).into()),
            Rejection::Invalid(i) => (StatusCode::UNAUTHORIZED, "invalid_token", i.description().into()),
            Rejection::Forbidden(f) => (StatusCode::FORBIDDEN, "insufficient_scope", f.to_string()),
            Rejection::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the token store is unreachable; retry shortly".into(),
            ),
            Rejection::Unreadable => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "a stored record this credential needs cannot be read; the gateway's log names it".into(),
            ),
            Rejection::Busy => (
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "too many new tokens are being verified to check this one now; retry shortly".into(),
            ),
            Rejection::ProxyFailed(status) => {
                let (code, description) = match *status {
                    StatusCode::BAD_GATEWAY => {
                        ("bad_gateway", "the upstream could not be reached, or its answer could not be read")
                    }
                    StatusCode::GATEWAY_TIMEOUT => ("gateway_timeout", "the upstream did not answer in time"),
                    StatusCode::REQUEST_TIMEOUT => {
                        ("request_timeout", "the request's body stopped arriving before it was whole")
                    }
                    s if s.is_client_error() => ("invalid_request", "the request could not be read"),
                    _ => ("internal_error", "the gateway could not proxy this request"),
                };
                (*status, code, description.into())
            }
        }
    }

    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::NoRoute => "no_route",
            Rejection::Missing => "missing_token",
            Rejection::Malformed => "malformed",
            Rejection::BadRequest(_) => "bad_request",
            Rejection::Invalid(i) => i.label(),
            Rejection::Forbidden(Forbidden::Org) => "forbidden_org",
            Rejection::Forbidden(Forbidden::Environment(_)) => "forbidden_environment",
            Rejection::Forbidden(Forbidden::Project(_)) => "forbidden_project",
            Rejection::Forbidden(Forbidden::Permission(_)) => "forbidden_permission",
            Rejection::Unavailable => "store_unavailable",
            Rejection::Unreadable => "store_unreadable",
            Rejection::Busy => "verification_busy",
            Rejection::ProxyFailed(_) => "proxy_failed",
        }
    }

    /// The `WWW-Authenticate` value (RFC 6750, section 3): no error code when no token was sent.
    fn www_authenticate(&self, code: &str, status: StatusCode) -> Option<String> {
        // The token was accepted: no challenge for a failure after it.
        if matches!(self, Rejection::ProxyFailed(_)) {
            return None;
        }
        match status {
            StatusCode::UNAUTHORIZED if matches!(self, Rejection::Missing) => {
                Some("Bearer realm=\"tollgate\"".into())
            }
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::BAD_REQUEST => {
                Some(format!("Bearer realm=\"tollgate\", error=\"{code}\""))
            }
            _ => None,
        }
    }

    /// The response header and JSON body.
    pub fn response(
        &self,
        request_id: &str,
        request_id_header: &str,
        extra: &[(HeaderName, HeaderValue)],
    ) -> pingora::Result<(ResponseHeader, Bytes)> {
        let (status, code, description) = self.parts();
        let body = serde_json::json!({
            "error": code,
            "error_description": description,
            "request_id": request_id,
        });
        let body = Bytes::from(body.to_string());
        let mut header = ResponseHeader::build(status, Some(6 + extra.len()))?;
        header.insert_header(http::header::CONTENT_TYPE, "application/json")?;
        // Without a length a keep-alive client would wait for more body.
        header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        header.insert_header(request_id_header.to_string(), request_id)?;
        if let Some(value) = self.www_authenticate(code, status) {
            header.insert_header(http::header::WWW_AUTHENTICATE, value)?;
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            header.insert_header(http::header::RETRY_AFTER, RETRY_AFTER_SECONDS)?;
        }
        for (name, value) in extra {
            header.insert_header(name.clone(), value)?;
        }
        Ok((header, body))
    }

    /// Writes the response to the client.
    pub async fn send(
        &self,
        session: &mut Session,
        request_id: &str,
        request_id_header: &str,
        extra: &[(HeaderName, HeaderValue)],
    ) -> pingora::Result<()> {
        let (header, body) = self.response(request_id, request_id_header, extra)?;
        session.write_response_header(Box::new(header), false).await?;
        session.write_response_body(Some(body), true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(r: &Rejection, name: &str) -> Option<String> {
        let (h, _) = r.response("rid", "x-request-id", &[]).unwrap();
        h.headers.get(name).map(|v| v.to_str().unwrap().to_string())
    }

    #[test]
    fn statuses_and_headers() {
        let check = |r: Rejection, status: u16, www: Option<&str>| {
            let (h, body) = r.response("rid", "x-request-id", &[]).unwrap();
            assert_eq!(h.status.as_u16(), status, "{r:?}");
            assert_eq!(header(&r, "www-authenticate").as_deref(), www, "{r:?}");
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["request_id"], "rid");
            assert_eq!(header(&r, "content-length").unwrap(), body.len().to_string());
        };
        check(Rejection::NoRoute, 404, None);
        check(Rejection::Missing, 401, Some("Bearer realm=\"tollgate\""));
        check(
            Rejection::Invalid(Invalid::Unknown),
            401,
            Some("Bearer realm=\"tollgate\", error=\"invalid_token\""),
        );
        check(
            Rejection::Forbidden(Forbidden::Org),
            403,
            Some("Bearer realm=\"tollgate\", error=\"insufficient_scope\""),
        );
        check(Rejection::Unavailable, 503, None);
        assert_eq!(header(&Rejection::Unavailable, "retry-after").as_deref(), Some("1"));
        check(Rejection::Busy, 503, None);
        check(Rejection::Unreadable, 500, None);
        assert_eq!(header(&Rejection::Unreadable, "retry-after"), None, "no retry mends it");
        check(Rejection::ProxyFailed(StatusCode::BAD_GATEWAY), 502, None);
        check(Rejection::ProxyFailed(StatusCode::BAD_REQUEST), 400, None);
        assert_eq!(header(&Rejection::Busy, "retry-after").as_deref(), Some("1"));
    }

    #[test]
    fn unknown_and_wrong_secret_read_the_same() {
        let a = Rejection::Invalid(Invalid::Unknown).response("r", "x-request-id", &[]).unwrap().1;
        let b = Rejection::Invalid(Invalid::WrongSecret).response("r", "x-request-id", &[]).unwrap().1;
        let c = Rejection::Invalid(Invalid::Malformed).response("r", "x-request-id", &[]).unwrap().1;
        assert_eq!(a, b);
        assert_eq!(a, c);
    }
}
