//! Throwaway certificates for the mTLS tests of the agent stream: a CA, a server certificate
//! for `localhost`/127.0.0.1 and client certificates, written as PEM files.

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use std::path::{Path, PathBuf};

/// PEM files of one certificate and its key.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test CA that writes the certificates it issues into a folder.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
}

impl TestCa {
    /// Creates a CA named `name` and writes its certificate to `dir/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, issuer.pem()).context("writing CA")?;
        Ok(Self {
            issuer,
            dir: dir.to_path_buf(),
            ca,
        })
    }

    /// Issues a certificate for `names` (DNS names or IP addresses) usable as server and
    /// client certificate, written to `dir/<file>.pem` and `dir/<file>-key.pem`.
    pub fn issue(&self, file: &str, names: &[&str]) -> anyhow::Result<CertFiles> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &*self.issuer)?;
        let files = CertFiles {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}-key.pem")),
        };
        std::fs::write(&files.cert, cert.pem()).context("writing certificate")?;
        std::fs::write(&files.key, key.serialize_pem()).context("writing key")?;
        Ok(files)
    }
}
