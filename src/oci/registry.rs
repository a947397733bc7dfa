//! A blocking client for the OCI distribution API: manifests, blobs and blob ranges (pulls,
//! tried on mirrors first), blob and manifest pushes.
//!
//! Everything a registry sends is untrusted: sizes are bounded before anything is allocated,
//! whole downloads are checked against their sha256 digest, and range reads must come back as
//! `206` with exactly the bytes asked for (their content is checked later, by chunk digests).

use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, RequestBuilder, Response};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::StatusCode;
use sha2::Digest;

use super::auth::{Authenticator, Credentials};
use super::manifest::{self, Fetched, ImageManifest, MANIFEST_ACCEPT, MAX_MANIFEST_BYTES};
use super::{OciError, Reference};
use crate::util::sync::lock;

/// Bytes of an error body quoted in an error message.
const ERROR_BODY_QUOTE: u64 = 512;
/// Largest blob pushed in one PUT (bigger ones go in chunks).
const MONOLITHIC_MAX: u64 = 16 << 20;
/// Chunk size of chunked uploads.
const UPLOAD_CHUNK: usize = 16 << 20;
/// How long a mirror that failed is skipped before it is tried again (mirrors of the command
/// line; nydusd configurations give their own interval).
pub const MIRROR_COOLDOWN: Duration = Duration::from_secs(30);
/// Timeout of a mirror's health check.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// Redirects followed by hand (with `blob_redirected_host`), as reqwest's policy otherwise.
const MAX_REDIRECTS: usize = 5;

/// `http` or `https`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// Plain HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// A pull mirror (or a P2P proxy such as Dragonfly's), tried before the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// `host[:port]`.
    pub host: String,
    /// The scheme; `None`: plain HTTP if the client is insecure or the host is loopback.
    pub scheme: Option<Scheme>,
    /// A URL whose GET answers 2xx when the mirror is healthy: checked before a mirror that
    /// failed is used again.
    pub ping_url: Option<String>,
    /// How long a mirror that failed `failure_limit` times in a row is left alone.
    pub cooldown: Duration,
    /// Consecutive failures before the cooldown (at least 1).
    pub failure_limit: u32,
    /// Extra headers of every request to it.
    pub headers: Vec<(String, String)>,
    /// Whether the registry credentials (and tokens) go to it too.
    pub auth_through: bool,
}

impl Mirror {
    /// A mirror as `--mirror HOST` gives it: credentials go to it, 30 s cooldown after one
    /// failure, no health check.
    pub fn plain(host: &str) -> Self {
        Self {
            host: host.to_string(),
            scheme: None,
            ping_url: None,
            cooldown: MIRROR_COOLDOWN,
            failure_limit: 1,
            headers: Vec::new(),
            auth_through: true,
        }
    }
}

/// How to reach a registry.
#[derive(Clone, Debug)]
pub struct RegistryOptions {
    /// Use plain HTTP even for hosts other than `localhost` and `127.0.0.0/8`.
    pub insecure: bool,
    /// The origin's scheme, when it must be this one whatever the host (nydusd's `scheme`).
    pub scheme: Option<Scheme>,
    /// Mirrors tried, in order, before the origin for pulls.
    pub mirrors: Vec<Mirror>,
    /// Whether the origin is tried when every mirror failed (pulls).
    pub fallback_to_origin: bool,
    /// An HTTP proxy URL for all requests.
    pub proxy: Option<String>,
    /// Credentials; anonymous when `None`.
    pub credentials: Option<Credentials>,
    /// A bearer token sent with requests until the registry asks for another.
    pub bearer_token: Option<String>,
    /// Timeout of one request (connect and read); none when `None`.
    pub timeout: Option<Duration>,
    /// Connect timeout, when it differs from `timeout`.
    pub connect_timeout: Option<Duration>,
    /// Do not verify TLS certificates.
    pub skip_verify: bool,
    /// Extra CA certificates (PEM).
    pub ca_certs: Vec<Vec<u8>>,
    /// Blob redirects go to this host instead of the one the registry named.
    pub blob_redirected_host: Option<String>,
    /// The scheme of redirected blob URLs.
    pub blob_url_scheme: Option<Scheme>,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        Self {
            insecure: false,
            scheme: None,
            mirrors: Vec::new(),
            fallback_to_origin: true,
            proxy: None,
            credentials: None,
            bearer_token: None,
            timeout: None,
            connect_timeout: None,
            skip_verify: false,
            ca_certs: Vec::new(),
            blob_redirected_host: None,
            blob_url_scheme: None,
        }
    }
}

/// One registry endpoint (the origin or a mirror).
#[derive(Debug)]
struct Endpoint {
    /// `host[:port]`, the key of its authentication state.
    host: String,
    /// `http://host` or `https://host`.
    base: String,
    /// Whether requests to it carry credentials.
    auth: bool,
    /// Extra headers.
    headers: Vec<(String, String)>,
    /// A mirror's health rules (`None` for the origin).
    health: Option<MirrorHealth>,
}

#[derive(Debug)]
struct MirrorHealth {
    ping_url: Option<String>,
    cooldown: Duration,
    failure_limit: u32,
    /// Consecutive failures and the time of the last one.
    state: Mutex<(u32, Option<Instant>)>,
}

/// A client for one repository of one registry.
pub struct RegistryClient {
    http: Client,
    /// The same, following no redirect: blob reads with `blob_redirected_host` follow them by
    /// hand, to rewrite the host.
    http_manual: Option<Client>,
    blob_redirect: Option<(String, Option<Scheme>)>,
    auth: Authenticator,
    reference: Reference,
    origin: Endpoint,
    mirrors: Vec<Endpoint>,
    fallback_to_origin: bool,
    /// Timeout of one request, if any (what a deadline's remainder is capped by).
    timeout: Option<Duration>,
}

/// Whether `host` may be spoken to over plain HTTP without being told: loopback, as Docker.
pub fn is_loopback_host(host: &str) -> bool {
    let h = super::reference::host_without_port(host);
    h == "localhost" || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
fn endpoint(host: &str, insecure: bool) -> Endpoint {
    endpoint_with(host, None, insecure)
}

fn endpoint_with(host: &str, scheme: Option<Scheme>, insecure: bool) -> Endpoint {
    let scheme = scheme.unwrap_or(if insecure || is_loopback_host(host) {
        Scheme::Http
    } else {
        Scheme::Https
    });
    Endpoint {
        host: host.to_string(),
        base: format!("{}://{host}", scheme.as_str()),
        auth: true,
        headers: Vec::new(),
        health: None,
    }
}

fn build_http(opts: &RegistryOptions, follow_redirects: bool) -> Result<Client, OciError> {
    let mut b = Client::builder()
        .user_agent(concat!("skiff/", env!("CARGO_PKG_VERSION")))
        .redirect(if follow_redirects {
            reqwest::redirect::Policy::limited(MAX_REDIRECTS)
        } else {
            reqwest::redirect::Policy::none()
        });
    if let Some(t) = opts.timeout {
        b = b
            .timeout(t)
            .connect_timeout(opts.connect_timeout.unwrap_or(t));
    } else {
        b = b.timeout(None);
        if let Some(c) = opts.connect_timeout {
            b = b.connect_timeout(c);
        }
    }
    if opts.skip_verify {
        b = b.danger_accept_invalid_certs(true);
    }
    for pem in &opts.ca_certs {
        let cert = reqwest::Certificate::from_pem(pem).map_err(|source| OciError::Http {
            what: "reading a CA certificate".into(),
            source,
        })?;
        b = b.add_root_certificate(cert);
    }
    match &opts.proxy {
        Some(p) => {
            let proxy = reqwest::Proxy::all(p).map_err(|source| OciError::Http {
                what: format!("proxy {p}"),
                source,
            })?;
            b = b.proxy(proxy);
        }
        // Configuration flows in as values: no proxy unless one is given.
        None => b = b.no_proxy(),
    }
    b.build().map_err(|source| OciError::Http {
        what: "creating the HTTP client".into(),
        source,
    })
}

impl RegistryClient {
    /// A client for `reference`'s repository.
    pub fn new(reference: &Reference, opts: &RegistryOptions) -> Result<Self, OciError> {
        let http = build_http(opts, true)?;
        let http_manual = match &opts.blob_redirected_host {
            Some(_) => Some(build_http(opts, false)?),
            None => None,
        };
        let mirrors = opts
            .mirrors
            .iter()
            .map(|m| Endpoint {
                headers: m.headers.clone(),
                auth: m.auth_through,
                health: Some(MirrorHealth {
                    ping_url: m.ping_url.clone(),
                    cooldown: m.cooldown,
                    failure_limit: m.failure_limit.max(1),
                    state: Mutex::new((0, None)),
                }),
                ..endpoint_with(&m.host, m.scheme, opts.insecure)
            })
            .collect();
        let auth = Authenticator::new(opts.credentials.clone());
        if let Some(t) = &opts.bearer_token {
            auth.set_bearer_token(Some(t.clone()));
        }
        Ok(Self {
            http,
            http_manual,
            blob_redirect: opts
                .blob_redirected_host
                .clone()
                .map(|h| (h, opts.blob_url_scheme)),
            auth,
            reference: reference.clone(),
            origin: endpoint_with(reference.api_host(), opts.scheme, opts.insecure),
            mirrors,
            fallback_to_origin: opts.fallback_to_origin || opts.mirrors.is_empty(),
            timeout: opts.timeout,
        })
    }

    /// The reference this client was made for.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// Replaces the credentials (nydusd's `PUT /api/v1/config` with `registry_auth`): tokens
    /// fetched with the old ones are dropped, so that the next request proves the new ones.
    pub fn set_credentials(&self, credentials: Option<Credentials>) {
        self.auth.set_credentials(credentials);
    }

    /// Replaces the bearer token sent before any challenge (nydusd's `registry_token`).
    pub fn set_bearer_token(&self, token: Option<String>) {
        self.auth.set_bearer_token(token);
    }

    fn pull_scope(&self) -> String {
        format!("repository:{}:pull", self.reference.repository)
    }

    fn push_scope(&self) -> String {
        format!("repository:{}:pull,push", self.reference.repository)
    }

    fn url(&self, ep: &Endpoint, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", ep.base, self.reference.repository)
    }

    /// Sends a request built by `make`, authenticating it, and once more after a 401 that a
    /// new token or credentials can answer.
    fn send(
        &self,
        ep: &Endpoint,
        scope: &str,
        what: &str,
        make: &dyn Fn() -> RequestBuilder,
    ) -> Result<Response, OciError> {
        self.send_until(ep, scope, what, make, None)
    }

    /// Like [`Self::send`], every request it makes (the token fetches too) answered by `until`:
    /// each one's timeout is what is left (or the client's, if that is less), and none is
    /// sent once it has passed.
    fn send_until(
        &self,
        ep: &Endpoint,
        scope: &str,
        what: &str,
        make: &dyn Fn() -> RequestBuilder,
        until: Option<std::time::Instant>,
    ) -> Result<Response, OciError> {
        let left = || -> Result<Option<Duration>, OciError> {
            let Some(until) = until else {
                return Ok(None);
            };
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(OciError::DeadlinePassed(what.to_string()));
            }
            Ok(Some(self.timeout.map_or(left, |c| c.min(left))))
        };
        if ep.auth && self.auth.needs_refresh(&ep.host, scope) {
            self.auth
                .refresh_known_within(&self.http, &ep.host, scope, left()?)?;
        }
        for attempt in 0..2 {
            let mut req = make();
            if let Some(t) = left()? {
                req = req.timeout(t);
            }
            for (k, v) in &ep.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            if ep.auth {
                if let Some(h) = self.auth.header(&ep.host, scope) {
                    req = req.header(AUTHORIZATION, h);
                }
            }
            let resp = req.send().map_err(|source| OciError::Http {
                what: what.to_string(),
                source,
            })?;
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 || !ep.auth {
                return Ok(resp);
            }
            let challenge = resp
                .headers()
                .get(reqwest::header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            if !self.auth.challenged_within(
                &self.http,
                &ep.host,
                challenge.as_deref(),
                scope,
                left()?,
            )? {
                return Ok(resp);
            }
        }
        Err(OciError::Auth(format!("{what}: unauthorized")))
    }

    /// Whether a mirror may be tried now: not in its cooldown, and (after one) answering its
    /// health check.
    fn mirror_usable(&self, m: &Endpoint) -> bool {
        let Some(h) = &m.health else { return true };
        let (failures, last) = *lock(&h.state);
        let Some(last) = last.filter(|_| failures >= h.failure_limit) else {
            return true;
        };
        if last.elapsed() < h.cooldown {
            return false;
        }
        let Some(ping) = &h.ping_url else { return true };
        let healthy = self
            .http
            .get(ping)
            .timeout(PING_TIMEOUT)
            .send()
            .is_ok_and(|r| r.status().is_success());
        *lock(&h.state) = if healthy {
            (0, None)
        } else {
            (failures, Some(Instant::now()))
        };
        if !healthy {
            tracing::warn!(mirror = %m.host, ping, "mirror still unhealthy");
        }
        healthy
    }

    fn mirror_result(&self, m: &Endpoint, ok: bool) {
        let Some(h) = &m.health else { return };
        let mut g = lock(&h.state);
        *g = if ok {
            (0, None)
        } else {
            (g.0.saturating_add(1), Some(Instant::now()))
        };
    }

    /// Tries `f` on each mirror, then on the origin (unless mirrors are all it may use);
    /// returns the first success, or the last error.
    fn pull<T>(
        &self,
        what: &str,
        f: &dyn Fn(&Endpoint) -> Result<T, OciError>,
    ) -> Result<T, OciError> {
        let mut last_err = None;
        for m in &self.mirrors {
            if !self.mirror_usable(m) {
                continue;
            }
            match f(m) {
                Ok(v) => {
                    self.mirror_result(m, true);
                    return Ok(v);
                }
                Err(e) => {
                    tracing::warn!(
                        mirror = %m.host,
                        error = %crate::util::error_chain(&e),
                        "{what}: mirror failed, trying the next one"
                    );
                    self.mirror_result(m, false);
                    last_err = Some(e);
                }
            }
        }
        if self.fallback_to_origin {
            return f(&self.origin);
        }
        Err(last_err.unwrap_or_else(|| {
            OciError::Invalid(format!(
                "{what}: every mirror is unhealthy and falling back to the registry is off"
            ))
        }))
    }

    /// Fetches the image manifest, resolving an index to its linux/amd64 manifest. Returns the
    /// manifest, its bytes and its digest (checked against the reference's digest, if any).
    pub fn get_manifest(&self) -> Result<(ImageManifest, Vec<u8>, String), OciError> {
        let mut wanted = self.reference.manifest_ref().to_string();
        for _ in 0..2 {
            match self.get_manifest_ref(&wanted)? {
                (Fetched::Manifest(m), bytes, digest) => return Ok((m, bytes, digest)),
                (Fetched::Index(i), _, _) => wanted = manifest::pick_platform(&i)?.digest.clone(),
            }
        }
        Err(OciError::Invalid(format!(
            "{}: an index points to another index",
            self.reference
        )))
    }

    /// Fetches the manifest or index `wanted` (a tag or a digest) of this repository as it is,
    /// with its bytes and digest (checked against `wanted` when it is a digest).
    pub fn get_manifest_ref(&self, wanted: &str) -> Result<(Fetched, Vec<u8>, String), OciError> {
        let (bytes, ctype) = self.pull(&format!("manifest {wanted}"), &|ep| {
            self.get_manifest_bytes(ep, wanted)
        })?;
        let digest = manifest::sha256_digest(&bytes);
        if wanted.starts_with("sha256:") && digest != wanted {
            return Err(OciError::Digest {
                what: format!("manifest of {}", self.reference),
                got: digest,
                want: wanted.to_string(),
            });
        }
        let fetched = manifest::parse_manifest(&bytes, ctype.as_deref())?;
        Ok((fetched, bytes, digest))
    }

    fn get_manifest_bytes(
        &self,
        ep: &Endpoint,
        wanted: &str,
    ) -> Result<(Vec<u8>, Option<String>), OciError> {
        let url = self.url(ep, &format!("manifests/{wanted}"));
        let what = format!("GET {url}");
        let resp = self.send(ep, &self.pull_scope(), &what, &|| {
            self.http.get(&url).header(ACCEPT, MANIFEST_ACCEPT)
        })?;
        let resp = expect_status(resp, &what, &[StatusCode::OK])?;
        let ctype = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = read_bounded(resp, MAX_MANIFEST_BYTES as u64, &what)?;
        Ok((bytes, ctype))
    }

    /// Fetches a small blob (a config, a bootstrap) whole into memory, checking its size and
    /// digest. `max` bounds what is read.
    pub fn get_blob_bytes(&self, digest: &str, size: u64, max: u64) -> Result<Vec<u8>, OciError> {
        if size > max {
            return Err(OciError::Invalid(format!(
                "blob {digest} is {size} bytes, more than the {max} allowed"
            )));
        }
        self.pull(&format!("blob {digest}"), &|ep| {
            let url = self.url(ep, &format!("blobs/{digest}"));
            let what = format!("GET {url}");
            let resp = self.send(ep, &self.pull_scope(), &what, &|| self.http.get(&url))?;
            let resp = expect_status(resp, &what, &[StatusCode::OK])?;
            let bytes = read_bounded(resp, size, &what)?;
            if bytes.len() as u64 != size {
                return Err(OciError::Invalid(format!(
                    "{what}: {} bytes, the descriptor says {size}",
                    bytes.len()
                )));
            }
            manifest::verify_digest(&what, &bytes, digest)?;
            Ok(bytes)
        })
    }

    /// Streams blob `digest` of `size` bytes into the file `dest`, checking size and digest;
    /// `progress` is told of each piece received.
    pub fn get_blob_to_file(
        &self,
        digest: &str,
        size: u64,
        dest: &Path,
        progress: &dyn Fn(u64),
    ) -> Result<(), OciError> {
        self.pull(&format!("blob {digest}"), &|ep| {
            let url = self.url(ep, &format!("blobs/{digest}"));
            let what = format!("GET {url}");
            let resp = self.send(ep, &self.pull_scope(), &what, &|| self.http.get(&url))?;
            let mut resp = expect_status(resp, &what, &[StatusCode::OK])?;
            let file =
                std::fs::File::create(dest).map_err(|e| OciError::io("creating", dest, e))?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                let n = resp
                    .read(&mut buf)
                    .map_err(|e| OciError::io("downloading", dest, e))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > size {
                    return Err(OciError::Invalid(format!(
                        "{what}: more than the {size} bytes the descriptor says"
                    )));
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| OciError::io("writing", dest, e))?;
                progress(n as u64);
            }
            out.flush().map_err(|e| OciError::io("writing", dest, e))?;
            if total != size {
                return Err(OciError::Invalid(format!(
                    "{what}: {total} bytes, the descriptor says {size}"
                )));
            }
            let got = format!("sha256:{}", hex::encode(hasher.finalize()));
            if got != digest {
                return Err(OciError::Digest {
                    what,
                    got,
                    want: digest.to_string(),
                });
            }
            Ok(())
        })
    }

    /// Opens blob `digest` of `size` bytes as a stream, for reading it once without storing
    /// it: the reader fails if more than `size` bytes come, and at its end if fewer came or
    /// their sha256 is not `digest`, so a reader that reads to the end has verified bytes.
    pub fn get_blob_reader(&self, digest: &str, size: u64) -> Result<BlobReader, OciError> {
        self.pull(&format!("blob {digest}"), &|ep| {
            let url = self.url(ep, &format!("blobs/{digest}"));
            let what = format!("GET {url}");
            let resp = self.send(ep, &self.pull_scope(), &what, &|| self.http.get(&url))?;
            let resp = expect_status(resp, &what, &[StatusCode::OK])?;
            if let Some(n) = resp.content_length() {
                if n != size {
                    return Err(OciError::Invalid(format!(
                        "{what}: {n} bytes announced, the descriptor says {size}"
                    )));
                }
            }
            Ok(BlobReader {
                resp,
                what,
                want: digest.to_string(),
                size,
                read: 0,
                hasher: sha2::Sha256::new(),
                done: false,
            })
        })
    }

    /// Reads `len` bytes of blob `digest` from `offset` with a `Range` request. The answer must
    /// be `206` with exactly those bytes (redirects, to a CDN or object store, are followed).
    ///
    /// With `until`, each request (to a mirror, then the origin) must be answered, body
    /// included, by then: its timeout is the client's, or what is left if that is less. Once
    /// it has passed, the read fails without sending anything.
    pub fn get_blob_range(
        &self,
        digest: &str,
        offset: u64,
        len: usize,
        until: Option<std::time::Instant>,
    ) -> Result<Vec<u8>, OciError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        self.pull(&format!("blob {digest} range"), &|ep| {
            let (resp, what) = self.blob_range_response(ep, digest, offset, len, until)?;
            let bytes = read_bounded(resp, len as u64, &what)?;
            if bytes.len() != len {
                return Err(OciError::Invalid(format!(
                    "{what}: {} bytes instead of {len}",
                    bytes.len()
                )));
            }
            Ok(bytes)
        })
    }

    /// Like [`Self::get_blob_range`], handing the body to `sink` as it arrives (pieces of up
    /// to 64 KiB), so that the caller can use the first bytes before the last have come. A
    /// mirror that fails part-way is followed by the next endpoint for the rest only: no byte
    /// is handed over twice. On an error, what was handed over stays handed over.
    pub fn get_blob_range_streaming(
        &self,
        digest: &str,
        offset: u64,
        len: usize,
        until: Option<std::time::Instant>,
        sink: &mut dyn FnMut(&[u8]),
    ) -> Result<(), OciError> {
        if len == 0 {
            return Ok(());
        }
        let got = std::cell::Cell::new(0usize);
        let sink = std::cell::RefCell::new(sink);
        self.pull(&format!("blob {digest} range"), &|ep| {
            let done = got.get();
            let want = len - done;
            let (mut resp, what) =
                self.blob_range_response(ep, digest, offset + done as u64, want, until)?;
            if let Some(n) = resp.content_length() {
                if n != want as u64 {
                    return Err(OciError::Invalid(format!(
                        "{what}: {n} bytes announced instead of {want}"
                    )));
                }
            }
            let mut buf = vec![0u8; STREAM_PIECE.min(want)];
            let mut read = 0usize;
            while read < want {
                let room = (want - read).min(buf.len());
                let n = match resp.read(&mut buf[..room]) {
                    Ok(0) => {
                        return Err(OciError::Invalid(format!(
                            "{what}: the body ended after {read} of {want} bytes"
                        )))
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(OciError::Invalid(format!(
                            "{what}: reading the body after {read} bytes: {e}"
                        )))
                    }
                };
                read += n;
                got.set(done + read);
                (sink.borrow_mut())(&buf[..n]);
            }
            Ok(())
        })
    }

    /// Sends the range request for `len` bytes of blob `digest` at `offset` to `ep` and checks
    /// the answer's status and `Content-Range`; returns the response (its body unread) and the
    /// request's description for messages.
    fn blob_range_response(
        &self,
        ep: &Endpoint,
        digest: &str,
        offset: u64,
        len: usize,
        until: Option<std::time::Instant>,
    ) -> Result<(Response, String), OciError> {
        let last = offset
            .checked_add((len as u64).saturating_sub(1))
            .ok_or_else(|| OciError::Invalid("range overflows".into()))?;
        let url = self.url(ep, &format!("blobs/{digest}"));
        let what = format!("GET {url} bytes={offset}-{last}");
        let range = format!("bytes={offset}-{last}");
        let timeout = match until {
            None => self.timeout,
            Some(t) => {
                let left = t.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    return Err(OciError::DeadlinePassed(what.clone()));
                }
                Some(self.timeout.map_or(left, |c| c.min(left)))
            }
        };
        let resp = match (&self.http_manual, &self.blob_redirect) {
            (Some(manual), Some(_)) => {
                let resp = self.send_until(
                    ep,
                    &self.pull_scope(),
                    &what,
                    &|| manual.get(&url).header(RANGE, &range),
                    until,
                )?;
                self.follow_redirects(manual, resp, &range, &what, timeout)?
            }
            _ => self.send_until(
                ep,
                &self.pull_scope(),
                &what,
                &|| self.http.get(&url).header(RANGE, &range),
                until,
            )?,
        };
        let resp = expect_status(resp, &what, &[StatusCode::PARTIAL_CONTENT])?;
        if let Some(cr) = resp.headers().get(reqwest::header::CONTENT_RANGE) {
            let want = format!("bytes {offset}-{last}/");
            if !cr.to_str().is_ok_and(|s| s.starts_with(&want)) {
                return Err(OciError::Invalid(format!(
                    "{what}: answered with Content-Range {cr:?}"
                )));
            }
        }
        Ok((resp, what))
    }

    /// Follows the redirects of a blob read by hand, sending each to `host` (and `scheme`)
    /// instead of the host the registry named (nydusd's `blob_redirected_host`). No
    /// credentials go to the redirect target, as with reqwest's own redirects across hosts.
    fn follow_redirects(
        &self,
        http: &Client,
        mut resp: Response,
        range: &str,
        what: &str,
        timeout: Option<Duration>,
    ) -> Result<Response, OciError> {
        let Some((host, scheme)) = &self.blob_redirect else {
            return Ok(resp);
        };
        for _ in 0..MAX_REDIRECTS {
            if !resp.status().is_redirection() {
                return Ok(resp);
            }
            let loc = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| OciError::Invalid(format!("{what}: redirect without Location")))?;
            let mut url = resp
                .url()
                .join(loc)
                .map_err(|e| OciError::Invalid(format!("{what}: redirect to {loc:?}: {e}")))?;
            let (h, port) = split_host_port(host);
            url.set_host(Some(h)).map_err(|e| {
                OciError::Invalid(format!("{what}: blob_redirected_host {host:?}: {e}"))
            })?;
            let _ = url.set_port(port);
            if let Some(s) = scheme {
                let _ = url.set_scheme(s.as_str());
            }
            tracing::debug!(%url, "following a blob redirect to the configured host");
            let mut req = http.get(url).header(RANGE, range);
            if let Some(t) = timeout {
                req = req.timeout(t);
            }
            resp = req.send().map_err(|source| OciError::Http {
                what: format!("{what} (redirected)"),
                source,
            })?;
        }
        Err(OciError::Invalid(format!(
            "{what}: more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// Whether the origin has blob `digest`.
    pub fn blob_exists(&self, digest: &str) -> Result<bool, OciError> {
        let ep = &self.origin;
        let url = self.url(ep, &format!("blobs/{digest}"));
        let what = format!("HEAD {url}");
        let resp = self.send(ep, &self.push_scope(), &what, &|| self.http.head(&url))?;
        match resp.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => expect_status(resp, &what, &[StatusCode::OK]).map(|_| false),
        }
    }

    /// Pushes the file `path` as blob `digest` (unless the registry has it): one `PUT` for
    /// small blobs, `PATCH`ed chunks then a closing `PUT` for large ones.
    pub fn push_blob_file(
        &self,
        path: &Path,
        digest: &str,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> Result<(), OciError> {
        if self.blob_exists(digest)? {
            progress(size);
            return Ok(());
        }
        let ep = &self.origin;
        let scope = self.push_scope();
        let start_url = self.url(ep, "blobs/uploads/");
        let what = format!("POST {start_url}");
        let resp = self.send(ep, &scope, &what, &|| self.http.post(&start_url))?;
        let resp = expect_status(resp, &what, &[StatusCode::ACCEPTED])?;
        let mut location = self.location(ep, &resp, &what)?;
        let mut file = std::fs::File::open(path).map_err(|e| OciError::io("opening", path, e))?;
        if size > MONOLITHIC_MAX {
            let mut buf = vec![0u8; UPLOAD_CHUNK];
            let mut sent = 0u64;
            while sent < size {
                let n =
                    read_full(&mut file, &mut buf).map_err(|e| OciError::io("reading", path, e))?;
                if n == 0 {
                    break;
                }
                let body = buf[..n].to_vec();
                let what = format!("PATCH upload of {digest}");
                let range = format!("{sent}-{}", sent + n as u64 - 1);
                let loc = location.clone();
                let resp = self.send(ep, &scope, &what, &|| {
                    self.http
                        .patch(&loc)
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header("Content-Range", &range)
                        .body(body.clone())
                })?;
                let resp = expect_status(resp, &what, &[StatusCode::ACCEPTED])?;
                location = self.location(ep, &resp, &what)?;
                sent += n as u64;
                progress(n as u64);
            }
            let url = with_digest(&location, digest)?;
            let what = format!("PUT upload of {digest}");
            let resp = self.send(ep, &scope, &what, &|| self.http.put(url.clone()))?;
            expect_status(resp, &what, &[StatusCode::CREATED])?;
        } else {
            let mut body = Vec::with_capacity(size as usize);
            file.read_to_end(&mut body)
                .map_err(|e| OciError::io("reading", path, e))?;
            let url = with_digest(&location, digest)?;
            let what = format!("PUT upload of {digest}");
            let resp = self.send(ep, &scope, &what, &|| {
                self.http
                    .put(url.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .body(body.clone())
            })?;
            expect_status(resp, &what, &[StatusCode::CREATED])?;
            progress(size);
        }
        Ok(())
    }

    /// Pushes in-memory `bytes` as a blob, returning its digest.
    pub fn push_blob_bytes(&self, bytes: &[u8], tmp_dir: &Path) -> Result<String, OciError> {
        let digest = manifest::sha256_digest(bytes);
        let path = tmp_dir.join(format!(".push-{}", &digest[7..]));
        std::fs::write(&path, bytes).map_err(|e| OciError::io("writing", &path, e))?;
        let r = self.push_blob_file(&path, &digest, bytes.len() as u64, &|_| {});
        let _ = std::fs::remove_file(&path);
        r.map(|()| digest)
    }

    /// Pushes a manifest under `tag` (or its digest).
    pub fn push_manifest(&self, tag: &str, bytes: &[u8], media_type: &str) -> Result<(), OciError> {
        let ep = &self.origin;
        let url = self.url(ep, &format!("manifests/{tag}"));
        let what = format!("PUT {url}");
        let resp = self.send(ep, &self.push_scope(), &what, &|| {
            self.http
                .put(&url)
                .header(CONTENT_TYPE, media_type)
                .body(bytes.to_vec())
        })?;
        expect_status(resp, &what, &[StatusCode::CREATED])?;
        Ok(())
    }

    /// The absolute upload URL of a `Location` header (which may be relative).
    fn location(&self, ep: &Endpoint, resp: &Response, what: &str) -> Result<String, OciError> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .ok_or_else(|| OciError::Invalid(format!("{what}: no Location header")))?;
        let base = reqwest::Url::parse(&ep.base)
            .map_err(|e| OciError::Invalid(format!("{what}: base URL: {e}")))?;
        base.join(loc)
            .map(|u| u.to_string())
            .map_err(|e| OciError::Invalid(format!("{what}: Location {loc:?}: {e}")))
    }
}

/// `host[:port]` split; an IPv6 literal keeps its brackets (`[::1]:5000` → `[::1]`, 5000).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    let colon = if host.starts_with('[') {
        host.find("]:").map(|i| i + 1)
    } else {
        host.rfind(':')
    };
    match colon {
        Some(i) => match host[i + 1..].parse::<u16>() {
            Ok(p) => (&host[..i], Some(p)),
            Err(_) => (host, None),
        },
        None => (host, None),
    }
}

/// A blob read as a stream and checked on the way (see [`RegistryClient::get_blob_reader`]).
pub struct BlobReader {
    resp: Response,
    what: String,
    want: String,
    size: u64,
    read: u64,
    hasher: sha2::Sha256,
    done: bool,
}

impl BlobReader {
    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        let n = self.resp.read(buf)?;
        if n == 0 {
            if self.read != self.size {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "{}: {} bytes, the descriptor says {}",
                        self.what, self.read, self.size
                    ),
                ));
            }
            let got = format!(
                "sha256:{}",
                hex::encode(std::mem::take(&mut self.hasher).finalize())
            );
            if got != self.want {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: digest {got}, expected {}", self.what, self.want),
                ));
            }
            self.done = true;
            return Ok(0);
        }
        self.read += n as u64;
        if self.read > self.size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: more than the {} bytes the descriptor says",
                    self.what, self.size
                ),
            ));
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn with_digest(location: &str, digest: &str) -> Result<reqwest::Url, OciError> {
    let mut url = reqwest::Url::parse(location)
        .map_err(|e| OciError::Invalid(format!("upload location {location:?}: {e}")))?;
    url.query_pairs_mut().append_pair("digest", digest);
    Ok(url)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Turns a response with an unexpected status into an error quoting the start of its body.
fn expect_status(resp: Response, what: &str, ok: &[StatusCode]) -> Result<Response, OciError> {
    let status = resp.status();
    if ok.contains(&status) {
        return Ok(resp);
    }
    let mut body = Vec::new();
    let _ = resp.take(ERROR_BODY_QUOTE).read_to_end(&mut body);
    let text = String::from_utf8_lossy(&body);
    let text = text.trim();
    Err(OciError::Status {
        what: what.to_string(),
        status: status.as_u16(),
        detail: if text.is_empty() {
            String::new()
        } else {
            format!(" ({text})")
        },
    })
}

/// Reads at most `max` bytes of a body; more is an error.
/// The largest piece of a streamed body handed over at once.
const STREAM_PIECE: usize = 64 << 10;

fn read_bounded(resp: Response, max: u64, what: &str) -> Result<Vec<u8>, OciError> {
    if let Some(n) = resp.content_length() {
        if n > max {
            return Err(OciError::Invalid(format!(
                "{what}: {n} bytes announced, at most {max} expected"
            )));
        }
    }
    let mut body = Vec::new();
    resp.take(max + 1)
        .read_to_end(&mut body)
        .map_err(|e| OciError::Invalid(format!("{what}: reading the body: {e}")))?;
    if body.len() as u64 > max {
        return Err(OciError::Invalid(format!(
            "{what}: more than the {max} bytes expected"
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn loopback_is_plain_http() {
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("127.0.0.1:5000"));
        assert!(is_loopback_host("127.3.4.5"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("ghcr.io"));
        assert!(!is_loopback_host("128.0.0.1"));
        assert_eq!(endpoint("ghcr.io", false).base, "https://ghcr.io");
        assert_eq!(endpoint("ghcr.io", true).base, "http://ghcr.io");
        assert_eq!(
            endpoint("127.0.0.1:5000", false).base,
            "http://127.0.0.1:5000"
        );
    }

    /// A registry on loopback that answers every request 401 with a bearer challenge whose
    /// token server accepts connections and never answers: a range read with a deadline must
    /// give up by then (the token fetch included), not after the client's own timeout.
    #[test]
    fn a_token_server_that_never_answers_is_bounded_by_the_deadline() {
        use std::io::{BufRead, BufReader};
        use std::net::TcpListener;
        let tokens = TcpListener::bind("127.0.0.1:0").expect("bind");
        let token_port = tokens.local_addr().expect("addr").port();
        let registry = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = registry.local_addr().expect("addr").port();
        // Accepted and held open, never answered.
        let held = std::thread::spawn(move || {
            let mut conns = Vec::new();
            for c in tokens.incoming().take(2).flatten() {
                conns.push(c);
            }
            std::thread::sleep(Duration::from_secs(5));
        });
        std::thread::spawn(move || {
            for mut c in registry.incoming().take(4).flatten() {
                let mut line = String::new();
                let mut r = BufReader::new(c.try_clone().expect("clone"));
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = write!(
                    c,
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{token_port}/token\",service=\"r\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        let reference = Reference::parse(&format!("127.0.0.1:{port}/test/img:v1")).expect("ref");
        let opts = RegistryOptions {
            timeout: Some(Duration::from_secs(60)),
            ..RegistryOptions::default()
        };
        let client = RegistryClient::new(&reference, &opts).expect("client");
        let start = std::time::Instant::now();
        let until = start + Duration::from_millis(700);
        let r = client.get_blob_range("sha256:00", 0, 10, Some(until));
        let took = start.elapsed();
        assert!(r.is_err());
        assert!(took < Duration::from_secs(3), "gave up after {took:?}");
        drop(held);
    }

    /// The ranges (first and last byte) a test server was asked for.
    type Asked = Arc<Mutex<Vec<(u64, u64)>>>;

    /// Answers blob range requests on loopback from `blob`, noting each request's range; with
    /// `cut`, a body is announced whole and the connection closed after `cut` bytes of it.
    fn range_server(blob: Arc<Vec<u8>>, cut: Option<usize>) -> (String, Asked) {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let host = listener.local_addr().expect("addr").to_string();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let noted = asked.clone();
        std::thread::spawn(move || {
            for mut c in listener.incoming().flatten() {
                let mut r = BufReader::new(c.try_clone().expect("clone"));
                let mut range = None;
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        let (a, b) = v.trim().split_once('-').expect("range");
                        range = Some((a.parse::<u64>().expect("a"), b.parse::<u64>().expect("b")));
                    }
                    line.clear();
                }
                let Some((a, b)) = range else {
                    let _ = write!(
                        c,
                        "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    );
                    continue;
                };
                crate::util::sync::lock(&noted).push((a, b));
                let body = &blob[a as usize..=b as usize];
                let _ = write!(
                    c,
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    blob.len(),
                    body.len()
                );
                let _ = c.write_all(&body[..cut.unwrap_or(body.len()).min(body.len())]);
                let _ = c.flush();
            }
        });
        (host, asked)
    }

    /// A mirror whose body breaks part-way: the rest, and only the rest, is asked of the next
    /// endpoint (the origin), and the sink gets every byte once, in order.
    #[test]
    fn a_streamed_range_broken_on_a_mirror_is_finished_by_the_origin() {
        let blob: Arc<Vec<u8>> =
            Arc::new((0..300_000u32).map(|i| (i * 13 + i / 7) as u8).collect());
        let (mirror, on_mirror) = range_server(blob.clone(), Some(100_000));
        let (origin, on_origin) = range_server(blob.clone(), None);
        let reference = Reference::parse(&format!("{origin}/test/img:v1")).expect("ref");
        let opts = RegistryOptions {
            mirrors: vec![Mirror::plain(&mirror)],
            timeout: Some(Duration::from_secs(30)),
            ..RegistryOptions::default()
        };
        let client = RegistryClient::new(&reference, &opts).expect("client");
        let mut got = Vec::new();
        let mut pieces = 0;
        client
            .get_blob_range_streaming("sha256:00", 1000, 250_000, None, &mut |p| {
                assert!(p.len() <= STREAM_PIECE, "a piece of {}", p.len());
                pieces += 1;
                got.extend_from_slice(p);
            })
            .expect("finished by the origin");
        assert_eq!(got.len(), 250_000);
        assert!(
            got == blob[1000..251_000],
            "the bytes differ from the blob's"
        );
        assert!(pieces >= 250_000 / STREAM_PIECE, "{pieces} pieces");
        assert_eq!(*crate::util::sync::lock(&on_mirror), vec![(1000, 250_999)]);
        assert_eq!(
            *crate::util::sync::lock(&on_origin),
            vec![(101_000, 250_999)]
        );
        // Broken everywhere: an error, after the bytes that did come.
        let (only, _) = range_server(blob.clone(), Some(50_000));
        let reference = Reference::parse(&format!("{only}/test/img:v1")).expect("ref");
        let client = RegistryClient::new(&reference, &RegistryOptions::default()).expect("client");
        let mut got = Vec::new();
        let r = client.get_blob_range_streaming("sha256:00", 0, 200_000, None, &mut |p| {
            got.extend_from_slice(p)
        });
        assert!(r.is_err(), "a short body accepted");
        assert!(
            got == blob[..got.len()] && got.len() <= 50_000,
            "{} bytes",
            got.len()
        );
    }
}
