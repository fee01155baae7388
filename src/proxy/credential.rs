//! Finds the one credential in a request: `Authorization: Bearer`, the API-key header, or the query
//! parameter where the route allows it. More than one is a bad request (RFC 6750, section 2).

use pingora::http::RequestHeader;

use super::reject::Rejection;
use crate::config::CredentialSettings;
use crate::route::Route;

/// Returns the presented token text, borrowed from the request.
pub fn extract<'r>(
    settings: &CredentialSettings,
    route: &Route,
    req: &'r RequestHeader,
) -> Result<&'r str, Rejection> {
    let mut found: Option<&'r str> = None;
    let mut offer = |value: &'r str| -> Result<(), Rejection> {
        match found.replace(value) {
            None => Ok(()),
            Some(_) => Err(Rejection::BadRequest("send the token once, in one place only")),
        }
    };

    if settings.bearer {
        if let Some(value) = single_header(req, &http::header::AUTHORIZATION)? {
            let value = value.to_str().map_err(|_| Rejection::Malformed)?;
            // The scheme is the text before the first space: `Bearer <token>`, in any case.
            if value.get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer ")) {
                offer(value[7..].trim())?;
            }
        }
    }
    if let Some(name) = &settings.api_key_header {
        if let Some(value) = single_header(req, name)? {
            offer(value.to_str().map_err(|_| Rejection::Malformed)?.trim())?;
        }
    }
    if route.query_token {
        match query_values(req.uri.query().unwrap_or(""), &settings.query_param)[..] {
            [] => {}
            [one] => offer(one)?,
            _ => return Err(Rejection::BadRequest("the token query parameter appears more than once")),
        }
    }
    found.ok_or(Rejection::Missing)
}

/// By the parsed name: looking up by text would parse the name again on every request.
fn single_header<'r>(
    req: &'r RequestHeader,
    name: &http::HeaderName,
) -> Result<Option<&'r http::HeaderValue>, Rejection> {
    let mut all = req.headers.get_all(name).iter();
    let first = all.next();
    if all.next().is_some() {
        return Err(Rejection::BadRequest("a credential header appears more than once"));
    }
    Ok(first)
}

/// Values of the parameter `name` in a raw query string, as sent.
pub fn query_values<'q>(query: &'q str, name: &str) -> Vec<&'q str> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            is_param(k, name).then_some(v)
        })
        .collect()
}

/// Whether the raw query string has the parameter `name`.
pub fn has_query_param(query: &str, name: &str) -> bool {
    query.split('&').any(|pair| is_param(pair.split_once('=').map_or(pair, |(k, _)| k), name))
}

/// The query string without the parameter `name`, other parameters untouched and in order.
pub fn strip_query_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter(|pair| !is_param(pair.split_once('=').map_or(*pair, |(k, _)| k), name))
        .collect::<Vec<_>>()
        .join("&")
}

/// Whether a parameter's raw key is `name`, as the upstream's query parser would read it: with
/// its percent-encodings decoded (`access%5Ftoken` is `access_token`).
fn is_param(key: &str, name: &str) -> bool {
    key == name || (key.contains('%') && percent_encoding::percent_decode_str(key).eq(name.bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_keeps_the_rest_in_order() {
        let check =
            |q: &str, expected: &str| assert_eq!(strip_query_param(q, "access_token"), expected, "{q}");
        check("access_token=x", "");
        check("a=1&access_token=x&b=2", "a=1&b=2");
        check("b=2&a=1&access_token=x", "b=2&a=1");
        check("access_token=x&z=%20&y", "z=%20&y");
        check("access_tokenx=1&a=2", "access_tokenx=1&a=2");
        check("a=1&access%5Ftoken=x&access%5ftoken&b", "a=1&b");
        check("%61ccess_token=x&access_toke%6E", "");
        check("access%5Ftokens=x&access%5=y&access_toke%6=z", "access%5Ftokens=x&access%5=y&access_toke%6=z");
    }

    #[test]
    fn query_params_are_found_by_their_decoded_name() {
        assert!(has_query_param("a=1&access%5Ftoken=x", "access_token"));
        assert!(has_query_param("access_token", "access_token"));
        assert!(!has_query_param("a=access_token&Access_Token=1&access_tokens=2", "access_token"));
        assert!(!has_query_param("", "access_token"));
        assert_eq!(query_values("access%5Ftoken=x&access_token=y", "access_token"), ["x", "y"]);
    }

    #[test]
    fn query_values_finds_each() {
        let v: Vec<&str> = query_values("a=1&t=x&b&t=y", "t");
        assert_eq!(v, ["x", "y"]);
    }
}
