//! The CA key in a PKCS#11 token (`--ca-key-pkcs11-uri`, `--pkcs11-module`,
//! `--pkcs11-pin-file`): one logged-in session per replica, opened on first use and
//! reopened after it is lost, with backoff. Only ECDSA keys (P-256, P-384) are made
//! and used; they are generated inside the token, marked sensitive and not
//! extractable, and never leave it: the operator only asks the token to sign digests.
//!
//! Every failure carries a [`TokenProblem`] (readiness says which) and a detail made
//! of PKCS#11 return codes and labels, never the PIN.

mod flags;
mod key;
mod sweep;
mod uri;

pub use flags::Pkcs11Flags;
pub use key::{GENERATED_ID_PREFIX, TokenKey};
pub use sweep::{InUse, OnReset};
pub use uri::KeyUri;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use sha2::Digest;

/// Why the token cannot be used, as readiness reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenProblem {
    /// No token with the label of `--ca-key-pkcs11-uri` in the module's slots.
    Absent,
    /// The token refused the PIN of `--pkcs11-pin-file` (or it is locked).
    PinRefused,
    /// The key `signing-key` names is not in the token.
    KeyMissing,
    /// Anything else the token or module answered (a lost device, a failed operation).
    Unavailable,
    /// The configuration and `signing-key` disagree (a key kind the token path does not
    /// support, a reference to another token, an unreadable PIN file).
    Misconfigured,
}

impl TokenProblem {
    /// The reason `/readyz` gives.
    pub fn readiness(self) -> &'static str {
        match self {
            TokenProblem::Absent => "the PKCS#11 token of --ca-key-pkcs11-uri is absent",
            TokenProblem::PinRefused => "the PKCS#11 token refuses the PIN of --pkcs11-pin-file",
            TokenProblem::KeyMissing => "the CA key named in signing-key is missing from the PKCS#11 token",
            TokenProblem::Unavailable => "the PKCS#11 token cannot be used (see the operator log)",
            TokenProblem::Misconfigured => "the PKCS#11 key configuration is not usable (see the operator log)",
        }
    }
}

/// A failure of the token, with what readiness says and the details for the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", problem.readiness())]
pub struct TokenError {
    pub problem: TokenProblem,
    pub detail: String,
}

impl TokenError {
    pub fn new(problem: TokenProblem, detail: impl Into<String>) -> Self {
        TokenError { problem, detail: detail.into() }
    }
}

/// Told each time the token's state changes: the problem, or `None` when it works.
pub type Reporter = Box<dyn Fn(Option<TokenProblem>) + Send + Sync>;

/// The longest wait between two attempts to open a session.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The token of `--ca-key-pkcs11-uri`, opened through `--pkcs11-module`.
pub struct Token {
    pkcs11: Pkcs11,
    /// The token and the label of the keys the operator generates (no id).
    uri: KeyUri,
    pin_file: PathBuf,
    state: Mutex<State>,
    report: Reporter,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", self.uri.render())
    }
}

#[derive(Default)]
struct State {
    session: Option<Session>,
    /// Private-key handles found in this session, by (label, id).
    handles: HashMap<(String, Vec<u8>), ObjectHandle>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<TokenError>,
    /// SHA-256 of a PIN the token refused: not tried again (a token locks itself after
    /// a few wrong PINs) until the PIN file holds another.
    refused_pin: Option<[u8; 32]>,
}

/// A failed operation inside a session.
enum Failure {
    Ck(&'static str, CkError),
    Token(TokenError),
}

impl From<TokenError> for Failure {
    fn from(error: TokenError) -> Self {
        Failure::Token(error)
    }
}

impl Token {
    /// Loads the module and reads the URI; opens no session yet (the first use does,
    /// so that an absent token or a refused PIN is a readiness reason, not a crash).
    pub fn open(module: &std::path::Path, uri: &str, pin_file: PathBuf, report: Reporter) -> Result<Self, String> {
        let uri = KeyUri::parse(uri).map_err(|e| format!("--ca-key-pkcs11-uri: {e}"))?;
        if uri.id.is_some() {
            return Err("--ca-key-pkcs11-uri: give the token and the key label only; the id of the key in use \
                        is recorded in signing-key"
                .into());
        }
        let pkcs11 = Pkcs11::new(module)
            .map_err(|e| format!("--pkcs11-module {}: cannot load the module: {e}", module.display()))?;
        pkcs11
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
            .map_err(|e| format!("--pkcs11-module {}: C_Initialize failed: {}", module.display(), ck_detail(&e)))?;
        Ok(Token { pkcs11, uri, pin_file, state: Mutex::new(State::default()), report })
    }

    /// The token and key label of the flag.
    pub fn uri(&self) -> &KeyUri {
        &self.uri
    }

    /// Runs `op` in the session, opening it first if needed; an operation that finds
    /// the session gone is retried once in a new one.
    fn with_session<T>(
        &self,
        mut op: impl FnMut(&Session, &mut HashMap<(String, Vec<u8>), ObjectHandle>) -> Result<T, Failure>,
    ) -> Result<T, TokenError> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| TokenError::new(TokenProblem::Unavailable, "an earlier operation on the token panicked"))?;
        let mut reconnected = false;
        loop {
            if state.session.is_none() {
                self.connect(&mut state)?;
            }
            let State { session, handles, .. } = &mut *state;
            let Some(session) = session.as_ref() else {
                return Err(TokenError::new(TokenProblem::Unavailable, "no session"));
            };
            let error = match op(session, handles) {
                Ok(value) => {
                    self.settle(&mut state, None);
                    return Ok(value);
                }
                Err(Failure::Ck(what, error)) if lost_session(&error) && !reconnected => {
                    tracing::warn!(error = %ck_detail(&error), "the PKCS#11 session was lost during {what}; reconnecting");
                    state.session = None;
                    state.handles.clear();
                    reconnected = true;
                    continue;
                }
                Err(Failure::Ck(what, error)) => {
                    TokenError::new(TokenProblem::Unavailable, format!("{what}: {}", ck_detail(&error)))
                }
                Err(Failure::Token(error)) => error,
            };
            if lost_problem(&error) {
                state.session = None;
                state.handles.clear();
            }
            self.settle(&mut state, Some(&error));
            return Err(error);
        }
    }

    /// Records the outcome and tells the reporter when it changes.
    fn settle(&self, state: &mut State, error: Option<&TokenError>) {
        if state.last_error.as_ref() != error {
            (self.report)(error.map(|e| e.problem));
            match error {
                Some(error) => tracing::error!(%error, "the CA key's PKCS#11 token failed"),
                None if state.last_error.is_some() => tracing::info!("the CA key's PKCS#11 token works again"),
                None => {}
            }
            state.last_error = error.cloned();
        }
    }

    /// Opens and logs in a session, unless the last attempt failed too recently.
    fn connect(&self, state: &mut State) -> Result<(), TokenError> {
        if let (Some(at), Some(last)) = (state.retry_at, &state.last_error)
            && Instant::now() < at
        {
            let wait = at.saturating_duration_since(Instant::now());
            return Err(TokenError::new(last.problem, format!("{}; next attempt in {}s", last.detail, wait.as_secs())));
        }
        match self.login(state) {
            Ok(session) => {
                state.session = Some(session);
                state.failures = 0;
                state.retry_at = None;
                Ok(())
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                let exponent = state.failures.min(6);
                let delay = Duration::from_secs(1u64.checked_shl(exponent).unwrap_or(64)).min(MAX_BACKOFF);
                state.retry_at = Instant::now().checked_add(delay);
                self.settle(state, Some(&error));
                Err(error)
            }
        }
    }

    fn login(&self, state: &mut State) -> Result<Session, TokenError> {
        let ck =
            |what: &str, e: CkError| TokenError::new(TokenProblem::Unavailable, format!("{what}: {}", ck_detail(&e)));
        let slots = self.pkcs11.get_slots_with_token().map_err(|e| ck("listing the slots", e))?;
        let mut labels = Vec::new();
        let mut found = None;
        for slot in slots {
            let info = self.pkcs11.get_token_info(slot).map_err(|e| ck("reading a token's label", e))?;
            let label = info.label().trim_end().to_string();
            if label == self.uri.token {
                found = Some(slot);
                break;
            }
            labels.push(crate::bounded(&label).into_owned());
        }
        let Some(slot) = found else {
            let seen = if labels.is_empty() { "none".into() } else { labels.join(", ") };
            let detail = format!("no token labelled {:?} in the module (tokens present: {seen})", self.uri.token);
            return Err(TokenError::new(TokenProblem::Absent, detail));
        };
        let pin = std::fs::read_to_string(&self.pin_file).map_err(|e| {
            let detail = format!("cannot read the PIN file {}: {}", self.pin_file.display(), e.kind());
            TokenError::new(TokenProblem::Misconfigured, detail)
        })?;
        let pin = pin.trim_end_matches(['\r', '\n']).to_string();
        let digest: [u8; 32] = sha2::Sha256::digest(pin.as_bytes()).into();
        if state.refused_pin == Some(digest) {
            let detail = "the token refused this PIN before; it is not tried again until the PIN file changes";
            return Err(TokenError::new(TokenProblem::PinRefused, detail));
        }
        let session = self.pkcs11.open_rw_session(slot).map_err(|e| ck("opening a session", e))?;
        match session.login(UserType::User, Some(&AuthPin::from(pin))) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(CkError::Pkcs11(rv @ (RvError::PinIncorrect | RvError::PinLocked | RvError::PinExpired), _)) => {
                state.refused_pin = Some(digest);
                Err(TokenError::new(TokenProblem::PinRefused, format!("C_Login answered {rv:?}")))
            }
            Err(e) => Err(ck("logging in", e)),
        }
    }
}

/// The session (or the device under it) is gone: a new session may work.
fn lost_session(error: &CkError) -> bool {
    matches!(
        error,
        CkError::Pkcs11(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::CryptokiNotInitialized,
            _
        )
    )
}

/// After these the session is dropped, so that the next use starts afresh.
fn lost_problem(error: &TokenError) -> bool {
    matches!(error.problem, TokenProblem::Unavailable | TokenProblem::Absent)
}

/// A PKCS#11 error as the function and the return code, e.g. `Sign: DeviceRemoved`.
fn ck_detail(error: &CkError) -> String {
    match error {
        CkError::Pkcs11(rv, function) => format!("{function:?}: {rv:?}"),
        other => other.to_string(),
    }
}
