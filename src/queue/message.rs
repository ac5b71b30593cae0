//! The wire format of a dispatch: a protobuf `DispatchMessage`, decoded
//! strictly so that a worker can tell a poison message from a real one.

use prost::Message;
use uuid::Uuid;

use crate::proto::v1::DispatchMessage;

/// Content type of every dispatch.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// Why a message is not a valid dispatch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a protobuf `DispatchMessage`.
    #[error("not a DispatchMessage: {0}")]
    Encoding(String),
    /// The job id is not a UUID.
    #[error("job_id {0:?} is not a UUID")]
    JobId(String),
}

/// Encodes a dispatch.
pub fn encode(message: &DispatchMessage) -> Vec<u8> {
    message.encode_to_vec()
}

/// Decodes and checks a dispatch; returns the message and its job id.
pub fn decode(bytes: &[u8]) -> Result<(DispatchMessage, Uuid), DecodeError> {
    let message =
        DispatchMessage::decode(bytes).map_err(|e| DecodeError::Encoding(e.to_string()))?;
    let id = Uuid::try_parse(&message.job_id)
        .ok()
        .filter(|_| message.job_id.len() == 36)
        .ok_or_else(|| DecodeError::JobId(message.job_id.chars().take(64).collect()))?;
    Ok((message, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dispatch_round_trips() {
        let id = Uuid::new_v4();
        let msg = DispatchMessage {
            job_id: id.to_string(),
            kind: "sleep".into(),
            queue: "default".into(),
            attempt: 1,
            published_at: None,
            namespace: "team-a".into(),
            max_attempts: 3,
        };
        assert_eq!(decode(&encode(&msg)), Ok((msg, id)));
    }

    #[test]
    fn garbage_and_bad_ids_are_rejected() {
        assert!(matches!(
            decode(b"\xff\xff\xff"),
            Err(DecodeError::Encoding(_))
        ));
        assert!(matches!(
            decode(b"{\"job_id\":1}"),
            Err(DecodeError::Encoding(_))
        ));
        let empty = DispatchMessage::default();
        assert!(matches!(
            decode(&encode(&empty)),
            Err(DecodeError::JobId(_))
        ));
        let bad = DispatchMessage {
            job_id: "not-a-uuid".into(),
            ..DispatchMessage::default()
        };
        assert_eq!(
            decode(&encode(&bad)),
            Err(DecodeError::JobId("not-a-uuid".into()))
        );
    }
}
