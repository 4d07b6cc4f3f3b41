//! Configuration of `aperture aggregator`. Every key, its default and its env
//! var are listed in `docs/configuration.md`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::load::Layered;
use super::values::{ByteSize, HumanDuration, Percent, Secret};

/// Configuration of the aggregator.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AggregatorConfig {
    /// Listening addresses.
    pub listen: Listen,
    /// Authentication of agents and API clients.
    pub auth: Auth,
    /// Directory for the embedded store, the generated TLS certificate and state.
    pub data_dir: PathBuf,
    /// In-memory buffering between ingress and storage.
    pub buffer: BufferSettings,
    /// Number of aggregation shards; 0 means one per CPU core.
    pub shards: usize,
    /// Width of an aggregation window: samples are stored per window.
    pub window: HumanDuration,
    /// When shards hand their rows to the writer.
    pub flush: FlushSettings,
    /// ClickHouse store; without an endpoint the embedded store is used.
    pub clickhouse: ClickHouse,
    /// How long data is kept.
    pub retention: HumanDuration,
    /// TLS certificate for QUIC (and gRPC when enabled).
    pub tls: Tls,
    /// Limits on what clients may send.
    pub limits: Limits,
    /// Pyroscope's own port.
    pub pyroscope: Pyroscope,
    /// OpenTelemetry (OTLP) profiles.
    pub otlp: Otlp,
}

/// Pyroscope compatibility.
#[derive(Clone, Debug, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pyroscope {
    /// A second HTTP address serving only Pyroscope's routes (the SDKs'
    /// ingest and push, the querier, render), usually `0.0.0.0:4040`
    /// (`APERTURE_PYROSCOPE_LISTEN`). Empty: off; they are always on the
    /// HTTP port.
    pub listen: String,
}

impl Default for AggregatorConfig {
    fn default() -> Self {
        AggregatorConfig {
            listen: Listen::default(),
            auth: Auth::default(),
            data_dir: PathBuf::from("/var/lib/aperture"),
            buffer: BufferSettings::default(),
            shards: 0,
            window: HumanDuration::secs(10),
            flush: FlushSettings::default(),
            clickhouse: ClickHouse::default(),
            retention: HumanDuration::secs(7 * 86_400),
            tls: Tls::default(),
            limits: Limits::default(),
            pyroscope: Pyroscope::default(),
            otlp: Otlp::default(),
        }
    }
}

/// Listening addresses.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// gRPC ingress (TCP).
    pub grpc: String,
    /// QUIC ingress (UDP).
    pub quic: String,
    /// HTTP: REST API, UI, `/metrics`, `/healthz`, `/readyz`.
    pub http: String,
}

impl Default for Listen {
    fn default() -> Self {
        Listen { grpc: "0.0.0.0:50051".into(), quic: "0.0.0.0:50051".into(), http: "0.0.0.0:9090".into() }
    }
}

/// OpenTelemetry (OTLP) profiles, in and out.
#[derive(Clone, Debug, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Otlp {
    /// Address of the OTLP gRPC listener (`ProfilesService/Export`), e.g.
    /// `0.0.0.0:4317`; empty: not served (OTLP/HTTP on the HTTP port always is).
    pub grpc_listen: String,
    /// Forwarding what is committed to an OTLP profiles endpoint.
    pub export: OtlpExport,
}

/// Forwarding committed profiles to an OTLP endpoint.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpExport {
    /// `http://host:4317`; empty: no export.
    pub endpoint: String,
    /// Bearer token sent to the endpoint; empty: none.
    pub token: Secret,
    /// Committed batches waiting to be sent; more are dropped and counted.
    pub queue: usize,
    /// Timeout of one send.
    pub timeout: HumanDuration,
}

impl Default for OtlpExport {
    fn default() -> Self {
        OtlpExport { endpoint: String::new(), token: Secret::default(), queue: 256, timeout: HumanDuration::secs(10) }
    }
}

/// Authentication. One shared token serves agents and API clients; a
/// role's own token, when set, replaces the shared one for that role.
#[derive(Clone, Debug, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// Bearer token agents and API clients must present (`APERTURE_AUTH_TOKEN`).
    pub token: Secret,
    /// Token agents must present to push data (`APERTURE_INGEST_TOKEN`); empty: `token`.
    pub ingest_token: Secret,
    /// Token API clients must present to read profiles (`APERTURE_READ_TOKEN`); empty: `token`.
    pub read_token: Secret,
    /// Run without authentication. Must be set explicitly when no token is configured.
    pub disabled: bool,
}

impl Auth {
    /// The token agents must present: `ingest_token`, else `token`; `None`
    /// when neither is set or authentication is disabled.
    pub fn ingest(&self) -> Option<&str> {
        self.role_token(&self.ingest_token)
    }

    /// The token API clients must present: `read_token`, else `token`;
    /// `None` when neither is set or authentication is disabled.
    pub fn read(&self) -> Option<&str> {
        self.role_token(&self.read_token)
    }

    fn role_token<'a>(&'a self, own: &'a Secret) -> Option<&'a str> {
        if self.disabled {
            return None;
        }
        [own, &self.token].into_iter().find(|t| !t.is_empty()).map(|t| t.expose())
    }
}

/// In-memory buffering.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BufferSettings {
    /// Upper bound on buffered data (`APERTURE_BUFFER_CAPACITY`), with a unit.
    pub capacity: ByteSize,
    /// Above this share of the capacity, agents get no more credit and `/readyz` answers 503.
    pub high_water_percent: Percent,
}

impl Default for BufferSettings {
    fn default() -> Self {
        BufferSettings { capacity: ByteSize::mib(256), high_water_percent: Percent(80) }
    }
}

/// Flush policy of the shards.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlushSettings {
    /// Hand rows to the writer once a shard holds this many.
    pub max_rows: usize,
    /// Hand rows to the writer at the latest this long after they arrived.
    pub max_age: HumanDuration,
}

impl Default for FlushSettings {
    fn default() -> Self {
        FlushSettings { max_rows: 50_000, max_age: HumanDuration::millis(200) }
    }
}

/// ClickHouse connection.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouse {
    /// HTTP URL, e.g. `http://clickhouse:8123` (`APERTURE_CLICKHOUSE_ENDPOINT`). Empty: use the embedded store.
    pub endpoint: String,
    /// Database, created if missing (`APERTURE_CLICKHOUSE_DATABASE`).
    pub database: String,
    /// User.
    pub user: String,
    /// Password (`APERTURE_CLICKHOUSE_PASSWORD`).
    pub password: Secret,
    /// Cluster name from the server's `remote_servers` (`APERTURE_CLICKHOUSE_CLUSTER`).
    /// Empty: one server. Set: every table is created `ON CLUSTER` as a
    /// replicated local table with a `Distributed` table in front.
    pub cluster: String,
    /// Time one request to ClickHouse may take (30s): a write past it is
    /// retried, and a samples insert past it has its own answer awaited first.
    pub request_timeout: HumanDuration,
}

impl Default for ClickHouse {
    fn default() -> Self {
        ClickHouse {
            endpoint: String::new(),
            database: "aperture".into(),
            user: "default".into(),
            password: Secret::default(),
            cluster: String::new(),
            request_timeout: HumanDuration::secs(30),
        }
    }
}

/// TLS material.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// Certificate chain (PEM). Without it a self-signed certificate is created in `data_dir`.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM).
    pub key_file: Option<PathBuf>,
    /// gRPC is served with TLS. Always on unless `insecure_plaintext`;
    /// `false` alone is refused.
    pub grpc: bool,
    /// Serve gRPC without TLS: agents' tokens and profiles cross the network
    /// in cleartext. Only where something else encrypts (a service mesh).
    pub insecure_plaintext: bool,
}

impl Default for Tls {
    fn default() -> Self {
        Tls { cert_file: None, key_file: None, grpc: true, insecure_plaintext: false }
    }
}

/// Bounds of `limits.max_stack_frames`: shallower would cut real stacks,
/// deeper lets one stack cost a query megabytes.
const MIN_STACK_FRAMES: usize = 64;
const MAX_STACK_FRAMES: usize = 16_384;

/// Limits on clients.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame accepted.
    pub max_frame_size: ByteSize,
    /// Most bytes of frames held, all agents together, while the pipeline
    /// is too busy to take them. An agent whose frame does not fit is
    /// disconnected and sends it again after reconnecting.
    pub max_parked_size: ByteSize,
    /// Most agent connections at once, per carrier.
    pub max_connections: usize,
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: HumanDuration,
    /// Longest time an HTTP request may take.
    pub http_request_timeout: HumanDuration,
    /// An HTTP connection that has not sent a complete request head within
    /// this time (also while idle between requests) is closed.
    pub http_header_timeout: HumanDuration,
    /// Most HTTP connections served at once; more are answered 503 and closed.
    pub http_max_connections: usize,
    /// Longest time range one query may cover.
    pub http_max_query_range: HumanDuration,
    /// Most connections, both carriers together, still in their TLS
    /// handshake or hello; more are refused at once.
    pub max_unauthenticated: usize,
    /// Deepest stack kept: frames past it are cut, leaf side kept, and the
    /// cut is counted.
    pub max_stack_frames: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: ByteSize::mib(4),
            max_parked_size: ByteSize::mib(64),
            max_connections: 4096,
            idle_timeout: HumanDuration::secs(60),
            http_request_timeout: HumanDuration::secs(30),
            http_header_timeout: HumanDuration::secs(10),
            http_max_connections: 1024,
            http_max_query_range: HumanDuration::secs(31 * 86_400),
            max_unauthenticated: 1024,
            max_stack_frames: crate::shard::DEFAULT_MAX_STACK_FRAMES,
        }
    }
}

impl Layered for AggregatorConfig {
    const ENV: &'static [(&'static str, &'static str)] = &[
        ("APERTURE_AUTH_TOKEN", "auth.token"),
        ("APERTURE_INGEST_TOKEN", "auth.ingest_token"),
        ("APERTURE_READ_TOKEN", "auth.read_token"),
        ("APERTURE_CLICKHOUSE_ENDPOINT", "clickhouse.endpoint"),
        ("APERTURE_CLICKHOUSE_DATABASE", "clickhouse.database"),
        ("APERTURE_CLICKHOUSE_USER", "clickhouse.user"),
        ("APERTURE_CLICKHOUSE_PASSWORD", "clickhouse.password"),
        ("APERTURE_CLICKHOUSE_CLUSTER", "clickhouse.cluster"),
        ("APERTURE_BUFFER_CAPACITY", "buffer.capacity"),
        ("APERTURE_DATA_DIR", "data_dir"),
        ("APERTURE_PYROSCOPE_LISTEN", "pyroscope.listen"),
        ("APERTURE_OTLP_GRPC_LISTEN", "otlp.grpc_listen"),
        ("APERTURE_OTLP_EXPORT_ENDPOINT", "otlp.export.endpoint"),
        ("APERTURE_OTLP_EXPORT_TOKEN", "otlp.export.token"),
    ];

    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "auth.token" => self.auth.token = Secret(value.to_owned()),
            "auth.ingest_token" => self.auth.ingest_token = Secret(value.to_owned()),
            "auth.read_token" => self.auth.read_token = Secret(value.to_owned()),
            "auth.disabled" => {
                self.auth.disabled =
                    value.parse().map_err(|_| format!("invalid value `{value}`: expected true or false"))?
            }
            "clickhouse.endpoint" => self.clickhouse.endpoint = value.to_owned(),
            "clickhouse.database" => self.clickhouse.database = value.to_owned(),
            "clickhouse.user" => self.clickhouse.user = value.to_owned(),
            "clickhouse.password" => self.clickhouse.password = Secret(value.to_owned()),
            "clickhouse.cluster" => self.clickhouse.cluster = value.to_owned(),
            "buffer.capacity" => self.buffer.capacity = value.parse()?,
            "data_dir" => self.data_dir = PathBuf::from(value),
            "listen.grpc" => self.listen.grpc = value.to_owned(),
            "listen.quic" => self.listen.quic = value.to_owned(),
            "listen.http" => self.listen.http = value.to_owned(),
            "otlp.grpc_listen" => self.otlp.grpc_listen = value.to_owned(),
            "otlp.export.endpoint" => self.otlp.export.endpoint = value.to_owned(),
            "otlp.export.token" => self.otlp.export.token = Secret(value.to_owned()),
            "retention" => self.retention = value.parse()?,
            "pyroscope.listen" => self.pyroscope.listen = value.to_owned(),
            other => return Err(format!("`{other}` cannot be set from the command line or environment")),
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if !self.auth.disabled {
            let (shared, ingest, read) =
                (self.auth.token.is_empty(), self.auth.ingest_token.is_empty(), self.auth.read_token.is_empty());
            if shared && ingest && read {
                return Err((
                    "auth.token".into(),
                    "no token configured: set APERTURE_AUTH_TOKEN (or auth.token), or set auth.disabled: true to accept unauthenticated agents".into(),
                ));
            }
            if shared && (ingest || read) {
                let (key, var) = if ingest {
                    ("auth.ingest_token", "APERTURE_INGEST_TOKEN")
                } else {
                    ("auth.read_token", "APERTURE_READ_TOKEN")
                };
                return Err((
                    key.into(),
                    format!(
                        "no {key} configured while the other role has its own token: set {var} (or {key}), or the shared APERTURE_AUTH_TOKEN"
                    ),
                ));
            }
        }
        if self.limits.http_max_connections == 0 {
            return Err(("limits.http_max_connections".into(), "must be at least 1".into()));
        }
        if self.limits.http_header_timeout.0.is_zero() {
            return Err(("limits.http_header_timeout".into(), "must be longer than 0s, e.g. 10s".into()));
        }
        if self.limits.http_max_query_range.0.as_secs() == 0 {
            return Err(("limits.http_max_query_range".into(), "must be at least 1s, e.g. 31d".into()));
        }
        if self.limits.max_parked_size.0 < self.limits.max_frame_size.0 {
            return Err((
                "limits.max_parked_size".into(),
                format!(
                    "must hold at least one frame of limits.max_frame_size ({}), e.g. 64MiB",
                    self.limits.max_frame_size
                ),
            ));
        }
        if self.limits.max_unauthenticated == 0 {
            return Err(("limits.max_unauthenticated".into(), "must be at least 1, e.g. 1024".into()));
        }
        if !(MIN_STACK_FRAMES..=MAX_STACK_FRAMES).contains(&self.limits.max_stack_frames) {
            return Err((
                "limits.max_stack_frames".into(),
                format!("must be between {MIN_STACK_FRAMES} and {MAX_STACK_FRAMES}, e.g. 1024"),
            ));
        }
        let export = &self.otlp.export;
        if !export.endpoint.is_empty() && !export.endpoint.starts_with("http://") {
            return Err((
                "otlp.export.endpoint".into(),
                format!(
                    "`{}`: only plaintext http://host:port endpoints are supported, e.g. http://otel-collector:4317",
                    export.endpoint
                ),
            ));
        }
        if export.queue == 0 || export.timeout.0.is_zero() {
            return Err(("otlp.export".into(), "queue and timeout must be above zero, e.g. 256 and 10s".into()));
        }
        let otlp = ("otlp.grpc_listen", &self.otlp.grpc_listen);
        for (key, addr) in
            [("listen.grpc", &self.listen.grpc), ("listen.quic", &self.listen.quic), ("listen.http", &self.listen.http)]
                .into_iter()
                .chain(Some(otlp).filter(|(_, a)| !a.is_empty()))
        {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err((
                    key.into(),
                    format!("invalid listen address `{addr}`: expected ip:port, e.g. 0.0.0.0:9090"),
                ));
            }
        }
        let pyroscope = &self.pyroscope.listen;
        if !pyroscope.is_empty() && pyroscope.parse::<std::net::SocketAddr>().is_err() {
            return Err((
                "pyroscope.listen".into(),
                format!("invalid listen address `{pyroscope}`: expected ip:port, e.g. 0.0.0.0:4040, or empty for none"),
            ));
        }
        let ch = &self.clickhouse;
        if !ch.endpoint.is_empty() && !ch.endpoint.starts_with("http://") && !ch.endpoint.starts_with("https://") {
            return Err((
                "clickhouse.endpoint".into(),
                format!(
                    "invalid endpoint `{}`: expected the HTTP URL of ClickHouse, e.g. http://clickhouse:8123",
                    ch.endpoint
                ),
            ));
        }
        if ch.database.is_empty() || !ch.database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err((
                "clickhouse.database".into(),
                format!("invalid database name `{}`: use letters, digits and underscores", ch.database),
            ));
        }
        let timeout = ch.request_timeout.0;
        if timeout < Duration::from_secs(1) || timeout > Duration::from_secs(600) {
            return Err((
                "clickhouse.request_timeout".into(),
                format!(
                    "{} is out of range: use 1s to 10m, e.g. 30s (longer than the server takes to commit a large insert under load)",
                    ch.request_timeout
                ),
            ));
        }
        if !ch.cluster.is_empty() {
            let mut chars = ch.cluster.chars();
            let identifier = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !identifier {
                return Err((
                    "clickhouse.cluster".into(),
                    format!(
                        "invalid cluster name `{}`: use the name of a cluster in the servers' remote_servers, made of letters, digits and underscores and not starting with a digit, e.g. aperture",
                        ch.cluster
                    ),
                ));
            }
            if ch.endpoint.is_empty() {
                return Err((
                    "clickhouse.cluster".into(),
                    format!(
                        "cluster `{}` is set but clickhouse.endpoint is empty: set APERTURE_CLICKHOUSE_ENDPOINT to a server of the cluster, or unset the cluster",
                        ch.cluster
                    ),
                ));
            }
        }
        if !self.tls.grpc && !self.tls.insecure_plaintext {
            return Err((
                "tls.grpc".into(),
                "false does not turn TLS off: gRPC is always served with TLS unless tls.insecure_plaintext is true (which lets agents send their token in cleartext)".into(),
            ));
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return Err(("tls".into(), "cert_file and key_file must be given together".into()));
        }
        if self.buffer.capacity < ByteSize::mib(1) {
            return Err(("buffer.capacity".into(), format!("{} is too small: at least 1MiB", self.buffer.capacity)));
        }
        if self.flush.max_rows == 0 {
            return Err(("flush.max_rows".into(), "must be at least 1".into()));
        }
        if self.window.0.as_secs() == 0 || self.window.0.subsec_nanos() != 0 {
            return Err(("window".into(), format!("{} must be a whole number of seconds, at least 1s", self.window)));
        }
        if self.retention.0 < self.window.0 {
            return Err((
                "retention".into(),
                format!("{} is shorter than the window ({})", self.retention, self.window),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load;

    fn load_env(vars: &[(&str, &str)]) -> Result<AggregatorConfig, String> {
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let env = move |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        load::<AggregatorConfig>(None, &env, &[]).map_err(|e| e.to_string())
    }

    #[test]
    fn each_role_takes_its_own_token_or_the_shared_one() {
        let c = load_env(&[("APERTURE_AUTH_TOKEN", "shared")]).expect("valid");
        assert_eq!((c.auth.ingest(), c.auth.read()), (Some("shared"), Some("shared")));
        let c = load_env(&[("APERTURE_INGEST_TOKEN", "push"), ("APERTURE_READ_TOKEN", "read")]).expect("valid");
        assert_eq!((c.auth.ingest(), c.auth.read()), (Some("push"), Some("read")));
        let c = load_env(&[("APERTURE_AUTH_TOKEN", "shared"), ("APERTURE_INGEST_TOKEN", "push")]).expect("valid");
        assert_eq!((c.auth.ingest(), c.auth.read()), (Some("push"), Some("shared")));
    }

    #[test]
    fn a_role_left_without_any_token_is_refused_by_name() {
        let e = load_env(&[("APERTURE_INGEST_TOKEN", "push")]).unwrap_err();
        assert!(e.contains("auth.read_token") && e.contains("APERTURE_READ_TOKEN"), "{e}");
        let e = load_env(&[("APERTURE_READ_TOKEN", "read")]).unwrap_err();
        assert!(e.contains("auth.ingest_token"), "{e}");
    }

    #[test]
    fn a_clickhouse_cluster_name_is_an_identifier_next_to_an_endpoint() {
        let endpoint = ("APERTURE_CLICKHOUSE_ENDPOINT", "http://ch:8123");
        let c = load_env(&[("APERTURE_AUTH_TOKEN", "t"), endpoint, ("APERTURE_CLICKHOUSE_CLUSTER", "fleet_2")])
            .expect("valid");
        assert_eq!(c.clickhouse.cluster, "fleet_2");
        assert_eq!(load_env(&[("APERTURE_AUTH_TOKEN", "t")]).expect("valid").clickhouse.cluster, "", "one server");
        for bad in ["2fleet", "fleet-a", "a b", "x;DROP"] {
            let e =
                load_env(&[("APERTURE_AUTH_TOKEN", "t"), endpoint, ("APERTURE_CLICKHOUSE_CLUSTER", bad)]).unwrap_err();
            assert!(e.contains("`clickhouse.cluster`") && e.contains(bad), "{bad}: {e}");
        }
        let e = load_env(&[("APERTURE_AUTH_TOKEN", "t"), ("APERTURE_CLICKHOUSE_CLUSTER", "fleet")]).unwrap_err();
        assert!(e.contains("`clickhouse.cluster`") && e.contains("clickhouse.endpoint"), "{e}");
    }

    #[test]
    fn a_clickhouse_request_timeout_is_read_from_the_file_and_kept_in_range() {
        let file = |timeout: &str| {
            let yaml =
                format!("auth:\n  token: t\nclickhouse:\n  endpoint: http://ch:8123\n  request_timeout: {timeout}\n");
            load::<AggregatorConfig>(Some(("aggregator.yaml", &yaml)), &|_| None, &[]).map_err(|e| e.to_string())
        };
        assert_eq!(file("2m").expect("valid").clickhouse.request_timeout.0, Duration::from_secs(120));
        assert_eq!(
            load_env(&[("APERTURE_AUTH_TOKEN", "t")]).expect("valid").clickhouse.request_timeout.0,
            Duration::from_secs(30)
        );
        for bad in ["0s", "500ms", "11m"] {
            let e = file(bad).unwrap_err();
            assert!(e.contains("`clickhouse.request_timeout`") && e.contains("1s to 10m"), "{bad}: {e}");
        }
    }

    #[test]
    fn grpc_is_served_in_plaintext_only_when_asked_by_name() {
        let mut c =
            AggregatorConfig { auth: Auth { disabled: true, ..Auth::default() }, ..AggregatorConfig::default() };
        assert!(c.tls.grpc && !c.tls.insecure_plaintext, "TLS by default");
        assert!(c.validate().is_ok());
        c.tls.grpc = false;
        let (key, why) = c.validate().expect_err("tls.grpc: false alone is refused");
        assert_eq!(key, "tls.grpc");
        assert!(why.contains("tls.insecure_plaintext"), "{why}");
        c.tls.insecure_plaintext = true;
        assert!(c.validate().is_ok());
    }
}
