//! Keep-alive connections to replicas.
//!
//! Pingora's connector pool watches every idle connection with a task of
//! its own; on a proxy whose requests are short that spawn, the hand-over
//! between the watcher and the next request, and a `getpeername` per reuse
//! cost more than the rest of the request path (measured: see
//! docs/PERFORMANCE.md). Here idle connections wait in a bounded per-replica
//! stack instead and are checked when taken out: a connection the replica
//! closed (or that has unexpected bytes waiting) reads as ready and is
//! dropped. Pingora's HTTP/1 client session still speaks the protocol.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use pingora::protocols::Stream;
use pingora::protocols::l4::stream::Stream as L4Stream;
use tokio::io::{AsyncRead, ReadBuf};

use crate::endpoint::lock;

/// Why a new connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// The connect timeout passed.
    Timeout,
    /// The replica refused or the network failed.
    Io(std::io::Error),
}

/// Idle keep-alive connections per replica address.
#[derive(Debug)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<SocketAddr, VecDeque<(Stream, Instant)>>>,
    max_idle_per_replica: usize,
    idle_timeout: Duration,
}

impl UpstreamPool {
    /// A pool keeping at most `max_idle_per_replica` idle connections per
    /// replica, each for at most `idle_timeout`.
    pub fn new(max_idle_per_replica: usize, idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(HashMap::new()),
            max_idle_per_replica,
            idle_timeout,
        }
    }

    /// A live idle connection to `addr`, if there is one.
    pub fn take(&self, addr: SocketAddr) -> Option<Stream> {
        let now = Instant::now();
        loop {
            let (mut stream, since) = {
                let mut idle = lock(&self.idle);
                idle.get_mut(&addr)?.pop_back()?
            };
            if now.saturating_duration_since(since) < self.idle_timeout && is_quiet(&mut stream) {
                return Some(stream);
            }
            // Closed by the replica, unexpected data, or idle too long: drop it.
        }
    }

    /// Returns a connection whose last response was read completely.
    pub fn put(&self, addr: SocketAddr, stream: Stream) {
        let now = Instant::now();
        let mut idle = lock(&self.idle);
        let list = idle.entry(addr).or_default();
        // The oldest wait at the front; drop the expired ones so closed
        // sockets do not sit in the pool behind busy ones.
        while list
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= self.idle_timeout)
        {
            list.pop_front();
        }
        if list.len() < self.max_idle_per_replica {
            list.push_back((stream, now));
        }
    }

    /// Drops every idle connection to replicas not in `keep` (after discovery changes).
    pub fn retain(&self, keep: impl Fn(&SocketAddr) -> bool) {
        lock(&self.idle).retain(|a, _| keep(a));
    }

    /// Opens a new connection.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Stream, ConnectError> {
        let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout)?
            .map_err(ConnectError::Io)?;
        let _ = tcp.set_nodelay(true);
        Ok(Box::new(L4Stream::from(tcp)))
    }
}

/// Whether nothing is waiting to be read: an idle HTTP/1 connection that is
/// readable was closed by the peer (or carries bytes nobody asked for).
fn is_quiet(stream: &mut Stream) -> bool {
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(
        std::pin::Pin::new(stream).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn closed_and_expired_connections_are_not_reused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = UpstreamPool::new(2, Duration::from_secs(60));

        let c1 = UpstreamPool::connect(addr, Duration::from_secs(1))
            .await
            .unwrap();
        let (s1, _) = listener.accept().await.unwrap();
        pool.put(addr, c1);
        assert!(pool.take(addr).is_some(), "a quiet connection is reused");

        let c2 = UpstreamPool::connect(addr, Duration::from_secs(1))
            .await
            .unwrap();
        let (mut s2, _) = listener.accept().await.unwrap();
        pool.put(addr, c2);
        s2.shutdown().await.unwrap();
        drop(s2);
        drop(s1);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            pool.take(addr).is_none(),
            "a connection the peer closed is dropped"
        );

        let short = UpstreamPool::new(2, Duration::from_millis(1));
        let c3 = UpstreamPool::connect(addr, Duration::from_secs(1))
            .await
            .unwrap();
        let _s3 = listener.accept().await.unwrap();
        short.put(addr, c3);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            short.take(addr).is_none(),
            "an expired connection is dropped"
        );

        for _ in 0..3 {
            let c = UpstreamPool::connect(addr, Duration::from_secs(1))
                .await
                .unwrap();
            let _ = listener.accept().await.unwrap();
            pool.put(addr, c);
        }
        assert_eq!(lock(&pool.idle)[&addr].len(), 2, "bounded per replica");
    }
}
