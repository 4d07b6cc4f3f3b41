//! A minimal client for the two Kubernetes API calls the agent makes:
//! `LIST` and `WATCH` of the pods on this node.
//!
//! Why not the `kube` crate: it brings a large dependency tree (k8s-openapi
//! with every API type, tower middleware stacks, its own TLS and config
//! layers) for two GET requests. hyper, hyper-util, rustls and
//! tokio-rustls are already built for the transport crate, so this client
//! costs a few hundred lines and no new heavy dependency. It speaks
//! HTTP/1.1 over one fresh connection per call: a list happens at start and
//! after a watch expires, a watch lasts minutes, so pooling buys nothing.
//!
//! The service account token is re-read for every call because projected
//! tokens are rotated by the kubelet.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::pods::{PodList, WatchEvent};

/// Where an in-cluster pod finds its service account.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Largest list response accepted.
const MAX_LIST_BYTES: usize = 64 << 20;
/// Longest single watch event accepted.
const MAX_EVENT_BYTES: usize = 4 << 20;
/// Time allowed to connect and receive response headers.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed to receive a whole list response.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a Kubernetes API call failed.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// The service account files could not be read.
    #[error("cannot read the service account file {path}: {source}; is automountServiceAccountToken disabled?")]
    ServiceAccount {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The CA bundle holds no usable certificate.
    #[error("no usable CA certificate in {what}: {reason}")]
    BadCa {
        /// Which file or input.
        what: String,
        /// What was wrong.
        reason: String,
    },
    /// The API server URL is not `http(s)://host:port`.
    #[error("invalid API server address `{0}`: expected http(s)://host:port")]
    BadAddress(String),
    /// TCP connect, TLS handshake or HTTP exchange failed.
    #[error("request to the Kubernetes API at {url} failed: {reason}")]
    Request {
        /// The request URL (no token).
        url: String,
        /// What failed.
        reason: String,
    },
    /// The API answered with an error status.
    #[error("the Kubernetes API answered {status} to {url}: {body}; check the agent's RBAC (list and watch pods)")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The request URL.
        url: String,
        /// Start of the response body.
        body: String,
    },
    /// The resource version to watch from is too old: list again.
    #[error("the watch resource version expired (410 Gone); listing again")]
    Expired,
    /// A response body was not the JSON expected.
    #[error("cannot decode the Kubernetes API response from {url}: {source}")]
    Decode {
        /// The request URL.
        url: String,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// A response was larger than the agent accepts.
    #[error("the response from {url} exceeds {limit} bytes")]
    TooLarge {
        /// The request URL.
        url: String,
        /// The limit.
        limit: usize,
    },
}

#[derive(Clone, Debug)]
enum Scheme {
    Http,
    Https { tls: Arc<rustls::ClientConfig>, server_name: ServerName<'static> },
}

/// A client for the pods of one node.
#[derive(Clone, Debug)]
pub struct KubeClient {
    scheme: Scheme,
    host: String,
    port: u16,
    token_file: Option<PathBuf>,
    node: String,
}

impl KubeClient {
    /// The in-cluster client, from `KUBERNETES_SERVICE_HOST`/`_PORT` and the
    /// service account directory; `Ok(None)` outside Kubernetes.
    pub fn in_cluster(node: &str) -> Result<Option<KubeClient>, KubeError> {
        let Some(host) = std::env::var("KUBERNETES_SERVICE_HOST").ok().filter(|h| !h.is_empty()) else {
            return Ok(None);
        };
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        let dir = Path::new(SERVICE_ACCOUNT_DIR);
        let ca_path = dir.join("ca.crt");
        let ca =
            std::fs::read(&ca_path).map_err(|source| KubeError::ServiceAccount { path: ca_path.clone(), source })?;
        let token_file = dir.join("token");
        // Fail now, not at the first request, when the token is missing.
        std::fs::metadata(&token_file)
            .map_err(|source| KubeError::ServiceAccount { path: token_file.clone(), source })?;
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host };
        let url = format!("https://{host}:{port}");
        KubeClient::new(&url, Some(token_file), Some((&ca_path.display().to_string(), &ca)), node).map(Some)
    }

    /// A client for `base_url` (`http://` or `https://host:port`), with an
    /// optional bearer token file and CA bundle `(name, pem)` for https.
    pub fn new(
        base_url: &str,
        token_file: Option<PathBuf>,
        ca: Option<(&str, &[u8])>,
        node: &str,
    ) -> Result<KubeClient, KubeError> {
        let bad = || KubeError::BadAddress(base_url.to_owned());
        let (https, rest) = if let Some(r) = base_url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = base_url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad());
        };
        let rest = rest.trim_end_matches('/');
        let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(bad());
        }
        let scheme = if https {
            let (what, pem) =
                ca.ok_or_else(|| KubeError::BadCa { what: base_url.into(), reason: "none given".into() })?;
            let tls = tls_config(what, pem)?;
            let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
            Scheme::Https { tls, server_name }
        } else {
            Scheme::Http
        };
        Ok(KubeClient { scheme, host, port, token_file, node: node.to_owned() })
    }

    /// The node whose pods this client lists.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn pods_path(&self, watch: Option<(&str, u32)>) -> String {
        let selector = format!("spec.nodeName={}", self.node);
        let mut path = format!("/api/v1/pods?fieldSelector={}", percent_encode(&selector));
        if let Some((rv, timeout_s)) = watch {
            path.push_str(&format!(
                "&watch=true&allowWatchBookmarks=true&timeoutSeconds={timeout_s}&resourceVersion={}",
                percent_encode(rv)
            ));
        }
        path
    }

    /// `GET /api/v1/pods?fieldSelector=spec.nodeName=<node>`.
    pub async fn list_pods(&self) -> Result<PodList, KubeError> {
        let path = self.pods_path(None);
        let url = self.url(&path);
        let response = self.get(&path).await?;
        let body =
            tokio::time::timeout(LIST_TIMEOUT, read_limited(response.into_body(), &url)).await.map_err(|_| {
                KubeError::Request { url: url.clone(), reason: format!("no complete response in {LIST_TIMEOUT:?}") }
            })??;
        serde_json::from_slice(&body).map_err(|source| KubeError::Decode { url, source })
    }

    /// Starts a watch of this node's pods from `resource_version`; the server
    /// ends it after about `timeout_s` seconds.
    pub async fn watch_pods(&self, resource_version: &str, timeout_s: u32) -> Result<WatchStream, KubeError> {
        let path = self.pods_path(Some((resource_version, timeout_s)));
        let url = self.url(&path);
        let response = self.get(&path).await?;
        Ok(WatchStream { url, body: response.into_body(), buf: BytesMut::new() })
    }

    fn url(&self, path: &str) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https { .. } => "https",
        };
        format!("{scheme}://{}:{}{path}", self.host, self.port)
    }

    async fn get(&self, path: &str) -> Result<Response<Incoming>, KubeError> {
        let url = self.url(path);
        let fail = |reason: String| KubeError::Request { url: url.clone(), reason };
        let token = match &self.token_file {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .map_err(|source| KubeError::ServiceAccount { path: p.clone(), source })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let authority = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        let mut request = Request::get(path).header("host", format!("{authority}:{}", self.port));
        request = request.header("accept", "application/json").header("user-agent", "aperture-agent");
        if let Some(t) = token {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        let request = request.body(Empty::<Bytes>::new()).map_err(|e| fail(e.to_string()))?;
        let exchange = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(|e| fail(e.to_string()))?;
            // Latency matters more than throughput for these small requests.
            let _ = tcp.set_nodelay(true);
            match &self.scheme {
                Scheme::Http => send(tcp, request).await.map_err(fail),
                Scheme::Https { tls, server_name } => {
                    let connector = tokio_rustls::TlsConnector::from(Arc::clone(tls));
                    let stream = connector
                        .connect(server_name.clone(), tcp)
                        .await
                        .map_err(|e| fail(format!("TLS handshake: {e}")))?;
                    send(stream, request).await.map_err(fail)
                }
            }
        };
        let response = tokio::time::timeout(CONNECT_TIMEOUT, exchange)
            .await
            .map_err(|_| fail(format!("no response headers in {CONNECT_TIMEOUT:?}")))??;
        match response.status() {
            s if s.is_success() => Ok(response),
            StatusCode::GONE => Err(KubeError::Expired),
            status => {
                let body = read_limited(response.into_body(), &url).await.unwrap_or_default();
                let body = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
                Err(KubeError::Status { status, url, body })
            }
        }
    }
}

async fn send<S>(stream: S, request: Request<Empty<Bytes>>) -> Result<Response<Incoming>, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("Kubernetes API connection closed: {e}");
        }
    });
    sender.send_request(request).await.map_err(|e| e.to_string())
}

async fn read_limited(mut body: Incoming, url: &str) -> Result<Vec<u8>, KubeError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| KubeError::Request { url: url.to_owned(), reason: e.to_string() })?;
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_LIST_BYTES {
                return Err(KubeError::TooLarge { url: url.to_owned(), limit: MAX_LIST_BYTES });
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(out)
}

fn tls_config(what: &str, pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, KubeError> {
    let bad = |reason: String| KubeError::BadCa { what: what.to_owned(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| bad(e.to_string()))?;
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("no PEM certificate found".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What one line of a watch response held.
#[derive(Debug)]
pub enum WatchItem {
    /// A decoded event.
    Event(WatchEvent),
    /// A line that was not a watch event (counted and skipped).
    Malformed(String),
}

/// The events of one watch response, one JSON object per line.
#[derive(Debug)]
pub struct WatchStream {
    url: String,
    body: Incoming,
    buf: BytesMut,
}

impl WatchStream {
    /// The next event; `Ok(None)` when the server ended the watch.
    pub async fn next(&mut self) -> Result<Option<WatchItem>, KubeError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1);
                let line = &line[..pos];
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(parse_watch_line(line)));
            }
            if self.buf.len() > MAX_EVENT_BYTES {
                return Err(KubeError::TooLarge { url: self.url.clone(), limit: MAX_EVENT_BYTES });
            }
            match self.body.frame().await {
                None => {
                    // A last line without a newline still counts.
                    if self.buf.iter().all(u8::is_ascii_whitespace) {
                        return Ok(None);
                    }
                    let rest = self.buf.split();
                    return Ok(Some(parse_watch_line(&rest)));
                }
                Some(Err(e)) => return Err(KubeError::Request { url: self.url.clone(), reason: e.to_string() }),
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            self.buf.extend_from_slice(chunk);
                            let n = chunk.len();
                            data.advance(n);
                        }
                    }
                }
            }
        }
    }
}

fn parse_watch_line(line: &[u8]) -> WatchItem {
    match serde_json::from_slice::<WatchEvent>(line) {
        Ok(e) => WatchItem::Event(e),
        Err(e) => WatchItem::Malformed(format!("{e} in `{}`", String::from_utf8_lossy(&line[..line.len().min(120)]))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let c = KubeClient::new("http://127.0.0.1:6443", None, None, "n").expect("valid");
        assert_eq!(c.url("/x"), "http://127.0.0.1:6443/x");
        let c = KubeClient::new("http://[::1]:80/", None, None, "n").expect("valid");
        assert_eq!(c.host, "::1");
        for bad in ["127.0.0.1:6443", "http://host", "http://:80", "ftp://h:1", "http://h:99999"] {
            assert!(matches!(KubeClient::new(bad, None, None, "n"), Err(KubeError::BadAddress(_))), "{bad}");
        }
        let err = KubeClient::new("https://h:443", None, Some(("ca.crt", b"not pem")), "n").unwrap_err();
        assert_eq!(err.to_string(), "no usable CA certificate in ca.crt: no PEM certificate found");
    }

    #[test]
    fn node_selector_is_encoded() {
        let c = KubeClient::new("http://h:1", None, None, "worker-1.example").expect("valid");
        assert_eq!(c.pods_path(None), "/api/v1/pods?fieldSelector=spec.nodeName%3Dworker-1.example");
        assert_eq!(
            c.pods_path(Some(("42", 300))),
            "/api/v1/pods?fieldSelector=spec.nodeName%3Dworker-1.example&watch=true&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion=42"
        );
    }

    #[test]
    fn watch_lines() {
        assert!(matches!(
            parse_watch_line(br#"{"type":"ERROR","object":{"kind":"Status","code":410}}"#),
            WatchItem::Event(WatchEvent::Error(s)) if s.code == 410
        ));
        assert!(matches!(parse_watch_line(b"{\"type\":\"WHATEVER\",\"object\":{}}"), WatchItem::Malformed(_)));
        assert!(matches!(parse_watch_line(b"not json"), WatchItem::Malformed(_)));
    }
}
