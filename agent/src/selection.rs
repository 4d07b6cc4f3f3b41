//! Which processes the agent profiles (`filter` in the configuration).
//!
//! Everything by default. Each configured criterion narrows the selection
//! and all of them must hold: `namespaces` and `pod_selector` keep only
//! processes in a matching pod (so they exclude host processes), `processes`
//! keeps only the named `comm`s, `pids` only those process ids, `cgroups`
//! only processes at or below those cgroup v2 directories.
//!
//! `pids` and `cgroups` can also be enforced in the kernel (see
//! [`Selection::kernel_pids`]) so unselected processes cost nothing there;
//! the user-space check stays as the authority.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use aperture_core::config::Filter;

/// Mount point of the cgroup v2 hierarchy.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// A `filter.pod_selector` that cannot be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid pod selector `{selector}`: {reason}; expected comma-separated requirements such as \
     `app=web`, `tier!=cache`, `env in (prod,staging)`, `env notin (dev)`, `canary` or `!canary`"
)]
pub struct SelectorError {
    /// The whole selector as configured.
    pub selector: String,
    /// What is wrong with it.
    pub reason: String,
}

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    /// `key=value` or `key==value`.
    Equals(String, String),
    /// `key!=value` (also true when the label is absent).
    NotEquals(String, String),
    /// `key in (a,b)`.
    In(String, Vec<String>),
    /// `key notin (a,b)` (also true when the label is absent).
    NotIn(String, Vec<String>),
    /// `key`: the label exists.
    Exists(String),
    /// `!key`: the label does not exist.
    DoesNotExist(String),
}

impl Requirement {
    fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        }
    }
}

/// A parsed Kubernetes label selector (the set-based syntax).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LabelSelector {
    /// All must match; empty matches everything.
    pub requirements: Vec<Requirement>,
}

impl LabelSelector {
    /// Parses `app=web,tier!=cache,env in (a,b),canary,!legacy`.
    pub fn parse(selector: &str) -> Result<LabelSelector, SelectorError> {
        let err = |reason: String| SelectorError { selector: selector.to_owned(), reason };
        let mut requirements = Vec::new();
        for part in split_top_level(selector).map_err(&err)? {
            let part = part.trim();
            if part.is_empty() {
                return Err(err("an empty requirement (two commas in a row, or a trailing comma)".into()));
            }
            requirements.push(parse_requirement(part).map_err(&err)?);
        }
        Ok(LabelSelector { requirements })
    }

    /// Whether the labels satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }
}

/// Splits at commas outside parentheses.
fn split_top_level(s: &str) -> Result<Vec<&str>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err("a `)` without its `(`".into());
                }
            }
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("a `(` without its `)`".into());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

fn parse_requirement(part: &str) -> Result<Requirement, String> {
    if let Some(key) = part.strip_prefix('!') {
        return Ok(Requirement::DoesNotExist(label_key(key.trim())?));
    }
    if let Some((k, v)) = part.split_once("!=") {
        return Ok(Requirement::NotEquals(label_key(k.trim())?, label_value(v.trim())?));
    }
    if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
        return Ok(Requirement::Equals(label_key(k.trim())?, label_value(v.trim())?));
    }
    if let Some(open) = part.find('(') {
        let head = part[..open].trim();
        let close = part.rfind(')').ok_or_else(|| format!("`{part}` lacks a closing `)`"))?;
        if !part[close + 1..].trim().is_empty() {
            return Err(format!("unexpected text after `)` in `{part}`"));
        }
        let values = part[open + 1..close].split(',').map(|v| label_value(v.trim())).collect::<Result<Vec<_>, _>>()?;
        if values.iter().any(String::is_empty) {
            return Err(format!("an empty value in the set of `{part}`"));
        }
        let (key, op) =
            head.rsplit_once(char::is_whitespace).ok_or_else(|| format!("`{part}` lacks `in` or `notin`"))?;
        let key = label_key(key.trim())?;
        return match op {
            "in" => Ok(Requirement::In(key, values)),
            "notin" => Ok(Requirement::NotIn(key, values)),
            other => Err(format!("unknown operator `{other}` in `{part}`: expected in or notin")),
        };
    }
    Ok(Requirement::Exists(label_key(part)?))
}

fn label_key(k: &str) -> Result<String, String> {
    // `prefix/name`: the name part is at most 63 characters of
    // alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
    let name = k.rsplit_once('/').map_or(k, |(_, n)| n);
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        && name.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && name.as_bytes().last().is_some_and(u8::is_ascii_alphanumeric);
    if ok { Ok(k.to_owned()) } else { Err(format!("`{k}` is not a valid label key")) }
}

fn label_value(v: &str) -> Result<String, String> {
    let ok = v.len() <= 63 && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok { Ok(v.to_owned()) } else { Err(format!("`{v}` is not a valid label value")) }
}

/// What the selection needs to know about a process.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Process id.
    pub pid: u32,
    /// `comm`.
    pub process: &'a str,
    /// cgroup v2 path (relative to the hierarchy root, `/`-prefixed), if known.
    pub cgroup_path: Option<&'a str>,
    /// Namespace and labels of its pod, when it runs in one.
    pub pod: Option<(&'a str, &'a BTreeMap<String, String>)>,
}

/// The compiled `filter`.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    namespaces: HashSet<String>,
    pod_selector: Option<LabelSelector>,
    processes: HashSet<String>,
    pids: HashSet<u32>,
    /// cgroup v2 paths relative to [`CGROUP_ROOT`], `/`-prefixed, no trailing `/`.
    cgroups: Vec<String>,
}

/// A `filter` that cannot be compiled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectionError {
    /// `filter.pod_selector` is malformed.
    #[error("filter.pod_selector: {0}")]
    Selector(#[from] SelectorError),
    /// A `filter.cgroups` entry is not under the cgroup v2 mount.
    #[error(
        "filter.cgroups: `{0}` is not a directory under {CGROUP_ROOT}; give paths like {CGROUP_ROOT}/system.slice/nginx.service"
    )]
    CgroupOutsideRoot(PathBuf),
}

impl Selection {
    /// Compiles the configured filter.
    pub fn new(filter: &Filter) -> Result<Selection, SelectionError> {
        let pod_selector = if filter.pod_selector.trim().is_empty() {
            None
        } else {
            Some(LabelSelector::parse(&filter.pod_selector)?)
        };
        let cgroups = filter
            .cgroups
            .iter()
            .map(|p| {
                let rel = p.strip_prefix(CGROUP_ROOT).map_err(|_| SelectionError::CgroupOutsideRoot(p.clone()))?;
                let rel = rel.to_string_lossy();
                Ok(format!("/{}", rel.trim_matches('/')))
            })
            .collect::<Result<Vec<_>, SelectionError>>()?;
        Ok(Selection {
            namespaces: filter.namespaces.iter().cloned().collect(),
            pod_selector,
            processes: filter.processes.iter().cloned().collect(),
            pids: filter.pids.iter().copied().collect(),
            cgroups,
        })
    }

    /// Whether every process is selected.
    pub fn selects_everything(&self) -> bool {
        self.namespaces.is_empty()
            && self.pod_selector.is_none()
            && self.processes.is_empty()
            && self.pids.is_empty()
            && self.cgroups.is_empty()
    }

    /// Whether the selection needs Kubernetes pod metadata to decide.
    pub fn needs_pods(&self) -> bool {
        !self.namespaces.is_empty() || self.pod_selector.is_some()
    }

    /// The pids the kernel may restrict itself to, when the filter names pids.
    pub fn kernel_pids(&self) -> Option<Vec<u32>> {
        (!self.pids.is_empty()).then(|| {
            let mut v: Vec<u32> = self.pids.iter().copied().collect();
            v.sort_unstable();
            v
        })
    }

    /// The cgroup directories the kernel may restrict itself to.
    pub fn kernel_cgroups(&self) -> Vec<PathBuf> {
        self.cgroups.iter().map(|c| Path::new(CGROUP_ROOT).join(c.trim_start_matches('/'))).collect()
    }

    /// Whether the process is selected.
    pub fn selects(&self, c: &Candidate<'_>) -> bool {
        if !self.pids.is_empty() && !self.pids.contains(&c.pid) {
            return false;
        }
        if !self.processes.is_empty() && !self.processes.contains(c.process) {
            return false;
        }
        if !self.cgroups.is_empty() {
            let Some(path) = c.cgroup_path else { return false };
            let under = |root: &String| {
                root == "/" || path == root || (path.starts_with(root.as_str()) && path[root.len()..].starts_with('/'))
            };
            if !self.cgroups.iter().any(under) {
                return false;
            }
        }
        if self.needs_pods() {
            let Some((namespace, labels)) = c.pod else { return false };
            if !self.namespaces.is_empty() && !self.namespaces.contains(namespace) {
                return false;
            }
            if let Some(sel) = &self.pod_selector
                && !sel.matches(labels)
            {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selector_syntax() {
        use Requirement::*;
        let cases: Vec<(&str, Vec<Requirement>)> = vec![
            ("", vec![]),
            ("app=web", vec![Equals("app".into(), "web".into())]),
            ("app==web", vec![Equals("app".into(), "web".into())]),
            ("tier!=cache", vec![NotEquals("tier".into(), "cache".into())]),
            ("env in (prod, staging)", vec![In("env".into(), vec!["prod".into(), "staging".into()])]),
            ("env notin (dev)", vec![NotIn("env".into(), vec!["dev".into()])]),
            ("canary", vec![Exists("canary".into())]),
            ("!legacy", vec![DoesNotExist("legacy".into())]),
            (
                "app.kubernetes.io/name=api, env in (a,b),!x",
                vec![
                    Equals("app.kubernetes.io/name".into(), "api".into()),
                    In("env".into(), vec!["a".into(), "b".into()]),
                    DoesNotExist("x".into()),
                ],
            ),
        ];
        for (s, want) in cases {
            assert_eq!(LabelSelector::parse(s).map(|l| l.requirements), Ok(want), "{s}");
        }
    }

    #[test]
    fn selector_errors_name_the_problem() {
        let cases = [
            ("app=web,", "an empty requirement (two commas in a row, or a trailing comma)"),
            ("env in (a,b", "a `(` without its `)`"),
            ("env in a,b)", "a `)` without its `(`"),
            ("env within (a)", "unknown operator `within` in `env within (a)`: expected in or notin"),
            ("(a)", "`(a)` lacks `in` or `notin`"),
            ("app=we b", "`we b` is not a valid label value"),
            ("-app=web", "`-app` is not a valid label key"),
            ("env in (a,,b)", "an empty value in the set of `env in (a,,b)`"),
        ];
        for (s, reason) in cases {
            let e = LabelSelector::parse(s).expect_err(s);
            assert_eq!(e.reason, reason, "{s}");
        }
        let e = LabelSelector::parse("app=web,").unwrap_err();
        assert!(e.to_string().starts_with("invalid pod selector `app=web,`: an empty requirement"), "{e}");
    }

    #[test]
    fn selector_semantics() {
        let web = labels(&[("app", "web"), ("env", "prod")]);
        let none = labels(&[]);
        let check = |s: &str, l: &BTreeMap<String, String>| LabelSelector::parse(s).expect(s).matches(l);
        assert!(check("app=web", &web));
        assert!(!check("app=api", &web));
        assert!(check("app!=api", &web));
        assert!(check("app!=api", &none), "!= holds when the label is absent");
        assert!(check("env in (prod,staging)", &web));
        assert!(!check("env in (prod)", &none));
        assert!(check("env notin (dev)", &none));
        assert!(check("app", &web) && !check("app", &none));
        assert!(check("!app", &none) && !check("!app", &web));
        assert!(check("app=web,env=prod", &web) && !check("app=web,env=dev", &web));
    }

    fn filter(f: impl FnOnce(&mut Filter)) -> Selection {
        let mut filter = Filter::default();
        f(&mut filter);
        Selection::new(&filter).expect("valid filter")
    }

    #[test]
    fn default_selects_everything() {
        let s = filter(|_| {});
        assert!(s.selects_everything() && !s.needs_pods() && s.kernel_pids().is_none());
        assert!(s.selects(&Candidate { pid: 1, process: "init", cgroup_path: None, pod: None }));
    }

    #[test]
    fn criteria_combine() {
        let web = labels(&[("app", "web")]);
        let s = filter(|f| {
            f.namespaces = vec!["shop".into()];
            f.pod_selector = "app=web".into();
            f.processes = vec!["nginx".into()];
        });
        let mut c = Candidate { pid: 10, process: "nginx", cgroup_path: None, pod: Some(("shop", &web)) };
        assert!(s.selects(&c));
        c.pod = Some(("other", &web));
        assert!(!s.selects(&c), "wrong namespace");
        c.pod = None;
        assert!(!s.selects(&c), "host process excluded by pod criteria");
        c.pod = Some(("shop", &web));
        c.process = "bash";
        assert!(!s.selects(&c), "wrong process");
    }

    #[test]
    fn pids_and_cgroups() {
        let s = filter(|f| {
            f.pids = vec![7, 3];
            f.cgroups = vec![PathBuf::from("/sys/fs/cgroup/system.slice/web.service/")];
        });
        assert_eq!(s.kernel_pids(), Some(vec![3, 7]));
        assert_eq!(s.kernel_cgroups(), vec![PathBuf::from("/sys/fs/cgroup/system.slice/web.service")]);
        let c = |pid, path| Candidate { pid, process: "x", cgroup_path: path, pod: None };
        assert!(s.selects(&c(7, Some("/system.slice/web.service"))));
        assert!(s.selects(&c(7, Some("/system.slice/web.service/worker"))));
        assert!(!s.selects(&c(7, Some("/system.slice/web.service2"))));
        assert!(!s.selects(&c(8, Some("/system.slice/web.service"))));
        assert!(!s.selects(&c(7, None)));
        let f = Filter { cgroups: vec![PathBuf::from("/tmp/x")], ..Filter::default() };
        assert_eq!(
            Selection::new(&f).unwrap_err().to_string(),
            "filter.cgroups: `/tmp/x` is not a directory under /sys/fs/cgroup; give paths like /sys/fs/cgroup/system.slice/nginx.service"
        );
    }
}
