//! `llmlab serve`: an OpenAI-compatible HTTP server (axum + tokio) over the continuous-batching
//! [`engine`], with a web chat page.
//!
//! [`run`] is the command: it binds the address first (so `/health` answers 503 while the model
//! loads), starts the engine thread, prints one line when the model is ready, and serves until
//! Ctrl-C or SIGTERM. Then it stops accepting connections, cancels the running requests (their
//! streams end with `finish_reason: "abort"`), lets the open connections finish (at most
//! [`GRACE`]) and returns, so the process exits 0; a second signal exits at once (130).
//!
//! The connection loop ([`serve`]) is hyper's HTTP/1.1 under the axum router, with its header
//! read timer as the idle timeout: a connection that sends no complete request head within
//! `--idle-timeout` (a slow client, or a kept-alive connection left unused) is closed. The
//! request timeout and the body limit are the router's ([`http`]).
pub mod api;
pub mod engine;
pub mod http;
pub mod sampler;
pub mod text;

use crate::error::LlmError;
use engine::{Engine, EngineConfig, Status};
pub use http::{router, Backend, HttpConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long open connections may take to finish after a shutdown signal.
pub const GRACE: Duration = Duration::from_secs(10);

/// Everything `llmlab serve` is told.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub engine: EngineConfig,
    pub host: String,
    pub port: u16,
    pub api_key: Option<String>,
    /// Largest request body, in bytes.
    pub max_body: usize,
    /// Longest a request may take.
    pub timeout: Duration,
    /// Longest a connection may wait for a request's head.
    pub idle_timeout: Duration,
    /// Most new tokens of a chat request that names no limit (`None`: up to the context).
    pub default_max_tokens: Option<usize>,
}

/// Serves `app` on `listener` until `stop` turns true, then shuts every connection down
/// gracefully (an answer in progress is finished), waiting at most [`GRACE`] for them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    idle_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            r = stop.wait_for(|s| *s) => { drop(r); break }
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                eprintln!("llmlab serve: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        conns.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(idle_timeout);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let stopping = tokio::select! {
                _ = conn.as_mut() => false,
                r = stop.wait_for(|s| *s) => r.is_ok(),
            };
            if stopping {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        });
        // Forget the finished connections.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = tokio::time::timeout(GRACE, async { while conns.join_next().await.is_some() {} }).await;
}

/// A server on a background thread (tests, embedding code): the engine and the HTTP side
/// together, as [`run`] makes them, stopped by [`Server::stop`] or when dropped.
pub struct Server {
    pub addr: SocketAddr,
    backend: Arc<dyn Backend>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Binds `127.0.0.1:0`-style `addr` and serves `backend` with `cfg` on a tokio runtime of
    /// its own.
    pub fn start(
        addr: &str,
        backend: Arc<dyn Backend>,
        cfg: HttpConfig,
        idle_timeout: Duration,
    ) -> anyhow::Result<Server> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (stop, stop_rx) = watch::channel(false);
        let app = router(backend.clone(), cfg);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("llmlab-http")
            .enable_all()
            .build()?;
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => serve(l, app, idle_timeout, stop_rx).await,
                    Err(e) => eprintln!("llmlab serve: {e}"),
                }
            })
        });
        Ok(Server {
            addr,
            backend,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, cancels the running requests, and waits for the connections to finish.
    pub fn stop(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        let _ = self.stop.send(true);
        self.backend.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shut();
        }
    }
}

/// `llmlab serve`: serves until Ctrl-C or SIGTERM, then returns `Ok` once the in-flight
/// requests are cancelled and their connections closed; an error if the model fails to load.
pub fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("llmlab-http")
        .enable_all()
        .build()?;
    rt.block_on(run_async(cfg))
}

async fn run_async(cfg: ServeConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
        .await
        .map_err(|e| {
            LlmError::Usage(format!(
                "cannot listen on {}:{} ({e}); pick another --port or --host",
                cfg.host, cfg.port
            ))
        })?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    eprintln!(
        "llmlab serve: listening on {url}; loading {} ({}) ...",
        cfg.engine.model,
        cfg.engine.dtype.name()
    );
    let engine = Engine::start(cfg.engine.clone());
    let backend: Arc<dyn Backend> = Arc::new(engine);
    let http_cfg = HttpConfig {
        model: cfg.engine.model.clone(),
        api_key: cfg.api_key.clone(),
        max_body: cfg.max_body,
        timeout: cfg.timeout,
        default_max_tokens: cfg.default_max_tokens,
    };
    let (stop, stop_rx) = watch::channel(false);
    let server = tokio::spawn(serve(
        listener,
        router(backend.clone(), http_cfg),
        cfg.idle_timeout,
        stop_rx,
    ));

    // Ready (one line on stderr), or failed (the error ends the command).
    let watch_backend = backend.clone();
    let (max_batch, max_queue) = (cfg.engine.max_batch, cfg.engine.max_queue);
    let keyed = if cfg.api_key.is_some() {
        "; API key required"
    } else {
        ""
    };
    let loaded = async move {
        loop {
            match watch_backend.status() {
                Status::Loading => tokio::time::sleep(Duration::from_millis(50)).await,
                Status::Ready(info) => {
                    eprintln!(
                        "llmlab serve: {url} ready (model {}, context {}, max batch {max_batch}, max queue {max_queue}{keyed})",
                        info.id, info.context_length
                    );
                    std::future::pending::<()>().await;
                }
                Status::Failed(e) => return e,
            }
        }
    };
    let outcome = tokio::select! {
        failed = loaded => Err(LlmError::Usage(format!("the model failed to load: {failed}"))),
        sig = shutdown_signal() => sig,
    };
    if outcome.is_ok() {
        eprintln!("llmlab serve: shutting down: cancelling running requests (Ctrl-C again to quit at once)");
        tokio::spawn(async {
            let _ = shutdown_signal().await;
            eprintln!("llmlab serve: second signal: exiting now");
            std::process::exit(130);
        });
    }
    let _ = stop.send(true);
    let b = backend.clone();
    let engine_done = tokio::task::spawn_blocking(move || b.shutdown());
    let _ = server.await;
    let _ = engine_done.await;
    outcome?;
    eprintln!("llmlab serve: stopped");
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() -> Result<(), LlmError> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| LlmError::Usage(format!("SIGTERM handler: {e}")))?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    Ok(())
}
