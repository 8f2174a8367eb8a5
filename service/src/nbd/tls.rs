//! TLS for NBD over TCP (rustls, ring provider): the server presents `tls_cert`/`tls_key` and
//! requires a client certificate that chains to `tls_ca`; the client verifies the server's
//! certificate against its CA and the host name it connected to. TLS-PSK (which some NBD
//! servers offer) is not supported: rustls does not implement it.
//!
//! File layout of a client's certificate directory (the one NBD tools conventionally use,
//! `tls-certificates=DIR` in a URI): `ca-cert.pem`, `client-cert.pem`, `client-key.pem`.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::{NbdConfig, Socket};

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // ring, not aws-lc-rs: it builds with the C compiler alone (no cmake, no Go); the
    // deprecation is about post-quantum key exchange, which NBD clients do not offer yet.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's TLS configuration from `[nbd]`'s `tls_cert`, `tls_key`, `tls_ca`.
pub fn server_config(cfg: &NbdConfig) -> Result<Arc<rustls::ServerConfig>, String> {
    let (Some(cert), Some(key_path), Some(ca)) = (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_ca) else {
        return Err("nbd: TLS needs tls_cert, tls_key and tls_ca".into());
    };
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
            .build()
            .map_err(|e| format!("nbd tls_ca: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| format!("nbd tls_cert/tls_key: {e}"))?;
    Ok(Arc::new(config))
}

/// The client's TLS configuration: trust `ca`, authenticate with `cert`/`key`.
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key_path: &Path,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(certs(cert)?, key(key_path)?)
        .map_err(|e| format!("client certificate: {e}"))?;
    Ok(Arc::new(config))
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Runs the server side of the TLS handshake on `s` (right after the STARTTLS ACK).
pub fn accept(s: Box<dyn Socket>, cfg: &Arc<rustls::ServerConfig>) -> io::Result<Box<dyn Socket>> {
    let mut conn = rustls::ServerConnection::new(cfg.clone()).map_err(invalid)?;
    // A read reply (at most max_request_bytes) is encrypted in one go rather than in 64 KiB
    // steps, each with its own round of socket writes; the reply bounds what is buffered.
    conn.set_buffer_limit(None);
    let mut tls = rustls::StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(Box::new(tls))
}

/// Runs the client side of the TLS handshake on `s` for the server `host`.
pub fn connect(
    s: Box<dyn Socket>,
    cfg: &Arc<rustls::ClientConfig>,
    host: &str,
) -> io::Result<Box<dyn Socket>> {
    let name = ServerName::try_from(host.to_string()).map_err(invalid)?;
    let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(invalid)?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(Box::new(tls))
}
