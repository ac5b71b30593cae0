//! The wire formats on the broker: a dispatch is a protobuf
//! `DispatchMessage`, a control message (a pushed cancellation) a protobuf
//! `ControlMessage`; both decoded strictly so that a worker can tell a
//! poison message from a real one.

use prost::Message;
use uuid::Uuid;

use crate::proto::v1::{ControlMessage, DispatchBatch, DispatchMessage};

/// Content type of every dispatch and control message.
pub const CONTENT_TYPE: &str = "application/x-protobuf";

/// The AMQP `type` property of a message holding a `DispatchBatch`; a
/// message without it holds one `DispatchMessage`.
pub const BATCH_TYPE: &str = "orchestrator.v1.DispatchBatch";

/// Most dispatches in one batch message: bounds the message size and how
/// many jobs one worker can take off the queue in one delivery.
pub const MAX_BATCH: usize = 50;

/// Why a message is not a valid dispatch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Not a protobuf `DispatchMessage` (or `ControlMessage`).
    #[error("not a {message}: {error}")]
    Encoding {
        /// The message type expected.
        message: &'static str,
        /// What the decoder said.
        error: String,
    },
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
    let message = DispatchMessage::decode(bytes).map_err(|e| DecodeError::Encoding {
        message: "DispatchMessage",
        error: e.to_string(),
    })?;
    let id = job_id(&message.job_id)?;
    Ok((message, id))
}

/// Whether a message whose AMQP `type` property is `kind` holds a
/// `DispatchBatch` (otherwise it holds one `DispatchMessage`).
pub fn is_batch(kind: Option<&str>) -> bool {
    kind == Some(BATCH_TYPE)
}

/// Decodes a dispatch message's body, a batch when `batch` (see
/// [`is_batch`]): the dispatches it holds, each checked.
pub fn decode_dispatches(batch: bool, bytes: &[u8]) -> Result<Vec<DispatchMessage>, DecodeError> {
    if batch {
        decode_batch(bytes)
    } else {
        decode(bytes).map(|(dispatch, _)| vec![dispatch])
    }
}

/// The body and AMQP `type` of one message holding `dispatches` (all for
/// one queue): a plain dispatch for one, a batch for several; what
/// [`decode_dispatches`] reads back.
pub fn encode_dispatches(dispatches: &[DispatchMessage]) -> (Vec<u8>, Option<&'static str>) {
    match dispatches {
        [one] => (encode(one), None),
        several => (encode_batch(several), Some(BATCH_TYPE)),
    }
}

/// Encodes dispatches for one queue as a batch message body.
pub fn encode_batch(dispatches: &[DispatchMessage]) -> Vec<u8> {
    DispatchBatch {
        dispatches: dispatches.to_vec(),
    }
    .encode_to_vec()
}

/// Decodes and checks a batch message: every dispatch in it must be valid
/// (one bad entry makes the whole message a poison message), and an empty
/// batch is not a batch.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<DispatchMessage>, DecodeError> {
    let batch = DispatchBatch::decode(bytes).map_err(|e| DecodeError::Encoding {
        message: "DispatchBatch",
        error: e.to_string(),
    })?;
    if batch.dispatches.is_empty() {
        return Err(DecodeError::Encoding {
            message: "DispatchBatch",
            error: "no dispatches".into(),
        });
    }
    for dispatch in &batch.dispatches {
        job_id(&dispatch.job_id)?;
    }
    Ok(batch.dispatches)
}

fn job_id(text: &str) -> Result<Uuid, DecodeError> {
    Uuid::try_parse(text)
        .ok()
        .filter(|_| text.len() == 36)
        .ok_or_else(|| DecodeError::JobId(text.chars().take(64).collect()))
}

/// Encodes a control message.
pub fn encode_control(message: &ControlMessage) -> Vec<u8> {
    message.encode_to_vec()
}

/// Decodes and checks a control message; returns the message and its job id.
pub fn decode_control(bytes: &[u8]) -> Result<(ControlMessage, Uuid), DecodeError> {
    let message = ControlMessage::decode(bytes).map_err(|e| DecodeError::Encoding {
        message: "ControlMessage",
        error: e.to_string(),
    })?;
    let id = job_id(&message.job_id)?;
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
            Err(DecodeError::Encoding { .. })
        ));
        assert!(matches!(
            decode(b"{\"job_id\":1}"),
            Err(DecodeError::Encoding { .. })
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

    #[test]
    fn a_control_message_round_trips_and_is_checked() {
        use crate::proto::v1::control_message::Action;
        let id = Uuid::new_v4();
        let msg = ControlMessage {
            action: Action::Cancel as i32,
            job_id: id.to_string(),
            attempt: 2,
            sent_at: None,
        };
        assert_eq!(decode_control(&encode_control(&msg)), Ok((msg, id)));
        let err = decode_control(b"\xff\xff").unwrap_err();
        assert!(err.to_string().starts_with("not a ControlMessage"), "{err}");
        let bad = ControlMessage {
            job_id: "x".into(),
            ..ControlMessage::default()
        };
        assert_eq!(
            decode_control(&encode_control(&bad)),
            Err(DecodeError::JobId("x".into()))
        );
    }

    #[test]
    fn a_batch_round_trips_and_one_bad_entry_spoils_it() {
        let dispatch = |id: String| DispatchMessage {
            job_id: id,
            kind: "noop".into(),
            queue: "default".into(),
            attempt: 1,
            ..DispatchMessage::default()
        };
        let good: Vec<_> = (0..3)
            .map(|_| dispatch(Uuid::new_v4().to_string()))
            .collect();
        assert_eq!(decode_batch(&encode_batch(&good)).unwrap(), good);
        assert!(is_batch(Some(BATCH_TYPE)));
        assert!(!is_batch(None) && !is_batch(Some("other")));
        assert_eq!(decode_dispatches(true, &encode_batch(&good)).unwrap(), good);
        assert_eq!(
            decode_dispatches(false, &encode(&good[0])).unwrap(),
            good[..1]
        );
        // encode_dispatches picks the form decode_dispatches reads back.
        for n in [1, 3] {
            let (body, kind) = encode_dispatches(&good[..n]);
            assert_eq!(kind.is_some(), n > 1);
            assert_eq!(decode_dispatches(is_batch(kind), &body).unwrap(), good[..n]);
        }

        let mut bad = good.clone();
        bad[1].job_id = "nope".into();
        assert_eq!(
            decode_batch(&encode_batch(&bad)),
            Err(DecodeError::JobId("nope".into()))
        );
        assert!(matches!(
            decode_batch(&encode_batch(&[])),
            Err(DecodeError::Encoding { .. })
        ));
        assert!(decode_batch(b"\xff\xff garbage").is_err());
    }
}
