//! The CLI's side of the admin API: authenticated JSON requests, errors as one-line reasons, and
//! plain text tables.

use anyhow::{anyhow, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `server` (`--server`, `TOLLGATE_SERVER`) as the base of the API's URLs. `localhost:8081` or
/// `127.0.0.1:8081` means plain HTTP, as the default does; another host must say `http://` or
/// `https://`, so that a token is never sent in the clear to a host that was meant to be reached
/// over TLS. The host is judged as the URL is parsed (`localhost:1@evil.example` names
/// `evil.example`), and an address with a user name or password, a query or a fragment is
/// refused: the token is the credential, and the API's paths are appended.
fn server_url(server: &str) -> anyhow::Result<String> {
    // Named both ways in every message: the value may come from either.
    const SERVER: &str = "--server (TOLLGATE_SERVER)";
    let server = server.trim();
    let example = "write e.g. http://127.0.0.1:8081 or https://admin.example.com";
    if server.is_empty() {
        return Err(anyhow!("{SERVER} is empty: {example}"));
    }
    let scheme_given = server.contains("://");
    let text = match scheme_given {
        true => server.to_string(),
        false => format!("http://{server}"),
    };
    // Never repeated whole: a user name and password in it (refused below) are masked, since an
    // error ends up in terminals and CI logs. (As `http://` adds none, what is shown is as typed.)
    let server = match scheme_given {
        true => crate::config::redact_url(server),
        false => crate::config::redact_url(&text).trim_start_matches("http://").to_string(),
    };
    if !scheme_given && (server.starts_with("http:") || server.starts_with("https:")) {
        return Err(anyhow!("{SERVER} {server:?}: the scheme needs two slashes; {example}"));
    }
    let url = reqwest::Url::parse(&text)
        .map_err(|e| anyhow!("{SERVER} {server:?} is not an address ({e}); {example}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(anyhow!("{SERVER} {server:?}: the admin API speaks http:// or https://"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(anyhow!(
            "{SERVER} {server:?} holds a user name or password: the token is the only credential"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(anyhow!("{SERVER} {server:?}: an address without `?` or `#`; {example}"));
    }
    if !scheme_given && !is_loopback(&url) {
        return Err(anyhow!("{SERVER} {server:?} needs a scheme: https://{server} or http://{server}"));
    }
    Ok(text.trim_end_matches('/').to_string())
}

/// Whether an address names this machine's loopback (`localhost`, `127.x.x.x`, `[::1]`).
fn is_loopback(url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// The token (`--token`, `TOLLGATE_TOKEN`) without the whitespace a copy brings along (a `\r` from
/// a file written on Windows); `None` for none at all. A token is printable ASCII: anything else
/// is refused here, naming where it came from, rather than as a failure to reach the server.
fn token_text(token: Option<String>) -> anyhow::Result<Option<String>> {
    let Some(token) = token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) else { return Ok(None) };
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(anyhow!(
            "the token (--token or TOLLGATE_TOKEN) holds spaces or characters no token has; copy it again"
        ));
    }
    Ok(Some(token))
}

/// How long the CLI waits for the admin API's answer.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);
/// How long it waits for a connection to the admin API (nothing sent yet).
const CONNECT_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// An admin API client.
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
    /// `--json`: what it prints itself (a token kept from a failed answer) is JSON too.
    json: bool,
    /// Whether the calling token's grace was said already.
    warned: std::sync::atomic::AtomicBool,
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:8081`) authenticating with `token`.
    pub fn new(server: &str, token: Option<String>, json: bool) -> anyhow::Result<Client> {
        let server = server_url(server)?;
        let mut http = reqwest::Client::builder().connect_timeout(CONNECT_WITHIN).timeout(ANSWER_WITHIN);
        // A proxy from the environment (`http_proxy`, `ALL_PROXY`) would get the token in the
        // clear over plain HTTP, and cannot reach this machine's loopback at all.
        if reqwest::Url::parse(&server).is_ok_and(|url| url.scheme() == "http" || is_loopback(&url)) {
            http = http.no_proxy();
        }
        let http = http.build()?;
        // An empty TOLLGATE_TOKEN is no token, not an empty one.
        let token = token_text(token)?;
        Ok(Client { http, server, token, json, warned: Default::default() })
    }

    /// The token to call with, or why there is none.
    pub fn token(&self) -> anyhow::Result<&str> {
        self.token.as_deref().ok_or_else(|| anyhow!("no token: pass --token or set TOLLGATE_TOKEN"))
    }

    /// Why a request got no answer. Never connected, nothing was sent; otherwise the change asked
    /// for may have been made (a token issued or rotated, say), and the message says so rather
    /// than that the API was never reached.
    fn unanswered(&self, e: reqwest::Error) -> anyhow::Error {
        let server = &self.server;
        let look = "a change asked for may have been made all the same: look (`token list`, `audit`) before asking again";
        if e.is_connect() {
            // Nothing listens there: the likeliest reasons, said (a TLS failure says its own).
            let refused = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .filter_map(|e| e.downcast_ref::<std::io::Error>())
                .any(|e| e.kind() == std::io::ErrorKind::ConnectionRefused);
            let hint = match refused {
                true => ": is the gateway running, and is --server (TOLLGATE_SERVER) its admin.listen address (default http://127.0.0.1:8081)?",
                false => "",
            };
            anyhow::Error::new(e).context(format!("cannot reach the admin API at {server}{hint}"))
        } else if e.is_timeout() {
            anyhow!("the admin API at {server} did not answer within {} s; {look}", ANSWER_WITHIN.as_secs())
        } else {
            anyhow::Error::new(e)
                .context(format!("the admin API at {server} did not finish its answer; {look}"))
        }
    }

    /// Sends a request and decodes the JSON answer, or fails with the API's reason.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let token = self.token()?;
        // An argument given as '', '.' or '..' names nothing, and would be sent as another path
        // (the segment dropped, or a URL's dot-segment taken away), answered as that path.
        let bare = path.split('?').next().unwrap_or_default();
        if bare.split('/').skip(1).any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(anyhow!("an empty argument, '.' or '..' names nothing: give the id, email or name"));
        }
        let url = format!("{}{path}", self.server);
        let mut req = self.http.request(method, &url).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| self.unanswered(e))?;
        // The API marks every answer to a token in a rotation's grace (RFC 8594): said once.
        if let Some(sunset) = resp.headers().get("sunset").and_then(|v| v.to_str().ok()) {
            if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                eprintln!(
                    "warning: the token you called with was rotated and stops working at {}; use its replacement",
                    printable(sunset)
                );
            }
        }
        let status = resp.status();
        let text = resp.text().await.map_err(|e| self.unanswered(e))?;
        if !status.is_success() {
            let answer = serde_json::from_str::<serde_json::Value>(&text).ok();
            // A change that made a token, sent to the store and not answered: the token is the
            // caller's only copy if the change was made. Only that answer (a 503) carries one; a
            // `token` in any other error is not shown as a credential.
            let kept = answer
                .as_ref()
                .filter(|v| {
                    status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                        && v["error"] == "temporarily_unavailable"
                })
                .and_then(|v| v["token"].as_str());
            if let Some(token) = kept {
                super::print_kept_token(token, self.json);
            }
            let reason = answer.and_then(|v| v["error_description"].as_str().map(str::to_string));
            let not_the_api = matches!(status.as_u16(), 404 | 405);
            return Err(match reason {
                Some(reason) if !reason.starts_with("no route matches") && reason != "no such endpoint" => {
                    anyhow!("{reason} ({})", status.as_u16())
                }
                // The admin API has no such endpoint: a --server with a path of its own, or an
                // older gateway.
                Some(reason) if reason == "no such endpoint" => anyhow!(
                    "{} has no endpoint {path}: is --server (TOLLGATE_SERVER) the admin listener's address without a path (admin.listen, default http://127.0.0.1:8081), and the gateway as new as this CLI?",
                    self.server
                ),
                // The gateway's own 404, or something that is not Tollgate at all.
                _ if not_the_api => anyhow!(
                    "{} answered {status} to {path}, which is not how the admin API answers: is --server (TOLLGATE_SERVER) the admin listener (admin.listen, default http://127.0.0.1:8081)?",
                    self.server
                ),
                // A proxy's page in front of it, say: its first line.
                _ => anyhow!("{} answered {status}: {}", self.server, text.lines().next().unwrap_or("").trim()),
            });
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected answer from {url}"))
    }
}

/// Percent-encodes a path segment (emails carry '@' and '+').
pub fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'@' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Text as a terminal may safely show it: control characters (which could move the cursor or
/// recolour the screen, from a display name or a reason anyone with a token can set) escaped.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return text.into();
    }
    text.chars()
        .map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() })
        .collect::<String>()
        .into()
}

/// Prints rows under headers, columns padded to their widest cell, control characters escaped.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    for line in table_lines(headers, rows) {
        outln!("{line}");
    }
}

/// [`table`]'s lines. Cells are measured in terminal columns, not characters: a CJK name or an
/// emoji takes two, a combining accent none, and the columns after it still line up.
fn table_lines(headers: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    use unicode_width::UnicodeWidthStr;
    let rows: Vec<Vec<String>> =
        rows.iter().map(|row| row.iter().map(|cell| printable(cell).into_owned()).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.width()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.width());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> =
            cells.iter().zip(&widths).map(|(c, w)| format!("{c}{}", " ".repeat(w - c.width()))).collect();
        padded.join("  ").trim_end().to_string()
    };
    std::iter::once(line(headers.to_vec()))
        .chain(rows.iter().map(|row| line(row.iter().map(String::as_str).collect())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{printable, server_url, token_text};

    #[test]
    fn table_columns_line_up_on_a_terminal_whatever_the_names_hold() {
        use unicode_width::UnicodeWidthStr;
        let rows = [
            vec!["tgp_aaaaaa".to_string(), "本番デプロイ".to_string(), "2026-11-27".to_string()],
            vec!["tgp_bbbbbb".to_string(), "cafe\u{301}".to_string(), "2026-11-28".to_string()],
            vec!["tgp_cccccc".to_string(), "ci".to_string(), "2026-11-29".to_string()],
        ];
        let lines = super::table_lines(&["ID", "DISPLAY NAME", "CREATED"], &rows);
        // Where CREATED starts, in terminal columns, is the same on every line.
        let starts: Vec<usize> = lines
            .iter()
            .map(|l| {
                let at = l.find("CREATED").or_else(|| l.find("2026")).unwrap();
                l[..at].width()
            })
            .collect();
        assert_eq!(starts, vec![starts[0]; 4], "{lines:#?}");
        assert_eq!(starts[0], "tgp_aaaaaa  本番デプロイ  ".width());
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("ci deploy"), "ci deploy");
        assert_eq!(printable("x\u{1b}[2Jy\n"), "x\\u{1b}[2Jy\\n");
    }

    #[test]
    fn a_server_without_scheme_is_plain_http_only_on_this_machine() {
        for local in ["127.0.0.1:8081", "localhost:8081", "[::1]:8081", "[::1]", "localhost"] {
            assert_eq!(server_url(local).unwrap(), format!("http://{local}"));
        }
        assert_eq!(server_url(" http://127.0.0.1:8081/ ").unwrap(), "http://127.0.0.1:8081");
        assert_eq!(server_url("https://admin.corp:8443").unwrap(), "https://admin.corp:8443");
        assert_eq!(server_url("https://ops.corp/tollgate/").unwrap(), "https://ops.corp/tollgate");
        let err = server_url("admin.corp:8443").unwrap_err().to_string();
        assert!(err.contains("needs a scheme: https://admin.corp:8443"), "{err}");
        // Named both ways: the value may have come from the environment, with no flag given.
        assert!(err.contains("--server (TOLLGATE_SERVER)"), "{err}");
        // The host is the URL's, not the text before the last colon.
        let err = server_url("localhost:8081@evil.example").unwrap_err().to_string();
        assert!(err.contains("user name or password"), "{err}");
        // Whose password is never repeated.
        for given in ["https://ops:S3cret@admin.corp", "ops:S3cret@admin.corp:8081"] {
            let err = server_url(given).unwrap_err().to_string();
            assert!(err.contains("user name or password") && !err.contains("S3cret"), "{err}");
        }
        let err = server_url("127.0.0.1.evil.example:8081").unwrap_err().to_string();
        assert!(err.contains("needs a scheme"), "{err}");
        for (bad, says) in [
            ("", "is empty"),
            ("http:/localhost:8081", "two slashes"),
            ("ftp://localhost:8081", "http:// or https://"),
            ("http://localhost:8081/?x=1", "without `?`"),
            ("http://local host:8081", "not an address"),
        ] {
            let err = server_url(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_token_is_trimmed_and_must_be_printable() {
        assert_eq!(token_text(Some("tgp_abc\r\n".into())).unwrap().as_deref(), Some("tgp_abc"));
        assert_eq!(token_text(Some("  ".into())).unwrap(), None);
        assert_eq!(token_text(None).unwrap(), None);
        let err = token_text(Some("tgp_a bc".into())).unwrap_err().to_string();
        assert!(err.contains("TOLLGATE_TOKEN"), "{err}");
        assert!(token_text(Some("tgp_ä".into())).is_err());
    }
}
