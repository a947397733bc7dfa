//! Registry authentication: anonymous, HTTP basic, and bearer tokens obtained from the realm a
//! `WWW-Authenticate` challenge names, refreshed on 401 and before they expire.
//!
//! Credentials come, first found wins, from `--registry-auth user:pass`, `$SKIFF_REGISTRY_AUTH`,
//! or the Docker client's `config.json` (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`, field `auths.<host>.auth`, base64 of `user:pass`).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;

use super::OciError;

/// The environment variable holding `user:pass`.
pub const AUTH_ENV: &str = "SKIFF_REGISTRY_AUTH";
/// Largest token response read.
const MAX_TOKEN_RESPONSE: u64 = 1 << 20;
/// Lifetime assumed when a token response does not give one (the distribution spec's default).
const DEFAULT_TOKEN_SECONDS: u64 = 60;
/// A token is refreshed this long before it expires.
const REFRESH_MARGIN: Duration = Duration::from_secs(10);

/// A user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}:***)", self.username)
    }
}

impl Credentials {
    /// Parses `user:pass` (the password may contain `:`).
    pub fn parse(s: &str) -> Result<Self, OciError> {
        match s.split_once(':') {
            Some((u, p)) if !u.is_empty() => Ok(Self {
                username: u.to_string(),
                password: p.to_string(),
            }),
            _ => Err(OciError::Credentials(
                "credentials must be user:password".into(),
            )),
        }
    }

    /// The value of an `Authorization: Basic` header.
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Where the Docker client keeps its configuration.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// The credentials for `registry` in a Docker `config.json` text, if any. Keys may be a bare
/// host (`127.0.0.1:5000`) or a URL (`https://index.docker.io/v1/` for Docker Hub).
pub fn parse_docker_config(text: &str, registry: &str) -> Result<Option<Credentials>, OciError> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: HashMap<String, AuthEntry>,
    }
    #[derive(serde::Deserialize)]
    struct AuthEntry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let cfg: Config = serde_json::from_str(text)
        .map_err(|e| OciError::Credentials(format!("docker config: {e}")))?;
    let normalise = |k: &str| -> String {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let k = k.split('/').next().unwrap_or(k);
        match k {
            "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
            _ => k.to_string(),
        }
    };
    let want = normalise(registry);
    for (key, entry) in &cfg.auths {
        if normalise(key) != want {
            continue;
        }
        if let Some(a) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| OciError::Credentials(format!("docker config auth of {key}: {e}")))?;
            let s = String::from_utf8(raw).map_err(|_| {
                OciError::Credentials(format!("docker config auth of {key} is not UTF-8"))
            })?;
            return Credentials::parse(&s).map(Some);
        }
        if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
    }
    Ok(None)
}

/// Credentials for `registry`: the flag's value, else `$SKIFF_REGISTRY_AUTH`, else the Docker
/// config file, else none (anonymous).
pub fn find_credentials(
    flag: Option<&str>,
    registry: &str,
) -> Result<Option<Credentials>, OciError> {
    if let Some(f) = flag {
        return Credentials::parse(f).map(Some);
    }
    if let Ok(v) = std::env::var(AUTH_ENV) {
        if !v.is_empty() {
            return Credentials::parse(&v).map(Some);
        }
    }
    let Some(path) = docker_config_path() else {
        return Ok(None);
    };
    read_docker_config(&path, registry)
}

fn read_docker_config(path: &Path, registry: &str) -> Result<Option<Credentials>, OciError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_docker_config(&text, registry),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(OciError::Credentials(format!("{}: {e}", path.display()))),
    }
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// `basic` or `bearer`, lower-cased.
    pub scheme: String,
    /// Parameters (`realm`, `service`, `scope`, …), names lower-cased.
    pub params: BTreeMap<String, String>,
}

/// Parses a challenge such as `Bearer realm="https://a/token",service="reg",scope="x:y:pull"`.
/// Only the first challenge of the header is taken.
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, mut rest) = match header.find(' ') {
        Some(i) => (&header[..i], header[i + 1..].trim_start()),
        None => (header, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = BTreeMap::new();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let name = rest[..eq].trim().to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = r.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    c => v.push(c),
                }
            }
            let end = end?;
            value = v;
            rest = &r[end + 1..];
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        if name.is_empty() || name.contains(' ') {
            // A second challenge starts here ("…, Basic realm=…"): stop at the first.
            break;
        }
        params.insert(name, value);
        rest = rest.trim_start();
        match rest.strip_prefix(',') {
            Some(r) => rest = r.trim_start(),
            None if rest.is_empty() => {}
            None => break,
        }
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// A bearer token and when to stop using it.
#[derive(Clone, Debug)]
struct Token {
    value: String,
    refresh_at: Instant,
}

/// What a registry host wants, learnt from its last challenge.
#[derive(Clone, Debug, Default)]
enum Scheme {
    /// No challenge seen yet: try anonymously.
    #[default]
    Unknown,
    /// HTTP basic with the credentials.
    Basic,
    /// Bearer tokens from this realm and service.
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

#[derive(Default)]
struct HostState {
    scheme: Scheme,
    tokens: HashMap<String, Token>,
}

/// Authenticates requests to the registry hosts one client talks to (origin and mirrors).
///
/// Credentials can be replaced while requests are in flight ([`Self::set_credentials`]): a
/// daemon gets renewed credentials over its API without remounting anything.
pub struct Authenticator {
    credentials: RwLock<Option<Credentials>>,
    /// A bearer token given with the configuration, sent before any challenge.
    bearer_token: RwLock<Option<String>>,
    hosts: Mutex<HashMap<String, HostState>>,
}

impl Authenticator {
    /// An authenticator using `credentials` (anonymous when `None`).
    pub fn new(credentials: Option<Credentials>) -> Self {
        Self {
            credentials: RwLock::new(credentials),
            bearer_token: RwLock::new(None),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    fn credentials(&self) -> Option<Credentials> {
        crate::util::sync::read(&self.credentials).clone()
    }

    /// Replaces the credentials. What was learnt with the old ones (schemes, tokens) is
    /// dropped, so that the next request to each host proves the new ones.
    pub fn set_credentials(&self, credentials: Option<Credentials>) {
        *crate::util::sync::write(&self.credentials) = credentials;
        self.lock().clear();
    }

    /// Sets the bearer token sent to a host before it asks for another (nydusd's
    /// `registry_token`).
    pub fn set_bearer_token(&self, token: Option<String>) {
        *crate::util::sync::write(&self.bearer_token) = token;
        self.lock().clear();
    }

    /// The `Authorization` header for a request to `host` needing `scope`, if one is known and
    /// still fresh. A bearer token about to expire is not returned: the request then fails
    /// with 401 and [`Self::challenged`] fetches a new one.
    ///
    /// A host not heard from yet gets the configured bearer token, else the basic credentials,
    /// if there are any: a registry with basic auth then answers the first request instead of
    /// a 401 and a second round trip, and one with token auth answers 401 with its challenge
    /// as it would anyway.
    pub fn header(&self, host: &str, scope: &str) -> Option<String> {
        let hosts = self.lock();
        let Some(st) = hosts.get(host) else {
            if let Some(t) = crate::util::sync::read(&self.bearer_token).clone() {
                return Some(format!("Bearer {t}"));
            }
            return self.credentials().as_ref().map(Credentials::basic_header);
        };
        match &st.scheme {
            Scheme::Unknown => None,
            Scheme::Basic => self.credentials().as_ref().map(Credentials::basic_header),
            Scheme::Bearer { .. } => st
                .tokens
                .get(scope)
                .filter(|t| Instant::now() < t.refresh_at)
                .map(|t| format!("Bearer {}", t.value)),
        }
    }

    /// Whether a bearer token for `scope` at `host` is due for refresh (so the caller can get
    /// one before sending, instead of after a 401).
    pub fn needs_refresh(&self, host: &str, scope: &str) -> bool {
        let hosts = self.lock();
        match hosts.get(host) {
            Some(st) if matches!(st.scheme, Scheme::Bearer { .. }) => st
                .tokens
                .get(scope)
                .is_none_or(|t| Instant::now() >= t.refresh_at),
            _ => false,
        }
    }

    /// Handles a 401 from `host` with challenge header `www_authenticate`: learns the scheme
    /// and, for bearer, fetches a token for `scope`. Returns whether retrying can help.
    pub fn challenged(
        &self,
        http: &reqwest::blocking::Client,
        host: &str,
        www_authenticate: Option<&str>,
        scope: &str,
    ) -> Result<bool, OciError> {
        self.challenged_within(http, host, www_authenticate, scope, None)
    }

    /// Like [`Self::challenged`], a token fetch taking at most `timeout` (the client's own
    /// timeout with `None`): what is left of the read it is made for.
    pub fn challenged_within(
        &self,
        http: &reqwest::blocking::Client,
        host: &str,
        www_authenticate: Option<&str>,
        scope: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<bool, OciError> {
        let Some(ch) = www_authenticate.and_then(parse_challenge) else {
            return Ok(false);
        };
        match ch.scheme.as_str() {
            "basic" => {
                let mut hosts = self.lock();
                let st = hosts.entry(host.to_string()).or_default();
                let was_basic = matches!(st.scheme, Scheme::Basic);
                st.scheme = Scheme::Basic;
                // Retrying helps only if credentials exist and were not just refused.
                Ok(self.credentials().is_some() && !was_basic)
            }
            "bearer" => {
                let realm = ch.params.get("realm").cloned().ok_or_else(|| {
                    OciError::Auth(format!("{host}: bearer challenge without realm"))
                })?;
                let service = ch.params.get("service").cloned();
                self.refresh(http, host, &realm, service.as_deref(), scope, timeout)?;
                let mut hosts = self.lock();
                let st = hosts.entry(host.to_string()).or_default();
                st.scheme = Scheme::Bearer { realm, service };
                Ok(true)
            }
            other => Err(OciError::Auth(format!(
                "{host}: unsupported authentication scheme {other:?}"
            ))),
        }
    }

    /// Fetches a new token for `scope` from the realm learnt earlier from `host`, if it uses
    /// bearer tokens.
    pub fn refresh_known(
        &self,
        http: &reqwest::blocking::Client,
        host: &str,
        scope: &str,
    ) -> Result<(), OciError> {
        self.refresh_known_within(http, host, scope, None)
    }

    /// Like [`Self::refresh_known`], the token fetch taking at most `timeout`.
    pub fn refresh_known_within(
        &self,
        http: &reqwest::blocking::Client,
        host: &str,
        scope: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<(), OciError> {
        let known = {
            let hosts = self.lock();
            match hosts.get(host).map(|s| &s.scheme) {
                Some(Scheme::Bearer { realm, service }) => Some((realm.clone(), service.clone())),
                _ => None,
            }
        };
        if let Some((realm, service)) = known {
            self.refresh(http, host, &realm, service.as_deref(), scope, timeout)?;
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HostState>> {
        crate::util::sync::lock(&self.hosts)
    }

    fn refresh(
        &self,
        http: &reqwest::blocking::Client,
        host: &str,
        realm: &str,
        service: Option<&str>,
        scope: &str,
        timeout: Option<std::time::Duration>,
    ) -> Result<(), OciError> {
        let mut url = reqwest::Url::parse(realm)
            .map_err(|e| OciError::Auth(format!("{host}: token realm {realm:?}: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            if !scope.is_empty() {
                q.append_pair("scope", scope);
            }
        }
        let mut req = http.get(url);
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        if let Some(c) = self.credentials() {
            req = req.header(reqwest::header::AUTHORIZATION, c.basic_header());
        }
        let resp = req
            .send()
            .map_err(|e| OciError::Auth(format!("{host}: token request to {realm}: {e}")))?;
        let status = resp.status();
        if !status.is_success() {
            let hint = if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                if self.credentials().is_some() {
                    " (the credentials were refused: renew them, e.g. with PUT /api/v1/config \
                     and registry_auth)"
                } else {
                    " (no credentials were given)"
                }
            } else {
                ""
            };
            return Err(OciError::Auth(format!(
                "{host}: token request to {realm}: HTTP {status}{hint}"
            )));
        }
        let mut body = Vec::new();
        resp.take(MAX_TOKEN_RESPONSE + 1)
            .read_to_end(&mut body)
            .map_err(|e| OciError::Auth(format!("{host}: reading token: {e}")))?;
        if body.len() as u64 > MAX_TOKEN_RESPONSE {
            return Err(OciError::Auth(format!("{host}: token response too large")));
        }
        let token = parse_token_response(&body, Instant::now(), SystemTime::now())
            .map_err(|e| OciError::Auth(format!("{host}: token response: {e}")))?;
        let mut hosts = self.lock();
        hosts
            .entry(host.to_string())
            .or_default()
            .tokens
            .insert(scope.to_string(), token);
        Ok(())
    }
}

/// Parses a token endpoint's JSON answer (`token` or `access_token`, `expires_in`,
/// `issued_at`) into a token to refresh [`REFRESH_MARGIN`] before it expires.
fn parse_token_response(body: &[u8], now: Instant, wall: SystemTime) -> Result<Token, String> {
    #[derive(serde::Deserialize)]
    struct Resp {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
        issued_at: Option<String>,
    }
    let r: Resp = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let value = r
        .token
        .or(r.access_token)
        .filter(|t| !t.is_empty())
        .ok_or("no token")?;
    if value.len() > 64 << 10 || value.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err("malformed token".into());
    }
    let lifetime = r
        .expires_in
        .unwrap_or(DEFAULT_TOKEN_SECONDS)
        .min(86400 * 365);
    // Time already spent since issue (by the server's clock, if it is in the past by ours).
    let spent = r
        .issued_at
        .as_deref()
        .and_then(parse_rfc3339)
        .and_then(|issued| {
            let now_s = wall.duration_since(UNIX_EPOCH).ok()?.as_secs() as i64;
            u64::try_from(now_s - issued).ok()
        })
        .unwrap_or(0)
        .min(lifetime);
    let left = Duration::from_secs(lifetime - spent);
    let refresh_at = now + left.saturating_sub(REFRESH_MARGIN.min(left / 2));
    Ok(Token { value, refresh_at })
}

/// Seconds since the epoch of an RFC 3339 time (`2026-11-22T20:41:29.5Z`, `…+01:00`).
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        rest = &r[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            sign * (rest.get(1..3)?.parse::<i64>().ok()? * 3600
                + rest.get(4..6)?.parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + h * 3600 + mi * 60 + se - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_go_with_the_first_request() {
        let creds = Credentials::parse("u:p").expect("creds");
        let basic = creds.basic_header();
        let a = Authenticator::new(Some(creds));
        assert_eq!(a.header("r.example", "repository:x:pull"), Some(basic));
        assert_eq!(Authenticator::new(None).header("r.example", "s"), None);
    }

    #[test]
    fn parses_bearer_challenge() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/debian:pull""#,
        )
        .expect("challenge");
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/debian:pull");
    }

    #[test]
    fn parses_basic_and_odd_challenges() {
        let c = parse_challenge(r#"Basic realm="Registry Realm""#).expect("basic");
        assert_eq!(c.scheme, "basic");
        assert_eq!(c.params["realm"], "Registry Realm");
        let c = parse_challenge(
            r#"bearer  Realm="http://127.0.0.1/t?a=b" , scope="repository:a/b:pull,push",error="insufficient_scope""#,
        )
        .expect("bearer");
        assert_eq!(c.params["realm"], "http://127.0.0.1/t?a=b");
        assert_eq!(c.params["scope"], "repository:a/b:pull,push");
        assert_eq!(c.params["error"], "insufficient_scope");
        let c = parse_challenge(r#"Bearer realm="a\"b",service=svc"#).expect("escaped");
        assert_eq!(c.params["realm"], "a\"b");
        assert_eq!(c.params["service"], "svc");
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_challenge("").is_none());
    }

    #[test]
    fn token_expiry() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t =
            parse_token_response(br#"{"token":"abc","expires_in":300}"#, now, wall).expect("token");
        assert_eq!(t.value, "abc");
        assert_eq!(t.refresh_at, now + Duration::from_secs(290));
        // Issued 100 s ago: 200 s left.
        let issued = parse_rfc3339("2027-01-15T08:00:00Z").expect("time");
        let wall2 = UNIX_EPOCH + Duration::from_secs(issued as u64 + 100);
        let t = parse_token_response(
            br#"{"access_token":"x","expires_in":300,"issued_at":"2027-01-15T08:00:00Z"}"#,
            now,
            wall2,
        )
        .expect("token");
        assert_eq!(t.refresh_at, now + Duration::from_secs(190));
        let t = parse_token_response(br#"{"token":"x"}"#, now, wall).expect("default");
        assert_eq!(t.refresh_at, now + Duration::from_secs(50));
        assert!(parse_token_response(br#"{"expires_in":1}"#, now, wall).is_err());
        assert!(parse_token_response(br#"{"token":"a b"}"#, now, wall).is_err());
        assert!(parse_token_response(b"not json", now, wall).is_err());
    }

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951868800));
        assert_eq!(
            parse_rfc3339("2000-03-01T01:00:00.123456+01:00"),
            Some(951868800)
        );
        assert_eq!(parse_rfc3339("2000-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn docker_config() {
        // "user:pa:ss" in base64.
        let text = r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="},
            "https://index.docker.io/v1/":{"auth":"aHViOnNlY3JldA=="},
            "other.example":{"username":"u","password":"p"}}}"#;
        let c = parse_docker_config(text, "127.0.0.1:5000")
            .expect("parse")
            .expect("found");
        assert_eq!(c.username, "user");
        assert_eq!(c.password, "pa:ss");
        let c = parse_docker_config(text, "docker.io")
            .expect("parse")
            .expect("hub");
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("hub", "secret")
        );
        let c = parse_docker_config(text, "other.example")
            .expect("parse")
            .expect("plain");
        assert_eq!(c.username, "u");
        assert!(parse_docker_config(text, "nowhere:1")
            .expect("parse")
            .is_none());
        assert!(parse_docker_config(r#"{"auths":{"h":{"auth":"!!"}}}"#, "h").is_err());
        assert!(parse_docker_config("{}", "h").expect("empty").is_none());
        assert!(Credentials::parse("nocolon").is_err());
        assert_eq!(
            Credentials::parse("a:b").expect("ok").basic_header(),
            "Basic YTpi"
        );
    }

    /// A token endpoint on loopback that answers `n` requests with the next token, and
    /// records the requests' first lines and Authorization headers.
    fn token_server(n: usize, expires_in: u64) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for i in 0..n {
                let Ok((s, _)) = l.accept() else { break };
                let mut r = BufReader::new(s);
                let mut line = String::new();
                let mut req = String::new();
                while r.read_line(&mut line).is_ok_and(|k| k > 0) {
                    if line == "\r\n" {
                        break;
                    }
                    if line.starts_with("GET")
                        || line.to_ascii_lowercase().starts_with("authorization")
                    {
                        req.push_str(line.trim());
                        req.push(' ');
                    }
                    line.clear();
                }
                seen.push(req);
                let body = format!(r#"{{"token":"tok{i}","expires_in":{expires_in}}}"#);
                let mut s = r.into_inner();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
            seen
        });
        (format!("http://{addr}/token"), h)
    }

    #[test]
    fn bearer_tokens_fetched_and_refreshed() {
        // expires_in 2: the refresh margin (half the lifetime here) makes it due after 1 s.
        let (realm, server) = token_server(2, 2);
        let http = reqwest::blocking::Client::builder()
            .no_proxy()
            .build()
            .expect("client");
        let auth = Authenticator::new(Some(Credentials {
            username: "u".into(),
            password: "p".into(),
        }));
        let scope = "repository:a/b:pull";
        // Before any challenge: the basic credentials, in case basic is all the host wants.
        assert_eq!(auth.header("reg", scope).as_deref(), Some("Basic dTpw"));
        let challenge = format!(r#"Bearer realm="{realm}",service="reg.test",scope="{scope}""#);
        assert!(auth
            .challenged(&http, "reg", Some(&challenge), scope)
            .expect("challenge answered"));
        assert_eq!(auth.header("reg", scope).as_deref(), Some("Bearer tok0"));
        assert!(!auth.needs_refresh("reg", scope));
        assert!(auth.needs_refresh("reg", "repository:other:pull"));
        std::thread::sleep(Duration::from_millis(1100));
        assert!(auth.needs_refresh("reg", scope));
        assert_eq!(auth.header("reg", scope), None, "a stale token is not sent");
        auth.refresh_known(&http, "reg", scope).expect("refresh");
        assert_eq!(auth.header("reg", scope).as_deref(), Some("Bearer tok1"));
        let seen = server.join().expect("server");
        assert_eq!(seen.len(), 2);
        for req in &seen {
            assert!(req.contains("service=reg.test"), "{req}");
            assert!(req.contains("scope=repository%3Aa%2Fb%3Apull"), "{req}");
            assert!(
                req.contains("Basic dTpw"),
                "credentials sent to the realm: {req}"
            );
        }
        // Basic: credentials are retried once, then the 401 stands.
        assert!(auth
            .challenged(&http, "basic-host", Some(r#"Basic realm="r""#), scope)
            .expect("basic"));
        assert_eq!(
            auth.header("basic-host", scope).as_deref(),
            Some("Basic dTpw")
        );
        assert!(!auth
            .challenged(&http, "basic-host", Some(r#"Basic realm="r""#), scope)
            .expect("basic again"));
        let anon = Authenticator::new(None);
        assert!(!anon
            .challenged(&http, "h", Some(r#"Basic realm="r""#), scope)
            .expect("anonymous basic"));
    }
}
