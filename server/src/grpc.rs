//! The gRPC face of [`JobService`]: decode, call, map the error. Nothing
//! else happens here.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use orchestrator::proto::v1::job_service_server;
use orchestrator::proto::v1::{
    CancelJobRequest, GetJobRequest, Job, ListJobsRequest, ListJobsResponse, SubmitJobRequest,
    WatchJobRequest,
};
use tonic::{Request, Response, Status};

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
    async fn submit_job(&self, request: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.service.submit(request.into_inner()).await?))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.service.get(&request.into_inner().job_id).await?))
    }

    async fn cancel_job(&self, request: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        Ok(Response::new(self.service.cancel(&request.into_inner().job_id).await?))
    }

    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        Ok(Response::new(self.service.list(request.into_inner()).await?))
    }

    type WatchJobStream = Pin<Box<dyn Stream<Item = Result<Job, Status>> + Send + 'static>>;

    async fn watch_job(
        &self,
        request: Request<WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let stream = self.service.watch(&request.into_inner().job_id).await?;
        Ok(Response::new(stream.map(|item| item.map_err(Status::from)).boxed()))
    }
}
