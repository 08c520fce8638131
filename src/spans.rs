//! Address spans `[start, end)`, sorted and disjoint, and the set
//! operations the dump needs on them (which pages to read, which to take
//! from the parent image, which a page map covers).

/// Address spans `[start, end)`, sorted and disjoint.
pub type Spans = Vec<(u64, u64)>;

/// The part of sorted disjoint `list` that may meet `[lo, hi)`.
pub fn window(list: &[(u64, u64)], lo: u64, hi: u64) -> &[(u64, u64)] {
    let a = list.partition_point(|r| r.1 <= lo);
    let b = list.partition_point(|r| r.0 < hi);
    &list[a..b.max(a)]
}

/// `a ∩ b` of sorted disjoint spans.
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Spans {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `a − b` of sorted disjoint spans.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Spans {
    let (mut j, mut out) = (0, Vec::new());
    for &(mut s, e) in a {
        while j < b.len() && b[j].1 <= s {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > s {
                out.push((s, b[k].0));
            }
            s = s.max(b[k].1);
            k += 1;
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

/// `a ∪ b` of sorted disjoint spans (touching spans merged).
pub fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Spans {
    let mut all: Spans = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Spans = Vec::with_capacity(all.len());
    for (s, e) in all {
        push(&mut out, s, e);
    }
    out
}

/// Append `[s, e)` (not before the last span), merged with the last span
/// when they touch.
pub fn push(out: &mut Spans, s: u64, e: u64) {
    match out.last_mut() {
        Some(l) if l.1 >= s => l.1 = l.1.max(e),
        _ => out.push((s, e)),
    }
}

/// Runs `(address, length)` as spans.
pub fn from_runs(runs: &[(u64, usize)]) -> Spans {
    runs.iter().map(|&(a, l)| (a, a + l as u64)).collect()
}

/// Spans as runs `(address, length)`.
pub fn to_runs(spans: &[(u64, u64)]) -> Vec<(u64, usize)> {
    spans.iter().map(|&(s, e)| (s, (e - s) as usize)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_algebra_matches_page_by_page_sets() {
        use std::collections::BTreeSet;
        // Pseudo-random span lists over 64 pages, checked against sets.
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut spans = || {
            let mut out: Spans = Vec::new();
            let mut a = 0u64;
            while a < 64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let (gap, len) = (x % 4, 1 + (x >> 8) % 5);
                let s = a + gap;
                let e = (s + len).min(64);
                if s < e && out.last().is_none_or(|l| l.1 < s) {
                    out.push((s, e));
                }
                a = e + 1;
            }
            out
        };
        let set = |v: &[(u64, u64)]| v.iter().flat_map(|&(s, e)| s..e).collect::<BTreeSet<u64>>();
        for _ in 0..200 {
            let (a, b) = (spans(), spans());
            let (sa, sb) = (set(&a), set(&b));
            assert_eq!(set(&intersect(&a, &b)), &sa & &sb, "{a:?} ∩ {b:?}");
            assert_eq!(set(&subtract(&a, &b)), &sa - &sb, "{a:?} − {b:?}");
            assert_eq!(set(&union(&a, &b)), &sa | &sb, "{a:?} ∪ {b:?}");
            for w in [(0, 64), (10, 20), (63, 64)] {
                let got: BTreeSet<u64> = set(window(&a, w.0, w.1)).into_iter().filter(|p| (w.0..w.1).contains(p)).collect();
                let want: BTreeSet<u64> = sa.iter().copied().filter(|p| (w.0..w.1).contains(p)).collect();
                assert_eq!(got, want, "window {w:?} of {a:?}");
            }
        }
    }
}
