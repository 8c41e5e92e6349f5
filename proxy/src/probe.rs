//! Small GET requests to a replica (health checks and metric scrapes) over
//! Pingora's pooled connector, each bounded in time and in body size.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pingora::connectors::http::v1::Connector;
use pingora::http::RequestHeader;
use pingora::upstreams::peer::HttpPeer;

/// GETs `path` from `addr`; returns the status and up to `max_body` bytes of body.
/// Errors are short descriptions for the admin view and logs.
pub async fn get(
    connector: &Connector,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    max_body: usize,
) -> Result<(u16, Bytes), String> {
    match tokio::time::timeout(timeout, get_inner(connector, addr, path, max_body)).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {} ms", timeout.as_millis())),
    }
}

async fn get_inner(
    connector: &Connector,
    addr: SocketAddr,
    path: &str,
    max_body: usize,
) -> Result<(u16, Bytes), String> {
    let mut peer = HttpPeer::new(addr, false, String::new());
    peer.options.connection_timeout = Some(Duration::from_secs(1));
    let (mut session, _reused) = connector
        .get_http_session(&peer)
        .await
        .map_err(|e| format!("connect: {}", e.etype().as_str()))?;
    let mut req = RequestHeader::build("GET", path.as_bytes(), Some(2))
        .map_err(|e| format!("request: {e}"))?;
    req.insert_header("host", addr.to_string())
        .map_err(|e| format!("request: {e}"))?;
    req.insert_header("user-agent", "sluice-probe")
        .map_err(|e| format!("request: {e}"))?;
    session
        .write_request_header(Box::new(req))
        .await
        .map_err(|e| format!("send: {}", e.etype().as_str()))?;
    session
        .finish_body()
        .await
        .map_err(|e| format!("send: {}", e.etype().as_str()))?;
    session
        .read_response()
        .await
        .map_err(|e| format!("read: {}", e.etype().as_str()))?;
    let status = session
        .resp_header()
        .map(|h| h.status.as_u16())
        .ok_or_else(|| "no response header".to_string())?;
    let mut body = BytesMut::new();
    loop {
        match session.read_body_bytes().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > max_body {
                    // Too big to keep: drop the connection rather than drain it.
                    return Err(format!("body larger than {max_body} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => return Err(format!("read body: {}", e.etype().as_str())),
        }
    }
    connector
        .release_http_session(session, &peer, Some(Duration::from_secs(30)))
        .await;
    Ok((status, body.freeze()))
}
