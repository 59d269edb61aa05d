//! Per-Ingress extensions read from annotations. Each annotation is accepted under weir's own
//! prefix `ingress.weir.io/` and under ingress-nginx's `nginx.ingress.kubernetes.io/`, so
//! manifests written for ingress-nginx apply unchanged; weir's prefix wins if both are set.
//!
//! The annotations, their values and effects are listed for operators in `docs/ingress.md`.
//!
//! A value that does not parse is reported (naming the Ingress and annotation) and ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{HeaderName, HeaderValue};

use crate::balance::Balance;

pub const WEIR_PREFIX: &str = "ingress.weir.io/";
pub const NGINX_PREFIX: &str = "nginx.ingress.kubernetes.io/";

/// The parsed extensions of one Ingress.
#[derive(Debug, Clone, Default)]
pub struct Annotations {
    pub ssl_redirect: Option<bool>,
    pub force_ssl_redirect: bool,
    pub read_timeout: Option<Duration>,
    pub balance: Balance,
    pub canary: bool,
    pub canary_weight: u32,
    pub canary_weight_total: u32,
    pub canary_header: Option<HeaderName>,
    pub canary_header_value: Option<HeaderValue>,
}

impl Annotations {
    /// Parse `annotations`; every rejected value is described in `problems`.
    pub fn parse(
        annotations: Option<&BTreeMap<String, String>>,
        problems: &mut Vec<String>,
    ) -> Self {
        let mut out = Annotations {
            canary_weight_total: 100,
            ..Default::default()
        };
        let Some(map) = annotations else { return out };
        let get = |key: &str| {
            map.get(&format!("{WEIR_PREFIX}{key}"))
                .or_else(|| map.get(&format!("{NGINX_PREFIX}{key}")))
                .map(|v| v.trim())
        };
        let mut bad = |key: &str, value: &str, why: &str| {
            problems.push(format!("annotation {key}={value:?} ignored: {why}"));
        };
        if let Some(v) = get("ssl-redirect") {
            match parse_bool(v) {
                Some(b) => out.ssl_redirect = Some(b),
                None => bad("ssl-redirect", v, "expected true or false"),
            }
        }
        if let Some(v) = get("force-ssl-redirect") {
            match parse_bool(v) {
                Some(b) => out.force_ssl_redirect = b,
                None => bad("force-ssl-redirect", v, "expected true or false"),
            }
        }
        if let Some(v) = get("proxy-read-timeout") {
            match parse_duration(v) {
                Some(d) => out.read_timeout = Some(d),
                None => bad(
                    "proxy-read-timeout",
                    v,
                    "expected seconds, or a number with ms, s or m",
                ),
            }
        }
        if let Some(v) = get("load-balance") {
            match v {
                "round_robin" => out.balance = Balance::RoundRobin,
                "least_request" | "ewma" => out.balance = Balance::LeastRequest,
                _ => bad("load-balance", v, "expected round_robin or least_request"),
            }
        }
        if let Some(v) = get("canary") {
            match parse_bool(v) {
                Some(b) => out.canary = b,
                None => bad("canary", v, "expected true or false"),
            }
        }
        if let Some(v) = get("canary-weight-total") {
            match v.parse::<u32>() {
                Ok(t) if t > 0 => out.canary_weight_total = t,
                _ => bad("canary-weight-total", v, "expected a positive integer"),
            }
        }
        if let Some(v) = get("canary-weight") {
            match v.parse::<u32>() {
                Ok(w) if w <= out.canary_weight_total => out.canary_weight = w,
                _ => bad(
                    "canary-weight",
                    v,
                    "expected an integer from 0 to canary-weight-total",
                ),
            }
        }
        if let Some(v) = get("canary-by-header") {
            match HeaderName::try_from(v) {
                Ok(h) => out.canary_header = Some(h),
                Err(_) => bad("canary-by-header", v, "not a valid header name"),
            }
        }
        if let Some(v) = get("canary-by-header-value") {
            match HeaderValue::try_from(v) {
                Ok(h) => out.canary_header_value = Some(h),
                Err(_) => bad("canary-by-header-value", v, "not a valid header value"),
            }
        }
        out
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

pub(crate) fn parse_duration(v: &str) -> Option<Duration> {
    let (num, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> (Annotations, Vec<String>) {
        let map = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut problems = Vec::new();
        (Annotations::parse(Some(&map), &mut problems), problems)
    }

    #[test]
    fn both_prefixes_are_read_and_weir_wins() {
        let (a, p) = parse(&[
            ("nginx.ingress.kubernetes.io/proxy-read-timeout", "5"),
            ("ingress.weir.io/load-balance", "round_robin"),
            ("nginx.ingress.kubernetes.io/load-balance", "ewma"),
        ]);
        assert!(p.is_empty());
        assert_eq!(a.read_timeout, Some(Duration::from_secs(5)));
        assert_eq!(a.balance, Balance::RoundRobin);
    }

    #[test]
    fn timeouts_take_units() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), None);
        assert_eq!(parse_duration("fast"), None);
    }

    #[test]
    fn canary_settings() {
        let (a, p) = parse(&[
            ("ingress.weir.io/canary", "true"),
            ("ingress.weir.io/canary-weight", "30"),
            ("ingress.weir.io/canary-by-header", "X-Canary"),
            ("ingress.weir.io/canary-by-header-value", "yes"),
        ]);
        assert!(p.is_empty(), "{p:?}");
        assert!(a.canary);
        assert_eq!((a.canary_weight, a.canary_weight_total), (30, 100));
        assert_eq!(
            a.canary_header.as_ref().map(|h| h.as_str()),
            Some("x-canary")
        );
    }

    #[test]
    fn bad_values_are_reported_by_name_and_ignored() {
        let (a, p) = parse(&[
            ("ingress.weir.io/ssl-redirect", "maybe"),
            ("ingress.weir.io/canary-weight", "150"),
            ("ingress.weir.io/canary-by-header", "bad header"),
            ("ingress.weir.io/load-balance", "random"),
        ]);
        assert_eq!(a.ssl_redirect, None);
        assert_eq!(a.canary_weight, 0);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(
            p.iter()
                .any(|m| m.contains("canary-weight") && m.contains("150"))
        );
    }
}
