//! Group values of `GROUP BY`: which documents share a group, the total order groups are
//! returned (and paged) in, and a group's position as text for a continuation token.
//! Invariant: `Ord` agrees with `Eq` (numbers equal as values are one group), so a page that
//! ends at a group resumes strictly after it, whatever documents changed in between.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::Value;

use super::eval::{Val, to_f64};

/// A group value; numbers equal as values group together (`1` and `1.0`).
///
/// Order: undefined, `null`, booleans (`false` first), numbers by value, strings by code
/// point, then objects and arrays by their JSON text. IoT Hub documents no order for GROUP BY
/// rows [DOCS query-language "GROUP BY clause"]; a fixed total order is what lets a
/// continuation token name the last group sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum GroupKey<'a> {
    Undefined,
    Null,
    Bool(bool),
    Int(i128),
    /// A number with a fractional part (or beyond `i128`), by its bits.
    Float(u64),
    Str(Cow<'a, str>),
    /// Objects and arrays, by their JSON text.
    Json(String),
}

impl<'a> GroupKey<'a> {
    pub(super) fn of(value: Option<&'a Value>) -> Self {
        match Val::from_json(value) {
            Val::Undefined => GroupKey::Undefined,
            Val::Null => GroupKey::Null,
            Val::Bool(b) => GroupKey::Bool(b),
            Val::Int(i) => GroupKey::Int(i),
            Val::Float(x) => float_key(x),
            Val::Str(s) => GroupKey::Str(Cow::Borrowed(s)),
            Val::Complex(v) => GroupKey::Json(v.to_string()),
        }
    }

    fn into_owned(self) -> GroupKey<'static> {
        match self {
            GroupKey::Undefined => GroupKey::Undefined,
            GroupKey::Null => GroupKey::Null,
            GroupKey::Bool(b) => GroupKey::Bool(b),
            GroupKey::Int(i) => GroupKey::Int(i),
            GroupKey::Float(bits) => GroupKey::Float(bits),
            GroupKey::Str(s) => GroupKey::Str(Cow::Owned(s.into_owned())),
            GroupKey::Json(text) => GroupKey::Json(text),
        }
    }

    fn rank(&self) -> u8 {
        match self {
            GroupKey::Undefined => 0,
            GroupKey::Null => 1,
            GroupKey::Bool(_) => 2,
            GroupKey::Int(_) | GroupKey::Float(_) => 3,
            GroupKey::Str(_) => 4,
            GroupKey::Json(_) => 5,
        }
    }

    /// Numbers as (value, whole numbers first, exact whole value): a lexicographic product of
    /// total orders, so a total order itself, equal exactly when the keys are equal.
    fn number(&self) -> Option<(f64, u8, i128)> {
        match self {
            GroupKey::Int(i) => Some((to_f64(*i), 0, *i)),
            GroupKey::Float(bits) => Some((f64::from_bits(*bits), 1, 0)),
            _ => None,
        }
    }
}

/// Whole floats that fit group with the equal integer.
fn float_key<'a>(x: f64) -> GroupKey<'a> {
    #[allow(clippy::cast_possible_truncation)]
    let whole = x as i128;
    #[allow(clippy::float_cmp, clippy::cast_precision_loss)]
    if x.fract() == 0.0 && whole as f64 == x {
        GroupKey::Int(whole)
    } else {
        GroupKey::Float(x.to_bits())
    }
}

impl Ord for GroupKey<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank()
            .cmp(&other.rank())
            .then_with(|| match (self, other) {
                (GroupKey::Bool(a), GroupKey::Bool(b)) => a.cmp(b),
                (GroupKey::Str(a), GroupKey::Str(b)) => a.cmp(b),
                (GroupKey::Json(a), GroupKey::Json(b)) => a.cmp(b),
                _ => match (self.number(), other.number()) {
                    (Some((x, xk, xi)), Some((y, yk, yi))) => {
                        x.total_cmp(&y).then(xk.cmp(&yk)).then(xi.cmp(&yi))
                    }
                    // Same rank and not a number: undefined or null, one value each.
                    _ => Ordering::Equal,
                },
            })
    }
}

impl PartialOrd for GroupKey<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Where a page of groups ended: the last group sent, owned, as text for a continuation token
/// ([`GroupPosition::encode`]) and back ([`GroupPosition::decode`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPosition(GroupKey<'static>);

impl GroupPosition {
    pub(super) fn from_key(key: GroupKey<'_>) -> Self {
        GroupPosition(key.into_owned())
    }

    pub(super) fn key(&self) -> &GroupKey<'static> {
        &self.0
    }

    /// The position as text: a one-letter kind, then the value. Any characters may follow the
    /// letter (strings are kept as they are), so callers must not split the text.
    pub fn encode(&self) -> String {
        match &self.0 {
            GroupKey::Undefined => "u".to_owned(),
            GroupKey::Null => "n".to_owned(),
            GroupKey::Bool(b) => format!("b{}", u8::from(*b)),
            GroupKey::Int(i) => format!("i{i}"),
            GroupKey::Float(bits) => format!("f{bits:016x}"),
            GroupKey::Str(s) => format!("s{s}"),
            GroupKey::Json(text) => format!("j{text}"),
        }
    }

    /// Reads text made by [`GroupPosition::encode`]; `None` for anything else.
    pub fn decode(text: &str) -> Option<Self> {
        let mut chars = text.chars();
        let kind = chars.next()?;
        let rest = chars.as_str();
        let key = match kind {
            'u' if rest.is_empty() => GroupKey::Undefined,
            'n' if rest.is_empty() => GroupKey::Null,
            'b' => match rest {
                "0" => GroupKey::Bool(false),
                "1" => GroupKey::Bool(true),
                _ => return None,
            },
            'i' => GroupKey::Int(rest.parse().ok()?),
            'f' if rest.len() == 16 => {
                let x = f64::from_bits(u64::from_str_radix(rest, 16).ok()?);
                if !x.is_finite() {
                    return None;
                }
                // Whatever a token says, the key is one `GroupKey::of` could have made.
                float_key(x).into_owned()
            }
            's' => GroupKey::Str(Cow::Owned(rest.to_owned())),
            'j' => GroupKey::Json(rest.to_owned()),
            _ => return None,
        };
        Some(GroupPosition(key))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    #[test]
    fn equal_numbers_are_one_group() {
        let (one, one_float) = (json!(1), json!(1.0));
        assert_eq!(GroupKey::of(Some(&one)), GroupKey::of(Some(&one_float)));
        assert_eq!(
            GroupKey::of(Some(&one)).cmp(&GroupKey::of(Some(&one_float))),
            Ordering::Equal
        );
        assert_ne!(GroupKey::of(Some(&one)), GroupKey::of(None));
    }

    #[test]
    fn kinds_sort_in_the_documented_order() {
        let values = [
            json!(null),
            json!(false),
            json!(true),
            json!(-2.5),
            json!(-1),
            json!(0),
            json!(0.5),
            json!(3),
            json!(u64::MAX),
            json!(""),
            json!("B"),
            json!("a"),
            json!("é"),
            json!([1]),
            json!({"a": 1}),
        ];
        let mut keys: Vec<GroupKey<'_>> = vec![GroupKey::of(None)];
        keys.extend(values.iter().map(|v| GroupKey::of(Some(v))));
        for (i, a) in keys.iter().enumerate() {
            for (j, b) in keys.iter().enumerate() {
                assert_eq!(a.cmp(b), i.cmp(&j), "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn positions_round_trip_and_foreign_text_is_refused() {
        for value in [
            json!(null),
            json!(true),
            json!(-7),
            json!(1e300),
            json!(0.1),
            json!("line\nbreak"),
            json!({"a": [1, 2]}),
        ] {
            let position = GroupPosition::from_key(GroupKey::of(Some(&value)));
            assert_eq!(GroupPosition::decode(&position.encode()), Some(position));
        }
        let undefined = GroupPosition::from_key(GroupKey::of(None));
        assert_eq!(GroupPosition::decode(&undefined.encode()), Some(undefined));
        for text in [
            "",
            "x",
            "ux",
            "b2",
            "i1.5",
            "f12",
            "fzzzzzzzzzzzzzzzz",
            "f7ff0000000000000",
        ] {
            assert_eq!(GroupPosition::decode(text), None, "{text}");
        }
    }

    fn any_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(json!(null)),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e6f64..1e6).prop_map(Value::from),
            (0i64..4).prop_map(|i| Value::from(i as f64)),
            "[a-c]{0,3}".prop_map(Value::from),
            (0i64..3).prop_map(|i| json!([i])),
        ]
    }

    proptest! {
        #[test]
        fn order_is_total_and_agrees_with_equality(
            a in proptest::option::of(any_value()),
            b in proptest::option::of(any_value()),
            c in proptest::option::of(any_value()),
        ) {
            let (ka, kb, kc) = (GroupKey::of(a.as_ref()), GroupKey::of(b.as_ref()), GroupKey::of(c.as_ref()));
            prop_assert_eq!(ka.cmp(&kb) == Ordering::Equal, ka == kb);
            prop_assert_eq!(ka.cmp(&kb), kb.cmp(&ka).reverse());
            if ka <= kb && kb <= kc {
                prop_assert!(ka <= kc);
            }
            let position = GroupPosition::from_key(ka.clone());
            prop_assert_eq!(GroupPosition::decode(&position.encode()).map(|p| p.0), Some(ka.into_owned()));
        }
    }
}
