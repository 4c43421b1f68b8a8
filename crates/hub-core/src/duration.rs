//! Durations as people type them on our command lines: `500ms`, `20s`, `2m`, `1h`, `1d`, or
//! plain seconds.

use std::time::Duration;

/// The longest duration accepted (ten years): anything longer is a typo.
const MAX_SECONDS: f64 = 10.0 * 365.0 * 86_400.0;

/// Parses `500ms`, `20s`, `2m`, `1h`, `1d` or plain seconds (fractions allowed: `1.5s`).
/// The error says what was wrong and which units exist.
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration; use e.g. 20s, 500ms, 2m, 1h"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        "d" => 86_400.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`; use ms, s, m, h or d"
            ));
        }
    };
    let seconds = value * scale;
    if !seconds.is_finite() || seconds > MAX_SECONDS {
        return Err(format!("`{text}` is too long"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_errors() {
        assert_eq!(parse("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse(" 2m "), Ok(Duration::from_secs(120)));
        assert_eq!(parse("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("1d"), Ok(Duration::from_secs(86_400)));
        for bad in ["", "s", "5 parsecs", "-1s", "1e400s", "99999y", "1..2s"] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(
            parse("5 parsecs")
                .is_err_and(|e| e.contains("parsecs") && e.contains("ms, s, m, h or d"))
        );
    }
}
