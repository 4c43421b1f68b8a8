//! Recursive-descent parser from tokens to the typed AST, plus the checks that make every parsed
//! query executable (source-specific path rules, projection/GROUP BY shape). Errors carry the
//! 0-based character offset of the offending token and say what was expected.

use super::ast::{
    Aggregate, BinaryOp, Condition, Expr, Function, Literal, Number, Path, Projection,
    ProjectionExpr, ProjectionItem, Query, Source,
};
use super::lexer::{Keyword, Tok, Token, lex};
use super::{QueryError, QueryErrorKind};

/// Nesting limit for parentheses, `NOT`, unary minus and calls: keeps recursion (parse, print,
/// evaluate, drop) far from the stack limit on hostile input.
const MAX_DEPTH: usize = 64;

/// Limit on the depth of the built expression tree, counting every operator of an `AND`, `OR`,
/// `+`, `-`, `*`, `/`, `%` chain as well as the nesting counted by [`MAX_DEPTH`]. Chains parse in
/// a loop but build left-deep trees that every later walk (validate, print, evaluate, scan,
/// clone, compare, drop) recurses through, one stack frame per operator; without this bound a
/// long chain overflows the stack and aborts the process. IoT Hub's own bound is the query
/// length ([`super::MAX_QUERY_LENGTH`], checked before parsing); within it a chain can reach
/// about 4,000 operators (`1+1+...`), which this limit refuses, while a full-length condition
/// in the usual form (`a=1 AND b=2 AND ...`, 8 characters a term, 1,024 terms) still parses.
pub(crate) const MAX_TREE_DEPTH: usize = 1024;

/// Parses a whole query.
pub(crate) fn parse_query(text: &str) -> Result<Query, QueryError> {
    let tokens = lex(text)?;
    let mut parser = Parser::new(tokens, text);
    parser.query()
}

/// Parses a WHERE condition on `FROM devices` (a job's `queryCondition`).
pub(crate) fn parse_condition(text: &str) -> Result<Condition, QueryError> {
    let tokens = lex(text)?;
    let mut parser = Parser::new(tokens, text);
    parser.paths = PathContext::Source(Source::Devices);
    let expr = parser.expr()?;
    parser.expect_end("`AND`, `OR` or the end of the condition")?;
    Ok(Condition { expr })
}

/// Where the positions of projection parts were, for errors found after parsing them.
#[derive(Debug, Default)]
pub(crate) struct Spans {
    pub(crate) projection: Option<usize>,
    pub(crate) items: Vec<usize>,
    pub(crate) group_by: Option<usize>,
}

/// How paths are checked while parsing: the projection is parsed before `FROM` names the source.
#[derive(Debug, Clone, Copy)]
enum PathContext {
    Unchecked,
    Source(Source),
}

struct Parser<'t> {
    tokens: Vec<Token>,
    text: &'t str,
    pos: usize,
    depth: usize,
    /// Depth of the tree being built (see [`MAX_TREE_DEPTH`]).
    tree_depth: usize,
    paths: PathContext,
}

impl<'t> Parser<'t> {
    fn new(tokens: Vec<Token>, text: &'t str) -> Self {
        Parser {
            tokens,
            text,
            pos: 0,
            depth: 0,
            tree_depth: 0,
            paths: PathContext::Unchecked,
        }
    }

    fn peek(&self) -> &Token {
        // The lexer always ends the vector with `Eof`, and `advance` never moves past it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn peek_tok_at(&self, offset: usize) -> &Tok {
        let index = (self.pos + offset).min(self.tokens.len() - 1);
        &self.tokens[index].tok
    }

    fn advance(&mut self) -> Token {
        let token = self.peek().clone();
        if token.tok != Tok::Eof {
            self.pos += 1;
        }
        token
    }

    fn at_keyword(&self, kw: Keyword) -> bool {
        self.peek().tok == Tok::Keyword(kw)
    }

    fn eat_keyword(&mut self, kw: Keyword) -> bool {
        let found = self.at_keyword(kw);
        if found {
            self.advance();
        }
        found
    }

    /// How the current token is shown in messages: its source text, or `end of input`.
    fn describe(&self, token: &Token) -> String {
        if token.tok == Tok::Eof {
            return "end of input".to_owned();
        }
        let text: String = self
            .text
            .chars()
            .skip(token.start)
            .take(token.end - token.start)
            .collect();
        if text.chars().count() > 40 {
            let short: String = text.chars().take(37).collect();
            format!("`{short}...`")
        } else {
            format!("`{text}`")
        }
    }

    /// "expected X CONTEXT at position N, found Y" for the current token.
    fn expected(&self, what: &str, context: &str) -> QueryError {
        let token = self.peek();
        let context = if context.is_empty() {
            String::new()
        } else {
            format!(" {context}")
        };
        QueryError::syntax(
            token.start,
            format!(
                "expected {what}{context} at position {}, found {}",
                token.start,
                self.describe(token)
            ),
        )
    }

    fn expect_keyword(&mut self, kw: Keyword, what: &str, context: &str) -> Result<(), QueryError> {
        if self.eat_keyword(kw) {
            Ok(())
        } else {
            Err(self.expected(what, context))
        }
    }

    fn expect_tok(&mut self, tok: &Tok, what: &str, context: &str) -> Result<Token, QueryError> {
        if &self.peek().tok == tok {
            Ok(self.advance())
        } else {
            Err(self.expected(what, context))
        }
    }

    fn expect_end(&self, what: &str) -> Result<(), QueryError> {
        if self.peek().tok == Tok::Eof {
            Ok(())
        } else {
            Err(self.expected(what, ""))
        }
    }

    fn enter(&mut self) -> Result<(), QueryError> {
        self.depth += 1;
        self.deepen()?;
        if self.depth > MAX_DEPTH {
            let start = self.peek().start;
            return Err(QueryError::syntax(
                start,
                format!("expression nested more than {MAX_DEPTH} levels deep at position {start}"),
            ));
        }
        Ok(())
    }

    fn leave(&mut self) {
        self.depth = self.depth.saturating_sub(1);
        self.tree_depth = self.tree_depth.saturating_sub(1);
    }

    /// One more level of tree: a nesting ([`Self::enter`]) or one operator of a chain.
    fn deepen(&mut self) -> Result<(), QueryError> {
        self.tree_depth += 1;
        if self.tree_depth > MAX_TREE_DEPTH {
            let start = self.peek().start;
            return Err(QueryError::syntax(
                start,
                format!(
                    "expression nests more than {MAX_TREE_DEPTH} operators deep at position \
                     {start}; split long AND/OR/arithmetic chains or use IN [...]"
                ),
            ));
        }
        Ok(())
    }

    fn query(&mut self) -> Result<Query, QueryError> {
        self.expect_keyword(Keyword::Select, "`SELECT`", "at the start of the query")?;
        let top = if self.eat_keyword(Keyword::Top) {
            let token = self.peek().clone();
            match token.tok {
                Tok::Int(n) => {
                    self.advance();
                    Some(u64::try_from(n).map_err(|_| {
                        QueryError::syntax(
                            token.start,
                            format!("`TOP` count at position {} is too large", token.start),
                        )
                    })?)
                }
                _ => return Err(self.expected("a non-negative integer", "after `TOP`")),
            }
        } else {
            None
        };

        let mut spans = Spans {
            projection: Some(self.peek().start),
            ..Spans::default()
        };
        let projection = if self.peek().tok == Tok::Star {
            self.advance();
            Projection::All
        } else {
            let mut items = Vec::new();
            loop {
                spans.items.push(self.peek().start);
                items.push(self.projection_item()?);
                if self.peek().tok != Tok::Comma {
                    break;
                }
                self.advance();
            }
            Projection::Items(items)
        };

        self.expect_keyword(Keyword::From, "`FROM`", "after the projection")?;
        let source = self.source()?;
        self.paths = PathContext::Source(source);

        let condition = if self.eat_keyword(Keyword::Where) {
            Some(Condition { expr: self.expr()? })
        } else {
            None
        };
        let group_by = if self.at_keyword(Keyword::Group) {
            spans.group_by = Some(self.peek().start);
            self.advance();
            self.expect_keyword(Keyword::By, "`BY`", "after `GROUP`")?;
            Some(self.path("a property path", "after `GROUP BY`")?)
        } else {
            None
        };
        let what = match (&condition, &group_by) {
            (_, Some(_)) => "the end of the query after the GROUP BY path",
            (Some(_), None) => "an operator, `GROUP BY` or the end of the query",
            (None, None) => "`WHERE`, `GROUP BY` or the end of the query",
        };
        self.expect_end(what)?;

        let query = Query {
            top,
            projection,
            source,
            condition,
            group_by,
        };
        validate(&query, &spans)?;
        Ok(query)
    }

    fn source(&mut self) -> Result<Source, QueryError> {
        const WHAT: &str = "`devices`, `devices.modules` or `devices.jobs`";
        match &self.peek().tok {
            Tok::Ident(name) if name.eq_ignore_ascii_case("devices") => {
                self.advance();
            }
            _ => return Err(self.expected(WHAT, "after `FROM`")),
        }
        if self.peek().tok != Tok::Dot {
            return Ok(Source::Devices);
        }
        self.advance();
        let source = match &self.peek().tok {
            Tok::Ident(name) if name.eq_ignore_ascii_case("modules") => Source::DevicesModules,
            Tok::Ident(name) if name.eq_ignore_ascii_case("jobs") => Source::DevicesJobs,
            _ => return Err(self.expected("`modules` or `jobs`", "after `FROM devices.`")),
        };
        self.advance();
        Ok(source)
    }

    fn projection_item(&mut self) -> Result<ProjectionItem, QueryError> {
        const WHAT: &str = "`*`, a property path or an aggregate such as `COUNT()`";
        let expr = match (&self.peek().tok, self.peek_tok_at(1)) {
            (Tok::Ident(name), Tok::LParen) => {
                let name = name.clone();
                ProjectionExpr::Aggregate(self.aggregate(&name)?)
            }
            (Tok::Ident(_) | Tok::Escaped(_), _) => {
                ProjectionExpr::Path(self.path(WHAT, "in the SELECT list")?)
            }
            _ => return Err(self.expected(WHAT, "in the SELECT list")),
        };
        let alias = if self.eat_keyword(Keyword::As) {
            Some(self.name("an alias name", "after `AS`")?)
        } else {
            None
        };
        Ok(ProjectionItem { expr, alias })
    }

    /// `COUNT()`, `AVG(path)`, `SUM(path)`, `MIN(path)`, `MAX(path)`; at the name token.
    fn aggregate(&mut self, name: &str) -> Result<Aggregate, QueryError> {
        let name_token = self.peek().clone();
        let upper = name.to_ascii_uppercase();
        if upper != "COUNT" && !matches!(upper.as_str(), "AVG" | "SUM" | "MIN" | "MAX") {
            let message = if Function::from_name(name).is_some() {
                format!(
                    "function `{upper}` at position {} can only be used in WHERE; expected an \
                     aggregate (`COUNT`, `AVG`, `SUM`, `MIN`, `MAX`)",
                    name_token.start
                )
            } else {
                format!(
                    "unknown aggregate `{name}` at position {}; expected `COUNT`, `AVG`, `SUM`, \
                     `MIN` or `MAX`",
                    name_token.start
                )
            };
            return Err(QueryError::syntax(name_token.start, message));
        }
        self.advance();
        self.advance(); // `(`, checked by the caller
        if upper == "COUNT" {
            self.expect_tok(
                &Tok::RParen,
                "`)`",
                "after `COUNT(` (COUNT takes no argument)",
            )?;
            return Ok(Aggregate::Count);
        }
        let context = format!("as the argument of `{upper}`");
        let path = self.path("a property path", &context)?;
        self.expect_tok(&Tok::RParen, "`)`", &format!("to close `{upper}(`"))?;
        Ok(match upper.as_str() {
            "AVG" => Aggregate::Avg(path),
            "SUM" => Aggregate::Sum(path),
            "MIN" => Aggregate::Min(path),
            _ => Aggregate::Max(path),
        })
    }

    /// A bare or `[[escaped]]` identifier (alias or path segment).
    fn name(&mut self, what: &str, context: &str) -> Result<String, QueryError> {
        let token = self.peek().clone();
        match token.tok {
            Tok::Ident(name) | Tok::Escaped(name) => {
                self.advance();
                Ok(name)
            }
            Tok::Keyword(_) => {
                let word = self.describe(&token);
                let bare = word.trim_matches('`');
                Err(QueryError::syntax(
                    token.start,
                    format!(
                        "expected {what} {context} at position {}, found the reserved word \
                         {word}; escape it as `[[{bare}]]`",
                        token.start
                    ),
                ))
            }
            _ => Err(self.expected(what, context)),
        }
    }

    /// `segment ('.' segment)*`, checked against the source of the query.
    fn path(&mut self, what: &str, context: &str) -> Result<Path, QueryError> {
        let start = self.peek().start;
        let mut segments = vec![self.name(what, context)?];
        while self.peek().tok == Tok::Dot {
            self.advance();
            segments.push(self.name("a property name", "after `.`")?);
        }
        if let PathContext::Source(source) = self.paths {
            segments = resolve_segments(segments, source, Some(start))?;
        }
        // `segments` is non-empty: it starts with one name and only grows, or is rejected.
        Path::new(segments).ok_or_else(|| self.expected(what, context))
    }

    fn expr(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.and()?;
        let outer = self.tree_depth;
        while self.eat_keyword(Keyword::Or) {
            self.deepen()?;
            let right = self.and()?;
            left = binary(BinaryOp::Or, left, right);
        }
        self.tree_depth = outer;
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.not()?;
        let outer = self.tree_depth;
        while self.eat_keyword(Keyword::And) {
            self.deepen()?;
            let right = self.not()?;
            left = binary(BinaryOp::And, left, right);
        }
        self.tree_depth = outer;
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, QueryError> {
        if !self.at_keyword(Keyword::Not) {
            return self.comparison();
        }
        self.enter()?;
        self.advance();
        let inner = self.not()?;
        self.leave();
        Ok(Expr::Not(Box::new(inner)))
    }

    fn comparison(&mut self) -> Result<Expr, QueryError> {
        let left = self.additive()?;
        let op = match &self.peek().tok {
            Tok::Eq => BinaryOp::Eq,
            Tok::Ne => BinaryOp::Ne,
            Tok::Lt => BinaryOp::Lt,
            Tok::Le => BinaryOp::Le,
            Tok::Gt => BinaryOp::Gt,
            Tok::Ge => BinaryOp::Ge,
            Tok::Keyword(Keyword::In) => return self.in_list(left, false),
            Tok::Keyword(Keyword::Nin) => return self.in_list(left, true),
            Tok::Keyword(Keyword::Not) if *self.peek_tok_at(1) == Tok::Keyword(Keyword::In) => {
                self.advance();
                return self.in_list(left, true);
            }
            _ => return Ok(left),
        };
        self.advance();
        let right = self.additive()?;
        Ok(binary(op, left, right))
    }

    /// `IN [..]` / `NIN [..]`; at the `IN`/`NIN` token.
    fn in_list(&mut self, left: Expr, negated: bool) -> Result<Expr, QueryError> {
        let keyword = if negated { "`NIN`" } else { "`IN`" };
        self.advance();
        self.expect_tok(&Tok::LBracket, "`[`", &format!("after {keyword}"))?;
        let mut list = Vec::new();
        if self.peek().tok == Tok::RBracket {
            self.advance();
        } else {
            loop {
                list.push(self.literal("a constant", &format!("in the {keyword} list"))?);
                match self.peek().tok {
                    Tok::Comma => {
                        self.advance();
                    }
                    Tok::RBracket => {
                        self.advance();
                        break;
                    }
                    _ => {
                        return Err(self.expected("`,` or `]`", &format!("in the {keyword} list")));
                    }
                }
            }
        }
        Ok(Expr::In {
            expr: Box::new(left),
            list,
            negated,
        })
    }

    /// A constant, including a negative number.
    fn literal(&mut self, what: &str, context: &str) -> Result<Literal, QueryError> {
        let negative = self.peek().tok == Tok::Minus;
        let token = if negative {
            self.peek_tok_at(1).clone()
        } else {
            self.peek().tok.clone()
        };
        let literal = match token {
            Tok::Int(n) => Literal::Number(int_literal(n, negative)),
            Tok::Float(x) => Literal::Number(Number::Float(if negative { -x } else { x })),
            Tok::Str(s) if !negative => Literal::String(s),
            Tok::Keyword(Keyword::True) if !negative => Literal::Bool(true),
            Tok::Keyword(Keyword::False) if !negative => Literal::Bool(false),
            Tok::Keyword(Keyword::Null) if !negative => Literal::Null,
            Tok::Keyword(Keyword::Undefined) if !negative => Literal::Undefined,
            _ => {
                if negative {
                    self.advance();
                    return Err(self.expected("a number", "after `-`"));
                }
                return Err(self.expected(what, context));
            }
        };
        if negative {
            self.advance();
        }
        self.advance();
        Ok(literal)
    }

    fn additive(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.multiplicative()?;
        let outer = self.tree_depth;
        loop {
            let op = match self.peek().tok {
                Tok::Plus => BinaryOp::Add,
                Tok::Minus => BinaryOp::Sub,
                _ => {
                    self.tree_depth = outer;
                    return Ok(left);
                }
            };
            self.deepen()?;
            self.advance();
            let right = self.multiplicative()?;
            left = binary(op, left, right);
        }
    }

    fn multiplicative(&mut self) -> Result<Expr, QueryError> {
        let mut left = self.unary()?;
        let outer = self.tree_depth;
        loop {
            let op = match self.peek().tok {
                Tok::Star => BinaryOp::Mul,
                Tok::Slash => BinaryOp::Div,
                Tok::Percent => BinaryOp::Mod,
                _ => {
                    self.tree_depth = outer;
                    return Ok(left);
                }
            };
            self.deepen()?;
            self.advance();
            let right = self.unary()?;
            left = binary(op, left, right);
        }
    }

    fn unary(&mut self) -> Result<Expr, QueryError> {
        if self.peek().tok != Tok::Minus {
            return self.primary();
        }
        if matches!(self.peek_tok_at(1), Tok::Int(_) | Tok::Float(_)) {
            return Ok(Expr::Literal(self.literal("a number", "after `-`")?));
        }
        self.enter()?;
        self.advance();
        let inner = self.unary()?;
        self.leave();
        Ok(Expr::Neg(Box::new(inner)))
    }

    fn primary(&mut self) -> Result<Expr, QueryError> {
        const WHAT: &str = "a value, a property path, a function call or `(`";
        let token = self.peek().clone();
        match &token.tok {
            Tok::Int(_)
            | Tok::Float(_)
            | Tok::Str(_)
            | Tok::Keyword(Keyword::True | Keyword::False | Keyword::Null | Keyword::Undefined) => {
                Ok(Expr::Literal(self.literal(WHAT, "")?))
            }
            Tok::LParen => {
                self.enter()?;
                self.advance();
                let inner = self.expr()?;
                let context = format!("to close the `(` at position {}", token.start);
                self.expect_tok(&Tok::RParen, "`)`", &context)?;
                self.leave();
                Ok(inner)
            }
            Tok::Ident(name) if *self.peek_tok_at(1) == Tok::LParen => {
                let name = name.clone();
                self.call(&name, token.start)
            }
            Tok::Ident(_) | Tok::Escaped(_) => Ok(Expr::Path(self.path(WHAT, "")?)),
            Tok::LBracket => Err(QueryError::syntax(
                token.start,
                format!(
                    "expected {WHAT} at position {}, found `[`; arrays are only allowed after \
                     `IN` / `NIN`",
                    token.start
                ),
            )),
            _ => Err(self.expected(WHAT, "")),
        }
    }

    /// `NAME(args)`; at the name token.
    fn call(&mut self, name: &str, start: usize) -> Result<Expr, QueryError> {
        let Some(function) = Function::from_name(name) else {
            let upper = name.to_ascii_uppercase();
            let message = if matches!(upper.as_str(), "COUNT" | "AVG" | "SUM" | "MIN" | "MAX") {
                format!(
                    "aggregate `{upper}` at position {start} is only allowed in the SELECT list"
                )
            } else {
                format!(
                    "unknown function `{name}` at position {start}; expected one of IS_DEFINED, \
                     IS_NULL, IS_BOOL, IS_NUMBER, IS_STRING, IS_OBJECT, IS_ARRAY, IS_PRIMITIVE, \
                     STARTSWITH, ENDSWITH, CONTAINS"
                )
            };
            return Err(QueryError::syntax(start, message));
        };
        self.enter()?;
        self.advance();
        self.advance(); // `(`, checked by the caller
        let mut args = Vec::new();
        if self.peek().tok != Tok::RParen {
            loop {
                args.push(self.expr()?);
                if self.peek().tok != Tok::Comma {
                    break;
                }
                self.advance();
            }
        }
        let context = format!("to close `{}(`", function.name());
        let close = self.expect_tok(&Tok::RParen, "`,` or `)`", &context)?;
        self.leave();
        if args.len() != function.arity() {
            return Err(QueryError::syntax(
                start,
                format!(
                    "`{}` at position {start} takes {} argument{}, found {} (call ends at \
                     position {})",
                    function.name(),
                    function.arity(),
                    if function.arity() == 1 { "" } else { "s" },
                    args.len(),
                    close.start
                ),
            ));
        }
        Ok(Expr::Call { function, args })
    }
}

fn binary(op: BinaryOp, left: Expr, right: Expr) -> Expr {
    Expr::Binary {
        op,
        left: Box::new(left),
        right: Box::new(right),
    }
}

/// Applies the sign to an integer magnitude: exact `i64` when it fits, else a float.
fn int_literal(magnitude: u128, negative: bool) -> Number {
    let signed = if negative {
        i128::try_from(magnitude).ok().map(|m| -m)
    } else {
        i128::try_from(magnitude).ok()
    };
    match signed.and_then(|v| i64::try_from(v).ok()) {
        Some(v) => Number::Int(v),
        // Precision loss is inherent: the value is outside every JSON integer type IoT Hub uses.
        #[allow(clippy::cast_precision_loss)]
        None => {
            let x = magnitude as f64;
            Number::Float(if negative { -x } else { x })
        }
    }
}

/// Checks a path's segments against the source and rewrites `devices.jobs.<field>` to `<field>`
/// for `FROM devices.jobs`, so the path addresses a device-job row directly.
pub(crate) fn resolve_segments(
    mut segments: Vec<String>,
    source: Source,
    position: Option<usize>,
) -> Result<Vec<String>, QueryError> {
    let at = position.map_or(String::new(), |p| format!(" at position {p}"));
    let first_is = |segments: &[String], name: &str| {
        segments
            .first()
            .is_some_and(|s| s.eq_ignore_ascii_case(name))
    };
    let shown = segments.join(".");
    match source {
        Source::DevicesJobs => {
            if first_is(&segments, "devices") {
                let jobs = segments
                    .get(1)
                    .is_some_and(|s| s.eq_ignore_ascii_case("jobs"));
                if !jobs || segments.len() < 3 {
                    return Err(QueryError::unsupported(
                        position,
                        format!(
                            "path `{shown}`{at} is not supported in a devices.jobs query; use \
                             `devices.jobs.<field>` (twin and job fields cannot be mixed)"
                        ),
                    ));
                }
                segments.drain(..2);
            }
            if first_is(&segments, "tags") || first_is(&segments, "properties") {
                return Err(QueryError::unsupported(
                    position,
                    format!(
                        "twin path `{shown}`{at} cannot be used in a devices.jobs query (twin and \
                         job fields cannot be mixed)"
                    ),
                ));
            }
        }
        Source::Devices | Source::DevicesModules => {
            if segments.len() > 1 && first_is(&segments, "devices") {
                return Err(QueryError::unsupported(
                    position,
                    format!(
                        "path `{shown}`{at} is not supported in a `FROM {source}` query; paths \
                         start at the twin root (`devices.jobs.<field>` needs `FROM devices.jobs`)"
                    ),
                ));
            }
        }
    }
    Ok(segments)
}

/// The output column names of a projection, in order; `None` for `SELECT *`.
///
/// A path is named by its alias or last segment, an unnamed aggregate `$1`, `$2`...; with
/// `GROUP BY` and the group path not projected, its last segment comes first.
pub(crate) fn columns(query: &Query) -> Option<Vec<(String, Column<'_>)>> {
    let Projection::Items(items) = &query.projection else {
        return None;
    };
    let mut columns = Vec::with_capacity(items.len() + 1);
    if let Some(group) = &query.group_by {
        let projected = items
            .iter()
            .any(|item| item.expr == ProjectionExpr::Path(group.clone()));
        if !projected {
            columns.push((group.last().to_owned(), Column::Path(group)));
        }
    }
    let mut unnamed = 0;
    for item in items {
        let (default_name, column) = match &item.expr {
            ProjectionExpr::Path(path) => (path.last().to_owned(), Column::Path(path)),
            ProjectionExpr::Aggregate(aggregate) => {
                unnamed += 1;
                (format!("${unnamed}"), Column::Aggregate(aggregate))
            }
        };
        columns.push((item.alias.clone().unwrap_or(default_name), column));
    }
    Some(columns)
}

/// What fills an output column.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Column<'q> {
    Path(&'q Path),
    Aggregate(&'q Aggregate),
}

/// Rejects queries that parse but that the evaluator cannot run (`spans` locates the parts).
pub(crate) fn validate(query: &Query, spans: &Spans) -> Result<(), QueryError> {
    let items: &[ProjectionItem] = match &query.projection {
        Projection::All => &[],
        Projection::Items(items) => items,
    };
    if query.source == Source::DevicesJobs {
        if !items.is_empty() {
            return Err(unsupported_at(
                spans.projection,
                "only `SELECT *` is supported with `FROM devices.jobs` (no projections or \
                 aggregates)",
            ));
        }
        if query.group_by.is_some() {
            return Err(unsupported_at(
                spans.group_by,
                "GROUP BY is not supported with `FROM devices.jobs`",
            ));
        }
    }
    if query.projection == Projection::All {
        if query.group_by.is_some() {
            return Err(unsupported_at(
                spans.group_by,
                "`SELECT *` cannot be combined with GROUP BY; select the group path and \
                 aggregates",
            ));
        }
        return Ok(());
    }
    if items.is_empty() {
        return Err(unsupported_at(spans.projection, "the SELECT list is empty"));
    }
    let item_at = |i: usize| spans.items.get(i).copied();
    for (i, item) in items.iter().enumerate() {
        if let ProjectionExpr::Path(path) = &item.expr {
            resolve_segments(path.segments().to_vec(), query.source, item_at(i))?;
        }
    }
    match &query.group_by {
        None => {
            let aggregates = items
                .iter()
                .position(|item| matches!(item.expr, ProjectionExpr::Aggregate(_)));
            let paths = items
                .iter()
                .position(|item| matches!(item.expr, ProjectionExpr::Path(_)));
            if let (Some(_), Some(path_index)) = (aggregates, paths) {
                return Err(unsupported_at(
                    item_at(path_index),
                    "property paths and aggregates can be mixed only with GROUP BY on that path",
                ));
            }
        }
        Some(group) => {
            for (i, item) in items.iter().enumerate() {
                let stray = match &item.expr {
                    ProjectionExpr::Path(path) => Some(path).filter(|path| *path != group),
                    ProjectionExpr::Aggregate(_) => None,
                };
                if let Some(path) = stray {
                    return Err(unsupported_at(
                        item_at(i),
                        &format!("`{path}` must be an aggregate or the GROUP BY path `{group}`"),
                    ));
                }
            }
        }
    }
    if let Some(columns) = columns(query) {
        for (i, (name, _)) in columns.iter().enumerate() {
            if columns[..i].iter().any(|(other, _)| other == name) {
                return Err(unsupported_at(
                    spans.projection,
                    &format!("duplicate column name `{name}` in the SELECT list; add an alias"),
                ));
            }
        }
    }
    Ok(())
}

fn unsupported_at(position: Option<usize>, message: &str) -> QueryError {
    let message = match position {
        Some(p) => format!("{message} (at position {p})"),
        None => message.to_owned(),
    };
    QueryError::new(QueryErrorKind::Unsupported, position, message)
}
