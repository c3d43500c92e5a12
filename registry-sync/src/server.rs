//! An S3 server embedded in the process (s3s + s3s-fs), for single-machine
//! deployments and tests. Clients reach it over real HTTP with aws-sdk-s3,
//! exactly as they reach AWS.
//!
//! s3s-fs checks `If-Match` / `If-None-Match` and then writes, without a lock
//! between the two; two conditional writes to one key racing each other
//! could both pass. AWS applies conditional writes atomically, so this server
//! does too: every conditional PUT (and multipart completion) runs under one
//! lock.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::{S3Service, S3ServiceBuilder};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running embedded S3 server.
#[derive(Debug)]
pub struct EmbeddedS3 {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

#[derive(Clone)]
struct Atomic {
    inner: Arc<S3Service>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Service<http::Request<Incoming>> for Atomic {
    type Response = s3s::HttpResponse;
    type Error = s3s::HttpError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let conditional = matches!(*req.method(), http::Method::PUT | http::Method::POST)
            && (req.headers().contains_key(http::header::IF_MATCH)
                || req.headers().contains_key(http::header::IF_NONE_MATCH));
        let inner = self.inner.clone();
        let lock = self.lock.clone();
        Box::pin(async move {
            let _guard = if conditional {
                Some(lock.lock().await)
            } else {
                None
            };
            inner.call(req).await
        })
    }
}

impl EmbeddedS3 {
    /// Serves the buckets under `root` (one directory per bucket) on
    /// `listen`, accepting requests signed with the given key pair.
    pub async fn start(
        root: &Path,
        listen: SocketAddr,
        access_key: &str,
        secret_key: &str,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let fs =
            s3s_fs::FileSystem::new(root).map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(access_key, secret_key));
        let service = Atomic {
            inner: Arc::new(builder.build()),
            lock: Arc::new(tokio::sync::Mutex::new(())),
        };
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            let graceful = hyper_util::server::graceful::GracefulShutdown::new();
            loop {
                let socket = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(e) => {
                            tracing::warn!(error = %e, "embedded S3: accept failed");
                            continue;
                        }
                    },
                    _ = token.cancelled() => break,
                };
                let conn = http.serve_connection(TokioIo::new(socket), service.clone());
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), graceful.shutdown()).await;
        });
        tracing::info!(%addr, root = %root.display(), "embedded S3 server listening");
        Ok(EmbeddedS3 {
            addr,
            stop,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting and waits (bounded) for open requests.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EmbeddedS3 {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A registry with one region on an embedded server: what tests and
/// benchmarks on one machine start. The topology names `region` in
/// `jurisdiction` (strict when `strict`), as the home of `global` models.
pub struct LocalRegistry {
    pub s3: EmbeddedS3,
    /// The topology file's text (write it out for the CLI's `--topology`).
    pub topology: String,
    parsed: Arc<earshot_common::topology::Topology>,
    pub access_key: String,
    pub secret_key: String,
}

impl LocalRegistry {
    pub async fn start(
        root: &Path,
        region: &str,
        jurisdiction: &str,
        strict: bool,
    ) -> std::io::Result<LocalRegistry> {
        let (access_key, secret_key) = ("local-key".to_owned(), "local-secret".to_owned());
        let s3 = EmbeddedS3::start(
            root,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &access_key,
            &secret_key,
        )
        .await?;
        let topology = format!(
            "[[jurisdiction]]\nname = \"{jurisdiction}\"\nstrict = {strict}\n\
             [[region]]\nname = \"{region}\"\njurisdiction = \"{jurisdiction}\"\nquic = \"127.0.0.1:1\"\n\
             [registry]\nendpoint = \"{}\"\n[registry.home]\nglobal = \"{region}\"\n",
            s3.endpoint()
        );
        let parsed = earshot_common::topology::Topology::from_toml_str(&topology)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(LocalRegistry {
            s3,
            topology,
            parsed: Arc::new(parsed),
            access_key,
            secret_key,
        })
    }

    pub fn settings(&self) -> crate::store::S3Settings {
        crate::store::S3Settings {
            endpoint: Some(self.s3.endpoint()),
            region: "us-east-1".into(),
            access_key: self.access_key.clone(),
            secret_key: self.secret_key.clone(),
        }
    }

    /// A client of this registry, buckets not yet created.
    pub fn registry(&self) -> Result<crate::Registry, crate::RegistryError> {
        crate::Registry::new(self.parsed.clone(), &self.settings())
    }
}
