//! Error shapes shared by the agent API and its clients.

use serde::{Deserialize, Serialize};

/// A validation failure that names the offending field (a JSON path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Machine-readable code: `invalid`, `missing`, `unsupported`, `not_found`, `conflict`.
    pub code: String,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn invalid(field: &str, message: &str) -> Self {
        FieldError {
            code: "invalid".into(),
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn missing(field: &str) -> Self {
        FieldError {
            code: "missing".into(),
            field: field.into(),
            message: "is required".into(),
        }
    }
    pub fn unsupported(field: &str, message: &str) -> Self {
        FieldError {
            code: "unsupported".into(),
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn not_found(field: &str, message: &str) -> Self {
        FieldError {
            code: "not_found".into(),
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn conflict(field: &str, message: &str) -> Self {
        FieldError {
            code: "conflict".into(),
            field: field.into(),
            message: message.into(),
        }
    }
    /// Nests this error under `prefix` (for faults inside an annotation list).
    pub fn prefixed(mut self, prefix: &str) -> Self {
        self.field = if self.field.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.field)
        };
        self
    }
}

/// The body of every API error: `{"error": {"code", "message", "field"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl From<FieldError> for ErrorBody {
    fn from(e: FieldError) -> Self {
        ErrorBody {
            error: ErrorDetail {
                code: e.code,
                message: format!("{}: {}", e.field, e.message),
                field: Some(e.field),
            },
        }
    }
}
