//! What a job kind runs: the [`Handler`] trait, the [`JobContext`] a
//! handler gets, and the [`Registry`] that maps kinds to handlers.
//!
//! A handler only computes; the worker around it does the protocol (lease,
//! heartbeats, reporting). It must watch [`JobContext::cancel`]: the worker
//! fires it when a user cancels the job, the job's timeout passes, the lease
//! is lost or the worker shuts down, and abandons handlers that do not stop
//! within the cancel grace period.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use orchestrator::proto::v1::Job;
use pbjson_types::Struct;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerConfig;
use crate::error::{HandlerError, WorkerError};
use crate::handlers;

/// Runs the jobs of one kind.
///
/// ```
/// use orchestrator_worker::{Handler, HandlerError, JobContext};
/// use pbjson_types::Struct;
///
/// struct Hello;
///
/// #[async_trait::async_trait]
/// impl Handler for Hello {
///     async fn run(&self, ctx: JobContext) -> Result<Struct, HandlerError> {
///         let name = ctx.payload_json()["name"].as_str().unwrap_or("world").to_owned();
///         orchestrator_worker::to_struct(serde_json::json!({ "greeting": format!("hello {name}") }))
///     }
/// }
/// ```
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt. `Ok` completes the job with that result. Return
    /// [`HandlerError::Cancelled`] when stopping because `ctx.cancel` fired.
    async fn run(&self, ctx: JobContext) -> Result<Struct, HandlerError>;
}

/// Everything a handler knows about the attempt it runs.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job's id (a UUID).
    pub job_id: String,
    /// The job's kind.
    pub kind: String,
    /// The handler's input.
    pub payload: Struct,
    /// This attempt's number, 1 for the first.
    pub attempt: u32,
    /// How many attempts the job may use in total.
    pub max_attempts: u32,
    /// The worker running the attempt.
    pub worker_id: String,
    /// Fired when the handler must stop; see the module docs.
    pub cancel: CancellationToken,
    /// The job as orchd returned it when the attempt started.
    pub job: Arc<Job>,
}

impl JobContext {
    /// The context of the attempt of `job` that orchd just started.
    pub fn new(job: Job, worker_id: impl Into<String>, cancel: CancellationToken) -> Self {
        JobContext {
            job_id: job.id.clone(),
            kind: job.kind.clone(),
            payload: job.payload.clone().unwrap_or_default(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            worker_id: worker_id.into(),
            cancel,
            job: Arc::new(job),
        }
    }

    /// The payload as a JSON object.
    pub fn payload_json(&self) -> serde_json::Value {
        from_struct(&self.payload)
    }

    /// Whether the handler has been asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// A JSON object as a protobuf `Struct` (for results). Anything other than
/// an object is an error.
pub fn to_struct(value: serde_json::Value) -> Result<Struct, HandlerError> {
    if !value.is_object() {
        return Err(HandlerError::Permanent(format!(
            "a result must be a JSON object, got {value}"
        )));
    }
    serde_json::from_value(value)
        .map_err(|e| HandlerError::Permanent(format!("result is not representable: {e}")))
}

/// A protobuf `Struct` as a JSON object.
pub fn from_struct(value: &Struct) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_else(|_| serde_json::Value::Object(Default::default()))
}

/// The handlers of one worker, by kind.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: BTreeMap<String, Arc<dyn Handler>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("kinds", &self.kinds())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// The built-in handlers: `sleep`, `echo`, `noop`, `fail` and `exec`
    /// (which refuses to run anything unless `config.enable_exec`).
    pub fn with_builtins(config: &WorkerConfig) -> Self {
        let mut registry = Registry::new();
        let builtins: [(&str, Arc<dyn Handler>); 5] = [
            ("sleep", Arc::new(handlers::sleep::Sleep)),
            ("echo", Arc::new(handlers::echo::Echo)),
            ("noop", Arc::new(handlers::noop::Noop)),
            ("fail", Arc::new(handlers::fail::Fail)),
            (
                "exec",
                Arc::new(handlers::exec::Exec {
                    enabled: config.enable_exec,
                    kill_grace: config.exec_kill_grace,
                }),
            ),
        ];
        for (kind, handler) in builtins {
            registry.handlers.insert(kind.to_owned(), handler);
        }
        registry
    }

    /// Adds the handler of `kind`. Fails when the kind is already taken
    /// (call [`Registry::remove`] first to replace a built-in) or is not a
    /// valid kind name.
    pub fn register(
        &mut self,
        kind: &str,
        handler: impl Handler,
    ) -> Result<&mut Self, WorkerError> {
        self.register_arc(kind, Arc::new(handler))
    }

    /// [`Registry::register`] for a shared handler.
    pub fn register_arc(
        &mut self,
        kind: &str,
        handler: Arc<dyn Handler>,
    ) -> Result<&mut Self, WorkerError> {
        orchestrator::validate::name("kind", kind)
            .map_err(|e| WorkerError::InvalidKind(e.to_string()))?;
        if self.handlers.contains_key(kind) {
            return Err(WorkerError::DuplicateKind(kind.to_owned()));
        }
        self.handlers.insert(kind.to_owned(), handler);
        Ok(self)
    }

    /// Removes the handler of `kind`, returning it.
    pub fn remove(&mut self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.remove(kind)
    }

    /// The registered kinds, sorted.
    pub fn kinds(&self) -> Vec<&str> {
        self.handlers.keys().map(String::as_str).collect()
    }

    /// The handler of `kind`, or the permanent error an attempt of an
    /// unknown kind fails with.
    pub fn resolve(&self, kind: &str) -> Result<Arc<dyn Handler>, HandlerError> {
        self.handlers.get(kind).cloned().ok_or_else(|| {
            let known = if self.handlers.is_empty() {
                "none".to_owned()
            } else {
                self.kinds().join(", ")
            };
            HandlerError::Permanent(format!(
                "no handler for kind {kind:?} on this worker; known kinds: {known}"
            ))
        })
    }
}

/// A handler from an async closure, for small handlers and tests.
pub fn handler_fn<F, Fut>(f: F) -> impl Handler
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Struct, HandlerError>> + Send + 'static,
{
    struct FnHandler<F>(F);

    #[async_trait]
    impl<F, Fut> Handler for FnHandler<F>
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Struct, HandlerError>> + Send + 'static,
    {
        async fn run(&self, ctx: JobContext) -> Result<Struct, HandlerError> {
            (self.0)(ctx).await
        }
    }

    FnHandler(f)
}

/// Test support: a context for `kind` with a JSON `payload` at `attempt`.
#[doc(hidden)]
pub fn test_context(kind: &str, payload: serde_json::Value, attempt: u32) -> JobContext {
    let job = Job {
        id: uuid::Uuid::new_v4().to_string(),
        kind: kind.to_owned(),
        payload: Some(to_struct(payload).expect("payload is an object")),
        attempt,
        max_attempts: attempt.max(3),
        labels: HashMap::new(),
        ..Job::default()
    };
    JobContext::new(job, "test-worker", CancellationToken::new())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn config() -> WorkerConfig {
        WorkerConfig::local("http://127.0.0.1:1", "amqp://127.0.0.1:1")
    }

    #[test]
    fn builtins_are_registered() {
        let r = Registry::with_builtins(&config());
        assert_eq!(r.kinds(), vec!["echo", "exec", "fail", "noop", "sleep"]);
    }

    #[test]
    fn unknown_kinds_name_the_known_ones() {
        let r = Registry::with_builtins(&config());
        let Err(err) = r.resolve("resize") else {
            panic!("resolved")
        };
        assert_eq!(
            err,
            HandlerError::Permanent(
                "no handler for kind \"resize\" on this worker; known kinds: echo, exec, fail, noop, sleep".into()
            )
        );
        let Err(err) = Registry::new().resolve("x") else {
            panic!("resolved")
        };
        assert!(err.to_string().ends_with("known kinds: none"));
    }

    #[tokio::test]
    async fn custom_handlers_register_once_under_valid_names() {
        let mut r = Registry::with_builtins(&config());
        r.register(
            "thumbnail",
            handler_fn(|ctx: JobContext| async move { Ok(ctx.payload) }),
        )
        .unwrap();
        assert!(matches!(
            r.register("thumbnail", handler_fn(|_| async { Ok(Struct::default()) })),
            Err(WorkerError::DuplicateKind(_))
        ));
        assert!(matches!(
            r.register("Bad Kind", handler_fn(|_| async { Ok(Struct::default()) })),
            Err(WorkerError::InvalidKind(_))
        ));
        assert!(r.remove("echo").is_some());
        r.register("echo", handler_fn(|_| async { Ok(Struct::default()) }))
            .unwrap();
        let ctx = test_context("thumbnail", json!({"w": 64}), 1);
        let out = r.resolve("thumbnail").unwrap().run(ctx).await.unwrap();
        assert_eq!(from_struct(&out), json!({"w": 64.0}));
    }

    #[test]
    fn results_must_be_objects() {
        assert!(to_struct(json!([1, 2])).is_err());
        assert_eq!(
            from_struct(&to_struct(json!({"a": "b"})).unwrap()),
            json!({"a": "b"})
        );
    }
}
