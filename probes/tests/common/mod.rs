//! Helpers shared by the kernel tests: root check, building the C test
//! programs, running them under control, collecting reader batches.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;

use aperture_probes::RecordBatch;

/// True when the test can use the kernel; otherwise prints the skip line
/// the CI counts and returns false.
pub fn require_root(test: &str) -> bool {
    aperture_testkit::require_root(test)
}

/// Compiles `tests/programs/<name>.c` (frame pointers, leaf frame pointers included, as distributions that
/// build with frame pointers do; debug info) and
/// returns the binary's path.
pub fn build_program(name: &str) -> PathBuf {
    aperture_testkit::build_c_program(env!("CARGO_MANIFEST_DIR"), env!("CARGO_TARGET_TMPDIR"), name)
}

/// A test program waiting for the go byte on stdin.
pub struct Program {
    pub child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Program {
    pub fn spawn(path: &Path, args: &[&str]) -> Program {
        let mut child = Command::new(path)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("test program starts");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Program { child, stdin, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets the program start its work.
    pub fn go(&mut self) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(b"g").expect("write go");
        stdin.flush().expect("flush go");
    }

    /// The next line the program prints (it prints once its work is done).
    pub fn line(&mut self) -> String {
        let mut s = String::new();
        self.stdout.read_line(&mut s).expect("read program output");
        s.trim().to_owned()
    }

    /// Closes stdin so the program exits, and waits for it.
    pub fn finish(mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sink that forwards batches to a channel the test reads.
pub fn channel_sink() -> (impl FnMut(RecordBatch) + Send + 'static, mpsc::Receiver<RecordBatch>) {
    let (tx, rx) = mpsc::channel();
    (
        move |b: RecordBatch| {
            let _ = tx.send(b);
        },
        rx,
    )
}

/// Compiles `tests/programs/<src>.c` with `flags` into `<tmp>/programs/<out>`
/// (compiled to a private name, then renamed into place, so parallel tests
/// never write a file another one runs) and returns the output's path.
/// `link` goes after the source (libraries).
pub fn build_c(out: &str, src: &str, flags: &[&str], link: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs").join(format!("{src}.c"));
    let dir = programs_dir();
    let bin = dir.join(out);
    if let Some(built) = prebuilt(&bin) {
        return built;
    }
    let tmp = dir.join(format!(".{out}.{}.{:?}", std::process::id(), std::thread::current().id()));
    let status = std::process::Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .args(link)
        .status()
        .unwrap_or_else(|e| panic!("running cc for {}: {e}", src.display()));
    assert!(status.success(), "compiling {} failed", src.display());
    std::fs::rename(&tmp, &bin).unwrap_or_else(|e| panic!("moving {} into place: {e}", tmp.display()));
    bin
}

/// With `APERTURE_TEST_PREBUILT=1` (the kernel matrix's guests, which have
/// no compiler) the program built on the host is used as it is.
fn prebuilt(bin: &Path) -> Option<PathBuf> {
    if std::env::var(aperture_testkit::PREBUILT).is_ok_and(|v| v == "1") {
        assert!(bin.exists(), "{}=1 but {} was not built on the host", aperture_testkit::PREBUILT, bin.display());
        return Some(bin.to_path_buf());
    }
    None
}

/// Where [`build_c`] puts its outputs.
pub fn programs_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("programs");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Compiles `tests/programs/<src>.rs` with `rustc` and `flags` into
/// `<tmp>/programs/<out>` (the same private-name-then-rename as [`build_c`]).
pub fn build_rust(out: &str, src: &str, flags: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/programs").join(format!("{src}.rs"));
    let dir = programs_dir();
    let bin = dir.join(out);
    if let Some(built) = prebuilt(&bin) {
        return built;
    }
    let tmp = dir.join(format!(".{out}.{}.{:?}", std::process::id(), std::thread::current().id()));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = std::process::Command::new(rustc)
        .args(flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("running rustc for {}: {e}", src.display()));
    assert!(status.success(), "compiling {} failed", src.display());
    std::fs::rename(&tmp, &bin).unwrap_or_else(|e| panic!("moving {} into place: {e}", tmp.display()));
    bin
}
