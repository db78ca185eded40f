//! Test certificates (rcgen): a CA and certificates it signs, in PEM.

/// A certificate and its private key, in PEM.
pub struct CertKey {
    pub cert: String,
    pub key: String,
}

/// A self-signed CA named `name`: its certificate and the issuer that signs with it.
pub fn ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    p.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.self_signed(&key).unwrap();
    (cert, rcgen::Issuer::new(p, key))
}

/// A certificate signed by `issuer` for the names `sans` with common name `cn`, for a server
/// (extended key usage serverAuth) or a client (clientAuth).
pub fn leaf(
    issuer: &rcgen::Issuer<'static, rcgen::KeyPair>,
    sans: &[&str],
    cn: &str,
    server: bool,
) -> CertKey {
    let mut p =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.extended_key_usages = vec![if server {
        rcgen::ExtendedKeyUsagePurpose::ServerAuth
    } else {
        rcgen::ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    CertKey {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}
