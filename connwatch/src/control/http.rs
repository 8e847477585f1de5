//! The small HTTP responder behind `--metrics-addr`: `GET /metrics` answers with the
//! exposition the event loop writes.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::protocol::{Reply, Request};
use super::server::{accept_each, ask, Job};

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const MAX_HEAD: usize = 8 * 1024;

/// Serves `GET /metrics` for as long as the daemon runs: a minimal HTTP/1.1 responder,
/// one request per connection.
pub async fn serve(listener: TcpListener, jobs: mpsc::Sender<Job>) {
    accept_each("metrics", listener, |stream| {
        tokio::spawn(respond(stream, jobs.clone()));
    })
    .await
}

/// Reads a request head: up to the blank line, within a size and a time limit.
async fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = stream.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()??;
    String::from_utf8(head).ok()
}

/// The status line, content type and body for a request line.
pub async fn route(
    request_line: &str,
    jobs: &mpsc::Sender<Job>,
) -> (&'static str, &'static str, String) {
    let mut parts = request_line.split_whitespace();
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let text = "text/plain; charset=utf-8";
    if !version.is_some_and(|v| v.starts_with("HTTP/")) {
        return ("400 Bad Request", text, "bad request\n".into());
    }
    if !matches!(method, Some("GET") | Some("HEAD")) {
        return ("405 Method Not Allowed", text, "only GET\n".into());
    }
    match target.map(|t| t.split('?').next().unwrap_or(t)) {
        Some("/metrics") => match ask(jobs, Request::Metrics).await {
            Reply::Text(body) => ("200 OK", CONTENT_TYPE, body),
            other => (
                "503 Service Unavailable",
                text,
                format!("{}\n", other.to_line()),
            ),
        },
        Some("/") => ("200 OK", text, "connwatch: metrics at /metrics\n".into()),
        _ => ("404 Not Found", text, "not found: try /metrics\n".into()),
    }
}

async fn respond(mut stream: TcpStream, jobs: mpsc::Sender<Job>) {
    let Some(head) = read_head(&mut stream).await else {
        let _ = stream
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            )
            .await;
        return;
    };
    let first = head.lines().next().unwrap_or("");
    let (status, content_type, body) = route(first, &jobs).await;
    let head_only = first.starts_with("HEAD ");
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        body.len(),
        if head_only { "" } else { body.as_str() }
    );
    // A scraper that does not read its reply is dropped, not waited for.
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        stream.write_all(response.as_bytes()),
    )
    .await;
    let _ = stream.shutdown().await;
}
