//! The CLI's side of the admin API: authenticated JSON requests, errors as one-line reasons, and
//! plain text tables.

use anyhow::{anyhow, Context};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// `server` with its scheme. `localhost:8081` or `127.0.0.1:8081` means plain HTTP, as the
/// default does; another host must say `http://` or `https://`, so that a token is never sent
/// in the clear to a host that was meant to be reached over TLS.
fn with_scheme(server: &str) -> anyhow::Result<String> {
    if server.contains("://") {
        return Ok(server.to_string());
    }
    let host = server.rsplit_once(':').map_or(server, |(host, _)| host);
    let loopback = host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match loopback {
        true => Ok(format!("http://{server}")),
        false => Err(anyhow!("--server {server:?} needs a scheme: https://{server} or http://{server}")),
    }
}

/// An admin API client.
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

impl Client {
    /// A client for `server` (e.g. `http://127.0.0.1:8081`) authenticating with `token`.
    pub fn new(server: &str, token: Option<String>) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build()?;
        let server = with_scheme(server.trim_end_matches('/'))?;
        // An empty TOLLGATE_TOKEN is no token, not an empty one.
        let token = token.filter(|t| !t.trim().is_empty());
        Ok(Client { http, server, token })
    }

    /// Sends a request and decodes the JSON answer, or fails with the API's reason.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<T> {
        let token =
            self.token.as_deref().ok_or_else(|| anyhow!("no token: pass --token or set TOLLGATE_TOKEN"))?;
        let url = format!("{}{path}", self.server);
        let mut req = self.http.request(method, &url).bearer_auth(token);
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp =
            req.send().await.with_context(|| format!("cannot reach the admin API at {}", self.server))?;
        let status = resp.status();
        let text = resp.text().await.context("reading the admin API's answer")?;
        if !status.is_success() {
            let reason = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["error_description"].as_str().map(str::to_string));
            let not_the_api = matches!(status.as_u16(), 404 | 405);
            return Err(match reason {
                Some(reason) if !reason.starts_with("no route matches") => {
                    anyhow!("{reason} ({})", status.as_u16())
                }
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
    let rows: Vec<Vec<String>> =
        rows.iter().map(|row| row.iter().map(|cell| printable(cell).into_owned()).collect()).collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

#[cfg(test)]
mod tests {
    use super::{printable, with_scheme};

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(printable("ci deploy"), "ci deploy");
        assert_eq!(printable("x\u{1b}[2Jy\n"), "x\\u{1b}[2Jy\\n");
    }

    #[test]
    fn a_server_without_scheme_is_plain_http_only_on_this_machine() {
        for local in ["127.0.0.1:8081", "localhost:8081", "[::1]:8081"] {
            assert_eq!(with_scheme(local).unwrap(), format!("http://{local}"));
        }
        assert_eq!(with_scheme("https://admin.corp:8443").unwrap(), "https://admin.corp:8443");
        let err = with_scheme("admin.corp:8443").unwrap_err().to_string();
        assert!(err.contains("needs a scheme: https://admin.corp:8443"), "{err}");
    }
}
