//! Helpers shared by Aperture's tests: a dev-dependency of the shipped crates, and a
//! dependency of the perf harness (which is not shipped) for its ClickHouse server.
//!
//! - [`skip`]: report a test that cannot run here. The line goes straight to
//!   the process's stderr, past the test harness's output capture, so a skip
//!   is always visible; with `APERTURE_REQUIRE_ALL_TESTS=1` (set by CI, which
//!   has root and ClickHouse) a skip fails the test instead.
//! - [`require_root`]: skip unless running as root.
//! - [`build_c_program`]: compile a C test program with frame pointers, or
//!   use the one already built when [`PREBUILT`] is set (inside the kernel
//!   matrix's guests, which have no compiler).
//! - [`clickhouse`]: a throwaway ClickHouse server (the one launcher of the
//!   workspace: aggregator tests, perf harness, and by hand through the
//!   `clickhouse-test-server` binary).
//! - [`clickhouse_cluster`]: ZooKeeper and several ClickHouse servers
//!   forming a cluster of shards, for the store's cluster mode.

pub mod clickhouse;
pub mod clickhouse_cluster;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable that turns every skip into a failure.
pub const REQUIRE_ALL: &str = "APERTURE_REQUIRE_ALL_TESTS";

/// Environment variable that makes [`build_c_program`] use the binary
/// already at its output path instead of compiling (the kernel matrix builds
/// the programs on the host and copies them into its guests).
pub const PREBUILT: &str = "APERTURE_TEST_PREBUILT";

/// Reports that `test` cannot run here because of `why`. Panics instead when
/// [`REQUIRE_ALL`] is set, so an environment that should run everything
/// never passes a test silently.
pub fn skip(test: &str, why: &str) {
    if std::env::var(REQUIRE_ALL).is_ok_and(|v| v == "1") {
        panic!("{test} cannot run ({why}), but {REQUIRE_ALL}=1 requires every test to run");
    }
    // Written to the file descriptor, not through `eprintln!`, which the
    // test harness captures and shows only for failing tests.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED: {test}: {why}");
}

/// Whether the test runs as root; reports the skip otherwise.
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip(test, "needs root");
    false
}

/// Compiles `<manifest_dir>/tests/programs/<name>.c` into `<out_dir>/<name>`
/// with frame pointers (leaf ones included, as distributions that build with
/// frame pointers do), debug info and pthreads, and returns the binary.
pub fn build_c_program(manifest_dir: &str, out_dir: &str, name: &str) -> PathBuf {
    let src = Path::new(manifest_dir).join("tests/programs").join(format!("{name}.c"));
    let out_dir = Path::new(out_dir).join("programs");
    std::fs::create_dir_all(&out_dir).unwrap_or_else(|e| panic!("creating {}: {e}", out_dir.display()));
    let bin = out_dir.join(name);
    if std::env::var(PREBUILT).is_ok_and(|v| v == "1") {
        assert!(bin.exists(), "{PREBUILT}=1 but {} was not built on the host", bin.display());
        return bin;
    }
    // Tests run in parallel and may build the same program while another
    // runs it: compile to a private name, then rename into place (a running
    // copy keeps its own inode), so no one writes a file being executed.
    let tmp = out_dir.join(format!(".{name}.{}.{:?}", std::process::id(), std::thread::current().id()));
    let status = Command::new("cc")
        .args(["-O1", "-g", "-fno-omit-frame-pointer", "-mno-omit-leaf-frame-pointer", "-pthread", "-o"])
        .arg(&tmp)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("running cc for {}: {e}", src.display()));
    assert!(status.success(), "compiling {} failed", src.display());
    std::fs::rename(&tmp, &bin).unwrap_or_else(|e| panic!("moving {} into place: {e}", tmp.display()));
    bin
}
