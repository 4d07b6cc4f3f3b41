//! The aggregator's OTLP profiles client: sends
//! `ProfilesService/Export` requests to another backend (an OpenTelemetry
//! Collector, a profiles store). One lazily connected HTTP/2 channel,
//! reconnected by tonic after failures; what to retry is the caller's call,
//! from [`SendError::retryable`].

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::otlp::proto::collector::ExportProfilesServiceRequest;
use super::otlp::proto::collector::profiles_service_client::ProfilesServiceClient;

/// Why an export endpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ExportConfigError {
    /// Not a usable URL.
    #[error("OTLP export endpoint `{endpoint}`: {reason}")]
    Endpoint {
        /// The endpoint as configured.
        endpoint: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Why one send failed.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// Whether OTLP says to retry (the receiver is unavailable, or overloaded).
    pub retryable: bool,
    /// The status or transport error.
    pub message: String,
}

/// A client of one OTLP profiles endpoint.
#[derive(Clone, Debug)]
pub struct OtlpExportClient {
    client: ProfilesServiceClient<Channel>,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl OtlpExportClient {
    /// A client of `endpoint` (`http://host:4317`), sending `token` as a
    /// bearer token when given. Connects on the first send. Must be called
    /// inside a tokio runtime.
    pub fn new(endpoint: &str, token: Option<&str>, timeout: Duration) -> Result<OtlpExportClient, ExportConfigError> {
        let bad = |reason: String| ExportConfigError::Endpoint { endpoint: endpoint.to_owned(), reason };
        if !endpoint.starts_with("http://") {
            return Err(bad(
                "only plaintext `http://host:port` endpoints are supported (TLS to the endpoint is not); put a \
                 local OpenTelemetry Collector in between to reach a TLS endpoint"
                    .into(),
            ));
        }
        let channel = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(timeout)
            .timeout(timeout)
            .connect_lazy();
        let authorization = match token.filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| bad("the token holds characters a gRPC header cannot carry".into()))?,
            ),
        };
        Ok(OtlpExportClient { client: ProfilesServiceClient::new(channel), authorization })
    }

    /// Sends one request; `Ok` once the receiver accepted it.
    pub async fn send(&self, request: ExportProfilesServiceRequest) -> Result<(), SendError> {
        let mut request = tonic::Request::new(request);
        if let Some(a) = &self.authorization {
            request.metadata_mut().insert("authorization", a.clone());
        }
        let mut client = self.client.clone();
        match client.export(request).await {
            Ok(response) => match response.into_inner().partial_success {
                Some(p) if p.rejected_profiles > 0 => Err(SendError {
                    retryable: false,
                    message: format!("the receiver rejected {} profiles: {}", p.rejected_profiles, p.error_message),
                }),
                _ => Ok(()),
            },
            Err(status) => {
                use tonic::Code::*;
                let retryable = matches!(
                    status.code(),
                    Unavailable | DeadlineExceeded | Aborted | Cancelled | ResourceExhausted | DataLoss | Unknown
                );
                Err(SendError { retryable, message: format!("{:?}: {}", status.code(), status.message()) })
            }
        }
    }
}
