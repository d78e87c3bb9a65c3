//! The signing CA (docs/spec.md §3): rotation with a trust bridge, hard reset, restart
//! in the middle of a rotation, a signing-key that cannot be used, the CA's key algorithm.

mod bridge;
mod progress;
mod reset;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;

use crate::support::tls::{self, TlsServer};
use crate::support::{Env, T, certs, data};

async fn signing_key(env: &Env) -> Secret {
    env.op_secrets().get("signing-key").await.unwrap()
}

/// Puts in `signing-key`, before the operator starts, a CA like the one the operator
/// makes (RSA-2048, `lifetime`) but created `age` ago: its scheduled rotation and its
/// expiry come `age` sooner than for a CA made at start-up, and nothing else differs.
async fn aged_ca(env: &Env, lifetime: Duration, age: Duration) {
    use service_ca_operator::pki;
    let created = time::OffsetDateTime::now_utc() - age;
    let policy = pki::CaPolicy { lifetime, rotate_before: Duration::from_secs(1) };
    let ca = pki::CertificateAuthority::create(pki::PrivateKey::generate_rsa(2048).unwrap(), created, &policy).unwrap();
    let data = ca.to_secret_data().into_iter().map(|(k, v)| (k, k8s_openapi::ByteString(v))).collect();
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("signing-key".into()), ..Default::default() },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    };
    env.op_secrets().create(&kube::api::PostParams::default(), &secret).await.unwrap();
}

/// A TLS server that follows its Secret like a pod does: it reloads a little while
/// after the Secret changes (kubelet and the application take time to catch up).
struct FollowingServer {
    server: Arc<TlsServer>,
    serving: Arc<Mutex<String>>,
}

impl FollowingServer {
    async fn start(env: &Env, secret: &str, lag: Duration) -> FollowingServer {
        let s = env.serving_secret(secret, T).await;
        let server = Arc::new(TlsServer::start(&data(&s, "tls.crt"), &data(&s, "tls.key")));
        let serving = Arc::new(Mutex::new(data(&s, "tls.crt")));
        let (api, name, srv, cur) = (env.secrets(), secret.to_string(), server.clone(), serving.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let Ok(s) = api.get(&name).await else { continue };
                let crt = data(&s, "tls.crt");
                if crt != *cur.lock().unwrap() {
                    tokio::time::sleep(lag).await;
                    let s = api.get(&name).await.unwrap_or(s);
                    srv.reload(&data(&s, "tls.crt"), &data(&s, "tls.key"));
                    *cur.lock().unwrap() = data(&s, "tls.crt");
                }
            }
        });
        FollowingServer { server, serving }
    }
}

#[derive(Default)]
struct Tally {
    handshakes: usize,
    failures: Vec<String>,
    /// (leaf signed by the newest CA?, client has the newest bundle?)
    combos: BTreeSet<(bool, bool)>,
}

/// Handshakes in a loop from a client that keeps `held` and a client that always has
/// the latest published bundle, until `until` says stop; records which leaf was served.
async fn handshake_loop(
    env: &Env,
    servers: &[(&FollowingServer, String)],
    held: String,
    newest_ca: impl Fn() -> Option<Vec<u8>>,
    stop: impl Fn() -> bool,
) -> Tally {
    let mut tally = Tally::default();
    while !stop() {
        let latest = env.ca_bundle().await;
        for (server, name) in servers {
            for (fresh, bundle) in [(false, &held), (true, &latest)] {
                let serving = server.serving.lock().unwrap().clone();
                let result = tls::rustls_connect(server.server.port, bundle, name);
                tally.handshakes += 1;
                match result {
                    Ok(()) => {
                        let new_leaf = newest_ca().is_some_and(|ski| certs::signer_of(&serving) == ski);
                        let new_bundle = fresh && latest != held;
                        tally.combos.insert((new_leaf, new_bundle));
                    }
                    Err(e) => tally.failures.push(format!("{name} fresh={fresh}: {e}")),
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tally
}

/// All three stacks agree for one (server, bundle, name).
fn all_stacks(port: u16, bundle: &str, name: &str) {
    for (stack, result) in tls::connect_all(port, bundle, name) {
        result.unwrap_or_else(|e| panic!("{stack} failed for {name}: {e}"));
    }
}
