//! Bearer-token authentication, the pure part: the tokens file, token
//! hashing, constant-time lookup, roles and what each role may call.
//! orchd's gRPC interceptor and REST middleware both go through
//! [`Authenticator::authorize`], so the two surfaces cannot disagree.
//!
//! # The tokens file
//!
//! One token per line, `name:role:namespace:sha256hex`:
//!
//! ```text
//! # comments and blank lines are ignored
//! alice:client:default:2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae
//! worker-1:worker:default:fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9
//! ```
//!
//! * `name`: who the token belongs to; recorded in the history of the jobs
//!   it submits or cancels. Letters, digits, `.`, `_`, `-`, `@`; 1 to 64
//!   characters; unique in the file.
//! * `role`: `client` (JobService only), `worker` (WorkerService only) or
//!   `admin` (both).
//! * `namespace`: the tenant. Jobs belong to the namespace of the token
//!   that submitted them; a client or worker token sees only its
//!   namespace's jobs and queues (another namespace's job answers NOT_FOUND).
//!   An admin token sees every namespace. A DNS label (`[a-z][a-z0-9-]*`).
//! * `sha256hex`: the SHA-256 of the token, 64 hex digits. The token itself
//!   is never stored; `orchd token new` prints a fresh token and its line.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rand::TryRngCore;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::error::Error;

/// Namespace of tokens created without one, and of the anonymous caller.
pub const DEFAULT_NAMESPACE: &str = "default";
/// Prefix of generated tokens, so that a leaked one is recognisable.
pub const TOKEN_PREFIX: &str = "orch_";
const MAX_NAME_LEN: usize = 64;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Submits, reads, lists, cancels and watches jobs (JobService).
    Client,
    /// Runs jobs (WorkerService).
    Worker,
    /// Everything.
    Admin,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 3] = [Role::Client, Role::Worker, Role::Admin];

    /// `client`, `worker` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Worker => "worker",
            Role::Admin => "admin",
        }
    }

    /// The role named `name` (lower case).
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// Whether this role may call `api`.
    pub fn may_call(self, api: Api) -> bool {
        matches!(
            (self, api),
            (Role::Admin, _) | (Role::Client, Api::Jobs) | (Role::Worker, Api::Workers)
        )
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protected APIs. Health, reflection, `/healthz` and `/openapi.json`
/// are open and not listed here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `orchestrator.v1.JobService` and its REST routes: client or admin.
    Jobs,
    /// `orchestrator.v1.WorkerService`: worker or admin.
    Workers,
}

impl Api {
    /// The service's proto name.
    pub fn name(self) -> &'static str {
        match self {
            Api::Jobs => "JobService",
            Api::Workers => "WorkerService",
        }
    }
}

/// Who is calling: the token's name, role and namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's name; empty for the anonymous caller.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Its namespace: the only one it sees, unless it is an admin.
    pub namespace: String,
}

impl Caller {
    /// The caller when authentication is off: may do everything, and is
    /// recorded as nobody.
    pub fn anonymous() -> Caller {
        Caller {
            name: String::new(),
            role: Role::Admin,
            namespace: DEFAULT_NAMESPACE.into(),
        }
    }

    /// Whether this is [`Caller::anonymous`].
    pub fn is_anonymous(&self) -> bool {
        self.name.is_empty()
    }

    /// The name to record in a job's history, if any.
    pub fn actor(&self) -> Option<&str> {
        (!self.name.is_empty()).then_some(self.name.as_str())
    }

    /// Whether the caller may see jobs of `namespace`. Callers that may not
    /// are answered NOT_FOUND, so that ids leak nothing across tenants.
    pub fn sees(&self, namespace: &str) -> bool {
        self.role == Role::Admin || self.namespace == namespace
    }

    /// The one namespace the caller is confined to; `None` for an admin.
    pub fn confined_to(&self) -> Option<&str> {
        (self.role != Role::Admin).then_some(self.namespace.as_str())
    }

    /// The namespace a request works in: the caller's own when `requested`
    /// is empty; another one only for an admin.
    pub fn namespace_for(&self, requested: &str) -> Result<String, Error> {
        if requested.is_empty() || requested == self.namespace {
            return Ok(self.namespace.clone());
        }
        if self.role == Role::Admin {
            crate::validate::namespace("namespace", requested)?;
            return Ok(requested.to_owned());
        }
        Err(Error::PermissionDenied(format!(
            "token {:?} belongs to namespace {:?} and may not use namespace {requested:?}",
            self.name, self.namespace
        )))
    }
}

/// The client side: a tonic interceptor that sends `authorization: Bearer
/// <token>` with every call, or nothing without a token. orchctl,
/// orch-worker and the tests all send credentials through it. The value is
/// marked sensitive and `Debug` does not show it.
#[derive(Clone, Default)]
pub struct BearerAuth(Option<tonic::metadata::AsciiMetadataValue>);

impl BearerAuth {
    /// Credentials for `token`; none for `None` or a blank token. Fails
    /// when the token cannot be sent in a header (not printable ASCII); the
    /// error does not repeat it.
    pub fn new(token: Option<&str>) -> Result<BearerAuth, Error> {
        let Some(token) = token.map(str::trim).filter(|t| !t.is_empty()) else {
            return Ok(BearerAuth(None));
        };
        let mut value = tonic::metadata::AsciiMetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| {
                Error::invalid(
                    "token",
                    "contains characters that cannot be sent in a header (printable ASCII only)",
                )
            })?;
        value.set_sensitive(true);
        Ok(BearerAuth(Some(value)))
    }

    /// Sends exactly `value` as the `authorization` header (or none): for
    /// tests of malformed credentials.
    pub fn raw(value: Option<tonic::metadata::AsciiMetadataValue>) -> BearerAuth {
        BearerAuth(value)
    }
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BearerAuth")
            .field(&self.0.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// One line of the tokens file: a name, a role, a namespace and the
/// SHA-256 of the token.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// Who the token belongs to.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Its namespace.
    pub namespace: String,
    hash: [u8; 32],
}

impl fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenEntry")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl TokenEntry {
    /// The entry of `token`. Fails when the name or namespace is not valid
    /// in the file.
    pub fn for_token(name: &str, role: Role, namespace: &str, token: &str) -> Result<Self, String> {
        check_name("name", name)?;
        check_namespace(namespace)?;
        Ok(TokenEntry {
            name: name.into(),
            role,
            namespace: namespace.into(),
            hash: hash_token(token),
        })
    }

    /// The line of the tokens file for this entry.
    pub fn line(&self) -> String {
        format!(
            "{}:{}:{}:{}",
            self.name,
            self.role,
            self.namespace,
            hex::encode(self.hash)
        )
    }

    /// The caller this entry authenticates.
    pub fn caller(&self) -> Caller {
        Caller {
            name: self.name.clone(),
            role: self.role,
            namespace: self.namespace.clone(),
        }
    }
}

fn check_namespace(value: &str) -> Result<(), String> {
    crate::validate::namespace("namespace", value).map_err(|e| e.to_string())
}

fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(format!(
            "{what} must be 1 to {MAX_NAME_LEN} characters, got {}",
            value.len()
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(format!(
            "{what} {value:?} contains {bad:?}; use letters, digits, '.', '_', '-' or '@'"
        ));
    }
    Ok(())
}

/// SHA-256 of a token.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A fresh random token: `orch_` and 64 hex digits (256 bits from the
/// operating system's CSPRNG).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the operating system's random number generator works");
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// A tokens file that could not be read or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", line.map(|n| format!("line {n}: ")).unwrap_or_default())]
pub struct TokenFileError {
    /// 1-based line of the problem, when it is on one line.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

/// The accepted tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<TokenEntry>,
}

impl Tokens {
    /// Parses a tokens file (format in the module docs). Every bad line is
    /// an error naming its number; a file without any token is one too.
    pub fn parse(text: &str) -> Result<Tokens, TokenFileError> {
        let mut tokens = Tokens::default();
        let mut lines_of: Vec<usize> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |message: String| TokenFileError {
                line: Some(n),
                message,
            };
            let fields: Vec<&str> = line.split(':').collect();
            let [name, role, namespace, hash] = fields[..] else {
                return Err(err(format!(
                    "expected name:role:namespace:sha256hex (4 fields), got {} field(s)",
                    fields.len()
                )));
            };
            check_name("name", name).map_err(err)?;
            check_namespace(namespace).map_err(err)?;
            let role = Role::parse(role).ok_or_else(|| {
                err(format!(
                    "unknown role {role:?}; one of client, worker, admin"
                ))
            })?;
            let mut digest = [0u8; 32];
            if hash.len() != 64 || hex::decode_to_slice(hash, &mut digest).is_err() {
                return Err(err(
                    "the last field must be the SHA-256 of the token as 64 hex digits \
                     (`orchd token new` prints the whole line)"
                        .into(),
                ));
            }
            let entry = TokenEntry {
                name: name.into(),
                role,
                namespace: namespace.into(),
                hash: digest,
            };
            tokens
                .push(entry)
                .map_err(|(index, what)| err(format!("{what} as line {}", lines_of[index])))?;
            lines_of.push(n);
        }
        if tokens.is_empty() {
            return Err(TokenFileError {
                line: None,
                message: "no tokens in the file (one `name:role:namespace:sha256hex` per line)"
                    .into(),
            });
        }
        Ok(tokens)
    }

    /// Reads and parses the tokens file at `path`.
    pub fn load(path: &Path) -> Result<Tokens, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::invalid(
                "tokens_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Tokens::parse(&text)
            .map_err(|e| Error::invalid("tokens_file", format!("{}: {e}", path.display())))
    }

    /// Adds an entry; refuses a name or token that is already there
    /// (returns the index of the clash and what clashed).
    pub fn push(&mut self, entry: TokenEntry) -> Result<(), (usize, &'static str)> {
        for (i, e) in self.entries.iter().enumerate() {
            if e.name == entry.name {
                return Err((i, "the same name"));
            }
            if bool::from(e.hash.ct_eq(&entry.hash)) {
                return Err((i, "the same token"));
            }
        }
        self.entries.push(entry);
        Ok(())
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The names of the tokens, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    /// The entry whose hash is the token's. Every entry is compared, in
    /// constant time, whether or not one matched earlier.
    pub fn lookup(&self, token: &str) -> Option<&TokenEntry> {
        let digest = hash_token(token);
        // 0 = none; otherwise index + 1 of the match.
        let mut found = 0u64;
        for (i, entry) in self.entries.iter().enumerate() {
            let hit = entry.hash.ct_eq(&digest);
            found = u64::conditional_select(&found, &(i as u64 + 1), hit);
        }
        match found {
            0 => None,
            n => self.entries.get(n as usize - 1),
        }
    }
}

/// The token of an `authorization` header value `Bearer <token>` (the
/// scheme is case-insensitive, as RFC 9110 says).
pub fn bearer_token(header: Option<&[u8]>) -> Result<&str, Error> {
    let Some(raw) = header else {
        return Err(Error::Unauthenticated(
            "missing bearer token: send the header `authorization: Bearer <token>` \
             (orchctl and orch-worker: --token or ORCH_TOKEN)"
                .into(),
        ));
    };
    let malformed = || {
        Error::Unauthenticated("malformed authorization header: expected `Bearer <token>`".into())
    };
    let value = std::str::from_utf8(raw).map_err(|_| malformed())?;
    let (scheme, rest) = value.trim().split_once(' ').ok_or_else(malformed)?;
    let token = rest.trim_start();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(malformed());
    }
    Ok(token)
}

/// Decides who a request comes from and whether it may call an API. With
/// no tokens configured, authentication is off: everyone is
/// [`Caller::anonymous`].
#[derive(Debug, Clone, Default)]
pub struct Authenticator {
    tokens: Option<Arc<Tokens>>,
}

impl Authenticator {
    /// Authentication off.
    pub fn disabled() -> Self {
        Authenticator { tokens: None }
    }

    /// Only these tokens are accepted.
    pub fn new(tokens: Tokens) -> Self {
        Authenticator {
            tokens: Some(Arc::new(tokens)),
        }
    }

    /// Whether tokens are checked.
    pub fn is_enabled(&self) -> bool {
        self.tokens.is_some()
    }

    /// The caller of a request to `api` whose `authorization` header is
    /// `header`: UNAUTHENTICATED when the token is missing, malformed or
    /// unknown, PERMISSION_DENIED when its role may not call `api`.
    pub fn authorize(&self, header: Option<&[u8]>, api: Api) -> Result<Caller, Error> {
        let Some(tokens) = &self.tokens else {
            return Ok(Caller::anonymous());
        };
        let token = bearer_token(header)?;
        let entry = tokens.lookup(token).ok_or_else(|| {
            Error::Unauthenticated("invalid token: this server does not know it".into())
        })?;
        if !entry.role.may_call(api) {
            let needs = match api {
                Api::Jobs => "client or admin",
                Api::Workers => "worker or admin",
            };
            return Err(Error::PermissionDenied(format!(
                "token {:?} has role {}; {} needs role {needs}",
                entry.name,
                entry.role,
                api.name()
            )));
        }
        Ok(entry.caller())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn hex_of(token: &str) -> String {
        hex::encode(hash_token(token))
    }

    fn file() -> String {
        format!(
            "# team tokens\n\nalice:client:default:{}\n  w1:worker:ns-a:{}  \nroot:admin:default:{}\n",
            hex_of("tok-alice"),
            hex_of("tok-w1"),
            hex_of("tok-root").to_uppercase(),
        )
    }

    #[test]
    fn sha256_is_the_standard_one() {
        // echo -n foo | sha256sum
        assert_eq!(
            hex_of("foo"),
            "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae"
        );
    }

    #[test]
    fn a_good_file_parses_and_looks_tokens_up() {
        let tokens = Tokens::parse(&file()).unwrap();
        assert_eq!(tokens.len(), 3);
        assert_eq!(tokens.names().collect::<Vec<_>>(), ["alice", "w1", "root"]);
        let w1 = tokens.lookup("tok-w1").unwrap();
        assert_eq!((w1.role, w1.namespace.as_str()), (Role::Worker, "ns-a"));
        assert_eq!(tokens.lookup("tok-root").unwrap().role, Role::Admin);
        assert!(tokens.lookup("tok-alice").is_some());
        assert!(tokens.lookup("tok-alic").is_none());
        assert!(tokens.lookup("").is_none());
        // The stored hash is not a token.
        assert!(tokens.lookup(&hex_of("tok-alice")).is_none());
    }

    #[test]
    fn bad_lines_are_rejected_with_their_number() {
        let h = hex_of("x");
        let cases = [
            (format!("ok:client:default:{h}\nbroken\n"), 2, "4 fields"),
            (format!("a:client:default:{h}:extra"), 1, "4 fields"),
            (format!("# c\n\na:superuser:default:{h}"), 3, "unknown role"),
            (format!("a:Client:default:{h}"), 1, "unknown role"),
            ("a:client:default:abc".to_owned(), 1, "64 hex digits"),
            (format!("a:client:default:{}", &h[..63]), 1, "64 hex digits"),
            (
                format!("a:client:default:{}zz", &h[..62]),
                1,
                "64 hex digits",
            ),
            (format!(":client:default:{h}"), 1, "name must be 1 to 64"),
            (format!("a b:client:default:{h}"), 1, "contains ' '"),
            (
                format!("a:client::{h}"),
                1,
                "invalid namespace: must be 1 to 63",
            ),
            (format!("a:client:Team.A:{h}"), 1, "must be a DNS label"),
            (
                format!("a:client:default:{h}\na:worker:default:{}", hex_of("y")),
                2,
                "the same name as line 1",
            ),
            (
                format!("a:client:default:{h}\n\nb:worker:default:{h}"),
                3,
                "the same token as line 1",
            ),
        ];
        for (text, line, needle) in cases {
            let err = Tokens::parse(&text).unwrap_err();
            assert_eq!(err.line, Some(line), "{text}: {err}");
            assert!(err.to_string().contains(needle), "{text}: {err}");
            assert!(err.to_string().starts_with(&format!("line {line}: ")));
        }
        for empty in ["", "# nothing\n\n"] {
            let err = Tokens::parse(empty).unwrap_err();
            assert_eq!(err.line, None);
            assert!(err.to_string().contains("no tokens"));
        }
    }

    #[test]
    fn new_tokens_are_random_and_their_line_parses() {
        let a = new_token();
        let b = new_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        let entry = TokenEntry::for_token("ci-bot", Role::Client, "default", &a).unwrap();
        let line = entry.line();
        assert!(!line.contains(&a), "the line must not hold the token");
        let tokens = Tokens::parse(&line).unwrap();
        assert_eq!(tokens.lookup(&a).unwrap(), &entry);
        assert!(format!("{entry:?}").contains("ci-bot"));
        assert!(TokenEntry::for_token("bad:name", Role::Client, "default", &a).is_err());
    }

    #[test]
    fn bearer_headers() {
        assert_eq!(bearer_token(Some(b"Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(Some(b"bearer  abc ")).unwrap(), "abc");
        for bad in [
            &b"Bearer"[..],
            b"Bearer ",
            b"Basic xyz",
            b"abc",
            b"Bearer a b",
            b"Bearer \xff",
            b"",
        ] {
            let err = bearer_token(Some(bad)).unwrap_err();
            assert_eq!(err.code(), Code::Unauthenticated);
            assert!(err.to_string().contains("malformed"), "{err}");
        }
        let err = bearer_token(None).unwrap_err();
        assert!(err.to_string().contains("missing bearer token"), "{err}");
    }

    #[test]
    fn roles_reach_their_api_only() {
        let auth = Authenticator::new(Tokens::parse(&file()).unwrap());
        let h = |t: &str| format!("Bearer {t}");
        let alice = auth
            .authorize(Some(h("tok-alice").as_bytes()), Api::Jobs)
            .unwrap();
        assert_eq!(alice.actor(), Some("alice"));
        let err = auth
            .authorize(Some(h("tok-alice").as_bytes()), Api::Workers)
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.to_string()
                .contains("WorkerService needs role worker or admin")
        );
        let err = auth
            .authorize(Some(h("tok-w1").as_bytes()), Api::Jobs)
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            auth.authorize(Some(h("tok-w1").as_bytes()), Api::Workers)
                .is_ok()
        );
        for api in [Api::Jobs, Api::Workers] {
            assert!(auth.authorize(Some(h("tok-root").as_bytes()), api).is_ok());
        }
        let err = auth
            .authorize(Some(h("s3cret-guess").as_bytes()), Api::Jobs)
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
        assert!(!err.to_string().contains("s3cret-guess"), "{err}");
        assert_eq!(
            auth.authorize(None, Api::Jobs).unwrap_err().code(),
            Code::Unauthenticated
        );
    }

    #[test]
    fn without_tokens_everyone_is_anonymous() {
        let auth = Authenticator::disabled();
        assert!(!auth.is_enabled());
        let caller = auth.authorize(None, Api::Workers).unwrap();
        assert!(caller.is_anonymous() && caller.actor().is_none());
        assert_eq!(caller, Caller::anonymous());
    }

    fn caller(role: Role, namespace: &str) -> Caller {
        Caller {
            name: "t".into(),
            role,
            namespace: namespace.into(),
        }
    }

    #[test]
    fn clients_and_workers_see_only_their_namespace_and_admins_see_all() {
        for role in [Role::Client, Role::Worker] {
            let c = caller(role, "team-a");
            assert!(c.sees("team-a"));
            assert!(!c.sees("team-b"));
            assert!(!c.sees("default"));
        }
        let admin = caller(Role::Admin, "ops");
        assert!(admin.sees("team-a") && admin.sees("ops"));
        assert!(Caller::anonymous().sees("anything"));
    }

    #[test]
    fn only_admins_may_work_in_another_namespace() {
        let client = caller(Role::Client, "team-a");
        assert_eq!(client.namespace_for("").unwrap(), "team-a");
        assert_eq!(client.namespace_for("team-a").unwrap(), "team-a");
        let err = client.namespace_for("team-b").unwrap_err();
        assert!(
            matches!(&err, Error::PermissionDenied(m) if m.contains("\"team-b\"")),
            "{err:?}"
        );
        let admin = caller(Role::Admin, "ops");
        assert_eq!(admin.namespace_for("").unwrap(), "ops");
        assert_eq!(admin.namespace_for("team-b").unwrap(), "team-b");
        assert!(matches!(
            admin.namespace_for("Bad.Name"),
            Err(Error::InvalidArgument { field, .. }) if field == "namespace"
        ));
    }

    #[test]
    fn bearer_auth_sends_the_token_and_never_shows_it() {
        use tonic::service::Interceptor;
        let mut with = BearerAuth::new(Some("s3cret")).unwrap();
        let request = with.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        assert!(!format!("{with:?}").contains("s3cret"));
        for none in [None, Some(""), Some("  ")] {
            let mut without = BearerAuth::new(none).unwrap();
            let request = without.call(tonic::Request::new(())).unwrap();
            assert!(request.metadata().get("authorization").is_none());
        }
        let err = BearerAuth::new(Some("a\nb")).unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument { field, .. } if field == "token"));
        assert!(!err.to_string().contains("a\nb"));
    }
}
