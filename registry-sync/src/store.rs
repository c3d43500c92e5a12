//! One registry bucket over the S3 protocol (aws-sdk-s3): the same code path
//! against AWS and against the embedded server.
//!
//! Errors say whether retrying can help ([`StoreError::is_permanent`]);
//! conditional writes report a lost race as [`Put::Conflict`], not an error.

use std::path::Path;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// How to reach the registry's S3 service.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// Endpoint URL; `None` uses AWS's.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

impl S3Settings {
    /// Credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, the
    /// signing region from `AWS_REGION` (default `us-east-1`).
    pub fn from_env(endpoint: Option<String>) -> Result<Self, StoreError> {
        let var = |name: &str| {
            std::env::var(name).map_err(|_| {
                StoreError::Config(format!("set {name} (the registry's S3 credentials)"))
            })
        };
        Ok(S3Settings {
            endpoint,
            region: std::env::var("AWS_REGION").unwrap_or_else(|_| "us-east-1".into()),
            access_key: var("AWS_ACCESS_KEY_ID")?,
            secret_key: var("AWS_SECRET_ACCESS_KEY")?,
        })
    }

    pub fn client(&self) -> Client {
        let mut b = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .credentials_provider(Credentials::new(
                self.access_key.clone(),
                self.secret_key.clone(),
                None,
                None,
                "earshot",
            ))
            .force_path_style(true)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .read_timeout(Duration::from_secs(30))
                    .build(),
            );
        if let Some(endpoint) = &self.endpoint {
            b = b.endpoint_url(endpoint);
        }
        Client::from_conf(b.build())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("registry configuration: {0}")]
    Config(String),
    #[error("s3://{bucket}/{key}: {message}")]
    S3 {
        bucket: String,
        key: String,
        /// HTTP status, when the server answered.
        status: Option<u16>,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether retrying the same request cannot help.
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Config(_) => true,
            StoreError::S3 { status, .. } => {
                matches!(status, Some(s) if *s < 500 && *s != 408 && *s != 429)
            }
            StoreError::Io { .. } => true,
        }
    }
}

fn s3_error<E: ProvideErrorMetadata + std::fmt::Debug>(
    bucket: &str,
    key: &str,
    e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> StoreError {
    let status = e.raw_response().map(|r| r.status().as_u16());
    let message = match &e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{} {}",
                err.code().unwrap_or("error"),
                err.message().unwrap_or("")
            )
        }
        SdkError::DispatchFailure(d) => format!("cannot reach the S3 endpoint: {d:?}"),
        SdkError::TimeoutError(_) => "timed out".into(),
        other => format!("{other}"),
    };
    StoreError::S3 {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        status,
        message: message.trim().to_owned(),
    }
}

/// The outcome of a conditional write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Put {
    /// Written; the new ETag.
    Written(String),
    /// The condition failed: the object exists (`If-None-Match`) or changed
    /// (`If-Match`).
    Conflict,
}

/// An object's listing entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

/// One bucket.
#[derive(Debug, Clone)]
pub struct Store {
    client: Client,
    bucket: String,
}

impl Store {
    pub fn new(client: Client, bucket: impl Into<String>) -> Self {
        Store {
            client,
            bucket: bucket.into(),
        }
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn err<E: ProvideErrorMetadata + std::fmt::Debug>(
        &self,
        key: &str,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError {
        s3_error(&self.bucket, key, e)
    }

    /// Creates the bucket if it does not exist.
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.code(),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(self.err("", e)),
        }
    }

    /// The object and its ETag, or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<(Bytes, String)>, StoreError> {
        self.get_limited(key, None).await
    }

    /// A registry document (manifest, channel, status) and its ETag, or
    /// `None` if it does not exist; one larger than
    /// [`MAX_DOCUMENT_BYTES`](earshot_common::manifest::MAX_DOCUMENT_BYTES)
    /// is refused before its body is read.
    pub async fn get_document(&self, key: &str) -> Result<Option<(Bytes, String)>, StoreError> {
        self.get_limited(key, Some(earshot_common::manifest::MAX_DOCUMENT_BYTES))
            .await
    }

    /// A body that breaks off mid-way (seen once under load against the
    /// embedded server while the same key was being replaced) is read
    /// again, up to [`BODY_ATTEMPTS`] times: a GET has no side effects.
    async fn get_limited(
        &self,
        key: &str,
        limit: Option<usize>,
    ) -> Result<Option<(Bytes, String)>, StoreError> {
        let mut backoff = earshot_common::retry::Backoff::new(
            std::time::Duration::from_millis(50),
            std::time::Duration::from_millis(500),
        );
        let mut attempt = 1;
        loop {
            match self.get_once(key, limit).await {
                Ok(done) => return done,
                Err(broken) if attempt < BODY_ATTEMPTS => {
                    tracing::warn!(bucket = %self.bucket, %key, %broken, attempt, "body broke off; reading again");
                    attempt += 1;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(broken) => {
                    return Err(StoreError::S3 {
                        bucket: self.bucket.clone(),
                        key: key.to_owned(),
                        status: None,
                        message: format!("reading body ({BODY_ATTEMPTS} attempts): {broken}"),
                    });
                }
            }
        }
    }

    /// One GET; the outer error is a body that broke off (worth reading
    /// again), the inner result everything else.
    async fn get_once(
        &self,
        key: &str,
        limit: Option<usize>,
    ) -> Result<Result<Option<(Bytes, String)>, StoreError>, String> {
        Ok(
            match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .send()
                .await
            {
                Ok(out) => {
                    let etag = out.e_tag().unwrap_or_default().to_owned();
                    if let Some(limit) = limit
                        && let Some(len) = out.content_length().filter(|l| *l as u64 > limit as u64)
                    {
                        return Ok(Err(StoreError::S3 {
                            bucket: self.bucket.clone(),
                            key: key.to_owned(),
                            status: None,
                            message: format!(
                                "{len} bytes is larger than the {limit}-byte limit for a registry document"
                            ),
                        }));
                    }
                    let body = out.body.collect().await.map_err(|e| error_chain(&e))?;
                    Ok(Some((body.into_bytes(), etag)))
                }
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                Err(e) => Err(self.err(key, e)),
            },
        )
    }

    /// Size and ETag, or `None` if it does not exist.
    pub async fn head(&self, key: &str) -> Result<Option<(u64, String)>, StoreError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some((
                out.content_length().unwrap_or(0).max(0) as u64,
                out.e_tag().unwrap_or_default().to_owned(),
            ))),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(self.err(key, e)),
        }
    }

    pub async fn put(&self, key: &str, body: Bytes) -> Result<String, StoreError> {
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.err(key, e))?;
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    /// Writes only if the key does not exist (`If-None-Match: *`).
    pub async fn put_new(&self, key: &str, body: Bytes) -> Result<Put, StoreError> {
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_none_match("*")
            .body(ByteStream::from(body))
            .send()
            .await;
        self.conditional(key, sent.map(|o| o.e_tag().unwrap_or_default().to_owned()))
    }

    /// Writes only if the object's ETag is still `etag` (`If-Match`).
    pub async fn put_if_match(
        &self,
        key: &str,
        body: Bytes,
        etag: &str,
    ) -> Result<Put, StoreError> {
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .if_match(etag)
            .body(ByteStream::from(body))
            .send()
            .await;
        self.conditional(key, sent.map(|o| o.e_tag().unwrap_or_default().to_owned()))
    }

    fn conditional<E: ProvideErrorMetadata + std::fmt::Debug>(
        &self,
        key: &str,
        sent: Result<String, SdkError<E, aws_sdk_s3::config::http::HttpResponse>>,
    ) -> Result<Put, StoreError> {
        match sent {
            Ok(etag) => Ok(Put::Written(etag)),
            Err(e)
                if e.raw_response().is_some_and(|r| r.status().as_u16() == 412)
                    || e.code() == Some("PreconditionFailed") =>
            {
                Ok(Put::Conflict)
            }
            Err(e) => Err(self.err(key, e)),
        }
    }

    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.err(key, e))?;
        Ok(())
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, StoreError> {
        Ok(self.list_paged(prefix, None).await?.0)
    }

    /// The immediate "subdirectories" of `prefix` (ending in `/`).
    pub async fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.list_paged(prefix, Some("/")).await?.1)
    }

    /// All pages of a listing: objects, and common prefixes when a
    /// delimiter is given.
    async fn list_paged(
        &self,
        prefix: &str,
        delimiter: Option<&str>,
    ) -> Result<(Vec<Listed>, Vec<String>), StoreError> {
        let (mut objects, mut dirs) = (Vec::new(), Vec::new());
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .set_delimiter(delimiter.map(str::to_owned))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| self.err(prefix, e))?;
            for o in page.contents() {
                if let Some(key) = o.key() {
                    objects.push(Listed {
                        key: key.to_owned(),
                        size: o.size().unwrap_or(0).max(0) as u64,
                    });
                }
            }
            dirs.extend(
                page.common_prefixes()
                    .iter()
                    .filter_map(|p| p.prefix().map(str::to_owned)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated().unwrap_or(false) => token = Some(t.to_owned()),
                _ => return Ok((objects, dirs)),
            }
        }
    }

    /// Streams an object to `dest`, hashing it on the way; returns its size
    /// and SHA-256. Stops with an error past `max_size` bytes.
    pub async fn download(
        &self,
        key: &str,
        dest: &Path,
        max_size: u64,
    ) -> Result<(u64, [u8; 32]), StoreError> {
        let io = |source| StoreError::Io {
            path: dest.display().to_string(),
            source,
        };
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.err(key, e))?;
        // Network chunks are ~16 KiB; writing each through tokio's file
        // (a blocking-pool hop and a syscall apiece) costs more than the
        // transfer. Batch them.
        let file = tokio::fs::File::create(dest).await.map_err(io)?;
        let mut file = tokio::io::BufWriter::with_capacity(4 << 20, file);
        let mut body = out.body;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body.try_next().await.map_err(|e| StoreError::S3 {
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            status: None,
            message: format!("reading body: {}", error_chain(&e)),
        })? {
            size += chunk.len() as u64;
            if size > max_size {
                return Err(StoreError::S3 {
                    bucket: self.bucket.clone(),
                    key: key.to_owned(),
                    status: None,
                    message: format!(
                        "object is larger than the {max_size} bytes its manifest lists"
                    ),
                });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        file.get_ref().sync_all().await.map_err(io)?;
        Ok((size, hasher.finalize().into()))
    }

    pub async fn create_multipart(&self, key: &str) -> Result<String, StoreError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.err(key, e))?;
        out.upload_id()
            .map(str::to_owned)
            .ok_or_else(|| StoreError::S3 {
                bucket: self.bucket.clone(),
                key: key.to_owned(),
                status: None,
                message: "no upload id in the answer".into(),
            })
    }

    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.err(key, e))?;
        Ok(out.e_tag().unwrap_or_default().to_owned())
    }

    /// The parts the server holds for an upload: `(number, etag, size)`
    /// (some servers omit the ETag). `None` if the upload no longer exists.
    pub async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Option<Vec<(i32, Option<String>, u64)>>, StoreError> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.take())
                .send()
                .await;
            let page = match page {
                Ok(p) => p,
                Err(e)
                    if e.code() == Some("NoSuchUpload")
                        || e.raw_response().is_some_and(|r| r.status().as_u16() == 404) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(self.err(key, e)),
            };
            for p in page.parts() {
                if let Some(n) = p.part_number() {
                    out.push((
                        n,
                        p.e_tag().map(str::to_owned),
                        p.size().unwrap_or(0).max(0) as u64,
                    ));
                }
            }
            match page.next_part_number_marker() {
                Some(m) if page.is_truncated().unwrap_or(false) => marker = Some(m.to_owned()),
                _ => return Ok(Some(out)),
            }
        }
    }

    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(i32, String)],
    ) -> Result<(), StoreError> {
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|(n, etag)| CompletedPart::builder().part_number(*n).e_tag(etag).build())
                    .collect(),
            ))
            .build();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(completed)
            .send()
            .await
            .map_err(|e| self.err(key, e))?;
        Ok(())
    }
}

/// How many times a GET whose body broke off is tried.
const BODY_ATTEMPTS: u32 = 3;

/// `e` and its sources, joined: "streaming error" alone does not say why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
