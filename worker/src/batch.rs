//! StartAttempt and FinishAttempt calls, gathered into batches.
//!
//! Under load a worker has dozens of starts and reports to make at once,
//! and each gRPC call costs orchd (and the worker) far more in HTTP/2
//! framing, headers and syscalls than the store work it asks for. A
//! [`Batcher`] takes the calls of every attempt of the worker: when a
//! call arrives while fewer than [`IN_FLIGHT`] batches are under way, it
//! goes at once, with whatever else is queued (at most [`MAX_ITEMS`]
//! requests and about [`MAX_BYTES`]); otherwise it waits for one to come
//! back and leaves with the next batch. Nothing waits on a timer, so an idle
//! worker's single call goes as soon as it is made, as a plain unary call.
//!
//! Each request keeps its own answer or error: callers see exactly what the
//! single call would have returned. An orchd without the batch calls
//! (UNIMPLEMENTED) is remembered, and single calls are used for
//! [`UNBATCHED_FOR`]; then a batch call is tried again, so that workers
//! upgraded before orchd batch again once it is upgraded too.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use orchestrator::proto::v1::{
    AttemptError, FinishAttemptRequest, FinishAttemptsRequest, Job, StartAttemptRequest,
    StartAttemptResponse, StartAttemptsRequest, finish_attempt_result, start_attempt_result,
};
use prost::Message;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::rpc::{self, Client};

/// Most requests in one batch.
pub(crate) const MAX_ITEMS: usize = 64;
/// Most encoded request bytes in one batch (orchd takes 4 MiB requests by
/// default); a request larger than this goes alone.
pub(crate) const MAX_BYTES: usize = 1 << 20;
/// Batches of one kind under way at once. Two rather than more: calls
/// that wait for a batch to come back leave together in the next one, and
/// fewer, fuller batches cost every process less per job (against four,
/// at saturation: 12 % less CPU per job over the whole machine, 11 % more
/// jobs per second end to end; one-at-a-time latency unchanged, as a lone
/// call still goes at once). The second keeps calls moving while one batch
/// is slow.
pub(crate) const IN_FLIGHT: usize = 2;
/// How long single calls are made after orchd answered a batch call with
/// UNIMPLEMENTED, before batches are tried again.
pub(crate) const UNBATCHED_FOR: Duration = Duration::from_secs(300);

/// When orchd last said it has no batch calls.
#[derive(Default)]
struct Unbatched(Mutex<Option<Instant>>);

impl Unbatched {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether to make single calls now.
    fn active(&self) -> bool {
        self.lock()
            .is_some_and(|since| since.elapsed() < UNBATCHED_FOR)
    }

    fn start(&self) {
        *self.lock() = Some(Instant::now());
    }

    /// Forgets an earlier UNIMPLEMENTED; true if there was one.
    fn end(&self) -> bool {
        self.lock().take().is_some()
    }
}

/// A batch call's answer: one outcome per request, in order, or the
/// failure of the whole call.
pub(crate) type Outcomes<A> = BoxFuture<'static, Result<Vec<Result<A, Status>>, Status>>;

/// One kind of call that can be batched.
pub(crate) trait Call: Send + Sync + 'static {
    /// What the calls are made on (the gRPC client).
    type Client: Clone + Send + 'static;
    type Request: Message + Clone + Send + 'static;
    type Answer: Send + 'static;
    /// The unary call.
    fn one(
        client: Self::Client,
        request: Self::Request,
    ) -> BoxFuture<'static, Result<Self::Answer, Status>>;
    /// The batch call: one outcome per request, in order.
    fn many(client: Self::Client, requests: Vec<Self::Request>) -> Outcomes<Self::Answer>;
}

type Waiting<C> = (
    <C as Call>::Request,
    oneshot::Sender<Result<<C as Call>::Answer, Status>>,
);

/// The calls of one kind, batched; cheap to clone.
pub(crate) struct Batcher<C: Call> {
    queue: mpsc::UnboundedSender<Waiting<C>>,
}

impl<C: Call> Clone for Batcher<C> {
    fn clone(&self) -> Self {
        Batcher {
            queue: self.queue.clone(),
        }
    }
}

impl<C: Call> Batcher<C> {
    /// A batcher calling `client`; its task ends when the last clone is
    /// dropped.
    pub(crate) fn spawn(client: C::Client) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run::<C>(client, waiting));
        Batcher { queue }
    }

    /// Makes the call, in a batch when others are waiting too.
    pub(crate) async fn call(&self, request: C::Request) -> Result<C::Answer, Status> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send((request, answer))
            .map_err(|_| Status::unavailable("the worker is shutting down"))?;
        answered
            .await
            .unwrap_or_else(|_| Err(Status::unavailable("the worker is shutting down")))
    }
}

async fn run<C: Call>(client: C::Client, mut waiting: mpsc::UnboundedReceiver<Waiting<C>>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let unbatched = Arc::new(Unbatched::default());
    let mut carried: Option<Waiting<C>> = None;
    loop {
        let first = match carried.take() {
            Some(first) => first,
            None => match waiting.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        // Wait for a free slot first: what queues meanwhile joins this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.0.encoded_len();
        let mut batch = vec![first];
        while batch.len() < MAX_ITEMS {
            let Ok(next) = waiting.try_recv() else { break };
            let size = next.0.encoded_len();
            if bytes + size > MAX_BYTES {
                carried = Some(next);
                break;
            }
            bytes += size;
            batch.push(next);
        }
        let client = client.clone();
        let unbatched = unbatched.clone();
        tokio::spawn(async move {
            send::<C>(client, batch, &unbatched).await;
            drop(slot);
        });
    }
}

async fn send<C: Call>(client: C::Client, batch: Vec<Waiting<C>>, unbatched: &Unbatched) {
    if batch.len() > 1 && !unbatched.active() {
        let requests: Vec<C::Request> = batch.iter().map(|(r, _)| r.clone()).collect();
        match C::many(client.clone(), requests).await {
            Ok(outcomes) if outcomes.len() == batch.len() => {
                if unbatched.end() {
                    tracing::info!("orchd has batch calls now; batching again");
                }
                for ((_, answer), outcome) in batch.into_iter().zip(outcomes) {
                    let _ = answer.send(outcome);
                }
                return;
            }
            Ok(outcomes) => {
                let status = Status::internal(format!(
                    "orchd answered {} of {} batched requests",
                    outcomes.len(),
                    batch.len()
                ));
                for (_, answer) in batch {
                    let _ = answer.send(Err(status.clone()));
                }
                return;
            }
            Err(status) if status.code() == Code::Unimplemented => {
                tracing::info!(retry_in = ?UNBATCHED_FOR, "orchd has no batch calls; making single calls for a while");
                unbatched.start();
            }
            Err(status) => {
                // What concerns the whole call (orchd unreachable, a bad
                // token) is each request's answer too.
                for (_, answer) in batch {
                    let _ = answer.send(Err(status.clone()));
                }
                return;
            }
        }
    }
    let calls = batch.into_iter().map(|(request, answer)| {
        let client = client.clone();
        async move {
            let _ = answer.send(C::one(client, request).await);
        }
    });
    futures::future::join_all(calls).await;
}

fn status_of(error: AttemptError) -> Status {
    Status::new(Code::from(error.code), error.message)
}

/// StartAttempt / StartAttempts.
pub(crate) struct Start;

impl Call for Start {
    type Client = Client;
    type Request = StartAttemptRequest;
    type Answer = StartAttemptResponse;

    fn one(
        mut client: Client,
        request: StartAttemptRequest,
    ) -> BoxFuture<'static, Result<StartAttemptResponse, Status>> {
        Box::pin(async move {
            client
                .start_attempt(rpc::request(request, rpc::CALL_TIMEOUT))
                .await
                .map(tonic::Response::into_inner)
        })
    }

    fn many(
        mut client: Client,
        requests: Vec<StartAttemptRequest>,
    ) -> Outcomes<StartAttemptResponse> {
        Box::pin(async move {
            let request = StartAttemptsRequest { attempts: requests };
            let response = client
                .start_attempts(rpc::request(request, rpc::CALL_TIMEOUT))
                .await?
                .into_inner();
            Ok(response
                .results
                .into_iter()
                .map(|r| match r.result {
                    Some(start_attempt_result::Result::Answer(answer)) => Ok(answer),
                    Some(start_attempt_result::Result::Error(error)) => Err(status_of(error)),
                    None => Err(Status::internal("an empty StartAttempts result")),
                })
                .collect())
        })
    }
}

/// FinishAttempt / FinishAttempts.
pub(crate) struct Finish;

impl Call for Finish {
    type Client = Client;
    type Request = FinishAttemptRequest;
    type Answer = Job;

    fn one(
        mut client: Client,
        request: FinishAttemptRequest,
    ) -> BoxFuture<'static, Result<Job, Status>> {
        Box::pin(async move {
            client
                .finish_attempt(rpc::request(request, rpc::CALL_TIMEOUT))
                .await
                .map(tonic::Response::into_inner)
        })
    }

    fn many(mut client: Client, requests: Vec<FinishAttemptRequest>) -> Outcomes<Job> {
        Box::pin(async move {
            let request = FinishAttemptsRequest { attempts: requests };
            let response = client
                .finish_attempts(rpc::request(request, rpc::CALL_TIMEOUT))
                .await?
                .into_inner();
            Ok(response
                .results
                .into_iter()
                .map(|r| match r.result {
                    Some(finish_attempt_result::Result::Job(job)) => Ok(job),
                    Some(finish_attempt_result::Result::Error(error)) => Err(status_of(error)),
                    None => Err(Status::internal("an empty FinishAttempts result")),
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    //! The batching rules on a recording stand-in for orchd (the `Call`
    //! seam, not gRPC): requests are `StartAttemptRequest`s whose `job_id`
    //! says how the stand-in answers.

    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::sync::Notify;

    use super::*;

    #[derive(Default)]
    struct Orchd {
        /// The requests of each call made, and whether it was a batch.
        calls: Mutex<Vec<(bool, Vec<String>)>>,
        /// Answer batch calls with UNIMPLEMENTED (an older orchd).
        no_batches: bool,
        /// Answer batch calls with this status as a whole.
        batch_fails: Option<Code>,
        /// While set, calls wait for `release`.
        hold: AtomicBool,
        release: Notify,
    }

    impl Orchd {
        fn calls(&self) -> Vec<(bool, Vec<String>)> {
            self.calls.lock().unwrap().clone()
        }

        async fn record(&self, batch: bool, ids: Vec<String>) {
            self.calls.lock().unwrap().push((batch, ids));
            while self.hold.load(Ordering::SeqCst) {
                self.release.notified().await;
            }
        }
    }

    fn answer(id: &str) -> Result<String, Status> {
        match id.strip_prefix("missing") {
            Some(_) => Err(Status::not_found(id.to_owned())),
            None => Ok(format!("ran {id}")),
        }
    }

    struct Fake;

    impl Call for Fake {
        type Client = Arc<Orchd>;
        type Request = StartAttemptRequest;
        type Answer = String;

        fn one(
            orchd: Arc<Orchd>,
            request: StartAttemptRequest,
        ) -> BoxFuture<'static, Result<String, Status>> {
            Box::pin(async move {
                orchd.record(false, vec![request.job_id.clone()]).await;
                answer(&request.job_id)
            })
        }

        fn many(orchd: Arc<Orchd>, requests: Vec<StartAttemptRequest>) -> Outcomes<String> {
            Box::pin(async move {
                let ids: Vec<String> = requests.iter().map(|r| r.job_id.clone()).collect();
                orchd.record(true, ids.clone()).await;
                if orchd.no_batches {
                    return Err(Status::unimplemented("no StartAttempts here"));
                }
                if let Some(code) = orchd.batch_fails {
                    return Err(Status::new(code, "the whole call failed"));
                }
                Ok(ids.iter().map(|id| answer(id)).collect())
            })
        }
    }

    fn request(id: &str) -> StartAttemptRequest {
        StartAttemptRequest {
            job_id: id.to_owned(),
            ..Default::default()
        }
    }

    /// Fills every in-flight slot with a held single call, queues `ids`
    /// behind them, then lets everything go; returns each id's outcome.
    async fn queued_behind_full_slots(
        orchd: Arc<Orchd>,
        ids: Vec<String>,
    ) -> Vec<Result<String, Status>> {
        let batcher = Batcher::<Fake>::spawn(orchd.clone());
        queued_on(&batcher, orchd, ids).await
    }

    /// [`queued_behind_full_slots`] on a given batcher.
    async fn queued_on(
        batcher: &Batcher<Fake>,
        orchd: Arc<Orchd>,
        ids: Vec<String>,
    ) -> Vec<Result<String, Status>> {
        orchd.hold.store(true, Ordering::SeqCst);
        let before = orchd.calls().len();
        let mut blockers = Vec::new();
        for n in 0..IN_FLIGHT {
            let b = batcher.clone();
            blockers.push(tokio::spawn(async move {
                b.call(request(&format!("blocker{n}"))).await
            }));
            // One at a time, so each leaves alone and takes a slot.
            while orchd.calls().len() <= before + n {
                tokio::task::yield_now().await;
            }
        }
        let waiting: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let b = batcher.clone();
                tokio::spawn(async move { b.call(request(&id)).await })
            })
            .collect();
        // Let the queued calls reach the batcher's queue before the release.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        orchd.hold.store(false, Ordering::SeqCst);
        orchd.release.notify_waiters();
        for blocker in blockers {
            blocker.await.unwrap().unwrap();
        }
        let mut outcomes = Vec::new();
        for w in waiting {
            outcomes.push(w.await.unwrap());
        }
        outcomes
    }

    #[tokio::test]
    async fn a_lone_call_goes_at_once_as_a_single_call() {
        let orchd = Arc::new(Orchd::default());
        let batcher = Batcher::<Fake>::spawn(orchd.clone());
        assert_eq!(batcher.call(request("a")).await.unwrap(), "ran a");
        assert_eq!(orchd.calls(), vec![(false, vec!["a".to_owned()])]);
    }

    #[tokio::test]
    async fn calls_queued_while_every_slot_is_busy_leave_as_one_batch() {
        let orchd = Arc::new(Orchd::default());
        let ids: Vec<String> = (0..10).map(|n| format!("j{n}")).collect();
        let outcomes = queued_behind_full_slots(orchd.clone(), ids.clone()).await;
        for (id, outcome) in ids.iter().zip(&outcomes) {
            assert_eq!(outcome.as_ref().unwrap(), &format!("ran {id}"));
        }
        let batches: Vec<_> = orchd
            .calls()
            .into_iter()
            .filter(|(batch, _)| *batch)
            .collect();
        assert_eq!(batches, vec![(true, ids)], "one batch, in order");
    }

    #[tokio::test]
    async fn each_caller_gets_its_own_answer_or_error() {
        let orchd = Arc::new(Orchd::default());
        let ids = vec!["ok1".to_owned(), "missing2".to_owned(), "ok3".to_owned()];
        let outcomes = queued_behind_full_slots(orchd, ids).await;
        assert_eq!(outcomes[0].as_ref().unwrap(), "ran ok1");
        let error = outcomes[1].as_ref().unwrap_err();
        assert_eq!(error.code(), Code::NotFound);
        assert_eq!(error.message(), "missing2");
        assert_eq!(outcomes[2].as_ref().unwrap(), "ran ok3");
    }

    /// The calls made for `ids` (not the blockers): (batch?, ids) each.
    fn calls_for(orchd: &Orchd, ids: &[&str]) -> Vec<(bool, Vec<String>)> {
        orchd
            .calls()
            .into_iter()
            .filter(|(_, called)| ids.contains(&called[0].as_str()))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn an_orchd_without_batch_calls_gets_single_calls_for_a_while() {
        let orchd = Arc::new(Orchd {
            no_batches: true,
            ..Orchd::default()
        });
        let batcher = Batcher::<Fake>::spawn(orchd.clone());
        let outcomes = queued_on(&batcher, orchd.clone(), vec!["a".into(), "b".into()]).await;
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        let s = |id: &str| (false, vec![id.to_owned()]);
        let pair = vec!["a".to_owned(), "b".to_owned()];
        assert_eq!(
            calls_for(&orchd, &["a", "b"]),
            vec![(true, pair), s("a"), s("b")],
            "tried once as a batch, then one by one"
        );

        // Remembered: the next queued pair goes one by one without asking.
        tokio::time::advance(UNBATCHED_FOR - Duration::from_secs(1)).await;
        let again = queued_on(&batcher, orchd.clone(), vec!["c".into(), "d".into()]).await;
        assert!(again.iter().all(Result::is_ok));
        assert_eq!(calls_for(&orchd, &["c", "d"]), vec![s("c"), s("d")]);

        // Later, orchd may have been upgraded: a batch is tried again.
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = queued_on(&batcher, orchd.clone(), vec!["e".into(), "f".into()]).await;
        assert!(later.iter().all(Result::is_ok));
        let pair = vec!["e".to_owned(), "f".to_owned()];
        assert_eq!(
            calls_for(&orchd, &["e", "f"]),
            vec![(true, pair), s("e"), s("f")]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn batching_resumes_once_orchd_has_the_batch_calls() {
        let unbatched = Unbatched::default();
        unbatched.start();
        let orchd = Arc::new(Orchd::default());
        let batch = |ids: &[&str]| {
            ids.iter()
                .map(|id| (request(id), oneshot::channel().0))
                .collect::<Vec<_>>()
        };
        send::<Fake>(orchd.clone(), batch(&["a", "b"]), &unbatched).await;
        assert_eq!(
            calls_for(&orchd, &["a", "b"]).len(),
            2,
            "single calls at first"
        );
        tokio::time::advance(UNBATCHED_FOR).await;
        send::<Fake>(orchd.clone(), batch(&["c", "d"]), &unbatched).await;
        assert_eq!(
            calls_for(&orchd, &["c", "d"]),
            vec![(true, vec!["c".to_owned(), "d".to_owned()])]
        );
        assert!(
            !unbatched.active() && !unbatched.end(),
            "forgotten once a batch worked"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_call_is_every_callers_error() {
        let orchd = Arc::new(Orchd {
            batch_fails: Some(Code::Unavailable),
            ..Orchd::default()
        });
        let outcomes = queued_behind_full_slots(orchd, vec!["a".into(), "b".into()]).await;
        for outcome in outcomes {
            assert_eq!(outcome.unwrap_err().code(), Code::Unavailable);
        }
    }

    #[tokio::test]
    async fn large_requests_split_batches_by_size() {
        let orchd = Arc::new(Orchd::default());
        // Three requests of ~0.6 MiB: no two fit in one batch.
        let ids: Vec<String> = (0..3)
            .map(|n| format!("{n}{}", "x".repeat(600 * 1024)))
            .collect();
        let outcomes = queued_behind_full_slots(orchd.clone(), ids).await;
        assert!(outcomes.iter().all(Result::is_ok));
        let sent: Vec<usize> = orchd
            .calls()
            .iter()
            .filter(|(_, ids)| !ids[0].starts_with("blocker"))
            .map(|(_, ids)| ids.len())
            .collect();
        assert_eq!(sent, vec![1, 1, 1], "{sent:?}");
    }
}
