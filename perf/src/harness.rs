//! Runs a scenario: every side once per repetition, alternating which goes
//! first, then summarises each metric per side and checks the targets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// One number measured on one side in one repetition.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Metric {
    /// Metric name, e.g. `samples_per_s`.
    pub name: String,
    /// Unit, e.g. `samples/s`, `%`, `ns`.
    pub unit: String,
    /// Value.
    pub value: f64,
}

impl Metric {
    /// A metric.
    pub fn new(name: &str, unit: &str, value: f64) -> Metric {
        Metric { name: name.to_owned(), unit: unit.to_owned(), value }
    }
}

/// A scenario: a set of sides measured the same way.
pub trait Scenario {
    /// The sides compared, e.g. `["none", "aperture", "bpftrace"]`.
    fn sides(&self) -> Vec<String>;
    /// Prepares everything the sides share (build, servers).
    fn setup(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Measures one side once.
    fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>>;
    /// Stops whatever `setup` started.
    fn teardown(&mut self) {}
}

/// A target from a scenario file: either a ratio of medians between two
/// sides, or a bound on one side's median.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// What the target says, for the report.
    pub name: String,
    /// The metric compared.
    pub metric: String,
    /// The side judged.
    pub side: String,
    /// The side it is compared with; absent for an absolute bound.
    #[serde(default)]
    pub versus: Option<String>,
    /// Met when `side / versus` (or the median itself) is at most this.
    #[serde(default)]
    pub at_most: Option<f64>,
    /// Met when `side / versus` (or the median itself) is at least this.
    #[serde(default)]
    pub at_least: Option<f64>,
}

/// A scenario file under `perf/scenarios/`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Scenario name (the file name without `.yaml`).
    pub name: String,
    /// What it measures and how.
    pub description: String,
    /// Repetitions of every side.
    #[serde(default = "default_reps")]
    pub repetitions: usize,
    /// Parameters of the scenario (its own shape).
    #[serde(default)]
    pub params: yaml_serde::Value,
    /// Parameters overriding `params` in quick mode.
    #[serde(default)]
    pub quick: yaml_serde::Value,
    /// Targets from the issues, checked against the medians.
    #[serde(default)]
    pub targets: Vec<Target>,
}

fn default_reps() -> usize {
    5
}

impl ScenarioFile {
    /// Reads `perf/scenarios/<name>.yaml` under `root`.
    pub fn load(root: &Path, name: &str) -> anyhow::Result<ScenarioFile> {
        let path = root.join("perf/scenarios").join(format!("{name}.yaml"));
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading scenario {}", path.display()))?;
        let file: ScenarioFile =
            yaml_serde::from_str(&text).with_context(|| format!("parsing scenario {}", path.display()))?;
        if file.name != name {
            bail!("{} names itself `{}`", path.display(), file.name);
        }
        Ok(file)
    }

    /// Overrides one parameter from the command line (`key=value`, the value
    /// in YAML: `agents=[5000]`); the description says so, for the report.
    pub fn set(&mut self, assignment: &str) -> anyhow::Result<()> {
        let Some((key, value)) = assignment.split_once('=') else {
            bail!("--set {assignment:?}: expected key=value (value in YAML, e.g. agents=[5000])")
        };
        let value: yaml_serde::Value =
            yaml_serde::from_str(value).with_context(|| format!("--set {key}: {value:?} is not YAML"))?;
        if self.params.is_null() {
            self.params = yaml_serde::Value::Mapping(Default::default());
        }
        let yaml_serde::Value::Mapping(params) = &mut self.params else {
            bail!("scenario {}: its params are not a mapping", self.name)
        };
        params.insert(yaml_serde::Value::String(key.trim().to_owned()), value);
        self.description.push_str(&format!(" (Set on the command line: {}.)", assignment.trim()));
        Ok(())
    }

    /// The parameters in effect, with the quick overrides merged when asked.
    pub fn params<T: serde::de::DeserializeOwned>(&self, quick: bool) -> anyhow::Result<T> {
        let mut p = match &self.params {
            yaml_serde::Value::Null => yaml_serde::Value::Mapping(Default::default()),
            v => v.clone(),
        };
        if quick && let (yaml_serde::Value::Mapping(base), yaml_serde::Value::Mapping(over)) = (&mut p, &self.quick) {
            for (k, v) in over {
                base.insert(k.clone(), v.clone());
            }
        }
        yaml_serde::from_value(p).with_context(|| format!("parameters of scenario {}", self.name))
    }
}

/// Results of a run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Description from the file.
    pub description: String,
    /// Where and when it ran.
    pub machine: Machine,
    /// Raw values: metric → side → values per repetition.
    pub raw: BTreeMap<String, BTreeMap<String, Vec<f64>>>,
    /// Units of the metrics.
    pub units: BTreeMap<String, String>,
    /// Summaries: metric → side → summary.
    pub summaries: BTreeMap<String, BTreeMap<String, Summary>>,
    /// Targets with their measured values.
    pub targets: Vec<TargetResult>,
}

/// A target with what was measured.
#[derive(Clone, Debug, Serialize)]
pub struct TargetResult {
    /// The target.
    pub target: Target,
    /// The ratio of medians (or the median for absolute targets); `None` when a side was not measured.
    pub measured: Option<f64>,
    /// Whether the target is met.
    pub met: bool,
}

/// Facts about the machine a report came from.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// Memory, GiB.
    pub memory_gib: f64,
    /// Commit of the code measured.
    pub commit: String,
    /// UTC time of the run.
    pub date: String,
    /// 1-, 5- and 15-minute load averages when the run ended (the machine is shared).
    pub load_average: String,
}

impl Machine {
    /// Reads the facts of this machine.
    pub fn current(root: &Path) -> Machine {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let cpu = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name").map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned()))
            .unwrap_or_default();
        let memory_gib = read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0 / 1024.0)
            .unwrap_or(0.0);
        let cmd = |prog: &str, args: &[&str]| {
            std::process::Command::new(prog)
                .args(args)
                .current_dir(root)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
                .unwrap_or_default()
        };
        Machine {
            kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
            cpu,
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory_gib: (memory_gib * 10.0).round() / 10.0,
            commit: cmd("git", &["rev-parse", "--short", "HEAD"]),
            date: cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            load_average: crate::sys::load_average(),
        }
    }
}

/// Runs `scenario` `reps` times per side, alternating the order of sides.
pub fn run_scenario(
    file: &ScenarioFile,
    scenario: &mut dyn Scenario,
    reps: usize,
    root: &Path,
) -> anyhow::Result<Report> {
    let sides = scenario.sides();
    scenario.setup()?;
    let mut raw: BTreeMap<String, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    let mut units = BTreeMap::new();
    let result = (|| -> anyhow::Result<()> {
        for rep in 0..reps {
            // Rotate the order so no side always runs first (caches, thermal, neighbours).
            let mut order = sides.clone();
            order.rotate_left(rep % sides.len().max(1));
            for side in &order {
                eprintln!("[{}] repetition {}/{reps}: {side}", file.name, rep + 1);
                let metrics =
                    scenario.run_once(side).with_context(|| format!("side {side}, repetition {}", rep + 1))?;
                for m in metrics {
                    units.insert(m.name.clone(), m.unit.clone());
                    raw.entry(m.name).or_default().entry(side.clone()).or_default().push(m.value);
                }
            }
        }
        Ok(())
    })();
    scenario.teardown();
    result?;
    let summaries: BTreeMap<String, BTreeMap<String, Summary>> = raw
        .iter()
        .map(|(metric, by_side)| {
            let s = by_side.iter().filter_map(|(side, v)| Summary::of(v).map(|s| (side.clone(), s))).collect();
            (metric.clone(), s)
        })
        .collect();
    let targets = file.targets.iter().map(|t| judge(t, &summaries)).collect();
    Ok(Report {
        scenario: file.name.clone(),
        description: file.description.clone(),
        machine: Machine::current(root),
        raw,
        units,
        summaries,
        targets,
    })
}

fn judge(t: &Target, summaries: &BTreeMap<String, BTreeMap<String, Summary>>) -> TargetResult {
    let median = |side: &str| summaries.get(&t.metric).and_then(|m| m.get(side)).map(|s| s.median);
    let measured = match &t.versus {
        Some(v) => match (median(&t.side), median(v)) {
            (Some(a), Some(b)) if b != 0.0 => Some(a / b),
            _ => None,
        },
        None => median(&t.side),
    };
    let met = measured.is_some_and(|m| t.at_most.is_none_or(|x| m <= x) && t.at_least.is_none_or(|x| m >= x));
    TargetResult { target: t.clone(), measured, met }
}

/// Formats a number for tables: a few significant digits.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

impl Report {
    /// The report as a Markdown section.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = format!(
            "### `{}`\n\n{}\n\nMeasured {} on {} ({} cores, {} GiB, kernel {}), commit `{}`, load average {}.\n\n",
            self.scenario,
            self.description.trim(),
            m.date,
            m.cpu,
            m.cores,
            m.memory_gib,
            m.kernel,
            m.commit,
            m.load_average
        );
        out.push_str("| metric | side | median | min | max | spread | n |\n|---|---|---:|---:|---:|---:|---:|\n");
        for (metric, by_side) in &self.summaries {
            let unit = self.units.get(metric).map(String::as_str).unwrap_or("");
            for (side, s) in by_side {
                out.push_str(&format!(
                    "| {metric} ({unit}) | {side} | {} | {} | {} | {:.0}% | {} |\n",
                    fmt_num(s.median),
                    fmt_num(s.min),
                    fmt_num(s.max),
                    s.spread * 100.0,
                    s.n
                ));
            }
        }
        if !self.targets.is_empty() {
            out.push_str("\n| target | measured | met |\n|---|---:|---|\n");
            for t in &self.targets {
                let measured = t.measured.map(fmt_num).unwrap_or_else(|| "not measured".into());
                out.push_str(&format!(
                    "| {} | {measured} | {} |\n",
                    t.target.name,
                    if t.met { "yes" } else { "**no**" }
                ));
            }
        }
        out
    }

    /// The report as a terminal table.
    pub fn table(&self) -> String {
        let mut out = format!("{}\n", self.scenario);
        out.push_str(&format!(
            "{:<36} {:<26} {:>12} {:>12} {:>12} {:>8}\n",
            "metric", "side", "median", "min", "max", "spread"
        ));
        for (metric, by_side) in &self.summaries {
            let unit = self.units.get(metric).map(String::as_str).unwrap_or("");
            for (side, s) in by_side {
                out.push_str(&format!(
                    "{:<36} {:<26} {:>12} {:>12} {:>12} {:>7.0}%\n",
                    format!("{metric} ({unit})"),
                    side,
                    fmt_num(s.median),
                    fmt_num(s.min),
                    fmt_num(s.max),
                    s.spread * 100.0
                ));
            }
        }
        for t in &self.targets {
            let measured = t.measured.map(fmt_num).unwrap_or_else(|| "not measured".into());
            out.push_str(&format!(
                "target: {} — measured {measured} — {}\n",
                t.target.name,
                if t.met { "met" } else { "NOT met" }
            ));
        }
        out
    }

    /// Writes `<dir>/<scenario>.json` and `<dir>/<scenario>.md`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let json = dir.join(format!("{}.json", self.scenario));
        let md = dir.join(format!("{}.md", self.scenario));
        std::fs::write(&json, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", json.display()))?;
        std::fs::write(&md, self.markdown()).with_context(|| format!("writing {}", md.display()))?;
        Ok((json, md))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        calls: Vec<String>,
    }

    impl Scenario for Fake {
        fn sides(&self) -> Vec<String> {
            vec!["a".into(), "b".into()]
        }
        fn run_once(&mut self, side: &str) -> anyhow::Result<Vec<Metric>> {
            self.calls.push(side.to_owned());
            let v = if side == "a" { 2.0 } else { 4.0 };
            Ok(vec![Metric::new("rate", "ops/s", v)])
        }
    }

    fn file(targets: Vec<Target>) -> ScenarioFile {
        ScenarioFile {
            name: "fake".into(),
            description: "d".into(),
            repetitions: 3,
            params: yaml_serde::Value::Null,
            quick: yaml_serde::Value::Null,
            targets,
        }
    }

    #[test]
    fn sides_alternate_and_targets_are_judged() {
        let t = |at_most: Option<f64>, at_least: Option<f64>| Target {
            name: "a at most half of b".into(),
            metric: "rate".into(),
            side: "a".into(),
            versus: Some("b".into()),
            at_most,
            at_least,
        };
        let mut s = Fake { calls: vec![] };
        let report =
            run_scenario(&file(vec![t(Some(0.5), None), t(None, Some(0.6))]), &mut s, 3, Path::new(".")).expect("run");
        assert_eq!(s.calls, ["a", "b", "b", "a", "a", "b"]);
        assert_eq!(report.summaries["rate"]["a"].median, 2.0);
        assert_eq!(report.targets[0].measured, Some(0.5));
        assert!(report.targets[0].met);
        assert!(!report.targets[1].met);
        assert!(report.markdown().contains("| rate (ops/s) | b | 4.00 |"));
    }

    #[test]
    fn missing_side_is_not_met() {
        let t = Target {
            name: "x".into(),
            metric: "nope".into(),
            side: "a".into(),
            versus: None,
            at_most: Some(1.0),
            at_least: None,
        };
        let mut s = Fake { calls: vec![] };
        let report = run_scenario(&file(vec![t]), &mut s, 1, Path::new(".")).expect("run");
        assert_eq!(report.targets[0].measured, None);
        assert!(!report.targets[0].met);
    }
}
