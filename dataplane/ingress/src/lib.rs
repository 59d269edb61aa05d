//! weir's ingress proxy: serves networking.k8s.io/v1 Ingress routes to the ready endpoints
//! of Services, over HTTP/1.1, h2c and TLS (ALPN h2/http1.1, SNI certificates from Secrets).
//!
//! Data flow: API server → `watch` (kube-rs reflectors) → [`table::Snapshot`] →
//! [`table::Builder::build`] (pure) → `ArcSwap<Table>` → [`proxy::Proxy`] per request.

pub mod annotations;
pub mod balance;
pub mod error;
pub mod fixtures;
pub mod table;
pub mod tls;
