//! Rewrites the upstream request for a permitted request: removes the credential and every
//! client-sent header in the identity namespace, then adds the identity headers of the permit.

use http::header::HeaderName;
use pingora::http::RequestHeader;

use super::credential::strip_query_param;
use crate::auth::{AttributeValue, AttributeView};
use crate::config::{Config, IdentityField};
use crate::jwt::{IdentityClaims, JwtSettings};
use crate::policy::{Grant, Permit};
use crate::route::Route;

/// Applies the permit to the upstream request.
pub fn forward(
    config: &Config,
    permit: &Permit,
    req: &mut RequestHeader,
    request_id: &str,
) -> pingora::Result<()> {
    let identity = &config.identity;
    let forged: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|name| name.as_str().starts_with(identity.prefix.as_str()))
        .cloned()
        .collect();
    for name in forged {
        req.remove_header(&name);
    }
    req.insert_header(identity.request_id_wire.clone(), request_id)?;

    let Some(grant) = permit.grant() else {
        return Ok(());
    };
    let route = permit.route();
    req.remove_header(&http::header::AUTHORIZATION);
    if let Some(name) = &config.credentials.api_key_header {
        req.remove_header(name);
    }
    if route.query_token {
        remove_query_token(req, &config.credentials.query_param)?;
    }

    let principal = &grant.principal;
    let attributes = principal.attributes();
    for (field, name) in &identity.headers {
        let value = match field {
            IdentityField::Subject => principal.subject(),
            IdentityField::TokenId => principal.credential_id().to_string(),
            IdentityField::TokenKind => principal.kind().to_string(),
            IdentityField::Org => route.org.clone(),
            IdentityField::Project => route.project.clone(),
            IdentityField::Environment => route.environment.clone(),
            IdentityField::Role => grant.role.as_str().to_string(),
            IdentityField::Permissions => config.policy.names_of(grant.permissions),
            IdentityField::Email => match principal.email() {
                Some(email) if is_header_text(email) => email.to_string(),
                _ => continue,
            },
            IdentityField::Attributes => ascii_json(&attributes),
            IdentityField::Attr => {
                insert_attr_headers(req, std::str::from_utf8(name).unwrap_or_default(), &attributes)?;
                continue;
            }
        };
        req.insert_header(name.clone(), value)?;
    }
    if route.identity_jwt {
        if let Some(jwt) = &config.jwt {
            let token = identity_jwt(config, jwt, grant, route, request_id, &attributes)?;
            req.insert_header(identity.jwt_header.clone(), token)?;
        }
    }
    Ok(())
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
        aud: &jwt.upstream_audience,
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

fn remove_query_token(req: &mut RequestHeader, param: &str) -> pingora::Result<()> {
    let Some(query) = req.uri.query() else { return Ok(()) };
    let rest = strip_query_param(query, param);
    let path = req.uri.path();
    let path_and_query = if rest.is_empty() { path.to_string() } else { format!("{path}?{rest}") };
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().map_err(|_| {
        pingora::Error::explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "query rewrite produced an invalid URI",
        )
    })?);
    let uri = http::Uri::from_parts(parts).map_err(|_| {
        pingora::Error::explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "query rewrite produced an invalid URI",
        )
    })?;
    req.set_uri(uri);
    Ok(())
}

/// One header per scalar attribute: `x-auth-attr-<name>`. Names are lowercased with every
/// character other than a letter, digit or '-' turned into '-'; values that are not plain
/// printable ASCII are left to the JSON header.
fn insert_attr_headers(
    req: &mut RequestHeader,
    prefix: &str,
    attrs: &AttributeView<'_>,
) -> pingora::Result<()> {
    for (key, value) in attrs.iter() {
        let text = match value {
            AttributeValue::Text(t) => t.to_string(),
            AttributeValue::Json(serde_json::Value::String(s)) => s.clone(),
            AttributeValue::Json(serde_json::Value::Number(n)) => n.to_string(),
            AttributeValue::Json(serde_json::Value::Bool(b)) => b.to_string(),
            AttributeValue::Json(_) => continue,
        };
        if key.is_empty() || !is_header_text(&text) {
            continue;
        }
        let mut name = String::with_capacity(prefix.len() + 1 + key.len());
        name.push_str(prefix);
        name.push('-');
        name.extend(
            key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' }),
        );
        req.insert_header(name, text)?;
    }
    Ok(())
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
