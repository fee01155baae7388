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
    // An empty value presents nothing (as `Authorization: Bearer ` alone does, which arrives as
    // `Bearer`): not a second credential beside one, nor a malformed one alone.
    let mut offer = |value: &'r str| -> Result<(), Rejection> {
        if value.is_empty() {
            return Ok(());
        }
        match found.replace(value) {
            None => Ok(()),
            Some(_) => Err(Rejection::BadRequest("send the token once, in one place only")),
        }
    };

    if settings.bearer {
        if let Some(value) = single_header(req, &http::header::AUTHORIZATION)? {
            if let Some(token) = bearer_token(value)? {
                offer(token)?;
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

/// The token an `Authorization` value presents: `Bearer <token>` (the scheme in any case), the
/// token trimmed. Another scheme's value presents none, whatever bytes it holds; a `Bearer` one
/// that is not text is malformed.
pub fn bearer_token(value: &http::HeaderValue) -> Result<Option<&str>, Rejection> {
    if !value.as_bytes().get(..7).is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"bearer ")) {
        return Ok(None);
    }
    Ok(Some(value.to_str().map_err(|_| Rejection::Malformed)?[7..].trim()))
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

/// What separates a query's parameters: `&`, and `;` too, as Rack 2, Perl's CGI and Python's
/// `parse_qs` before 3.9.2 read a query. Splitting on `&` alone would miss a copy of the token
/// behind a `;` (`?access_token=T&x=1;access_token=T`) that such an upstream still reads.
const SEPARATORS: [char; 2] = ['&', ';'];

fn is_separator(b: u8) -> bool {
    SEPARATORS.contains(&char::from(b))
}

/// The raw keys and values of a query string's parameters, as sent.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query.split(SEPARATORS).map(|pair| pair.split_once('=').unwrap_or((pair, "")))
}

/// Values of the parameter `name` in a raw query string, as sent.
pub fn query_values<'q>(query: &'q str, name: &str) -> Vec<&'q str> {
    query_pairs(query).filter_map(|(k, v)| is_param(k.as_bytes(), name).then_some(v)).collect()
}

/// Whether the raw query string has the parameter `name`.
pub fn has_query_param(query: &[u8], name: &str) -> bool {
    params(query).any(|(_, param)| is_param(key(param), name))
}

/// The raw query string without the parameter `name`; the other parameters are untouched and in
/// order, each behind the separator it was sent with (but the first, behind none).
pub fn strip_query_param(query: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(query.len());
    let mut first = true;
    for (separator, param) in params(query).filter(|(_, param)| !is_param(key(param), name)) {
        if !first {
            out.extend_from_slice(separator);
        }
        out.extend_from_slice(param);
        first = false;
    }
    out
}

/// The parameters of a raw query string, each with the separator before it (empty for the
/// first). Bytes, not text: a target need not be UTF-8, and must reach the upstream as sent.
fn params(query: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut start = Some(0);
    std::iter::from_fn(move || {
        let at = start?;
        let end = query[at..].iter().position(|&b| is_separator(b)).map_or(query.len(), |n| at + n);
        start = (end < query.len()).then_some(end + 1);
        Some((&query[at.saturating_sub(1)..at], &query[at..end]))
    })
}

/// A parameter's raw key: the text before its first `=`.
fn key(param: &[u8]) -> &[u8] {
    param.split(|&b| b == b'=').next().unwrap_or_default()
}

/// Whether a parameter's raw key is `name` as some upstream's query parser reads it: with its
/// percent-encodings decoded (`access%5Ftoken`), in any case (ASP.NET Core's query collection
/// ignores case: `ACCESS_TOKEN`), and as PHP reads keys (Symfony, Laravel): `+` as a space, cut at
/// a NUL, leading spaces dropped, then a space or `.` as `_` (`access.token`, `+access_token`).
/// Matching fewer spellings would let a token reach the upstream in one of the others, unstripped
/// and never counted as a second credential.
pub fn is_param(key: &[u8], name: &str) -> bool {
    reads_as(key, name, true)
}

/// [`is_param`], in any case only when `any_case`. PHP also reads a `[` with no `]` after it as
/// `_` (`access[token`); with one, the key names an array by what comes before the `[`
/// (`access_token[]`, `access_token[0]`: the array `access_token`, as PHP, Rack and Express's
/// `qs` read it; `access[token]` is the array `access`). Rack and `qs` also read brackets around
/// a name as a nesting of it (`[access_token]`, `access_token]`).
pub fn reads_as(key: &[u8], name: &str, any_case: bool) -> bool {
    let as_read = |b: u8| match b {
        b' ' | b'.' | b'[' => b'_',
        b if any_case => b.to_ascii_lowercase(),
        b => b,
    };
    let matches = |read: &[u8]| {
        read.len() == name.len() && read.iter().zip(name.bytes()).all(|(&k, n)| as_read(k) == as_read(n))
    };
    let same = |read: &[u8]| {
        if !read.iter().any(|&b| b == b'[' || b == b']') {
            return matches(read);
        }
        // PHP drops a key that starts with `[`, and reads `name[…]` as the array `name`.
        let php = match read.iter().position(|&b| b == b'[') {
            Some(0) => None,
            Some(at) if read[at + 1..].contains(&b']') => Some(&read[..at]),
            _ => Some(read),
        };
        // Rack and Express's `qs` name a parameter by the first run of other characters, the
        // brackets around or after it a nesting (`[access_token]`, `access_token]`,
        // `access_token[x`).
        let start = read.iter().position(|&b| b != b'[' && b != b']').unwrap_or(read.len());
        let rest = &read[start..];
        let rack = &rest[..rest.iter().position(|&b| b == b'[' || b == b']').unwrap_or(rest.len())];
        php.is_some_and(matches) || matches(rack)
    };
    if key == name.as_bytes() {
        return true;
    }
    // Most keys need no decoding (this runs on every request with a query, for `_method`).
    if !key.iter().any(|&b| matches!(b, b'%' | b'+' | b' ' | 0)) {
        return same(key);
    }
    let decoded = form_decoded(key);
    let cut = decoded.split(|&b| b == 0).next().unwrap_or_default();
    let start = cut.iter().position(|&b| b != b' ').unwrap_or(cut.len());
    same(&cut[start..])
}

/// A query component decoded as a form: `+` is a space, then percent-decoded.
pub fn form_decoded(text: &[u8]) -> Vec<u8> {
    let spaced: Vec<u8> = text.iter().map(|&b| if b == b'+' { b' ' } else { b }).collect();
    percent_encoding::percent_decode(&spaced).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strip_keeps_the_rest_in_order() {
        let check = |q: &str, expected: &str| {
            assert_eq!(strip_query_param(q.as_bytes(), "access_token"), expected.as_bytes(), "{q}")
        };
        check("access_token=x", "");
        check("a=1&access_token=x&b=2", "a=1&b=2");
        check("b=2&a=1&access_token=x", "b=2&a=1");
        check("access_token=x&z=%20&y", "z=%20&y");
        check("access_tokenx=1&a=2", "access_tokenx=1&a=2");
        check("a=1&access%5Ftoken=x&access%5ftoken&b", "a=1&b");
        check("%61ccess_token=x&access_toke%6E", "");
        check("access%5Ftokens=x&access%5=y&access_toke%6=z", "access%5Ftokens=x&access%5=y&access_toke%6=z");
        check("access_token=x&&b&", "&b&");
    }

    #[test]
    fn a_semicolon_separates_parameters_too() {
        let check = |q: &str, expected: &str| {
            assert_eq!(strip_query_param(q.as_bytes(), "access_token"), expected.as_bytes(), "{q}")
        };
        check("access_token=T&x=1;access_token=T", "x=1");
        check("a=1;access_token=T&b=2;c=3", "a=1&b=2;c=3");
        check("access_token=T;a=1&b", "a=1&b");
        check("a=1;b=2&c", "a=1;b=2&c");
        assert!(has_query_param(b"x=1;access_token=T", "access_token"));
        assert_eq!(query_values("access_token=A&x;access_token=B", "access_token"), ["A", "B"]);
    }

    #[test]
    fn a_query_that_is_not_utf8_keeps_its_bytes() {
        let query = b"a=%FF\xff&access_token=T;b=\xfe";
        assert_eq!(strip_query_param(query, "access_token"), b"a=%FF\xff;b=\xfe");
    }

    #[test]
    fn query_params_are_found_by_their_decoded_name() {
        assert!(has_query_param(b"a=1&access%5Ftoken=x", "access_token"));
        assert!(has_query_param(b"access_token", "access_token"));
        assert!(!has_query_param(
            b"a=access_token&access_tokens=2&access-token&xaccess_token",
            "access_token"
        ));
        assert!(!has_query_param(b"", "access_token"));
        assert_eq!(query_values("access%5Ftoken=x&access_token=y", "access_token"), ["x", "y"]);
    }

    #[test]
    fn query_params_are_found_in_every_spelling_an_upstream_reads_as_theirs() {
        for key in [
            "ACCESS_TOKEN",
            "access[token",
            "access%5Btoken",
            "Access.Token",
            "access+token",
            "+access_token",
            "%20access%2Etoken",
            "access_token%00x",
            // An array named `access_token`.
            "access_token[]",
            "access_token%5B%5D",
            "access_token[0]",
            "Access.Token[x]",
            // Rack 2 and `qs` read these as `access_token` too.
            "[access_token]",
            "access_token]",
            "]access_token",
            "[access_token",
            "access_token[x",
        ] {
            assert!(is_param(key.as_bytes(), "access_token"), "{key}");
        }
        for key in [
            "access-token",
            "access_tokens",
            "access__token",
            "xaccess_token",
            "access[token]",
            "access_token_[x]",
            "[x]access_token",
        ] {
            assert!(!is_param(key.as_bytes(), "access_token"), "{key}");
        }
        assert_eq!(strip_query_param(b"a=1&ACCESS.TOKEN=x&b", "access_token"), b"a=1&b");
    }

    #[test]
    fn query_values_finds_each() {
        let v: Vec<&str> = query_values("a=1&t=x&b&t=y", "t");
        assert_eq!(v, ["x", "y"]);
    }
}
