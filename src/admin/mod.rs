//! The admin API: JSON over HTTP on its own listener, authenticated with Tollgate's own tokens.
//! Handlers are thin: they turn the caller's token into an [`Actor`] and call [`Lifecycle`]; every
//! error becomes a response in one place ([`ApiError`]). The router is a plain function, so it can be
//! served by the Pingora service below or called directly.

mod body;
mod error;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pingora::server::ListenFds;
use pingora::server::ShutdownWatch;
use pingora::services::Service;
use serde::{Deserialize, Serialize};

use crate::auth::Verifier;
use crate::config::Config;
use crate::lifecycle::{
    Actor, CreateService, CredentialsRequest, IssueRequest, Lifecycle, Lifetime, RoleChange, RotateRequest,
};
use crate::policy::Role;
use crate::store::{format_millis, Attributes, Service as ServiceRecord, Store, User, UserStatus};
pub use body::{check_json, Body, OptionalBody};
pub use error::ApiError;

/// What every handler needs.
#[derive(Clone)]
pub struct AdminState {
    /// The config in force.
    pub config: Arc<ArcSwap<Config>>,
    /// Verifies callers' tokens (shares the gateway's cache).
    pub verifier: Arc<Verifier>,
    /// The store.
    pub store: Store,
    /// Every instrument, for `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where a caller's token's use is noted, as the gateway notes its requests'.
    pub last_use: Arc<crate::audit::LastUseLog>,
}

/// The caller, authenticated by a Bearer token.
pub struct Caller(pub Actor);

impl FromRequestParts<AdminState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AdminState) -> Result<Caller, ApiError> {
        let mut sent = parts.headers.get_all(http::header::AUTHORIZATION).iter();
        let header = sent.next().ok_or(ApiError::Unauthenticated)?;
        // Which of two would be taken is the order's choice: refused, as the gateway refuses it.
        if sent.next().is_some() {
            return Err(ApiError::BadRequest("send one Authorization header".into()));
        }
        let value = header.to_str().map_err(|_| ApiError::InvalidToken)?;
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            _ => return Err(ApiError::Unauthenticated),
        };
        if crate::jwt::looks_like_jwt(token) {
            return Err(ApiError::Refused(
                "an ephemeral credential cannot call the admin API; use a personal access or service token",
            ));
        }
        // Run to the end even if the client goes away: a verification dropped mid-run would free
        // its token's turn at argon2 while the run still holds a thread (so that repeated
        // abandoned requests for one id could take every thread), and would lose the proof.
        let verifier = state.verifier.clone();
        let token = token.to_owned();
        let principal = tokio::spawn(async move { verifier.verify(&token).await })
            .await
            .map_err(|e| ApiError::Internal(format!("token verification stopped: {e}")))??;
        if let (Some(headers), Some(slot)) =
            (crate::proxy::headers::deprecation(&principal), parts.extensions.get::<DeprecationSlot>())
        {
            let _ = slot.0.set(headers);
        }
        // A use like any: a token that only ever calls this API is not "never used" in `token
        // list`, and so not taken for a stale one and revoked.
        let client = parts.extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>();
        state.last_use.note(principal.token_id(), client.map(|c| c.0.ip()));
        Ok(Caller(Actor::from_principal(&principal)))
    }
}

/// Where [`Caller`] leaves the `Deprecation` and `Sunset` headers of a token in a rotation's
/// grace, for the layer that adds them to whatever the call answers.
#[derive(Clone, Default)]
struct DeprecationSlot(Arc<std::sync::OnceLock<Box<crate::proxy::headers::Deprecation>>>);

/// Adds the calling token's deprecation headers, if any, to the response.
async fn deprecation_headers(mut req: Request, next: axum::middleware::Next) -> Response {
    let slot = DeprecationSlot::default();
    req.extensions_mut().insert(slot.clone());
    let mut response = next.run(req).await;
    if let Some(headers) = slot.0.get() {
        response.headers_mut().extend(headers.iter().cloned());
    }
    response
}

/// The router with every route.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/v1/whoami", get(whoami))
        .route("/v1/tokens", get(list_tokens).post(issue_token))
        .route("/v1/tokens/revoke", post(revoke_by_name))
        .route("/v1/tokens/{id}", get(get_token))
        .route("/v1/tokens/{id}/revoke", post(revoke_token))
        .route("/v1/tokens/{id}/rotate", post(rotate_token))
        .route("/v1/orgs/{org}/users", get(list_users).post(add_user))
        .route("/v1/orgs/{org}/users/{email}", get(show_user).delete(remove_user))
        .route("/v1/orgs/{org}/users/{email}/role", post(set_user_role))
        .route("/v1/orgs/{org}/users/{email}/suspend", post(suspend_user))
        .route("/v1/orgs/{org}/users/{email}/reactivate", post(reactivate_user))
        .route("/v1/orgs/{org}/services", get(list_services).post(create_service))
        .route("/v1/orgs/{org}/services/{name}", get(show_service).patch(edit_service).delete(delete_service))
        .route("/v1/orgs/{org}/services/{name}/role", post(set_service_role))
        .route("/v1/orgs/{org}/audit", get(audit))
        .route("/v1/orgs/{org}/projects/{project}/credentials", post(issue_credentials))
        .route("/.well-known/jwks.json", get(jwks))
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .layer(axum::middleware::from_fn(no_stray_query))
        .layer(axum::middleware::map_response(error::json_refusals))
        .layer(axum::middleware::from_fn(deprecation_headers))
        // A graceful shutdown waits for admin calls too (a revocation under way is not cut), until
        // hyper has taken their answers: a new secret is not lost to the exit. One that would
        // begin as the process exits is refused, having done nothing.
        .layer(axum::middleware::from_fn(
            |req: axum::extract::Request, next: axum::middleware::Next| async move {
                let Some(in_flight) = crate::drain::InFlight::begin_unless_exiting() else {
                    return ApiError::Stopping.into_response();
                };
                next.run(req).await.map(|body| axum::body::Body::new(Counted { body, _in_flight: in_flight }))
            },
        ))
        // A body is read whole, within `admin.read_timeout`, before the call counts as in flight.
        .layer(axum::middleware::from_fn_with_state(state.clone(), body_in_time))
        // Outermost: a body refused as too large or too slow is logged and counted too.
        .layer(axum::middleware::from_fn_with_state(state.clone(), access))
        .with_state(state)
}

/// An answer's body, which keeps its call counted in flight until hyper has taken all of it.
struct Counted {
    body: axum::body::Body,
    _in_flight: crate::drain::InFlight,
}

impl http_body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, axum::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The calls that read a query string (`GET /v1/tokens?all=true`, the audit's filters). Every
/// other `/v1` call refuses one instead of ignoring it: `POST /v1/tokens?ttl_minutes=1` would
/// make a token that never expires, `rotate?grace_seconds=300` cut the old token off at once, and
/// `revoke?reason=leaked` record no reason. (`/healthz`, `/metrics` and the like are left to
/// probes and scrapers that add their own.)
async fn no_stray_query(req: Request, next: axum::middleware::Next) -> Response {
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str());
    let reads_query = matches!(*req.method(), http::Method::GET | http::Method::HEAD)
        && matches!(route, Some("/v1/tokens" | "/v1/orgs/{org}/audit"));
    let stray = req.uri().query().is_some_and(|q| !q.is_empty());
    if stray && !reads_query && route.is_some_and(|r| r.starts_with("/v1/")) {
        let settings = match *req.method() {
            http::Method::GET | http::Method::HEAD => "it has no settings",
            _ => "its settings go in the JSON body",
        };
        return ApiError::BadRequest(format!(
            "this call takes no query parameters: {settings} (see /openapi.json)"
        ))
        .into_response();
    }
    next.run(req).await
}

/// One line per call (`tollgate::admin_access`) and a count by route template and status, so that
/// someone trying tokens against the API shows. The route is the template
/// (`/v1/orgs/{org}/users/{email}`), never the path as sent, which names emails and token ids.
async fn access(
    State(state): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let response = next.run(req).await;
    let status = response.status().as_u16();
    state.metrics.admin_requests.with_label_values(&[route.as_str(), &status.to_string()]).inc();
    if state.config.load().access_log {
        let method = crate::proxy::loggable_path(method.as_str());
        tracing::info!(target: "tollgate::admin_access", method = %method, route, status, "admin request");
    }
    response
}

/// Largest request body the API reads; a longer one is refused with `413`.
const MAX_BODY_BYTES: usize = 64 * 1024;

fn too_large() -> ApiError {
    let message = format!("the body exceeds the length limit of {} KiB", MAX_BODY_BYTES / 1024);
    ApiError::Body(StatusCode::PAYLOAD_TOO_LARGE, message)
}

/// Reads the request's body whole, at most [`MAX_BODY_BYTES`] and within `admin.read_timeout`
/// (hyper bounds only the head's arrival): a client that stops sending mid-body gets `408` and the
/// connection is closed, instead of holding it, and an admin call's place in a graceful shutdown,
/// for as long as it likes.
async fn body_in_time(
    State(state): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use futures_util::StreamExt;
    // Declared too long by a client that waits for `100 Continue` before it sends: refused at
    // once. (One that sends at once is read up to the limit first: answered before it has sent,
    // it would meet a closed connection instead of the answer.)
    let headers = req.headers();
    let declared =
        headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let waits =
        headers.get(http::header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if waits && declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large().into_response();
    }
    let (parts, body) = req.into_parts();
    let read = async {
        let mut chunks = body.into_data_stream();
        let mut whole = bytes::BytesMut::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| {
                ApiError::Body(StatusCode::BAD_REQUEST, format!("the body could not be read: {e}"))
            })?;
            if whole.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(too_large());
            }
            whole.extend_from_slice(&chunk);
        }
        Ok(whole.freeze())
    };
    let limit = state.config.load().admin.read_timeout;
    let refusal = match tokio::time::timeout(limit, read).await {
        Ok(Ok(whole)) => {
            return next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(whole))).await
        }
        Ok(Err(e)) => e,
        Err(_) => ApiError::Body(
            StatusCode::REQUEST_TIMEOUT,
            format!("the request body did not arrive within {}", humantime::format_duration(limit)),
        ),
    };
    // The rest of the body is not read: the connection cannot carry another request.
    let mut response = refusal.into_response();
    response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
    response
}

/// The OpenAPI document of this API, served at `/openapi.json`.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(http::header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn metrics(State(s): State<AdminState>) -> Response {
    ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render()).into_response()
}

/// Liveness: up, unless something broke that only a restart mends (the embedded store's file
/// after an I/O error), for an orchestrator to restart it; a store that is only unreachable is
/// `/readyz`'s to say, since restarting would not bring it back.
async fn healthz(State(s): State<AdminState>) -> Response {
    match s.store.broken() {
        None => Json(serde_json::json!({ "status": "ok" })).into_response(),
        Some(why) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": "broken", "reason": why })))
                .into_response()
        }
    }
}

async fn readyz(State(s): State<AdminState>) -> Response {
    if crate::drain::stopping() {
        let body =
            serde_json::json!({ "status": "stopping", "reason": "shutting down; take this instance out" });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let pinged = s.store.ping().await;
    // While the invalidation feed is down the instance still serves correctly, from the store
    // (slower, and with more load on it): ready, and saying so.
    let cache = if s.verifier.cache().is_live() { "live" } else { "bypassed" };
    match pinged {
        Ok(()) => Json(serde_json::json!({ "status": "ready", "store": s.store.describe(), "cache": cache }))
            .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "unavailable", "reason": e.to_string() })),
        )
            .into_response(),
    }
}

/// The caller as the API sees them: who, their roles now, and what the calling token may do.
#[derive(Debug, Serialize, Deserialize)]
pub struct WhoAmI {
    /// `user:<id>` or `service:<name>`.
    pub subject: String,
    /// The user's email, if a user (`None` from a gateway before 2026-11-28, which did not say).
    #[serde(default)]
    pub email: Option<String>,
    /// Org.
    pub org: String,
    /// Org role.
    pub org_role: Role,
    /// Roles on single projects (`None` from a gateway before 2026-11-27, which did not say).
    #[serde(default)]
    pub project_roles: Option<std::collections::BTreeMap<String, Role>>,
    /// The calling token's id.
    #[serde(default)]
    pub token_id: Option<String>,
    /// The calling token's scope, if narrowed.
    #[serde(default)]
    pub scope: Option<Vec<String>>,
    /// The calling token's environments, if restricted.
    #[serde(default)]
    pub environments: Option<Vec<String>>,
}

async fn whoami(Caller(a): Caller) -> Json<WhoAmI> {
    Json(WhoAmI {
        subject: a.subject,
        email: a.email,
        org: a.org,
        org_role: a.roles.org,
        project_roles: Some(a.roles.projects),
        token_id: a.token_id.map(|t| t.to_string()),
        scope: a.scope,
        environments: a.environments,
    })
}

macro_rules! lifecycle {
    ($s:expr, $l:ident) => {
        let config = $s.config.load_full();
        let $l = Lifecycle::new(&$s.store, &config);
    };
}

/// The public keys of the configured JWT keys, for anyone verifying what Tollgate signs.
async fn jwks(State(s): State<AdminState>) -> Response {
    match &s.config.load().jwt {
        Some(jwt) => Json(jwt.jwks()).into_response(),
        None => ApiError::NotFound("this gateway has no `jwt` section".into()).into_response(),
    }
}

async fn issue_credentials(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, project)): Path<(String, String)>,
    OptionalBody(req): OptionalBody<CredentialsRequest>,
) -> Response {
    lifecycle!(s, l);
    created(l.issue_credentials(&a, &org, &project, req).await)
}

/// A parameter misspelt is refused, never dropped: the answer would be unfiltered.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    all: bool,
    owner: Option<String>,
}

async fn list_tokens(State(s): State<AdminState>, Caller(a): Caller, Query(q): Query<ListQuery>) -> Response {
    lifecycle!(s, l);
    reply(l.list_tokens(&a, q.all, q.owner.as_deref()).await)
}

async fn issue_token(
    State(s): State<AdminState>,
    Caller(a): Caller,
    OptionalBody(req): OptionalBody<IssueRequest>,
) -> Response {
    lifecycle!(s, l);
    created(l.issue_pat(&a, req).await)
}

async fn get_token(State(s): State<AdminState>, Caller(a): Caller, Path(id): Path<String>) -> Response {
    lifecycle!(s, l);
    reply(l.get_token(&a, &id).await)
}

/// A revocation request.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Revoke the caller's token with this display name (when no id is in the path).
    pub display_name: Option<String>,
    /// Why, kept in the audit log.
    pub reason: Option<String>,
}

async fn revoke_token(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<RevokeRequest>,
) -> Response {
    lifecycle!(s, l);
    if req.display_name.is_some() {
        return ApiError::BadRequest(
            "give the token's id in the path or a `display_name` (POST /v1/tokens/revoke), not both".into(),
        )
        .into_response();
    }
    reply(l.revoke(&a, Some(&id), None, req.reason).await)
}

async fn revoke_by_name(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Body(req): Body<RevokeRequest>,
) -> Response {
    lifecycle!(s, l);
    reply(l.revoke(&a, None, req.display_name.as_deref(), req.reason).await)
}

async fn rotate_token(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path(id): Path<String>,
    OptionalBody(req): OptionalBody<RotateRequest>,
) -> Response {
    lifecycle!(s, l);
    created(l.rotate(&a, &id, req).await)
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserView {
    /// Id (used in `X-Auth-Subject`).
    pub id: String,
    /// Org.
    pub org: String,
    /// Email.
    pub email: String,
    /// `active` or `suspended`.
    pub status: UserStatus,
    /// Org role.
    pub org_role: Role,
    /// Project roles.
    pub project_roles: std::collections::BTreeMap<String, Role>,
    /// Attributes.
    pub attributes: Attributes,
    /// Creation time.
    pub created_at: String,
}

impl From<User> for UserView {
    fn from(u: User) -> UserView {
        UserView {
            id: u.id,
            org: u.org,
            email: u.email,
            status: u.status,
            org_role: u.org_role,
            project_roles: u.project_roles,
            attributes: u.attributes,
            created_at: format_millis(u.created_at),
        }
    }
}

/// A user to add.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddUser {
    /// Email, unique in the org.
    pub email: String,
    /// Org role.
    pub org_role: Role,
    /// Project roles.
    #[serde(default)]
    pub project_roles: std::collections::BTreeMap<String, Role>,
    /// Attributes.
    #[serde(default)]
    pub attributes: Attributes,
    /// Also issue the user's first personal access token (shown once, in the answer).
    #[serde(default)]
    pub issue_token: bool,
    /// That token's lifetime in minutes (with `issue_token`). Left out when not given, so that a
    /// gateway older than the field still takes the body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_minutes: Option<i64>,
    /// That token's expiry as RFC 3339 (with `issue_token`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// An added user, with their first token when one was asked for.
#[derive(Debug, Serialize, Deserialize)]
pub struct AddedUser {
    /// The user.
    #[serde(flatten)]
    pub user: UserView,
    /// Their first token, shown once.
    pub token: Option<String>,
    /// That token's id (as `service create` gives it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_id: Option<String>,
    /// When that token expires (RFC 3339; `null` for never): the configured `tokens.max_ttl`
    /// gives a first token an expiry no one asked for.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "given")]
    pub token_expires_at: Option<Option<String>>,
}

/// A field that is there, `null` included (serde reads a `null` as absent): the CLI prints back
/// what it was answered.
fn given<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

impl AddedUser {
    /// A user added, with their first token (and its expiry) if one was issued.
    pub fn new(user: UserView, token: Option<(String, Option<String>)>) -> AddedUser {
        let (token, token_expires_at) = token.unzip();
        let token_id = token.as_deref().and_then(|t| t.get(..crate::token::ID_LEN)).map(str::to_string);
        AddedUser { user, token, token_id, token_expires_at }
    }
}

async fn list_users(State(s): State<AdminState>, Caller(a): Caller, Path(org): Path<String>) -> Response {
    lifecycle!(s, l);
    reply(l.list_users(&a, &org).await.map(|us| us.into_iter().map(UserView::from).collect::<Vec<_>>()))
}

async fn add_user(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path(org): Path<String>,
    Body(u): Body<AddUser>,
) -> Response {
    lifecycle!(s, l);
    let first_token =
        match (Lifetime { ttl_minutes: u.ttl_minutes, expires: u.expires }).of_first_token(u.issue_token) {
            Ok(first_token) => first_token,
            Err(e) => return ApiError::from(e).into_response(),
        };
    let added = l.add_user(&a, &org, &u.email, u.org_role, u.project_roles, u.attributes, first_token).await;
    created(added.map(|(user, t)| AddedUser::new(user.into(), t.map(|t| (t.token, t.details.expires_at)))))
}

async fn show_user(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, email)): Path<(String, String)>,
) -> Response {
    lifecycle!(s, l);
    reply(l.show_user(&a, &org, &email).await.map(UserView::from))
}

async fn set_user_role(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, email)): Path<(String, String)>,
    Body(change): Body<RoleChange>,
) -> Response {
    lifecycle!(s, l);
    reply(l.set_user_role(&a, &org, &email, change).await.map(UserView::from))
}

/// An optional reason, for suspensions, reactivations and removals (of users and services).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// Why.
    pub reason: Option<String>,
}

async fn suspend_user(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, email)): Path<(String, String)>,
    OptionalBody(r): OptionalBody<Reason>,
) -> Response {
    lifecycle!(s, l);
    reply(l.set_user_status(&a, &org, &email, UserStatus::Suspended, r.reason).await.map(UserView::from))
}

async fn reactivate_user(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, email)): Path<(String, String)>,
    OptionalBody(r): OptionalBody<Reason>,
) -> Response {
    lifecycle!(s, l);
    reply(l.set_user_status(&a, &org, &email, UserStatus::Active, r.reason).await.map(UserView::from))
}

/// A removed user, and how many of their tokens the removal revoked.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemovedUser {
    /// The removed user's email.
    pub removed: String,
    /// How many of the user's working tokens were revoked.
    pub revoked_tokens: usize,
}

async fn remove_user(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, email)): Path<(String, String)>,
    OptionalBody(r): OptionalBody<Reason>,
) -> Response {
    lifecycle!(s, l);
    reply(
        l.remove_user(&a, &org, &email, r.reason)
            .await
            .map(|(removed, revoked_tokens)| RemovedUser { removed, revoked_tokens }),
    )
}

/// A service as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    /// Name.
    pub name: String,
    /// Org.
    pub org: String,
    /// Org role.
    pub org_role: Option<Role>,
    /// Project roles.
    pub project_roles: std::collections::BTreeMap<String, Role>,
    /// Attributes.
    pub attributes: Attributes,
    /// Creation time.
    pub created_at: String,
}

impl From<ServiceRecord> for ServiceView {
    fn from(s: ServiceRecord) -> ServiceView {
        ServiceView {
            name: s.name,
            org: s.org,
            org_role: s.org_role,
            project_roles: s.project_roles,
            attributes: s.attributes,
            created_at: format_millis(s.created_at),
        }
    }
}

/// A created service with its first token (shown once).
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedService {
    /// The service.
    pub service: ServiceView,
    /// Its token, shown once.
    pub token: String,
    /// The token's id.
    pub token_id: String,
    /// When the token expires (RFC 3339; `null` for never): the configured `tokens.max_ttl` gives
    /// a service's first token an expiry no one asked for.
    #[serde(default)]
    pub token_expires_at: Option<String>,
}

async fn list_services(State(s): State<AdminState>, Caller(a): Caller, Path(org): Path<String>) -> Response {
    lifecycle!(s, l);
    reply(l.list_services(&a, &org).await.map(|ss| ss.into_iter().map(ServiceView::from).collect::<Vec<_>>()))
}

async fn create_service(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path(org): Path<String>,
    Body(mut req): Body<CreateService>,
) -> Response {
    lifecycle!(s, l);
    // The path names the org; a body naming another is a mistake, not a choice.
    if !req.org.is_empty() && req.org != org {
        let msg = format!("the body names org {:?}, the path {org:?}", req.org);
        return ApiError::from(crate::lifecycle::LifecycleError::Invalid(msg)).into_response();
    }
    req.org = org;
    created(l.create_service(&a, req).await.map(|(svc, t)| CreatedService {
        service: svc.into(),
        token_id: t.details.id,
        token_expires_at: t.details.expires_at,
        token: t.token,
    }))
}

async fn show_service(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, name)): Path<(String, String)>,
) -> Response {
    lifecycle!(s, l);
    reply(l.show_service(&a, &org, &name).await.map(ServiceView::from))
}

/// A service edit: rename and/or replace attributes.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditService {
    /// New name.
    pub new_name: Option<String>,
    /// New attributes; `{}` clears them.
    pub attributes: Option<Attributes>,
}

async fn edit_service(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, name)): Path<(String, String)>,
    Body(e): Body<EditService>,
) -> Response {
    lifecycle!(s, l);
    reply(l.edit_service(&a, &org, &name, e.new_name, e.attributes).await.map(ServiceView::from))
}

async fn set_service_role(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, name)): Path<(String, String)>,
    Body(change): Body<RoleChange>,
) -> Response {
    lifecycle!(s, l);
    reply(l.set_service_role(&a, &org, &name, change).await.map(ServiceView::from))
}

/// A deleted service, and how many of its tokens the deletion revoked.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeletedService {
    /// The deleted service's name.
    pub deleted: String,
    /// Its org.
    pub org: String,
    /// How many of its working tokens were revoked (anything they minted stops too).
    pub revoked_tokens: usize,
}

async fn delete_service(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path((org, name)): Path<(String, String)>,
    OptionalBody(r): OptionalBody<Reason>,
) -> Response {
    lifecycle!(s, l);
    let deleted = l.delete_service(&a, &org, &name, r.reason).await;
    reply(deleted.map(|revoked_tokens| DeletedService { deleted: name, org, revoked_tokens }))
}

/// See [`ListQuery`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    token_id: Option<String>,
    limit: Option<usize>,
}

async fn audit(
    State(s): State<AdminState>,
    Caller(a): Caller,
    Path(org): Path<String>,
    Query(q): Query<AuditQuery>,
) -> Response {
    lifecycle!(s, l);
    reply(l.audit_log(&a, &org, q.token_id.as_deref(), q.limit.unwrap_or(100)).await)
}

fn reply<T: Serialize>(r: Result<T, crate::lifecycle::LifecycleError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// A `201`, which here always carries a new secret (a token, a credential): `no-store`, so that no
/// cache between keeps it (RFC 6749, section 5.1).
fn created<T: Serialize>(r: Result<T, crate::lifecycle::LifecycleError>) -> Response {
    match r {
        Ok(v) => {
            let no_store = [(http::header::CACHE_CONTROL, "no-store")];
            (StatusCode::CREATED, no_store, Json(v)).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The admin API as a Pingora service, on a listener bound before the server starts.
pub struct AdminService {
    listener: Option<std::net::TcpListener>,
    state: AdminState,
}

impl AdminService {
    /// Serves `state` on an already-bound listener (so a taken port fails at start, with a message).
    pub fn new(listener: std::net::TcpListener, state: AdminState) -> AdminService {
        AdminService { listener: Some(listener), state }
    }
}

#[async_trait]
impl Service for AdminService {
    async fn start_service(&mut self, _fds: Option<ListenFds>, mut shutdown: ShutdownWatch, _per_fd: usize) {
        let Some(listener) = self.listener.take() else { return };
        let listener =
            match listener.set_nonblocking(true).and_then(|()| tokio::net::TcpListener::from_std(listener)) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "admin listener unusable");
                    return;
                }
            };
        let app = router(self.state.clone());
        let connections = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    // A connection gone before it was accepted concerns that connection alone.
                    Err(e) if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionAborted
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::ConnectionRefused
                            | std::io::ErrorKind::Interrupted
                    ) => continue,
                    Err(e) => {
                        // Out of file descriptors, most likely: give the ones in use time to close.
                        tracing::warn!(error = %e, "admin API cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            let read_timeout = self.state.config.load().admin.read_timeout;
            let app = app.clone();
            let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), req)
            });
            // hyper's header read timeout also ends a connection left idle between requests.
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(read_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let connection = connections.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "admin API connection ended");
                }
            });
        }
        // New connections are refused at once rather than left in the backlog until the exit.
        drop(listener);
        // Requests under way are answered; idle connections are closed.
        connections.shutdown().await;
    }

    fn name(&self) -> &str {
        "admin API"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{CreateService, CredentialsRequest, IssueRequest, RoleChange, RotateRequest};

    /// `user add --issue-token --json` prints what it was answered: a token that never expires
    /// keeps its `"token_expires_at": null`, as `bootstrap --json` prints it.
    #[test]
    fn a_user_added_with_a_token_reads_back_as_it_was_answered() {
        let user = UserView {
            id: "u1".into(),
            org: "acme".into(),
            email: "a@acme.io".into(),
            status: UserStatus::Active,
            org_role: crate::policy::Role::Viewer,
            project_roles: Default::default(),
            attributes: Default::default(),
            created_at: "2026-11-27T00:00:00Z".into(),
        };
        let none = AddedUser::new(user.clone(), None);
        let never = AddedUser::new(user.clone(), Some(("tgp_x".repeat(3), None)));
        let soon = AddedUser::new(user, Some(("tgp_x".repeat(3), Some("2026-12-01T00:00:00Z".into()))));
        for added in [none, never, soon] {
            let answered = serde_json::to_value(&added).unwrap();
            let read: AddedUser = serde_json::from_value(answered.clone()).unwrap();
            assert_eq!(serde_json::to_value(&read).unwrap(), answered);
        }
    }

    /// Every operation of the API describes the JSON error of any status it does not list (a
    /// generated client otherwise has no type for a 405, 413 or 500).
    #[test]
    fn every_api_operation_describes_its_errors_whatever_the_status() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let error = &doc["components"]["responses"]["OtherError"]["content"]["application/json"]["schema"];
        assert_eq!(error["$ref"], "#/components/schemas/Error");
        let mut operations = 0;
        for (path, methods) in doc["paths"].as_object().unwrap() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for (method, op) in methods.as_object().unwrap() {
                let default = &op["responses"]["default"]["$ref"];
                assert_eq!(default, "#/components/responses/OtherError", "{method} {path}");
                operations += 1;
            }
        }
        assert!(operations > 20, "{operations}");
    }

    /// Every request body the API takes is described field for field (clients are generated from
    /// the document, and the bodies refuse unknown fields).
    #[test]
    fn the_openapi_request_schemas_name_exactly_the_fields_the_bodies_take() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let add_user = AddUser {
            email: String::new(),
            org_role: crate::policy::Role::Guest,
            project_roles: Default::default(),
            attributes: Default::default(),
            issue_token: false,
            ttl_minutes: Some(1),
            expires: Some(String::new()),
        };
        let create_service =
            CreateService { ttl_minutes: Some(1), expires: Some(String::new()), ..CreateService::default() };
        let bodies = [
            (
                "IssueRequest",
                serde_json::to_value(IssueRequest {
                    service: Some(String::new()),
                    user: Some(String::new()),
                    ..IssueRequest::default()
                }),
            ),
            ("RotateRequest", serde_json::to_value(RotateRequest::default())),
            ("RevokeRequest", serde_json::to_value(RevokeRequest::default())),
            ("Reason", serde_json::to_value(Reason::default())),
            ("RoleChange", serde_json::to_value(RoleChange::default())),
            ("AddUser", serde_json::to_value(add_user)),
            ("CreateService", serde_json::to_value(create_service)),
            ("EditService", serde_json::to_value(EditService::default())),
            ("CredentialsRequest", serde_json::to_value(CredentialsRequest::default())),
        ];
        for (name, body) in bodies {
            let fields: Vec<String> = body.unwrap().as_object().unwrap().keys().cloned().collect();
            let schema = &doc["components"]["schemas"][name];
            let mut described: Vec<String> =
                schema["properties"].as_object().unwrap().keys().cloned().collect();
            described.sort();
            let mut fields = fields;
            fields.sort();
            assert_eq!(described, fields, "{name}");
            assert_eq!(schema["additionalProperties"], false, "{name}");
        }
    }

    /// Every answer the API gives is described field for field, and every success of every
    /// operation names its answer's schema (clients are generated from the document).
    #[test]
    fn the_openapi_response_schemas_name_exactly_the_fields_the_answers_carry() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let time = || Some("2026-11-27T00:00:00Z".to_string());
        let roles = std::collections::BTreeMap::from([("shop".to_string(), Role::Editor)]);
        let mut attributes = Attributes::new();
        attributes.insert("team".into(), "payments".into());
        let token = crate::lifecycle::TokenView {
            id: "tgp_a1B2c3".into(),
            kind: "pat".into(),
            org: "acme".into(),
            owner: "user:a@acme.io".into(),
            display_name: Some("ci".into()),
            scope: Some("read-only".into()),
            permissions: Some(vec!["read".into()]),
            environments: Some(vec!["staging".into()]),
            created_at: "2026-11-27T00:00:00Z".into(),
            expires_at: time(),
            status: "rotated".into(),
            revoked_at: time(),
            revoke_reason: Some("rotated to tgp_d4E5f6".into()),
            rotated_to: Some("tgp_d4E5f6".into()),
            last_used_at: time(),
            last_used_ip: Some("192.0.2.1".into()),
        };
        let user = UserView {
            id: "u1".into(),
            org: "acme".into(),
            email: "a@acme.io".into(),
            status: UserStatus::Active,
            org_role: Role::Viewer,
            project_roles: roles.clone(),
            attributes: attributes.clone(),
            created_at: "2026-11-27T00:00:00Z".into(),
        };
        let added = AddedUser {
            user: user.clone(),
            token: Some("tgp_x".repeat(3)),
            token_id: Some("tgp_xtgp_x".into()),
            token_expires_at: Some(time()),
        };
        let service = ServiceView {
            name: "etl".into(),
            org: "acme".into(),
            org_role: Some(Role::Viewer),
            project_roles: roles.clone(),
            attributes,
            created_at: "2026-11-27T00:00:00Z".into(),
        };
        let created = CreatedService {
            service: service.clone(),
            token: "tgs_x".repeat(3),
            token_id: "tgs_xtgs_x".into(),
            token_expires_at: time(),
        };
        let audit: crate::lifecycle::AuditEntry = crate::store::AuditEvent {
            at: crate::lifecycle::AuditTime("2026-11-27T00:00:00Z".into()),
            org: "acme".into(),
            actor: "user:u1".into(),
            action: "token.rotate".into(),
            target: "tgp_a1B2c3".into(),
            token_id: Some("tgp_a1B2c3".into()),
            by_token: Some("tgp_g7H8i9".into()),
            actor_email: Some("ann@acme.io".into()),
            reason: Some("scheduled".into()),
            details: serde_json::json!({ "new_token_id": "tgp_d4E5f6", "grace_seconds": 0 }),
        };
        let whoami = WhoAmI {
            subject: "user:u1".into(),
            email: Some("ann@acme.io".into()),
            org: "acme".into(),
            org_role: Role::Viewer,
            project_roles: Some(roles),
            token_id: Some("tgp_a1B2c3".into()),
            scope: Some(vec!["read".into()]),
            environments: Some(vec!["staging".into()]),
        };
        let credential = crate::lifecycle::IssuedCredential {
            token: "eyJ.eyJ.sig".into(),
            token_type: "Bearer".into(),
            id: "a1B2c3d4E5f6g7H8".into(),
            subject: "ephemeral:user:u1".into(),
            org: "acme".into(),
            project: "shop".into(),
            permissions: Some(vec!["read".into()]),
            environments: Some(vec!["staging".into()]),
            expires_at: "2026-11-27T00:05:00Z".into(),
            expires_in: 300,
        };
        let issued = crate::lifecycle::IssuedToken { token: "tgp_x".repeat(3), details: token.clone() };
        let removed = RemovedUser { removed: user.email.clone(), revoked_tokens: 2 };
        let (deleted, org) = (service.name.clone(), service.org.clone());
        let deleted = DeletedService { deleted, org, revoked_tokens: 1 };
        let answers = [
            ("TokenView", serde_json::to_value(token)),
            ("IssuedToken", serde_json::to_value(issued)),
            ("UserView", serde_json::to_value(user)),
            ("AddedUser", serde_json::to_value(added)),
            ("RemovedUser", serde_json::to_value(removed)),
            ("ServiceView", serde_json::to_value(service)),
            ("CreatedService", serde_json::to_value(created)),
            ("DeletedService", serde_json::to_value(deleted)),
            ("AuditEntry", serde_json::to_value(audit)),
            ("WhoAmI", serde_json::to_value(whoami)),
            ("IssuedCredential", serde_json::to_value(credential)),
        ];
        for (name, answer) in answers {
            let answer = answer.unwrap();
            let mut fields: Vec<&String> = answer.as_object().unwrap().keys().collect();
            fields.sort();
            let schema = &doc["components"]["schemas"][name];
            let properties = schema["properties"].as_object().unwrap_or_else(|| panic!("no schema {name}"));
            let mut described: Vec<&String> = properties.keys().collect();
            described.sort();
            assert_eq!(described, fields, "{name}");
            for required in schema["required"].as_array().into_iter().flatten() {
                let required = required.as_str().unwrap();
                assert!(properties.contains_key(required), "{name}: {required} is required, not described");
            }
        }
        // A route added later without its answer's schema fails here.
        let mut successes = 0;
        for (path, methods) in doc["paths"].as_object().unwrap() {
            if !path.starts_with("/v1/") {
                continue;
            }
            for (method, op) in methods.as_object().unwrap() {
                for status in ["200", "201"] {
                    let Some(success) = op["responses"].get(status) else { continue };
                    let schema = &success["content"]["application/json"]["schema"];
                    let named = schema.get("items").unwrap_or(schema)["$ref"].as_str();
                    let name = named.and_then(|r| r.strip_prefix("#/components/schemas/"));
                    let name = name.unwrap_or_else(|| panic!("{method} {path}: {status} names no schema"));
                    let described = &doc["components"]["schemas"][name]["properties"];
                    assert!(described.is_object(), "{method} {path}: no schema {name}");
                    successes += 1;
                }
            }
        }
        assert!(successes > 20, "{successes}");
    }
}
