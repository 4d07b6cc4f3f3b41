//! Everything the aggregator needs to run, as plain values. The binary maps
//! the YAML configuration and environment (`APERTURE_*`) onto this;
//! [`Settings::new`] gives the documented defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where ClickHouse is and how to log in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClickHouseSettings {
    /// HTTP endpoint, e.g. `http://clickhouse:8123` (`APERTURE_CLICKHOUSE_ENDPOINT`).
    pub endpoint: String,
    /// Database, created if missing (`APERTURE_CLICKHOUSE_DATABASE`, default `aperture`).
    pub database: String,
    /// User (default `default`).
    pub user: String,
    /// Password (`APERTURE_CLICKHOUSE_PASSWORD`, default empty).
    pub password: String,
    /// Cluster of the servers' `remote_servers` (`APERTURE_CLICKHOUSE_CLUSTER`);
    /// `None` (the default): one server. See `docs/storage.md`.
    pub cluster: Option<String>,
    /// Timeout of one write request (`clickhouse.request_timeout`, default 30 s).
    pub request_timeout: Duration,
    /// ClickHouse stops an API query after this long (`max_execution_time`,
    /// whole seconds): the HTTP request timeout.
    pub max_query_time: Duration,
}

impl ClickHouseSettings {
    /// Settings for `endpoint` with the default database, user and timeout.
    pub fn new(endpoint: impl Into<String>) -> ClickHouseSettings {
        ClickHouseSettings {
            endpoint: endpoint.into(),
            database: "aperture".to_owned(),
            user: "default".to_owned(),
            password: String::new(),
            cluster: None,
            request_timeout: Duration::from_secs(30),
            max_query_time: Duration::from_secs(30),
        }
    }
}

/// Forwarding committed profiles to an OTLP endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OtlpExportSettings {
    /// `http://host:4317` (`otlp.export.endpoint`).
    pub endpoint: String,
    /// Bearer token for the endpoint; empty: none.
    pub token: String,
    /// Committed batches waiting to be sent; more are dropped and counted. Default 256.
    pub queue_batches: usize,
    /// Timeout of one send. Default 10 s.
    pub timeout: Duration,
    /// First pause between retries, doubled each time (at most 30 s; 5 sends in all). Default 500 ms.
    pub min_backoff: Duration,
}

impl OtlpExportSettings {
    /// Settings for `endpoint` with the defaults.
    pub fn new(endpoint: impl Into<String>) -> OtlpExportSettings {
        OtlpExportSettings {
            endpoint: endpoint.into(),
            token: String::new(),
            queue_batches: 256,
            timeout: Duration::from_secs(10),
            min_backoff: Duration::from_millis(500),
        }
    }
}

/// Limits on HTTP requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Largest request body accepted, bytes (every API route is a `GET`).
    pub max_body_bytes: usize,
    /// Largest total size of request headers, bytes (answered with 431).
    pub max_header_bytes: usize,
    /// Time a request may take before it is answered with 503 (its store
    /// query is cancelled).
    pub request_timeout: Duration,
    /// A connection that has not sent a complete request head within this
    /// time (also while idle between requests) is closed.
    pub header_read_timeout: Duration,
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Longest time range one query may cover (answered with 400 beyond).
    pub max_query_range: Duration,
    /// Largest body of a pushed profile (`POST /ingest`), bytes; its
    /// decompressed form may be 8 times larger.
    pub max_push_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_body_bytes: 64 * 1024,
            max_header_bytes: 16 * 1024,
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 1024,
            max_query_range: Duration::from_secs(31 * 86_400),
            max_push_body_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Aggregator settings. Field docs give the default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// HTTP listen address (REST API, `/metrics`, probes). Default `0.0.0.0:9090`.
    pub http_listen: SocketAddr,
    /// A second HTTP address serving only Pyroscope's routes (usually
    /// `0.0.0.0:4040`). Default `None`.
    pub pyroscope_listen: Option<SocketAddr>,
    /// Bearer token required on `/api/v1/*` (`APERTURE_AUTH_TOKEN`); `None` disables auth.
    pub auth_token: Option<String>,
    /// Token required of pushed profiles (`POST /ingest`): the agents'
    /// ingest token; `None` accepts pushes without one.
    pub ingest_token: Option<String>,
    /// Directory of the embedded store. Default `/var/lib/aperture`.
    pub data_dir: PathBuf,
    /// Bytes the ingress, shards and writer may hold in total
    /// (`APERTURE_BUFFER_CAPACITY`). Default 256 MiB.
    pub buffer_capacity_bytes: usize,
    /// Above this share of the capacity the ingress answers `Busy` and
    /// `/readyz` reports 503. Default 80.
    pub high_water_percent: u8,
    /// Number of shard threads; 0 means one per CPU core. Default 0.
    pub shards: usize,
    /// Depth of each shard's frame queue. Default 1024.
    pub shard_queue_frames: usize,
    /// Aggregation window. Default 10 s.
    pub window: Duration,
    /// A shard flushes once it holds this many rows. Default 50 000.
    pub flush_max_rows: usize,
    /// A shard flushes once its oldest data is this old. Default 200 ms.
    pub flush_max_age: Duration,
    /// The writer inserts once it holds this many rows... Default 50 000.
    pub writer_batch_rows: usize,
    /// ...or once its oldest row waited this long. Default 0: the shards'
    /// age already batches rows, and what arrives while a write is in
    /// flight goes into the next one.
    pub writer_max_delay: Duration,
    /// Longest pause between retries of a failed write. Default 30 s.
    pub writer_max_backoff: Duration,
    /// ClickHouse; `None` selects the embedded store.
    pub clickhouse: Option<ClickHouseSettings>,
    /// Data older than this is deleted. Default 7 days.
    pub retention: Duration,
    /// How often retention runs. Default 1 h.
    pub retention_interval: Duration,
    /// Agent runs the frame ledger remembers. Default 65 536.
    pub ledger_max_runs: usize,
    /// An agent counts as connected while frames from it arrived this recently. Default 60 s.
    pub agent_idle: Duration,
    /// HTTP limits.
    pub http_limits: HttpLimits,
    /// On shutdown, how long the writer keeps trying to commit what is buffered. Default 10 s.
    pub shutdown_grace: Duration,
    /// Largest frame accepted, header included (`limits.max_frame_size`):
    /// the shards decode with this limit, as the transport does. Default 4 MiB.
    pub max_frame_bytes: usize,
    /// Frames kept per stack; deeper stacks are cut and marked. Default 1024.
    pub max_stack_frames: usize,
    /// Forward what is committed to an OTLP endpoint; `None`: not. Default `None`.
    pub otlp_export: Option<OtlpExportSettings>,
}

impl Settings {
    /// Defaults, with the embedded store in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Settings {
        Settings {
            http_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            pyroscope_listen: None,
            auth_token: None,
            ingest_token: None,
            data_dir: data_dir.into(),
            buffer_capacity_bytes: 256 * 1024 * 1024,
            high_water_percent: 80,
            shards: 0,
            shard_queue_frames: 1024,
            window: Duration::from_secs(10),
            flush_max_rows: 50_000,
            flush_max_age: Duration::from_millis(200),
            writer_batch_rows: 50_000,
            writer_max_delay: Duration::ZERO,
            writer_max_backoff: Duration::from_secs(30),
            clickhouse: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            retention_interval: Duration::from_secs(3600),
            ledger_max_runs: 65_536,
            agent_idle: Duration::from_secs(60),
            http_limits: HttpLimits::default(),
            shutdown_grace: Duration::from_secs(10),
            max_frame_bytes: 4 * 1024 * 1024,
            max_stack_frames: aperture_core::shard::DEFAULT_MAX_STACK_FRAMES,
            otlp_export: None,
        }
    }

    /// The number of shard threads to run.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 { self.shards } else { std::thread::available_parallelism().map_or(1, |n| n.get()) }
    }

    /// The decode limits matching [`Settings::max_frame_bytes`].
    pub fn decode_limits(&self) -> aperture_core::frame::DecodeLimits {
        aperture_core::frame::DecodeLimits {
            max_payload: self.max_frame_bytes.saturating_sub(aperture_core::frame::HEADER_LEN),
        }
    }

    /// The buffer level above which the ingress pushes back, bytes.
    pub fn high_water_bytes(&self) -> usize {
        let percent = usize::from(self.high_water_percent.clamp(1, 100));
        self.buffer_capacity_bytes / 100 * percent
    }
}
