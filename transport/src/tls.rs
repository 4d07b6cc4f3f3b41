//! TLS for both carriers: the server's certificate (loaded or created on
//! first start) and the client's trust (a CA file, a pinned SHA-256
//! fingerprint, or — explicitly — nothing). QUIC always uses TLS; gRPC does
//! too unless `insecure_plaintext` is set on both ends.
//!
//! Fingerprints are the SHA-256 of the certificate's DER bytes, written as
//! 64 hex digits; colons and case are ignored when parsing, so the output of
//! `openssl x509 -noout -fingerprint -sha256` can be pasted as is.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// ALPN protocol id of the QUIC carrier.
pub const QUIC_ALPN: &[u8] = b"aperture/1";
/// File names of a created certificate, inside the server's data directory.
pub const GENERATED_CERT: &str = "tls/aperture-cert.pem";
/// See [`GENERATED_CERT`].
pub const GENERATED_KEY: &str = "tls/aperture-key.pem";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("reading {what} from {path}: {source}")]
    Pem {
        /// "certificate" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path} contains no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// Only one of certificate and key is configured.
    #[error("tls.cert_file and tls.key_file must be set together (only {set} is set)")]
    HalfConfigured {
        /// Which one is set.
        set: &'static str,
    },
    /// Creating or saving the self-signed certificate failed.
    #[error("creating a self-signed certificate in {dir}: {reason}; configure tls.cert_file and tls.key_file instead")]
    Generate {
        /// The data directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The pinned fingerprint is not 64 hex digits.
    #[error("tls fingerprint {value:?} is not a SHA-256 fingerprint (64 hex digits, colons allowed)")]
    BadFingerprint {
        /// The configured value.
        value: String,
    },
    /// The client has no way to trust the server.
    #[error(
        "no TLS trust configured: set tls.ca_file or tls.fingerprint (the aggregator logs its certificate fingerprint at start), or insecure_skip_verify: true"
    )]
    NoTrust,
    /// Contradictory client trust settings.
    #[error("set only one of tls.ca_file, tls.fingerprint and insecure_skip_verify")]
    ConflictingTrust,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The server's certificate chain and key.
#[derive(Debug)]
pub struct ServerIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// The leaf certificate and key as PEM (for tonic's TLS config).
    pub cert_pem: Vec<u8>,
    /// See `cert_pem`.
    pub key_pem: Vec<u8>,
    /// SHA-256 of the leaf certificate.
    pub fingerprint: [u8; 32],
    /// Whether it was created by this start.
    pub generated: bool,
}

/// Server TLS settings.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsConfig {
    /// PEM certificate chain; with `key_file`. When both are unset, a
    /// self-signed certificate is created in the data directory on first
    /// start and reused afterwards.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Names for a created certificate (besides `localhost`).
    #[serde(default)]
    pub names: Vec<String>,
    /// Serve gRPC without TLS. Off by default: gRPC uses the same
    /// certificate as QUIC. Only for networks where something else encrypts
    /// (a service mesh); the agents' token then crosses the network in
    /// cleartext. Warned about at start-up.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// SHA-256 of a DER certificate.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

/// Formats a fingerprint as colon-separated upper-case hex (the usual display).
pub fn format_fingerprint(fp: &[u8; 32]) -> String {
    fp.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// Parses a fingerprint: 64 hex digits, colons and case ignored.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], TlsError> {
    let bad = || TlsError::BadFingerprint { value: s.to_owned() };
    let digits: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
    if digits.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).map_err(|_| bad())?;
        out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Loads the configured certificate, or the one created earlier in
/// `data_dir`, or creates (and saves) a self-signed one.
pub fn load_or_create_identity(cfg: &ServerTlsConfig, data_dir: &Path) -> Result<ServerIdentity, TlsError> {
    match (&cfg.cert_file, &cfg.key_file) {
        (Some(c), Some(k)) => load_identity(c, k, false),
        (Some(_), None) => Err(TlsError::HalfConfigured { set: "tls.cert_file" }),
        (None, Some(_)) => Err(TlsError::HalfConfigured { set: "tls.key_file" }),
        (None, None) => {
            let cert = data_dir.join(GENERATED_CERT);
            let key = data_dir.join(GENERATED_KEY);
            if cert.exists() && key.exists() {
                return load_identity(&cert, &key, false);
            }
            create_identity(&cert, &key, &cfg.names, data_dir)?;
            load_identity(&cert, &key, true)
        }
    }
}

fn load_identity(cert: &Path, key: &Path, generated: bool) -> Result<ServerIdentity, TlsError> {
    fn pem_err(what: &'static str, path: &Path) -> impl FnOnce(rustls::pki_types::pem::Error) -> TlsError {
        let path = path.to_owned();
        move |source| TlsError::Pem { what, path, source }
    }
    let io = rustls::pki_types::pem::Error::Io;
    let cert_pem = std::fs::read(cert).map_err(|e| pem_err("certificate", cert)(io(e)))?;
    let key_pem = std::fs::read(key).map_err(|e| pem_err("private key", key)(io(e)))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err("certificate", cert))?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate { path: cert.to_owned() });
    };
    let fingerprint = fingerprint(leaf);
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(pem_err("private key", key))?;
    Ok(ServerIdentity { chain, key: key_der, cert_pem, key_pem, fingerprint, generated })
}

fn create_identity(cert: &Path, key: &Path, names: &[String], data_dir: &Path) -> Result<(), TlsError> {
    let fail = |reason: String| TlsError::Generate { dir: data_dir.to_owned(), reason };
    let mut sans = vec!["localhost".to_owned()];
    sans.extend(names.iter().cloned());
    let made = rcgen::generate_simple_self_signed(sans).map_err(|e| fail(e.to_string()))?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating {}: {e}", dir.display())))?;
    }
    write_private(key, made.signing_key.serialize_pem().as_bytes()).map_err(|e| fail(e.to_string()))?;
    std::fs::write(cert, made.cert.pem()).map_err(|e| fail(format!("writing {}: {e}", cert.display())))?;
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(bytes)
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A rustls server config for `alpn` (TLS 1.3 only).
pub fn server_config(id: &ServerIdentity, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(id.chain.clone(), id.key.clone_key())?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// How the client decides to trust the server.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM file of the CA(s) that signed the server's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint of the server's certificate (pinning).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Trust any certificate. Encryption without authentication: a warning
    /// is logged at every connect.
    #[serde(default)]
    pub insecure_skip_verify: bool,
    /// Name to verify the certificate against (CA mode) and send as SNI;
    /// defaults to the host of the aggregator address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Speak gRPC without TLS. Off by default: gRPC, including the fallback
    /// from QUIC, uses TLS with the same trust settings as QUIC, so a fallback
    /// never sends the token in cleartext. Warned about at start-up.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

/// Which kind of trust a client config resolved to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustMode {
    /// Certificates chained to a configured CA.
    Ca,
    /// One certificate, by fingerprint.
    Pinned,
    /// Anything (warned about at every connect).
    Insecure,
}

/// A rustls client config for `alpn`, and the trust mode it uses.
pub fn client_config(cfg: &ClientTlsConfig, alpn: &[u8]) -> Result<(rustls::ClientConfig, TrustMode), TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let algs = provider.signature_verification_algorithms;
    let (mut config, mode) = match (&cfg.ca_file, &cfg.fingerprint, cfg.insecure_skip_verify) {
        (None, None, false) => return Err(TlsError::NoTrust),
        (Some(ca), None, false) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::Pem { what: "CA certificate", path: ca.clone(), source })?;
            if certs.is_empty() {
                return Err(TlsError::NoCertificate { path: ca.clone() });
            }
            for c in certs {
                roots.add(c)?;
            }
            (builder.with_root_certificates(roots).with_no_client_auth(), TrustMode::Ca)
        }
        (None, Some(fp), false) => {
            let pin = parse_fingerprint(fp)?;
            let verifier = Arc::new(AcceptVerifier { pin: Some(pin), algs });
            (builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth(), TrustMode::Pinned)
        }
        (None, None, true) => {
            let verifier = Arc::new(AcceptVerifier { pin: None, algs });
            (builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth(), TrustMode::Insecure)
        }
        _ => return Err(TlsError::ConflictingTrust),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok((config, mode))
}

/// Accepts the certificate whose fingerprint is pinned (or any, when `pin`
/// is `None`: insecure mode), and still checks that the server holds the
/// certificate's key (handshake signatures are verified either way).
#[derive(Debug)]
struct AcceptVerifier {
    pin: Option<[u8; 32]>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.pin {
            None => Ok(ServerCertVerified::assertion()),
            Some(pin) => {
                let seen = fingerprint(end_entity);
                // Fingerprints are public: no need for a constant-time compare.
                if seen == pin {
                    Ok(ServerCertVerified::assertion())
                } else {
                    Err(rustls::Error::General(format!(
                        "server certificate fingerprint {} does not match the pinned {}",
                        format_fingerprint(&seen),
                        format_fingerprint(&pin)
                    )))
                }
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_both_spellings() {
        let fp = [0xabu8; 32];
        let shown = format_fingerprint(&fp);
        assert_eq!(parse_fingerprint(&shown).expect("colons"), fp);
        assert_eq!(parse_fingerprint(&shown.replace(':', "").to_lowercase()).expect("plain"), fp);
        assert!(parse_fingerprint("abc").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_created_certificate_is_persisted_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create_identity(&ServerTlsConfig::default(), dir.path()).expect("create");
        assert!(first.generated);
        let second = load_or_create_identity(&ServerTlsConfig::default(), dir.path()).expect("reuse");
        assert!(!second.generated);
        assert_eq!(first.fingerprint, second.fingerprint);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(GENERATED_KEY)).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn client_trust_must_be_explicit_and_unambiguous() {
        let none = ClientTlsConfig::default();
        assert!(matches!(client_config(&none, QUIC_ALPN), Err(TlsError::NoTrust)));
        let both =
            ClientTlsConfig { fingerprint: Some("00".repeat(32)), insecure_skip_verify: true, ..Default::default() };
        assert!(matches!(client_config(&both, QUIC_ALPN), Err(TlsError::ConflictingTrust)));
        let pinned = ClientTlsConfig { fingerprint: Some("00".repeat(32)), ..Default::default() };
        assert_eq!(client_config(&pinned, QUIC_ALPN).expect("pinned").1, TrustMode::Pinned);
    }

    #[test]
    fn half_configured_files_are_an_error() {
        let cfg = ServerTlsConfig { cert_file: Some("/x.pem".into()), ..Default::default() };
        assert!(matches!(load_or_create_identity(&cfg, Path::new("/tmp")), Err(TlsError::HalfConfigured { .. })));
    }
}
