//! S3-compatible object storage (AWS S3, MinIO, Aliyun OSS's S3 API): blobs are objects named
//! `prefix + hex blob id`, read with ranged GETs on SigV4-presigned URLs.

use std::io::Read;
use std::time::Duration;

use rusty_s3::{Bucket, Credentials, S3Action, UrlStyle};

use super::{BackendError, BlobBackend};
use crate::format::{digest_hex, DIGEST_LEN};
use crate::storage::Deadline;

/// How long a presigned URL stays valid; each request signs afresh.
const PRESIGN_FOR: Duration = Duration::from_secs(300);

fn default_region() -> String {
    "us-east-1".to_string()
}

fn default_true() -> bool {
    true
}

/// Where the blobs are and how to sign requests.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Base URL of the service, e.g. `https://s3.eu-west-1.amazonaws.com` or
    /// `http://127.0.0.1:9000`.
    pub endpoint: String,
    /// Region for signing (default `us-east-1`).
    #[serde(default = "default_region")]
    pub region: String,
    /// The bucket.
    pub bucket: String,
    /// Prepended to the hex blob id to form the object key (e.g. `blobs/`).
    #[serde(default)]
    pub prefix: String,
    /// Path-style URLs (`endpoint/bucket/key`, default) rather than virtual-host style
    /// (`bucket.endpoint/key`).
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Access key id; default `AWS_ACCESS_KEY_ID`. Without any, requests are anonymous.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret access key; default `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Session token; default `AWS_SESSION_TOKEN`.
    #[serde(default)]
    pub session_token: Option<String>,
    /// Timeout of one request in seconds, body included (default 30).
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// Connect timeout in seconds (default 5).
    #[serde(default)]
    pub connect_timeout_secs: Option<u64>,
    /// Do not verify the endpoint's TLS certificate.
    #[serde(default)]
    pub skip_verify: bool,
}

/// Blobs in an S3 bucket.
pub struct S3Backend {
    bucket: Bucket,
    credentials: Option<Credentials>,
    prefix: String,
    client: reqwest::blocking::Client,
    /// Timeout of one request, body included.
    timeout: Duration,
}

impl S3Backend {
    /// A backend for `cfg`. Credentials missing from `cfg` come from the environment.
    pub fn new(cfg: &S3Config) -> Result<Self, BackendError> {
        let endpoint: reqwest::Url = cfg
            .endpoint
            .parse()
            .map_err(|e| BackendError::Config(format!("s3 endpoint {:?}: {e}", cfg.endpoint)))?;
        let style = if cfg.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, cfg.bucket.clone(), cfg.region.clone())
            .map_err(|e| BackendError::Config(format!("s3 bucket {:?}: {e}", cfg.bucket)))?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let key = cfg
            .access_key_id
            .clone()
            .or_else(|| env("AWS_ACCESS_KEY_ID"));
        let secret = cfg
            .secret_access_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        let token = cfg
            .session_token
            .clone()
            .or_else(|| env("AWS_SESSION_TOKEN"));
        let credentials = match (key, secret) {
            (Some(k), Some(s)) => Some(match token {
                Some(t) => Credentials::new_with_token(k, s, t),
                None => Credentials::new(k, s),
            }),
            (None, None) => None,
            _ => {
                return Err(BackendError::Config(
                    "s3: an access key id needs a secret access key, and the other way round"
                        .into(),
                ))
            }
        };
        let timeout = Duration::from_secs(cfg.timeout_secs.unwrap_or(30));
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(cfg.connect_timeout_secs.unwrap_or(5)))
            .timeout(timeout)
            .danger_accept_invalid_certs(cfg.skip_verify)
            .build()
            .map_err(|e| BackendError::Config(format!("s3 http client: {e}")))?;
        Ok(Self {
            bucket,
            credentials,
            prefix: cfg.prefix.clone(),
            client,
            timeout,
        })
    }

    /// The object key of blob `id`.
    pub fn object_key(&self, id: &[u8; DIGEST_LEN]) -> String {
        format!("{}{}", self.prefix, digest_hex(id))
    }

    fn network(what: &str, e: reqwest::Error) -> BackendError {
        BackendError::from_reqwest(what.to_string(), e)
    }

    /// Creates the bucket (for tests and setup tools); an existing bucket is not an error.
    pub fn create_bucket(&self) -> Result<(), BackendError> {
        let creds = self.credentials.as_ref().ok_or_else(|| {
            BackendError::Config("s3: creating a bucket needs credentials".into())
        })?;
        let url = self.bucket.create_bucket(creds).sign(PRESIGN_FOR);
        let what = format!("s3 create bucket {}", self.bucket.name());
        let r = self
            .client
            .put(url)
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .map_err(|e| Self::network(&what, e))?;
        let status = r.status().as_u16();
        if r.status().is_success() || status == 409 {
            Ok(())
        } else {
            Err(BackendError::Http { what, status })
        }
    }

    /// Uploads blob `id` (for tests and setup tools; `skiff` itself only reads).
    pub fn put_blob(&self, id: &[u8; DIGEST_LEN], bytes: Vec<u8>) -> Result<(), BackendError> {
        let key = self.object_key(id);
        let url = self
            .bucket
            .put_object(self.credentials.as_ref(), &key)
            .sign(PRESIGN_FOR);
        let what = format!("s3 put {key}");
        let r = self
            .client
            .put(url)
            .body(bytes)
            .send()
            .map_err(|e| Self::network(&what, e))?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(BackendError::Http {
                what,
                status: r.status().as_u16(),
            })
        }
    }
}

impl BlobBackend for S3Backend {
    fn read_range(
        &self,
        id: &[u8; DIGEST_LEN],
        offset: u64,
        len: usize,
        deadline: &Deadline,
    ) -> Result<Vec<u8>, BackendError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let key = self.object_key(id);
        let last = offset
            .checked_add(len as u64 - 1)
            .ok_or_else(|| BackendError::Config(format!("range {offset}+{len} overflows")))?;
        let what = format!("s3 GET {}/{key} bytes {offset}-{last}", self.bucket.name());
        let url = self
            .bucket
            .get_object(self.credentials.as_ref(), &key)
            .sign(PRESIGN_FOR);
        if deadline.expired() {
            return Err(BackendError::DeadlineExceeded {
                what,
                waiting: "about to send the request",
            });
        }
        let resp = self
            .client
            .get(url)
            .header(reqwest::header::RANGE, format!("bytes={offset}-{last}"))
            // The client's timeout, or what is left of the read's deadline if that is less.
            .timeout(deadline.cap(self.timeout))
            .send()
            .map_err(|e| Self::network(&what, e))?;
        let status = resp.status().as_u16();
        // 206 is the answer to a range; 200 means the server sent the whole object, usable only
        // when the range starts at 0 (the length check below catches the rest).
        // Any other status is an error classed by `BackendError::is_retryable`, as the
        // registry's are: 400, 403 (denied, an expired signature) and 404 final; 5xx, 408 and
        // 429 retried.
        if status != 206 && !(status == 200 && offset == 0) {
            return Err(BackendError::Http { what, status });
        }
        // The reply is untrusted: read at most one byte more than asked, so that a longer body
        // shows without being buffered whole.
        let mut body = Vec::with_capacity(len);
        let limit = if status == 200 {
            len as u64
        } else {
            len as u64 + 1
        };
        resp.take(limit)
            .read_to_end(&mut body)
            .map_err(|e| BackendError::Network {
                what: what.clone(),
                source: Box::new(e),
            })?;
        if body.len() != len {
            return Err(BackendError::ShortRead {
                what,
                got: body.len() as u64,
                want: len as u64,
            });
        }
        Ok(body)
    }

    fn name(&self) -> &'static str {
        "s3"
    }
}
