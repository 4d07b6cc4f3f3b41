//! Configuration of `aperture agent`. Every key, its default and its env var
//! are listed in `docs/configuration.md`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::load::Layered;
use super::values::{ByteSize, CpuPercent, Frequency, HostPort, HumanDuration, ModeSet, Secret};

/// The aggregator address agents use inside Kubernetes.
pub const DEFAULT_AGGREGATOR: &str = "aperture-aggregator.aperture.svc.cluster.local:50051";

/// Configuration of the node agent.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Aggregator `host:port` (`APERTURE_AGGREGATOR`). QUIC is tried on UDP first, gRPC on TCP as fallback.
    pub aggregator: HostPort,
    /// Bearer token (`APERTURE_AUTH_TOKEN`).
    pub auth_token: Secret,
    /// Probes to run (`APERTURE_MODE`): cpu, lock, syscall, all.
    pub mode: ModeSet,
    /// CPU sampling frequency in Hz (`APERTURE_FREQ`).
    pub frequency_hz: Frequency,
    /// Node name; empty means `NODE_NAME`, else the host name.
    pub node_name: String,
    /// Where the agent keeps its identity file and its unwind-table cache.
    pub data_dir: PathBuf,
    /// Lock-contention probe settings.
    pub lock: LockSettings,
    /// Syscall probe settings.
    pub syscall: SyscallSettings,
    /// Batching of records into frames.
    pub batch: BatchSettings,
    /// Per-CPU perf buffers between kernel and agent.
    pub perf_buffer: PerfBufferSettings,
    /// Delivery to the aggregator.
    pub transport: AgentTransport,
    /// Which processes to profile.
    pub filter: Filter,
    /// Overhead budget control loop.
    pub budget: Budget,
    /// The agent's own metrics endpoint.
    pub metrics: MetricsSettings,
    /// How user stacks are walked: `tables` (unwind tables from
    /// `.eh_frame`, frame pointers where there are none) or `frame_pointers`.
    pub unwind: UnwindChoice,
    /// Bytes of unwind-table files the agent keeps under `data_dir/unwind`
    /// at most; the least recently used are removed first.
    pub unwind_cache_max: ByteSize,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            // The literal is a valid address; the unit test below parses it.
            aggregator: HostPort { host: "aperture-aggregator.aperture.svc.cluster.local".into(), port: 50051 },
            auth_token: Secret::default(),
            mode: ModeSet::ALL,
            frequency_hz: Frequency(99),
            node_name: String::new(),
            data_dir: PathBuf::from("/var/lib/aperture"),
            lock: LockSettings::default(),
            syscall: SyscallSettings::default(),
            batch: BatchSettings::default(),
            perf_buffer: PerfBufferSettings::default(),
            transport: AgentTransport::default(),
            filter: Filter::default(),
            budget: Budget::default(),
            metrics: MetricsSettings::default(),
            unwind: UnwindChoice::Tables,
            unwind_cache_max: ByteSize::mib(256),
        }
    }
}

/// How the agent walks user stacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnwindChoice {
    /// Unwind tables built from `.eh_frame`, walked in the kernel; frame
    /// pointers for code without them.
    #[default]
    Tables,
    /// Frame pointers only, for comparison.
    FramePointers,
}

/// Lock-contention probe settings.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockSettings {
    /// Waits longer than this are also sent individually with their stack;
    /// all waits are counted in the kernel regardless.
    pub threshold: HumanDuration,
}

impl Default for LockSettings {
    fn default() -> Self {
        LockSettings { threshold: HumanDuration::millis(1) }
    }
}

/// Syscall probe settings.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyscallSettings {
    /// Calls slower than this are sent individually with their user stack.
    pub threshold: HumanDuration,
    /// How often the in-kernel statistics are drained.
    pub drain_interval: HumanDuration,
}

impl Default for SyscallSettings {
    fn default() -> Self {
        SyscallSettings { threshold: HumanDuration::millis(10), drain_interval: HumanDuration::secs(5) }
    }
}

/// Batching of records into frames.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchSettings {
    /// A batch is sent at the latest this long after its first record, so a quiet node still reports.
    pub max_age: HumanDuration,
    /// A batch is sent once it holds this many records.
    pub max_records: usize,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings { max_age: HumanDuration::millis(500), max_records: 20_000 }
    }
}

/// Per-CPU perf buffers.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PerfBufferSettings {
    /// Size of each CPU's buffer (rounded to a power of two pages).
    pub size_per_cpu: ByteSize,
    /// The reader is woken once this many bytes are waiting (or at the poll interval).
    pub wakeup_bytes: ByteSize,
    /// Longest time records wait in a buffer before the reader looks anyway.
    pub poll_interval: HumanDuration,
}

impl Default for PerfBufferSettings {
    fn default() -> Self {
        PerfBufferSettings {
            size_per_cpu: ByteSize::kib(512),
            wakeup_bytes: ByteSize::kib(64),
            poll_interval: HumanDuration::millis(200),
        }
    }
}

/// Which carrier the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CarrierChoice {
    /// QUIC first, gRPC when QUIC cannot connect.
    Auto,
    /// QUIC only.
    Quic,
    /// gRPC only.
    Grpc,
}

/// Delivery to the aggregator.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentTransport {
    /// `auto` (QUIC, falling back to gRPC), `quic` or `grpc`.
    pub carrier: CarrierChoice,
    /// Unacknowledged frames kept for resending; the oldest are dropped (and counted) beyond this.
    pub buffer_capacity: ByteSize,
    /// CA certificate (PEM) to trust for the aggregator's QUIC/TLS certificate.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 fingerprint (hex) of the aggregator's certificate to pin instead of a CA.
    pub fingerprint_sha256: Option<String>,
    /// Accept any certificate. Insecure; warned about at every connect.
    pub insecure_skip_verify: bool,
    /// Name to verify in the certificate; defaults to the aggregator host.
    pub server_name: Option<String>,
    /// gRPC uses TLS (with the same trust settings as QUIC). Always on unless
    /// `insecure_plaintext`; `false` alone is refused.
    pub grpc_tls: bool,
    /// Speak gRPC without TLS: the token and profiles cross the network in
    /// cleartext. Only for networks where something else encrypts.
    pub insecure_plaintext: bool,
    /// On SIGTERM, how long to wait for outstanding acknowledgements.
    pub shutdown_timeout: HumanDuration,
}

impl Default for AgentTransport {
    fn default() -> Self {
        AgentTransport {
            carrier: CarrierChoice::Auto,
            buffer_capacity: ByteSize::mib(32),
            ca_file: None,
            fingerprint_sha256: None,
            insecure_skip_verify: false,
            server_name: None,
            grpc_tls: true,
            insecure_plaintext: false,
            shutdown_timeout: HumanDuration::secs(10),
        }
    }
}

/// Which processes to profile. Empty lists mean "everything".
#[derive(Clone, Debug, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Filter {
    /// Only pods in these Kubernetes namespaces.
    pub namespaces: Vec<String>,
    /// Only pods matching this label selector (`app=web,tier!=cache`).
    pub pod_selector: String,
    /// Only processes with these names (`comm`).
    pub processes: Vec<String>,
    /// Only these process ids.
    pub pids: Vec<u32>,
    /// Only processes in these cgroups (paths under /sys/fs/cgroup).
    pub cgroups: Vec<PathBuf>,
}

impl Filter {
    /// Whether no filter is set.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.pod_selector.is_empty()
            && self.processes.is_empty()
            && self.pids.is_empty()
            && self.cgroups.is_empty()
    }
}

/// Overhead budget.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Budget {
    /// Whether the agent adapts its sampling to stay within the budget.
    pub enabled: bool,
    /// Agent CPU plus in-kernel program time, in percent of one core.
    pub cpu_percent: CpuPercent,
    /// How often the cost is measured and the settings adjusted.
    pub interval: HumanDuration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget { enabled: true, cpu_percent: CpuPercent(1.0), interval: HumanDuration::secs(10) }
    }
}

/// The agent's own metrics endpoint.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Address for `/metrics` and `/healthz`; empty disables the endpoint.
    pub listen: String,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings { listen: "0.0.0.0:9091".into() }
    }
}

impl Layered for AgentConfig {
    const ENV: &'static [(&'static str, &'static str)] = &[
        ("APERTURE_AGGREGATOR", "aggregator"),
        ("APERTURE_AUTH_TOKEN", "auth_token"),
        ("APERTURE_MODE", "mode"),
        ("APERTURE_FREQ", "frequency_hz"),
        ("NODE_NAME", "node_name"),
    ];

    fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "aggregator" => self.aggregator = value.parse()?,
            "auth_token" => self.auth_token = Secret(value.to_owned()),
            "mode" => self.mode = value.parse()?,
            "frequency_hz" => self.frequency_hz = value.parse()?,
            "node_name" => self.node_name = value.to_owned(),
            "data_dir" => self.data_dir = PathBuf::from(value),
            "unwind" => {
                self.unwind = match value {
                    "tables" => UnwindChoice::Tables,
                    "frame_pointers" => UnwindChoice::FramePointers,
                    _ => return Err(format!("invalid unwind `{value}`: expected tables or frame_pointers")),
                }
            }
            "unwind_cache_max" => self.unwind_cache_max = value.parse()?,
            "metrics.listen" => self.metrics.listen = value.to_owned(),
            "transport.carrier" => {
                self.transport.carrier = match value {
                    "auto" => CarrierChoice::Auto,
                    "quic" => CarrierChoice::Quic,
                    "grpc" => CarrierChoice::Grpc,
                    _ => return Err(format!("invalid carrier `{value}`: expected auto, quic or grpc")),
                }
            }
            "transport.insecure_skip_verify" => {
                self.transport.insecure_skip_verify =
                    value.parse().map_err(|_| format!("invalid value `{value}`: expected true or false"))?
            }
            "transport.fingerprint_sha256" => self.transport.fingerprint_sha256 = Some(value.to_owned()),
            "batch.max_age" => self.batch.max_age = value.parse()?,
            "budget.enabled" => {
                self.budget.enabled =
                    value.parse().map_err(|_| format!("invalid value `{value}`: expected true or false"))?
            }
            other => return Err(format!("`{other}` cannot be set from the command line or environment")),
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), (String, String)> {
        let m = self.mode;
        if !(m.cpu || m.lock || m.syscall) {
            return Err(("mode".into(), "no probe selected: use cpu, lock, syscall or all".into()));
        }
        if self.batch.max_records == 0 {
            return Err(("batch.max_records".into(), "must be at least 1".into()));
        }
        if self.batch.max_age.0.is_zero() {
            return Err(("batch.max_age".into(), "must be longer than 0s".into()));
        }
        if self.perf_buffer.wakeup_bytes >= self.perf_buffer.size_per_cpu {
            return Err((
                "perf_buffer.wakeup_bytes".into(),
                format!(
                    "{} is not below perf_buffer.size_per_cpu ({}): the reader would never be woken",
                    self.perf_buffer.wakeup_bytes, self.perf_buffer.size_per_cpu
                ),
            ));
        }
        if !self.transport.grpc_tls && !self.transport.insecure_plaintext {
            return Err((
                "transport.grpc_tls".into(),
                "false does not turn TLS off: gRPC always uses TLS unless transport.insecure_plaintext is true (which sends the token in cleartext)".into(),
            ));
        }
        if let Some(fp) = &self.transport.fingerprint_sha256 {
            let hex: String = fp.chars().filter(|c| *c != ':').collect();
            if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err((
                    "transport.fingerprint_sha256".into(),
                    format!(
                        "invalid fingerprint `{fp}`: expected 64 hex digits (colons allowed), as the aggregator logs it"
                    ),
                ));
            }
        }
        if !self.metrics.listen.is_empty() && self.metrics.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err((
                "metrics.listen".into(),
                format!("invalid listen address `{}`: expected ip:port, e.g. 0.0.0.0:9091", self.metrics.listen),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_aggregator_is_the_cluster_service() {
        assert_eq!(AgentConfig::default().aggregator.to_string(), DEFAULT_AGGREGATOR);
        assert_eq!(DEFAULT_AGGREGATOR.parse::<HostPort>().ok(), Some(AgentConfig::default().aggregator));
    }

    #[test]
    fn grpc_is_plaintext_only_when_asked_by_name() {
        let mut c = AgentConfig::default();
        assert!(c.transport.grpc_tls && !c.transport.insecure_plaintext, "TLS by default");
        assert!(c.validate().is_ok());
        c.transport.grpc_tls = false;
        let (key, why) = c.validate().expect_err("grpc_tls: false alone is refused");
        assert_eq!(key, "transport.grpc_tls");
        assert!(why.contains("transport.insecure_plaintext"), "{why}");
        c.transport.insecure_plaintext = true;
        assert!(c.validate().is_ok());
    }

    #[test]
    fn unwind_defaults_to_tables_and_takes_frame_pointers() {
        assert_eq!(AgentConfig::default().unwind, UnwindChoice::Tables);
        let yaml: AgentConfig = yaml_serde::from_str("unwind: frame_pointers\n").expect("parses");
        assert_eq!(yaml.unwind, UnwindChoice::FramePointers);
        let mut c = AgentConfig::default();
        assert!(c.set("unwind", "frame_pointers").is_ok());
        assert_eq!(c.unwind, UnwindChoice::FramePointers);
        assert_eq!(AgentConfig::default().unwind_cache_max, ByteSize::mib(256));
        assert!(c.set("unwind_cache_max", "64MiB").is_ok());
        assert_eq!(c.unwind_cache_max, ByteSize::mib(64));
        assert!(c.set("unwind_cache_max", "lots").is_err(), "a size is required");
        let err = c.set("unwind", "dwarf").expect_err("rejected");
        assert!(err.contains("tables or frame_pointers"), "{err}");
    }
}
