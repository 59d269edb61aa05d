//! TLS termination: certificates from `kubernetes.io/tls` Secrets, chosen per handshake by
//! SNI from the current routing table, so a changed Secret is served by the next handshake
//! without a restart. Unknown or missing SNI gets the default certificate — the
//! `--default-ssl-certificate` Secret, or a self-signed one generated at start, as
//! ingress-nginx does — never a panic.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Secret;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::table::Table;

/// Why a Secret could not be used as a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("secret type is {0:?}, want kubernetes.io/tls")]
    WrongType(String),
    #[error("data.{0} is missing")]
    Missing(&'static str),
    #[error("data.tls.crt holds no PEM certificate")]
    NoCertificate,
    #[error("data.tls.key holds no PEM private key")]
    NoKey,
    #[error("data.{field} is not valid PEM: {source}")]
    Pem {
        field: &'static str,
        source: std::io::Error,
    },
    #[error("unsupported private key: {0}")]
    Key(rustls::Error),
    #[error("generating the default certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("building the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The certificate and key of a `kubernetes.io/tls` Secret.
pub fn certified_key(secret: &Secret) -> Result<Arc<CertifiedKey>, TlsError> {
    let ty = secret.type_.as_deref().unwrap_or("Opaque");
    if ty != "kubernetes.io/tls" {
        return Err(TlsError::WrongType(ty.to_string()));
    }
    let field = |name: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(name))
            .map(|b| b.0.as_slice())
            .ok_or(TlsError::Missing(name))
    };
    let certs = rustls_pemfile::certs(&mut field("tls.crt")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            field: "tls.crt",
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key = rustls_pemfile::private_key(&mut field("tls.key")?)
        .map_err(|source| TlsError::Pem {
            field: "tls.key",
            source,
        })?
        .ok_or(TlsError::NoKey)?;
    let key = any_supported_type(&key).map_err(TlsError::Key)?;
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

/// A self-signed certificate for requests whose SNI matches no Ingress TLS host.
pub fn self_signed(name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let generated = rcgen::generate_simple_self_signed(vec![name.to_string()])?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        generated.signing_key.serialize_der(),
    ));
    let key = any_supported_type(&key).map_err(TlsError::Key)?;
    let cert: CertificateDer<'static> = generated.cert.der().clone();
    Ok(Arc::new(CertifiedKey::new(vec![cert], key)))
}

/// Chooses the certificate for each handshake from the live routing table.
pub struct SniResolver {
    table: Arc<ArcSwap<Table>>,
    fallback: Arc<CertifiedKey>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver").finish_non_exhaustive()
    }
}

impl SniResolver {
    pub fn new(table: Arc<ArcSwap<Table>>, fallback: Arc<CertifiedKey>) -> Self {
        SniResolver { table, fallback }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.table.load();
        let by_sni = hello.server_name().and_then(|sni| table.cert(sni));
        Some(
            by_sni
                .or_else(|| table.default_cert())
                .unwrap_or(&self.fallback)
                .clone(),
        )
    }
}

/// The rustls server configuration: SNI certificates, ALPN h2 then http/1.1.
pub fn server_config(resolver: SniResolver) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(rustls::DEFAULT_VERSIONS)
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::tls_secret;
    use k8s_openapi::ByteString;

    #[test]
    fn parses_a_tls_secret() {
        let key = certified_key(&tls_secret("ns", "s", &["a.example.com"]).expect("rcgen"))
            .expect("valid secret");
        assert_eq!(key.cert.len(), 1);
    }

    #[test]
    fn bad_secrets_name_the_problem() {
        let mut s = tls_secret("ns", "s", &["a.example.com"]).expect("rcgen");
        s.type_ = Some("Opaque".into());
        assert!(matches!(certified_key(&s), Err(TlsError::WrongType(t)) if t == "Opaque"));

        let mut s = tls_secret("ns", "s", &["a.example.com"]).expect("rcgen");
        s.data.as_mut().map(|d| d.remove("tls.key"));
        assert!(matches!(
            certified_key(&s),
            Err(TlsError::Missing("tls.key"))
        ));

        let mut s = tls_secret("ns", "s", &["a.example.com"]).expect("rcgen");
        s.data
            .as_mut()
            .map(|d| d.insert("tls.crt".into(), ByteString(b"not pem".to_vec())));
        assert!(matches!(certified_key(&s), Err(TlsError::NoCertificate)));
    }
}
