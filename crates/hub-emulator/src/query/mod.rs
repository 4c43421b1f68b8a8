//! The IoT Hub query language: lexer, recursive-descent parser, typed AST with `Display` back to
//! query text, and an evaluator over twin / device-job JSON documents. Pure: no I/O, no clock.
//! Invariants: `parse(&q.to_string()) == Ok(q)` for every parsed query; anything that parses but
//! cannot be evaluated yields a [`QueryErrorKind::Unsupported`] error, never wrong rows.
//!
//! Positions in errors are 0-based character (not byte) offsets into the query text.

mod ast;
mod eval;
mod group;
mod lexer;
mod parser;
mod scan;
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

pub use ast::{
    Aggregate, BinaryOp, Condition, Expr, Function, Literal, Number, Path, Projection,
    ProjectionExpr, ProjectionItem, Query, Source,
};
pub use eval::{GroupPage, RowShape, aggregate_page, execute};
pub use group::GroupPosition;
pub use scan::{filter_parallel, first_matches};

/// Longest query text IoT Hub accepts, in characters.
pub const MAX_QUERY_LENGTH: usize = 8192;

/// Parses a full query (`SELECT ... FROM ... [WHERE ...] [GROUP BY ...]`).
///
/// Besides syntax, this checks what the evaluator supports for the chosen source (for example
/// `FROM devices.jobs` allows only `SELECT *`), so a query that parses can be executed.
///
/// # Errors
///
/// [`QueryErrorKind::TooLong`] over [`MAX_QUERY_LENGTH`] characters, [`QueryErrorKind::Syntax`]
/// for malformed text, [`QueryErrorKind::Unsupported`] for valid text the evaluator cannot run.
pub fn parse(text: &str) -> Result<Query, QueryError> {
    check_length(text)?;
    parser::parse_query(text)
}

/// Parses a job's `queryCondition`: the WHERE part of `SELECT * FROM devices WHERE <cond>`, or
/// `*` meaning every device (returned as the always-true condition [`Condition::all`]).
///
/// # Errors
///
/// As [`parse`]; paths are checked as for `FROM devices`.
pub fn parse_condition(text: &str) -> Result<Condition, QueryError> {
    check_length(text)?;
    if text.trim() == "*" {
        return Ok(Condition::all());
    }
    parser::parse_condition(text)
}

fn check_length(text: &str) -> Result<(), QueryError> {
    let len = text.chars().count();
    if len > MAX_QUERY_LENGTH {
        return Err(QueryError::new(
            QueryErrorKind::TooLong,
            Some(MAX_QUERY_LENGTH),
            format!("query is {len} characters long; the maximum is {MAX_QUERY_LENGTH}"),
        ));
    }
    Ok(())
}

/// What class of problem a [`QueryError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QueryErrorKind {
    /// The text is not a well-formed query (bad token, unexpected token, bad literal).
    Syntax,
    /// The query is well formed but uses something the emulator (or IoT Hub) does not support.
    Unsupported,
    /// The query text exceeds [`MAX_QUERY_LENGTH`] characters.
    TooLong,
}

/// A query that could not be parsed or executed; the message names what was expected and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QueryError {
    kind: QueryErrorKind,
    position: Option<usize>,
    message: String,
}

impl QueryError {
    pub(crate) fn new(kind: QueryErrorKind, position: Option<usize>, message: String) -> Self {
        Self {
            kind,
            position,
            message,
        }
    }

    pub(crate) fn syntax(position: usize, message: String) -> Self {
        Self::new(QueryErrorKind::Syntax, Some(position), message)
    }

    pub(crate) fn unsupported(position: Option<usize>, message: String) -> Self {
        Self::new(QueryErrorKind::Unsupported, position, message)
    }

    /// The class of error.
    pub fn kind(&self) -> QueryErrorKind {
        self.kind
    }

    /// 0-based character offset of the offending token in the query text, when known.
    pub fn position(&self) -> Option<usize> {
        self.position
    }

    /// The human-readable message (also the `Display` output); includes the position if known.
    pub fn message(&self) -> &str {
        &self.message
    }
}
