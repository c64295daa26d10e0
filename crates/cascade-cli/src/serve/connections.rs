//! The accept loop: hyper's HTTP/1 server under limits axum::serve does not
//! set (a cap on open connections, a header read timeout) and a graceful
//! shutdown with a deadline, after which the stragglers are dropped.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

pub(super) struct Connections {
    /// Open connections at most; more are closed on accept.
    pub max: usize,
    /// Time to send a request's headers (an idle keep-alive connection too).
    pub header_timeout: Duration,
    /// Time requests in progress get once `shutdown` fires.
    pub shutdown: Duration,
}

impl Connections {
    /// Serves `app` until `shutdown` fires, then lets requests in progress
    /// finish for at most the shutdown deadline.
    pub async fn serve(&self, listener: TcpListener, app: Router, shutdown: impl Future) {
        let open = Arc::new(Semaphore::new(self.max));
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = &mut shutdown => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    eprintln!("cascade serve: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(self.header_timeout)
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                let _ = connection.await;
                drop(permit);
            });
        }
        drop(listener);
        if tokio::time::timeout(self.shutdown, graceful.shutdown())
            .await
            .is_err()
        {
            eprintln!(
                "cascade serve: connections still open after {:?} are dropped",
                self.shutdown
            );
        }
    }
}
