//! The aggregator as a daemon: the validated configuration mapped onto the
//! aggregator's [`Settings`] and the transport's server configuration, and
//! the three parts — store and shards, HTTP, QUIC and gRPC ingress —
//! started and stopped together.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use aperture_core::config::AggregatorConfig;
use aperture_transport::auth::AuthConfig;
use aperture_transport::server::otlp::{OtlpServer, OtlpServerConfig, serve_otlp};
use aperture_transport::server::{ServerConfig, ServerHandle, ServerLimits, serve};
use aperture_transport::tls::ServerTlsConfig;

use crate::app::{Aggregator, AggregatorHandle};
use crate::settings::{ClickHouseSettings, HttpLimits, OtlpExportSettings, Settings};

/// Maps the configuration onto the aggregator's settings.
pub fn settings(config: &AggregatorConfig) -> anyhow::Result<Settings> {
    let mut s = Settings::new(config.data_dir.clone());
    s.http_listen = listen(&config.listen.http, "listen.http")?;
    let pyroscope = &config.pyroscope.listen;
    s.pyroscope_listen = if pyroscope.is_empty() { None } else { Some(listen(pyroscope, "pyroscope.listen")?) };
    s.auth_token = config.auth.read().map(str::to_owned);
    s.ingest_token = config.auth.ingest().map(str::to_owned);
    s.buffer_capacity_bytes = config.buffer.capacity.as_usize();
    s.high_water_percent = config.buffer.high_water_percent.0;
    s.shards = config.shards;
    s.window = config.window.0;
    s.flush_max_rows = config.flush.max_rows;
    s.flush_max_age = config.flush.max_age.0;
    s.retention = config.retention.0;
    s.http_limits = HttpLimits {
        request_timeout: config.limits.http_request_timeout.0,
        header_read_timeout: config.limits.http_header_timeout.0,
        max_connections: config.limits.http_max_connections,
        max_query_range: config.limits.http_max_query_range.0,
        ..HttpLimits::default()
    };
    s.max_frame_bytes = config.limits.max_frame_size.as_usize();
    s.max_stack_frames = config.limits.max_stack_frames;
    let export = &config.otlp.export;
    s.otlp_export = (!export.endpoint.is_empty()).then(|| OtlpExportSettings {
        token: export.token.expose().to_owned(),
        queue_batches: export.queue,
        timeout: export.timeout.0,
        ..OtlpExportSettings::new(export.endpoint.clone())
    });
    let ch = &config.clickhouse;
    s.clickhouse = (!ch.endpoint.is_empty()).then(|| ClickHouseSettings {
        database: ch.database.clone(),
        user: ch.user.clone(),
        password: ch.password.expose().to_owned(),
        cluster: (!ch.cluster.is_empty()).then(|| ch.cluster.clone()),
        max_query_time: config.limits.http_request_timeout.0,
        request_timeout: ch.request_timeout.0,
        ..ClickHouseSettings::new(ch.endpoint.clone())
    });
    Ok(s)
}

/// Maps the configuration onto the transport server's.
pub fn server_config(config: &AggregatorConfig) -> anyhow::Result<ServerConfig> {
    let limits = ServerLimits {
        max_frame_bytes: u32::try_from(config.limits.max_frame_size.0).unwrap_or(u32::MAX),
        max_connections: config.limits.max_connections,
        max_unauthenticated: config.limits.max_unauthenticated,
        idle_timeout_ms: u64::try_from(config.limits.idle_timeout.0.as_millis()).unwrap_or(u64::MAX),
        parked_bytes: config.limits.max_parked_size.0,
        ..ServerLimits::default()
    };
    Ok(ServerConfig {
        quic_listen: Some(listen(&config.listen.quic, "listen.quic")?),
        grpc_listen: Some(listen(&config.listen.grpc, "listen.grpc")?),
        auth: AuthConfig { token: config.auth.ingest().map(str::to_owned), disabled: config.auth.disabled },
        tls: ServerTlsConfig {
            cert_file: config.tls.cert_file.clone(),
            key_file: config.tls.key_file.clone(),
            names: Vec::new(),
            insecure_plaintext: config.tls.insecure_plaintext,
        },
        data_dir: config.data_dir.clone(),
        limits,
    })
}

/// The OTLP gRPC listener's configuration; `None` when `otlp.grpc_listen` is empty.
pub fn otlp_config(config: &AggregatorConfig) -> anyhow::Result<Option<OtlpServerConfig>> {
    if config.otlp.grpc_listen.is_empty() {
        return Ok(None);
    }
    let server = server_config(config)?;
    Ok(Some(OtlpServerConfig {
        listen: listen(&config.otlp.grpc_listen, "otlp.grpc_listen")?,
        auth: server.auth,
        tls: server.tls,
        data_dir: server.data_dir,
        // The limit of pushed profiles, after decompression.
        max_message_bytes: HttpLimits::default().max_push_body_bytes,
        max_concurrent_streams: 64,
        max_connections: config.limits.max_connections,
        idle_timeout: config.limits.idle_timeout.0,
    }))
}

fn listen(addr: &str, key: &str) -> anyhow::Result<SocketAddr> {
    addr.parse().with_context(|| format!("`{key}`: invalid listen address `{addr}`: expected ip:port"))
}

/// A running aggregator with its ingress carriers.
#[derive(Debug)]
pub struct Daemon {
    aggregator: AggregatorHandle,
    server: Arc<ServerHandle>,
    otlp: Option<OtlpServer>,
}

impl Daemon {
    /// Opens the store, starts shards, writer and HTTP, then the carriers.
    pub async fn start(config: &AggregatorConfig) -> anyhow::Result<Daemon> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
        let aggregator = Aggregator::start(settings(config)?).await?;
        let server = match serve(server_config(config)?, aggregator.ingress()).await {
            Ok(server) => server,
            Err(e) => {
                let _ = aggregator.shutdown().await;
                return Err(anyhow::Error::new(e).context("starting the ingress"));
            }
        };
        aggregator.set_acker(Arc::new(server.acker()));
        let otlp = match otlp_config(config) {
            Ok(None) => None,
            Ok(Some(c)) => match serve_otlp(c, aggregator.otlp_sink()).await {
                Ok(s) => Some(s),
                Err(e) => {
                    server.shutdown(Duration::from_secs(1)).await;
                    let _ = aggregator.shutdown().await;
                    return Err(anyhow::Error::new(e).context("starting the OTLP gRPC listener (otlp.grpc_listen)"));
                }
            },
            Err(e) => {
                server.shutdown(Duration::from_secs(1)).await;
                let _ = aggregator.shutdown().await;
                return Err(e);
            }
        };
        let server = Arc::new(server);
        let stats = Arc::downgrade(&server);
        aggregator.metrics().set_transport_stats(Box::new(move || stats.upgrade().map(|s| s.stats())));
        tracing::info!(
            http = %aggregator.http_addr(),
            pyroscope = ?aggregator.pyroscope_addr(),
            quic = ?server.quic_addr(),
            grpc = ?server.grpc_addr(),
            otlp_grpc = ?otlp.as_ref().map(OtlpServer::addr),
            store = aggregator.store().kind().as_str(),
            tls_fingerprint_sha256 = %server.fingerprint(),
            "aggregator started"
        );
        Ok(Daemon { aggregator, server, otlp })
    }

    /// The HTTP address (UI, API, metrics, health).
    pub fn http_addr(&self) -> SocketAddr {
        self.aggregator.http_addr()
    }

    /// The QUIC (UDP) ingress address.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.server.quic_addr()
    }

    /// The gRPC (TCP) ingress address.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.server.grpc_addr()
    }

    /// The OTLP gRPC listener's address, when `otlp.grpc_listen` is set.
    pub fn otlp_grpc_addr(&self) -> Option<SocketAddr> {
        self.otlp.as_ref().map(OtlpServer::addr)
    }

    /// SHA-256 fingerprint of the ingress certificate, as agents pin it.
    pub fn fingerprint(&self) -> String {
        self.server.fingerprint()
    }

    /// The aggregator part (ingress, store, buffer).
    pub fn aggregator(&self) -> &AggregatorHandle {
        &self.aggregator
    }

    /// Stops accepting agents, then drains shards and writer into the store.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        if let Some(otlp) = self.otlp {
            otlp.shutdown().await;
        }
        // `/metrics` holds the server only while it reads its counters.
        let mut server = self.server;
        let server = loop {
            match Arc::try_unwrap(server) {
                Ok(s) => break s,
                Err(still_shared) => {
                    server = still_shared;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        server.shutdown(Duration::from_secs(5)).await;
        self.aggregator.shutdown().await
    }
}

/// Runs the aggregator until `shutdown` completes: `aperture aggregator`.
pub async fn run_aggregator(config: AggregatorConfig, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let daemon = Daemon::start(&config).await?;
    shutdown.await;
    tracing::info!("shutting down: draining buffered data into the store");
    daemon.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use aperture_core::config::{FlagValue, load};

    fn config(vars: &[(&str, &str)]) -> AggregatorConfig {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env = move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        load::<AggregatorConfig>(None, &env, &[FlagValue::new("--data-dir", "data_dir", "/tmp/x")]).expect("valid")
    }

    #[test]
    fn deployment_env_reaches_settings_and_server() {
        let c = config(&[
            ("APERTURE_AUTH_TOKEN", "tok"),
            ("APERTURE_CLICKHOUSE_ENDPOINT", "http://ch:8123"),
            ("APERTURE_CLICKHOUSE_DATABASE", "prof"),
            ("APERTURE_CLICKHOUSE_PASSWORD", "pw"),
            ("APERTURE_BUFFER_CAPACITY", "64MiB"),
        ]);
        let s = settings(&c).expect("settings");
        assert_eq!(s.auth_token.as_deref(), Some("tok"));
        assert_eq!(s.buffer_capacity_bytes, 64 << 20);
        let ch = s.clickhouse.expect("clickhouse selected");
        assert_eq!(
            (ch.endpoint.as_str(), ch.database.as_str(), ch.password.as_str()),
            ("http://ch:8123", "prof", "pw")
        );
        assert_eq!(ch.cluster, None, "one server unless a cluster is named");
        assert_eq!(s.http_listen.port(), 9090);
        let srv = server_config(&c).expect("server");
        assert_eq!(srv.auth.token.as_deref(), Some("tok"));
        assert_eq!(srv.quic_listen.map(|a| a.port()), Some(50051));
        assert_eq!(srv.grpc_listen.map(|a| a.port()), Some(50051));
        assert_eq!(srv.data_dir, std::path::PathBuf::from("/tmp/x"));
    }

    #[test]
    fn pyroscope_port_is_off_unless_configured() {
        assert_eq!(settings(&config(&[("APERTURE_AUTH_TOKEN", "tok")])).expect("settings").pyroscope_listen, None);
        let c = config(&[("APERTURE_AUTH_TOKEN", "tok"), ("APERTURE_PYROSCOPE_LISTEN", "0.0.0.0:4040")]);
        assert_eq!(settings(&c).expect("settings").pyroscope_listen.map(|a| a.port()), Some(4040));
        let vars =
            [("APERTURE_AUTH_TOKEN".to_owned(), "t".to_owned()), ("APERTURE_PYROSCOPE_LISTEN".into(), "4040".into())];
        let env = move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let err = load::<AggregatorConfig>(None, &env, &[]).expect_err("not an address");
        assert!(err.to_string().contains("pyroscope.listen"), "{err}");
    }

    #[test]
    fn client_limits_reach_the_shards_and_the_transport() {
        let mut c = config(&[("APERTURE_AUTH_TOKEN", "tok")]);
        c.limits.max_unauthenticated = 7;
        c.limits.max_parked_size = aperture_core::config::ByteSize::mib(9);
        c.limits.max_stack_frames = 200;
        assert_eq!(settings(&c).expect("settings").max_stack_frames, 200);
        let limits = server_config(&c).expect("server").limits;
        assert_eq!((limits.max_unauthenticated, limits.parked_bytes), (7, 9 << 20));
    }

    #[test]
    fn ingest_and_read_tokens_go_to_their_own_side() {
        let c = config(&[("APERTURE_INGEST_TOKEN", "push"), ("APERTURE_READ_TOKEN", "read")]);
        assert_eq!(settings(&c).expect("settings").auth_token.as_deref(), Some("read"));
        assert_eq!(server_config(&c).expect("server").auth.token.as_deref(), Some("push"));
        // A role without its own token takes the shared one.
        let c = config(&[("APERTURE_AUTH_TOKEN", "shared"), ("APERTURE_READ_TOKEN", "read")]);
        assert_eq!(settings(&c).expect("settings").auth_token.as_deref(), Some("read"));
        assert_eq!(server_config(&c).expect("server").auth.token.as_deref(), Some("shared"));
    }

    #[test]
    fn the_otlp_listener_runs_only_when_configured() {
        assert!(otlp_config(&config(&[("APERTURE_AUTH_TOKEN", "t")])).expect("valid").is_none());
        let c = config(&[
            ("APERTURE_INGEST_TOKEN", "push"),
            ("APERTURE_READ_TOKEN", "r"),
            ("APERTURE_OTLP_GRPC_LISTEN", "127.0.0.1:4317"),
        ]);
        let o = otlp_config(&c).expect("valid").expect("configured");
        assert_eq!(o.listen.port(), 4317);
        assert_eq!(o.auth.token.as_deref(), Some("push"), "OTLP senders present the ingest token");
    }

    #[test]
    fn a_named_clickhouse_cluster_reaches_the_store() {
        let c = config(&[
            ("APERTURE_AUTH_TOKEN", "t"),
            ("APERTURE_CLICKHOUSE_ENDPOINT", "http://ch:8123"),
            ("APERTURE_CLICKHOUSE_CLUSTER", "fleet"),
        ]);
        let ch = settings(&c).expect("settings").clickhouse.expect("clickhouse selected");
        assert_eq!(ch.cluster.as_deref(), Some("fleet"));
    }

    #[test]
    fn no_endpoint_selects_the_embedded_store() {
        let s = settings(&config(&[("APERTURE_AUTH_TOKEN", "t")])).expect("settings");
        assert!(s.clickhouse.is_none());
    }
}
