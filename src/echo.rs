//! A built-in echo upstream: answers every request with JSON of what it received (method, URI,
//! headers, body). The quickstart puts it behind the gateway, `tollgate echo` serves it for the
//! docker-compose demo, and the tests use it as their upstream.

use std::collections::BTreeMap;

use axum::extract::Request;
use axum::{Json, Router};

/// Serves the echo on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    axum::serve(listener, Router::new().fallback(echo)).await
}

/// Serves the echo on its own thread and runtime, so it outlives no one and needs no caller runtime.
pub fn spawn(listener: std::net::TcpListener) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("echo upstream".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => {
                    if let Err(e) = serve(l).await {
                        tracing::error!(error = %e, "echo upstream stopped");
                    }
                }
                Err(e) => tracing::error!(error = %e, "echo upstream could not listen"),
            }
        })
    })?;
    Ok(())
}

/// Bodies longer than this are not echoed (their length is).
const ECHOED_BODY: usize = 1 << 20;

async fn echo(req: Request) -> Json<serde_json::Value> {
    let (parts, body) = req.into_parts();
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers
            .entry(name.as_str().to_string())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    // The whole body is read (and counted) whatever its length; its text is echoed up to a bound.
    let mut body = body.into_data_stream();
    let (mut text, mut length) = (Vec::new(), 0usize);
    while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut body).await {
        length += chunk.len();
        if length <= ECHOED_BODY {
            text.extend_from_slice(&chunk);
        }
    }
    let body = (length <= ECHOED_BODY).then(|| String::from_utf8_lossy(&text).into_owned());
    Json(serde_json::json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.to_string(),
        "headers": headers,
        "body": body,
        "body_length": length,
    }))
}
