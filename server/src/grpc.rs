//! The gRPC faces of [`JobService`] and [`AttemptService`]: decode, call, map the error. Nothing
//! else happens here; authentication is the interceptor's (`crate::auth`), which hands over the
//! caller.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use orchestrator::proto::v1::{
    AttemptError, FinishAttemptResult, FinishAttemptsRequest, FinishAttemptsResponse,
    StartAttemptResult, StartAttemptsRequest, StartAttemptsResponse, finish_attempt_result,
    start_attempt_result,
};
use orchestrator::proto::v1::{
    CancelJobRequest, FinishAttemptRequest, GetJobRequest, GetServerInfoRequest, HeartbeatRequest,
    HeartbeatResponse, Job, ListJobsRequest, ListJobsResponse, ServerInfo, StartAttemptRequest,
    StartAttemptResponse, SubmitJobRequest, SubmitJobsRequest, SubmitJobsResponse, WatchJobRequest,
    job_service_server, worker_service_server,
};
use tonic::{Request, Response, Status};

use crate::attempts::AttemptService;
use crate::auth::grpc_caller;
use crate::service::JobService;

/// The tonic implementation of `orchestrator.v1.JobService`.
#[derive(Clone)]
pub struct GrpcJobs {
    service: JobService,
}

impl GrpcJobs {
    /// Wraps the shared service.
    pub fn new(service: JobService) -> Self {
        GrpcJobs { service }
    }
}

#[tonic::async_trait]
impl job_service_server::JobService for GrpcJobs {
    async fn submit_job(
        &self,
        request: Request<SubmitJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let caller = grpc_caller(&request)?;
        Ok(Response::new(
            self.service.submit(request.into_inner(), &caller).await?,
        ))
    }

    async fn submit_jobs(
        &self,
        request: Request<SubmitJobsRequest>,
    ) -> Result<Response<SubmitJobsResponse>, Status> {
        let caller = grpc_caller(&request)?;
        Ok(Response::new(
            self.service
                .submit_many(request.into_inner(), &caller)
                .await?,
        ))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let caller = grpc_caller(&request)?;
        Ok(Response::new(
            self.service
                .get(&request.into_inner().job_id, &caller)
                .await?,
        ))
    }

    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<Job>, Status> {
        let caller = grpc_caller(&request)?;
        Ok(Response::new(
            self.service
                .cancel(&request.into_inner().job_id, &caller)
                .await?,
        ))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let caller = grpc_caller(&request)?;
        Ok(Response::new(
            self.service.list(request.into_inner(), &caller).await?,
        ))
    }

    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<Job, Status>> + Send + 'static>>;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = grpc_caller(&request)?;
        let stream = self
            .service
            .watch(&request.into_inner().job_id, &caller)
            .await?;
        Ok(Response::new(
            stream.map(|item| item.map_err(Status::from)).boxed(),
        ))
    }
}

/// The tonic implementation of `orchestrator.v1.WorkerService`.
#[derive(Clone)]
pub struct GrpcWorkers {
    attempts: AttemptService,
    info: ServerInfo,
}

impl GrpcWorkers {
    /// Wraps the worker operations; `info` is what GetServerInfo answers.
    pub fn new(attempts: AttemptService, info: ServerInfo) -> Self {
        GrpcWorkers { attempts, info }
    }
}

#[tonic::async_trait]
impl worker_service_server::WorkerService for GrpcWorkers {
    async fn start_attempt(
        &self,
        request: Request<StartAttemptRequest>,
    ) -> Result<Response<StartAttemptResponse>, Status> {
        let caller = grpc_caller(&request)?;
        Ok(Response::new(
            self.attempts.start(request.into_inner(), &caller).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        Ok(Response::new(
            self.attempts.heartbeat(request.into_inner()).await?,
        ))
    }

    async fn get_server_info(
        &self,
        request: Request<GetServerInfoRequest>,
    ) -> Result<Response<ServerInfo>, Status> {
        let caller = grpc_caller(&request)?;
        Ok(Response::new(ServerInfo {
            namespace: caller.namespace,
            role: caller.role.as_str().into(),
            ..self.info.clone()
        }))
    }

    async fn finish_attempt(
        &self,
        request: Request<FinishAttemptRequest>,
    ) -> Result<Response<Job>, Status> {
        let caller = grpc_caller(&request)?;
        Ok(Response::new(
            self.attempts.finish(request.into_inner(), &caller).await?,
        ))
    }

    async fn start_attempts(
        &self,
        request: Request<StartAttemptsRequest>,
    ) -> Result<Response<StartAttemptsResponse>, Status> {
        let caller = grpc_caller(&request)?;
        let outcomes = self
            .attempts
            .start_many(request.into_inner().attempts, &caller)
            .await?;
        let results = per_request(outcomes, start_attempt_result::Result::Answer, |result| {
            StartAttemptResult {
                result: Some(result.unwrap_or_else(start_attempt_result::Result::Error)),
            }
        });
        Ok(Response::new(StartAttemptsResponse { results }))
    }

    async fn finish_attempts(
        &self,
        request: Request<FinishAttemptsRequest>,
    ) -> Result<Response<FinishAttemptsResponse>, Status> {
        let caller = grpc_caller(&request)?;
        let outcomes = self
            .attempts
            .finish_many(request.into_inner().attempts, &caller)
            .await?;
        let results = per_request(outcomes, finish_attempt_result::Result::Job, |result| {
            FinishAttemptResult {
                result: Some(result.unwrap_or_else(finish_attempt_result::Result::Error)),
            }
        });
        Ok(Response::new(FinishAttemptsResponse { results }))
    }
}

/// The results of a batch call, one per request: `answer` of what the
/// request returned, or the error the single call would have failed with.
fn per_request<T, A, R>(
    outcomes: Vec<orchestrator::error::Result<T>>,
    answer: impl Fn(T) -> A,
    result: impl Fn(Result<A, AttemptError>) -> R,
) -> Vec<R> {
    outcomes
        .into_iter()
        .map(|outcome| {
            result(outcome.map(&answer).map_err(|e| {
                let status = Status::from(e);
                AttemptError {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                }
            }))
        })
        .collect()
}
