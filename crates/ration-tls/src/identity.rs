//! Who a certificate names.
//!
//! A node's certificate carries the URI `spiffe://<trust domain>/ration/node/<id>`
//! among its subject alternative names; a client's carries
//! `spiffe://<trust domain>/ration/principal/<name>`, or, failing any Ration URI,
//! its common name is the principal. The trust domain is not checked: the CA a
//! listener trusts decides which certificates count at all.

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// The path of a node's URI: `spiffe://<domain>/ration/node/<id>`.
pub const NODE_PATH: &str = "/ration/node/";
/// The path of a principal's URI: `spiffe://<domain>/ration/principal/<name>`.
pub const PRINCIPAL_PATH: &str = "/ration/principal/";

/// Who an authenticated party is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    /// A cluster member: may speak Raft, only on the peer port.
    Node(u64),
    /// A client (a gateway, an operator, an auditor), only on the client port.
    Principal(String),
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(id) => write!(f, "node {id}"),
            Self::Principal(p) => write!(f, "principal {p:?}"),
        }
    }
}

/// The identity a (leaf) certificate names, or why it names none.
pub fn identity_of(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let sans = parsed
        .subject_alternative_name()
        .map_err(|e| format!("unreadable subject alternative names: {e}"))?;
    let mut found = None;
    for name in sans.iter().flat_map(|s| s.value.general_names.iter()) {
        let GeneralName::URI(uri) = name else { continue };
        let Some(rest) = uri.strip_prefix("spiffe://") else { continue };
        let path = rest.find('/').map_or("", |i| &rest[i..]);
        let this = if let Some(id) = path.strip_prefix(NODE_PATH) {
            match id.parse::<u64>() {
                Ok(id) if id > 0 => Identity::Node(id),
                _ => return Err(format!("{uri}: {id:?} is not a node id (1 or more)")),
            }
        } else if let Some(name) = path.strip_prefix(PRINCIPAL_PATH) {
            if name.is_empty() {
                return Err(format!("{uri}: the principal is empty"));
            }
            Identity::Principal(name.to_owned())
        } else {
            continue;
        };
        if let Some(f) = found.as_ref().filter(|f| **f != this) {
            return Err(format!("names two identities ({f} and {this})"));
        }
        found = Some(this);
    }
    if let Some(found) = found {
        return Ok(found);
    }
    let cn = parsed.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok());
    match cn {
        Some(cn) if !cn.is_empty() => Ok(Identity::Principal(cn.to_owned())),
        _ => Err(format!(
            "names no identity: give it a URI spiffe://<domain>{PRINCIPAL_PATH}<name> \
             (or {NODE_PATH}<id> for a node) as a subject alternative name, or a common name"
        )),
    }
}
