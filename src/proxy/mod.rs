//! The Pingora `ProxyHttp` implementation. Each phase is a few lines that delegate:
//! `request_filter` matches the route, takes the credential, verifies and authorizes it, and keeps
//! the resulting [`Permit`] in the request context (or answers the client itself);
//! `upstream_peer` and `upstream_request_filter` need that permit to pick the upstream and to
//! strip and inject headers, so no request reaches an upstream unchecked.

pub mod credential;
pub mod headers;
pub mod reject;

use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType};

use crate::audit::LastUseLog;
use crate::auth::Verifier;
use crate::config::Config;
use crate::metrics::ProxyMetrics;
use crate::policy::{self, Permit};
use crate::route::{normalize_host, Route};
use reject::Rejection;

/// The gateway: hot-swappable config and the verifier.
pub struct Gateway {
    config: Arc<ArcSwap<Config>>,
    verifier: Arc<Verifier>,
    last_use: Arc<LastUseLog>,
    metrics: ProxyMetrics,
    identity_headers: headers::IdentityHeaders,
}

/// Per-request state.
pub struct RequestCtx {
    _in_flight: crate::drain::InFlight,
    /// Made once, shared (not copied) by the upstream request, the response and the logs.
    request_id: HeaderValue,
    route: Option<Arc<Route>>,
    config: Option<Arc<Config>>,
    permit: Option<Permit>,
    rejection: Option<Rejection>,
    /// A token in a rotation's grace: the headers that say so, on any answer.
    deprecation: Option<Box<headers::Deprecation>>,
    /// The upstream address last tried ([`Route::upstream_after`]'s index) and how many were.
    upstream: Option<(usize, u32)>,
    /// `client_body_timeout`, to bound the body's reads again once its first piece has come,
    /// where the wait for it was the route's (see `request_filter`).
    body_wait: Option<std::time::Duration>,
}

impl Gateway {
    /// A gateway serving `config` (which may be swapped while running) with `verifier`, noting
    /// each token's last use in `last_use`.
    pub fn new(
        config: Arc<ArcSwap<Config>>,
        verifier: Arc<Verifier>,
        last_use: Arc<LastUseLog>,
        metrics: ProxyMetrics,
    ) -> Gateway {
        Gateway { config, verifier, last_use, metrics, identity_headers: headers::IdentityHeaders::default() }
    }

    /// Route, credential, verification, authorization: a permit or the reason for refusal.
    async fn admit(
        &self,
        config: &Config,
        req: &RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<Permit, Rejection> {
        // Upstreams disagree on a method in lower case: Django, Flask and Symfony upper-case it
        // (`delete` runs DELETE), Go and servlets keep it (`get` is not GET there), so no one
        // permission fits it. Refused, as nginx does.
        if req.method.as_str().bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(Rejection::BadRequest("the request method must be in upper case"));
        }
        // Framing Pingora passes on changed or as written, which an upstream reads otherwise:
        // `Transfer-Encoding: gzip, chunked` goes on as plain `chunked` (the body then misread; so
        // would a second line after a first `chunked`), a `Content-Length` list or repeated line
        // as written. Refused, as nginx refuses them.
        let mut te = req.headers.get_all(http::header::TRANSFER_ENCODING).iter();
        let chunked = |v: &HeaderValue| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked");
        if te.next().is_some_and(|first| !chunked(first)) || te.next().is_some() {
            return Err(Rejection::BadRequest("a Transfer-Encoding other than one chunked is not supported"));
        }
        let mut cl = req.headers.get_all(http::header::CONTENT_LENGTH).iter();
        if cl.next().is_some_and(|first| first.as_bytes().contains(&b',')) || cl.next().is_some() {
            return Err(Rejection::BadRequest("Content-Length must be one number, on one line"));
        }
        let mut hosts = req.headers.get_all(http::header::HOST).iter();
        let header_host = hosts.next();
        if hosts.next().is_some() {
            return Err(Rejection::BadRequest("the Host header appears more than once"));
        }
        let header_host = header_host
            .map(|h| h.to_str().map_err(|_| Rejection::BadRequest("the Host header is not text")))
            .transpose()?;
        // An absolute-form target (`GET http://host/path`, kept by Pingora only in the raw
        // target, not in `uri`) must agree with the Host header, and come with one: routing is on
        // `Host`. So must every HTTP/1.1 request (RFC 9112, section 3.2).
        let host = match (target_host(req)?, header_host) {
            // Pingora's own check (a byte-exact comparison) refuses an HTTP/1 request this would
            // before Tollgate sees it; this one stands for any protocol that does not.
            (Some(target), Some(header))
                if normalize_host(target).map_err(Rejection::BadRequest)?
                    != normalize_host(header).map_err(Rejection::BadRequest)? =>
            {
                return Err(Rejection::BadRequest(
                    "the request target and the Host header name different hosts",
                ));
            }
            (Some(_), None) => {
                return Err(Rejection::BadRequest("a full-URL request target needs a Host header too"))
            }
            (None, None) if req.version == http::Version::HTTP_11 => {
                return Err(Rejection::BadRequest("an HTTP/1.1 request needs a Host header"))
            }
            (_, header) => header,
        };
        let route = config.routes.route(host, req.uri.path()).map_err(Rejection::BadRequest)?;
        let route = route.ok_or(Rejection::NoRoute)?.clone();
        // Rails (and Django, Laravel or Express told to trust the proxy, which Tollgate is) route
        // by a forwarded host before `Host`: one naming a host whose routes differ is refused.
        if config.routes.names_hosts() {
            for forwarded in forwarded_hosts(req)? {
                let theirs = config.routes.route(Some(forwarded), req.uri.path());
                if !matches!(theirs, Ok(Some(r)) if Arc::ptr_eq(r, &route)) {
                    return Err(Rejection::BadRequest(
                        "X-Forwarded-Host, X-Original-Host or Forwarded names a host routed otherwise than Host",
                    ));
                }
            }
        }
        ctx.route = Some(route.clone());
        if route.public {
            return Ok(Permit::public(route));
        }
        let presented = credential::extract(&config.credentials, &route, req)?;
        let principal = self.verifier.verify_credential(presented, config.jwt.as_ref()).await?;
        ctx.deprecation = headers::deprecation(&principal);
        let permit =
            policy::authorize(&config.policy, route, &req.method, principal).map_err(Rejection::Forbidden)?;
        // A request that asks the upstream's framework to run it as another method (Express's
        // method-override, Symfony, Rails, Laravel on a POST; Slim 3 and 4 take the header on any
        // method, a GET included) needs that method's permission too.
        for method in overridden_methods(req)? {
            permit.allows(&method).map_err(Rejection::Forbidden)?;
        }
        Ok(permit)
    }
}

/// The hosts a request's `X-Forwarded-Host` and `X-Original-Host` (Yii 2's; in any spelling, each
/// of a list) and `Forwarded` (`host=`, RFC 7239) headers name; refused when such a header is not
/// text (its hosts unknown).
fn forwarded_hosts(req: &RequestHeader) -> Result<Vec<&str>, Rejection> {
    let mut hosts = Vec::new();
    for (name, value) in &req.headers {
        let name = name.as_str().as_bytes();
        let xfh = headers::spelled_alike(name, b"x-forwarded-host")
            || headers::spelled_alike(name, b"x-original-host");
        if !xfh && !headers::spelled_alike(name, b"forwarded") {
            continue;
        }
        let text = value.to_str().map_err(|_| {
            Rejection::BadRequest("X-Forwarded-Host, X-Original-Host or Forwarded is not text")
        })?;
        for element in text.split(',') {
            if xfh {
                hosts.push(element.trim());
                continue;
            }
            let pairs = element.split(';').filter_map(|pair| pair.split_once('='));
            hosts.extend(
                pairs
                    .filter(|(key, _)| key.trim().eq_ignore_ascii_case("host"))
                    .map(|(_, value)| value.trim().trim_matches('"')),
            );
        }
    }
    hosts.retain(|host| !host.is_empty());
    Ok(hosts)
}

/// Headers through which clients ask a framework to treat a POST as another method, matched in
/// every spelling an upstream may read as them (Rack reads `X_HTTP_Method_Override`, PHP behind
/// Caddy `X.HTTP.Method.Override`, as the same header).
const METHOD_OVERRIDE_HEADERS: [&[u8]; 3] =
    [b"x-http-method-override", b"x-http-method", b"x-method-override"];
// Their lengths, as `overridden_methods` tests them first.
const _: () = assert!(
    METHOD_OVERRIDE_HEADERS[0].len() == 22
        && METHOD_OVERRIDE_HEADERS[1].len() == 13
        && METHOD_OVERRIDE_HEADERS[2].len() == 17
);

/// The methods a request asks to be run as: by the override headers, or the `_method` query
/// parameter. (A `_method` field in a form body is not seen: bodies are never buffered.)
fn overridden_methods(req: &RequestHeader) -> Result<Vec<http::Method>, Rejection> {
    // Frameworks read the name in any case.
    let method = |name: &[u8]| {
        http::Method::from_bytes(&name.trim_ascii().to_ascii_uppercase())
            .map_err(|_| Rejection::BadRequest("a method override names no HTTP method"))
    };
    let mut methods = Vec::new();
    // By name first (each name once, cheaper than every value), then each value of a match.
    for name in req.headers.keys() {
        let spelled = name.as_str().as_bytes();
        // The lengths first: most names are none of these (this runs on every request).
        if matches!(spelled.len(), 22 | 13 | 17)
            && METHOD_OVERRIDE_HEADERS.iter().any(|n| headers::spelled_alike(spelled, n))
        {
            for value in req.headers.get_all(name) {
                methods.push(method(value.as_bytes())?);
            }
        }
    }
    // Most requests have no query: nothing to decode (this runs on every request).
    if let Some(query) = req.uri.query().filter(|q| !q.is_empty()) {
        for (key, value) in credential::query_pairs(query) {
            if is_method_param(key) {
                methods.push(method(&credential::form_decoded(value.as_bytes()))?);
            }
        }
    }
    Ok(methods)
}

/// A query key as `_method`, read as PHP reads keys (Symfony, Laravel; [`credential::reads_as`]):
/// `?.method=`, `?+_method=` and `?_method%00x=` are `_method` there; `?+method=` is `method`, and
/// a key starting with `[` is dropped. In its case only: no framework reads `_METHOD` as it.
fn is_method_param(key: &str) -> bool {
    credential::reads_as(key.as_bytes(), "_method", false)
}

/// The host of an absolute-form request target, without user info; `None` for the usual
/// origin form (`/path`). Any other target is refused: Pingora routes one with no authority
/// (`admin/users`, `x:/admin`, `*`) as `/` but sends its raw bytes upstream, where a lenient
/// server (gunicorn with Flask) reads `admin/users` as `/admin/users`.
fn target_host(req: &RequestHeader) -> Result<Option<&str>, Rejection> {
    use pingora::http::authority::{raw_target_authority, RawTargetAuthority};
    let raw = req.raw_path();
    match raw_target_authority(raw) {
        RawTargetAuthority::None if raw.starts_with(b"/") => Ok(None),
        RawTargetAuthority::None => {
            Err(Rejection::BadRequest("the request target is neither a path (/...) nor a full URL"))
        }
        RawTargetAuthority::AmbiguousAuthority => {
            Err(Rejection::BadRequest("the request target's host is ambiguous"))
        }
        RawTargetAuthority::Absolute { authority, .. } => {
            let host = authority.rsplit(|&b| b == b'@').next().unwrap_or_default();
            match std::str::from_utf8(host) {
                Ok(host) if !host.is_empty() => Ok(Some(host)),
                _ => Err(Rejection::BadRequest("the request target has no readable host")),
            }
        }
    }
}

/// 128 random bits as 32 lowercase hex digits.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (pair, byte) in text.chunks_exact_mut(2).zip(rand::random::<u128>().to_ne_bytes()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 0xf)];
    }
    HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("-"))
}

/// The request id as text (always ASCII hex).
fn id_text(id: &HeaderValue) -> &str {
    id.to_str().unwrap_or("-")
}

/// A request path as logs show it: a path segment that holds a Tollgate token anywhere (a
/// client's mistake: `/items/tgp_…`, `/x;key=tgp_…`, percent-encoded or not) is logged as the
/// token id, and one that holds something like a JWT as `eyJ…`. A path without a token prefix, a
/// JWT's start or a percent-escape comes back as it is, unallocated. So is a request method
/// (the proxy's and the admin API's access lines): any token of characters a client may send as
/// one, a pasted token included (`curl -X "$TOKEN"`).
pub(crate) fn loggable_path(path: &str) -> std::borrow::Cow<'_, str> {
    let suspect = crate::token::PREFIXES.iter().chain(&["eyJ", "%"]).any(|p| path.contains(p));
    if !suspect {
        return std::borrow::Cow::Borrowed(path);
    }
    let cut: Vec<String> = path
        .split('/')
        .map(|segment| {
            // Decoded for as long as that changes it: a client that escaped an escaped URL sent
            // `%2574gp_…`, which one decoding leaves as `%74gp_…`. A few rounds at most: a
            // segment still changing after them (`%252525…`, each round a pass over it) is not
            // shown, rather than read again and again on every request that sends one.
            let mut form = std::borrow::Cow::Borrowed(segment);
            for round in 0..=DECODINGS {
                if let Some(cut) = crate::token::redacted(&form) {
                    return cut;
                }
                let decoded = percent_encoding::percent_decode_str(&form).decode_utf8_lossy();
                if decoded == form {
                    return segment.to_string();
                }
                if round == DECODINGS {
                    break;
                }
                form = std::borrow::Cow::Owned(decoded.into_owned());
            }
            "…".to_string()
        })
        .collect();
    std::borrow::Cow::Owned(cut.join("/"))
}

/// How many times [`loggable_path`] percent-decodes a segment, looking for a token in each form.
const DECODINGS: usize = 4;

/// An error as logs show it: where and what, and the system's reason (`Connection refused`), but
/// never its context, which for a head Pingora could not parse quotes the head (an upstream's
/// `Set-Cookie`, a client's credential).
fn loggable_error(e: &Error) -> String {
    let mut text = format!("{} {}", e.esource().as_str(), e.etype().as_str());
    if let Some(io) = e.root_cause().downcast_ref::<std::io::Error>() {
        text.push_str(": ");
        text.push_str(&io.to_string());
    }
    text
}

/// Whether the request asks for its connection to be closed in a `Connection` header after the
/// first (RFC 9110: the lines are one list), which Pingora does not read: `Connection: foo` then
/// `Connection: close` left the connection open for the keep-alive timeout.
fn asks_to_close(req: &RequestHeader) -> bool {
    let mut lines = req.headers.get_all(http::header::CONNECTION).iter();
    lines.next();
    lines.any(|line| {
        line.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// Bounds how long a client's connection waits idle for its next request (`keepalive_timeout`;
/// Pingora's own default waits forever), where the client keeps it open at all: HTTP/1.1 without
/// `Connection: close`, or HTTP/1.0 with `Connection: keep-alive`.
pub fn bound_keepalive(session: &mut Session, idle_seconds: Option<u64>) {
    if session.get_keepalive().is_some() {
        session.set_keepalive(idle_seconds);
    }
}

fn missing_permit() -> Box<Error> {
    Error::explain(ErrorType::InternalError, "request reached the upstream phase without a permit")
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    /// No downstream modules. Pingora's default adds its response compression module, disabled,
    /// which still costs every request an allocation and two boxed filter calls; the gateway
    /// never compresses (bodies pass through untouched), so it goes.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _in_flight: crate::drain::InFlight::begin(),
            request_id: new_request_id(),
            route: None,
            config: None,
            permit: None,
            rejection: None,
            deprecation: None,
            upstream: None,
            body_wait: None,
        }
    }

    /// Verifies and authorizes; keeps the permit, or answers the client and stops.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> pingora::Result<bool> {
        let config = self.config.load_full();
        ctx.config = Some(config.clone());
        // Once a shutdown has begun, no connection is kept for a next request that would find the
        // listener gone and the connection reset.
        bound_keepalive(session, if crate::drain::stopping() { None } else { config.keepalive });
        if asks_to_close(session.req_header()) {
            session.set_keepalive(None);
        }
        // A next request (or a stray CRLF) that arrives while this one is being answered waits
        // for its turn (RFC 9112, section 9.3.2) instead of failing this one, which the upstream
        // may already have carried out, as a malformed request.
        session.set_pipelining_enabled(true);
        // A client that stops taking its answer (reads nothing, its window full) lets go of its
        // connection, and of the upstream's, after `client_send_timeout`, as behind nginx.
        session.set_write_timeout(Some(config.client_send_timeout));
        // An HTTP/1.0 client is sent no informational answer (a `103 Early Hints`), which it
        // would read as its answer (RFC 9110, section 15.2).
        if session.req_header().version == http::Version::HTTP_10 {
            session.set_ignore_info_resp(true);
        }
        let timer = self.metrics.auth_latency.start_timer();
        let admitted = self.admit(&config, session.req_header(), ctx).await;
        timer.observe_duration();
        match admitted {
            Ok(permit) => {
                // Each read of the body waits `client_body_timeout`, but for a client waiting on
                // the upstream: an upgraded connection's client side (a WebSocket's), and one that
                // waits for the upstream's `100 Continue` before it sends its body (until its
                // first piece comes: `request_body_filter`). Those wait as long as the route waits
                // on its upstream (an idle WebSocket needs a longer `upstream_timeouts.read`, and
                // gets it both ways).
                let (wait, route_wait) = (config.client_body_timeout, permit.route().timeouts.read);
                if route_wait > wait && session.is_upgrade_req() {
                    session.set_read_timeout(Some(route_wait));
                } else if route_wait > wait
                    && pingora::protocols::http::v1::common::is_expect_continue_req(session.req_header())
                {
                    ctx.body_wait = Some(wait);
                    session.set_read_timeout(Some(route_wait));
                } else {
                    session.set_read_timeout(Some(wait));
                }
                ctx.permit = Some(permit);
                Ok(false)
            }
            Err(rejection) => {
                // Kept before it is sent: if writing it fails (a client gone), the logging phase
                // must still count and log the request as refused, never as allowed.
                let rejection = ctx.rejection.insert(rejection);
                let id = id_text(&ctx.request_id);
                let extra = ctx.deprecation.as_deref().map_or(&[][..], |d| &d[..]);
                rejection.send(session, id, config.identity.request_id_header.as_str(), extra).await?;
                Ok(true)
            }
        }
    }

    /// The body a client waited on the upstream's `100 Continue` for has begun to come: its other
    /// pieces wait `client_body_timeout` again.
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<bytes::Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        if ctx.body_wait.is_some() && body.as_ref().is_some_and(|b| !b.is_empty()) {
            session.set_read_timeout(ctx.body_wait.take());
        }
        Ok(())
    }

    /// The permit's route names the upstream.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<Box<HttpPeer>> {
        let permit = ctx.permit.as_ref().ok_or_else(missing_permit)?;
        let route = permit.route();
        let (i, addr) = route
            .upstream_after(ctx.upstream.map(|(i, _)| i))
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "route has no upstream"))?;
        ctx.upstream = Some((i, ctx.upstream.map_or(1, |(_, tries)| tries + 1)));
        let mut peer = Box::new(HttpPeer::new(addr, false, String::new()));
        route.timeouts.apply(&mut peer);
        Ok(peer)
    }

    /// A connection that could not be made (refused, unreachable, past `upstream_timeouts.connect`)
    /// sent nothing: the route's next upstream address not passed over is tried, up to as many
    /// tries as the route has addresses, as nginx's `proxy_next_upstream error timeout` does; the
    /// failed address is passed over for a while. Then Pingora's 502 (or 504).
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let Some(route) = ctx.permit.as_ref().map(|p| p.route()) else { return e };
        if let Some((i, tries)) = ctx.upstream {
            route.upstream_failed(i);
            if (tries as usize) < route.upstreams.len() {
                tracing::debug!(
                    request_id = id_text(&ctx.request_id),
                    error = loggable_error(&e),
                    "trying the route's next upstream"
                );
                e.set_retry(true);
            }
        }
        e
    }

    /// Pingora's line for a try that will be retried (above) quotes its error whole: the failure
    /// that counts is logged by `fail_to_proxy`.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        _error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        true
    }

    /// Strips the credential and forged identity headers, injects the permit's identity.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        let (Some(permit), Some(config)) = (&ctx.permit, &ctx.config) else {
            return Err(missing_permit());
        };
        let client = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
        headers::forward(config, permit, upstream_request, &ctx.request_id, &self.identity_headers, client)?;
        if session.req_header().version == http::Version::HTTP_10 {
            // An HTTP/1.0 client's expectation goes no further: the upstream, sent HTTP/1.1,
            // would answer `100 Continue`, which the client can only read as its answer (RFC 9110,
            // sections 10.1.1 and 15.2).
            upstream_request.remove_header(&http::header::EXPECT);
            // It may send no `Host`; HTTP/1.1 needs one: the upstream's address, as nginx sends
            // its `proxy_pass` host (a Go or nginx upstream answers a request without one 400).
            if !upstream_request.headers.contains_key(http::header::HOST) {
                let route = permit.route();
                let n = route.upstreams.len();
                if let Some(addr) = ctx.upstream.and_then(|(i, _)| route.upstreams.get(i.checked_rem(n)?)) {
                    upstream_request.insert_header(http::header::HOST, addr.to_string())?;
                }
            }
        }
        Ok(())
    }

    /// Tells the client the request id, and warns holders of a token in a rotation's grace.
    async fn response_filter(
        &self,
        session: &mut Session,
        response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> pingora::Result<()> {
        // A request admitted before a shutdown began and answered after: `Connection: close`.
        if crate::drain::stopping() {
            session.set_keepalive(None);
        }
        // An HTTP/1.0 client reads no chunked body (RFC 9112, section 6.1; Pingora chunks a body of
        // no stated length for any client): it gets the bytes until the connection closes.
        // (Only a body no more than chunked: one also gzipped, say, would reach it undecoded.)
        if session.req_header().version == http::Version::HTTP_10
            && response
                .headers
                .get(http::header::TRANSFER_ENCODING)
                .is_some_and(|te| te.as_bytes().eq_ignore_ascii_case(b"chunked"))
        {
            response.remove_header(&http::header::TRANSFER_ENCODING);
            session.set_keepalive(None);
        }
        let Some(config) = &ctx.config else { return Ok(()) };
        let keep_case = ctx.route.as_ref().is_some_and(|r| r.preserve_header_case);
        headers::edit_response(response, keep_case, |response| {
            response.insert(&config.identity.request_id_header, &ctx.request_id)?;
            if let Some(deprecation) = ctx.deprecation.as_deref() {
                response.reserve(deprecation.len());
                for (name, value) in deprecation {
                    response.insert(name, value)?;
                }
            }
            Ok(())
        })
    }

    /// Counts the request, notes the token's last use, and writes the access line (the token id,
    /// never the token).
    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route.as_ref().map(|r| r.name.as_str()).unwrap_or("-");
        let outcome = ctx.rejection.as_ref().map(Rejection::label).unwrap_or("allowed");
        match (&ctx.rejection, &ctx.route) {
            (None, Some(r)) => r
                .allowed_requests
                .get_or_init(|| self.metrics.requests.with_label_values(&[route, outcome]))
                .inc(),
            _ => self.metrics.requests.with_label_values(&[route, outcome]).inc(),
        }
        let grant = ctx.permit.as_ref().and_then(Permit::grant);
        // An ephemeral credential's use is not the minting token's: only stored tokens are noted.
        if let Some(g) = grant.filter(|g| g.principal.ephemeral().is_none()) {
            let ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| a.ip());
            self.last_use.note(g.principal.token_id(), ip);
        }
        if !ctx.config.as_ref().map_or_else(|| self.config.load().access_log, |c| c.access_log) {
            return;
        }
        // A refused stored token is logged by its id too (never its secret): who still uses a
        // revoked or leaked token is what an operator looks for. Found again here, off the
        // path of allowed requests.
        let refused = match (&ctx.rejection, &ctx.route, &ctx.config) {
            (Some(_), Some(route), Some(config)) => {
                credential::extract(&config.credentials, route, session.req_header())
                    .ok()
                    .and_then(|presented| crate::token::parse(presented).ok())
                    .map(|parsed| parsed.id)
            }
            _ => None,
        };
        tracing::info!(
            target: "tollgate::access",
            request_id = id_text(&ctx.request_id),
            method = %loggable_path(session.req_header().method.as_str()),
            path = %loggable_path(session.req_header().uri.path()),
            route,
            token_id = grant
                .map(|g| g.principal.credential_id())
                .or(refused.as_ref().map(|id| id.as_str()))
                .unwrap_or("-"),
            outcome,
            status,
            error = error.map(loggable_error),
            "request"
        );
    }

    /// A request let through whose proxying failed (the upstream down: 502; silent past its
    /// route's `upstream_timeouts`: 504) is answered in the gateway's JSON, with the request id
    /// and, for a token in its grace, the deprecation headers, instead of Pingora's bare error
    /// page. The status is otherwise Pingora's choice, as in its default.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut RequestCtx) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            // A refusal (`request_filter` keeps it before sending it) that could not be written:
            // the client is gone, as below, though Pingora leaves this error's source unset.
            // Nothing was let through, so no proxying failed. (One that could not be made at all
            // stays an internal error.)
            ErrorType::WriteError | ErrorType::WriteTimedout | ErrorType::ConnectionClosed
                if ctx.rejection.is_some() =>
            {
                0
            }
            _ => match e.esource() {
                // The upstream waited for the rest of a body the client stopped sending: the
                // client's doing, not the upstream's silence.
                pingora::ErrorSource::Upstream
                    if *e.etype() == ErrorType::ReadTimedout
                        && !session.as_downstream_mut().is_body_done() =>
                {
                    408
                }
                // The route's `upstream_timeouts` ran out.
                pingora::ErrorSource::Upstream
                    if matches!(
                        e.etype(),
                        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                    ) =>
                {
                    504
                }
                pingora::ErrorSource::Upstream => 502,
                pingora::ErrorSource::Downstream => match e.etype() {
                    // The client is gone, or stopped taking its answer: nobody to answer.
                    ErrorType::WriteError
                    | ErrorType::ReadError
                    | ErrorType::ConnectionClosed
                    | ErrorType::WriteTimedout => 0,
                    // Its body stopped arriving for `client_body_timeout`.
                    ErrorType::ReadTimedout => 408,
                    _ => 400,
                },
                pingora::ErrorSource::Internal | pingora::ErrorSource::Unset => 500,
            },
        };
        // A failure halfway through a response: the client has its status already.
        let begun = session.response_written().map(|r| r.status.as_u16());
        if code > 0 {
            // Counted `allowed` in the requests (it was), and here as what became of it: by the
            // status the client has, which for a failure halfway through a response is that
            // response's (a 502 alert must not count answers the client saw as 200).
            let route = ctx.route.as_ref().map_or("-", |r| r.name.as_str());
            let answered = begun.unwrap_or(code);
            self.metrics.proxy_failures.with_label_values(&[route, &answered.to_string()]).inc();
            let status = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
            let config = ctx.config.clone().unwrap_or_else(|| self.config.load_full());
            let extra = ctx.deprecation.as_deref().map_or(&[][..], |d| &d[..]);
            let answer = Rejection::ProxyFailed(status).response(
                id_text(&ctx.request_id),
                config.identity.request_id_header.as_str(),
                extra,
            );
            // (Written only if no response has been: a failure halfway through one just ends it.)
            let written = match answer {
                Ok((header, body)) => session.as_downstream_mut().write_error_response(header, body).await,
                Err(_) => session.respond_error(code).await,
            };
            if let Err(e) = written {
                tracing::debug!(error = %e, "could not send the error response");
            }
        }
        // Pingora's own line for this is suppressed (`suppress_error_log`): its error text quotes
        // what it could not parse, an upstream's response head with its cookies included.
        let request_id = id_text(&ctx.request_id);
        let summary = self.request_summary(session, ctx);
        let error = loggable_error(e);
        match (code, begun) {
            // The client went away; nothing for an operator to act on.
            (0, _) => tracing::debug!(request_id, summary, error, "client gone before its answer"),
            (_, Some(status)) => {
                tracing::error!(
                    request_id,
                    summary,
                    error,
                    status,
                    "proxying failed after the response began"
                )
            }
            (400..=499, None) => {
                tracing::info!(request_id, summary, error, status = code, "request refused by the proxy")
            }
            (_, None) => tracing::error!(request_id, summary, error, status = code, "proxying failed"),
        }
        FailToProxy { error_code: code, can_reuse_downstream: false }
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &RequestCtx, _error: &Error) -> bool {
        true
    }

    /// Pingora's own error lines show this; the query string may hold a token, so it is dropped,
    /// and a token pasted into the path is cut to its id.
    fn request_summary(&self, session: &Session, _ctx: &RequestCtx) -> String {
        let req = session.req_header();
        let host = req.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        let (method, path, host) =
            (loggable_path(req.method.as_str()), loggable_path(req.uri.path()), loggable_path(host));
        format!("{method} {path}, Host: {host}")
    }
}

#[cfg(test)]
mod tests {
    use super::is_method_param;

    #[test]
    fn a_token_anywhere_in_a_path_is_logged_as_its_id() {
        use super::loggable_path;
        let token = "tgp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789abcd";
        assert!(matches!(loggable_path("/shop/items/42"), std::borrow::Cow::Borrowed(_)));
        for (path, logged) in [
            (format!("/shop/{token}"), "/shop/tgp_AbCdEf…".to_string()),
            // The whole segment goes: what else it held is the client's mistake too.
            (format!("/x;key={token}/y"), "/tgp_AbCdEf…/y".to_string()),
            (format!("/shop/{}", token.replacen('_', "%5F", 1)), "/shop/tgp_AbCdEf…".to_string()),
            (format!("/shop/%74{}", &token[1..]), "/shop/tgp_AbCdEf…".to_string()),
            // Encoded twice or more, as a client that escapes an escaped URL sends it.
            (format!("/shop/%2574{}", &token[1..]), "/shop/tgp_AbCdEf…".to_string()),
            (
                format!("/shop/%252574{}", token[1..].replacen('_', "%255F", 1)),
                "/shop/tgp_AbCdEf…".to_string(),
            ),
            ("/cb;jwt=eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2ln".to_string(), "/eyJ…".to_string()),
            ("/caf%C3%A9/menu".to_string(), "/caf%C3%A9/menu".to_string()),
            ("/100%25/off".to_string(), "/100%25/off".to_string()),
            // Escaped more times than it is decoded: not shown, token or not.
            (format!("/a/%2525252525{}/b", "41".repeat(3)), "/a/…/b".to_string()),
            (format!("/shop/%2525252574{}", &token[1..]), "/shop/…".to_string()),
            // Escaped as many times as it is decoded: shown as it is, or as a token's id.
            ("/a/%252525%2541".to_string(), "/a/%252525%2541".to_string()),
            (format!("/shop/%25252574{}", &token[1..]), "/shop/tgp_AbCdEf…".to_string()),
        ] {
            let shown = loggable_path(&path);
            assert_eq!(shown, logged.as_str(), "{path}");
            assert!(!shown.contains(&token[10..]), "{path}: {shown}");
        }
    }

    #[test]
    fn method_override_query_keys_are_read_as_php_reads_them() {
        for key in ["_method", ".method", "%5Fmethod", "+_method", "%20_method", "_method%00x", "%2Emethod"] {
            assert!(is_method_param(key), "{key}");
        }
        for key in ["method", "+method", "[method", "_methods", "x_method", "_Method", "_METHOD"] {
            assert!(!is_method_param(key), "{key}");
        }
    }
}
