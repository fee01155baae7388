//! The admin API's one error type and its mapping to JSON responses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::AuthError;
use crate::lifecycle::LifecycleError;
use crate::store::StoreError;

/// Everything an admin call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No Bearer token.
    #[error("this API needs a Bearer token")]
    Unauthenticated,
    /// The token is refused.
    #[error("the access token is invalid")]
    InvalidToken,
    /// The token is refused, with the verifier's reason.
    #[error("{0}")]
    Refused(&'static str),
    /// Malformed request.
    #[error("{0}")]
    BadRequest(String),
    /// A body that could not be read, with its status (400; 413 too large; 415 not JSON).
    #[error("{1}")]
    Body(StatusCode, String),
    /// Not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// Not found.
    #[error("{0}")]
    NotFound(String),
    /// Taken or ambiguous.
    #[error("{0}")]
    Conflict(String),
    /// The store is unreachable.
    #[error("the store is unreachable; retry shortly")]
    Unavailable,
    /// A change was sent to the store and its answer did not come: it may have been made.
    #[error("the store did not answer in time; the change may still have been made: look (token list, user show) before retrying")]
    Unanswered,
    /// The same, for a change that made a token: the token comes with the answer (its own field,
    /// never the message), the caller's only copy if the change was made.
    #[error(transparent)]
    UnansweredToken(crate::lifecycle::UnansweredToken),
    /// The process is exiting: the call was not begun.
    #[error("the gateway is shutting down; nothing was done: retry on another instance")]
    Stopping,
    /// The calling token's first verification would wait too long.
    #[error("too many new tokens are being verified to check this one now; retry shortly")]
    Busy,
    /// The store refused the change for want of memory: nothing was changed.
    #[error("{0}")]
    StoreFull(String),
    /// Something that should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a caller is told of a record this build cannot decode: its key and the decoder's message
/// (which can quote the stored text) go to the log only (`StoreStats::failed`).
const UNREADABLE: &str = "a stored record cannot be read; the gateway's log names it";

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Invalid(i) => ApiError::Refused(i.description()),
            AuthError::Unavailable(StoreError::Corrupt { .. }) => ApiError::Internal(UNREADABLE.into()),
            AuthError::Unavailable(_) => ApiError::Unavailable,
            AuthError::Busy => ApiError::Busy,
        }
    }
}

impl From<LifecycleError> for ApiError {
    fn from(e: LifecycleError) -> ApiError {
        match e {
            LifecycleError::Forbidden(m) => ApiError::Forbidden(m),
            LifecycleError::NotFound(m) => ApiError::NotFound(m),
            LifecycleError::Conflict(m) => ApiError::Conflict(m),
            LifecycleError::Invalid(m) => ApiError::BadRequest(m),
            LifecycleError::Hash(m) => ApiError::Internal(m),
            LifecycleError::UnansweredToken(u) => ApiError::UnansweredToken(u),
            LifecycleError::Store(StoreError::Unavailable(_)) => ApiError::Unavailable,
            LifecycleError::Store(StoreError::Unanswered(_)) => ApiError::Unanswered,
            LifecycleError::Store(StoreError::Full(why)) => ApiError::StoreFull(why),
            LifecycleError::Store(StoreError::Conflict(k)) => {
                ApiError::Conflict(format!("{k} already exists"))
            }
            LifecycleError::Store(StoreError::NotFound(k)) => ApiError::NotFound(format!("{k} not found")),
            LifecycleError::Store(e @ StoreError::Changed(_)) => {
                ApiError::Conflict(format!("{e}; try again"))
            }
            LifecycleError::Store(StoreError::Corrupt { .. }) => ApiError::Internal(UNREADABLE.into()),
        }
    }
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthenticated => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::InvalidToken | ApiError::Refused(_) => (StatusCode::UNAUTHORIZED, "invalid_token"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ApiError::Body(status, _) => (*status, "invalid_request"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unavailable
            | ApiError::Unanswered
            | ApiError::UnansweredToken(_)
            | ApiError::Busy
            | ApiError::Stopping => (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable"),
            // Not 503: retrying does not help until an operator frees memory (no Retry-After).
            ApiError::StoreFull(_) => (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal_error"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %self, "admin API internal error");
        }
        // A message may quote a value the caller sent, which may be a token pasted into the
        // wrong field: no answer repeats one whole.
        let description = crate::token::redacted_within(&self.to_string()).into_owned();
        let mut body = serde_json::json!({ "error": code, "error_description": description });
        if let ApiError::UnansweredToken(u) = &self {
            body["token"] = u.token.clone().into();
        }
        let body = Json(body);
        let mut response = (status, body).into_response();
        if status == StatusCode::UNAUTHORIZED {
            let value = match code {
                "unauthorized" => "Bearer realm=\"tollgate\"".to_string(),
                _ => format!("Bearer realm=\"tollgate\", error=\"{code}\""),
            };
            if let Ok(v) = http::HeaderValue::from_str(&value) {
                response.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
            }
        }
        // A retry helps where nothing was done; a change that may have been made is looked for
        // first (its message says so), or a client that honours `Retry-After` makes it twice.
        let maybe_made = matches!(self, ApiError::Unanswered | ApiError::UnansweredToken(_));
        if status == StatusCode::SERVICE_UNAVAILABLE && !maybe_made {
            response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
        }
        // A new secret in the answer: kept by no cache, as a 201's is not.
        if matches!(self, ApiError::UnansweredToken(_)) {
            response
                .headers_mut()
                .insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        }
        response
    }
}

/// Axum's own refusals (a query or path segment that does not parse, a method the route lacks)
/// come as plain text or empty; this makes every 4xx the router answers JSON (hyper's `414` and
/// `431`, for a head refused before routing, stay empty), as [`ApiError`]'s are, with
/// the status and other headers (`Allow`) kept.
pub async fn json_refusals(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !status.is_client_error() || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let description = match text.trim() {
        "" => status.canonical_reason().unwrap_or("refused").to_string(),
        text => crate::token::redacted_within(text).into_owned(),
    };
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        _ => "invalid_request",
    };
    // The parts' headers are laid over the new response's: theirs must not win.
    parts.headers.remove(http::header::CONTENT_LENGTH);
    parts.headers.remove(http::header::CONTENT_TYPE);
    let body = Json(serde_json::json!({ "error": code, "error_description": description }));
    (parts, body).into_response()
}
