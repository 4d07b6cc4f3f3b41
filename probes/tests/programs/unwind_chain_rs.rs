//! Burns CPU in main -> outer -> middle -> leaf_burn for argv[1] seconds,
//! built as `cargo build --release` builds (optimised, no frame pointers).
//! Waits for a byte on stdin before starting and stays alive until stdin
//! closes.
use std::hint::black_box;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[inline(never)]
fn leaf_burn(n: u64) -> u64 {
    let mut x = black_box(1u64);
    for _ in 0..n {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    }
    x
}

#[inline(never)]
fn middle(n: u64) -> u64 {
    let r = leaf_burn(n);
    black_box(r) ^ 1
}

#[inline(never)]
fn outer(n: u64) -> u64 {
    let r = middle(n);
    black_box(r) ^ 2
}

fn main() {
    let secs: f64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let mut stdin = std::io::stdin();
    let mut go = [0u8; 1];
    if stdin.read(&mut go).unwrap_or(0) != 1 {
        return;
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut acc = 0u64;
    while Instant::now() < end {
        acc ^= outer(20_000_000);
    }
    black_box(acc);
    println!("done");
    let _ = std::io::stdout().flush();
    while stdin.read(&mut go).unwrap_or(0) > 0 {}
}
