//! Tidy: the layout rules of ARCHITECTURE.md, checked against the workspace
//! as it is, so that a rule that is only written down cannot drift.
//!
//! - which workspace crate may depend on which (normal and build
//!   dependencies; dev-dependencies are free);
//! - quinn and tonic only in `transport`, ClickHouse and SQLite only in
//!   `aggregator`;
//! - `core` does no I/O and reads no clock;
//! - no source file is longer than [`MAX_LINES`].
//!
//! The dependency rules read `cargo metadata`; the source rules read the
//! files. Each rule is a function over plain data, and the tests at the bottom
//! also feed them a deliberately broken workspace, so a rule that stopped
//! finding anything would fail here too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The longest a source file may be before it is split by concept.
const MAX_LINES: usize = 800;

/// Each workspace crate and the workspace crates it may depend on.
const ALLOWED_CRATE_DEPS: &[(&str, &[&str])] = &[
    ("aperture-core", &[]),
    ("aperture-testkit", &[]),
    ("aperture-symbolize", &["aperture-core"]),
    ("aperture-probes", &["aperture-core", "aperture-symbolize"]),
    ("aperture-transport", &["aperture-core"]),
    ("aperture-agent", &["aperture-core", "aperture-probes", "aperture-symbolize", "aperture-transport"]),
    ("aperture-aggregator", &["aperture-core", "aperture-transport"]),
    (
        "aperture-perf",
        &[
            "aperture-core",
            "aperture-probes",
            "aperture-symbolize",
            "aperture-transport",
            "aperture-aggregator",
            "aperture-testkit",
        ],
    ),
    (
        "aperture",
        &[
            "aperture-core",
            "aperture-probes",
            "aperture-symbolize",
            "aperture-transport",
            "aperture-agent",
            "aperture-aggregator",
        ],
    ),
];

/// External crates that only one workspace crate may depend on.
const CONFINED: &[(&str, &str)] = &[
    ("quinn", "aperture-transport"),
    ("quinn-proto", "aperture-transport"),
    ("quinn-udp", "aperture-transport"),
    ("tonic", "aperture-transport"),
    ("tonic-prost", "aperture-transport"),
    ("tonic-prost-build", "aperture-transport"),
    ("clickhouse", "aperture-aggregator"),
    ("rusqlite", "aperture-aggregator"),
];

/// What `core` must not write: file and network I/O, clocks, sleeping,
/// the process environment.
const CORE_FORBIDDEN: &[&str] = &[
    "std::fs",
    "std::net::Tcp",
    "std::net::Udp",
    "std::os::unix::net",
    "Instant::now",
    "SystemTime::now",
    "std::thread::sleep",
    "std::env::var",
    "std::process::Command",
];

/// One workspace crate: its name and its normal and build dependencies.
#[derive(Debug, Clone)]
struct Package {
    name: String,
    deps: BTreeSet<String>,
}

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace crates from `cargo metadata` (offline: the lock file is
/// already resolved).
fn workspace_packages() -> Vec<Package> {
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(workspace_root())
        .output()
        .expect("running cargo metadata");
    assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let packages = meta["packages"].as_array().expect("metadata has packages");
    packages
        .iter()
        .map(|p| Package {
            name: p["name"].as_str().expect("package name").to_owned(),
            deps: p["dependencies"]
                .as_array()
                .expect("package dependencies")
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .map(|d| d["name"].as_str().expect("dependency name").to_owned())
                .collect(),
        })
        .collect()
}

/// Violations of [`ALLOWED_CRATE_DEPS`] and [`CONFINED`].
fn dependency_violations(packages: &[Package]) -> Vec<String> {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED_CRATE_DEPS.iter().copied().collect();
    let workspace: BTreeSet<&str> = packages.iter().map(|p| p.name.as_str()).collect();
    let mut out = Vec::new();
    for p in packages {
        let Some(ok) = allowed.get(p.name.as_str()) else {
            out.push(format!(
                "{} is not in tests/tidy.rs's ALLOWED_CRATE_DEPS: add it with the crates it may depend on, and to ARCHITECTURE.md",
                p.name
            ));
            continue;
        };
        for d in &p.deps {
            if workspace.contains(d.as_str()) && !ok.contains(&d.as_str()) {
                out.push(format!("{} depends on {d}, which ARCHITECTURE.md does not allow", p.name));
            }
            if let Some((_, owner)) = CONFINED.iter().find(|(c, _)| c == d)
                && p.name != *owner
            {
                out.push(format!("{} depends on {d}, which only {owner} may use", p.name));
            }
        }
    }
    out
}

/// Every `.rs` file under `dir`, leaving out build outputs and fuzz corpora.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if !matches!(name.as_ref(), "target" | ".git" | "node_modules" | "corpus" | "artifacts") {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// `(path, text)` of every Rust source in the workspace.
fn sources() -> Vec<(PathBuf, String)> {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            (p.strip_prefix(&root).map(Path::to_path_buf).unwrap_or(p), text)
        })
        .collect()
}

fn length_violations(files: &[(PathBuf, String)]) -> Vec<String> {
    files
        .iter()
        .filter(|(_, text)| text.lines().count() > MAX_LINES)
        .map(|(p, text)| {
            format!("{} has {} lines, more than {MAX_LINES}: split it by concept", p.display(), text.lines().count())
        })
        .collect()
}

/// Lines of `core/src` that use something [`CORE_FORBIDDEN`] names. Comment
/// lines are skipped; a test module at the bottom of a file may use the
/// file system for fixtures, so scanning stops at `#[cfg(test)]`.
fn core_io_violations(files: &[(PathBuf, String)]) -> Vec<String> {
    let mut out = Vec::new();
    for (path, text) in files.iter().filter(|(p, _)| p.starts_with("core/src")) {
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("#[cfg(test)]") {
                break;
            }
            if code.starts_with("//") {
                continue;
            }
            if let Some(what) = CORE_FORBIDDEN.iter().find(|f| code.contains(*f)) {
                out.push(format!(
                    "{}:{}: core uses {what}; core does no I/O and reads no clock",
                    path.display(),
                    n + 1
                ));
            }
        }
    }
    out
}

fn assert_none(what: &str, violations: &[String]) {
    assert!(violations.is_empty(), "{what}:\n  {}", violations.join("\n  "));
}

#[test]
fn crates_depend_only_on_what_the_architecture_allows() {
    let packages = workspace_packages();
    assert!(packages.iter().any(|p| p.name == "aperture-core"), "cargo metadata lists the workspace crates");
    assert_none("dependency rules broken", &dependency_violations(&packages));
}

#[test]
fn core_does_no_io_and_reads_no_clock() {
    assert_none("I/O or a clock in core", &core_io_violations(&sources()));
}

#[test]
fn no_source_file_is_longer_than_the_limit() {
    assert_none("files too long", &length_violations(&sources()));
}

#[test]
fn the_rules_catch_a_deliberately_broken_workspace() {
    // The real workspace with three mistakes added: the agent depends on
    // the aggregator, core on quinn, and the aggregator on tonic.
    let mut packages = workspace_packages();
    let before: BTreeSet<String> = dependency_violations(&packages).into_iter().collect();
    for p in &mut packages {
        match p.name.as_str() {
            "aperture-agent" => drop(p.deps.insert("aperture-aggregator".into())),
            "aperture-core" => drop(p.deps.insert("quinn".into())),
            "aperture-aggregator" => drop(p.deps.insert("tonic".into())),
            _ => {}
        }
    }
    let found: Vec<String> = dependency_violations(&packages).into_iter().filter(|v| !before.contains(v)).collect();
    assert!(found.iter().any(|v| v.starts_with("aperture-agent depends on aperture-aggregator")), "{found:?}");
    assert!(found.iter().any(|v| v.starts_with("aperture-core depends on quinn")), "{found:?}");
    assert!(found.iter().any(|v| v.starts_with("aperture-aggregator depends on tonic")), "{found:?}");
    assert_eq!(found.len(), 3, "only the three added mistakes: {found:?}");

    let unknown = [Package { name: "aperture-new".into(), deps: BTreeSet::new() }];
    assert_eq!(dependency_violations(&unknown).len(), 1, "a crate missing from the table is reported");

    let files = vec![
        (PathBuf::from("core/src/bad.rs"), "use std::fs::File;\n// std::fs in a comment\nlet t = Instant::now();\n#[cfg(test)]\nmod tests { use std::fs; }\n".to_owned()),
        (PathBuf::from("agent/src/fine.rs"), "use std::fs::File;\n".to_owned()),
        (PathBuf::from("agent/src/long.rs"), "x\n".repeat(MAX_LINES + 1)),
    ];
    let io = core_io_violations(&files);
    assert_eq!(io.len(), 2, "std::fs and Instant::now in core's code, not in comments or tests: {io:?}");
    assert!(io[0].starts_with("core/src/bad.rs:1:"), "{io:?}");
    let long = length_violations(&files);
    assert_eq!(long.len(), 1, "{long:?}");
    assert!(long[0].starts_with("agent/src/long.rs"), "{long:?}");
}
