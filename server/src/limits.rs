//! The limits orchd enforces per token and per request, at run time: the
//! submit rate (a token bucket per token name; anonymous callers share
//! one), the WatchJob streams a token may hold open, and how long one
//! request may take before its answer starts (a tower layer on gRPC; REST
//! uses tower's timeout in `crate::rest`). Streams are timed only until
//! their first response, so a WatchJob can last as long as its job.
//!
//! Size limits are checked where a request is read: payload and labels in
//! `orchestrator::validate`, whole requests by tonic's decoding limit and
//! axum's body limit. Their settings are in `crate::config::LimitSettings`.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use orchestrator::auth::Caller;
use orchestrator::error::Error;

/// How many jobs a token may submit in a period: `200/s`, `1000/m`,
/// `50/h`, `10/30s` (any humantime period), or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitRate {
    /// No limit.
    Off,
    /// `jobs` per `period`.
    Limited {
        /// Jobs per period.
        jobs: NonZeroU32,
        /// The period.
        period: Duration,
    },
}

impl SubmitRate {
    /// `jobs` per second.
    pub fn per_second(jobs: u32) -> SubmitRate {
        match NonZeroU32::new(jobs) {
            Some(jobs) => SubmitRate::Limited {
                jobs,
                period: Duration::from_secs(1),
            },
            None => SubmitRate::Off,
        }
    }
}

impl FromStr for SubmitRate {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let value = value.trim();
        if matches!(value, "off" | "none" | "unlimited") {
            return Ok(SubmitRate::Off);
        }
        let usage = || {
            format!(
                "{value:?} is not a rate: use JOBS/PERIOD such as 200/s, 1000/m, 50/h or 10/30s, or off"
            )
        };
        let (jobs, period) = value.split_once('/').ok_or_else(usage)?;
        let jobs: u32 = jobs.trim().parse().map_err(|_| usage())?;
        let jobs = NonZeroU32::new(jobs)
            .ok_or_else(|| "the rate must allow at least 1 job; use off for no limit".to_owned())?;
        let period = match period.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other).map_err(|_| usage())?,
        };
        if (period / jobs.get()).is_zero() {
            return Err(format!(
                "{value:?} is more than one job per nanosecond; use off for no limit"
            ));
        }
        Ok(SubmitRate::Limited { jobs, period })
    }
}

impl fmt::Display for SubmitRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SubmitRate::Off => f.write_str("off"),
            SubmitRate::Limited { jobs, period } => {
                let unit = match period.as_secs() {
                    1 if period.subsec_nanos() == 0 => "s".to_owned(),
                    60 if period.subsec_nanos() == 0 => "m".to_owned(),
                    3600 if period.subsec_nanos() == 0 => "h".to_owned(),
                    _ => humantime::format_duration(*period).to_string(),
                };
                write!(f, "{jobs}/{unit}")
            }
        }
    }
}

/// A delay rounded up to whole milliseconds, for messages.
fn millis_up(delay: Duration) -> Duration {
    let ms = delay.as_nanos().div_ceil(1_000_000).max(1);
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

fn who(caller: &Caller) -> String {
    match caller.actor() {
        Some(name) => format!("token {name:?}"),
        None => "anonymous callers".to_owned(),
    }
}

/// The per-token submit rate: one token bucket of `burst` jobs per token
/// name, refilled at the rate. Buckets are keyed by token name, so their
/// number is bounded by the tokens file (plus one for anonymous callers).
pub struct SubmitLimiter {
    rate: SubmitRate,
    burst: NonZeroU32,
    buckets: DefaultKeyedRateLimiter<String>,
}

impl SubmitLimiter {
    /// A limiter for `rate` with buckets of `burst` jobs; `None` when the
    /// rate is off.
    pub fn new(rate: SubmitRate, burst: NonZeroU32) -> Option<SubmitLimiter> {
        let SubmitRate::Limited { jobs, period } = rate else {
            return None;
        };
        let quota = Quota::with_period(period / jobs.get())?.allow_burst(burst);
        Some(SubmitLimiter {
            rate,
            burst,
            buckets: RateLimiter::keyed(quota),
        })
    }

    /// Takes `jobs` jobs from `caller`'s bucket, or says when they will be
    /// there (RESOURCE_EXHAUSTED with a retry hint). A batch larger than
    /// the bucket can never pass: INVALID_ARGUMENT naming `jobs`.
    pub fn check(&self, caller: &Caller, jobs: usize) -> Result<(), Error> {
        let Some(n) = u32::try_from(jobs).ok().and_then(NonZeroU32::new) else {
            return Ok(());
        };
        match self.buckets.check_key_n(&caller.name, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = millis_up(not_until.wait_time_from(self.buckets.clock().now()));
                let batch = if jobs > 1 {
                    format!(" by a batch of {jobs} jobs")
                } else {
                    String::new()
                };
                Err(Error::ResourceExhausted {
                    limit: "submit_rate",
                    message: format!(
                        "submit rate limit of {} (burst {}, submit_rate) for {} exceeded{batch}; retry after {}",
                        self.rate,
                        self.burst,
                        who(caller),
                        humantime::format_duration(wait)
                    ),
                    retry_after: Some(wait),
                })
            }
            Err(_) => Err(Error::invalid(
                "jobs",
                format!(
                    "a batch of {jobs} jobs is more than the submit burst of {} jobs (submit_burst); send smaller batches",
                    self.burst
                ),
            )),
        }
    }
}

/// Open WatchJob streams per token name (anonymous callers share one
/// count), at most `max` each.
#[derive(Clone)]
pub struct WatchSlots {
    max: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open watch stream; its slot is freed when it is dropped, i.e. when
/// the stream ends or the client goes away.
pub struct WatchSlot {
    name: String,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

impl WatchSlots {
    /// At most `max` open streams per token.
    pub fn new(max: usize) -> WatchSlots {
        WatchSlots {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more stream of `caller`, or RESOURCE_EXHAUSTED naming
    /// the limit when all are taken.
    pub fn acquire(&self, caller: &Caller) -> Result<WatchSlot, Error> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(caller.name.clone()).or_default();
        if *count >= self.max {
            return Err(Error::ResourceExhausted {
                limit: "max_watches_per_token",
                message: format!(
                    "{} already has {} WatchJob streams open, the limit (max_watches_per_token); close one and retry",
                    who(caller),
                    self.max
                ),
                retry_after: None,
            });
        }
        *count += 1;
        Ok(WatchSlot {
            name: caller.name.clone(),
            open: self.open.clone(),
        })
    }

    /// How many streams `name` has open (for tests and logs).
    pub fn open(&self, name: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(name).copied().unwrap_or(0)
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.name) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.name);
            }
        }
    }
}

/// The per-caller limits the job operations check.
#[derive(Clone)]
pub struct Quotas {
    /// The submit rate; `None` when off.
    pub submit: Option<Arc<SubmitLimiter>>,
    /// Open WatchJob streams per token.
    pub watches: WatchSlots,
}

impl Quotas {
    /// No submit rate limit and `max_watches` streams per token.
    pub fn unlimited_rate(max_watches: usize) -> Quotas {
        Quotas {
            submit: None,
            watches: WatchSlots::new(max_watches),
        }
    }

    /// Takes `jobs` submits from `caller`'s allowance.
    pub fn check_submit(&self, caller: &Caller, jobs: usize) -> Result<(), Error> {
        match &self.submit {
            Some(limiter) => limiter.check(caller, jobs),
            None => Ok(()),
        }
    }
}

/// The error of a request that ran past `timeout`.
pub fn timeout_error(timeout: Duration) -> Error {
    Error::DeadlineExceeded(format!(
        "the request took longer than {} (request_timeout)",
        humantime::format_duration(timeout)
    ))
}

/// A tower layer for the gRPC server: a call whose answer has not started
/// after `timeout` gets DEADLINE_EXCEEDED (tonic's own `Server::timeout`
/// answers CANCELLED, which clients take for their own cancellation).
/// Streams are timed until their first response only.
#[derive(Debug, Clone, Copy)]
pub struct GrpcTimeoutLayer {
    timeout: Duration,
}

impl GrpcTimeoutLayer {
    /// Calls may take `timeout`.
    pub fn new(timeout: Duration) -> Self {
        GrpcTimeoutLayer { timeout }
    }
}

impl<S> tower::Layer<S> for GrpcTimeoutLayer {
    type Service = GrpcTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service [`GrpcTimeoutLayer`] makes.
#[derive(Debug, Clone)]
pub struct GrpcTimeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcTimeout<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let timeout = self.timeout;
        let answer = self.inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout(timeout, answer).await {
                Ok(answer) => answer,
                Err(_) => Ok(tonic::Status::from(timeout_error(timeout)).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator::auth::{Caller, Role};
    use tonic::Code;

    fn token(name: &str) -> Caller {
        Caller {
            name: name.into(),
            role: Role::Client,
            namespace: "default".into(),
        }
    }

    #[test]
    fn rates_parse_in_every_documented_form() {
        let limited = |jobs: u32, secs: u64| SubmitRate::Limited {
            jobs: NonZeroU32::new(jobs).unwrap(),
            period: Duration::from_secs(secs),
        };
        for (text, rate, shown) in [
            ("200/s", limited(200, 1), "200/s"),
            ("1000/m", limited(1000, 60), "1000/m"),
            ("50/h", limited(50, 3600), "50/h"),
            ("10/30s", limited(10, 30), "10/30s"),
            (" 5/min ", limited(5, 60), "5/m"),
            ("off", SubmitRate::Off, "off"),
        ] {
            let parsed: SubmitRate = text.parse().unwrap();
            assert_eq!(parsed, rate, "{text}");
            assert_eq!(parsed.to_string(), shown, "{text}");
        }
        for bad in [
            "",
            "200",
            "0/s",
            "-1/s",
            "x/s",
            "200/fortnight",
            "4000000000/1ns",
        ] {
            let err = bad.parse::<SubmitRate>().unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
        assert_eq!(SubmitRate::per_second(0), SubmitRate::Off);
    }

    #[test]
    fn each_token_has_its_own_bucket_and_batches_count_each_job() {
        // One job per hour refills nothing during the test: exactly the
        // burst gets through.
        let limiter = SubmitLimiter::new("1/h".parse().unwrap(), NonZeroU32::new(5).unwrap())
            .expect("a limited rate");
        let alice = token("alice");
        limiter.check(&alice, 3).unwrap();
        limiter.check(&alice, 2).unwrap();
        let err = limiter.check(&alice, 1).unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted);
        let message = err.to_string();
        assert!(
            message.contains("submit rate limit of 1/h (burst 5, submit_rate)")
                && message.contains("token \"alice\"")
                && message.contains("retry after"),
            "{message}"
        );
        let wait = err.retry_after().expect("a retry hint");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(3600),
            "{wait:?}"
        );
        // Bob's bucket is full; anonymous callers share one more.
        limiter.check(&token("bob"), 5).unwrap();
        limiter.check(&Caller::anonymous(), 5).unwrap();
        let err = limiter.check(&Caller::anonymous(), 1).unwrap_err();
        assert!(err.to_string().contains("anonymous callers"), "{err}");
        // A batch larger than the bucket can never pass: not a retry case.
        let err = limiter.check(&token("carol"), 6).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().starts_with("invalid jobs:"), "{err}");
        assert!(err.to_string().contains("submit_burst"), "{err}");
        assert!(SubmitLimiter::new(SubmitRate::Off, NonZeroU32::MIN).is_none());
    }

    #[test]
    fn a_refused_batch_takes_nothing_from_the_bucket() {
        let limiter = SubmitLimiter::new("1/h".parse().unwrap(), NonZeroU32::new(4).unwrap())
            .expect("a limited rate");
        let alice = token("alice");
        limiter.check(&alice, 3).unwrap();
        let err = limiter.check(&alice, 2).unwrap_err();
        assert!(err.to_string().contains("by a batch of 2 jobs"), "{err}");
        limiter.check(&alice, 1).unwrap();
    }

    #[test]
    fn watch_slots_are_counted_per_token_and_freed_on_drop() {
        let slots = WatchSlots::new(2);
        let alice = token("alice");
        let first = slots.acquire(&alice).unwrap();
        let _second = slots.acquire(&alice).unwrap();
        let err = slots.acquire(&alice).err().expect("the third is refused");
        assert_eq!(err.code(), Code::ResourceExhausted);
        assert!(err.to_string().contains("max_watches_per_token"), "{err}");
        assert!(err.retry_after().is_none());
        let _bob = slots.acquire(&token("bob")).unwrap();
        drop(first);
        assert_eq!(slots.open("alice"), 1);
        let _third = slots.acquire(&alice).unwrap();
        assert_eq!(slots.open("alice"), 2);
    }

    #[tokio::test]
    async fn a_slow_grpc_call_gets_deadline_exceeded() {
        use tower::{Layer, Service, ServiceExt};
        let slow = tower::service_fn(|_: http::Request<()>| async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
        });
        let mut service = GrpcTimeoutLayer::new(Duration::from_millis(10)).layer(slow);
        let response = service
            .ready()
            .await
            .unwrap()
            .call(http::Request::new(()))
            .await
            .unwrap();
        let status = tonic::Status::from_header_map(response.headers()).expect("a grpc-status");
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(
            status.message().contains("request_timeout"),
            "{}",
            status.message()
        );
    }
}
