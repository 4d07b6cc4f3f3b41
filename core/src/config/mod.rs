//! Configuration of the agent and the aggregator.
//!
//! Sources, lowest precedence first: defaults, a YAML file (unknown keys
//! rejected), the environment variables of the deployment page
//! (`APERTURE_*`), command-line flags. Every mistake is a [`ConfigError`]
//! naming where it came from (file:line:column, env var or flag), the key,
//! the bad value and what is allowed. The binaries report it and exit before
//! opening any port or attaching any probe.

mod agent;
mod aggregator;
mod load;
mod values;

pub use agent::{
    AgentConfig, AgentTransport, BatchSettings, Budget, CarrierChoice, DEFAULT_AGGREGATOR, Filter, LockSettings,
    MetricsSettings, PerfBufferSettings, SyscallSettings, UnwindChoice,
};
pub use aggregator::{
    AggregatorConfig, Auth, BufferSettings, ClickHouse, FlushSettings, Limits, Listen, Otlp, OtlpExport, Tls,
};
pub use load::{ConfigError, FlagValue, Layered, Origin, load, parse_yaml};
pub use values::{ByteSize, CpuPercent, FREQUENCY_RANGE, Frequency, HostPort, HumanDuration, ModeSet, Percent, Secret};

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    fn agent(yaml: &str, vars: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
        load::<AgentConfig>(Some(("agent.yml", yaml)), &env(vars), &[])
    }

    fn aggregator(yaml: &str, vars: &[(&str, &str)]) -> Result<AggregatorConfig, ConfigError> {
        load::<AggregatorConfig>(Some(("aggregator.yml", yaml)), &env(vars), &[])
    }

    fn agent_err(yaml: &str, vars: &[(&str, &str)]) -> String {
        agent(yaml, vars).expect_err("must be rejected").to_string()
    }

    fn aggregator_err(yaml: &str, vars: &[(&str, &str)]) -> String {
        aggregator(yaml, vars).expect_err("must be rejected").to_string()
    }

    // Golden tests: the exact message a user sees for common mistakes.

    #[test]
    fn unknown_key() {
        assert_eq!(
            agent_err("mode: cpu\nfrequency: 99\n", &[]),
            "agent.yml:2:1: `frequency`: unknown field `frequency`, expected one of `aggregator`, `auth_token`, `mode`, `frequency_hz`, `node_name`, `data_dir`, `lock`, `syscall`, `batch`, `perf_buffer`, `transport`, `filter`, `budget`, `metrics`, `unwind`, `unwind_cache_max`"
        );
    }

    #[test]
    fn unknown_nested_key() {
        assert_eq!(
            agent_err("syscall:\n  treshold: 5ms\n", &[]),
            "agent.yml:2:3: `syscall.treshold`: unknown field `treshold`, expected `threshold` or `drain_interval`"
        );
    }

    #[test]
    fn wrong_type() {
        assert_eq!(
            agent_err("batch:\n  max_records: lots\n", &[]),
            "agent.yml:2:16: `batch.max_records`: invalid type: string \"lots\", expected usize"
        );
    }

    #[test]
    fn mode_gpu_from_env() {
        assert_eq!(
            agent_err("", &[("APERTURE_MODE", "gpu")]),
            "environment variable APERTURE_MODE: invalid mode `gpu`: expected one of cpu, lock, syscall, all (or a comma-separated list)"
        );
    }

    #[test]
    fn mode_gpu_in_file() {
        assert_eq!(
            agent_err("mode: gpu\n", &[]),
            "agent.yml:1:7: `mode`: invalid mode `gpu`: expected one of cpu, lock, syscall, all (or a comma-separated list)"
        );
    }

    #[test]
    fn frequency_zero() {
        assert_eq!(
            agent_err("", &[("APERTURE_FREQ", "0")]),
            "environment variable APERTURE_FREQ: invalid frequency `0`: expected a whole number of Hz from 1 to 10000, e.g. 99"
        );
        assert_eq!(
            agent_err("frequency_hz: 0\n", &[]),
            "agent.yml:1:15: `frequency_hz`: invalid frequency `0`: expected a whole number of Hz from 1 to 10000, e.g. 99"
        );
    }

    #[test]
    fn default_delays_keep_a_sample_queryable_within_a_second() {
        // A sample waits at most for the perf-buffer reader, the agent's
        // batch and the shard's flush (the writer adds no wait of its own);
        // the freshness target is p50 <= 1 s, p99 <= 2 s.
        let (agent, aggregator) = (AgentConfig::default(), AggregatorConfig::default());
        let worst = agent.perf_buffer.poll_interval.0 + agent.batch.max_age.0 + aggregator.flush.max_age.0;
        assert!(worst <= std::time::Duration::from_secs(1), "default delays add up to {worst:?}");
    }

    #[test]
    fn malformed_aggregator_address() {
        assert_eq!(
            agent_err("", &[("APERTURE_AGGREGATOR", "aperture-aggregator")]),
            "environment variable APERTURE_AGGREGATOR: invalid address `aperture-aggregator`: the port is missing; expected host:port, e.g. aperture-aggregator.aperture.svc.cluster.local:50051"
        );
        assert_eq!(
            agent_err("aggregator: \"host:99999\"\n", &[]),
            "agent.yml:1:13: `aggregator`: invalid address `host:99999`: the port is not a number from 1 to 65535; expected host:port, e.g. aperture-aggregator.aperture.svc.cluster.local:50051"
        );
    }

    #[test]
    fn buffer_capacity_without_unit() {
        assert_eq!(
            aggregator_err("auth:\n  disabled: true\n", &[("APERTURE_BUFFER_CAPACITY", "268435456")]),
            "environment variable APERTURE_BUFFER_CAPACITY: invalid size `268435456`: a unit is required (B, KiB, MiB, GiB, KB, MB, GB), e.g. 268435456MiB"
        );
        assert_eq!(
            aggregator_err("auth:\n  disabled: true\nbuffer:\n  capacity: 256\n", &[]),
            "aggregator.yml:4:13: `buffer.capacity`: invalid size `256`: a unit is required (B, KiB, MiB, GiB, KB, MB, GB), e.g. 256MiB"
        );
    }

    #[test]
    fn duration_without_unit() {
        assert_eq!(
            agent_err("batch:\n  max_age: 10\n", &[]),
            "agent.yml:2:12: `batch.max_age`: invalid duration `10`: a unit is required, e.g. 10s or 10ms"
        );
    }

    #[test]
    fn missing_token_on_aggregator() {
        assert_eq!(
            aggregator_err("", &[]),
            "configuration: `auth.token`: no token configured: set APERTURE_AUTH_TOKEN (or auth.token), or set auth.disabled: true to accept unauthenticated agents"
        );
    }

    #[test]
    fn clickhouse_endpoint_without_scheme() {
        assert_eq!(
            aggregator_err("", &[("APERTURE_AUTH_TOKEN", "t"), ("APERTURE_CLICKHOUSE_ENDPOINT", "clickhouse:8123")]),
            "configuration: `clickhouse.endpoint`: invalid endpoint `clickhouse:8123`: expected the HTTP URL of ClickHouse, e.g. http://clickhouse:8123"
        );
    }

    #[test]
    fn list_where_a_section_is_expected() {
        assert_eq!(
            agent_err("filter:\n  - web\n", &[]),
            "agent.yml:2:3: `filter`: invalid type: sequence, expected struct Filter"
        );
    }

    #[test]
    fn bad_fingerprint() {
        assert_eq!(
            agent_err("transport:\n  fingerprint_sha256: abc\n", &[]),
            "configuration: `transport.fingerprint_sha256`: invalid fingerprint `abc`: expected 64 hex digits (colons allowed), as the aggregator logs it"
        );
    }

    #[test]
    fn invalid_yaml_syntax() {
        let e = agent_err("mode: [cpu\n", &[]);
        assert!(e.starts_with("agent.yml:"), "{e}");
    }

    // Precedence.

    #[test]
    fn env_overrides_file_and_flag_overrides_env() {
        let yaml = "mode: cpu\nfrequency_hz: 49\naggregator: a.example:1\n";
        let from_file = agent(yaml, &[]).expect("valid");
        assert_eq!(from_file.frequency_hz, Frequency(49));
        let vars = [("APERTURE_FREQ", "199"), ("APERTURE_MODE", "lock"), ("APERTURE_AGGREGATOR", "b.example:2")];
        let from_env = agent(yaml, &vars).expect("valid");
        assert_eq!(from_env.frequency_hz, Frequency(199));
        assert_eq!(from_env.mode.to_string(), "lock");
        assert_eq!(from_env.aggregator.to_string(), "b.example:2");
        let flags = [FlagValue::new("--freq", "frequency_hz", "299"), FlagValue::new("--mode", "mode", "syscall")];
        let from_flags = load::<AgentConfig>(Some(("agent.yml", yaml)), &env(&vars), &flags).expect("valid");
        assert_eq!(from_flags.frequency_hz, Frequency(299));
        assert_eq!(from_flags.mode.to_string(), "syscall");
        assert_eq!(from_flags.aggregator.to_string(), "b.example:2", "env still applies where no flag is given");
    }

    #[test]
    fn bad_flag_is_named() {
        let err =
            load::<AgentConfig>(None, &env(&[]), &[FlagValue::new("--freq", "frequency_hz", "fast")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "flag --freq: invalid frequency `fast`: expected a whole number of Hz from 1 to 10000, e.g. 99"
        );
    }

    #[test]
    fn empty_env_counts_as_unset() {
        let c = aggregator("auth:\n  token: from-file\n", &[("APERTURE_AUTH_TOKEN", "")]).expect("valid");
        assert_eq!(c.auth.token.expose(), "from-file");
    }

    #[test]
    fn deployment_page_env_vars_apply() {
        let c = aggregator(
            "",
            &[
                ("APERTURE_AUTH_TOKEN", "s3cret"),
                ("APERTURE_CLICKHOUSE_ENDPOINT", "http://clickhouse:8123"),
                ("APERTURE_CLICKHOUSE_DATABASE", "profiles"),
                ("APERTURE_CLICKHOUSE_PASSWORD", "pw"),
                ("APERTURE_BUFFER_CAPACITY", "512MiB"),
            ],
        )
        .expect("valid");
        assert_eq!(c.auth.token.expose(), "s3cret");
        assert_eq!(c.clickhouse.endpoint, "http://clickhouse:8123");
        assert_eq!(c.clickhouse.database, "profiles");
        assert_eq!(c.clickhouse.password.expose(), "pw");
        assert_eq!(c.buffer.capacity, ByteSize::mib(512));
        assert!(!format!("{c:?}").contains("s3cret"), "secrets never show in Debug");
    }

    #[test]
    fn defaults_are_valid_and_documented() {
        let a = load::<AgentConfig>(None, &env(&[]), &[]).expect("agent defaults are valid");
        assert_eq!(a.frequency_hz, Frequency(99));
        assert_eq!(a.mode, ModeSet::ALL);
        assert_eq!(a.metrics.listen, "0.0.0.0:9091");
        let g = load::<AggregatorConfig>(None, &env(&[("APERTURE_AUTH_TOKEN", "t")]), &[]).expect("valid");
        assert_eq!(g.listen.grpc, "0.0.0.0:50051");
        assert_eq!(g.listen.http, "0.0.0.0:9090");
        assert_eq!(g.clickhouse.database, "aperture");
        // Every key of both configs appears in the reference, with its default.
        let doc = include_str!("../../../docs/configuration.md");
        for (section, value) in [
            ("agent", yaml_serde::to_value(&a).expect("serialize")),
            ("aggregator", yaml_serde::to_value(&g).expect("serialize")),
        ] {
            let mut keys = Vec::new();
            leaf_keys(&value, String::new(), &mut keys);
            for key in keys {
                assert!(doc.contains(&format!("`{key}`")), "docs/configuration.md lacks {section} key `{key}`");
            }
        }
        for (var, _) in AgentConfig::ENV.iter().chain(AggregatorConfig::ENV) {
            assert!(doc.contains(var), "docs/configuration.md lacks env var {var}");
        }
    }

    fn leaf_keys(v: &yaml_serde::Value, prefix: String, out: &mut Vec<String>) {
        match v {
            yaml_serde::Value::Mapping(m) => {
                for (k, v) in m {
                    let k = k.as_str().unwrap_or_default();
                    let p = if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") };
                    leaf_keys(v, p, out);
                }
            }
            _ => out.push(prefix),
        }
    }

    #[test]
    fn a_full_file_parses() {
        let yaml = r#"
aggregator: aperture-aggregator.aperture.svc.cluster.local:50051
mode: cpu,syscall
frequency_hz: 49
lock:
  threshold: 5ms
syscall:
  threshold: 20ms
batch:
  max_age: 5s
  max_records: 1000
transport:
  carrier: grpc
  buffer_capacity: 16MiB
  insecure_skip_verify: true
filter:
  namespaces: [default, shop]
  pod_selector: app=web
  processes: [nginx]
budget:
  cpu_percent: 0.5
"#;
        let c = agent(yaml, &[]).expect("valid");
        assert_eq!(c.transport.carrier, CarrierChoice::Grpc);
        assert_eq!(c.filter.namespaces, vec!["default", "shop"]);
        assert_eq!(c.budget.cpu_percent, CpuPercent(0.5));
        assert!(c.mode.cpu && c.mode.syscall && !c.mode.lock);
    }

    #[test]
    fn client_limits_are_checked_and_name_their_key() {
        let err = aggregator_err("auth:\n  disabled: true\nlimits:\n  max_stack_frames: 10\n", &[]);
        assert!(err.contains("`limits.max_stack_frames`: must be between 64 and 16384"), "{err}");
        let err = aggregator_err("auth:\n  disabled: true\nlimits:\n  max_unauthenticated: 0\n", &[]);
        assert!(err.contains("`limits.max_unauthenticated`: must be at least 1"), "{err}");
        let err = aggregator_err("auth:\n  disabled: true\nlimits:\n  max_parked_size: 1MiB\n", &[]);
        assert!(
            err.contains("`limits.max_parked_size`: must hold at least one frame of limits.max_frame_size"),
            "{err}"
        );
        let c =
            aggregator("auth:\n  disabled: true\nlimits:\n  max_stack_frames: 4096\n  max_unauthenticated: 64\n", &[])
                .expect("valid");
        assert_eq!((c.limits.max_stack_frames, c.limits.max_unauthenticated), (4096, 64));
    }
}
