//! TLS to the PostgreSQL server: the URL's `sslmode` and `sslrootcert`, read as libpq reads
//! them, made into the client's TLS mode and a rustls connector.
//!
//! - `disable`: plain TCP.
//! - `prefer` (the default, as in libpq): TLS when the server offers it, plain TCP when it
//!   does not; the certificate is not checked.
//! - `require`: TLS or no connection; the certificate is not checked, unless `sslrootcert` is
//!   given, which makes it `verify-ca` (libpq does the same, for compatibility).
//! - `verify-ca`: the certificate must chain to a root in `sslrootcert`.
//! - `verify-full`: that, and it must name the host the URL connects to.
//!
//! `sslrootcert` is a PEM file of root certificates, or `system` for the operating system's
//! (which, as in libpq, makes the default `verify-full` and refuses a weaker mode). Without
//! it, the verifying modes read libpq's default file, `~/.postgresql/root.crt`.

use std::path::PathBuf;
use std::sync::Arc;

use postgres::config::SslMode;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
pub(super) use tokio_postgres_rustls::MakeRustlsConnect as Connector;

use crate::error::{Error, Result};

/// How much of the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Check {
    Nothing,
    Chain,
    ChainAndHost,
}

/// The client's TLS mode and the connector that does the handshake, from the URL's `sslmode`
/// and `sslrootcert` (percent-decoded; None when absent).
pub(super) fn connector(sslmode: Option<&str>, sslrootcert: Option<&str>) -> Result<(SslMode, Connector)> {
    let system = sslrootcert == Some("system");
    let (mode, check) = match sslmode.unwrap_or(if system { "verify-full" } else { "prefer" }) {
        "disable" => (SslMode::Disable, Check::Nothing),
        "prefer" => (SslMode::Prefer, Check::Nothing),
        "require" if sslrootcert.is_some() => (SslMode::Require, Check::Chain),
        "require" => (SslMode::Require, Check::Nothing),
        "verify-ca" => (SslMode::Require, Check::Chain),
        "verify-full" => (SslMode::Require, Check::ChainAndHost),
        "allow" => return Err(bad("sslmode=allow (plain TCP first, TLS if refused) is not supported; use prefer or disable")),
        other => return Err(bad(&format!("sslmode must be disable, prefer, require, verify-ca or verify-full (got {other:?})"))),
    };
    if system && check != Check::ChainAndHost {
        return Err(bad("sslrootcert=system needs sslmode=verify-full (the system's roots vouch for host names, not for a CA of your own)"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&format!("TLS: {e}")))?;
    let webpki = match check {
        Check::Nothing => None,
        Check::Chain | Check::ChainAndHost => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(sslrootcert)?), provider.clone())
                .build()
                .map_err(|e| bad(&format!("sslrootcert: {e}")))?,
        ),
    };
    let verifier = Verifier { webpki, any_host: check == Check::Chain, provider };
    let config = builder.dangerous().with_custom_certificate_verifier(Arc::new(verifier)).with_no_client_auth();
    Ok((mode, Connector::new(config)))
}

fn bad(why: &str) -> Error {
    Error::Configuration(format!("database: {why}"))
}

/// The roots a verifying mode checks the server's certificate against.
fn roots(sslrootcert: Option<&str>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    if sslrootcert == Some("system") {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found.errors.first().map(|e| format!(": {e}")).unwrap_or_default();
            return Err(bad(&format!("sslrootcert=system: the system has no trusted root certificates{why}")));
        }
        return Ok(store);
    }
    let path = match sslrootcert {
        Some(p) => PathBuf::from(p),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".postgresql/root.crt"),
            None => return Err(bad("sslrootcert is needed to verify the server's certificate (no HOME for libpq's default ~/.postgresql/root.crt)")),
        },
    };
    let unreadable = |why: String| {
        let hint = if sslrootcert.is_none() { " (libpq's default; name your CA file with sslrootcert=, or use sslrootcert=system)" } else { "" };
        bad(&format!("sslrootcert {}{hint}: {why}", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(&path).map_err(|e| unreadable(e.to_string()))?;
    for cert in certs {
        let cert = cert.map_err(|e| unreadable(format!("not a PEM certificate file: {e}")))?;
        store.add(cert).map_err(|e| unreadable(format!("not a usable CA certificate: {e}")))?;
    }
    if store.is_empty() {
        return Err(unreadable("holds no PEM certificate".into()));
    }
    Ok(store)
}

/// What the handshake checks of the server's certificate. Its signatures are always verified.
#[derive(Debug)]
struct Verifier {
    /// The chain's check against the roots (and the host name); None for prefer and require:
    /// encryption without checking whom the server is, as in libpq.
    webpki: Option<Arc<WebPkiServerVerifier>>,
    /// verify-ca: the certificate may name another host (webpki checks the chain first, so a
    /// name mismatch means the chain is good).
    any_host: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }))
                if self.any_host =>
            {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(sslmode: Option<&str>, sslrootcert: Option<&str>) -> String {
        match connector(sslmode, sslrootcert) {
            Err(Error::Configuration(m)) => m,
            Err(e) => panic!("not a configuration error: {e}"),
            Ok(_) => panic!("accepted sslmode={sslmode:?} sslrootcert={sslrootcert:?}"),
        }
    }

    #[test]
    fn modes_as_libpq_spells_them() {
        assert_eq!(connector(None, None).unwrap().0, SslMode::Prefer);
        assert_eq!(connector(Some("disable"), None).unwrap().0, SslMode::Disable);
        assert_eq!(connector(Some("require"), None).unwrap().0, SslMode::Require);
        assert!(refused(Some("verify-fulll"), None).contains("sslmode must be disable, prefer, require, verify-ca or verify-full"));
        assert!(refused(Some("allow"), None).contains("sslmode=allow"));
        assert!(refused(Some("require"), Some("system")).contains("sslrootcert=system needs sslmode=verify-full"));
    }

    #[test]
    fn root_certificate_files_are_checked_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let m = refused(Some("verify-full"), Some(missing.to_str().unwrap()));
        assert!(m.contains("sslrootcert") && m.contains("nope.pem"), "{m}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        assert!(refused(Some("verify-ca"), Some(empty.to_str().unwrap())).contains("holds no PEM certificate"));
        // require with a root file verifies the chain, as libpq does: the file must be good.
        assert!(refused(Some("require"), Some(empty.to_str().unwrap())).contains("holds no PEM certificate"));
    }
}
