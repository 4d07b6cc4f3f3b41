//! Rows checked against binutils' own interpretation of the same CFI
//! (`readelf --debug-dump=frames-interp`), row by row.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use super::*;

/// One interpreted row of readelf: CFA text and register columns.
#[derive(Clone, Debug)]
struct Interp {
    cfa: String,
    regs: HashMap<String, String>,
}

/// An FDE's range and its rows (start, end, rows by LOC).
type Fde = (u64, u64, Vec<(u64, Interp)>);

/// FDE ranges with their rows, from readelf's output.
fn readelf_rows(path: &Path) -> Option<Vec<Fde>> {
    // Not installed: skip. Installed, it must describe the file (binutils
    // 2.40 exits 1 on libc.so.6 after printing the whole table).
    let out = Command::new("readelf").arg("--debug-dump=frames-interp").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Contents of the ."), "readelf printed no frame table for {path:?}: {out:?}");
    let mut cies: HashMap<String, Interp> = HashMap::new();
    let mut fdes = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let is_cie = f.get(3) == Some(&"CIE");
        let is_fde = f.get(3) == Some(&"FDE");
        if !is_cie && !is_fde {
            continue;
        }
        // Optional table: a "LOC CFA <regs...>" header then rows.
        let mut rows = Vec::new();
        if lines.peek().is_some_and(|l| l.trim_start().starts_with("LOC")) {
            let cols: Vec<String> = lines.next().unwrap_or_default().split_whitespace().map(str::to_owned).collect();
            while let Some(l) = lines.peek() {
                let v: Vec<&str> = l.split_whitespace().collect();
                if v.len() != cols.len() {
                    break;
                }
                let loc = u64::from_str_radix(v[0], 16).expect("LOC is hex");
                let regs = cols[2..].iter().cloned().zip(v[2..].iter().map(|s| s.to_string())).collect();
                rows.push((loc, Interp { cfa: v[1].to_owned(), regs }));
                lines.next();
            }
        }
        if is_cie {
            if let Some((_, first)) = rows.into_iter().next() {
                cies.insert(f[0].to_owned(), first);
            }
            continue;
        }
        let cie = f.iter().find_map(|s| s.strip_prefix("cie=")).expect("FDE names its CIE");
        let range = f.iter().find_map(|s| s.strip_prefix("pc=")).expect("FDE has a range");
        let (a, b) = range.split_once("..").expect("range");
        let (start, end) = (u64::from_str_radix(a, 16).expect("hex"), u64::from_str_radix(b, 16).expect("hex"));
        if rows.is_empty() {
            let init = cies.get(cie).expect("CIE seen before its FDEs").clone();
            rows.push((start, init));
        }
        fdes.push((start, end, rows));
    }
    Some(fdes)
}

/// What a readelf row must become.
fn expected(i: &Interp) -> (CfaKind, Option<i16>, Result<Option<i32>, ()>) {
    let rbp = match i.regs.get("rbp").map(String::as_str) {
        None | Some("u") | Some("s") => Ok(None),
        Some(c) => match c.strip_prefix("c").and_then(|n| n.parse::<i32>().ok()) {
            Some(n) if n % 8 == 0 && (-1024..1024).contains(&n) => Ok(Some(n)),
            _ => Err(()),
        },
    };
    match i.regs.get("ra").map(String::as_str) {
        Some("c-8") => {}
        Some("u") => return (CfaKind::End, None, Ok(None)),
        _ => return (CfaKind::Unsupported, None, Ok(None)),
    }
    let offset = |s: &str| s.parse::<i64>().ok().and_then(|n| i16::try_from(n).ok());
    if let Some(n) = i.cfa.strip_prefix("rsp+") {
        return offset(n).map_or((CfaKind::Unsupported, None, Ok(None)), |o| (CfaKind::Rsp, Some(o), rbp));
    }
    if let Some(n) = i.cfa.strip_prefix("rbp+") {
        return offset(n).map_or((CfaKind::Unsupported, None, Ok(None)), |o| (CfaKind::Rbp, Some(o), rbp));
    }
    if i.cfa == "exp" {
        // The PLT expression or another one: checked by the caller.
        return (CfaKind::Plt, None, rbp);
    }
    (CfaKind::Unsupported, None, Ok(None))
}

/// Compares every readelf row of `path` with the table; returns (rows
/// compared, table).
fn compare(path: &Path) -> Option<(usize, Table, BuildStats)> {
    let fdes = readelf_rows(path)?;
    let (table, stats) = Table::build(path).expect("table builds");
    let mut compared = 0;
    let mut mismatches = Vec::new();
    for (start, end, rows) in &fdes {
        for (loc, interp) in rows {
            let Some(row) = table.lookup(*loc) else {
                mismatches.push(format!("{loc:#x}: no row"));
                continue;
            };
            compared += 1;
            let (kind, off, rbp) = expected(interp);
            let ok = match kind {
                CfaKind::Plt => {
                    matches!(row.cfa(), CfaKind::Plt | CfaKind::Unsupported)
                        && (row.cfa() == CfaKind::Unsupported || rbp == Ok(row.rbp_saved_at()))
                }
                CfaKind::Unsupported | CfaKind::End => row.cfa() == kind,
                _ => {
                    row.cfa() == kind
                        && off == Some(row.cfa_offset)
                        && match rbp {
                            Ok(at) => row.kind & KIND_RBP_UNKNOWN == 0 && row.rbp_saved_at() == at,
                            Err(()) => row.kind & KIND_RBP_UNKNOWN != 0,
                        }
                }
            };
            if !ok {
                mismatches.push(format!("{loc:#x} in {start:#x}..{end:#x}: readelf {interp:?}, row {row:?}"));
            }
        }
        // Just past the FDE, unless another one starts there.
        let next = fdes.iter().map(|(s, _, _)| *s).filter(|s| s >= end).min();
        if !fdes.iter().any(|(s, e, _)| s <= end && end < e)
            && next.is_none_or(|n| n - end >= 16)
            && let Some(row) = table.lookup(*end)
            && row.cfa() != CfaKind::None
        {
            mismatches.push(format!("{end:#x} (end of {start:#x}): {row:?}, expected no unwind info"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} of {compared} rows differ, e.g. {:?}",
        mismatches.len(),
        &mismatches[..5.min(mismatches.len())]
    );
    Some((compared, table, stats))
}

#[test]
fn libc_rows_match_readelf() {
    let Some(libc) = crate::maps::find_libc() else {
        println!("skipped: no libc mapped");
        return;
    };
    let Some((compared, table, stats)) = compare(&libc) else {
        println!("skipped: readelf not available");
        return;
    };
    println!(
        "libc: {compared} readelf rows agree; {} FDEs, {} CFI rows -> {} table rows, {} bytes ({} B/row), {} PLT rows, {} unsupported",
        stats.fdes,
        stats.cfi_rows,
        table.rows.len(),
        table.bytes(),
        size_of::<Row>(),
        stats.plt_rows,
        stats.unsupported_rows
    );
    assert!(compared > 10_000, "libc has tens of thousands of rows, compared {compared}");
    assert!(stats.plt_rows > 0, "libc's PLT is recognised");
}

#[test]
fn own_test_binary_rows_match_readelf() {
    let exe = std::fs::read_link("/proc/self/exe").expect("own binary");
    let Some((compared, table, _)) = compare(&exe) else {
        println!("skipped: readelf not available");
        return;
    };
    println!("test binary: {compared} readelf rows agree, {} table rows", table.rows.len());
    assert!(compared > 1000);
}

#[test]
fn rows_round_trip_through_u64() {
    let r = Row { pc: 0xdead_beef, cfa_offset: -300, rbp_offset: -2, kind: CfaKind::Rbp as u8 | KIND_RBP_SAVED };
    assert_eq!(Row::from_u64(r.to_u64()), r);
    assert_eq!(r.rbp_saved_at(), Some(-16));
    assert_eq!(r.cfa(), CfaKind::Rbp);
}

#[test]
fn the_plt_expression_is_recognised_and_others_are_not() {
    assert_eq!(plt_threshold(&[0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22]), Some(11));
    assert_eq!(plt_threshold(&[0x77, 0x08, 0x80, 0x00, 0x3f, 0x1a, 0x3a, 0x2a, 0x33, 0x24, 0x22]), Some(10));
    assert_eq!(plt_threshold(&[0x77, 0xa0, 0x01, 0x06]), None);
}

#[test]
fn lookup_finds_the_covering_row() {
    let t = Table {
        rows: vec![
            Row { pc: 0x10, cfa_offset: 8, rbp_offset: 0, kind: CfaKind::Rsp as u8 },
            Row { pc: 0x14, cfa_offset: 16, rbp_offset: 0, kind: CfaKind::Rsp as u8 },
            Row { pc: 0x20, kind: CfaKind::None as u8, ..Row::default() },
        ],
    };
    assert_eq!(t.lookup(0x0f), None);
    assert_eq!(t.lookup(0x13).map(|r| r.cfa_offset), Some(8));
    assert_eq!(t.lookup(0x14).map(|r| r.cfa_offset), Some(16));
    assert_eq!(t.lookup(0x30).map(|r| r.cfa()), Some(CfaKind::None));
    assert_eq!(t.lookup(1 << 33), None);
}
