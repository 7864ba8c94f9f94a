//! The accept loop: HTTP/1.1 connections served by hyper with a header-read timeout, a write-stall
//! (idle) timeout and a cap on open connections. A connection beyond the cap is answered at once
//! with a 503 (OpenAI-style JSON) and closed, so file descriptors never run out and the server
//! keeps serving the connections it holds.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use super::error::ApiError;

/// Default of [`ConnLimits::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;
/// Default of [`ConnLimits::header_timeout`].
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`ConnLimits::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Refusals being written at once; connections beyond it are closed without an answer.
const REFUSALS: usize = 64;
/// On shutdown, the longest wait for the requests in flight to finish (a second Ctrl-C is not
/// needed: past it the server ends anyway).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// Bounds on connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnLimits {
    /// Open connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from the connection's start or the end of
    /// its previous answer (so an idle keep-alive connection is closed after it).
    pub header_timeout: Duration,
    /// A connection whose client stops taking the answer (a write makes no progress) for this
    /// long is closed.
    pub idle_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

impl ConnLimits {
    /// Checks the limits (each at least 1), naming the option.
    pub fn validate(&self) -> crate::Result<()> {
        if self.max_connections == 0 {
            return Err(crate::Error::setting(
                "max-connections",
                self.max_connections,
                "must be at least 1",
            ));
        }
        for (name, d) in [
            ("header-timeout", self.header_timeout),
            ("idle-timeout", self.idle_timeout),
        ] {
            if d.is_zero() || d > super::MAX_TIMEOUT {
                return Err(crate::Error::setting(
                    name,
                    format!("{}s", d.as_secs_f64()),
                    format!(
                        "must be between 1 and {} seconds",
                        super::MAX_TIMEOUT.as_secs()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Serves `app` on `listener` until `shutdown` completes; then stops accepting, lets the requests
/// in flight finish (idle keep-alive connections are closed) for up to [`SHUTDOWN_GRACE`], and
/// returns.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(REFUSALS));
    let mut shutdown = pin!(shutdown);
    let graceful = GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // out of file descriptors (or a connection reset before accept): wait, retry
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, limits.max_connections).await;
                    drop(p);
                });
            }
            continue;
        };
        let svc = TowerToHyperService::new(app.clone());
        let io = TokioIo::new(Stalling::new(stream, limits.idle_timeout));
        let mut b = http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let conn = graceful.watch(b.serve_connection(io, svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection closed: {e}");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(
                "requests still in flight after {}s; stopping anyway",
                SHUTDOWN_GRACE.as_secs()
            );
        }
    }
    Ok(())
}

/// Answers a connection beyond the cap with a 503 and closes it, all within a few seconds.
async fn refuse(mut stream: TcpStream, max: usize) {
    let body = ApiError::Unavailable(format!(
        "the server holds its maximum of {max} connections (--max-connections): retry later"
    ))
    .body()
    .to_string();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let mut buf = [0u8; 4096];
    // take what the client already sent, so that closing does not reset the connection
    let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await
    };
    if tokio::time::timeout(Duration::from_secs(2), write)
        .await
        .is_ok()
    {
        let drain = async { while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {} };
        let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
    }
}

/// A stream whose writes fail once one has made no progress for `limit` (a client that stopped
/// reading its answer).
struct Stalling<T> {
    inner: T,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> Stalling<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Stalling {
            inner,
            limit,
            stalled: None,
        }
    }

    /// `Pending` from the stream: starts or checks the stall clock.
    fn pending<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no data for the idle timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalling<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalling<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Pending => self.pending(cx),
            r => {
                self.stalled = None;
                r
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.inner).poll_flush(cx) {
            Poll::Pending => self.pending(cx),
            r => {
                self.stalled = None;
                r
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.pending(cx),
            r => {
                self.stalled = None;
                r
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shutdown stops accepting but lets a request in flight finish with its answer before
    /// `serve` returns (it used to return at once, and the binary then dropped such requests).
    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let finished = Arc::new(AtomicBool::new(false));
        let f = finished.clone();
        let app = Router::new().route(
            "/slow",
            axum::routing::get(move || async move {
                tokio::time::sleep(Duration::from_millis(400)).await;
                f.store(true, Ordering::SeqCst);
                "done"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app, ConnLimits::default(), async {
            let _ = stopped.await;
        }));
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("serve did not return after shutdown")
            .unwrap()
            .unwrap();
        assert!(
            finished.load(Ordering::SeqCst),
            "serve returned with a request in flight"
        );
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_end(&mut answer))
            .await
            .expect("the connection was not closed")
            .unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.ends_with("done"), "{text}");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "still accepting after shutdown"
        );
    }

    /// A peer that stops reading makes a write fail after the idle limit (the connection then
    /// closes) instead of holding it forever; a peer that reads keeps it going.
    #[tokio::test]
    async fn a_stalled_write_times_out() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut s = Stalling::new(a, Duration::from_millis(200));
        s.write_all(&[1u8; 64]).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), s.write_all(&[2u8; 64])).await;
        let e = r.expect("the stalled write hung").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // progress resets the clock: a reader taking the bytes lets the writes through
        let mut got = vec![0u8; 64];
        b.read_exact(&mut got).await.unwrap();
        let (mut s2, mut b2) = {
            let (a, b) = tokio::io::duplex(64);
            (Stalling::new(a, Duration::from_millis(200)), b)
        };
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            let mut buf = [0u8; 16];
            while all.len() < 1024 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let n = b2.read(&mut buf).await.unwrap();
                all.extend_from_slice(&buf[..n]);
            }
            all.len()
        });
        s2.write_all(&[3u8; 1024]).await.unwrap();
        assert_eq!(reader.await.unwrap(), 1024);
    }
}
