//! The server's errors and their one mapping to HTTP status codes and OpenAI-style JSON bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

/// An error a request can end with.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The body is not UTF-8 JSON.
    Malformed(String),
    /// A parameter is invalid (the field is named).
    Invalid { param: String, message: String },
    /// Unknown model or route.
    NotFound {
        param: Option<String>,
        message: String,
    },
    /// The prompt (plus answer) does not fit the model.
    TooLong(String),
    /// The queue is full.
    Overloaded,
    /// The request ran past its deadline.
    Timeout,
    /// The engine failed (never user input). The message is a fixed text: causes (which may carry
    /// backtraces and source paths) go to the log, never into a response.
    Internal(&'static str),
    /// A POST whose body is not declared `application/json`.
    UnsupportedMediaType(String),
    /// A request from a browser page of an origin this server does not allow.
    ForbiddenOrigin(String),
    /// The server holds as many connections as it may.
    Unavailable(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            param: param.to_string(),
            message: message.into(),
        }
    }

    /// The HTTP status and the OpenAI error `type`.
    pub fn status(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Malformed(_) => (StatusCode::BAD_REQUEST, "invalid_request_error"),
            ApiError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error"),
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found_error"),
            ApiError::TooLong(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error"),
            ApiError::Overloaded => (StatusCode::TOO_MANY_REQUESTS, "overloaded_error"),
            ApiError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            ApiError::UnsupportedMediaType(_) => {
                (StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error")
            }
            ApiError::ForbiddenOrigin(_) => (StatusCode::FORBIDDEN, "permission_error"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "overloaded_error"),
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::Malformed(m)
            | ApiError::TooLong(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::ForbiddenOrigin(m)
            | ApiError::Unavailable(m) => m.clone(),
            ApiError::Internal(m) => m.to_string(),
            ApiError::Invalid { message, .. } | ApiError::NotFound { message, .. } => {
                message.clone()
            }
            ApiError::Overloaded => {
                "the server is busy: the request queue is full, retry later".into()
            }
            ApiError::Timeout => "the request ran past the server's time limit".into(),
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { param, .. } => Some(param),
            ApiError::NotFound { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    /// The JSON body (also sent as an SSE error event).
    pub fn body(&self) -> serde_json::Value {
        let (_, kind) = self.status();
        let message = self.message();
        serde_json::to_value(ErrorBody {
            error: ErrorDetail {
                message: &message,
                kind,
                param: self.param(),
                code: None,
            },
        })
        .unwrap_or_default()
    }
}

/// The message of every internal failure.
pub const INTERNAL: &str = "internal error: the server failed on this request";

/// The one mapping of library errors to API errors, by variant: what the user sent is 422 (413
/// when prompt + answer exceed the context); a cancelled job stays "cancelled"; anything else is
/// the server's fault: 500 with a generic message, and the cause goes to the log.
impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        use crate::Error as E;
        match e {
            E::InvalidSetting { ref name, .. } => ApiError::Invalid {
                param: name.clone(),
                message: e.to_string(),
            },
            E::TooLong {
                prompt,
                answer,
                max,
            } => ApiError::TooLong(format!(
                "prompt ({prompt} tokens) + max_tokens ({answer}) exceeds the model's context of {max} tokens"
            )),
            E::Template(e) => ApiError::invalid("messages", format!("chat template: {e}")),
            E::Cancelled => ApiError::Internal("cancelled"),
            // the model's own config.json, never a request's: the server's fault
            E::Config { .. }
            | E::UnsupportedArchitecture { .. }
            | E::MissingTensor { .. }
            | E::TensorShape { .. }
            | E::Checkpoint { .. }
            | E::Io { .. }
            | E::Json { .. }
            | E::DataLine { .. }
            | E::Tokenizer(_)
            | E::Tensor(_)
            | E::OutputFolder { .. }
            | E::NonFinite { .. } => {
                tracing::error!("request failed inside the engine: {e}");
                ApiError::Internal(INTERNAL)
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status();
        (status, Json(self.body())).into_response()
    }
}
