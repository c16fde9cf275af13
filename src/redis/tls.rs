//! TLS for `rediss://` URLs, with rustls: pure Rust, so nothing links a second OpenSSL into the
//! Postgres backends (which have their own), and it runs over the connection's non-blocking
//! socket without an async runtime. The server's certificate is verified against
//! `queue.redis_tls_ca_file` (PEM), or the system's store when that is empty; only
//! `queue.redis_tls_insecure_skip_verify` turns verification off (self-signed test setups).

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::cell::RefCell;
use std::sync::Arc;
use std::time::SystemTime;

/// How to verify the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Against the certificates in this PEM file.
    CaFile(String),
    /// Against the system's certificate store.
    System,
    /// Not at all (`queue.redis_tls_insecure_skip_verify`).
    InsecureSkip,
}

/// A TLS session to `host` (a name or an IP address, checked against the certificate).
pub fn client(host: &str, verify: &Verify) -> Result<ClientConnection, String> {
    let config = config(verify)?;
    let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
        .map_err(|e| format!("Redis host {host} cannot be checked against a certificate: {e}"))?
        .to_owned();
    ClientConnection::new(config, name).map_err(|e| format!("starting TLS: {e}"))
}

thread_local! {
    /// The last configuration built, with what it was built from (the CA file's modification
    /// time too, so a renewed file is read again): loading a store costs milliseconds, and a
    /// backend or background worker opens connections again and again.
    static CONFIG: RefCell<Option<(ConfigKey, Arc<ClientConfig>)>> = const { RefCell::new(None) };
}

/// What a configuration is built from: the verification, and the CA file's modification time.
type ConfigKey = (Verify, Option<SystemTime>);

fn config(verify: &Verify) -> Result<Arc<ClientConfig>, String> {
    let modified = match verify {
        Verify::CaFile(path) => Some(
            std::fs::metadata(path)
                .and_then(|m| m.modified())
                .map_err(|e| format!("queue.redis_tls_ca_file {path}: {e}"))?,
        ),
        _ => None,
    };
    let key = (verify.clone(), modified);
    if let Some(config) = CONFIG.with_borrow(|c| {
        c.as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, config)| config.clone())
    }) {
        return Ok(config);
    }
    let config = Arc::new(build(verify)?);
    CONFIG.set(Some((key, config.clone())));
    Ok(config)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build(verify: &Verify) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("setting up TLS: {e}"))?;
    let config = match verify {
        Verify::InsecureSkip => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SkipVerify(provider())))
            .with_no_client_auth(),
        Verify::CaFile(path) => builder
            .with_root_certificates(roots_from_file(path)?)
            .with_no_client_auth(),
        Verify::System => builder
            .with_root_certificates(system_roots()?)
            .with_no_client_auth(),
    };
    Ok(config)
}

fn roots_from_file(path: &str) -> Result<RootCertStore, String> {
    let what = |e: &dyn std::fmt::Display| format!("queue.redis_tls_ca_file {path}: {e}");
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| what(&e))? {
        roots
            .add(cert.map_err(|e| what(&e))?)
            .map_err(|e| what(&e))?;
    }
    if roots.is_empty() {
        return Err(what(&"no certificate in it (PEM expected)"));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or("none found".to_owned(), |e| e.to_string());
        return Err(format!(
            "no usable certificate in the system's store ({why}); set queue.redis_tls_ca_file"
        ));
    }
    Ok(roots)
}

/// Accepts any certificate, still checking that the server holds its key (the handshake's
/// signatures). For `queue.redis_tls_insecure_skip_verify` only.
#[derive(Debug)]
struct SkipVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for SkipVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_a_clear_error() {
        let missing = client("127.0.0.1", &Verify::CaFile("/nonexistent/ca.pem".into()));
        let e = missing.expect_err("a missing file fails");
        assert!(
            e.contains("queue.redis_tls_ca_file /nonexistent/ca.pem"),
            "{e}"
        );

        let empty = std::env::temp_dir().join(format!("queue_pg_empty_ca_{}", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let e = client("127.0.0.1", &Verify::CaFile(empty.display().to_string()))
            .expect_err("a file without certificates fails");
        std::fs::remove_file(&empty).unwrap();
        assert!(e.contains("no certificate"), "{e}");
    }

    #[test]
    fn names_and_addresses_are_both_accepted_as_server_names() {
        for host in ["127.0.0.1", "[::1]", "redis.example.com"] {
            assert!(client(host, &Verify::InsecureSkip).is_ok(), "{host}");
        }
    }
}
