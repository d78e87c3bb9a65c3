//! Real TLS for tests: a rustls server on 127.0.0.1 that serves whatever certificate it
//! currently holds, and three independent clients (rustls, OpenSSL's `s_client`, Go's
//! crypto/tls) that trust only a given CA bundle and check the server name.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().expect("PEM certificates")
}

fn roots(bundle_pem: &str) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(bundle_pem) {
        roots.add(cert).expect("bundle certificate accepted as trust anchor");
    }
    Arc::new(roots)
}

/// A TLS server whose certificate can be swapped while it runs (like a pod that
/// reloads its mounted Secret).
pub struct TlsServer {
    pub port: u16,
    identity: Arc<Mutex<Arc<rustls::ServerConfig>>>,
}

impl TlsServer {
    pub fn start(chain_pem: &str, key_pem: &str) -> TlsServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local addr").port();
        let identity = Arc::new(Mutex::new(server_config(chain_pem, key_pem)));
        let shared = identity.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let config = shared.lock().expect("server config lock").clone();
                std::thread::spawn(move || serve(stream, config));
            }
        });
        TlsServer { port, identity }
    }

    /// Serve a new certificate from the next connection on.
    pub fn reload(&self, chain_pem: &str, key_pem: &str) {
        *self.identity.lock().expect("server config lock") = server_config(chain_pem, key_pem);
    }
}

fn server_config(chain_pem: &str, key_pem: &str) -> Arc<rustls::ServerConfig> {
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("PEM private key");
    Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(certs(chain_pem), key)
            .expect("server certificate and key"),
    )
}

fn serve(mut tcp: TcpStream, config: Arc<rustls::ServerConfig>) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut conn) = rustls::ServerConnection::new(config) else { return };
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let _ = tls.write_all(b"ok\n");
    let _ = tls.flush();
    let mut sink = [0u8; 64];
    let _ = tls.read(&mut sink);
}

/// An HTTPS server answering every request with `200` and a fixed JSON body — enough
/// to stand in for an aggregated API server's discovery endpoint.
pub struct HttpsServer {
    pub port: u16,
}

impl HttpsServer {
    pub fn start(chain_pem: &str, key_pem: &str, body: String) -> HttpsServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local addr").port();
        let config = server_config(chain_pem, key_pem);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (config, body) = (config.clone(), body.clone());
                std::thread::spawn(move || answer_http(stream, config, &body));
            }
        });
        HttpsServer { port }
    }
}

fn answer_http(mut tcp: TcpStream, config: Arc<rustls::ServerConfig>, body: &str) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(mut conn) = rustls::ServerConnection::new(config) else { return };
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    // Requests without a body: read up to the blank line, answer, close.
    let mut request = Vec::new();
    let mut byte = [0u8; 1];
    while !request.ends_with(b"\r\n\r\n") && request.len() < 64 * 1024 {
        match tls.read(&mut byte) {
            Ok(1) => request.push(byte[0]),
            _ => return,
        }
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(response.as_bytes());
    let _ = tls.flush();
}

/// A rustls client connection to 127.0.0.1:`port` that trusts only `bundle_pem` and
/// checks `server_name` (the handshake happens on first use).
fn rustls_client(
    port: u16,
    bundle_pem: &str,
    server_name: &str,
) -> Result<(rustls::ClientConnection, TcpStream), String> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(bundle_pem))
        .with_no_client_auth();
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    Ok((conn, tcp))
}

/// rustls client: handshake with the server at `port`, trusting `bundle_pem`.
pub fn rustls_connect(port: u16, bundle_pem: &str, server_name: &str) -> Result<(), String> {
    let (mut conn, mut tcp) = rustls_client(port, bundle_pem, server_name)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let mut line = [0u8; 3];
    tls.read_exact(&mut line).map_err(|e| e.to_string())?;
    Ok(())
}

/// rustls client: `GET path` over HTTPS at `port`, trusting only `bundle_pem` and
/// checking `server_name`, with `token` as the bearer token; (status, body), or why
/// the handshake or the exchange failed.
pub fn rustls_https_get(
    port: u16,
    bundle_pem: &str,
    server_name: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let (mut conn, mut tcp) = rustls_client(port, bundle_pem, server_name)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {server_name}\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response) {
        Ok(_) => {}
        // A server that closes without close_notify still sent its whole response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e.to_string()),
    }
    let text = String::from_utf8_lossy(&response).to_string();
    let status =
        text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(format!("no HTTP status in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// rustls/webpki verification of a presented chain at an arbitrary instant, without a
/// connection (the same verifier a rustls client runs during the handshake).
pub fn rustls_verify_at(chain_pem: &str, bundle_pem: &str, server_name: &str, at: SystemTime) -> Result<(), String> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots(bundle_pem), provider())
        .build()
        .map_err(|e| e.to_string())?;
    let chain = certs(chain_pem);
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let now = UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).map_err(|e| e.to_string())?);
    use rustls::client::danger::ServerCertVerifier;
    verifier.verify_server_cert(&chain[0], &chain[1..], &name, &[], now).map(|_| ()).map_err(|e| e.to_string())
}

/// A scratch directory for PEM files handed to external tools.
pub fn scratch_dir() -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tls-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write scratch file");
    path
}

fn tool_result(what: &str, out: std::io::Result<std::process::Output>) -> Result<(), String> {
    let out = out.unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// OpenSSL client: `openssl s_client` with hostname verification and a hard failure on
/// any verification error.
pub fn openssl_connect(port: u16, bundle_pem: &str, server_name: &str) -> Result<(), String> {
    let dir = scratch_dir();
    let ca = write(&dir, "bundle.pem", bundle_pem);
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", server_name])
        .args(["-verify_hostname", server_name, "-verify_return_error", "-brief", "-CAfile"])
        .arg(&ca)
        .stdin(std::process::Stdio::null())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    tool_result("openssl (install the openssl package)", out)
}

/// `openssl verify` of a chain (leaf first; the rest passed as untrusted intermediates).
pub fn openssl_verify(chain_pem: &str, bundle_pem: &str, server_name: &str) -> Result<(), String> {
    let dir = scratch_dir();
    let chain = certs(chain_pem);
    let leaf = write(&dir, "leaf.pem", &pem_of(&chain[..1]));
    let ca = write(&dir, "bundle.pem", bundle_pem);
    let mut cmd = Command::new("openssl");
    cmd.args(["verify", "-purpose", "sslserver", "-verify_hostname", server_name, "-CAfile"]).arg(&ca);
    if chain.len() > 1 {
        cmd.arg("-untrusted").arg(write(&dir, "untrusted.pem", &pem_of(&chain[1..])));
    }
    let out = cmd.arg(&leaf).output();
    let _ = std::fs::remove_dir_all(&dir);
    tool_result("openssl (install the openssl package)", out)
}

fn pem_of(certs: &[CertificateDer<'_>]) -> String {
    service_ca_operator::pki::pem::encode_certificates(certs.iter().map(|c| c.as_ref()))
}

/// The Go crypto/tls client (tests/tlsclient), built once per test process.
fn go_client() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tlsclient");
        let bin = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tlsclient");
        let out = Command::new("go")
            .args(["build", "-o"])
            .arg(&bin)
            .arg(".")
            .current_dir(&src)
            .env("GOTOOLCHAIN", "local")
            .env("CGO_ENABLED", "0")
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `go` to build the Go TLS client ({e}); install Go 1.26 (https://go.dev/dl)")
            });
        assert!(out.status.success(), "building tests/tlsclient failed:\n{}", String::from_utf8_lossy(&out.stderr));
        bin
    })
}

/// Go client: a real crypto/tls handshake.
pub fn go_connect(port: u16, bundle_pem: &str, server_name: &str) -> Result<(), String> {
    let dir = scratch_dir();
    let ca = write(&dir, "bundle.pem", bundle_pem);
    let out = Command::new(go_client())
        .args(["-addr", &format!("127.0.0.1:{port}"), "-name", server_name, "-ca"])
        .arg(&ca)
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    tool_result("the Go TLS client", out)
}

/// Go's x509 chain verification of a chain file (no connection).
pub fn go_verify(chain_pem: &str, bundle_pem: &str, server_name: &str) -> Result<(), String> {
    let dir = scratch_dir();
    let ca = write(&dir, "bundle.pem", bundle_pem);
    let chain = write(&dir, "chain.pem", chain_pem);
    let out = Command::new(go_client()).args(["-verify", "-name", server_name, "-ca"]).arg(&ca).arg(&chain).output();
    let _ = std::fs::remove_dir_all(&dir);
    tool_result("the Go TLS client", out)
}

/// Handshakes with every client stack; returns each stack's result.
pub fn connect_all(port: u16, bundle_pem: &str, server_name: &str) -> [(&'static str, Result<(), String>); 3] {
    [
        ("rustls", rustls_connect(port, bundle_pem, server_name)),
        ("openssl", openssl_connect(port, bundle_pem, server_name)),
        ("go", go_connect(port, bundle_pem, server_name)),
    ]
}

/// A TLS server in another stack (OpenSSL's `s_server`, or Go's crypto/tls through
/// tests/tlsclient), loading the chain and key from PEM files the way that stack's
/// servers do. Killed on drop.
pub struct ExternalServer {
    pub stack: &'static str,
    pub port: u16,
    child: std::process::Child,
    dir: PathBuf,
}

impl ExternalServer {
    /// `openssl s_server` with the leaf, the rest of the chain and the key.
    pub fn openssl(chain_pem: &str, key_pem: &str) -> Result<ExternalServer, String> {
        let dir = scratch_dir();
        let chain = certs(chain_pem);
        let leaf = write(&dir, "leaf.pem", &pem_of(&chain[..1]));
        let rest = write(&dir, "rest.pem", &pem_of(&chain[1..]));
        let key = write(&dir, "key.pem", key_pem);
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-accept", &format!("127.0.0.1:{port}"), "-cert"])
            .arg(&leaf)
            .arg("-cert_chain")
            .arg(&rest)
            .arg("-key")
            .arg(&key)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run openssl s_server: {e}"))?;
        let mut server = ExternalServer { stack: "openssl s_server", port, child, dir };
        server.wait_listening()?;
        Ok(server)
    }

    /// A Go crypto/tls server (`tls.LoadX509KeyPair`).
    pub fn go(chain_pem: &str, key_pem: &str) -> Result<ExternalServer, String> {
        let dir = scratch_dir();
        let chain = write(&dir, "chain.pem", chain_pem);
        let key = write(&dir, "key.pem", key_pem);
        let mut child = Command::new(go_client())
            .arg("-serve")
            .arg("-cert")
            .arg(&chain)
            .arg("-key")
            .arg(&key)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run the Go TLS server: {e}"))?;
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map_err(|e| e.to_string())?;
        let port = match line.trim().parse() {
            Ok(port) => port,
            Err(_) => {
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                return Err(format!("Go server did not start: {}", String::from_utf8_lossy(&out.stderr)));
            }
        };
        Ok(ExternalServer { stack: "go crypto/tls server", port, child, dir })
    }

    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let mut err = String::new();
                if let Some(mut stderr) = self.child.stderr.take() {
                    let _ = stderr.read_to_string(&mut err);
                }
                return Err(format!("{} exited: {err}", self.stack));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("{} did not listen on {}", self.stack, self.port))
    }
}

impl Drop for ExternalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// rustls client: only the handshake (for servers that do not write first).
pub fn rustls_handshake(port: u16, bundle_pem: &str, server_name: &str) -> Result<(), String> {
    let (mut conn, mut tcp) = rustls_client(port, bundle_pem, server_name)?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The serving pair loaded as a server by each stack (rustls, OpenSSL, Go), and every
/// client stack handshaking with each, trusting `bundle_pem`: the failures, as
/// "server ← client: why" (empty when every one of the 9 handshakes succeeded).
pub fn serve_in_every_stack(chain_pem: &str, key_pem: &str, bundle_pem: &str, server_name: &str) -> Vec<String> {
    let mut failures = Vec::new();
    let rustls_server = TlsServer::start(chain_pem, key_pem);
    let mut servers: Vec<(&str, u16, Option<ExternalServer>)> = vec![("rustls server", rustls_server.port, None)];
    for started in [ExternalServer::openssl(chain_pem, key_pem), ExternalServer::go(chain_pem, key_pem)] {
        match started {
            Ok(server) => servers.push((server.stack, server.port, Some(server))),
            Err(e) => failures.push(format!("server did not load the pair: {e}")),
        }
    }
    for (stack, port, _server) in &servers {
        let clients = [
            ("rustls", rustls_handshake(*port, bundle_pem, server_name)),
            ("openssl", openssl_connect(*port, bundle_pem, server_name)),
            ("go", go_connect(*port, bundle_pem, server_name)),
        ];
        for (client, result) in clients {
            if let Err(e) = result {
                failures.push(format!("{stack} <- {client}: {e}"));
            }
        }
    }
    failures
}
