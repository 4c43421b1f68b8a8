//! Evaluation of conditions and projections over JSON documents, with IoT Hub semantics:
//! three-valued logic where only boolean `true` satisfies a condition; comparisons of mismatched
//! types, non-primitives or undefined values are undefined (so `!=` against undefined is false).
//! Evaluation borrows from the document and the AST and allocates nothing per document.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::QueryError;
use super::ast::{Aggregate, BinaryOp, Condition, Expr, Function, Literal, Number, Path, Query};
use super::group::{GroupKey, GroupPosition};
use super::parser::{Column, Spans, columns, validate};

impl Condition {
    /// True when the condition evaluates to boolean `true` for `doc` (a twin as
    /// `GET /twins/{id}` returns it, or a device-job row for `FROM devices.jobs`).
    pub fn matches(&self, doc: &Value) -> bool {
        holds(&self.expr, doc, &Direct)
    }
}

/// How the evaluator finds a path's value in a document. Every implementation must return
/// exactly what [`lookup`] returns; they differ only in how fast they get there.
pub(super) trait Resolve<'a> {
    /// The value at `path` in `doc`, as [`lookup`] finds it.
    fn resolve(&self, doc: &'a Value, path: &Path) -> Option<&'a Value>;
}

/// Resolves every path from scratch with [`lookup`].
struct Direct;

impl<'a> Resolve<'a> for Direct {
    fn resolve(&self, doc: &'a Value, path: &Path) -> Option<&'a Value> {
        lookup(doc, path)
    }
}

/// True when `expr` evaluates to boolean `true` for `doc`, resolving paths through `resolver`.
pub(super) fn holds<'a, R: Resolve<'a>>(expr: &'a Expr, doc: &'a Value, resolver: &R) -> bool {
    matches!(eval(expr, doc, resolver), Val::Bool(true))
}

impl Query {
    /// True when `doc` passes the `WHERE` condition (always, without one).
    pub fn matches(&self, doc: &Value) -> bool {
        self.condition.as_ref().is_none_or(|c| c.matches(doc))
    }
}

/// Runs `query` over `docs` (twins for `devices` / `devices.modules`, device-job rows for
/// `devices.jobs`) and returns the result rows.
///
/// * `SELECT *`: the matching documents themselves.
/// * Projections without aggregates: one object per matching document, keyed by alias or last
///   path segment; undefined values are left out of the object.
/// * Aggregates: one row (even over no documents: `COUNT()` gives 0), or with `GROUP BY` one row
///   per distinct group value in [`GroupPosition`] order (so that a page boundary between groups
///   stays put while documents change), the group value keyed by its alias or last segment.
///   `SUM`/`AVG` take numbers, `MIN`/`MAX` numbers or strings; undefined values are skipped;
///   any other value (or no value, except for `SUM`) leaves the column out of the row.
/// * `TOP n` limits the rows.
///
/// # Errors
///
/// [`super::QueryErrorKind::Unsupported`] for a hand-built query the parser would have rejected.
pub fn execute<'a, I>(query: &Query, docs: I) -> Result<Vec<Value>, QueryError>
where
    I: IntoIterator<Item = &'a Value>,
{
    validate(query, &Spans::default())?;
    let limit = query
        .top
        .map_or(usize::MAX, |top| usize::try_from(top).unwrap_or(usize::MAX));
    if query.is_aggregate() {
        return Ok(aggregate_groups(query, docs, None, limit).rows);
    }
    let rows = RowShape::new(query);
    Ok(docs
        .into_iter()
        .filter(|doc| query.matches(doc))
        .take(limit)
        .map(|doc| rows.row(doc))
        .collect())
}

impl Query {
    /// True when the result rows are groups (`GROUP BY`, or an aggregate such as `COUNT()` in
    /// the `SELECT` list) rather than one row per matching document.
    pub fn is_aggregate(&self) -> bool {
        self.group_by.is_some()
            || columns(self).is_some_and(|columns| {
                columns
                    .iter()
                    .any(|(_, column)| matches!(column, Column::Aggregate(_)))
            })
    }
}

/// Turns a matching document into its result row for a query that is not an aggregate: the
/// document itself for `SELECT *`, else an object of the projected values.
#[derive(Debug)]
pub struct RowShape<'q> {
    columns: Option<Vec<(String, Column<'q>)>>,
}

impl<'q> RowShape<'q> {
    /// The row shape of `query` (whose aggregate columns, if any, are left out of rows).
    pub fn new(query: &'q Query) -> Self {
        RowShape {
            columns: columns(query),
        }
    }

    /// The result row for `doc`.
    pub fn row(&self, doc: &Value) -> Value {
        let Some(columns) = &self.columns else {
            return doc.clone();
        };
        let mut row = Map::with_capacity(columns.len());
        for (name, column) in columns {
            if let Column::Path(path) = column
                && let Some(value) = lookup(doc, path)
            {
                row.insert(name.clone(), value.clone());
            }
        }
        Value::Object(row)
    }
}

/// One page of an aggregate query's rows.
#[derive(Debug)]
pub struct GroupPage {
    /// At most the `limit` asked for, in group order.
    pub rows: Vec<Value>,
    /// Where the page ended: the group of its last row (`None` without `GROUP BY` or rows).
    pub last: Option<GroupPosition>,
    /// True when groups after `last` exist.
    pub more: bool,
}

/// The first `limit` groups of aggregate `query` over the matching `docs` that come strictly
/// after `after` in group order (all groups when `after` is `None`), and whether more follow.
///
/// Memory is bounded by `limit`, not by how many distinct group values the documents hold:
/// only the `limit + 1` smallest groups seen so far are kept, and a document whose group sorts
/// after all of them once that many are known is skipped (its group cannot be on this page).
///
/// # Errors
///
/// [`super::QueryErrorKind::Unsupported`] for a query the parser would have rejected or one that
/// is not an aggregate ([`Query::is_aggregate`]).
pub fn aggregate_page<'a, I>(
    query: &Query,
    docs: I,
    after: Option<&GroupPosition>,
    limit: usize,
) -> Result<GroupPage, QueryError>
where
    I: IntoIterator<Item = &'a Value>,
{
    validate(query, &Spans::default())?;
    if !query.is_aggregate() {
        return Err(QueryError::unsupported(
            None,
            "the query has no GROUP BY or aggregate to page by group".to_owned(),
        ));
    }
    Ok(aggregate_groups(query, docs, after, limit))
}

fn aggregate_groups<'a, I>(
    query: &Query,
    docs: I,
    after: Option<&GroupPosition>,
    limit: usize,
) -> GroupPage
where
    I: IntoIterator<Item = &'a Value>,
{
    let columns = columns(query).unwrap_or_default();
    let new_accumulators = || -> Vec<Acc<'a>> {
        columns
            .iter()
            .map(|(_, column)| match column {
                Column::Aggregate(aggregate) => Acc::new(aggregate),
                Column::Path(_) => Acc::Key,
            })
            .collect()
    };
    let add = |accumulators: &mut Vec<Acc<'a>>, doc: &'a Value| {
        for ((_, column), acc) in columns.iter().zip(accumulators.iter_mut()) {
            if let Column::Aggregate(aggregate) = column {
                acc.add(aggregate, doc);
            }
        }
    };
    let matching = docs.into_iter().filter(|doc| query.matches(doc));
    let Some(path) = &query.group_by else {
        // Without GROUP BY there is exactly one row, even over no documents; it has no
        // position, so a token naming one ends the result.
        let mut accumulators = new_accumulators();
        for doc in matching {
            add(&mut accumulators, doc);
        }
        let rows = if limit == 0 || after.is_some() {
            Vec::new()
        } else {
            vec![group_row(&columns, None, accumulators)]
        };
        return GroupPage {
            rows,
            last: None,
            more: false,
        };
    };
    if limit == 0 {
        return GroupPage {
            rows: Vec::new(),
            last: None,
            more: false,
        };
    }
    // One group past the page tells whether another page follows.
    let keep = limit.saturating_add(1);
    let after = after.map(GroupPosition::key);
    let mut groups: BTreeMap<GroupKey<'a>, (Option<&'a Value>, Vec<Acc<'a>>)> = BTreeMap::new();
    for doc in matching {
        let value = lookup(doc, path);
        let key = GroupKey::of(value);
        if after.is_some_and(|after| key <= *after) {
            continue;
        }
        if let Some((_, accumulators)) = groups.get_mut(&key) {
            add(accumulators, doc);
            continue;
        }
        if groups.len() >= keep
            && groups
                .last_key_value()
                .is_some_and(|(largest, _)| key > *largest)
        {
            continue;
        }
        let mut accumulators = new_accumulators();
        add(&mut accumulators, doc);
        groups.insert(key, (value, accumulators));
        if groups.len() > keep {
            // A group dropped here can never come back onto this page: `keep` smaller ones
            // are known from now on.
            groups.pop_last();
        }
    }
    let more = groups.len() > limit;
    let mut last = None;
    let rows = groups
        .into_iter()
        .take(limit)
        .map(|(key, (value, accumulators))| {
            last = Some(key);
            group_row(&columns, value, accumulators)
        })
        .collect();
    GroupPage {
        rows,
        last: last.map(GroupPosition::from_key),
        more,
    }
}

/// A result row of an aggregate query: the group value (first seen) and each aggregate.
fn group_row(
    columns: &[(String, Column<'_>)],
    key: Option<&Value>,
    accumulators: Vec<Acc<'_>>,
) -> Value {
    let mut row = Map::with_capacity(columns.len());
    for ((name, _), acc) in columns.iter().zip(accumulators) {
        let value = match acc {
            Acc::Key => key.cloned(),
            acc => acc.finish(),
        };
        if let Some(value) = value {
            row.insert(name.clone(), value);
        }
    }
    Value::Object(row)
}

/// Running state of one output column of an aggregate query.
enum Acc<'a> {
    /// The group value column.
    Key,
    Count(u64),
    Sum {
        int: i128,
        float: f64,
        is_float: bool,
        invalid: bool,
    },
    Avg {
        sum: f64,
        count: u64,
        invalid: bool,
    },
    Extreme {
        best: Option<Val<'a>>,
        max: bool,
        invalid: bool,
    },
}

impl<'a> Acc<'a> {
    fn new(aggregate: &Aggregate) -> Self {
        match aggregate {
            Aggregate::Count => Acc::Count(0),
            Aggregate::Sum(_) => Acc::Sum {
                int: 0,
                float: 0.0,
                is_float: false,
                invalid: false,
            },
            Aggregate::Avg(_) => Acc::Avg {
                sum: 0.0,
                count: 0,
                invalid: false,
            },
            Aggregate::Min(_) => Acc::Extreme {
                best: None,
                max: false,
                invalid: false,
            },
            Aggregate::Max(_) => Acc::Extreme {
                best: None,
                max: true,
                invalid: false,
            },
        }
    }

    fn add(&mut self, aggregate: &Aggregate, doc: &'a Value) {
        let value = match aggregate {
            Aggregate::Count => {
                if let Acc::Count(n) = self {
                    *n += 1;
                }
                return;
            }
            Aggregate::Sum(path)
            | Aggregate::Avg(path)
            | Aggregate::Min(path)
            | Aggregate::Max(path) => Val::from_json(lookup(doc, path)),
        };
        if matches!(value, Val::Undefined) {
            return;
        }
        match self {
            Acc::Key | Acc::Count(_) => {}
            Acc::Sum {
                int,
                float,
                is_float,
                invalid,
            } => match value {
                Val::Int(i) if !*is_float => match int.checked_add(i) {
                    Some(sum) => *int = sum,
                    None => {
                        *is_float = true;
                        *float = to_f64(*int) + to_f64(i);
                    }
                },
                Val::Int(i) => *float += to_f64(i),
                Val::Float(x) => {
                    if !*is_float {
                        *is_float = true;
                        *float = to_f64(*int);
                    }
                    *float += x;
                }
                _ => *invalid = true,
            },
            Acc::Avg {
                sum,
                count,
                invalid,
            } => match value.as_f64() {
                Some(x) => {
                    *sum += x;
                    *count += 1;
                }
                None => *invalid = true,
            },
            Acc::Extreme { best, max, invalid } => {
                if !matches!(value, Val::Int(_) | Val::Float(_) | Val::Str(_)) {
                    *invalid = true;
                    return;
                }
                let Some(current) = best else {
                    *best = Some(value);
                    return;
                };
                match order(value, *current) {
                    Some(Ordering::Greater) if *max => *best = Some(value),
                    Some(Ordering::Less) if !*max => *best = Some(value),
                    Some(_) => {}
                    None => *invalid = true,
                }
            }
        }
    }

    fn finish(self) -> Option<Value> {
        match self {
            Acc::Key => None,
            Acc::Count(n) => Some(Value::from(n)),
            Acc::Sum {
                int,
                float,
                is_float,
                invalid,
            } => match (invalid, is_float) {
                (true, _) => None,
                (false, true) => float_value(float),
                (false, false) => Val::Int(int).to_json(),
            },
            Acc::Avg {
                sum,
                count,
                invalid,
            } => {
                if invalid || count == 0 {
                    None
                } else {
                    #[allow(clippy::cast_precision_loss)]
                    float_value(sum / count as f64)
                }
            }
            Acc::Extreme { best, invalid, .. } => {
                if invalid {
                    None
                } else {
                    best.and_then(Val::to_json)
                }
            }
        }
    }
}

/// A value during evaluation: borrowed from the document or the AST, never allocated.
#[derive(Debug, Clone, Copy)]
pub(super) enum Val<'a> {
    Undefined,
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a str),
    /// An object or array: defined, but not comparable.
    Complex(&'a Value),
}

impl<'a> Val<'a> {
    pub(super) fn from_json(value: Option<&'a Value>) -> Self {
        match value {
            None => Val::Undefined,
            Some(Value::Null) => Val::Null,
            Some(Value::Bool(b)) => Val::Bool(*b),
            Some(Value::Number(n)) => {
                if let Some(i) = n.as_i64() {
                    Val::Int(i128::from(i))
                } else if let Some(u) = n.as_u64() {
                    Val::Int(i128::from(u))
                } else {
                    n.as_f64().map_or(Val::Undefined, Val::Float)
                }
            }
            Some(Value::String(s)) => Val::Str(s),
            Some(v @ (Value::Array(_) | Value::Object(_))) => Val::Complex(v),
        }
    }

    fn from_literal(literal: &'a Literal) -> Self {
        match literal {
            Literal::Undefined => Val::Undefined,
            Literal::Null => Val::Null,
            Literal::Bool(b) => Val::Bool(*b),
            Literal::Number(Number::Int(i)) => Val::Int(i128::from(*i)),
            Literal::Number(Number::Float(x)) => Val::Float(*x),
            Literal::String(s) => Val::Str(s),
        }
    }

    fn as_f64(self) -> Option<f64> {
        match self {
            Val::Int(i) => Some(to_f64(i)),
            Val::Float(x) => Some(x),
            _ => None,
        }
    }

    fn as_bool(self) -> Option<bool> {
        match self {
            Val::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn is_primitive(self) -> bool {
        matches!(
            self,
            Val::Null | Val::Bool(_) | Val::Int(_) | Val::Float(_) | Val::Str(_)
        )
    }

    fn to_json(self) -> Option<Value> {
        match self {
            Val::Undefined => None,
            Val::Null => Some(Value::Null),
            Val::Bool(b) => Some(Value::Bool(b)),
            Val::Int(i) => Some(match (i64::try_from(i), u64::try_from(i)) {
                (Ok(v), _) => Value::from(v),
                (_, Ok(v)) => Value::from(v),
                _ => return float_value(to_f64(i)),
            }),
            Val::Float(x) => float_value(x),
            Val::Str(s) => Some(Value::String(s.to_owned())),
            Val::Complex(v) => Some(v.clone()),
        }
    }
}

#[allow(clippy::cast_precision_loss)]
pub(super) fn to_f64(i: i128) -> f64 {
    i as f64
}

fn float_value(x: f64) -> Option<Value> {
    serde_json::Number::from_f64(x).map(Value::Number)
}

/// Follows `path` from the document root; `None` when any step is missing or not an object.
pub(super) fn lookup<'a>(doc: &'a Value, path: &Path) -> Option<&'a Value> {
    path.segments()
        .iter()
        .try_fold(doc, |value, segment| field(value.as_object()?, segment))
}

/// Objects up to this size are searched linearly rather than through their hash index.
pub(super) const LINEAR_SCAN_MAX: usize = 16;

/// One step of a path. Twin objects are small, and a linear scan that compares lengths first
/// (no pointer chase) measured about twice as fast as hashing the segment on 100k twins.
pub(super) fn field<'a>(object: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if object.len() <= LINEAR_SCAN_MAX {
        object
            .iter()
            .find(|(key, _)| key.len() == name.len() && key.as_str() == name)
            .map(|(_, value)| value)
    } else {
        object.get(name)
    }
}

/// Ordering of two primitives of the same type (numbers mix ints and floats); `None` otherwise.
fn order(left: Val<'_>, right: Val<'_>) -> Option<Ordering> {
    match (left, right) {
        (Val::Int(a), Val::Int(b)) => Some(a.cmp(&b)),
        (Val::Int(_) | Val::Float(_), Val::Int(_) | Val::Float(_)) => {
            left.as_f64()?.partial_cmp(&right.as_f64()?)
        }
        (Val::Str(a), Val::Str(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// Equality of two primitives of the same type; `None` for mismatched types or non-primitives.
fn equal(left: Val<'_>, right: Val<'_>) -> Option<bool> {
    match (left, right) {
        (Val::Null, Val::Null) => Some(true),
        (Val::Bool(a), Val::Bool(b)) => Some(a == b),
        _ => order(left, right).map(Ordering::is_eq),
    }
}

fn eval<'a, R: Resolve<'a>>(expr: &'a Expr, doc: &'a Value, r: &R) -> Val<'a> {
    match expr {
        Expr::Literal(literal) => Val::from_literal(literal),
        Expr::Path(path) => Val::from_json(r.resolve(doc, path)),
        Expr::Not(inner) => match eval(inner, doc, r).as_bool() {
            Some(b) => Val::Bool(!b),
            None => Val::Undefined,
        },
        Expr::Neg(inner) => match eval(inner, doc, r) {
            Val::Int(i) => i.checked_neg().map_or(Val::Undefined, Val::Int),
            Val::Float(x) => Val::Float(-x),
            _ => Val::Undefined,
        },
        Expr::Binary { op, left, right } => binary(*op, left, right, doc, r),
        Expr::In {
            expr,
            list,
            negated,
        } => {
            let value = eval(expr, doc, r);
            if !value.is_primitive() {
                return Val::Undefined;
            }
            let found = list
                .iter()
                .any(|literal| equal(value, Val::from_literal(literal)) == Some(true));
            Val::Bool(found != *negated)
        }
        Expr::Call { function, args } => call(*function, args, doc, r),
    }
}

fn binary<'a, R: Resolve<'a>>(
    op: BinaryOp,
    left: &'a Expr,
    right: &'a Expr,
    doc: &'a Value,
    r: &R,
) -> Val<'a> {
    match op {
        BinaryOp::And => {
            let l = eval(left, doc, r).as_bool();
            if l == Some(false) {
                return Val::Bool(false);
            }
            match (l, eval(right, doc, r).as_bool()) {
                (_, Some(false)) => Val::Bool(false),
                (Some(true), Some(true)) => Val::Bool(true),
                _ => Val::Undefined,
            }
        }
        BinaryOp::Or => {
            let l = eval(left, doc, r).as_bool();
            if l == Some(true) {
                return Val::Bool(true);
            }
            match (l, eval(right, doc, r).as_bool()) {
                (_, Some(true)) => Val::Bool(true),
                (Some(false), Some(false)) => Val::Bool(false),
                _ => Val::Undefined,
            }
        }
        BinaryOp::Eq | BinaryOp::Ne => match equal(eval(left, doc, r), eval(right, doc, r)) {
            Some(eq) => Val::Bool(eq == (op == BinaryOp::Eq)),
            None => Val::Undefined,
        },
        BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge => {
            match order(eval(left, doc, r), eval(right, doc, r)) {
                Some(ordering) => Val::Bool(match op {
                    BinaryOp::Lt => ordering.is_lt(),
                    BinaryOp::Le => ordering.is_le(),
                    BinaryOp::Gt => ordering.is_gt(),
                    _ => ordering.is_ge(),
                }),
                None => Val::Undefined,
            }
        }
        BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Div | BinaryOp::Mod => {
            arithmetic(op, eval(left, doc, r), eval(right, doc, r))
        }
    }
}

/// Numbers only; integer results stay exact unless they overflow; non-finite is undefined.
fn arithmetic<'a>(op: BinaryOp, left: Val<'a>, right: Val<'a>) -> Val<'a> {
    if let (Val::Int(a), Val::Int(b)) = (left, right) {
        let exact = match op {
            BinaryOp::Add => a.checked_add(b),
            BinaryOp::Sub => a.checked_sub(b),
            BinaryOp::Mul => a.checked_mul(b),
            BinaryOp::Div if b != 0 && a.checked_rem(b) == Some(0) => a.checked_div(b),
            BinaryOp::Mod if b != 0 => a.checked_rem(b),
            _ => None,
        };
        if let Some(value) = exact {
            return Val::Int(value);
        }
    }
    let (Some(a), Some(b)) = (left.as_f64(), right.as_f64()) else {
        return Val::Undefined;
    };
    let result = match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        _ => a % b,
    };
    if result.is_finite() {
        Val::Float(result)
    } else {
        Val::Undefined
    }
}

fn call<'a, R: Resolve<'a>>(
    function: Function,
    args: &'a [Expr],
    doc: &'a Value,
    r: &R,
) -> Val<'a> {
    let arg = |i: usize| args.get(i).map_or(Val::Undefined, |e| eval(e, doc, r));
    let test = |check: fn(Val<'a>) -> bool| Val::Bool(check(arg(0)));
    match function {
        Function::IsDefined => test(|v| !matches!(v, Val::Undefined)),
        Function::IsNull => test(|v| matches!(v, Val::Null)),
        Function::IsBool => test(|v| matches!(v, Val::Bool(_))),
        Function::IsNumber => test(|v| matches!(v, Val::Int(_) | Val::Float(_))),
        Function::IsString => test(|v| matches!(v, Val::Str(_))),
        Function::IsObject => test(|v| matches!(v, Val::Complex(Value::Object(_)))),
        Function::IsArray => test(|v| matches!(v, Val::Complex(Value::Array(_)))),
        Function::IsPrimitive => test(Val::is_primitive),
        Function::StartsWith | Function::EndsWith | Function::Contains => match (arg(0), arg(1)) {
            (Val::Str(s), Val::Str(part)) => Val::Bool(match function {
                Function::StartsWith => s.starts_with(part),
                Function::EndsWith => s.ends_with(part),
                _ => s.contains(part),
            }),
            _ => Val::Undefined,
        },
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod unit {
    use crate::query::Projection;

    #[test]
    fn projection_kind_is_all_for_star() {
        let query = super::super::parse("SELECT * FROM devices").unwrap();
        assert_eq!(query.projection, Projection::All);
    }
}
