//! TLS termination (rustls). One `Acceptor` per TLS listener: its certificates (a default and
//! any chosen by SNI) are read from PEM files at start and again on SIGHUP; a reload that
//! fails keeps the certificates in use and says why.
//!
//! Provider: aws-lc-rs (rustls' default). Its P-256 and RSA signing are assembly-optimised,
//! which is what a full handshake spends its time on; ring is slower at ECDSA signing. Session
//! resumption is on: a ticketer for TLS 1.3/1.2 tickets and a server-side session cache, both
//! kept across certificate reloads so resumption survives them.
//!
//! Admission has already run when a handshake starts (a refused client costs no handshake).
//! A client that sends nothing, garbage, or stalls mid-handshake is cut at
//! `tls_handshake_timeout`; one that speaks plain HTTP to the TLS port gets a cleartext 400.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use crate::config::{CertPaths, HostPattern, TlsConfig};

/// Why a certificate or key could not be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: cannot read: {error}")]
    Read {
        path: String,
        #[source]
        error: std::io::Error,
    },
    #[error("{path}: no PEM CERTIFICATE block found (expected the certificate chain, leaf first)")]
    NoCertificate { path: String },
    #[error("{path}: malformed PEM or certificate: {error}")]
    BadCertificate { path: String, error: String },
    #[error("{path}: no usable private key (expected PEM PKCS#8, PKCS#1 RSA or SEC1 EC): {error}")]
    BadKey { path: String, error: String },
    #[error("{key}: this key does not match the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
}

/// Sessions the server cache holds (about 200 bytes each).
const SESSION_CACHE: usize = 20_000;

/// The crypto provider every TLS listener uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Handshake counters for one listener.
#[derive(Debug)]
pub struct TlsStats {
    pub listener: SocketAddr,
    pub completed: AtomicU64,
    pub resumed: AtomicU64,
    /// Failures by reason, in the order of `FAILURE_REASONS`.
    pub failed: [AtomicU64; 5],
    pub duration: prometheus_client::metrics::histogram::Histogram,
}

/// Labels of `TlsStats::failed`.
pub const FAILURE_REASONS: [&str; 5] = [
    "timeout",
    "protocol",
    "incompatible",
    "cleartext_http",
    "io",
];

#[derive(Debug, Clone, Copy)]
enum Failure {
    Timeout = 0,
    Protocol = 1,
    Incompatible = 2,
    Cleartext = 3,
    Io = 4,
}

/// A TLS listener's handshake side.
pub struct Acceptor {
    cfg: TlsConfig,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<rustls::ServerConfig>,
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    pub stats: TlsStats,
}

impl std::fmt::Debug for Acceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acceptor")
            .field("listener", &self.stats.listener)
            .finish_non_exhaustive()
    }
}

impl Acceptor {
    /// Reads the certificates now; fails with the first file that cannot be used.
    pub fn load(cfg: &TlsConfig, listener: SocketAddr, http2: bool) -> Result<Acceptor, CertError> {
        let sessions = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        let ticketer =
            rustls::crypto::aws_lc_rs::Ticketer::new().map_err(|e| CertError::BadKey {
                path: "(session ticket key)".into(),
                error: e.to_string(),
            })?;
        let alpn = if http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        let resolver = Resolver::load(cfg)?;
        let server = build(resolver, &alpn, sessions.clone(), ticketer.clone());
        Ok(Acceptor {
            cfg: cfg.clone(),
            alpn,
            current: ArcSwap::from_pointee(server),
            sessions,
            ticketer,
            stats: TlsStats {
                listener,
                completed: AtomicU64::new(0),
                resumed: AtomicU64::new(0),
                failed: Default::default(),
                duration: prometheus_client::metrics::histogram::Histogram::new(
                    prometheus_client::metrics::histogram::exponential_buckets(0.0002, 2.0, 14),
                ),
            },
        })
    }

    /// Re-reads the certificate files. On error the certificates in use stay.
    pub fn reload(&self) -> Result<(), CertError> {
        let resolver = Resolver::load(&self.cfg)?;
        self.current.store(Arc::new(build(
            resolver,
            &self.alpn,
            self.sessions.clone(),
            self.ticketer.clone(),
        )));
        Ok(())
    }

    pub fn handshake_timeout(&self) -> Duration {
        self.cfg.handshake_timeout
    }

    /// Refuses plain HTTP sent to this TLS port: if the first byte cannot start a TLS record
    /// (0x16, a handshake) the client gets a cleartext 400 when it looks like HTTP, and is
    /// closed either way. Waits at most the handshake timeout for that first byte.
    pub async fn sniff(&self, stream: &mut TcpStream) -> bool {
        let mut first = [0u8; 1];
        let peeked =
            tokio::time::timeout(self.cfg.handshake_timeout, stream.peek(&mut first)).await;
        match peeked {
            Ok(Ok(1)) if first[0] == 0x16 => true,
            Ok(Ok(1)) => {
                self.fail(Failure::Cleartext);
                if first[0].is_ascii_uppercase() {
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\n\
                              Content-Length: 50\r\nConnection: close\r\n\r\n\
                              400 Bad Request: this port speaks HTTPS, not HTTP\n",
                        )
                        .await;
                }
                false
            }
            Ok(Ok(_)) | Ok(Err(_)) => {
                self.fail(Failure::Io);
                false
            }
            Err(_) => {
                self.fail(Failure::Timeout);
                false
            }
        }
    }

    /// The handshake, within the timeout; counted by outcome.
    pub async fn accept<IO>(&self, io: IO) -> Option<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let started = Instant::now();
        let acceptor = tokio_rustls::TlsAcceptor::from(self.current.load_full());
        match tokio::time::timeout(self.cfg.handshake_timeout, acceptor.accept(io)).await {
            Ok(Ok(tls)) => {
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    self.stats.resumed.fetch_add(1, Ordering::Relaxed);
                }
                self.stats.duration.observe(started.elapsed().as_secs_f64());
                Some(tls)
            }
            Ok(Err(e)) => {
                let reason = match e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    Some(rustls::Error::PeerIncompatible(_)) => Failure::Incompatible,
                    Some(_) => Failure::Protocol,
                    None if e.kind() == std::io::ErrorKind::InvalidData => Failure::Protocol,
                    None => Failure::Io,
                };
                self.fail(reason);
                tracing::debug!(listener = %self.stats.listener, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                self.fail(Failure::Timeout);
                None
            }
        }
    }

    fn fail(&self, f: Failure) {
        self.stats.failed[f as usize].fetch_add(1, Ordering::Relaxed);
    }
}

fn build(
    resolver: Resolver,
    alpn: &[Vec<u8>],
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> rustls::ServerConfig {
    // TLS 1.2 and 1.3 only (rustls has nothing older); the provider's default suites.
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map(|b| {
            b.with_no_client_auth()
                .with_cert_resolver(Arc::new(resolver))
        })
        // The provider's defaults support both versions; this cannot fail.
        .unwrap_or_else(|_| unreachable_config());
    cfg.alpn_protocols = alpn.to_vec();
    cfg.session_storage = sessions;
    cfg.ticketer = ticketer;
    cfg
}

#[cold]
fn unreachable_config() -> rustls::ServerConfig {
    panic!("aws-lc-rs supports TLS 1.2 and 1.3")
}

/// Certificates by server name.
#[derive(Debug)]
struct Resolver {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// (".example.com", key) for "*.example.com"
    suffix: Vec<(String, Arc<CertifiedKey>)>,
}

impl Resolver {
    fn load(cfg: &TlsConfig) -> Result<Resolver, CertError> {
        let mut r = Resolver {
            default: Arc::new(load_pair(&cfg.default)?),
            exact: HashMap::new(),
            suffix: Vec::new(),
        };
        for (names, paths) in &cfg.sni {
            let key = Arc::new(load_pair(paths)?);
            for n in names {
                match n {
                    HostPattern::Exact(h) => {
                        r.exact.insert(h.clone(), key.clone());
                    }
                    HostPattern::Suffix(s) => r.suffix.push((s.clone(), key.clone())),
                }
            }
        }
        Ok(r)
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        // One label under the wildcard, as certificates match.
        for (suffix, k) in &self.suffix {
            if let Some(label) = name.strip_suffix(suffix.as_str()) {
                if !label.is_empty() && !label.contains('.') {
                    return Some(k.clone());
                }
            }
        }
        Some(self.default.clone())
    }
}

/// A chain and its key, checked to belong together.
pub fn load_pair(p: &CertPaths) -> Result<CertifiedKey, CertError> {
    let certs = load_certs(&p.cert)?;
    let key = load_key(&p.key)?;
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| CertError::BadKey {
            path: p.key.display().to_string(),
            error: e.to_string(),
        })?;
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(ck),
        Err(rustls::Error::InconsistentKeys(_)) => Err(CertError::KeyMismatch {
            cert: p.cert.display().to_string(),
            key: p.key.display().to_string(),
        }),
        Err(e) => Err(CertError::BadCertificate {
            path: p.cert.display().to_string(),
            error: e.to_string(),
        }),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|error| CertError::Read {
        path: path.display().to_string(),
        error,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadCertificate {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CertError::BadKey {
        path: path.display().to_string(),
        error: e.to_string(),
    })
}

/// Seconds until the leaf certificate in `path` expires (negative: expired), for `check`.
pub fn expires_in(path: &Path) -> Result<i64, CertError> {
    let certs = load_certs(path)?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&certs[0]).map_err(|e| CertError::BadCertificate {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    Ok(cert.validity().not_after.timestamp() - now)
}

/// Every TLS listener's acceptor, for the metrics and for SIGHUP.
#[derive(Debug, Default)]
pub struct TlsListeners(Mutex<Vec<Arc<Acceptor>>>);

impl TlsListeners {
    pub fn add(&self, a: Arc<Acceptor>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(a);
    }

    pub fn all(&self) -> Vec<Arc<Acceptor>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-reads every listener's certificates; logs each failure (which keeps the old ones).
    /// Returns how many listeners failed.
    pub fn reload(&self) -> usize {
        let mut failed = 0;
        for a in self.all() {
            match a.reload() {
                Ok(()) => tracing::info!(listener = %a.stats.listener, "TLS certificates reloaded"),
                Err(e) => {
                    failed += 1;
                    tracing::error!(listener = %a.stats.listener, error = %e,
                        "TLS certificate reload failed; keeping the certificates in use");
                }
            }
        }
        failed
    }
}

/// What `breakwater check` says about a listener's certificates: errors (the listener could
/// not start) and warnings (it could, but a client will complain), each naming the file.
pub fn check(cfg: &TlsConfig) -> (Vec<String>, Vec<String>) {
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    let pairs = std::iter::once(&cfg.default).chain(cfg.sni.iter().map(|(_, p)| p));
    for p in pairs {
        if let Err(e) = load_pair(p) {
            errors.push(e.to_string());
            continue;
        }
        match expires_in(&p.cert) {
            Ok(s) if s < 0 => warnings.push(format!(
                "{}: the certificate expired {} days ago",
                p.cert.display(),
                -s / 86_400
            )),
            Ok(s) if s < 14 * 86_400 => warnings.push(format!(
                "{}: the certificate expires in {} days",
                p.cert.display(),
                s / 86_400
            )),
            Ok(_) => {}
            Err(e) => warnings.push(e.to_string()),
        }
    }
    (errors, warnings)
}
