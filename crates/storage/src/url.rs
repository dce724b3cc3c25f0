//! Opening a repository URL: `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix`,
//! `az://container/prefix`, `memory://` (tests).

use crate::local::LocalStore;
use crate::remote::RemoteStore;
use crate::{Bounded, DynStore, Result, Secret, StorageError};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// S3 settings, already resolved from the config file and the environment by the caller.
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret>,
    pub session_token: Option<Secret>,
    /// Path-style requests (`endpoint/bucket/key`); `None` means "true when an endpoint is set".
    pub force_path_style: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct StorageOptions {
    pub s3: S3Options,
    /// How long one HTTP request may take before it is abandoned (and retried).
    pub request_timeout: Duration,
    /// How long transient failures are retried, from the first attempt.
    pub retry_time: Duration,
    /// The hard bound on any one storage operation, retries included.
    pub deadline: Duration,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            s3: S3Options::default(),
            request_timeout: Duration::from_secs(30),
            retry_time: Duration::from_secs(60),
            deadline: Duration::from_secs(120),
        }
    }
}

fn client_options(o: &StorageOptions, allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_timeout(o.request_timeout)
        .with_connect_timeout(o.request_timeout.min(Duration::from_secs(10)))
        .with_allow_http(allow_http)
}

fn retry(o: &StorageOptions) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 20,
        retry_timeout: o.retry_time,
    }
}

fn split_bucket(url: &url::Url) -> Result<(String, String)> {
    let bucket = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
        StorageError::Config(format!(
            "{}://… needs a bucket name, like {}://my-bucket/prefix",
            url.scheme(),
            url.scheme()
        ))
    })?;
    Ok((bucket.to_string(), url.path().trim_matches('/').to_string()))
}

/// Opens the store a repository URL names, wrapped in [`Bounded`].
pub fn open(repo: &str, o: &StorageOptions) -> Result<DynStore> {
    let url = url::Url::parse(repo).map_err(|e| {
        StorageError::Config(format!(
            "{repo:?}: {e}; use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
        ))
    })?;
    let store: DynStore = match url.scheme() {
        "file" => {
            if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                return Err(StorageError::Config(format!(
                    "{repo:?}: file URLs take an absolute path: file:///var/lib/walnut"
                )));
            }
            let path = url
                .to_file_path()
                .map_err(|_| StorageError::Config(format!("{repo:?}: not a valid absolute file path")))?;
            Arc::new(LocalStore::new(path)?)
        }
        "memory" => Arc::new(RemoteStore::memory()),
        "s3" => {
            let (bucket, prefix) = split_bucket(&url)?;
            let s3 = &o.s3;
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&bucket);
            let allow_http = s3.endpoint.as_deref().is_some_and(|e| e.starts_with("http://"));
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e);
            }
            let path_style = s3.force_path_style.unwrap_or(s3.endpoint.is_some());
            b = b.with_virtual_hosted_style_request(!path_style);
            b = b.with_region(s3.region.clone().unwrap_or_else(|| "us-east-1".into()));
            if let Some(k) = &s3.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(k) = &s3.secret_access_key {
                b = b.with_secret_access_key(k.expose());
            }
            if let Some(t) = &s3.session_token {
                b = b.with_token(t.expose());
            }
            b = b.with_client_options(client_options(o, allow_http)).with_retry(retry(o));
            let inner = b.build().map_err(|e| StorageError::Config(format!("{repo}: {e}")))?;
            let desc = match &s3.endpoint {
                Some(e) => format!("{repo} (endpoint {e})"),
                None => repo.to_string(),
            };
            Arc::new(RemoteStore::new(Arc::new(inner), &prefix, desc))
        }
        "gs" => {
            let (bucket, prefix) = split_bucket(&url)?;
            let inner = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&bucket)
                .with_client_options(client_options(o, false))
                .with_retry(retry(o))
                .build()
                .map_err(|e| StorageError::Config(format!("{repo}: {e}")))?;
            Arc::new(RemoteStore::new(Arc::new(inner), &prefix, repo.to_string()))
        }
        "az" | "azure" => {
            let (container, prefix) = split_bucket(&url)?;
            let inner = object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(&container)
                .with_client_options(client_options(o, false))
                .with_retry(retry(o))
                .build()
                .map_err(|e| StorageError::Config(format!("{repo}: {e}")))?;
            Arc::new(RemoteStore::new(Arc::new(inner), &prefix, repo.to_string()))
        }
        other => {
            return Err(StorageError::Config(format!(
                "{repo:?}: unknown scheme {other:?}; use file://, s3://, gs:// or az://"
            )));
        }
    };
    Ok(Arc::new(Bounded::new(store, o.deadline)))
}
