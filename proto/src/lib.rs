//! cim wire messages (generated from `proto/cim.proto` by prost) and the framing every stream
//! uses: a 4-byte big-endian length followed by that many protobuf bytes.
//!
//! A frame longer than the reader's limit is refused from its length prefix alone, before any
//! buffer is allocated, so a peer cannot make us allocate more than the limit.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Generated protobuf types, package `cim.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/cim.v1.rs"));
}

pub use prost::Message as ProstMessage;

/// Default largest frame accepted on client streams: bodies are capped well below this.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Bytes in the length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// `SendAck.code` of a send whose outcome the server could not learn (no router answered):
/// the message may or may not be stored, and a resend with the same `client_msg_id` settles it.
pub const SEND_RETRY: &str = "retry";

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announced more bytes than the limit allows.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        max: usize,
    },
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The frame bytes are not a valid protobuf message of the expected type.
    #[error("malformed frame: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The underlying stream failed.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Encodes `msg` as one frame, refusing messages larger than `max`.
pub fn encode_frame<M: Message>(msg: &M, max: usize) -> Result<Bytes, FrameError> {
    let len = msg.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX + len);
    // `len <= max`, and callers keep `max` far below u32::MAX.
    buf.put_u32(len as u32);
    msg.encode(&mut buf)
        .map_err(|_| FrameError::TooLarge { len, max })?;
    Ok(buf.freeze())
}

/// Decodes one frame from the start of `buf` without I/O.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, otherwise the message and
/// the number of bytes it used.
pub fn decode_frame<M: Message + Default>(
    buf: &[u8],
    max: usize,
) -> Result<Option<(M, usize)>, FrameError> {
    let Some(prefix) = buf.get(..LENGTH_PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let Some(body) = buf.get(LENGTH_PREFIX..LENGTH_PREFIX + len) else {
        return Ok(None);
    };
    Ok(Some((M::decode(body)?, LENGTH_PREFIX + len)))
}

/// Reads one frame. Returns `Ok(None)` if the stream ends cleanly before a new frame starts.
pub async fn read_frame<M, R>(reader: &mut R, max: usize) -> Result<Option<M>, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    let mut prefix = [0u8; LENGTH_PREFIX];
    let mut filled = 0;
    while filled < LENGTH_PREFIX {
        let n = reader.read(&mut prefix[filled..]).await?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        filled += n;
    }
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Truncated
        } else {
            FrameError::Io(e)
        }
    })?;
    Ok(Some(M::decode(body.as_slice())?))
}

/// Reads one frame and treats a clean end of stream as [`FrameError::Truncated`].
pub async fn read_required<M, R>(reader: &mut R, max: usize) -> Result<M, FrameError>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    read_frame(reader, max).await?.ok_or(FrameError::Truncated)
}

/// Writes one frame.
pub async fn write_frame<M, W>(writer: &mut W, msg: &M, max: usize) -> Result<(), FrameError>
where
    M: Message,
    W: AsyncWrite + Unpin,
{
    let frame = encode_frame(msg, max)?;
    writer.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::v1::{ChatMessage, Delivery, chat_message::Target};
    use super::*;
    use proptest::prelude::*;

    fn chat(body: String, client_msg_id: u64, to: u64) -> ChatMessage {
        ChatMessage {
            client_msg_id,
            target: Some(Target::ToUser(to)),
            body,
        }
    }

    proptest! {
        #[test]
        fn frames_round_trip(body in ".{0,300}", id in any::<u64>(), to in any::<u64>()) {
            let msg = chat(body, id, to);
            let frame = encode_frame(&msg, DEFAULT_MAX_FRAME).unwrap();
            let (back, used) = decode_frame::<ChatMessage>(&frame, DEFAULT_MAX_FRAME).unwrap().unwrap();
            prop_assert_eq!(back, msg);
            prop_assert_eq!(used, frame.len());
        }

        #[test]
        fn partial_frames_ask_for_more(body in ".{1,100}", cut in 0usize..4) {
            let frame = encode_frame(&chat(body, 1, 2), DEFAULT_MAX_FRAME).unwrap();
            let short = &frame[..frame.len().saturating_sub(cut + 1)];
            prop_assert!(decode_frame::<ChatMessage>(short, DEFAULT_MAX_FRAME).unwrap().is_none());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame::<Delivery>(&bytes, 128);
        }
    }

    #[test]
    fn oversize_length_is_refused_before_reading_the_body() {
        // Announces 4 GiB but carries nothing: must fail on the prefix alone.
        let buf = [0xff, 0xff, 0xff, 0xff];
        let err = decode_frame::<ChatMessage>(&buf, 1024).unwrap_err();
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0xffff_ffff,
                max: 1024
            }
        ));
    }

    #[test]
    fn encoding_refuses_oversize_messages() {
        let msg = chat("x".repeat(2000), 1, 2);
        assert!(matches!(
            encode_frame(&msg, 1000),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn async_reader_sees_clean_end_truncation_and_oversize() {
        let frame = encode_frame(&chat("hi".into(), 7, 9), 1024).unwrap();
        let mut two = frame.to_vec();
        two.extend_from_slice(&frame);
        let mut r = two.as_slice();
        assert_eq!(
            read_frame::<ChatMessage, _>(&mut r, 1024)
                .await
                .unwrap()
                .unwrap()
                .client_msg_id,
            7
        );
        assert!(
            read_frame::<ChatMessage, _>(&mut r, 1024)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            read_frame::<ChatMessage, _>(&mut r, 1024)
                .await
                .unwrap()
                .is_none()
        );

        let mut cut = &frame[..frame.len() - 1];
        assert!(matches!(
            read_frame::<ChatMessage, _>(&mut cut, 1024).await,
            Err(FrameError::Truncated)
        ));

        let mut big = &[0u8, 0, 8, 0][..];
        assert!(matches!(
            read_frame::<ChatMessage, _>(&mut big, 1024).await,
            Err(FrameError::TooLarge { .. })
        ));
    }
}
