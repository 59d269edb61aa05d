//! The cluster's credentials on disk: a CA, the serving certificate it signs, and the static
//! token file (`token,user,uid,"groups"` lines, the kube-apiserver `--token-auth-file`
//! format). Created in `<data-dir>/pki` on first start and reused afterwards, so kubeconfigs
//! written once keep working across restarts.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("generating {what}: {source}")]
    Rcgen {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("{path}: no PEM {what} found")]
    Pem { path: PathBuf, what: &'static str },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

/// The CA and tokens of one cluster, as loaded from (or created in) the data dir.
pub struct Pki {
    dir: PathBuf,
    pub ca_pem: String,
    ca_key: KeyPair,
    server_cert_pem: String,
    server_key_pem: String,
    /// The token written into the admin kubeconfig.
    pub admin_token: String,
    tokens: HashMap<String, User>,
}

const CA_CN: &str = "weir-ca";
const ADMIN_USER: &str = "weir-admin";

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Write a file readable only by its owner (keys and tokens).
fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    {
        use io::Write;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Rcgen { what, source }
}

/// The CA's parameters. They are the same on every start, so an issuer rebuilt from them
/// and the stored key signs certificates that chain to the stored CA certificate.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_CN);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2124, 1, 1);
    params
}

fn random_token() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| {
            let i = rng.random_range(0..36u8);
            char::from(if i < 10 { b'0' + i } else { b'a' + i - 10 })
        })
        .collect()
}

fn parse_token_file(text: &str) -> HashMap<String, User> {
    let mut out = HashMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.splitn(4, ',');
        let (Some(token), Some(user)) = (fields.next(), fields.next()) else {
            continue;
        };
        let _uid = fields.next();
        let groups = fields
            .next()
            .map(|g| {
                g.trim_matches('"')
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        out.insert(
            token.to_string(),
            User {
                name: user.to_string(),
                groups,
            },
        );
    }
    out
}

impl Pki {
    /// Load the CA, serving certificate and tokens from `dir`, creating what is missing.
    /// The serving certificate is re-issued when `hosts` (its subject alternative names)
    /// changed since it was written.
    pub fn load_or_create(dir: &Path, hosts: &[String]) -> Result<Self, PkiError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let ca_key_path = dir.join("ca.key");
        let ca_crt_path = dir.join("ca.crt");
        let (ca_key, ca_pem) = match (read(&ca_key_path)?, read(&ca_crt_path)?) {
            (Some(key), Some(crt)) => (
                KeyPair::from_pem(&key).map_err(rcgen_err("loading the CA key"))?,
                crt,
            ),
            _ => {
                let key = KeyPair::generate().map_err(rcgen_err("the CA key"))?;
                let cert = ca_params()
                    .self_signed(&key)
                    .map_err(rcgen_err("the CA certificate"))?;
                write_private(&ca_key_path, &key.serialize_pem())?;
                fs::write(&ca_crt_path, cert.pem()).map_err(io_err(&ca_crt_path))?;
                (key, cert.pem())
            }
        };

        let mut pki = Pki {
            dir: dir.to_path_buf(),
            ca_pem,
            ca_key,
            server_cert_pem: String::new(),
            server_key_pem: String::new(),
            admin_token: String::new(),
            tokens: HashMap::new(),
        };

        let hosts_path = dir.join("server.hosts");
        let wanted_hosts = hosts.join("\n");
        let srv_crt = dir.join("server.crt");
        let srv_key = dir.join("server.key");
        match (read(&srv_crt)?, read(&srv_key)?, read(&hosts_path)?) {
            (Some(crt), Some(key), Some(h)) if h == wanted_hosts => {
                pki.server_cert_pem = crt;
                pki.server_key_pem = key;
            }
            _ => {
                let (crt, key) = pki.issue(CertKind::Server(hosts))?;
                write_private(&srv_key, &key)?;
                fs::write(&srv_crt, &crt).map_err(io_err(&srv_crt))?;
                fs::write(&hosts_path, &wanted_hosts).map_err(io_err(&hosts_path))?;
                pki.server_cert_pem = crt;
                pki.server_key_pem = key;
            }
        }

        let tokens_path = dir.join("tokens.csv");
        let mut tokens_text = read(&tokens_path)?.unwrap_or_default();
        let mut tokens = parse_token_file(&tokens_text);
        let admin = tokens
            .iter()
            .find(|(_, u)| u.name == ADMIN_USER)
            .map(|(t, _)| t.clone());
        pki.admin_token = match admin {
            Some(t) => t,
            None => {
                let token = random_token();
                tokens_text.push_str(&format!("{token},{ADMIN_USER},1,\"system:masters\"\n"));
                write_private(&tokens_path, &tokens_text)?;
                tokens = parse_token_file(&tokens_text);
                token
            }
        };
        pki.tokens = tokens;
        Ok(pki)
    }

    /// The directory the credentials live in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn issue(&self, kind: CertKind<'_>) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        match kind {
            CertKind::Server(hosts) => {
                dn.push(DnType::CommonName, "weir-apiserver");
                params.subject_alt_names = hosts
                    .iter()
                    .map(|h| match h.parse::<IpAddr>() {
                        Ok(ip) => Ok(SanType::IpAddress(ip)),
                        Err(_) => h
                            .clone()
                            .try_into()
                            .map(SanType::DnsName)
                            .map_err(rcgen_err("a server name")),
                    })
                    .collect::<Result<_, _>>()?;
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            }
            CertKind::Client(user, groups) => {
                // Kubernetes reads the user from CN and the groups from O.
                dn.push(DnType::CommonName, user);
                for g in groups {
                    dn.push(DnType::OrganizationName, *g);
                }
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        params.distinguished_name = dn;
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2124, 1, 1);
        let key = KeyPair::generate().map_err(rcgen_err("a certificate key"))?;
        let issuer = Issuer::new(ca_params(), &self.ca_key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(rcgen_err("a certificate"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A client certificate for `user` in `groups`, signed by the cluster CA: PEM
    /// certificate and PEM key.
    pub fn issue_client_cert(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<(String, String), PkiError> {
        self.issue(CertKind::Client(user, groups))
    }

    /// The user a bearer token belongs to.
    pub fn user_for_token(&self, token: &str) -> Option<&User> {
        self.tokens.get(token)
    }

    /// rustls configuration: the serving certificate, HTTP/2 and HTTP/1.1, and client
    /// certificates verified against the CA but optional (tokens authenticate too).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_path = self.dir.join("ca.crt");
        let mut roots = rustls::RootCertStore::empty();
        for der in pem_certs(&self.ca_pem, &ca_path)? {
            roots.add(der)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()?;
        let srv_path = self.dir.join("server.crt");
        let chain = pem_certs(&self.server_cert_pem, &srv_path)?;
        let key_path = self.dir.join("server.key");
        let key = rustls_pemfile::private_key(&mut self.server_key_pem.as_bytes())
            .map_err(io_err(&key_path))?
            .ok_or(PkiError::Pem {
                path: key_path,
                what: "private key",
            })?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

enum CertKind<'a> {
    Server(&'a [String]),
    Client(&'a str, &'a [&'a str]),
}

fn pem_certs(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_err(path))?;
    if certs.is_empty() {
        return Err(PkiError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The user named by a verified client certificate: CN is the user, O entries the groups.
pub fn user_from_cert(der: &[u8]) -> Option<User> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let name = subject
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_string))
        .collect();
    Some(User { name, groups })
}

/// Parse a PEM private key (used by clients of [`Pki::issue_client_cert`]).
pub fn private_key_from_pem(pem: &str) -> Option<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut pem.as_bytes()).ok()?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_created_once_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let a = Pki::load_or_create(dir.path(), &hosts).expect("create");
        let b = Pki::load_or_create(dir.path(), &hosts).expect("reload");
        assert_eq!(a.ca_pem, b.ca_pem);
        assert_eq!(a.admin_token, b.admin_token);
        assert_eq!(a.server_cert_pem, b.server_cert_pem);
        assert_eq!(
            b.user_for_token(&a.admin_token).map(|u| u.name.as_str()),
            Some(ADMIN_USER)
        );
        assert!(b.user_for_token("nope").is_none());
        b.server_config().expect("rustls config");

        let more = vec!["localhost".to_string(), "10.0.0.1".to_string()];
        let c = Pki::load_or_create(dir.path(), &more).expect("new hosts");
        assert_eq!(c.ca_pem, a.ca_pem);
        assert_ne!(c.server_cert_pem, a.server_cert_pem);
    }

    #[test]
    fn client_certificates_name_user_and_groups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::load_or_create(dir.path(), &["localhost".to_string()]).expect("pki");
        let (crt, key) = pki
            .issue_client_cert("system:node:n1", &["system:nodes"])
            .expect("issue");
        assert!(private_key_from_pem(&key).is_some());
        let der = pem_certs(&crt, Path::new("x")).expect("pem");
        let user = user_from_cert(&der[0]).expect("user");
        assert_eq!(user.name, "system:node:n1");
        assert_eq!(user.groups, vec!["system:nodes".to_string()]);
    }

    #[test]
    fn token_file_lines_follow_the_kube_format() {
        let t = parse_token_file("# c\nabc,alice,1,\"g1,g2\"\nxyz,bob,2\n\nbad\n");
        assert_eq!(t["abc"].groups, vec!["g1", "g2"]);
        assert_eq!(t["xyz"].name, "bob");
        assert_eq!(t.len(), 2);
    }
}
