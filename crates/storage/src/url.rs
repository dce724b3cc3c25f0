//! Opening a repository URL: `file:///path`, `s3://bucket/prefix`, `gs://bucket/prefix`,
//! `az://container/prefix`, `memory://` (tests).
//!
//! Every setting comes in through [`StorageOptions`]: this crate reads no environment variable
//! (the app resolves the config file and `AWS_*`, `GOOGLE_*`, `AZURE_*` into the options).
//! Settings are checked before a store is built, so a bad endpoint, region or bucket name, or
//! missing S3 credentials, is a [`StorageError::Config`] naming the setting and the fix, not a
//! panic inside the HTTP client nor a request to the cloud instance-metadata address.

use crate::local::LocalStore;
use crate::remote::RemoteStore;
use crate::tls::{Connector, Trust};
use crate::{Bounded, DynStore, Result, Secret, StorageError, TlsOptions};
use object_store::{BackoffConfig, ClientOptions, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// S3 settings, already resolved from the config file and the environment by the caller.
///
/// Credentials are static keys only: with neither key set, opening an `s3://` repository fails
/// instead of falling back to instance, container or web-identity credentials, which walnut's
/// configuration does not offer.
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
    /// `gs://` settings as `object_store` Google configuration keys and values, e.g.
    /// `("google_service_account", "/etc/walnut/sa.json")`; later entries win, and keys the
    /// client does not know are skipped. The app passes the `GOOGLE_*` environment variables.
    pub gcs: Vec<(String, Secret)>,
    /// `az://` settings as `object_store` Azure configuration keys and values, e.g.
    /// `("azure_storage_account_name", "acct")`; later entries win, and keys the client does not
    /// know are skipped. The app passes the `AZURE_*` environment variables.
    pub azure: Vec<(String, Secret)>,
    /// How long one HTTP request may take before it is abandoned (and retried).
    pub request_timeout: Duration,
    /// How long transient failures are retried, from the first attempt.
    pub retry_time: Duration,
    /// The hard bound on any one storage operation, retries included.
    pub deadline: Duration,
    /// Extra trust for every remote store (`[s3] ca_file`, `allow_invalid_certificates`).
    pub tls: TlsOptions,
}

impl Default for StorageOptions {
    fn default() -> Self {
        StorageOptions {
            s3: S3Options::default(),
            gcs: Vec::new(),
            azure: Vec::new(),
            request_timeout: Duration::from_secs(30),
            retry_time: Duration::from_secs(60),
            deadline: Duration::from_secs(120),
            tls: TlsOptions::default(),
        }
    }
}

fn client_options(o: &StorageOptions, trust: &Trust, allow_http: bool) -> ClientOptions {
    trust
        .apply(ClientOptions::new())
        .with_timeout(o.request_timeout)
        .with_connect_timeout(o.request_timeout.min(Duration::from_secs(10)))
        .with_allow_http(allow_http)
}

/// The client for streamed downloads: no timeout on the whole request, since a big body on a
/// slow link may stream for longer than `request_timeout` while bytes keep coming; instead the
/// read timeout (reqwest's: it bounds the wait for the response head, then each read of the
/// body) gives up on a silent link after `request_timeout`.
fn streaming_client_options(o: &StorageOptions, trust: &Trust, allow_http: bool) -> ClientOptions {
    trust
        .apply(ClientOptions::new())
        .with_timeout_disabled()
        .with_read_timeout(o.request_timeout)
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
    let scheme = url.scheme();
    let bucket = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| {
        StorageError::config(format!("{scheme}://… needs a bucket name, like {scheme}://my-bucket/prefix"))
    })?;
    // What every store accepts in a bucket or container name; anything else would end up in a
    // request URL the HTTP client cannot build.
    let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
    if bucket.len() > 255 || !bucket.chars().all(fine) {
        return Err(StorageError::config(format!(
            "{scheme}://{bucket}/…: {bucket:?} is not a bucket name: use letters, digits, '.', '-' and '_'"
        )));
    }
    Ok((bucket.to_string(), url.path().trim_matches('/').to_string()))
}

/// The endpoint as written, unless it could hold a password (`user:pass@host`).
fn shown(endpoint: &str) -> String {
    if endpoint.contains('@') { "(not shown: it contains '@')".into() } else { format!("{endpoint:?}") }
}

/// Checks `[s3] endpoint`: an `http://` or `https://` URL with a host and no user information.
/// Returns whether it is plain HTTP.
fn check_endpoint(endpoint: &str) -> Result<bool> {
    let example = "write it like http://127.0.0.1:9000 or https://s3.example.com";
    let no_scheme = || {
        let with = format!("http://{endpoint}");
        if !endpoint.contains('@') && url::Url::parse(&with).is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()))
        {
            StorageError::config(format!(
                "[s3] endpoint {} has no scheme: write http://{endpoint} or https://{endpoint}",
                shown(endpoint)
            ))
        } else {
            StorageError::config(format!("[s3] endpoint {} is not a URL: {example}", shown(endpoint)))
        }
    };
    if !endpoint.contains("://") {
        // `localhost:9000` parses as a URL with the scheme "localhost": still no scheme.
        return Err(no_scheme());
    }
    let url = url::Url::parse(endpoint).map_err(|e| {
        StorageError::config(format!("[s3] endpoint {} is not a valid URL ({e}): {example}", shown(endpoint)))
    })?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(StorageError::config(
            "[s3] endpoint contains a user name or password: give the URL alone, and the keys as [s3] \
             access_key_id and secret_access_key",
        ));
    }
    if !matches!(url.scheme(), "http" | "https") {
        return Err(StorageError::config(format!(
            "[s3] endpoint {} has the scheme {:?}: use http:// or https://",
            shown(endpoint),
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(StorageError::config(format!("[s3] endpoint {} has no host: {example}", shown(endpoint))));
    }
    Ok(url.scheme() == "http")
}

/// A value that ends up in a request header (or, for the region, in the host name) must not
/// hold control characters: the HTTP client would panic building the request.
fn check_header_value(setting: &str, value: &str) -> Result<()> {
    if value.chars().any(char::is_control) {
        return Err(StorageError::config(format!("{setting} contains a control character (a newline?): remove it")));
    }
    Ok(())
}

/// A set, non-empty value.
fn given(v: Option<&str>) -> Option<&str> {
    v.filter(|s| !s.trim().is_empty())
}

fn open_s3(repo: &str, url: &url::Url, o: &StorageOptions) -> Result<DynStore> {
    use object_store::aws::AmazonS3Builder;
    let (bucket, prefix) = split_bucket(url)?;
    let s3 = &o.s3;
    let endpoint = given(s3.endpoint.as_deref());
    let allow_http = match endpoint {
        Some(e) => check_endpoint(e)?,
        None => false,
    };
    let region = given(s3.region.as_deref()).unwrap_or("us-east-1");
    if !region.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
        return Err(StorageError::config(format!(
            "[s3] region {region:?} is not a region name: use one like us-east-1"
        )));
    }
    // Static keys only: without them object_store would ask the cloud instance-metadata address
    // (169.254.169.254) for credentials, and fail far from the cause.
    let key_id = given(s3.access_key_id.as_deref());
    let secret = s3.secret_access_key.as_ref().map(Secret::expose).filter(|s| !s.is_empty());
    let (key_id, secret) = match (key_id, secret) {
        (Some(k), Some(s)) => (k, s),
        (None, None) => {
            return Err(StorageError::config(
                "no credentials: set [s3] access_key_id and secret_access_key (or AWS_ACCESS_KEY_ID / \
                 AWS_SECRET_ACCESS_KEY)",
            ));
        }
        (Some(_), None) => {
            return Err(StorageError::config(
                "[s3] secret_access_key is missing: set it (or AWS_SECRET_ACCESS_KEY) to go with access_key_id",
            ));
        }
        (None, Some(_)) => {
            return Err(StorageError::config(
                "[s3] access_key_id is missing: set it (or AWS_ACCESS_KEY_ID) to go with secret_access_key",
            ));
        }
    };
    check_header_value("[s3] access_key_id", key_id)?;
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&bucket)
        .with_region(region)
        .with_access_key_id(key_id)
        .with_secret_access_key(secret);
    if let Some(e) = endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(t) = s3.session_token.as_ref().map(Secret::expose).filter(|t| !t.is_empty()) {
        check_header_value("[s3] session_token", t)?;
        b = b.with_token(t);
    }
    let path_style = s3.force_path_style.unwrap_or(endpoint.is_some());
    b = b.with_virtual_hosted_style_request(!path_style).with_retry(retry(o)).with_http_connector(Connector);
    let desc = match endpoint {
        Some(e) => format!("{repo} (endpoint {e})"),
        None => repo.to_string(),
    };
    two_clients(
        |c| b.clone().with_client_options(c).build(),
        o,
        allow_http,
        &prefix,
        desc,
        &format!("{repo}: cannot set up the S3 client"),
    )
}

/// A remote store over two clients built alike: one for requests bounded as a whole, one for
/// streamed downloads (bounded by idleness, see [`streaming_client_options`]).
fn two_clients<T: object_store::ObjectStore>(
    build: impl Fn(ClientOptions) -> object_store::Result<T>,
    o: &StorageOptions,
    allow_http: bool,
    prefix: &str,
    desc: String,
    setup_failed: &str,
) -> Result<DynStore> {
    let setup = |e| StorageError::Config { message: setup_failed.to_string(), source: Some(Box::new(e)) };
    let trust = Trust::load(&o.tls, &desc)?;
    let streaming = build(streaming_client_options(o, &trust, allow_http)).map_err(setup)?;
    let inner = build(client_options(o, &trust, allow_http)).map_err(setup)?;
    Ok(Arc::new(RemoteStore::new(Arc::new(inner), prefix, desc).with_streaming(Arc::new(streaming), o.request_timeout)))
}

/// Whether the endpoint set under one of `keys` (the last one set wins, as in the builder) is
/// plain `http://`: as for `[s3] endpoint`, plain HTTP only where the endpoint asks for it (an
/// emulator, a store inside the host).
fn plain_http(settings: &[(String, Secret)], keys: &[&str]) -> bool {
    settings
        .iter()
        .rev()
        .find(|(k, _)| keys.contains(&k.to_ascii_lowercase().as_str()))
        .is_some_and(|(_, v)| v.expose().trim().to_ascii_lowercase().starts_with("http://"))
}

/// Whether `key` is a setting the `section` ("azure" or "gcs") client knows, by object_store's
/// names (with or without the `azure_` / `google_` prefix).
pub fn known_setting(section: &str, key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    match section {
        "azure" => key.parse::<object_store::azure::AzureConfigKey>().is_ok(),
        "gcs" => key.parse::<object_store::gcp::GoogleConfigKey>().is_ok(),
        _ => false,
    }
}

/// Opens the store a repository URL names, wrapped in [`Bounded`].
pub fn open(repo: &str, o: &StorageOptions) -> Result<DynStore> {
    let url = url::Url::parse(repo).map_err(|e| {
        StorageError::config(format!(
            "repository URL {repo:?}: {e}; use file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix"
        ))
    })?;
    let store: DynStore = match url.scheme() {
        "file" => {
            if url.host_str().is_some_and(|h| !h.is_empty() && h != "localhost") {
                return Err(StorageError::config(format!(
                    "repository URL {repo:?}: file URLs take an absolute path: file:///var/lib/walnut"
                )));
            }
            let path = url.to_file_path().map_err(|_| {
                StorageError::config(format!("repository URL {repo:?}: not a valid absolute file path"))
            })?;
            Arc::new(LocalStore::new(path)?)
        }
        "memory" => Arc::new(RemoteStore::memory()),
        "s3" => open_s3(repo, &url, o)?,
        "gs" => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let (bucket, prefix) = split_bucket(&url)?;
            let mut b = GoogleCloudStorageBuilder::new();
            for (k, v) in &o.gcs {
                if let Ok(key) = k.to_ascii_lowercase().parse::<GoogleConfigKey>() {
                    b = b.with_config(key, v.expose());
                }
            }
            let b = b.with_bucket_name(&bucket).with_retry(retry(o)).with_http_connector(Connector);
            let what = format!("{repo}: cannot set up the Google Cloud Storage client");
            let http = plain_http(&o.gcs, &["google_base_url", "base_url"]);
            two_clients(|c| b.clone().with_client_options(c).build(), o, http, &prefix, repo.to_string(), &what)?
        }
        "az" | "azure" => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let (container, prefix) = split_bucket(&url)?;
            let mut b = MicrosoftAzureBuilder::new();
            for (k, v) in &o.azure {
                if let Ok(key) = k.to_ascii_lowercase().parse::<AzureConfigKey>() {
                    b = b.with_config(key, v.expose());
                }
            }
            let b = b.with_container_name(&container).with_retry(retry(o)).with_http_connector(Connector);
            let what = format!("{repo}: cannot set up the Azure client");
            let http = plain_http(&o.azure, &["azure_storage_endpoint", "azure_endpoint", "endpoint"]);
            two_clients(|c| b.clone().with_client_options(c).build(), o, http, &prefix, repo.to_string(), &what)?
        }
        other => {
            return Err(StorageError::config(format!(
                "repository URL {repo:?}: unknown scheme {other:?}; use file://, s3://, gs:// or az://"
            )));
        }
    };
    Ok(Arc::new(Bounded::new(store, o.deadline)))
}

/// Opens the store holding the single object a URL names, and the object's key in it: for
/// reading a dump given by URL (`logical restore https://...`). `file://`, `s3://`, `gs://` and
/// `az://` URLs use the settings a repository of that scheme would (credentials, endpoint, CA);
/// `https://` (and `http://`) is a plain GET.
pub fn open_object_url(url_text: &str, o: &StorageOptions) -> Result<(DynStore, String)> {
    let url = url::Url::parse(url_text).map_err(|e| {
        StorageError::config(format!("{url_text:?} is not a URL: {e}; use https://, s3://, gs://, az:// or file://"))
    })?;
    let path = url.path();
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name.is_empty() {
        return Err(StorageError::config(format!(
            "{url_text:?} names a directory, not a file: give the dump's full URL"
        )));
    }
    match url.scheme() {
        "http" | "https" => {
            use object_store::http::HttpBuilder;
            let mut base = url.clone();
            base.set_path(&format!("{dir}/"));
            base.set_query(None);
            base.set_fragment(None);
            let allow_http = url.scheme() == "http";
            let b = HttpBuilder::new().with_url(base.as_str()).with_retry(retry(o)).with_http_connector(Connector);
            let what = format!("{}: cannot set up the HTTP client", base.as_str());
            let store = two_clients(
                |c| b.clone().with_client_options(c).build(),
                o,
                allow_http,
                "",
                base.as_str().to_string(),
                &what,
            )?;
            Ok((Arc::new(Bounded::new(store, o.deadline)), name.to_string()))
        }
        _ => {
            let mut parent = url.clone();
            parent.set_path(if dir.is_empty() { "/" } else { dir });
            let store = open(parent.as_str(), o)?;
            Ok((store, name.to_string()))
        }
    }
}
