//! A bearer-token gate in front of a registry, as Docker Hub and Harbor have it: a token
//! service that issues short-lived tokens for a user's password (which a test can change), and
//! a gate that passes requests with a valid token and answers the others `401` with the
//! challenge naming the service. Both are [`Middlebox`]es on 127.0.0.1.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;

use super::middlebox::{header, http_response, Action, Middlebox};

/// Tokens issued: value → when.
pub type Issued = Arc<Mutex<HashMap<String, Instant>>>;

/// A token service and the gate it guards.
pub struct TokenGate {
    /// The token service.
    pub tokens: Middlebox,
    /// The gate: talk to the registry through `gate.addr()`.
    pub gate: Middlebox,
    /// Tokens issued, and when.
    pub issued: Issued,
    /// Token requests refused for bad credentials.
    pub refused_credentials: Arc<AtomicU64>,
    /// Requests the gate refused (no token, unknown or expired token).
    pub refused: Arc<AtomicU64>,
    /// Of those, with an expired token.
    pub expired: Arc<AtomicU64>,
    password: Arc<Mutex<Option<(String, String)>>>,
}

impl TokenGate {
    /// A gate in front of the registry on `registry_port`, issuing tokens that live
    /// `lifetime`, to `credentials` (`user:pass`; `None`: to anyone).
    pub fn start(registry_port: u16, lifetime: Duration, credentials: Option<&str>) -> TokenGate {
        let issued: Issued = Arc::default();
        let password: Arc<Mutex<Option<(String, String)>>> = Arc::new(Mutex::new(
            credentials
                .and_then(|c| c.split_once(':'))
                .map(|(u, p)| (u.to_string(), p.to_string())),
        ));
        let refused_credentials = Arc::new(AtomicU64::new(0));
        let (iss, pw, rc) = (
            issued.clone(),
            password.clone(),
            refused_credentials.clone(),
        );
        let tokens = Middlebox::start(
            0,
            Arc::new(move |n, head: &str| {
                let path = head.split(' ').nth(1).unwrap_or("");
                if !path.starts_with("/token?") || !path.contains("scope=repository") {
                    return Action::Respond(http_response("400 Bad Request", &[], b""));
                }
                let want = pw.lock().expect("lock").clone();
                if let Some((user, pass)) = want {
                    let given = header(head, "authorization")
                        .and_then(|a| a.strip_prefix("Basic "))
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .and_then(|b| String::from_utf8(b).ok());
                    if given.as_deref() != Some(&format!("{user}:{pass}")) {
                        rc.fetch_add(1, Ordering::Relaxed);
                        return Action::Respond(http_response(
                            "401 Unauthorized",
                            &[("Content-Type", "application/json".into())],
                            br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#,
                        ));
                    }
                }
                let tok = format!("tok{n}");
                iss.lock()
                    .expect("lock")
                    .insert(tok.clone(), Instant::now());
                let body = format!(
                    r#"{{"token":"{tok}","expires_in":{}}}"#,
                    lifetime.as_secs().max(1)
                );
                Action::Respond(http_response(
                    "200 OK",
                    &[("Content-Type", "application/json".into())],
                    body.as_bytes(),
                ))
            }),
        );
        let realm = format!("http://{}/token", tokens.addr());
        let refused = Arc::new(AtomicU64::new(0));
        let expired = Arc::new(AtomicU64::new(0));
        let (iss, rf, ex) = (issued.clone(), refused.clone(), expired.clone());
        let gate = Middlebox::start(
            registry_port,
            Arc::new(move |_, head: &str| {
                let path = head.split(' ').nth(1).unwrap_or("").to_string();
                let repo = path
                    .strip_prefix("/v2/")
                    .and_then(|p| p.split("/blobs/").next())
                    .and_then(|p| p.split("/manifests/").next())
                    .unwrap_or("")
                    .to_string();
                let tok = header(head, "authorization").and_then(|a| a.strip_prefix("Bearer "));
                let valid = tok.and_then(|t| iss.lock().expect("lock").get(t).copied());
                match valid {
                    Some(at) if at.elapsed() < lifetime => return Action::Pass,
                    Some(_) => {
                        ex.fetch_add(1, Ordering::Relaxed);
                    }
                    None => {}
                }
                rf.fetch_add(1, Ordering::Relaxed);
                let scope = if repo.is_empty() {
                    String::new()
                } else {
                    format!(",scope=\"repository:{repo}:pull\"")
                };
                Action::Respond(http_response(
                    "401 Unauthorized",
                    &[(
                        "WWW-Authenticate",
                        format!("Bearer realm=\"{realm}\",service=\"skiff-test\"{scope}"),
                    )],
                    b"{\"errors\":[{\"code\":\"UNAUTHORIZED\"}]}",
                ))
            }),
        );
        TokenGate {
            tokens,
            gate,
            issued,
            refused_credentials,
            refused,
            expired,
            password,
        }
    }

    /// Changes the password the token service takes (old tokens stay valid until they
    /// expire, as with a real service).
    pub fn set_password(&self, user: &str, pass: &str) {
        *self.password.lock().expect("lock") = Some((user.to_string(), pass.to_string()));
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> usize {
        self.issued.lock().expect("lock").len()
    }
}
