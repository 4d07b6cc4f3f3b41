//! Bearer-token authentication, shared by both carriers.
//!
//! The server keeps only the SHA-256 digest of its token and compares digests
//! in constant time, so neither the content nor the length of the expected
//! token leaks through timing. Tokens longer than [`MAX_TOKEN_LEN`] are
//! refused before hashing.

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::control::RejectReason;

/// Longest token a client may present, bytes.
pub const MAX_TOKEN_LEN: usize = 1024;

/// How the server authenticates clients.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct AuthConfig {
    /// The bearer token clients must present. `None` or empty means "not configured".
    #[serde(default)]
    pub token: Option<String>,
    /// Accept every client without a token. Must be set explicitly: a server
    /// without a token refuses to start otherwise (see [`AuthConfig::check`]).
    #[serde(default)]
    pub disabled: bool,
}

/// Why an auth configuration is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthConfigError {
    /// No token and auth not explicitly disabled.
    #[error(
        "no auth token configured: set APERTURE_AUTH_TOKEN (or auth.token), or set auth.disabled: true to accept unauthenticated agents"
    )]
    MissingToken,
    /// The token is longer than clients may send.
    #[error("auth token is {len} bytes, longer than the {MAX_TOKEN_LEN}-byte maximum")]
    TokenTooLong {
        /// Its length.
        len: usize,
    },
    /// Both a token and `disabled` are set: ambiguous, refuse rather than guess.
    #[error("auth.disabled is true but a token is also configured; remove one of them")]
    Contradictory,
}

impl AuthConfig {
    /// The start-up rule: a server needs a token unless auth is explicitly disabled.
    pub fn check(&self) -> Result<(), AuthConfigError> {
        let token = self.token.as_deref().filter(|t| !t.is_empty());
        match (token, self.disabled) {
            (None, false) => Err(AuthConfigError::MissingToken),
            (Some(_), true) => Err(AuthConfigError::Contradictory),
            (Some(t), false) if t.len() > MAX_TOKEN_LEN => Err(AuthConfigError::TokenTooLong { len: t.len() }),
            _ => Ok(()),
        }
    }
}

/// Checks presented tokens against the configured one.
#[derive(Clone)]
pub struct Authenticator {
    /// Digest of the expected token; `None` when auth is disabled.
    expected: Option<[u8; 32]>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("enabled", &self.expected.is_some()).finish()
    }
}

impl Authenticator {
    /// Builds an authenticator after [`AuthConfig::check`].
    pub fn new(config: &AuthConfig) -> Result<Authenticator, AuthConfigError> {
        config.check()?;
        let expected = match (&config.token, config.disabled) {
            (Some(t), false) => Some(digest(t.as_bytes())),
            _ => None,
        };
        Ok(Authenticator { expected })
    }

    /// An authenticator that requires `token` (for tests and embedding).
    pub fn with_token(token: &str) -> Authenticator {
        Authenticator { expected: Some(digest(token.as_bytes())) }
    }

    /// An authenticator that accepts everyone.
    pub fn disabled() -> Authenticator {
        Authenticator { expected: None }
    }

    /// Whether a token is required.
    pub fn is_enabled(&self) -> bool {
        self.expected.is_some()
    }

    /// Checks a presented token; `None` means none was presented at all.
    pub fn verify(&self, presented: Option<&[u8]>) -> Result<(), RejectReason> {
        let Some(expected) = &self.expected else {
            return Ok(());
        };
        let Some(token) = presented else {
            return Err(RejectReason::MissingToken);
        };
        if token.len() > MAX_TOKEN_LEN {
            return Err(RejectReason::OversizedToken);
        }
        if bool::from(digest(token).ct_eq(expected)) { Ok(()) } else { Err(RejectReason::WrongToken) }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Extracts the token from an HTTP `authorization` header value
/// (`Bearer <token>`, scheme case-insensitive). `None` when the value is not
/// a bearer credential.
pub fn bearer_token(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if header.len() < SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    Some(&header[SCHEME.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_auth_matrix() {
        let auth = Authenticator::with_token("correct-horse");
        let long = vec![b'x'; MAX_TOKEN_LEN + 1];
        type Case<'a> = (Option<&'a [u8]>, Result<(), RejectReason>);
        let cases: &[Case] = &[
            (None, Err(RejectReason::MissingToken)),
            (Some(b""), Err(RejectReason::WrongToken)),
            (Some(b"wrong"), Err(RejectReason::WrongToken)),
            (Some(b"correct-horsf"), Err(RejectReason::WrongToken)),
            (Some(b"correct"), Err(RejectReason::WrongToken)),
            (Some(b"correct-horse "), Err(RejectReason::WrongToken)),
            (Some(&long), Err(RejectReason::OversizedToken)),
            (Some(b"correct-horse"), Ok(())),
        ];
        for (presented, want) in cases {
            assert_eq!(auth.verify(*presented), *want, "{presented:?}");
        }
        assert_eq!(Authenticator::disabled().verify(None), Ok(()));
    }

    #[test]
    fn config_rules() {
        let cfg = |token: Option<&str>, disabled| AuthConfig { token: token.map(str::to_owned), disabled };
        assert_eq!(cfg(None, false).check(), Err(AuthConfigError::MissingToken));
        assert_eq!(cfg(Some(""), false).check(), Err(AuthConfigError::MissingToken));
        assert_eq!(cfg(Some("t"), true).check(), Err(AuthConfigError::Contradictory));
        assert_eq!(cfg(None, true).check(), Ok(()));
        assert_eq!(cfg(Some("t"), false).check(), Ok(()));
        let long = "x".repeat(MAX_TOKEN_LEN + 1);
        assert!(matches!(cfg(Some(&long), false).check(), Err(AuthConfigError::TokenTooLong { .. })));
        assert!(Authenticator::new(&cfg(None, true)).expect("valid").verify(None).is_ok());
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer "), Some(&b""[..]));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bear"), None);
    }
}
