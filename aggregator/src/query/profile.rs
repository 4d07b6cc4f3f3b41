//! Profile renderings: folded stacks, SVG, top functions, diff (the
//! flame-graph tree is in [`super::flame`]). Sums saturate at `u64::MAX`.

use std::collections::{BTreeMap, HashMap, HashSet};

use aperture_core::model::Mode;
use serde::Serialize;

use super::Profile;

/// Folded stacks, root first: `a;b;c 42`, one line per distinct stack, sorted.
/// Stacks with the same names (different hashes) are merged.
pub fn folded(profile: &Profile, mode: Mode) -> String {
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for s in &profile.stacks {
        let v = s.value(mode);
        if v > 0 {
            let line = lines.entry(fold_names(&s.names)).or_default();
            *line = line.saturating_add(v);
        }
    }
    let mut out = String::new();
    for (stack, v) in lines {
        out.push_str(&stack);
        out.push(' ');
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

/// Joins names with `;`, replacing characters the folded format reserves.
fn fold_names(names: &[String]) -> String {
    names.iter().map(|n| n.replace([';', '\n'], "_")).collect::<Vec<_>>().join(";")
}

/// An SVG flame graph (inferno) of values in `unit`.
pub fn svg(profile: &Profile, mode: Mode, unit: &str, title: &str) -> std::io::Result<Vec<u8>> {
    let text = folded(profile, mode);
    let mut options = inferno::flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = unit.to_owned();
    let mut out = Vec::new();
    if text.is_empty() {
        // inferno refuses empty input; an empty graph is still a valid answer.
        options.subtitle = Some("no samples in the selected range".to_owned());
        inferno::flamegraph::from_lines(&mut options, ["no_samples 0"], &mut out)
            .or_else(|_| empty_svg(&mut out, title))?;
        return Ok(out);
    }
    inferno::flamegraph::from_lines(&mut options, text.lines(), &mut out)?;
    Ok(out)
}

fn empty_svg(out: &mut Vec<u8>, title: &str) -> std::io::Result<()> {
    use std::io::Write;
    out.clear();
    let title = title.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    write!(
        out,
        "<?xml version=\"1.0\" standalone=\"no\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"1200\" height=\"60\">\
         <text x=\"10\" y=\"30\">{title}: no samples in the selected range</text></svg>\n"
    )
}

/// A function's share of a profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TopEntry {
    /// Function name.
    pub name: String,
    /// Value of the stacks where the function is the leaf.
    #[serde(rename = "self")]
    pub self_value: u64,
    /// Value of the stacks the function appears in (counted once per stack,
    /// however often it recurses).
    pub total: u64,
}

/// Top functions by self or total value, largest first, ties by name.
pub fn top(profile: &Profile, mode: Mode, by_total: bool, limit: usize) -> Vec<TopEntry> {
    let mut acc: HashMap<&str, (u64, u64)> = HashMap::new();
    for s in &profile.stacks {
        let v = s.value(mode);
        if v == 0 {
            continue;
        }
        if let Some(leaf) = s.names.last() {
            let e = acc.entry(leaf).or_default();
            e.0 = e.0.saturating_add(v);
        }
        let mut seen = HashSet::new();
        for n in &s.names {
            if seen.insert(n.as_str()) {
                let e = acc.entry(n).or_default();
                e.1 = e.1.saturating_add(v);
            }
        }
    }
    let mut out: Vec<TopEntry> =
        acc.into_iter().map(|(name, (s, t))| TopEntry { name: name.to_owned(), self_value: s, total: t }).collect();
    let key = |e: &TopEntry| if by_total { e.total } else { e.self_value };
    out.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.name.cmp(&b.name)));
    out.truncate(limit);
    out
}

/// A stack's value in two ranges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiffEntry {
    /// Stack, root first, `;`-separated.
    pub stack: String,
    /// Value in the base range.
    pub base: u64,
    /// Value in the compared range.
    pub value: u64,
    /// `value - base`.
    pub delta: i64,
}

/// Per-stack difference, largest absolute change first, ties by stack.
pub fn diff(base: &Profile, current: &Profile, mode: Mode, limit: usize) -> Vec<DiffEntry> {
    let mut acc: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for s in &base.stacks {
        let e = acc.entry(fold_names(&s.names)).or_default();
        e.0 = e.0.saturating_add(s.value(mode));
    }
    for s in &current.stacks {
        let e = acc.entry(fold_names(&s.names)).or_default();
        e.1 = e.1.saturating_add(s.value(mode));
    }
    let mut out: Vec<DiffEntry> = acc
        .into_iter()
        .filter(|(_, (b, v))| *b != 0 || *v != 0)
        .map(|(stack, (b, v))| DiffEntry {
            stack,
            base: b,
            value: v,
            delta: i64::try_from(v).unwrap_or(i64::MAX).saturating_sub(i64::try_from(b).unwrap_or(i64::MAX)),
        })
        .collect();
    out.sort_by(|a, b| b.delta.unsigned_abs().cmp(&a.delta.unsigned_abs()).then_with(|| a.stack.cmp(&b.stack)));
    out.truncate(limit);
    out
}

#[cfg(test)]
mod tests {
    use super::super::ProfileStack;
    use super::*;
    use aperture_core::model::StackHash;

    fn profile(stacks: &[(&str, u64)]) -> Profile {
        Profile {
            mode: Some(Mode::Cpu),
            stacks: stacks
                .iter()
                .enumerate()
                .map(|(i, (s, n))| ProfileStack {
                    hash: StackHash(i as u64 + 1),
                    names: s.split(';').map(str::to_owned).collect(),
                    frames: Vec::new(),
                    count: *n,
                    total_ns: *n * 10,
                })
                .collect(),
        }
    }

    #[test]
    fn folded_is_root_first_and_merges_equal_names() {
        let p = profile(&[("main;a", 1), ("main;a", 2), ("main;b", 4)]);
        assert_eq!(folded(&p, Mode::Cpu), "main;a 3\nmain;b 4\n");
        assert_eq!(folded(&p, Mode::Lock), "main;a 30\nmain;b 40\n");
    }

    #[test]
    fn top_counts_recursion_once() {
        let p = profile(&[("main;f;f;f", 4), ("main;g", 1)]);
        let t = top(&p, Mode::Cpu, true, 10);
        assert_eq!(t[0], TopEntry { name: "main".into(), self_value: 0, total: 5 });
        assert_eq!(t[1], TopEntry { name: "f".into(), self_value: 4, total: 4 });
        let s = top(&p, Mode::Cpu, false, 1);
        assert_eq!(s, vec![TopEntry { name: "f".into(), self_value: 4, total: 4 }]);
    }

    #[test]
    fn diff_orders_by_absolute_change() {
        let base = profile(&[("main;a", 10), ("main;b", 1)]);
        let cur = profile(&[("main;a", 4), ("main;c", 3)]);
        let d = diff(&base, &cur, Mode::Cpu, 10);
        assert_eq!(d[0], DiffEntry { stack: "main;a".into(), base: 10, value: 4, delta: -6 });
        assert_eq!(d[1].stack, "main;c");
        assert_eq!(d[2].delta, -1);
    }

    #[test]
    fn sums_saturate_instead_of_overflowing() {
        let mut p = profile(&[("main;a", 1), ("main;a", 1)]);
        p.stacks[0].count = u64::MAX;
        assert_eq!(folded(&p, Mode::Cpu), format!("main;a {}\n", u64::MAX));
        assert_eq!(top(&p, Mode::Cpu, true, 1)[0].total, u64::MAX);
        assert_eq!(diff(&Profile::default(), &p, Mode::Cpu, 1)[0].value, u64::MAX);
    }

    /// Folded output, top and diff of an 80 000-frame stack, on a thread
    /// with a 256 KiB stack.
    #[test]
    fn deep_stacks_render_without_recursion() {
        let t = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let names: Vec<String> = (0..80_000).map(|i| format!("f{i}")).collect();
                let p = profile(&[(names.join(";").as_str(), 3)]);
                (folded(&p, Mode::Cpu).len(), top(&p, Mode::Cpu, true, 5).len(), diff(&p, &p, Mode::Cpu, 5).len())
            })
            .expect("spawn");
        let (folded_len, top_len, diff_len) = t.join().expect("no stack overflow");
        assert!(folded_len > 80_000 * 3);
        assert_eq!((top_len, diff_len), (5, 1));
    }

    #[test]
    fn svg_renders_even_without_samples() {
        let empty = Profile::default();
        let out = svg(&empty, Mode::Cpu, "samples", "cpu").expect("svg");
        assert!(String::from_utf8_lossy(&out).contains("<svg"));
        let out = svg(&profile(&[("main;a", 3)]), Mode::Cpu, "samples", "cpu").expect("svg");
        assert!(String::from_utf8_lossy(&out).contains("main"));
    }
}
