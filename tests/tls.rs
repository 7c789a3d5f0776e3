//! TLS termination, as clients and operators meet it: rustls and curl clients over h2 and
//! http/1.1, SNI, resumption, clients that stall or send garbage or plain HTTP, `check` on bad
//! files, and certificates re-read on SIGHUP by the real binary. Certificates are made here.
// Tests signal the binaries they start (kill(2)).
#![allow(unsafe_code)]

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

/// A certificate and key written as PEM files.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
    der: CertificateDer<'static>,
}

fn make_cert(dir: &Path, name: &str, hosts: &[&str], expired: bool) -> Pem {
    let mut params =
        rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
            .unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    // ECDSA P-256, the key the handshake goal is measured with.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = Pem {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        der: cert.der().clone(),
    };
    std::fs::write(&pem.cert, cert.pem()).unwrap();
    std::fs::write(&pem.key, key.serialize_pem()).unwrap();
    pem
}

/// Accepts any certificate: these tests compare which one was served, not its trust.
#[derive(Debug)]
struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(roots: Option<&Pem>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap();
    let mut c = match roots {
        Some(p) => {
            let mut store = rustls::RootCertStore::empty();
            store.add(p.der.clone()).unwrap();
            b.with_root_certificates(store).with_no_client_auth()
        }
        None => b
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert))
            .with_no_client_auth(),
    };
    c.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Arc::new(c)
}

async fn connect_tls(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    name: &str,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

/// One HTTP/1.1 GET for shop.example.com on an established TLS connection: the body.
async fn get_over_http1(tls: tokio_rustls::client::TlsStream<TcpStream>, path: &str) -> String {
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri(path)
        .header("host", "shop.example.com")
        .body(full(""))
        .unwrap();
    collect(tx.send_request(req).await.unwrap()).await.text()
}

fn tls_listener(site: &Pem, extra: &str) -> String {
    format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\ntls_handshake_timeout = \"1s\"\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n{extra}\n",
        site.cert.display(),
        site.key.display()
    )
}

/// A TLS listener for shop.example.com (its certificate made in `dir`) in front of an echo
/// origin.
async fn shop_proxy(dir: &Path) -> (Pem, Origin, Proxy) {
    shop_proxy_with(dir, "").await
}

/// `shop_proxy` with more of the config (whole tables).
async fn shop_proxy_with(dir: &Path, more: &str) -> (Pem, Origin, Proxy) {
    let site = make_cert(dir, "site", &["shop.example.com"], false);
    let origin = echo_origin().await;
    let toml = format!(
        "{}{more}[upstreams.app]\nservers = [\"{}\"]\n",
        tls_listener(&site, ""),
        origin.addr
    );
    let proxy = Proxy::start(&toml).await;
    (site, origin, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_and_http11_over_tls_reach_the_origin_as_https() {
    let dir = tempfile::tempdir().unwrap();
    let (site, origin, proxy) = shop_proxy(dir.path()).await;

    // HTTP/2, negotiated by ALPN, with the certificate verified against its own root.
    let tls = connect_tls(
        proxy.addr,
        client_config(Some(&site), &[b"h2", b"http/1.1"]),
        "shop.example.com",
    )
    .await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = tx
        .send_request(
            Request::builder()
                .uri("https://shop.example.com/two")
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "GET /two"
    );

    // HTTP/1.1 when the client offers only that.
    let tls = connect_tls(
        proxy.addr,
        client_config(Some(&site), &[b"http/1.1"]),
        "shop.example.com",
    )
    .await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(get_over_http1(tls, "/one").await, "GET /one");

    for seen in origin.requests() {
        assert_eq!(seen.headers["x-forwarded-proto"], "https");
    }
    proxy.stop().await;
}

/// A TLS newcomer's first bytes are its ClientHello: the express lane takes it as a request
/// that is here (`listener/lanes.rs`), not as an idle connection. (Not from 127.0.0.1: the
/// default allow list exempts it, and an exempt client's connections are not counted, so none
/// is told to be a newcomer.) `express_above = 0`: the lane takes newcomers however few are
/// open (by default only above 32 open for each worker thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_newcomer_is_served_on_the_express_lane() {
    let dir = tempfile::tempdir().unwrap();
    let (site, _origin, proxy) =
        shop_proxy_with(dir.path(), "[runtime]\nexpress_above = 0\n").await;
    let tcp = connect_from("127.0.0.9", proxy.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(client_config(Some(&site), &[b"http/1.1"]))
        .connect(ServerName::try_from("shop.example.com").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(get_over_http1(tls, "/lane").await, "GET /lane");
    assert_eq!(proxy.metric("breakwater_express_connections_total"), 1.0);
    assert_eq!(
        proxy.metric("breakwater_express_unready_connections_total"),
        0.0
    );
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_sessions_resume() {
    let dir = tempfile::tempdir().unwrap();
    let site = make_cert(dir.path(), "site", &["default.test"], false);
    let shop = make_cert(dir.path(), "shop", &["shop.example.com"], false);
    let origin = echo_origin().await;
    let sni = format!(
        "[[listeners.certs]]\nnames = [\"shop.example.com\", \"*.shop.example.com\"]\n\
         cert = \"{}\"\nkey = \"{}\"\n",
        shop.cert.display(),
        shop.key.display()
    );
    let toml = format!(
        "{}[upstreams.app]\nservers = [\"{}\"]\n",
        tls_listener(&site, &sni),
        origin.addr
    );
    let proxy = Proxy::start(&toml).await;
    let any = client_config(None, &[b"http/1.1"]);
    for (name, want) in [
        ("shop.example.com", &shop.der),
        ("a.shop.example.com", &shop.der),
        ("b.a.shop.example.com", &site.der),
        ("other.test", &site.der),
    ] {
        let tls = connect_tls(proxy.addr, any.clone(), name).await;
        let served = &tls.get_ref().1.peer_certificates().unwrap()[0];
        assert_eq!(served, want, "{name}");
    }

    // A second connection with the same client config resumes the session.
    let cfg = client_config(Some(&shop), &[b"http/1.1"]);
    let mut kinds = Vec::new();
    for _ in 0..2 {
        let mut tls = connect_tls(proxy.addr, cfg.clone(), "shop.example.com").await;
        // TLS 1.3 tickets arrive after the handshake: a request/response makes sure the
        // client has read them before the next connection.
        tls.write_all(b"GET / HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
        assert!(out.starts_with(b"HTTP/1.1 200"));
        kinds.push(tls.get_ref().1.handshake_kind());
    }
    assert_eq!(kinds[1], Some(rustls::HandshakeKind::Resumed), "{kinds:?}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_garbage_and_plain_http_clients_are_cut() {
    let dir = tempfile::tempdir().unwrap();
    let site = make_cert(dir.path(), "site", &["shop.example.com"], false);
    let origin = echo_origin().await;
    let toml = format!(
        "{}[upstreams.app]\nservers = [\"{}\"]\n[admin]\naddr = \"127.0.0.1:0\"\n",
        tls_listener(&site, ""),
        origin.addr
    );
    let proxy = Proxy::start(&toml).await;

    // Silent, mid-handshake stall (a record header promising more), and garbage: each closed
    // by the 1 s handshake timeout or at once, never held.
    let cases: [(&[u8], &str); 3] = [
        (b"", "silent"),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            "stalled ClientHello",
        ),
        (b"\x16\x03\x01\x00\x05hello", "garbage ClientHello"),
    ];
    for (bytes, what) in cases {
        let started = Instant::now();
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = [0u8; 512];
        let r = tokio::time::timeout(WAIT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(r.is_ok(), "{what}: still open after {WAIT:?}");
        assert!(started.elapsed() < Duration::from_secs(3), "{what}");
    }

    // Plain HTTP to the TLS port: a cleartext 400, as nginx answers.
    let text = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    assert!(origin.requests().is_empty());

    let metrics = send(
        proxy.admin.unwrap(),
        request("GET", proxy.admin.unwrap(), "/metrics", full("")),
    )
    .await
    .text();
    for reason in ["timeout", "protocol", "cleartext_http"] {
        let line = metrics
            .lines()
            .find(|l| {
                l.starts_with("breakwater_tls_handshake_failures_total")
                    && l.contains(&format!("reason=\"{reason}\""))
            })
            .unwrap_or_else(|| panic!("no {reason} failures in\n{metrics}"));
        assert!(!line.ends_with(" 0"), "{line}");
    }
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_verifies_the_certificate_and_speaks_h2() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("curl is not installed; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (site, _origin, proxy) = shop_proxy(dir.path()).await;
    let port = proxy.addr.port();
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "-w", " %{http_version}", "--cacert"])
        .arg(&site.cert)
        .arg("--resolve")
        .arg(format!("shop.example.com:{port}:127.0.0.1"))
        .arg(format!("https://shop.example.com:{port}/curl"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "GET /curl 2");
    proxy.stop().await;
}

fn check(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bw.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_names_the_file_that_is_missing_malformed_mismatched_or_expired() {
    let dir = tempfile::tempdir().unwrap();
    let good = make_cert(dir.path(), "good", &["a.test"], false);
    let other = make_cert(dir.path(), "other", &["b.test"], false);
    let old = make_cert(dir.path(), "old", &["c.test"], true);
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let cfg = |cert: &Path, key: &Path| {
        format!(
            "[[listeners]]\naddr = \"127.0.0.1:8443\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\
             [upstreams.app]\nservers = [\"127.0.0.1:3000\"]\n",
            cert.display(),
            key.display()
        )
    };
    let missing = dir.path().join("missing.pem");
    let (code, err) = check(&cfg(&missing, &good.key));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("missing.pem: cannot read"), "{err}");

    let (code, err) = check(&cfg(&junk, &good.key));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("junk.pem: no PEM CERTIFICATE"), "{err}");

    let (code, err) = check(&cfg(&good.cert, &junk));
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("junk.pem: no usable private key"), "{err}");

    let (code, err) = check(&cfg(&good.cert, &other.key));
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("other.key: this key does not match the certificate in")
            && err.contains("good.pem"),
        "{err}"
    );

    let (code, err) = check(&cfg(&old.cert, &old.key));
    assert_eq!(code, Some(0), "an expired certificate is a warning: {err}");
    assert!(err.contains("old.pem: the certificate expired"), "{err}");
}

/// Reads the binary's log until it reports its listening address.
fn listening_addr(stderr: &mut impl BufRead) -> SocketAddr {
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(rest) = line
            .split("addr=")
            .nth(1)
            .filter(|_| line.contains("listening"))
        {
            let addr: String = rest
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '\u{1b}')
                .collect();
            return addr.parse().unwrap();
        }
    }
    panic!("breakwater did not report a listening address");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rereads_certificates_and_a_bad_file_keeps_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let first = make_cert(dir.path(), "first", &["shop.example.com"], false);
    let second = make_cert(dir.path(), "second", &["shop.example.com"], false);
    let live_cert = dir.path().join("live.pem");
    let live_key = dir.path().join("live.key");
    std::fs::copy(&first.cert, &live_cert).unwrap();
    std::fs::copy(&first.key, &live_key).unwrap();
    let origin = echo_origin().await;
    let config = dir.path().join("bw.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n\
             [upstreams.app]\nservers = [\"{}\"]\n[log]\naccess_log = false\n",
            live_cert.display(),
            live_key.display(),
            origin.addr
        ),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let addr = listening_addr(&mut stderr);
    // Keep draining the log so the child never blocks on a full pipe; keep it to read.
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap_or(0) > 0 {
            sink.lock().unwrap().push_str(&line);
            line.clear();
        }
    });
    let hups_handled = move || log.lock().unwrap().matches("SIGHUP: ").count();
    let pid = child.id() as i32;
    let served = |cfg: Arc<rustls::ClientConfig>| async move {
        let tls = connect_tls(addr, cfg, "shop.example.com").await;
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    };
    let any = client_config(None, &[b"http/1.1"]);
    assert_eq!(served(any.clone()).await, first.der);

    std::fs::copy(&second.cert, &live_cert).unwrap();
    std::fs::copy(&second.key, &live_key).unwrap();
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(
        eventually_async(Duration::from_secs(2), || async {
            served(any.clone()).await == second.der
        })
        .await,
        "SIGHUP did not load the new certificate"
    );

    // A broken file: the process lives on and keeps serving the certificate it had.
    std::fs::write(&live_cert, "garbage\n").unwrap();
    let handled = hups_handled();
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(
        eventually(Duration::from_secs(5), || hups_handled() > handled).await,
        "the second SIGHUP was never handled"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "SIGHUP stopped the process"
    );
    assert_eq!(served(any.clone()).await, second.der);
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_pkcs1_and_ec_sec1_keys_from_openssl_serve() {
    if Command::new("openssl").arg("version").output().is_err() {
        eprintln!("openssl is not installed; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // RSA in PKCS#1 ("BEGIN RSA PRIVATE KEY") and EC in SEC1 ("BEGIN EC PRIVATE KEY").
    run(&["genrsa", "-traditional", "-out", "rsa.key", "2048"]);
    run(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        "ec.key",
    ]);
    for k in ["rsa", "ec"] {
        run(&[
            "req",
            "-new",
            "-x509",
            "-key",
            &format!("{k}.key"),
            "-out",
            &format!("{k}.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=shop.example.com",
            "-addext",
            "subjectAltName=DNS:shop.example.com",
        ]);
        let key = std::fs::read_to_string(d.join(format!("{k}.key"))).unwrap();
        assert!(
            key.contains("BEGIN RSA PRIVATE KEY") || key.contains("BEGIN EC PRIVATE KEY"),
            "{key}"
        );
    }
    let origin = echo_origin().await;
    for k in ["rsa", "ec"] {
        let toml = format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\nshards = 1\n\
             tls = {{ cert = \"{}\", key = \"{}\" }}\n[upstreams.app]\nservers = [\"{}\"]\n",
            d.join(format!("{k}.pem")).display(),
            d.join(format!("{k}.key")).display(),
            origin.addr
        );
        let proxy = Proxy::start(&toml).await;
        let tls = connect_tls(
            proxy.addr,
            client_config(None, &[b"http/1.1"]),
            "shop.example.com",
        )
        .await;
        assert!(tls.get_ref().1.peer_certificates().is_some(), "{k}");
        proxy.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_then_tls_names_the_client_behind_the_balancer() {
    let dir = tempfile::tempdir().unwrap();
    let site = make_cert(dir.path(), "site", &["shop.example.com"], false);
    let origin = echo_origin().await;
    let toml = format!(
        "{}proxy_protocol = \"v1\"\nproxy_protocol_from = [\"127.0.0.0/8\"]\n\
         [upstreams.app]\nservers = [\"{}\"]\n",
        tls_listener(&site, ""),
        origin.addr
    );
    let proxy = Proxy::start(&toml).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"PROXY TCP4 203.0.113.77 127.0.0.1 5555 443\r\n")
        .await
        .unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_config(Some(&site), &[b"http/1.1"]))
        .connect(ServerName::try_from("shop.example.com").unwrap(), tcp)
        .await
        .expect("TLS after the PROXY header");
    tls.write_all(b"GET /pp-tls HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
    let seen = &origin.requests()[0].headers;
    assert_eq!(seen["x-forwarded-for"], "203.0.113.77");
    assert_eq!(seen["x-forwarded-proto"], "https");
    proxy.stop().await;
}
