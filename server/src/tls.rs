//! mTLS for the TCP listener: the server identity and client CA are loaded from PEM files before
//! anything binds, and a client certificate's names (its SAN entries, then its CN) are what the
//! auth layer maps to a role. The handshake itself (rustls via tonic) already refused any client
//! whose certificate does not chain to `tls_client_ca`, so this module only reads names.

use std::path::{Path, PathBuf};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// TLS configuration failures, each naming the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// A PEM file holds no certificate or key.
    #[error("{0} holds no PEM {1}")]
    NoPem(PathBuf, &'static str),
}

fn read_pem(path: &Path, what: &'static str, marker: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::Read(path.to_path_buf(), e))?;
    if !String::from_utf8_lossy(&bytes).contains(marker) {
        return Err(TlsError::NoPem(path.to_path_buf(), what));
    }
    Ok(bytes)
}

/// The server side of mTLS: our certificate and key, and the CA every client must chain to.
/// Client certificates are required (tonic's default when a client CA is set).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<ServerTlsConfig, TlsError> {
    let cert_pem = read_pem(cert, "certificate", "-----BEGIN CERTIFICATE-----")?;
    let key_pem = read_pem(key, "private key", "PRIVATE KEY-----")?;
    let ca_pem = read_pem(client_ca, "CA certificate", "-----BEGIN CERTIFICATE-----")?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert_pem, key_pem))
        .client_ca_root(Certificate::from_pem(ca_pem))
        .client_auth_optional(false))
}

/// The names a client certificate (DER) claims: DNS, URI and email SAN entries in order, then
/// the subject CN. Empty if the certificate cannot be parsed (then no name maps to a role).
pub fn peer_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    names.push((*s).to_string())
                }
                _ => {}
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            names.push(s.to_string());
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_san_then_cn() {
        let mut params = rcgen::CertificateParams::new(vec!["ops.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ops-admin");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            peer_names(cert.der()),
            vec!["ops.example".to_string(), "ops-admin".to_string()]
        );
        assert!(peer_names(b"not a certificate").is_empty());
    }

    #[test]
    fn missing_or_empty_pem_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "nothing here").unwrap();
        let e = server_config(&empty, &empty, &empty).unwrap_err();
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let e = server_config(&dir.path().join("absent"), &empty, &empty).unwrap_err();
        assert!(e.to_string().contains("absent"), "{e}");
    }
}
