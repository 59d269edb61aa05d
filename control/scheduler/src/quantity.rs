//! Kubernetes resource quantities (`100m`, `1.5`, `128Mi`, `1e3`) as integers: CPU in
//! millicores, everything else in base units, both rounded up as the API server does.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "invalid quantity {0:?}: expected a number with an optional suffix such as 100m, 2, 512Mi or 1G"
)]
pub struct QuantityError(pub String);

/// The value of `q` times `scale` (1000 for CPU millicores, 1 for bytes), rounded up.
fn parse_scaled(q: &str, scale: f64) -> Result<i64, QuantityError> {
    let err = || QuantityError(q.to_string());
    let s = q.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| err())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        e if e.starts_with(['e', 'E']) => {
            let exp: i32 = e[1..].parse().map_err(|_| err())?;
            10f64.powi(exp)
        }
        _ => return Err(err()),
    };
    let value = number * multiplier * scale;
    if !value.is_finite() || value < 0.0 || value > i64::MAX as f64 {
        return Err(err());
    }
    // Tolerate float noise such as 0.1 * 1000 = 100.00000000000001 before rounding up.
    Ok((value - 1e-6).ceil().max(0.0) as i64)
}

/// CPU in millicores: `500m` → 500, `2` → 2000.
pub fn milli_cpu(q: &str) -> Result<i64, QuantityError> {
    parse_scaled(q, 1000.0)
}

/// A plain count or byte size: `128Mi` → 134217728, `110` → 110.
pub fn value(q: &str) -> Result<i64, QuantityError> {
    parse_scaled(q, 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_memory_forms() {
        assert_eq!(milli_cpu("100m"), Ok(100));
        assert_eq!(milli_cpu("0.1"), Ok(100));
        assert_eq!(milli_cpu("2"), Ok(2000));
        assert_eq!(milli_cpu("1.5"), Ok(1500));
        assert_eq!(milli_cpu("250000u"), Ok(250));
        assert_eq!(value("128Mi"), Ok(128 * 1024 * 1024));
        assert_eq!(value("1G"), Ok(1_000_000_000));
        assert_eq!(value("1e3"), Ok(1000));
        assert_eq!(value("110"), Ok(110));
        assert_eq!(value("1.5Ki"), Ok(1536));
    }

    #[test]
    fn rejects_garbage_with_the_input_in_the_error() {
        assert_eq!(value("12Q"), Err(QuantityError("12Q".into())));
        assert!(value("").is_err());
        assert!(milli_cpu("-1").is_err());
        assert!(value("abc").is_err());
        let msg = value("1Zi").expect_err("bad suffix").to_string();
        assert!(msg.contains("1Zi"), "{msg}");
    }
}
