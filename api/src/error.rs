//! Error shapes shared by the agent API and its clients.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The machine-readable kind of an API error, as spelled on the wire
/// (`"invalid"`, `"missing"`, `"unsupported"`, `"not_found"`, `"conflict"`,
/// `"internal"`, `"unauthorized"`, `"policy_denied"`, `"unavailable"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The value is malformed or out of range (HTTP 400).
    Invalid,
    /// A required field is absent (HTTP 400).
    Missing,
    /// Valid, but this agent cannot serve it (HTTP 422).
    Unsupported,
    /// The named object does not exist (HTTP 404).
    NotFound,
    /// The request clashes with the current state (HTTP 409).
    Conflict,
    /// The agent failed (HTTP 500).
    Internal,
    /// The request lacks the bearer token the TCP listener requires (HTTP 401).
    Unauthorized,
    /// Valid, but the agent's policy refuses it; the message names the rule
    /// (HTTP 403).
    PolicyDenied,
    /// The agent is handing its pods over to a new agent and takes no
    /// change meanwhile; try again shortly (HTTP 503).
    Unavailable,
}

impl ErrorCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::Missing => "missing",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Internal => "internal",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::PolicyDenied => "policy_denied",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validation failure that names the offending field (a JSON path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub code: ErrorCode,
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(code: ErrorCode, field: &str, message: &str) -> Self {
        FieldError {
            code,
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn invalid(field: &str, message: &str) -> Self {
        Self::new(ErrorCode::Invalid, field, message)
    }
    pub fn missing(field: &str) -> Self {
        Self::new(ErrorCode::Missing, field, "is required")
    }
    pub fn unsupported(field: &str, message: &str) -> Self {
        Self::new(ErrorCode::Unsupported, field, message)
    }
    pub fn not_found(field: &str, message: &str) -> Self {
        Self::new(ErrorCode::NotFound, field, message)
    }
    pub fn conflict(field: &str, message: &str) -> Self {
        Self::new(ErrorCode::Conflict, field, message)
    }
    pub fn unavailable(message: &str) -> Self {
        Self::new(ErrorCode::Unavailable, "agent", message)
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
    pub code: ErrorCode,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn codes_keep_their_wire_spelling() {
        for (code, s) in [
            (ErrorCode::Invalid, "invalid"),
            (ErrorCode::Missing, "missing"),
            (ErrorCode::Unsupported, "unsupported"),
            (ErrorCode::NotFound, "not_found"),
            (ErrorCode::Conflict, "conflict"),
            (ErrorCode::Internal, "internal"),
            (ErrorCode::Unauthorized, "unauthorized"),
            (ErrorCode::PolicyDenied, "policy_denied"),
        ] {
            assert_eq!(code.as_str(), s);
            assert_eq!(code.to_string(), s);
            assert_eq!(serde_json::to_value(code).ok(), Some(json!(s)));
            assert_eq!(
                serde_json::from_value::<ErrorCode>(json!(s)).ok(),
                Some(code)
            );
        }
    }

    #[test]
    fn error_body_json_is_unchanged() {
        let body = ErrorBody::from(FieldError::conflict("target", "busy"));
        assert_eq!(
            serde_json::to_string(&body).ok().as_deref(),
            Some(r#"{"error":{"code":"conflict","message":"target: busy","field":"target"}}"#)
        );
        let fe = FieldError::missing("action.type");
        assert_eq!(
            serde_json::to_value(&fe).ok(),
            Some(json!({"code": "missing", "field": "action.type", "message": "is required"}))
        );
    }
}
