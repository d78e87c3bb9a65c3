//! The one shutdown signal every task of the process listens to.

use tokio::sync::watch;

/// A cloneable shutdown signal, raised by SIGTERM or SIGINT.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// A signal raised when the process receives SIGTERM or SIGINT. Must be called
    /// inside the async runtime.
    pub fn on_signals() -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let terminate = async {
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate => {}
            }
            tracing::info!("shutdown requested: finishing in-flight work");
            let _ = tx.send(true);
        });
        Shutdown(rx)
    }

    /// Resolves once shutdown was requested.
    pub fn signal(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}
