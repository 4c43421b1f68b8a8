//! Typed AST of the IoT Hub query language and its `Display` as query text.
//! Invariant: printing inserts parentheses and `[[escapes]]` exactly where needed, so
//! `parse(&ast.to_string()) == Ok(ast)` for every AST the parser can produce.

use std::fmt::{self, Write as _};

use super::lexer::is_plain_ident;

/// A parsed `SELECT [TOP n] ... FROM ... [WHERE ...] [GROUP BY ...]` query.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// `TOP n`: the maximum number of result rows.
    pub top: Option<u64>,
    /// What each result row holds.
    pub projection: Projection,
    /// The collection after `FROM`.
    pub source: Source,
    /// The `WHERE` condition, if any. For `FROM devices.jobs` the parser has already rewritten
    /// `devices.jobs.<field>` paths to `<field>`, so the condition applies to a device-job row.
    pub condition: Option<Condition>,
    /// The `GROUP BY` path, if any.
    pub group_by: Option<Path>,
}

impl Query {
    /// True for `SELECT *` without `GROUP BY`: the result rows are the matching documents
    /// themselves, so a caller may page over its collection applying [`Query::matches`].
    pub fn is_row_query(&self) -> bool {
        self.projection == Projection::All && self.group_by.is_none()
    }
}

/// The `SELECT` list.
#[derive(Debug, Clone, PartialEq)]
pub enum Projection {
    /// `SELECT *`.
    All,
    /// `SELECT item [AS alias], ...` (never empty when produced by the parser).
    Items(Vec<ProjectionItem>),
}

/// One entry of a `SELECT` list.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectionItem {
    /// The projected value.
    pub expr: ProjectionExpr,
    /// `AS alias`; without one a path is keyed by its last segment and an aggregate by `$1`, `$2`...
    pub alias: Option<String>,
}

/// A projected value: a property path or an aggregate.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectionExpr {
    /// A property path such as `properties.reported.status`.
    Path(Path),
    /// `COUNT()`, `AVG(path)`, `SUM(path)`, `MIN(path)` or `MAX(path)`.
    Aggregate(Aggregate),
}

/// Aggregate functions allowed in the `SELECT` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aggregate {
    /// `COUNT()`: the number of documents (in the group).
    Count,
    /// `AVG(path)`: mean of the numeric values.
    Avg(Path),
    /// `SUM(path)`: sum of the numeric values.
    Sum(Path),
    /// `MIN(path)`: smallest number or string.
    Min(Path),
    /// `MAX(path)`: largest number or string.
    Max(Path),
}

/// The collection a query reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `FROM devices`: device twins.
    Devices,
    /// `FROM devices.modules`: module twins.
    DevicesModules,
    /// `FROM devices.jobs`: per-device job rows.
    DevicesJobs,
}

impl Source {
    /// The collection name as written after `FROM`.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Devices => "devices",
            Source::DevicesModules => "devices.modules",
            Source::DevicesJobs => "devices.jobs",
        }
    }
}

/// Top-level document properties whose names match case-insensitively, as IoT Hub does for twin
/// system properties (and, by the same rule, device-job row fields).
const CANONICAL_NAMES: [&str; 27] = [
    "deviceId",
    "moduleId",
    "etag",
    "deviceEtag",
    "status",
    "statusReason",
    "statusUpdateTime",
    "connectionState",
    "lastActivityTime",
    "cloudToDeviceMessageCount",
    "authenticationType",
    "x509Thumbprint",
    "modelId",
    "version",
    "tags",
    "properties",
    "capabilities",
    "deviceScope",
    "parentScopes",
    "jobId",
    "jobType",
    "startTimeUtc",
    "endTimeUtc",
    "createdDateTimeUtc",
    "lastUpdatedDateTimeUtc",
    "outcome",
    "error",
];

/// A dotted property path into a document, e.g. `tags.location.region`.
///
/// Segments are stored unescaped; the first is canonicalised when it names a system property in
/// another case (`DeviceId` -> `deviceId`). Always has at least one segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Path {
    segments: Vec<String>,
}

impl Path {
    /// Builds a path from its (unescaped) segments; `None` when there are none.
    pub fn new<I, S>(segments: I) -> Option<Path>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut segments: Vec<String> = segments.into_iter().map(Into::into).collect();
        let first = segments.first_mut()?;
        let canonical = CANONICAL_NAMES
            .iter()
            .find(|name| name.eq_ignore_ascii_case(first));
        if let Some(canonical) = canonical.filter(|canonical| first != *canonical) {
            *first = (*canonical).to_owned();
        }
        Some(Path { segments })
    }

    /// The segments, first to last.
    pub fn segments(&self) -> &[String] {
        &self.segments
    }

    /// The last segment: the default column name of a projected path.
    pub fn last(&self) -> &str {
        self.segments.last().map_or("", String::as_str)
    }
}

/// A boolean condition (`WHERE` clause or a job's `queryCondition`).
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The expression; the condition holds only when it evaluates to boolean `true`.
    pub expr: Expr,
}

impl Condition {
    /// The string the condition pins a top-level field to, when one of its `AND`ed terms is
    /// `field = 'text'` (either way round): no document with another value can match, so a scan
    /// may look at those documents only (e.g. `devices.jobs` rows of one job).
    pub fn pinned_string(&self, field: &str) -> Option<&str> {
        fn pinned<'e>(expr: &'e Expr, field: &str) -> Option<&'e str> {
            match expr {
                Expr::Binary {
                    op: BinaryOp::And,
                    left,
                    right,
                } => pinned(left, field).or_else(|| pinned(right, field)),
                Expr::Binary {
                    op: BinaryOp::Eq,
                    left,
                    right,
                } => match (left.as_ref(), right.as_ref()) {
                    (Expr::Path(path), Expr::Literal(Literal::String(text)))
                    | (Expr::Literal(Literal::String(text)), Expr::Path(path))
                        if path.segments() == [field] =>
                    {
                        Some(text)
                    }
                    _ => None,
                },
                _ => None,
            }
        }
        pinned(&self.expr, field)
    }

    /// The condition that holds for every document (a job's `queryCondition` of `*`).
    pub fn all() -> Self {
        Condition {
            expr: Expr::Literal(Literal::Bool(true)),
        }
    }
}

/// An expression in a condition.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// A constant.
    Literal(Literal),
    /// A property of the document.
    Path(Path),
    /// `NOT e`.
    Not(Box<Expr>),
    /// Unary minus of a non-literal, printed `-(e)` (`-5` is a negative [`Literal`]).
    Neg(Box<Expr>),
    /// `left op right`.
    Binary {
        /// The operator.
        op: BinaryOp,
        /// Left operand.
        left: Box<Expr>,
        /// Right operand.
        right: Box<Expr>,
    },
    /// `e IN [..]`, or with `negated` `e NIN [..]` (also parsed from `e NOT IN [..]`).
    In {
        /// The tested value.
        expr: Box<Expr>,
        /// The constants it is compared with.
        list: Vec<Literal>,
        /// `NIN` rather than `IN`.
        negated: bool,
    },
    /// A function call such as `IS_DEFINED(tags.x)`.
    Call {
        /// Which function.
        function: Function,
        /// Its arguments (count matches [`Function::arity`]).
        args: Vec<Expr>,
    },
}

/// Binary operators, loosest binding first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `OR`.
    Or,
    /// `AND`.
    And,
    /// `=`.
    Eq,
    /// `!=` (also parsed from `<>`).
    Ne,
    /// `<`.
    Lt,
    /// `<=`.
    Le,
    /// `>`.
    Gt,
    /// `>=`.
    Ge,
    /// `+`.
    Add,
    /// `-`.
    Sub,
    /// `*`.
    Mul,
    /// `/`.
    Div,
    /// `%`.
    Mod,
}

impl BinaryOp {
    /// The operator as written in query text.
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Or => "OR",
            BinaryOp::And => "AND",
            BinaryOp::Eq => "=",
            BinaryOp::Ne => "!=",
            BinaryOp::Lt => "<",
            BinaryOp::Le => "<=",
            BinaryOp::Gt => ">",
            BinaryOp::Ge => ">=",
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::Mod => "%",
        }
    }

    fn precedence(self) -> u8 {
        match self {
            BinaryOp::Or => PREC_OR,
            BinaryOp::And => PREC_AND,
            BinaryOp::Eq
            | BinaryOp::Ne
            | BinaryOp::Lt
            | BinaryOp::Le
            | BinaryOp::Gt
            | BinaryOp::Ge => PREC_CMP,
            BinaryOp::Add | BinaryOp::Sub => PREC_ADD,
            BinaryOp::Mul | BinaryOp::Div | BinaryOp::Mod => PREC_MUL,
        }
    }
}

const PREC_OR: u8 = 1;
const PREC_AND: u8 = 2;
const PREC_NOT: u8 = 3;
const PREC_CMP: u8 = 4;
const PREC_ADD: u8 = 5;
const PREC_MUL: u8 = 6;
const PREC_ATOM: u8 = 7;

/// Built-in functions usable in conditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Function {
    /// `IS_DEFINED(e)`: the value exists (including `null`).
    IsDefined,
    /// `IS_NULL(e)`.
    IsNull,
    /// `IS_BOOL(e)`.
    IsBool,
    /// `IS_NUMBER(e)`.
    IsNumber,
    /// `IS_STRING(e)`.
    IsString,
    /// `IS_OBJECT(e)`.
    IsObject,
    /// `IS_ARRAY(e)`.
    IsArray,
    /// `IS_PRIMITIVE(e)`: null, boolean, number or string.
    IsPrimitive,
    /// `STARTSWITH(s, prefix)`.
    StartsWith,
    /// `ENDSWITH(s, suffix)`.
    EndsWith,
    /// `CONTAINS(s, part)`.
    Contains,
}

const FUNCTIONS: [Function; 11] = [
    Function::IsDefined,
    Function::IsNull,
    Function::IsBool,
    Function::IsNumber,
    Function::IsString,
    Function::IsObject,
    Function::IsArray,
    Function::IsPrimitive,
    Function::StartsWith,
    Function::EndsWith,
    Function::Contains,
];

impl Function {
    /// The function's name as printed (upper case; parsing is case-insensitive).
    pub fn name(self) -> &'static str {
        match self {
            Function::IsDefined => "IS_DEFINED",
            Function::IsNull => "IS_NULL",
            Function::IsBool => "IS_BOOL",
            Function::IsNumber => "IS_NUMBER",
            Function::IsString => "IS_STRING",
            Function::IsObject => "IS_OBJECT",
            Function::IsArray => "IS_ARRAY",
            Function::IsPrimitive => "IS_PRIMITIVE",
            Function::StartsWith => "STARTSWITH",
            Function::EndsWith => "ENDSWITH",
            Function::Contains => "CONTAINS",
        }
    }

    /// The function named `name`, case-insensitively.
    pub fn from_name(name: &str) -> Option<Function> {
        FUNCTIONS
            .into_iter()
            .find(|f| f.name().eq_ignore_ascii_case(name))
    }

    /// How many arguments the function takes.
    pub fn arity(self) -> usize {
        match self {
            Function::StartsWith | Function::EndsWith | Function::Contains => 2,
            _ => 1,
        }
    }
}

/// A constant value.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `undefined`.
    Undefined,
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number.
    Number(Number),
    /// A string (stored unescaped).
    String(String),
}

/// A numeric constant. Integers that fit `i64` stay exact; others are `f64` (always finite).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// An integer (decimal or `0x` hex in the text).
    Int(i64),
    /// A floating-point number (printed so that it re-parses as a float).
    Float(f64),
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SELECT ")?;
        if let Some(top) = self.top {
            write!(f, "TOP {top} ")?;
        }
        match &self.projection {
            Projection::All => f.write_str("*")?,
            Projection::Items(items) => {
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
            }
        }
        write!(f, " FROM {}", self.source.as_str())?;
        if let Some(condition) = &self.condition {
            write!(f, " WHERE {condition}")?;
        }
        if let Some(path) = &self.group_by {
            write!(f, " GROUP BY {path}")?;
        }
        Ok(())
    }
}

impl fmt::Display for ProjectionItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.expr {
            ProjectionExpr::Path(path) => write!(f, "{path}")?,
            ProjectionExpr::Aggregate(aggregate) => write!(f, "{aggregate}")?,
        }
        if let Some(alias) = &self.alias {
            f.write_str(" AS ")?;
            write_name(f, alias)?;
        }
        Ok(())
    }
}

impl fmt::Display for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregate::Count => f.write_str("COUNT()"),
            Aggregate::Avg(path) => write!(f, "AVG({path})"),
            Aggregate::Sum(path) => write!(f, "SUM({path})"),
            Aggregate::Min(path) => write!(f, "MIN({path})"),
            Aggregate::Max(path) => write!(f, "MAX({path})"),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Writes an identifier bare when possible, else as `[[name]]`.
fn write_name(f: &mut fmt::Formatter<'_>, name: &str) -> fmt::Result {
    if is_plain_ident(name) {
        f.write_str(name)
    } else {
        write!(f, "[[{name}]]")
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_char('.')?;
            }
            write_name(f, segment)?;
        }
        Ok(())
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.expr)
    }
}

impl Expr {
    fn precedence(&self) -> u8 {
        match self {
            Expr::Binary { op, .. } => op.precedence(),
            Expr::Not(_) => PREC_NOT,
            Expr::In { .. } => PREC_CMP,
            Expr::Literal(_) | Expr::Path(_) | Expr::Neg(_) | Expr::Call { .. } => PREC_ATOM,
        }
    }

    /// Whether `-` can be written straight before `self` and parse back as `Neg(self)`: not a
    /// non-negative number (`- 5` is the literal `-5`) nor anything binding looser than `-`.
    fn is_unary_operand(&self) -> bool {
        match self {
            Expr::Neg(_) | Expr::Path(_) | Expr::Call { .. } => true,
            Expr::Literal(Literal::Number(Number::Int(n))) => *n < 0,
            Expr::Literal(Literal::Number(Number::Float(x))) => *x < 0.0,
            _ => false,
        }
    }

    /// Writes `self`, parenthesised when it binds looser than `min`.
    fn write_at(&self, f: &mut fmt::Formatter<'_>, min: u8) -> fmt::Result {
        if self.precedence() < min {
            write!(f, "({self})")
        } else {
            write!(f, "{self}")
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Literal(literal) => write!(f, "{literal}"),
            Expr::Path(path) => write!(f, "{path}"),
            Expr::Not(inner) => {
                f.write_str("NOT ")?;
                inner.write_at(f, PREC_NOT)
            }
            // An operand that is itself unary needs no parentheses, and must not get them: the
            // parser counts each `(` as a nesting level, so `-(-(...))` for a chain of 33 or more
            // minus signs did not re-parse (found by the fuzz/ query target).
            Expr::Neg(inner) if inner.is_unary_operand() => write!(f, "- {inner}"),
            Expr::Neg(inner) => write!(f, "-({inner})"),
            Expr::Binary { op, left, right } => {
                let prec = op.precedence();
                // Comparisons do not chain (`a = b = c` is rejected), so both sides bind tighter.
                let left_min = if prec == PREC_CMP { prec + 1 } else { prec };
                left.write_at(f, left_min)?;
                write!(f, " {} ", op.symbol())?;
                right.write_at(f, prec + 1)
            }
            Expr::In {
                expr,
                list,
                negated,
            } => {
                expr.write_at(f, PREC_CMP + 1)?;
                f.write_str(if *negated { " NIN [" } else { " IN [" })?;
                for (i, literal) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{literal}")?;
                }
                f.write_char(']')
            }
            Expr::Call { function, args } => {
                write!(f, "{}(", function.name())?;
                for (i, arg) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{arg}")?;
                }
                f.write_char(')')
            }
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Undefined => f.write_str("undefined"),
            Literal::Null => f.write_str("null"),
            Literal::Bool(b) => write!(f, "{b}"),
            Literal::Number(n) => write!(f, "{n}"),
            Literal::String(s) => {
                f.write_char('\'')?;
                for c in s.chars() {
                    match c {
                        '\'' => f.write_str("\\'")?,
                        '\\' => f.write_str("\\\\")?,
                        c if c.is_control() && u32::from(c) <= 0xFFFF => {
                            write!(f, "\\u{:04X}", u32::from(c))?;
                        }
                        c => f.write_char(c)?,
                    }
                }
                f.write_char('\'')
            }
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            // `{:?}` is the shortest round-trip form and always has `.` or `e` (`3.0`, `1e20`),
            // so it re-parses as a float.
            Number::Float(x) => write!(f, "{x:?}"),
        }
    }
}
