//! Fast full scans: which documents of a slice satisfy a [`Condition`], in slice order.
//!
//! Three things make a scan over ~100,000 twins cheap; none changes what matches (each path
//! still resolves to exactly what [`lookup`] finds, and the evaluator is the same):
//! * Position hints: twins are built with the same key order, so each path segment remembers
//!   the index where it last found its key and checks that entry first (falling back to a
//!   search, which updates the hint).
//! * Batched lookups: time goes to cache misses while following a path (object entries, key
//!   text, value text), each waiting for the one before. Documents are evaluated in batches, in
//!   rounds: a round follows, level by level across the batch, the next path each undecided
//!   document needs, so the misses of different documents overlap instead of queueing one
//!   after another; then those documents are evaluated again from the values found so far.
//!   Short-circuiting is kept: a path is only looked up in documents whose evaluation asks for
//!   it.
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

/// Documents evaluated together, their path lookups interleaved.
const BATCH: usize = 32;
/// Conditions with more path nodes than this are evaluated one document at a time.
const MAX_PATHS: usize = 64;
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
        let batched = !self.paths.is_empty() && self.paths.len() <= MAX_PATHS;
        // Path values per document of a batch: `values[b * paths + j]` for path `j`.
        let mut values: Vec<Option<&Value>> = if batched {
            vec![None; BATCH * self.paths.len()]
        } else {
            Vec::new()
        };
        for (batch_no, batch) in docs.chunks(BATCH).enumerate() {
            let first = range.start + batch_no * BATCH;
            let mut outcome = [false; BATCH];
            if batched {
                self.evaluate_batch(batch, &mut values, &mut outcome);
            } else {
                for (slot, doc) in outcome.iter_mut().zip(batch) {
                    *slot = holds(self.expr, doc.borrow(), &Hinted(self));
                }
            }
            for (i, _) in outcome.iter().enumerate().filter(|(_, matched)| **matched) {
                found.push(first + i);
                if found.len() >= limit {
                    return;
                }
            }
        }
    }

    /// Evaluates the condition for every document of `batch` (at most [`BATCH`]) into
    /// `outcome`, in rounds: each round resolves, level by level across the batch, the one path
    /// each undecided document asked for first and did not have yet, then evaluates those
    /// documents again. A document is decided by an evaluation that asked only for resolved
    /// paths, which therefore saw exactly the values a plain evaluation sees.
    fn evaluate_batch<'a, D: Borrow<Value>>(
        &self,
        batch: &'a [D],
        values: &mut [Option<&'a Value>],
        outcome: &mut [bool; BATCH],
    ) {
        let width = self.paths.len();
        let mut known = [0u64; BATCH];
        // The path each undecided document needs next; every document starts with the lead.
        let mut wanted: [Option<usize>; BATCH] = [None; BATCH];
        for slot in wanted.iter_mut().take(batch.len()) {
            *slot = Some(0);
        }
        loop {
            let mut at: [Option<&Value>; BATCH] = [None; BATCH];
            let mut depth = 0;
            for ((slot, want), doc) in at.iter_mut().zip(&wanted).zip(batch) {
                if let Some(j) = want {
                    *slot = Some(doc.borrow());
                    depth = depth.max(self.paths.get(*j).map_or(0, |p| p.hints.len()));
                }
            }
            for level in 0..depth {
                for (slot, want) in at.iter_mut().zip(&wanted) {
                    let Some(path) = want.and_then(|j| self.paths.get(j)) else {
                        continue;
                    };
                    if let (Some(segment), Some(hint)) =
                        (path.path.segments().get(level), path.hints.get(level))
                    {
                        *slot = slot.and_then(|v| hinted_field(v.as_object()?, segment, hint));
                    }
                }
            }
            let mut touched = 0u8;
            for (b, (want, value)) in wanted.iter().zip(at).enumerate() {
                if let Some(j) = *want {
                    if let Some(Value::String(s)) = value {
                        touched ^= s.as_bytes().first().copied().unwrap_or(0);
                    }
                    if let Some(slot) = values.get_mut(b * width + j) {
                        *slot = value;
                    }
                    known[b] |= 1 << j;
                }
            }
            black_box(touched);

            let mut undecided = false;
            for (b, doc) in batch.iter().enumerate() {
                if wanted[b].is_none() {
                    continue;
                }
                let resolver = BatchResolver {
                    scanner: self,
                    values: values.get(b * width..(b + 1) * width).unwrap_or_default(),
                    known: known[b],
                    missing: Cell::new(None),
                };
                let matched = holds(self.expr, doc.borrow(), &resolver);
                wanted[b] = resolver.missing.get();
                if wanted[b].is_some() {
                    undecided = true;
                } else {
                    outcome[b] = matched;
                }
            }
            if !undecided {
                return;
            }
        }
    }

    /// The index of `path` among the condition's path nodes.
    fn index_of(&self, path: &Path) -> Option<usize> {
        self.paths.iter().position(|p| std::ptr::eq(p.path, path))
    }
}

/// Resolves every path through the scanner's position hints.
struct Hinted<'s, 'q>(&'s Scanner<'q>);

impl<'a> Resolve<'a> for Hinted<'_, '_> {
    fn resolve(&self, doc: &'a Value, path: &Path) -> Option<&'a Value> {
        match self.0.index_of(path).and_then(|j| self.0.paths.get(j)) {
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

/// Resolves paths in one document of a batch from the values resolved so far; the first path
/// asked for that is not resolved yet is recorded in `missing` (and answered as undefined,
/// which makes this evaluation's result meaningless, so it is discarded).
struct BatchResolver<'s, 'q, 'v, 'a> {
    scanner: &'s Scanner<'q>,
    values: &'v [Option<&'a Value>],
    known: u64,
    missing: Cell<Option<usize>>,
}

impl<'a> Resolve<'a> for BatchResolver<'_, '_, '_, 'a> {
    fn resolve(&self, doc: &'a Value, path: &Path) -> Option<&'a Value> {
        let Some(j) = self.scanner.index_of(path) else {
            return lookup(doc, path);
        };
        if self.known & (1 << j) != 0 {
            return self.values.get(j).copied().flatten();
        }
        if self.missing.get().is_none() {
            self.missing.set(Some(j));
        }
        None
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
