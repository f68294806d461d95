//! TLS with rustls. Towards clients: certificates per SNI name from config, the acceptor
//! for implicit-TLS listeners (995, 993) and STLS/STARTTLS. Towards backends: a connector
//! that trusts the CA file a backend names. [`MaybeTls`] is either side's stream, which can
//! switch from plaintext to TLS in place.
//!
//! Only rustls with the `ring` provider: no OpenSSL, no C toolchain beyond what ring needs.

mod stream;

use std::{
    collections::HashMap,
    fmt,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
};

use rustls::{
    ServerConfig,
    crypto::ring::sign::any_supported_type,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
pub use stream::{ClientStream, MaybeTls};
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::CertificateConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("`{path}`: {message}")]
    Load {
        index: usize,
        path: String,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the acceptor shared by every TLS listener and STLS/STARTTLS; `None` without
/// certificates. The first certificate is the default for clients that send no (or an
/// unknown) SNI name.
pub fn acceptor(certificates: &[CertificateConfig]) -> Result<Option<TlsAcceptor>, TlsError> {
    Ok(reloadable_acceptor(certificates)?.map(|(acceptor, _)| acceptor))
}

/// [`acceptor`], with the handle that replaces its certificates in place (a config
/// reload): handshakes from then on get the new ones, sessions already in TLS keep theirs.
pub fn reloadable_acceptor(
    certificates: &[CertificateConfig],
) -> Result<Option<(TlsAcceptor, Certificates)>, TlsError> {
    if certificates.is_empty() {
        return Ok(None);
    }
    let table = Certificates(Arc::new(RwLock::new(Arc::new(SniTable::load(
        certificates,
    )?))));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver(table.clone())));
    Ok(Some((TlsAcceptor::from(Arc::new(config)), table)))
}

/// The certificates an acceptor serves, replaceable while it runs.
#[derive(Clone)]
pub struct Certificates(Arc<RwLock<Arc<SniTable>>>);

impl Certificates {
    /// Loads `certificates` (every file read and checked first) and serves them from the
    /// next handshake on; on an error the current ones stay.
    pub fn replace(&self, certificates: &[CertificateConfig]) -> Result<(), TlsError> {
        let table = Arc::new(SniTable::load(certificates)?);
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = table;
        Ok(())
    }

    fn current(&self) -> Arc<SniTable> {
        Arc::clone(&self.0.read().unwrap_or_else(PoisonError::into_inner))
    }
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("names", &self.current().by_name.keys())
            .finish()
    }
}

/// A connector for backends whose certificates chain to the CA certificates in `ca_file`.
pub fn connector(ca_file: &Path) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file).map_err(|e| e.to_string())?;
    for cert in certs {
        roots
            .add(cert.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no CERTIFICATE block in the file".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

fn load(index: usize, cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let err = |path: &Path, message: String| TlsError::Load {
        index,
        path: path.display().to_string(),
        message,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(err(cert, "no CERTIFICATE block in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| err(key, format!("{e} (expected a PEM private key)")))?;
    let signing = any_supported_type(&key_der).map_err(|e| err(key, e.to_string()))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Certificates by SNI name, and the default.
#[derive(Default)]
struct SniTable {
    by_name: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniTable {
    fn load(certificates: &[CertificateConfig]) -> Result<Self, TlsError> {
        let mut table = Self::default();
        for (index, cert) in certificates.iter().enumerate() {
            let key = Arc::new(load(index, &cert.cert, &cert.key)?);
            table.default.get_or_insert_with(|| Arc::clone(&key));
            for name in &cert.names {
                table
                    .by_name
                    .insert(name.to_ascii_lowercase(), Arc::clone(&key));
            }
        }
        Ok(table)
    }
}

/// Picks the certificate by SNI name: exact match, then `*.parent` wildcard, then default.
#[derive(Debug)]
struct SniResolver(Certificates);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let table = self.0.current();
        let Some(name) = hello.server_name().map(str::to_ascii_lowercase) else {
            return table.default.clone();
        };
        let wildcard = name
            .split_once('.')
            .map(|(_, parent)| format!("*.{parent}"));
        table
            .by_name
            .get(&name)
            .or_else(|| wildcard.and_then(|w| table.by_name.get(&w)))
            .or(table.default.as_ref())
            .cloned()
    }
}
