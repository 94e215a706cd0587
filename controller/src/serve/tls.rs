//! The agent stream's mutual TLS, reloadable: owns reading the certificate files, building
//! the rustls `ServerConfig`, and the TLS accept loop that feeds tonic.
//!
//! cert-manager (or the chart's generated Secret) rotates the certificate by rewriting the
//! mounted Secret in place: the kubelet swaps the `..data` symlink atomically, so the paths
//! given by `--tls-cert/--tls-key/--tls-ca` stay the same while their contents change. No
//! file-system event is reliable through symlink swaps on every volume type, so
//! [`Reloader::run`] polls: every `--tls-reload-interval` (default 5 s) it reads the three
//! files and, when their contents' hash differs from the one in force, builds a new
//! `ServerConfig` and swaps it into an [`ArcSwap`]. New handshakes use the new config;
//! established connections (and so agents' streams) are untouched. A file that does not
//! parse keeps the old config in force and is logged once per content.
//!
//! The accept loop ([`incoming`]) runs each handshake in its own task with a timeout, so a
//! client that stalls its handshake holds up nobody.

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// How long a client has to complete its TLS handshake.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {flag} {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {path}: {message}")]
    Pem {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// The three files of the agent stream's mTLS.
#[derive(Clone, Debug)]
pub struct Files {
    /// The server certificate chain (`--tls-cert`).
    pub cert: PathBuf,
    /// Its private key (`--tls-key`).
    pub key: PathBuf,
    /// The CA client certificates must chain to (`--tls-ca`).
    pub ca: PathBuf,
}

/// The files' contents, as read at one moment.
struct Contents {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl Contents {
    fn read(files: &Files) -> Result<Self, Error> {
        let read = |flag, path: &Path| {
            std::fs::read(path).map_err(|source| Error::Read {
                flag,
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Self {
            cert: read("--tls-cert", &files.cert)?,
            key: read("--tls-key", &files.key)?,
            ca: read("--tls-ca", &files.ca)?,
        })
    }

    fn hash(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&self.cert, &self.key, &self.ca).hash(&mut h);
        h.finish()
    }
}

fn pem_error(flag: &'static str, path: &Path, message: impl ToString) -> Error {
    Error::Pem {
        flag,
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Builds the server config: present `cert`/`key`, require a client certificate chaining
/// to `ca`, speak HTTP/2 (ALPN `h2`, as tonic's own TLS does).
fn build(files: &Files, c: &Contents) -> Result<rustls::ServerConfig, Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&c.cert)
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error("--tls-cert", &files.cert, e))?;
    if chain.is_empty() {
        return Err(pem_error(
            "--tls-cert",
            &files.cert,
            "no CERTIFICATE in the file",
        ));
    }
    let key =
        PrivateKeyDer::from_pem_slice(&c.key).map_err(|e| pem_error("--tls-key", &files.key, e))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut any = false;
    for ca in CertificateDer::pem_slice_iter(&c.ca) {
        let ca = ca.map_err(|e| pem_error("--tls-ca", &files.ca, e))?;
        roots
            .add(ca)
            .map_err(|e| pem_error("--tls-ca", &files.ca, e))?;
        any = true;
    }
    if !any {
        return Err(pem_error(
            "--tls-ca",
            &files.ca,
            "no CERTIFICATE in the file",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| Error::Config(format!("--tls-cert/--tls-key: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// The config in force and what it was built from.
pub struct Reloader {
    files: Files,
    current: ArcSwap<rustls::ServerConfig>,
    hash: std::sync::Mutex<u64>,
}

impl Reloader {
    /// Reads the files once; fails (the controller does not start) if they are unusable.
    pub fn new(files: Files) -> Result<Arc<Self>, Error> {
        let contents = Contents::read(&files)?;
        let config = build(&files, &contents)?;
        Ok(Arc::new(Self {
            files,
            current: ArcSwap::from_pointee(config),
            hash: std::sync::Mutex::new(contents.hash()),
        }))
    }

    /// The config new handshakes use.
    pub(crate) fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.load_full()
    }

    /// Re-reads the files; swaps in a new config if their contents changed and are valid.
    /// Returns whether a new config is in force.
    pub(crate) fn reload(&self) -> Result<bool, Error> {
        let contents = Contents::read(&self.files)?;
        let hash = contents.hash();
        let mut in_force = self.hash.lock().unwrap_or_else(|e| e.into_inner());
        if *in_force == hash {
            return Ok(false);
        }
        // Record the hash before building: a broken file is reported once, not every poll.
        *in_force = hash;
        let config = build(&self.files, &contents)?;
        self.current.store(Arc::new(config));
        Ok(true)
    }

    /// Polls the files every `every`, forever.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match self.reload() {
                Ok(true) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed; new connections use them")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot load the changed TLS files; the previous certificate stays in force")
                }
            }
        }
    }
}

/// Accepts TCP connections on `listener` and yields those whose TLS handshake (with the
/// config in force at that moment) succeeds. Failed handshakes are logged at debug level:
/// refusing a client without a valid certificate is normal operation.
pub fn incoming(
    listener: TcpListener,
    reloader: Arc<Reloader>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return; // the server is gone
            }
            let acceptor = tokio_rustls::TlsAcceptor::from(reloader.config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreadable_or_garbage_files_are_clear_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Files {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            ca: dir.path().join("ca.crt"),
        };
        let e = Reloader::new(files.clone()).err().expect("missing files");
        assert!(e.to_string().contains("--tls-cert"), "{e}");
        for f in [&files.cert, &files.key, &files.ca] {
            std::fs::write(f, "not PEM").expect("write");
        }
        let e = Reloader::new(files).err().expect("garbage");
        assert!(e.to_string().contains("--tls-cert"), "{e}");
    }

    /// Writes a CA and a server certificate it signed into `files`.
    fn write_pki(files: &Files, name: &str) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer =
            CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("ca");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &*issuer)
            .expect("cert");
        std::fs::write(&files.ca, issuer.pem()).expect("write");
        std::fs::write(&files.cert, cert.pem()).expect("write");
        std::fs::write(&files.key, key.serialize_pem()).expect("write");
    }

    #[test]
    fn changed_files_swap_the_config_and_broken_ones_keep_the_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = Files {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            ca: dir.path().join("ca.crt"),
        };
        write_pki(&files, "one");
        let r = Reloader::new(files.clone()).expect("valid files");
        let first = r.config();
        assert!(!r.reload().expect("unchanged"), "same contents: no reload");
        assert!(Arc::ptr_eq(&first, &r.config()));

        std::fs::write(&files.key, "-----BEGIN PRIVATE KEY-----\nbroken\n").expect("write");
        assert!(r.reload().is_err(), "a broken key is an error");
        assert!(Arc::ptr_eq(&first, &r.config()), "the old config stays");

        write_pki(&files, "two");
        assert!(r.reload().expect("valid"), "new contents are loaded");
        assert!(!Arc::ptr_eq(&first, &r.config()));
    }
}
