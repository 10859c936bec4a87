//! The registry's error: a field error the server maps onto a 4xx, or an
//! internal one (500).

use netfault_api::FieldError;

use crate::backend::BackendError;

/// Why a request failed. The server maps a field error's code onto the
/// HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Field(FieldError),
    #[error("{0}")]
    Internal(String),
}

impl From<FieldError> for AgentError {
    fn from(e: FieldError) -> Self {
        AgentError::Field(e)
    }
}

impl From<BackendError> for AgentError {
    fn from(e: BackendError) -> Self {
        AgentError::Internal(e.to_string())
    }
}
