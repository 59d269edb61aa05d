//! `unreachable` routes for the service CIDR and the unused pod CIDR: a packet to a cluster
//! address that escaped rewriting fails on the host instead of leaving through the default route.

use std::process::Command;

use crate::Error;

/// Installs (or keeps) an `unreachable` route for each CIDR in the caller's network namespace.
/// Idempotent (`ip route replace`).
pub fn install_unreachable_routes(cidrs: &[&str]) -> Result<(), Error> {
    for cidr in cidrs {
        validate_cidr(cidr)?;
        let out = Command::new("ip")
            .args(["-4", "route", "replace", "unreachable", cidr])
            .output()
            .map_err(|e| Error::io("run ip route".into(), e))?;
        if !out.status.success() {
            return Err(Error::Config {
                field: "cidr",
                reason: format!(
                    "ip route replace unreachable {cidr}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
    }
    Ok(())
}

fn validate_cidr(cidr: &str) -> Result<(), Error> {
    let bad = |reason: &str| Error::Config {
        field: "cidr",
        reason: format!("{cidr:?}: {reason}"),
    };
    let (ip, len) = cidr
        .split_once('/')
        .ok_or_else(|| bad("want a.b.c.d/len"))?;
    ip.parse::<std::net::Ipv4Addr>()
        .map_err(|_| bad("not an IPv4 address"))?;
    match len.parse::<u8>() {
        Ok(0) => Err(bad("a /0 would replace the default route")),
        Ok(1..=32) => Ok(()),
        _ => Err(bad("prefix length must be 1..=32")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_cidrs_before_touching_routes() {
        assert!(validate_cidr("10.96.0.0/12").is_ok());
        for bad in ["10.96.0.0", "10.96.0.0/33", "0.0.0.0/0", "fd00::/8", "x/8"] {
            let e = validate_cidr(bad).err().map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains("cidr")),
                "{bad}: {e:?}"
            );
        }
    }
}
