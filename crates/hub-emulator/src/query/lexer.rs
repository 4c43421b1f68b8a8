//! Hand-written lexer: query text to tokens carrying 0-based character offsets.
//! Keywords are recognised case-insensitively; `[[name]]` is an escaped identifier, never a keyword.

use super::QueryError;

/// One token and the character range `start..end` it came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Token {
    pub(crate) tok: Tok,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Token kinds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Tok {
    Ident(String),
    /// `[[name]]`: an identifier that may be a reserved word or contain any character.
    Escaped(String),
    Keyword(Keyword),
    Str(String),
    /// Integer magnitude (decimal or `0x` hex); the sign is applied by the parser.
    Int(u128),
    Float(f64),
    Star,
    Comma,
    Dot,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Plus,
    Minus,
    Slash,
    Percent,
    Eof,
}

/// Reserved words. A path segment spelled like one must be escaped as `[[word]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Keyword {
    Select,
    Top,
    From,
    Where,
    And,
    Or,
    Not,
    In,
    Nin,
    As,
    Group,
    By,
    True,
    False,
    Null,
    Undefined,
}

const KEYWORDS: [(&str, Keyword); 16] = [
    ("SELECT", Keyword::Select),
    ("TOP", Keyword::Top),
    ("FROM", Keyword::From),
    ("WHERE", Keyword::Where),
    ("AND", Keyword::And),
    ("OR", Keyword::Or),
    ("NOT", Keyword::Not),
    ("IN", Keyword::In),
    ("NIN", Keyword::Nin),
    ("AS", Keyword::As),
    ("GROUP", Keyword::Group),
    ("BY", Keyword::By),
    ("TRUE", Keyword::True),
    ("FALSE", Keyword::False),
    ("NULL", Keyword::Null),
    ("UNDEFINED", Keyword::Undefined),
];

/// The keyword spelled by `word`, case-insensitively.
pub(crate) fn keyword(word: &str) -> Option<Keyword> {
    KEYWORDS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(word))
        .map(|&(_, kw)| kw)
}

pub(crate) fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

pub(crate) fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

/// True when `name` can be written bare (not `[[escaped]]`) as an identifier.
pub(crate) fn is_plain_ident(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if is_ident_start(c))
        && chars.all(is_ident_continue)
        && keyword(name).is_none()
}

/// Splits `text` into tokens, ending with [`Tok::Eof`].
pub(crate) fn lex(text: &str) -> Result<Vec<Token>, QueryError> {
    let chars: Vec<char> = text.chars().collect();
    let mut lexer = Lexer {
        chars: &chars,
        pos: 0,
    };
    let mut tokens = Vec::new();
    loop {
        let token = lexer.next_token()?;
        let done = token.tok == Tok::Eof;
        tokens.push(token);
        if done {
            return Ok(tokens);
        }
    }
}

struct Lexer<'c> {
    chars: &'c [char],
    pos: usize,
}

impl Lexer<'_> {
    fn peek_at(&self, offset: usize) -> Option<char> {
        self.chars.get(self.pos + offset).copied()
    }

    fn next_token(&mut self) -> Result<Token, QueryError> {
        while self.peek_at(0).is_some_and(char::is_whitespace) {
            self.pos += 1;
        }
        let start = self.pos;
        let Some(c) = self.peek_at(0) else {
            return Ok(Token {
                tok: Tok::Eof,
                start,
                end: start,
            });
        };
        let simple = |len: usize, tok: Tok| (len, tok);
        let (len, tok) = match c {
            '*' => simple(1, Tok::Star),
            ',' => simple(1, Tok::Comma),
            '.' => simple(1, Tok::Dot),
            '(' => simple(1, Tok::LParen),
            ')' => simple(1, Tok::RParen),
            ']' => simple(1, Tok::RBracket),
            '+' => simple(1, Tok::Plus),
            '-' => simple(1, Tok::Minus),
            '/' => simple(1, Tok::Slash),
            '%' => simple(1, Tok::Percent),
            '=' => simple(1, Tok::Eq),
            '<' => match self.peek_at(1) {
                Some('=') => simple(2, Tok::Le),
                Some('>') => simple(2, Tok::Ne),
                _ => simple(1, Tok::Lt),
            },
            '>' => match self.peek_at(1) {
                Some('=') => simple(2, Tok::Ge),
                _ => simple(1, Tok::Gt),
            },
            '!' => match self.peek_at(1) {
                Some('=') => simple(2, Tok::Ne),
                _ => {
                    return Err(QueryError::syntax(
                        start,
                        format!("expected `=` after `!` at position {start} (`!=` is not-equal)"),
                    ));
                }
            },
            '[' if self.peek_at(1) == Some('[') => return self.escaped_ident(),
            '[' => simple(1, Tok::LBracket),
            '\'' | '"' => return self.string(c),
            c if c.is_ascii_digit() => return self.number(),
            c if is_ident_start(c) => {
                while self.peek_at(0).is_some_and(is_ident_continue) {
                    self.pos += 1;
                }
                let word: String = self.chars[start..self.pos].iter().collect();
                let tok = match keyword(&word) {
                    Some(kw) => Tok::Keyword(kw),
                    None => Tok::Ident(word),
                };
                return Ok(Token {
                    tok,
                    start,
                    end: self.pos,
                });
            }
            other => {
                return Err(QueryError::syntax(
                    start,
                    format!("unexpected character `{other}` at position {start}"),
                ));
            }
        };
        self.pos += len;
        Ok(Token {
            tok,
            start,
            end: self.pos,
        })
    }

    /// `[[name]]`: everything up to the first `]]`.
    fn escaped_ident(&mut self) -> Result<Token, QueryError> {
        let start = self.pos;
        self.pos += 2;
        let mut name = String::new();
        loop {
            match (self.peek_at(0), self.peek_at(1)) {
                (Some(']'), Some(']')) => break,
                (Some(c), _) => {
                    name.push(c);
                    self.pos += 1;
                }
                (None, _) => {
                    return Err(QueryError::syntax(
                        start,
                        format!(
                            "expected `]]` to close the escaped name opened at position {start}, \
                             found end of input"
                        ),
                    ));
                }
            }
        }
        self.pos += 2;
        if name.is_empty() {
            return Err(QueryError::syntax(
                start,
                format!("empty escaped name `[[]]` at position {start}"),
            ));
        }
        Ok(Token {
            tok: Tok::Escaped(name),
            start,
            end: self.pos,
        })
    }

    fn string(&mut self, quote: char) -> Result<Token, QueryError> {
        let start = self.pos;
        self.pos += 1;
        let mut value = String::new();
        loop {
            let Some(c) = self.peek_at(0) else {
                return Err(QueryError::syntax(
                    start,
                    format!(
                        "expected closing {quote} for the string starting at position {start}, \
                         found end of input"
                    ),
                ));
            };
            self.pos += 1;
            if c == quote {
                break;
            }
            if c != '\\' {
                value.push(c);
                continue;
            }
            let escape_at = self.pos - 1;
            let escaped = match self.peek_at(0) {
                Some('\'') => '\'',
                Some('"') => '"',
                Some('\\') => '\\',
                Some('/') => '/',
                Some('n') => '\n',
                Some('r') => '\r',
                Some('t') => '\t',
                Some('b') => '\u{8}',
                Some('f') => '\u{c}',
                Some('u') => {
                    self.pos += 1;
                    let unit = self.hex4(escape_at)?;
                    value.push(self.unicode_escape(unit, escape_at)?);
                    continue;
                }
                other => {
                    let found = other.map_or("end of input".to_owned(), |c| format!("`\\{c}`"));
                    return Err(QueryError::syntax(
                        escape_at,
                        format!(
                            "expected one of the escapes \\' \\\" \\\\ \\uXXXX at position \
                             {escape_at}, found {found}"
                        ),
                    ));
                }
            };
            self.pos += 1;
            value.push(escaped);
        }
        Ok(Token {
            tok: Tok::Str(value),
            start,
            end: self.pos,
        })
    }

    /// Four hex digits after `\u`.
    fn hex4(&mut self, escape_at: usize) -> Result<u32, QueryError> {
        let mut unit = 0u32;
        for _ in 0..4 {
            let digit = self
                .peek_at(0)
                .and_then(|c| c.to_digit(16))
                .ok_or_else(|| {
                    QueryError::syntax(
                        escape_at,
                        format!("expected four hex digits after `\\u` at position {escape_at}"),
                    )
                })?;
            unit = unit * 16 + digit;
            self.pos += 1;
        }
        Ok(unit)
    }

    /// Decodes a `\uXXXX` unit, combining a UTF-16 surrogate pair `\uD83D\uDE00`.
    fn unicode_escape(&mut self, unit: u32, escape_at: usize) -> Result<char, QueryError> {
        let bad = || {
            QueryError::syntax(
                escape_at,
                format!("invalid unicode escape (unpaired surrogate) at position {escape_at}"),
            )
        };
        if (0xD800..0xDC00).contains(&unit) {
            if self.peek_at(0) != Some('\\') || self.peek_at(1) != Some('u') {
                return Err(bad());
            }
            self.pos += 2;
            let low = self.hex4(escape_at)?;
            if !(0xDC00..0xE000).contains(&low) {
                return Err(bad());
            }
            let code = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
            return char::from_u32(code).ok_or_else(bad);
        }
        char::from_u32(unit).ok_or_else(bad)
    }

    /// Decimal `12`, `1.5`, `2e-3`, `1.5E+10` or hex `0x1F`; no sign (the parser folds `-`).
    fn number(&mut self) -> Result<Token, QueryError> {
        let start = self.pos;
        let out_of_range =
            || QueryError::syntax(start, format!("number out of range at position {start}"));
        if self.peek_at(0) == Some('0') && matches!(self.peek_at(1), Some('x' | 'X')) {
            self.pos += 2;
            let mut value: u128 = 0;
            let digits_start = self.pos;
            while let Some(d) = self.peek_at(0).and_then(|c| c.to_digit(16)) {
                value = value
                    .checked_mul(16)
                    .and_then(|v| v.checked_add(u128::from(d)))
                    .ok_or_else(out_of_range)?;
                self.pos += 1;
            }
            if self.pos == digits_start {
                return Err(QueryError::syntax(
                    start,
                    format!("expected hex digits after `0x` at position {start}"),
                ));
            }
            return Ok(Token {
                tok: Tok::Int(value),
                start,
                end: self.pos,
            });
        }
        let digits = |lexer: &mut Self| {
            let from = lexer.pos;
            while lexer.peek_at(0).is_some_and(|c| c.is_ascii_digit()) {
                lexer.pos += 1;
            }
            lexer.pos - from
        };
        digits(self);
        let mut is_float = false;
        if self.peek_at(0) == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
            digits(self);
            is_float = true;
        }
        if matches!(self.peek_at(0), Some('e' | 'E')) {
            let sign = usize::from(matches!(self.peek_at(1), Some('+' | '-')));
            if self.peek_at(1 + sign).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1 + sign;
                digits(self);
                is_float = true;
            }
        }
        let text: String = self.chars[start..self.pos].iter().collect();
        let tok = if is_float {
            let value: f64 = text.parse().map_err(|_| out_of_range())?;
            if !value.is_finite() {
                return Err(out_of_range());
            }
            Tok::Float(value)
        } else {
            match text.parse::<u128>() {
                Ok(value) => Tok::Int(value),
                Err(_) => {
                    let value: f64 = text.parse().map_err(|_| out_of_range())?;
                    if !value.is_finite() {
                        return Err(out_of_range());
                    }
                    Tok::Float(value)
                }
            }
        };
        Ok(Token {
            tok,
            start,
            end: self.pos,
        })
    }
}
