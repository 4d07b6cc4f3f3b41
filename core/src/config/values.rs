//! Value types of the configuration: each parses and checks itself, from
//! YAML and from env vars or flags alike, so every source gives the same
//! message for the same mistake.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::model::Mode;

/// Implements Deserialize (from a string, or from a YAML scalar of another
/// type, which is shown as written) and Serialize (as its display form) for a
/// type with `FromStr<Err = String>` and `Display`.
macro_rules! string_value {
    ($t:ty, $expecting:expr) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$t, E> {
                        s.parse::<$t>().map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$t, E> {
                        self.visit_str(&v.to_string())
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$t, E> {
                        self.visit_str(&v.to_string())
                    }
                    fn visit_f64<E: de::Error>(self, v: f64) -> Result<$t, E> {
                        self.visit_str(&v.to_string())
                    }
                }
                d.deserialize_any(V)
            }
        }
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    };
}

/// A secret string (token, password): never shown by `Debug`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// The secret value.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no secret is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() { f.write_str("\"\"") } else { f.write_str("\"***\"") }
    }
}

/// A size in bytes, written with a unit: `512KiB`, `64MiB`, `1GiB`, `100MB`, `4096B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> ByteSize {
        ByteSize(n * 1024 * 1024)
    }

    /// `n` kibibytes.
    pub const fn kib(n: u64) -> ByteSize {
        ByteSize(n * 1024)
    }

    /// The size as `usize`, saturating.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

const BYTE_UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        if num.is_empty() {
            return Err(format!("invalid size `{s}`: expected a whole number with a unit, e.g. 256MiB"));
        }
        if unit.is_empty() {
            return Err(format!("invalid size `{s}`: a unit is required (B, KiB, MiB, GiB, KB, MB, GB), e.g. {s}MiB"));
        }
        let Some((_, mult)) = BYTE_UNITS.iter().find(|(u, _)| u.eq_ignore_ascii_case(unit)) else {
            return Err(format!(
                "invalid size `{s}`: unknown unit `{unit}`, expected one of B, KiB, MiB, GiB, TiB, KB, MB, GB, TB"
            ));
        };
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(*mult))
            .map(ByteSize)
            .ok_or_else(|| format!("invalid size `{s}`: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if self.0 >= mult && self.0.is_multiple_of(mult) {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}B", self.0)
    }
}

string_value!(ByteSize, "a size with a unit, e.g. 256MiB");

/// A duration written as `10s`, `500ms`, `1m`, `7d`, `1h 30m`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// `n` seconds.
    pub const fn secs(n: u64) -> HumanDuration {
        HumanDuration(Duration::from_secs(n))
    }

    /// `n` milliseconds.
    pub const fn millis(n: u64) -> HumanDuration {
        HumanDuration(Duration::from_millis(n))
    }

    /// The duration in nanoseconds, saturating.
    pub fn as_nanos_u64(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<HumanDuration, String> {
        if s.trim().chars().all(|c| c.is_ascii_digit()) && !s.trim().is_empty() {
            return Err(format!("invalid duration `{s}`: a unit is required, e.g. {s}s or {s}ms"));
        }
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| format!("invalid duration `{s}`: {e}; write e.g. 10s, 500ms, 5m, 7d"))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

string_value!(HumanDuration, "a duration with a unit, e.g. 10s");

/// Which probes the agent runs: `cpu`, `lock`, `syscall`, `all`, or a
/// comma-separated combination (`cpu,lock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModeSet {
    /// Sample on-CPU stacks.
    pub cpu: bool,
    /// Record lock contention.
    pub lock: bool,
    /// Record syscall statistics and slow calls.
    pub syscall: bool,
}

impl ModeSet {
    /// Every mode.
    pub const ALL: ModeSet = ModeSet { cpu: true, lock: true, syscall: true };

    /// Whether `mode` is enabled.
    pub fn contains(self, mode: Mode) -> bool {
        match mode {
            Mode::Cpu => self.cpu,
            Mode::Lock => self.lock,
            Mode::Syscall => self.syscall,
        }
    }

    /// The enabled modes, in a fixed order.
    pub fn modes(self) -> impl Iterator<Item = Mode> {
        Mode::ALL.into_iter().filter(move |m| self.contains(*m))
    }
}

impl FromStr for ModeSet {
    type Err = String;
    fn from_str(s: &str) -> Result<ModeSet, String> {
        let mut set = ModeSet { cpu: false, lock: false, syscall: false };
        for part in s.split(',').map(str::trim) {
            match part {
                "all" => set = ModeSet::ALL,
                "cpu" => set.cpu = true,
                "lock" => set.lock = true,
                "syscall" => set.syscall = true,
                _ => {
                    return Err(format!(
                        "invalid mode `{part}`: expected one of cpu, lock, syscall, all (or a comma-separated list)"
                    ));
                }
            }
        }
        Ok(set)
    }
}

impl fmt::Display for ModeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == ModeSet::ALL {
            return f.write_str("all");
        }
        let names: Vec<&str> = self.modes().map(Mode::as_str).collect();
        f.write_str(&names.join(","))
    }
}

string_value!(ModeSet, "one of cpu, lock, syscall, all");

/// Lowest and highest sampling frequency accepted, Hz.
pub const FREQUENCY_RANGE: (u32, u32) = (1, 10_000);

/// A sampling frequency in Hz, within [`FREQUENCY_RANGE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Frequency(pub u32);

impl Frequency {
    /// The sampling period in ns.
    pub fn period_ns(self) -> u64 {
        1_000_000_000 / u64::from(self.0.max(1))
    }
}

impl FromStr for Frequency {
    type Err = String;
    fn from_str(s: &str) -> Result<Frequency, String> {
        let (lo, hi) = FREQUENCY_RANGE;
        let t = s.trim().trim_end_matches("Hz").trim_end_matches("hz").trim();
        match t.parse::<u32>() {
            Ok(v) if (lo..=hi).contains(&v) => Ok(Frequency(v)),
            _ => Err(format!("invalid frequency `{s}`: expected a whole number of Hz from {lo} to {hi}, e.g. 99")),
        }
    }
}

impl fmt::Display for Frequency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

string_value!(Frequency, "a frequency in Hz, e.g. 99");

/// A `host:port` address (a DNS name, IPv4 address or bracketed IPv6
/// address). A leading `http://`, `https://` or `grpc://` is accepted and ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// Host name or address, without brackets.
    pub host: String,
    /// Port.
    pub port: u16,
}

impl FromStr for HostPort {
    type Err = String;
    fn from_str(s: &str) -> Result<HostPort, String> {
        let bad = |why: &str| {
            format!(
                "invalid address `{s}`: {why}; expected host:port, e.g. aperture-aggregator.aperture.svc.cluster.local:50051"
            )
        };
        let t = s.trim();
        let t = ["http://", "https://", "grpc://"].iter().fold(t, |t, p| t.strip_prefix(p).unwrap_or(t));
        let t = t.strip_suffix('/').unwrap_or(t);
        let (host, port) = if let Some(rest) = t.strip_prefix('[') {
            let (h, p) = rest.split_once("]:").ok_or_else(|| bad("an IPv6 address needs brackets and a port"))?;
            (h, p)
        } else {
            t.rsplit_once(':').ok_or_else(|| bad("the port is missing"))?
        };
        if host.is_empty() {
            return Err(bad("the host is missing"));
        }
        if host.contains(':') && !t.starts_with('[') {
            return Err(bad("an IPv6 address needs brackets"));
        }
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')) {
            return Err(bad("the host has characters a host name cannot have"));
        }
        let port = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?;
        Ok(HostPort { host: host.to_owned(), port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

string_value!(HostPort, "an address host:port");

/// A whole-number percentage from 1 to 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Percent(pub u8);

impl FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Percent, String> {
        match s.trim().trim_end_matches('%').parse::<u8>() {
            Ok(v) if (1..=100).contains(&v) => Ok(Percent(v)),
            _ => Err(format!("invalid percentage `{s}`: expected a whole number from 1 to 100")),
        }
    }
}

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

string_value!(Percent, "a percentage from 1 to 100");

/// A share of one CPU core in percent, e.g. `1` or `0.5`, from 0.01 to 100.
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd)]
pub struct CpuPercent(pub f64);

impl FromStr for CpuPercent {
    type Err = String;
    fn from_str(s: &str) -> Result<CpuPercent, String> {
        match s.trim().trim_end_matches('%').parse::<f64>() {
            Ok(v) if (0.01..=100.0).contains(&v) => Ok(CpuPercent(v)),
            _ => Err(format!("invalid CPU budget `{s}`: expected a percentage of one core from 0.01 to 100, e.g. 1")),
        }
    }
}

impl fmt::Display for CpuPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

string_value!(CpuPercent, "a percentage of one core, e.g. 1");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_need_units() {
        assert_eq!("256MiB".parse::<ByteSize>(), Ok(ByteSize::mib(256)));
        assert_eq!("4 KiB".parse::<ByteSize>(), Ok(ByteSize::kib(4)));
        assert_eq!("1gb".parse::<ByteSize>(), Ok(ByteSize(1_000_000_000)));
        assert!("256".parse::<ByteSize>().unwrap_err().contains("a unit is required"));
        assert!("12XB".parse::<ByteSize>().unwrap_err().contains("unknown unit `XB`"));
        assert!("MiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize::mib(64).to_string(), "64MiB");
    }

    #[test]
    fn addresses() {
        let a: HostPort = "aperture-aggregator.aperture.svc.cluster.local:50051".parse().expect("valid");
        assert_eq!((a.host.as_str(), a.port), ("aperture-aggregator.aperture.svc.cluster.local", 50051));
        let b: HostPort = "http://10.0.0.1:50051/".parse().expect("scheme is ignored");
        assert_eq!(b.to_string(), "10.0.0.1:50051");
        let c: HostPort = "[::1]:50051".parse().expect("ipv6");
        assert_eq!(c.to_string(), "[::1]:50051");
        assert!("localhost".parse::<HostPort>().unwrap_err().contains("port is missing"));
        assert!("localhost:0".parse::<HostPort>().is_err());
        assert!(":50051".parse::<HostPort>().unwrap_err().contains("host is missing"));
        assert!("::1:50051".parse::<HostPort>().is_err());
    }

    #[test]
    fn modes_and_frequencies() {
        assert_eq!("all".parse::<ModeSet>(), Ok(ModeSet::ALL));
        let m: ModeSet = "cpu, lock".parse().expect("list");
        assert!(m.cpu && m.lock && !m.syscall);
        assert_eq!(m.to_string(), "cpu,lock");
        assert!("gpu".parse::<ModeSet>().is_err());
        assert_eq!("99".parse::<Frequency>(), Ok(Frequency(99)));
        assert_eq!("99Hz".parse::<Frequency>(), Ok(Frequency(99)));
        assert!("0".parse::<Frequency>().is_err());
        assert!("100000".parse::<Frequency>().is_err());
        assert_eq!(Frequency(100).period_ns(), 10_000_000);
    }

    #[test]
    fn durations_need_units() {
        assert_eq!("10s".parse::<HumanDuration>(), Ok(HumanDuration::secs(10)));
        assert_eq!("7d".parse::<HumanDuration>(), Ok(HumanDuration::secs(7 * 86_400)));
        assert!("10".parse::<HumanDuration>().unwrap_err().contains("a unit is required"));
    }

    #[test]
    fn secrets_are_not_shown() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "\"***\"");
    }
}
