//! A development CA and the certificates a cluster needs, made with rcgen: for
//! tests, trials and `rationctl certs dev`. Not a production PKI: the CA's key is
//! written next to the certificates it signs.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    Ia5String, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{TlsFiles, NODE_PATH, PRINCIPAL_PATH};

/// The trust domain in the URIs of development certificates.
pub const TRUST_DOMAIN: &str = "ration.local";

/// How long development certificates are valid.
pub const VALID_DAYS: i64 = 365;

/// A certificate authority: its certificate and the key that signs with it.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// A certificate and its key, PEM-encoded.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a leaf certificate names and when it is valid.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub common_name: String,
    /// A Ration URI (`spiffe://.../ration/node/<id>` or `.../principal/<name>`).
    pub uri: Option<String>,
    /// DNS names and IP addresses it serves (servers only).
    pub hosts: Vec<String>,
    /// May act as a TLS server (nodes) as well as a client.
    pub server: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Leaf {
    fn valid_now(common_name: String) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            common_name,
            uri: None,
            hosts: Vec::new(),
            server: false,
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(VALID_DAYS),
        }
    }

    /// A node's certificate: its URI, and the hosts peers and clients dial it by.
    pub fn node(id: u64, hosts: &[String]) -> Self {
        Self {
            uri: Some(node_uri(id)),
            hosts: hosts.to_vec(),
            server: true,
            ..Self::valid_now(format!("ration node {id}"))
        }
    }

    /// A client's certificate for `principal`.
    pub fn principal(principal: &str) -> Self {
        Self { uri: Some(principal_uri(principal)), ..Self::valid_now(principal.to_owned()) }
    }
}

pub fn node_uri(id: u64) -> String {
    format!("spiffe://{TRUST_DOMAIN}{NODE_PATH}{id}")
}

pub fn principal_uri(principal: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}{PRINCIPAL_PATH}{principal}")
}

fn ia5(s: &str) -> Result<Ia5String, rcgen::Error> {
    Ia5String::try_from(s.to_owned())
}

impl Ca {
    /// A new CA named `name`, valid for [`VALID_DAYS`].
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(VALID_DAYS);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Signs a new key's certificate for `leaf`.
    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, leaf.common_name.as_str());
        params.distinguished_name = dn;
        if let Some(uri) = &leaf.uri {
            params.subject_alt_names.push(SanType::URI(ia5(uri)?));
        }
        for host in &leaf.hosts {
            params.subject_alt_names.push(match host.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(ia5(host)?),
            });
        }
        params.key_usages =
            vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = if leaf.server {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        params.not_before = leaf.not_before;
        params.not_after = leaf.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes `ca.pem` and `ca-key.pem` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let ca = dir.join("ca.pem");
        write_file(&ca, self.cert.pem().as_bytes(), false)?;
        write_file(&dir.join("ca-key.pem"), self.key.serialize_pem().as_bytes(), true)?;
        Ok(ca)
    }
}

impl Issued {
    /// Writes `<name>.pem` and `<name>-key.pem` into `dir` (the key readable by its
    /// owner only) and returns the three files a party needs, with `ca`.
    pub fn write(&self, dir: &Path, name: &str, ca: &Path) -> std::io::Result<TlsFiles> {
        std::fs::create_dir_all(dir)?;
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}-key.pem"));
        write_file(&cert, self.cert_pem.as_bytes(), false)?;
        write_file(&key, self.key_pem.as_bytes(), true)?;
        Ok(TlsFiles { ca: ca.to_path_buf(), cert, key })
    }
}

/// Writes `bytes` to `path` (replaced whole: written beside it, then renamed).
fn write_file(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = options.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// What [`write_set`] made.
#[derive(Debug)]
pub struct DevSet {
    /// The CA, to sign more (tests: an expired certificate from the right CA).
    pub authority: Ca,
    pub ca: PathBuf,
    pub nodes: Vec<(u64, TlsFiles)>,
    pub principals: Vec<(String, TlsFiles)>,
}

/// A development CA in `dir` and, signed by it, a certificate per node (`node-<id>`,
/// serving `hosts`) and per principal (`<principal>`).
pub fn write_set(
    dir: &Path,
    nodes: &[u64],
    hosts: &[String],
    principals: &[String],
) -> Result<DevSet, Box<dyn std::error::Error + Send + Sync>> {
    let ca = Ca::new("Ration development CA")?;
    let ca_path = ca.write(dir)?;
    let mut made = Vec::new();
    for id in nodes {
        let files =
            ca.issue(&Leaf::node(*id, hosts))?.write(dir, &format!("node-{id}"), &ca_path)?;
        made.push((*id, files));
    }
    let mut people = Vec::new();
    for p in principals {
        let files = ca.issue(&Leaf::principal(p))?.write(dir, p, &ca_path)?;
        people.push((p.clone(), files));
    }
    Ok(DevSet { authority: ca, ca: ca_path, nodes: made, principals: people })
}
