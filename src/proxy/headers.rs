//! Rewrites the upstream request for a permitted request: removes the credential and every
//! client-sent header in the identity namespace, then adds the identity headers of the permit.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::header::HeaderName;
use http::HeaderValue;
use pingora::http::{RequestHeader, ResponseHeader};

use super::credential::{has_query_param, strip_query_param};
use crate::auth::{AttributeValue, AttributeView, RecordAnchors};
use crate::config::{Config, IdentityField};
use crate::jwt::{IdentityClaims, JwtSettings};
use crate::policy::{Grant, Permit};
use crate::route::Route;

/// How many principal-and-route combinations keep their identity headers ready (about 1.5 KiB
/// each with the default headers); others have theirs made again when they come back.
const MADE_CAPACITY: usize = 4096;

/// How many client headers a request usually has; see [`template`].
const CLIENT_HEADERS: usize = 16;

/// Identity headers made once per principal, route and config, and inserted by every request of
/// that principal there: inserting a made header clones two pointers instead of formatting,
/// serializing and validating its value again.
pub struct IdentityHeaders {
    /// Keyed by the addresses of token, owner, ephemeral claims, route and config; each entry
    /// holds weak references to them, so an address in a key cannot be reused by another record
    /// while the entry lives (a changed record is a new allocation, hence a new key).
    made: quick_cache::sync::Cache<[usize; 5], Arc<Made>>,
}

struct Made {
    /// The upstream request's headers before the client's are added: `Host`, the request id and
    /// `X-Forwarded-For` as placeholders (in that order, so they are found by position), then the
    /// identity headers.
    /// Cloning it copies the table and counts references; inserting the headers one by one into
    /// the client's map hashed and placed each name again, several times the cost.
    template: http::HeaderMap,
    /// How many placeholders the template starts with: `Host`, the request id and, unless
    /// `forwarded_for` is `keep`, `X-Forwarded-For`.
    placeholders: usize,
    _records: RecordAnchors,
    _route: Weak<Route>,
    _config: Weak<Config>,
}

impl Made {
    /// The identity headers alone, in order (the template without its placeholders).
    fn identity(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.template.iter().skip(self.placeholders)
    }
}

impl Default for IdentityHeaders {
    fn default() -> Self {
        IdentityHeaders { made: quick_cache::sync::Cache::new(MADE_CAPACITY) }
    }
}

impl IdentityHeaders {
    fn get(&self, config: &Arc<Config>, route: &Arc<Route>, grant: &Grant) -> pingora::Result<Arc<Made>> {
        // On a hit nothing is cloned but the made headers' `Arc`; the anchors are taken on a miss.
        let [token, owner, ephemeral] = grant.principal.record_addresses();
        let key = [token, owner, ephemeral, Arc::as_ptr(route) as usize, Arc::as_ptr(config) as usize];
        if let Some(made) = self.made.get(&key) {
            return Ok(made);
        }
        let made = Arc::new(Made {
            template: template(config, &make(config, route, grant)?),
            placeholders: 2 + usize::from(config.forwarded_for.rewrites()),
            _records: grant.principal.anchors(),
            _route: Arc::downgrade(route),
            _config: Arc::downgrade(config),
        });
        self.made.insert(key, made.clone());
        Ok(made)
    }
}

/// Applies the permit to the upstream request.
pub fn forward(
    config: &Arc<Config>,
    permit: &Permit,
    req: &mut RequestHeader,
    request_id: &HeaderValue,
    identity_headers: &IdentityHeaders,
    client: Option<std::net::IpAddr>,
) -> pingora::Result<()> {
    edit_request(req, permit.route().preserve_header_case, |req| {
        match rewrite(config, permit, req, request_id, identity_headers, client)? {
            XffMade::InTemplate => forwarded_node(config.forwarded_for, req, client),
            XffMade::No => forwarded_for(config.forwarded_for, req, client),
        }
    })
}

/// Whether the upstream request's `X-Forwarded-For` was made with its headers.
enum XffMade {
    InTemplate,
    No,
}

/// `X-Forwarded-For` as `mode` says, with the client's address: an upstream that finds the client
/// by it (Rails' `remote_ip`, behind a proxy it trusts) otherwise believes whatever the client
/// wrote there.
pub fn forwarded_for(
    mode: crate::config::ForwardedFor,
    req: &mut dyn Upstream,
    client: Option<std::net::IpAddr>,
) -> pingora::Result<()> {
    let (Some(client), true) = (client, mode.rewrites()) else { return Ok(()) };
    let list = xff_value(mode, req.headers().get_all(&X_FORWARDED_FOR).iter(), client)?;
    req.insert(&X_FORWARDED_FOR, &list)?;
    forwarded_node(mode, req, Some(client))
}

/// `X-Forwarded-For` as `mode` (not `keep`) makes it for `client`, from the values the client
/// sent under that name.
fn xff_value<'a>(
    mode: crate::config::ForwardedFor,
    sent: impl Iterator<Item = &'a HeaderValue>,
    client: std::net::IpAddr,
) -> pingora::Result<HeaderValue> {
    let sent: Vec<&str> = match mode {
        crate::config::ForwardedFor::Append => sent.filter_map(|v| v.to_str().ok()).collect(),
        _ => Vec::new(),
    };
    match sent.is_empty() {
        true => address_value(client),
        false => value(format!("{}, {client}", sent.join(", "))),
    }
}

/// Under `append`, a `Forwarded` list the client sent ends with the gateway's node too, as
/// `X-Forwarded-For` does: an upstream that reads it (Rack, Spring) trusts its last entry. A line
/// of it that ends inside a quoted string (`for="1.2.3.4`) is dropped: the node appended after it
/// would be read as part of the client's quoted text, and the address the gateway vouches for lost.
fn forwarded_node(
    mode: crate::config::ForwardedFor,
    req: &mut dyn Upstream,
    client: Option<std::net::IpAddr>,
) -> pingora::Result<()> {
    use crate::config::ForwardedFor;
    let Some(client) = client else { return Ok(()) };
    if mode == ForwardedFor::Append && req.headers().contains_key(http::header::FORWARDED) {
        let sent: Vec<&str> = req
            .headers()
            .get_all(http::header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter(|v| quotes_closed(v))
            .collect();
        let node = match client {
            std::net::IpAddr::V4(v4) => format!("for={v4}"),
            std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        let list = value(sent.into_iter().chain([node.as_str()]).collect::<Vec<_>>().join(", "))?;
        req.insert(&http::header::FORWARDED, &list)?;
    }
    Ok(())
}

/// Whether every quoted string in `value` ends (RFC 9110's quoted-string: `\` escapes the next
/// character inside one).
fn quotes_closed(value: &str) -> bool {
    let (mut quoted, mut escaped) = (false, false);
    for b in value.bytes() {
        match (quoted, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (_, _, b'"') => quoted = !quoted,
            _ => {}
        }
    }
    !quoted
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// `client` as a header value, made once while requests come from the same address (a kept-alive
/// connection's do): formatting an address and checking the value cost more than the rest of the
/// header's handling.
fn address_value(client: std::net::IpAddr) -> pingora::Result<HeaderValue> {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(std::net::IpAddr, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let kept = last.borrow().as_ref().filter(|(ip, _)| *ip == client).map(|(_, made)| made.clone());
        if let Some(made) = kept {
            return Ok(made);
        }
        let made = value(client.to_string())?;
        *last.borrow_mut() = Some((client, made.clone()));
        Ok(made)
    })
}

/// Strips the credential and the identity namespace, then adds the request id and the identity.
fn rewrite(
    config: &Arc<Config>,
    permit: &Permit,
    req: &mut dyn Upstream,
    request_id: &HeaderValue,
    identity_headers: &IdentityHeaders,
    client_address: Option<std::net::IpAddr>,
) -> pingora::Result<XffMade> {
    let identity = &config.identity;
    let Some(grant) = permit.grant() else {
        strip(config, req, false);
        strip_own_credentials(config, req)?;
        req.insert(&identity.request_id_header, request_id)?;
        return Ok(XffMade::No);
    };
    let route = permit.route();
    if route.query_token {
        remove_query_token(req, &config.credentials.query_param)?;
    } else {
        // Not this route's credential, but a Tollgate token all the same (an SDK that adds it to
        // every URL): kept from the upstream and its access log, as on a public route.
        strip_own_query_tokens(config, req)?;
    }
    let made = identity_headers.get(config, route, grant)?;
    let xff = match req.bare_headers() {
        Some(headers) => {
            let client = std::mem::take(headers);
            *headers = upstream_headers(&made.template, config, client, request_id, client_address)?;
            XffMade::InTemplate
        }
        None => {
            strip(config, req, true);
            req.insert(&identity.request_id_header, request_id)?;
            for (name, value) in made.identity() {
                req.insert(name, value)?;
            }
            XffMade::No
        }
    };
    if route.identity_jwt {
        if let Some(jwt) = &config.jwt {
            let jti = request_id.to_str().unwrap_or_default();
            let token = identity_jwt(config, jwt, grant, route, jti, &grant.principal.attributes())?;
            req.insert(&identity.jwt_header, &value(token)?)?;
        }
    }
    Ok(xff)
}

/// Header edits on a request or a response.
pub trait HeaderEdit {
    /// The headers as they are now.
    fn headers(&self) -> &http::HeaderMap;
    /// Removes every value of `name`.
    fn remove(&mut self, name: &HeaderName);
    /// Sets `name` to `value` alone.
    fn insert(&mut self, name: &HeaderName, value: &HeaderValue) -> pingora::Result<()>;
    /// Room for `additional` more headers.
    fn reserve(&mut self, additional: usize);
}

/// The upstream request's target, besides its headers.
pub trait Upstream: HeaderEdit {
    /// The request target as it will be sent (raw bytes, which need not be UTF-8).
    fn target(&self) -> &[u8];
    /// Sends `target` instead, byte for byte.
    fn set_target(&mut self, target: Vec<u8>) -> pingora::Result<()>;
    /// The header map itself, when nothing else (such as a case-keeping map) must follow its
    /// edits.
    fn bare_headers(&mut self) -> Option<&mut http::HeaderMap> {
        None
    }
}

/// Whether a client-sent header never reaches the upstream: every name in the identity namespace,
/// the request id (the gateway's own) and, when `credential`, the headers that carry a credential.
/// All but `Authorization` are matched in every spelling an upstream may read as theirs
/// ([`spelled_alike`]).
fn withheld(config: &Config, name: &HeaderName, credential: bool) -> bool {
    let identity = &config.identity;
    let alike = |other: &HeaderName| spelled_alike(name.as_str().as_bytes(), other.as_str().as_bytes());
    in_namespace(name.as_str(), &identity.prefix)
        || alike(&identity.request_id_header)
        || (credential && (*name == http::header::AUTHORIZATION || api_key_header(config, name)))
        || client_address_claim(config.forwarded_for, name)
        || path_override(name)
}

/// Whether `name` is the configured API-key header, in any spelling an upstream reads as it.
fn api_key_header(config: &Config, name: &HeaderName) -> bool {
    let key = config.credentials.api_key_header.as_ref();
    key.is_some_and(|key| spelled_alike(name.as_str().as_bytes(), key.as_str().as_bytes()))
}

/// Whether `text` is plainly a credential of this gateway's: a token by its prefix, or a JWT whose
/// (unverified) issuer is the configured one.
fn own_credential(config: &Config, text: &str) -> bool {
    let issuer = |jwt: &crate::jwt::JwtSettings| {
        crate::jwt::unverified_claims(text).is_some_and(|c| c["iss"].as_str() == Some(jwt.issuer.as_str()))
    };
    crate::token::PREFIXES.iter().any(|p| text.starts_with(p))
        || (crate::jwt::looks_like_jwt(text) && config.jwt.as_ref().is_some_and(issuer))
}

/// Headers in which a client could have the upstream's framework run another path than the one
/// routed and authorized: Zend, and Symfony until its 2018 fix (CVE-2018-14773; 3.4.13, 4.1.2 and
/// the Laravel and Drupal releases on them), read `X-Original-URL` and `X-Rewrite-URL` as the
/// request's URI, Yii 2 reads `X-Rewrite-Url` from a trusted proxy (which Tollgate is).
/// Withheld always, in every spelling.
const PATH_OVERRIDE_HEADERS: [&str; 2] = ["x-original-url", "x-rewrite-url"];

fn path_override(name: &HeaderName) -> bool {
    let spelled = name.as_str().as_bytes();
    // The lengths first, as for the address headers: most names are neither.
    matches!(spelled.len(), 13 | 14)
        && PATH_OVERRIDE_HEADERS.iter().any(|h| spelled_alike(spelled, h.as_bytes()))
}

/// Whether a client-sent header claiming the client's address is withheld, as `mode` says. Unless
/// the mode is `keep`, `X-Forwarded-For` in any other spelling (`X_Forwarded_For`): a CGI, Rack or
/// PHP upstream reads it as the same header, merged after the gateway's (Werkzeug's `ProxyFix`
/// then takes the forged last entry). Under `replace`, also `Forwarded` and the other headers
/// that name a client's address ([`CLIENT_ADDRESS_HEADERS`]), in every spelling: Rack and Spring
/// prefer `Forwarded`'s `for=`, and libraries such as npm's `request-ip` read `X-Client-IP` or
/// `CF-Connecting-IP` before `X-Forwarded-For`.
fn client_address_claim(mode: crate::config::ForwardedFor, name: &HeaderName) -> bool {
    use crate::config::ForwardedFor;
    let spelled = name.as_str().as_bytes();
    // The lengths first: most names are none of these (this runs on each of a request's headers).
    match (mode, spelled.len()) {
        (ForwardedFor::Keep, _) => false,
        (_, 15)
            if *name != X_FORWARDED_FOR && spelled_alike(spelled, X_FORWARDED_FOR.as_str().as_bytes()) =>
        {
            true
        }
        (ForwardedFor::Append, _) => false,
        (ForwardedFor::Replace, 9 | 11 | 13..=20) => {
            *name == http::header::FORWARDED
                || CLIENT_ADDRESS_HEADERS.iter().any(|h| spelled_alike(spelled, h.as_bytes()))
        }
        (ForwardedFor::Replace, _) => false,
    }
}

/// Headers besides `X-Forwarded-For` and `Forwarded` in which proxies and CDNs name the client's
/// address, or the host and scheme it asked for (Rails, Django, Laravel and Express behind a
/// trusted proxy build links and redirects from `X-Forwarded-Host` and `-Proto`), and upstream
/// libraries look for them: removed under `forwarded_for: replace`.
const CLIENT_ADDRESS_HEADERS: [&str; 15] = [
    "x-real-ip",
    "x-client-ip",
    "forwarded-for",
    "true-client-ip",
    "cf-connecting-ip",
    "x-cluster-client-ip",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-scheme",
    "x-forwarded-ssl",
    // Yii 2 reads these from a trusted proxy as the host and the scheme.
    "x-original-host",
    "front-end-https",
    // gunicorn's `secure_scheme_headers` (trusted from 127.0.0.1); the base path Symfony, Spring
    // and Werkzeug's `ProxyFix` build links from.
    "x-forwarded-protocol",
    "x-forwarded-prefix",
];
const _: () = {
    // The lengths `client_address_claim` lets through are exactly these names'.
    let mut i = 0;
    while i < CLIENT_ADDRESS_HEADERS.len() {
        assert!(matches!(CLIENT_ADDRESS_HEADERS[i].len(), 9 | 11 | 13..=20));
        i += 1;
    }
};

/// Whether a (lowercase) header name starts with the identity prefix in any spelling
/// ([`spelled_alike`]): CGI, WSGI and Rack upstreams read `X-Auth-Email`, `X_Auth_Email` (and
/// PHP `X.Auth.Email`) as `HTTP_X_AUTH_EMAIL`, so each would forge the same identity.
pub(crate) fn in_namespace(name: &str, prefix: &str) -> bool {
    name.as_bytes().get(..prefix.len()).is_some_and(|head| spelled_alike(head, prefix.as_bytes()))
}

/// Whether two (lowercase) header names are the same with every character but a letter or a
/// digit counting as the same: CGI gateways turn `-` into `_`, and PHP then `.` too (Caddy's
/// `php_fastcgi` passes `X.Auth.Email` as `HTTP_X.AUTH.EMAIL`, which PHP reads as
/// `HTTP_X_AUTH_EMAIL`).
pub(crate) fn spelled_alike(a: &[u8], b: &[u8]) -> bool {
    let separator = |b: u8| !b.is_ascii_alphanumeric();
    a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| x == y || (separator(x) && separator(y)))
}

/// Removes the client's [`withheld`] headers in place.
fn strip(config: &Config, req: &mut dyn Upstream, credential: bool) {
    let names: Vec<HeaderName> =
        req.headers().keys().filter(|name| withheld(config, name, credential)).cloned().collect();
    for name in &names {
        req.remove(name);
    }
}

/// On a public route, which keeps the client's credentials for the upstream's own scheme, what
/// is plainly Tollgate's own still goes: the API-key header (in every spelling), an
/// `Authorization` with a Tollgate token or a JWT of its issuer as any of its words, and the token
/// query parameter holding either. A credential sent where none is needed would otherwise reach an
/// upstream that may be a third party's (and its access log, from a query).
fn strip_own_credentials(config: &Config, req: &mut dyn Upstream) -> pingora::Result<()> {
    // In an `Authorization` of any spelling (`Bearer\t…`, `Bearer "…"`, `Bearer: …`, `Bearer
    // <…>`, `Bearer%20…`, a non-ASCII space), as an upstream splitting or decoding it otherwise
    // than Tollgate might read it: any run of it, percent-decoded or not, of the characters a token
    // (letters, digits, `_`) or a JWT (those, `.` and `-`) is made of.
    let words = |value: &HeaderValue| {
        // Within any run of a token's characters, as sent or percent-decoded: a token (of a
        // token's whole shape, its checksum right or mistyped) or a JWT of this gateway's issuer;
        // an upstream's own credential that merely starts like one (`Bearer tgs_live_abc`,
        // Digest's `uri="/files/tgs_2024.csv"`) is kept.
        let decoded = percent_encoding::percent_decode(value.as_bytes()).collect::<Vec<u8>>();
        [value.as_bytes(), &decoded[..]].iter().any(|text| {
            let text = String::from_utf8_lossy(text);
            let token = |c: char| !(c.is_ascii_alphanumeric() || c == '_');
            let jwt = |c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            let shaped = |word: &str| {
                matches!(crate::token::parse(word), Ok(_) | Err(crate::token::FormatError::Checksum))
            };
            text.split(token).any(shaped)
                || text
                    .split(jwt)
                    .any(|word| crate::jwt::looks_like_jwt(word) && own_credential(config, word))
        })
    };
    let ours = |name: &HeaderName, value: &HeaderValue| {
        api_key_header(config, name) || (*name == http::header::AUTHORIZATION && words(value))
    };
    let names: Vec<HeaderName> = req
        .headers()
        .iter()
        .filter(|(name, value)| ours(name, value))
        .map(|(name, _)| name.clone())
        .collect();
    for name in &names {
        req.remove(name);
    }
    strip_own_query_tokens(config, req)
}

/// Removes the token query parameter where it holds a Tollgate token or a JWT of its issuer.
fn strip_own_query_tokens(config: &Config, req: &mut dyn Upstream) -> pingora::Result<()> {
    let param = &config.credentials.query_param;
    // Each value as the upstream's query parser reads it: form-decoded (`tgp%5F...` is a token).
    remove_query_param_if(req, param, |query| {
        let query = String::from_utf8_lossy(query);
        super::credential::query_values(&query, param).iter().any(|v| {
            let value = super::credential::form_decoded(v.as_bytes());
            own_credential(config, String::from_utf8_lossy(&value).trim())
        })
    })
}

/// [`Made::template`] for `headers`, under `config`'s request id header and `forwarded_for`.
fn template(config: &Config, headers: &[(HeaderName, HeaderValue)]) -> http::HeaderMap {
    let placeholder = HeaderValue::from_static("");
    // Room for the client's headers in the index, which a clone keeps (its entries it does not).
    let mut template = http::HeaderMap::with_capacity(headers.len() + 3 + CLIENT_HEADERS);
    template.insert(http::header::HOST, placeholder.clone());
    template.insert(config.identity.request_id_header.clone(), placeholder.clone());
    if config.forwarded_for.rewrites() {
        template.insert(X_FORWARDED_FOR, placeholder);
    }
    // Clones, not the made values themselves: a clone is a shared buffer, which every request's
    // copy of the template then clones by a counter; the originals are not (each clone of one
    // would check its kind first).
    for (name, value) in headers {
        template.insert(name.clone(), value.clone());
    }
    template
}

/// The upstream request's headers from a [`Made::template`]: the request id, the identity headers,
/// and every header of `client` except its [`withheld`] headers. `Host`, when sent, comes first.
fn upstream_headers(
    template: &http::HeaderMap,
    config: &Config,
    client: http::HeaderMap,
    request_id: &HeaderValue,
    client_address: Option<std::net::IpAddr>,
) -> pingora::Result<http::HeaderMap> {
    use http::header::HOST;
    let too_many = |_| pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "too many headers");
    let mut out = template.clone();
    out.try_reserve(client.len()).map_err(too_many)?;
    if let Some(slot) = out.values_mut().nth(1) {
        *slot = request_id.clone();
    }
    let xff = config.forwarded_for.rewrites();
    let mut host = None;
    // The client's own `X-Forwarded-For`, set aside for the placeholder's value (no allocation
    // unless it sent one).
    let mut sent_xff = Vec::new();
    // A `None` name is another value of the previous name, which is kept only for that.
    let mut values = client.into_iter().peekable();
    let mut previous: Option<HeaderName> = None;
    while let Some((name, value)) = values.next() {
        let Some(name) = name.or_else(|| previous.take()) else { continue };
        if matches!(values.peek(), Some((None, _))) {
            previous = Some(name.clone());
        }
        if name == HOST && host.is_none() {
            host = Some(value);
        } else if xff && name == X_FORWARDED_FOR {
            sent_xff.push(value);
        } else if !withheld(config, &name, true) {
            out.try_append(name, value).map_err(too_many)?;
        }
    }
    if xff {
        let made =
            client_address.map(|ip| xff_value(config.forwarded_for, sent_xff.iter(), ip)).transpose()?;
        // Found by position (third) when nothing came before it; by name otherwise.
        let slot = match out.iter_mut().nth(2) {
            Some((name, slot)) if *name == X_FORWARDED_FOR => Some(slot),
            _ => out.get_mut(X_FORWARDED_FOR),
        };
        match (made, slot) {
            (Some(made), Some(slot)) => *slot = made,
            // (Not for a template of this config; never the client's list in its place.)
            (Some(made), None) => {
                out.try_append(X_FORWARDED_FOR, made).map_err(too_many)?;
            }
            // No client address (not a TCP client): as sent, as `forwarded_for` leaves it.
            (None, _) => {
                out.remove(X_FORWARDED_FOR);
                for value in sent_xff {
                    out.try_append(X_FORWARDED_FOR, value).map_err(too_many)?;
                }
            }
        }
    }
    match (host, out.values_mut().next()) {
        (Some(value), Some(slot)) => *slot = value,
        // Without a `Host` (HTTP/1.0), the placeholder goes, and the last header takes its place.
        _ => {
            out.remove(HOST);
        }
    }
    Ok(out)
}

/// Runs `edit` on the request. Unless `keep_case`, the request is edited as bare `http` parts:
/// Pingora's `insert_header` parses every name again and fills a second, case-keeping map, which
/// cost more than everything else authentication does per request. The parts go back as a
/// request without that map, which writes standard names in their usual capitalization and every
/// other name in lowercase.
pub fn edit_request(
    req: &mut RequestHeader,
    keep_case: bool,
    edit: impl FnOnce(&mut dyn Upstream) -> pingora::Result<()>,
) -> pingora::Result<()> {
    if keep_case {
        return edit(req);
    }
    // The target as received when the URI alone does not reproduce it (absolute-form, bytes
    // that are not UTF-8), to be put back unless the edit rewrites the URI.
    let raw = req.raw_path();
    let from_uri = raw.is_empty() || req.uri.path_and_query().is_some_and(|pq| pq.as_str().as_bytes() == raw);
    let raw_target = (!from_uri).then(|| raw.to_vec());
    let send_end_stream = req.send_end_stream();
    let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts = Parts { parts: std::mem::replace(req, empty).into(), raw_target };
    let edited = edit(&mut parts);
    *req = RequestHeader::from(parts.parts);
    if let Some(raw) = parts.raw_target {
        req.set_raw_path(&raw)?;
    }
    if let Some(send_end_stream) = send_end_stream {
        req.set_send_end_stream(send_end_stream);
    }
    edited
}

/// Runs `edit` on the response; as [`edit_request`], names lose their sent case unless `keep_case`.
pub fn edit_response(
    response: &mut ResponseHeader,
    keep_case: bool,
    edit: impl FnOnce(&mut dyn HeaderEdit) -> pingora::Result<()>,
) -> pingora::Result<()> {
    if keep_case {
        return edit(response);
    }
    let reason = response
        .get_reason_phrase()
        .filter(|r| Some(*r) != response.status.canonical_reason())
        .map(str::to_owned);
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts: http::response::Parts = std::mem::replace(response, empty).into();
    let edited = edit(&mut parts.headers);
    *response = ResponseHeader::from(parts);
    if reason.is_some() {
        response.set_reason_phrase(reason.as_deref())?;
    }
    edited
}

/// Pingora's request and response headers, keeping every name's case.
macro_rules! pingora_header_edit {
    ($header:ty) => {
        impl HeaderEdit for $header {
            fn headers(&self) -> &http::HeaderMap {
                &self.headers
            }
            fn remove(&mut self, name: &HeaderName) {
                self.remove_header(name);
            }
            fn insert(&mut self, name: &HeaderName, value: &HeaderValue) -> pingora::Result<()> {
                // As bytes, so the name keeps its configured case rather than being title-cased.
                self.insert_header(Bytes::copy_from_slice(name.as_str().as_bytes()), value.clone())
            }
            fn reserve(&mut self, _additional: usize) {}
        }
    };
}
pingora_header_edit!(RequestHeader);
pingora_header_edit!(ResponseHeader);

impl Upstream for RequestHeader {
    fn target(&self) -> &[u8] {
        self.raw_path()
    }
    fn set_target(&mut self, target: Vec<u8>) -> pingora::Result<()> {
        self.set_raw_path(&target)
    }
}

/// A bare header map (its names are lowercase).
impl HeaderEdit for http::HeaderMap {
    fn headers(&self) -> &http::HeaderMap {
        self
    }
    fn remove(&mut self, name: &HeaderName) {
        http::HeaderMap::remove(self, name);
    }
    fn insert(&mut self, name: &HeaderName, value: &HeaderValue) -> pingora::Result<()> {
        self.try_insert(name.clone(), value.clone())
            .map(drop)
            .map_err(|_| pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "too many headers"))
    }
    fn reserve(&mut self, additional: usize) {
        // Only fails past http's limit of 32,768 headers, which `insert` then reports.
        let _ = self.try_reserve(additional);
    }
}

/// A request taken apart into `http` parts, and the target to put back with them.
struct Parts {
    parts: http::request::Parts,
    raw_target: Option<Vec<u8>>,
}

impl HeaderEdit for Parts {
    fn headers(&self) -> &http::HeaderMap {
        &self.parts.headers
    }
    fn remove(&mut self, name: &HeaderName) {
        self.parts.headers.remove(name);
    }
    fn insert(&mut self, name: &HeaderName, value: &HeaderValue) -> pingora::Result<()> {
        HeaderEdit::insert(&mut self.parts.headers, name, value)
    }
    fn reserve(&mut self, additional: usize) {
        HeaderEdit::reserve(&mut self.parts.headers, additional);
    }
}

impl Upstream for Parts {
    fn target(&self) -> &[u8] {
        match &self.raw_target {
            Some(raw) => raw,
            None => self.parts.uri.path_and_query().map_or(b"", |pq| pq.as_str().as_bytes()),
        }
    }
    /// Kept as the target to put back, which [`edit_request`] then parses into the URI too.
    fn set_target(&mut self, target: Vec<u8>) -> pingora::Result<()> {
        self.raw_target = Some(target);
        Ok(())
    }
    fn bare_headers(&mut self) -> Option<&mut http::HeaderMap> {
        Some(&mut self.parts.headers)
    }
}

/// The identity headers of `grant` on `route`, in the configured order.
fn make(config: &Config, route: &Route, grant: &Grant) -> pingora::Result<Vec<(HeaderName, HeaderValue)>> {
    let principal = &grant.principal;
    let attributes = principal.attributes();
    let mut made = Vec::with_capacity(config.identity.headers.len() + 4);
    for (field, name) in &config.identity.headers {
        let value = match field {
            IdentityField::Subject => value(principal.subject())?,
            IdentityField::TokenId => value(principal.credential_id())?,
            IdentityField::TokenKind => HeaderValue::from_static(principal.kind()),
            IdentityField::Org => value(&route.org)?,
            IdentityField::Project => value(&route.project)?,
            IdentityField::Environment => value(&route.environment)?,
            IdentityField::Role => HeaderValue::from_static(grant.role.as_str()),
            IdentityField::Permissions => value(config.policy.names_of(grant.permissions))?,
            IdentityField::Email => match principal.email() {
                Some(email) if is_header_text(email) => value(email)?,
                _ => continue,
            },
            IdentityField::Attributes => value(ascii_json(&attributes))?,
            IdentityField::Attr => {
                attr_headers(&mut made, name.as_str(), &attributes)?;
                continue;
            }
        };
        made.push((name.clone(), value));
    }
    Ok(made)
}

/// A header value from text, or the error that it is not one.
static DEPRECATION: HeaderName = HeaderName::from_static("deprecation");
static SUNSET: HeaderName = HeaderName::from_static("sunset");

/// The headers every response to a token in a rotation's grace carries, proxied, refused or from
/// the admin API: `Deprecation: @<start of grace>` (RFC 9745) and `Sunset: <HTTP-date>` (RFC 8594)
/// of when it stops working, the end of grace or its own expiry if that comes first.
pub fn deprecation(principal: &crate::auth::Principal) -> Option<Box<Deprecation>> {
    if !principal.deprecated() {
        return None;
    }
    let token = principal.token();
    let revocation = token.revoked.as_ref()?;
    let since = revocation.decided_at.unwrap_or(revocation.at) / 1000;
    let end = token.expires_at.map_or(revocation.at, |e| e.min(revocation.at));
    let end = std::time::UNIX_EPOCH + std::time::Duration::from_millis(end.max(0) as u64);
    let since = HeaderValue::from_str(&format!("@{since}")).ok()?;
    let end = HeaderValue::from_str(&httpdate::fmt_http_date(end)).ok()?;
    Some(Box::new([(DEPRECATION.clone(), since), (SUNSET.clone(), end)]))
}

/// The `Deprecation` and `Sunset` headers (boxed where kept: seldom there, and the request
/// context moves on every request).
pub type Deprecation = [(HeaderName, HeaderValue); 2];

pub fn value(text: impl AsRef<str>) -> pingora::Result<HeaderValue> {
    HeaderValue::from_str(text.as_ref()).map_err(|_| {
        pingora::Error::explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "an identity value is not a valid header value",
        )
    })
}

/// The short-lived identity JWT for the upstream: who is calling, where, with which rights.
fn identity_jwt(
    config: &Config,
    jwt: &JwtSettings,
    grant: &Grant,
    route: &Route,
    request_id: &str,
    attributes: &AttributeView<'_>,
) -> pingora::Result<String> {
    let principal = &grant.principal;
    let now = crate::store::now_millis() / 1000;
    let subject = principal.subject();
    let permissions = config.policy.names_of(grant.permissions);
    let claims = IdentityClaims {
        iss: &jwt.issuer,
        aud: route.identity_audience.as_deref().unwrap_or(&jwt.upstream_audience),
        sub: &subject,
        iat: now,
        exp: now + jwt.upstream_ttl.as_secs() as i64,
        jti: request_id,
        tg: crate::jwt::IDENTITY,
        org: &route.org,
        project: &route.project,
        environment: &route.environment,
        kind: principal.kind(),
        token_id: principal.credential_id(),
        role: grant.role.as_str(),
        permissions: permissions.split(',').filter(|p| !p.is_empty()).collect(),
        email: principal.email(),
        attributes,
    };
    jwt.sign(&claims).map_err(|e| {
        pingora::Error::explain(
            pingora::ErrorType::InternalError,
            format!("signing the identity JWT failed: {e}"),
        )
    })
}

/// Removes the token's query parameter from the target, every copy of it. On the raw bytes, not
/// the URI, which holds only a lossy rendering of a target that is not UTF-8: everything else
/// reaches the upstream byte for byte (and an absolute-form target stays one).
fn remove_query_token(req: &mut dyn Upstream, param: &str) -> pingora::Result<()> {
    remove_query_param_if(req, param, |_| true)
}

/// [`remove_query_token`], where the raw query also passes `wanted`.
fn remove_query_param_if(
    req: &mut dyn Upstream,
    param: &str,
    wanted: impl FnOnce(&[u8]) -> bool,
) -> pingora::Result<()> {
    let target = req.target();
    let Some(at) = target.iter().position(|&b| b == b'?') else { return Ok(()) };
    let query = &target[at + 1..];
    if !has_query_param(query, param) || !wanted(query) {
        return Ok(());
    }
    let rest = strip_query_param(query, param);
    let mut stripped = Vec::with_capacity(target.len());
    stripped.extend_from_slice(&target[..at]);
    if !rest.is_empty() {
        stripped.push(b'?');
        stripped.extend_from_slice(&rest);
    }
    req.set_target(stripped)
}

/// One header per scalar attribute: `x-auth-attr-<name>`. Names are lowercased with every
/// character other than a letter, digit or '-' turned into '-'; values that are not plain
/// printable ASCII are left to the JSON header.
fn attr_headers(
    made: &mut Vec<(HeaderName, HeaderValue)>,
    prefix: &str,
    attrs: &AttributeView<'_>,
) -> pingora::Result<()> {
    for (key, attr) in attrs.iter() {
        let text = match attr {
            AttributeValue::Text(t) => own_header(key, t).then(|| t.to_string()),
            AttributeValue::Json(v) => own_header_text(key, v),
        };
        let Some(text) = text else { continue };
        let mut name = String::with_capacity(prefix.len() + 1 + key.len());
        name.push_str(prefix);
        name.push('-');
        name.extend(attr_suffix(key));
        // Every character of the name was made a valid header-name character above.
        let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else { continue };
        made.push((name, value(text)?));
    }
    Ok(())
}

/// The text of an attribute that travels in a header of its own (`<prefix>attr-<key>`): a string,
/// number or boolean under a non-empty ASCII key (other characters would be lost in the name),
/// whose text arrives as it is sent ([`arrives_unchanged`]). Every other one travels in `X-Auth-Attributes` only.
pub(crate) fn own_header_text(key: &str, value: &serde_json::Value) -> Option<String> {
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    own_header(key, &text).then_some(text)
}

/// See [`own_header_text`].
fn own_header(key: &str, text: &str) -> bool {
    !key.is_empty() && key.is_ascii() && arrives_unchanged(text)
}

/// Whether `s` reaches an upstream as it is sent in a header value: printable ASCII, with no
/// space at either end (an HTTP parser drops those: RFC 9110, section 5.5), so that ` gold` and
/// `gold` do not arrive as one.
pub(crate) fn arrives_unchanged(s: &str) -> bool {
    is_header_text(s) && !s.starts_with(' ') && !s.ends_with(' ')
}

/// The name an attribute's header has after `<prefix>attr-`: letters and digits in lower case,
/// every other character `-` (`Team_ID` -> `team-id`).
pub(crate) fn attr_suffix(key: &str) -> impl Iterator<Item = char> + '_ {
    key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
}

/// Whether `s` is printable ASCII, so it can travel as a header value as it is.
pub(crate) fn is_header_text(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// Compact JSON with every non-ASCII character escaped as `\uXXXX`, so it is a valid header value.
pub fn ascii_json<T: serde::Serialize>(value: &T) -> String {
    // Serializing a JSON map or value cannot fail.
    let json = serde_json::to_string(value).unwrap_or_default();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        // serde_json escapes control characters below 0x20; DEL is not allowed in a header either.
        if c.is_ascii() && c != '\u{7f}' {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attribute_has_a_header_of_its_own_only_where_an_upstream_reads_it_as_sent() {
        use serde_json::json;
        assert_eq!(own_header_text("tier", &json!("gold")).as_deref(), Some("gold"));
        assert_eq!(own_header_text("n", &json!(7)).as_deref(), Some("7"));
        assert_eq!(own_header_text("flag", &json!(false)).as_deref(), Some("false"));
        assert_eq!(own_header_text("tenant", &json!("a b")).as_deref(), Some("a b"));
        // A space at an end would be dropped by the upstream's parser (` victim ` as `victim`).
        for v in
            [json!(" victim"), json!("victim "), json!(" "), json!("Zürich"), json!(null), json!({"a": 1})]
        {
            assert_eq!(own_header_text("tenant", &v), None, "{v}");
        }
        assert_eq!(own_header_text("Zone", &json!("x")).as_deref(), Some("x"));
        assert_eq!(own_header_text("Zóne", &json!("x")), None);
    }

    #[test]
    fn upstream_headers_keep_the_client_s_headers_but_never_its_identity_or_credential() {
        let config = Config::parse("credentials: { api_key_header: X-API-Key }").unwrap();
        let made = [(HeaderName::from_static("x-auth-role"), HeaderValue::from_static("editor"))];
        let template = template(&config, &made);
        let mut client = http::HeaderMap::new();
        for (name, value) in [
            ("user-agent", "curl"),
            ("x-auth-role", "admin"),
            ("x-auth-role", "owner"),
            ("authorization", "Bearer t"),
            ("x-api-key", "t"),
            ("x-request-id", "forged"),
            ("host", "api.example.com"),
            ("x-custom", "a"),
            ("x-custom", "b"),
        ] {
            client.append(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        let id = HeaderValue::from_static("0123");
        let ip = Some(std::net::IpAddr::from([10, 0, 0, 7]));
        let out = upstream_headers(&template, &config, client, &id, ip).unwrap();
        let wire: Vec<(&str, &str)> = out.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(
            wire,
            [
                ("host", "api.example.com"),
                ("x-request-id", "0123"),
                ("x-forwarded-for", "10.0.0.7"),
                ("x-auth-role", "editor"),
                ("user-agent", "curl"),
                ("x-custom", "a"),
                ("x-custom", "b"),
            ]
        );

        // No Host sent, none forwarded; the template itself is unchanged.
        let out = upstream_headers(&template, &config, http::HeaderMap::new(), &id, ip).unwrap();
        assert!(!out.contains_key(http::header::HOST));
        assert_eq!(out.get("x-request-id").unwrap(), "0123");
        assert_eq!(template.get("x-request-id").unwrap(), "");
    }

    #[test]
    fn the_request_id_is_dropped_in_every_spelling_of_its_name() {
        let config = Config::parse("").unwrap();
        let template = template(&config, &[]);
        let mut client = http::HeaderMap::new();
        client.append(http::header::HOST, HeaderValue::from_static("x"));
        for name in ["x-request-id", "x_request_id", "x_request-id", "x-request_id", "x-request-ids"] {
            client.append(HeaderName::from_static(name), HeaderValue::from_static("forged"));
        }
        let ip = Some(std::net::IpAddr::from([10, 0, 0, 7]));
        let out =
            upstream_headers(&template, &config, client, &HeaderValue::from_static("0123"), ip).unwrap();
        let wire: Vec<(&str, &str)> = out.iter().map(|(n, v)| (n.as_str(), v.to_str().unwrap())).collect();
        assert_eq!(
            wire,
            [
                ("host", "x"),
                ("x-request-id", "0123"),
                ("x-forwarded-for", "10.0.0.7"),
                ("x-request-ids", "forged")
            ]
        );
    }

    #[test]
    fn x_forwarded_for_is_made_with_the_upstream_headers_as_each_mode_says() {
        let ip = std::net::IpAddr::from([10, 0, 0, 7]);
        let id = HeaderValue::from_static("0123");
        let sent = |xff: &[&str]| {
            let mut client = http::HeaderMap::new();
            client.append(http::header::HOST, HeaderValue::from_static("x"));
            for v in xff {
                client.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
            }
            client.append(HeaderName::from_static("x-custom"), HeaderValue::from_static("c"));
            client
        };
        let wire = |out: &http::HeaderMap| -> Vec<(String, String)> {
            out.iter().map(|(n, v)| (n.as_str().to_string(), v.to_str().unwrap().to_string())).collect()
        };
        let pairs = |p: &[(&str, &str)]| -> Vec<(String, String)> {
            p.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
        };
        for (mode, xff, want) in [
            ("append", &[][..], "10.0.0.7"),
            ("append", &["1.1.1.1", "2.2.2.2, 3.3.3.3"][..], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.7"),
            ("replace", &["1.1.1.1"][..], "10.0.0.7"),
        ] {
            let config = Config::parse(&format!("forwarded_for: {mode}")).unwrap();
            let out = upstream_headers(&template(&config, &[]), &config, sent(xff), &id, Some(ip)).unwrap();
            assert_eq!(
                wire(&out),
                pairs(&[
                    ("host", "x"),
                    ("x-request-id", "0123"),
                    ("x-forwarded-for", want),
                    ("x-custom", "c")
                ]),
                "{mode} {xff:?}"
            );
        }
        // Placed by name when a second `Host` came first, and made without any `Host`.
        let config = Config::parse("").unwrap();
        let mut two_hosts = sent(&["1.1.1.1"]);
        two_hosts.append(http::header::HOST, HeaderValue::from_static("y"));
        let out = upstream_headers(&template(&config, &[]), &config, two_hosts, &id, Some(ip)).unwrap();
        assert_eq!(out.get_all(X_FORWARDED_FOR).iter().collect::<Vec<_>>(), ["1.1.1.1, 10.0.0.7"]);
        assert_eq!(out.get("x-request-id").unwrap(), "0123");
        let mut no_host = http::HeaderMap::new();
        no_host.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        let out = upstream_headers(&template(&config, &[]), &config, no_host, &id, Some(ip)).unwrap();
        assert_eq!(
            wire(&out),
            pairs(&[("x-forwarded-for", "1.1.1.1, 10.0.0.7"), ("x-request-id", "0123")]),
            "no Host: the last header takes its place"
        );
        // Kept as sent: under `keep`, and without a client address.
        let keep = Config::parse("forwarded_for: keep").unwrap();
        let out = upstream_headers(&template(&keep, &[]), &keep, sent(&["1.1.1.1"]), &id, Some(ip)).unwrap();
        assert_eq!(out.get_all(X_FORWARDED_FOR).iter().collect::<Vec<_>>(), ["1.1.1.1"]);
        let append = Config::parse("").unwrap();
        let out =
            upstream_headers(&template(&append, &[]), &append, sent(&["1.1.1.1", "2.2.2.2"]), &id, None)
                .unwrap();
        assert_eq!(out.get_all(X_FORWARDED_FOR).iter().collect::<Vec<_>>(), ["1.1.1.1", "2.2.2.2"]);
        assert_eq!(out.len(), 5);
    }

    #[test]
    fn stripping_the_query_token_keeps_every_other_byte_of_the_target() {
        for keep_case in [false, true] {
            for (sent, forwarded) in [
                (&b"/shop/%FF-raw\xff?a=\xfe&access_token=T;b=1"[..], &b"/shop/%FF-raw\xff?a=\xfe;b=1"[..]),
                (b"/shop/\xff?access_token=T", b"/shop/\xff"),
                (b"/shop/x?access_token=T&y=%20", b"/shop/x?y=%20"),
                (b"http://h.example/shop?a&access_token=T", b"http://h.example/shop?a"),
                (b"/shop/\xff?a=1", b"/shop/\xff?a=1"),
            ] {
                let mut req = RequestHeader::build("GET", sent, None).unwrap();
                edit_request(&mut req, keep_case, |req| remove_query_token(req, "access_token")).unwrap();
                assert_eq!(req.raw_path(), forwarded, "{}", String::from_utf8_lossy(sent));
            }
        }
    }

    #[test]
    fn ascii_json_escapes_and_stays_valid() {
        let v = serde_json::json!({"name": "Zoë", "emoji": "🙂", "n": 1, "del": "a\u{7f}b"});
        let s = ascii_json(&v);
        assert!(s.is_ascii() && !s.contains('\u{7f}'), "{s}");
        assert!(http::HeaderValue::from_str(&s).is_ok(), "{s}");
        assert!(s.contains("\\u00eb"));
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back, v);
    }
}
