//! Fast full scans: which documents of a slice satisfy a [`Condition`], in slice order.
//!
//! Three things make a scan over ~100,000 twins cheap; none changes what matches (each path
//! still resolves to exactly what [`lookup`] finds, and the evaluator is the same):
//! * Position hints: twins are built with the same key order, so each path segment remembers
//!   the index where it last found its key and checks that entry first (falling back to a
//!   search, which updates the hint).
//! * Batched warm-up: time goes to cache misses while following a path (object entries, key
//!   text, value text). Before evaluating a batch of documents, the leading path (the first one
//!   the condition evaluates) is followed level by level across the whole batch, so the misses
//!   of different documents overlap instead of queueing one after another.
//! * Parallelism: large slices are cut into chunks that `available_parallelism()` scoped
//!   threads take in turn; results are put back in chunk order, and a scan that only needs the
//!   first `n` matches stops handing out chunks once the finished prefix holds `n`.

use std::borrow::Borrow;
use std::cell::Cell;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use serde_json::{Map, Value};

use super::ast::{Condition, Expr, Path};
use super::eval::{LINEAR_SCAN_MAX, Resolve, field, holds, lookup};

/// Documents warmed up and then evaluated together.
const BATCH: usize = 16;
/// Documents a worker takes at a time.
const CHUNK: usize = 4096;
/// Below this many documents per available core, fewer threads are used (one below `2 * CHUNK`).
const MIN_PER_THREAD: usize = 2 * CHUNK;

/// Indices (ascending) of the documents in `docs` that satisfy `condition`; the same as
/// `docs.iter().enumerate().filter(|(_, d)| condition.matches(d))`, computed on all available
/// cores when `docs` is large.
pub fn filter_parallel<D>(condition: &Condition, docs: &[D]) -> Vec<usize>
where
    D: Borrow<Value> + Sync,
{
    first_matches(condition, docs, usize::MAX)
}

/// Indices (ascending) of the first `limit` documents in `docs` that satisfy `condition`; stops
/// scanning (approximately) once they are known. Parallel like [`filter_parallel`].
pub fn first_matches<D>(condition: &Condition, docs: &[D], limit: usize) -> Vec<usize>
where
    D: Borrow<Value> + Sync,
{
    run(condition, docs, limit, threads_for(docs.len()), CHUNK)
}

fn run<D>(
    condition: &Condition,
    docs: &[D],
    limit: usize,
    threads: usize,
    chunk: usize,
) -> Vec<usize>
where
    D: Borrow<Value> + Sync,
{
    if limit == 0 {
        return Vec::new();
    }
    let chunk = chunk.max(1);
    if threads <= 1 {
        let mut found = Vec::new();
        Scanner::new(condition).scan(docs, 0..docs.len(), limit, &mut found);
        return found;
    }
    let chunks = docs.len().div_ceil(chunk);
    let shared = Shared {
        chunk,
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        progress: Mutex::new(Progress {
            results: vec![None; chunks],
            prefix_end: 0,
            prefix_count: 0,
        }),
    };
    std::thread::scope(|scope| {
        for _ in 1..threads {
            scope.spawn(|| work(condition, docs, limit, &shared));
        }
        work(condition, docs, limit, &shared);
    });
    let progress = shared
        .progress
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    // Every chunk before the first unfinished one is done; when the scan stopped early, that
    // prefix already holds `limit` matches, so nothing after it can be among the first `limit`.
    let mut found: Vec<usize> = progress
        .results
        .into_iter()
        .map_while(|chunk| chunk)
        .flatten()
        .collect();
    found.truncate(limit);
    found
}

/// How many threads scan `len` documents.
fn threads_for(len: usize) -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    let cores =
        *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, NonZeroUsize::get));
    cores.min(len / MIN_PER_THREAD).max(1)
}

struct Shared {
    chunk: usize,
    next: AtomicUsize,
    stop: AtomicBool,
    progress: Mutex<Progress>,
}

struct Progress {
    /// Matches per chunk (absolute indices), `None` until the chunk is scanned.
    results: Vec<Option<Vec<usize>>>,
    /// Chunks `0..prefix_end` are all scanned ...
    prefix_end: usize,
    /// ... and hold this many matches.
    prefix_count: usize,
}

fn work<D: Borrow<Value>>(condition: &Condition, docs: &[D], limit: usize, shared: &Shared) {
    let scanner = Scanner::new(condition);
    while !shared.stop.load(Ordering::Relaxed) {
        let chunk = shared.next.fetch_add(1, Ordering::Relaxed);
        let start = chunk.saturating_mul(shared.chunk);
        if start >= docs.len() {
            break;
        }
        let mut found = Vec::new();
        scanner.scan(
            docs,
            start..docs.len().min(start.saturating_add(shared.chunk)),
            limit,
            &mut found,
        );
        let mut progress = shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Progress {
            results,
            prefix_end,
            prefix_count,
        } = &mut *progress;
        if let Some(slot) = results.get_mut(chunk) {
            *slot = Some(found);
        }
        while let Some(Some(done)) = results.get(*prefix_end) {
            *prefix_count += done.len();
            *prefix_end += 1;
        }
        if *prefix_count >= limit {
            shared.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// One thread's evaluator state: the condition's paths with their position hints.
struct Scanner<'q> {
    expr: &'q Expr,
    /// Every path node of the condition, in evaluation (left-to-right) order.
    paths: Vec<HintedPath<'q>>,
}

struct HintedPath<'q> {
    path: &'q Path,
    /// Per segment: the index where its key was last found.
    hints: Vec<Cell<usize>>,
}

impl<'q> Scanner<'q> {
    fn new(condition: &'q Condition) -> Self {
        let mut paths = Vec::new();
        collect_paths(&condition.expr, &mut paths);
        Scanner {
            expr: &condition.expr,
            paths: paths
                .into_iter()
                .map(|path| HintedPath {
                    path,
                    hints: path.segments().iter().map(|_| Cell::new(0)).collect(),
                })
                .collect(),
        }
    }

    /// Appends to `found` the indices in `range` whose documents match, up to `limit` of them.
    fn scan<D: Borrow<Value>>(
        &self,
        docs: &[D],
        range: Range<usize>,
        limit: usize,
        found: &mut Vec<usize>,
    ) {
        let Some(docs) = docs.get(range.clone()) else {
            return;
        };
        for (batch_no, batch) in docs.chunks(BATCH).enumerate() {
            self.warm(batch);
            let first = range.start + batch_no * BATCH;
            for (i, doc) in batch.iter().enumerate() {
                if holds(self.expr, doc.borrow(), self) {
                    found.push(first + i);
                    if found.len() >= limit {
                        return;
                    }
                }
            }
        }
    }

    /// Follows the leading path through every document of `batch`, one level at a time, and
    /// touches the text of string values, so that evaluation finds those lines in cache.
    fn warm<D: Borrow<Value>>(&self, batch: &[D]) {
        let Some(lead) = self.paths.first() else {
            return;
        };
        let mut at: [Option<&Value>; BATCH] = [None; BATCH];
        for (slot, doc) in at.iter_mut().zip(batch) {
            *slot = Some(doc.borrow());
        }
        for (segment, hint) in lead.path.segments().iter().zip(&lead.hints) {
            for slot in &mut at {
                *slot = slot.and_then(|v| hinted_field(v.as_object()?, segment, hint));
            }
        }
        let mut touched = 0u8;
        for value in at.iter().flatten() {
            if let Value::String(s) = value {
                touched ^= s.as_bytes().first().copied().unwrap_or(0);
            }
        }
        black_box(touched);
    }
}

impl Resolve for Scanner<'_> {
    fn resolve<'a>(&self, doc: &'a Value, path: &Path) -> Option<&'a Value> {
        match self.paths.iter().find(|p| std::ptr::eq(p.path, path)) {
            Some(hinted) => hinted
                .path
                .segments()
                .iter()
                .zip(&hinted.hints)
                .try_fold(doc, |value, (segment, hint)| {
                    hinted_field(value.as_object()?, segment, hint)
                }),
            None => lookup(doc, path),
        }
    }
}

/// [`field`], trying the entry at `hint` first and remembering where the key was found.
fn hinted_field<'a>(
    object: &'a Map<String, Value>,
    name: &str,
    hint: &Cell<usize>,
) -> Option<&'a Value> {
    if let Some((key, value)) = object.iter().nth(hint.get())
        && key == name
    {
        return Some(value);
    }
    if object.len() > LINEAR_SCAN_MAX {
        return field(object, name);
    }
    let (index, (_, value)) = object
        .iter()
        .enumerate()
        .find(|(_, (key, _))| key.len() == name.len() && key.as_str() == name)?;
    hint.set(index);
    Some(value)
}

/// Appends every path node of `expr` in the order evaluation reaches them.
fn collect_paths<'q>(expr: &'q Expr, out: &mut Vec<&'q Path>) {
    match expr {
        Expr::Literal(_) => {}
        Expr::Path(path) => out.push(path),
        Expr::Not(inner) | Expr::Neg(inner) => collect_paths(inner, out),
        Expr::Binary { left, right, .. } => {
            collect_paths(left, out);
            collect_paths(right, out);
        }
        Expr::In { expr, .. } => collect_paths(expr, out),
        Expr::Call { args, .. } => {
            for arg in args {
                collect_paths(arg, out);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::query::parse_condition;

    /// Twins whose key order, presence and types vary, so position hints keep missing.
    fn docs(n: usize) -> Vec<Value> {
        (0..n)
            .map(|i| {
                let region = ["US", "EU", "APAC"][i % 3];
                let tags = match i % 4 {
                    0 => json!({"location": {"region": region, "plant": i % 5}, "floor": i % 7}),
                    1 => json!({"floor": i % 7, "location": {"plant": i % 5, "region": region}}),
                    2 => json!({"location": region, "floor": "x"}),
                    _ => json!({"floor": null}),
                };
                let status = ["Success", "Error"][i % 2];
                let reported = if i % 5 == 0 {
                    json!({"temperature": "hot"})
                } else {
                    json!({"firmware": format!("1.{}", (i / 12) % 3), "temperature": (i % 40) as f64 / 2.0,
                           "telemetryConfig": {"status": status}})
                };
                let mut twin = json!({
                    "deviceId": format!("d{i}"), "etag": "e", "status": "enabled",
                    "version": i, "tags": tags,
                    "properties": {"desired": {}, "reported": reported},
                });
                if i % 6 == 0 {
                    // Same keys, other order: the hint for "tags" and "properties" misses.
                    let map = twin.as_object_mut().unwrap();
                    map.shift_remove("deviceId");
                    map.insert("deviceId".into(), json!(format!("d{i}")));
                }
                twin
            })
            .collect()
    }

    const CONDITIONS: [&str; 10] = [
        "*",
        "tags.location.region = 'US'",
        "tags.location.region = 'US' AND properties.reported.telemetryConfig.status = 'Success' \
         AND properties.reported.temperature > 5.5 AND STARTSWITH(properties.reported.firmware, '1.1')",
        "tags.location.region = 'EU' OR properties.reported.temperature < 3",
        "NOT (tags.floor IN [1, 2, 3]) AND IS_DEFINED(tags.location.plant)",
        "properties.reported.temperature * 2 >= tags.floor + 10",
        "tags.location = 'APAC' OR tags.location.region = 'APAC'",
        "IS_STRING(properties.reported.temperature) OR tags.floor NIN [0, 6]",
        "version % 7 = 3 AND deviceId != 'd10'",
        "tags.location.region = 'MARS'",
    ];

    fn sequential(condition: &Condition, docs: &[Value], limit: usize) -> Vec<usize> {
        (0..docs.len())
            .filter(|&i| condition.matches(&docs[i]))
            .take(limit)
            .collect()
    }

    #[test]
    fn parallel_scan_matches_sequential_filter() {
        let docs = docs(3000);
        for text in CONDITIONS {
            let condition = parse_condition(text).unwrap();
            let expected = sequential(&condition, &docs, usize::MAX);
            assert_eq!(filter_parallel(&condition, &docs), expected, "{text}");
            assert!(
                !expected.is_empty() || text.contains("MARS"),
                "{text} matches nothing"
            );
            for threads in [1, 2, 3, 8] {
                for chunk in [1, 7, 100, 5000] {
                    for limit in [0, 1, 5, 100, usize::MAX] {
                        let got = run(&condition, &docs, limit, threads, chunk);
                        let want: Vec<usize> = expected.iter().copied().take(limit).collect();
                        assert_eq!(
                            got, want,
                            "{text} threads={threads} chunk={chunk} limit={limit}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn large_inputs_use_the_default_split() {
        let docs: Vec<std::sync::Arc<Value>> = docs(3 * MIN_PER_THREAD + 5)
            .into_iter()
            .map(std::sync::Arc::new)
            .collect();
        let condition = parse_condition(CONDITIONS[2]).unwrap();
        let expected: Vec<usize> = (0..docs.len())
            .filter(|&i| condition.matches(&docs[i]))
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(filter_parallel(&condition, &docs), expected);
        assert_eq!(first_matches(&condition, &docs, 3), expected[..3]);
    }

    proptest! {
        #[test]
        fn any_split_gives_the_sequential_answer(
            n in 0usize..400,
            which in 0usize..CONDITIONS.len(),
            threads in 1usize..5,
            chunk in 1usize..64,
            limit in prop_oneof![Just(usize::MAX), 0usize..50],
        ) {
            let docs = docs(n);
            let condition = parse_condition(CONDITIONS[which]).unwrap();
            prop_assert_eq!(
                run(&condition, &docs, limit, threads, chunk),
                sequential(&condition, &docs, limit)
            );
        }
    }
}
