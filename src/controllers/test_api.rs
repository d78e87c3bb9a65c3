//! A stubbed API server for the unit tier of the write branches (HTTP 409, 403, 422,
//! 413, ...): a [`kube::Client`] over a `tower` service that answers every request
//! from a function of its method and path, and records the requests it saw; and a
//! [`Context`] over that client. Tests only.

use std::sync::{Arc, Mutex};

use clap::Parser;
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{Value, json};
use time::OffsetDateTime;

use super::Context;
use super::events::Recorder;
use super::sharing::Sharing;
use crate::admin::Health;
use crate::config::{Cli, Mode};
use crate::keypool::KeyPool;
use crate::metrics::Metrics;
use crate::pki::{CaPolicy, CertificateAuthority, KeyKind, PrivateKey};
use crate::signer::{Signer, SignerHandle};

/// The requests the stub answered: method and path (without the query), in order.
#[derive(Clone, Default)]
pub struct Seen(Arc<Mutex<Vec<(Method, String)>>>);

impl Seen {
    /// How many requests had this method and a path ending with `suffix`.
    pub fn count(&self, method: Method, suffix: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|(m, p)| *m == method && p.ends_with(suffix)).count()
    }

    pub fn all(&self) -> Vec<(Method, String)> {
        self.0.lock().unwrap().clone()
    }
}

/// A client whose every request gets `answer(method, path)`: a status and a JSON body.
pub fn client(answer: impl Fn(&Method, &str) -> (u16, Value) + Send + Sync + 'static) -> (kube::Client, Seen) {
    let seen = Seen::default();
    let log = seen.clone();
    let service = tower::service_fn(move |request: Request<Body>| {
        let (method, path) = (request.method().clone(), request.uri().path().to_string());
        let (status, body) = answer(&method, &path);
        log.0.lock().unwrap().push((method, path));
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string().into_bytes()));
        async move { response }
    });
    (kube::Client::new(service, "default"), seen)
}

/// The API server's answer for a failed request: a `Status` with this code.
pub fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    let status = json!({ "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                         "message": message, "reason": reason, "code": code });
    (code, status)
}

/// A created Event (what the API server answers an Event POST with).
pub fn event_created() -> (u16, Value) {
    let event = json!({ "apiVersion": "events.k8s.io/v1", "kind": "Event",
                        "metadata": { "name": "e", "namespace": "default" },
                        "eventTime": "2026-01-01T00:00:00.000000Z" });
    (201, event)
}

/// The operator's context over `client`, with the default configuration, no key
/// buffer and no CA loaded.
pub fn context(client: kube::Client) -> Context {
    let Mode::Run(config) = Cli::try_parse_from(["service-ca-operator"]).unwrap().into_mode() else {
        panic!("the default command line runs the operator")
    };
    let metrics = Arc::new(Metrics::new(None));
    Context {
        keys: KeyPool::new(1, 0, KeyKind::EcdsaP256, metrics.keys_generated.clone()),
        signer: SignerHandle::default(),
        recorder: Recorder::new(client.clone(), "service-ca-operator", "test"),
        health: Arc::new(Health::default()),
        sharing: Sharing::off(),
        ca_token: None,
        written: Default::default(),
        metrics,
        config: *config,
        client,
    }
}

/// Loads a new CA (ECDSA, so that it is quick) into the context's signer.
pub fn load_ca(ctx: &Context) {
    let now = OffsetDateTime::now_utc();
    let policy = CaPolicy {
        lifetime: std::time::Duration::from_secs(86_400 * 30),
        rotate_before: std::time::Duration::from_secs(86_400),
    };
    let ca = CertificateAuthority::create(PrivateKey::generate(KeyKind::EcdsaP256).unwrap(), now, &policy).unwrap();
    ctx.signer.publish(Signer::new(ca, now));
}
