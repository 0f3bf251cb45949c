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

/// The largest message body servers and routers take unless configured otherwise.
pub const DEFAULT_MAX_BODY_BYTES: usize = 16 * 1024;

/// The refusal text (with [`TOO_LARGE`]) for a body of `len` bytes where `max_body` is the
/// most taken: one wording wherever the limit is checked.
pub fn too_long(len: usize, max_body: usize) -> String {
    format!("message too long: {len} bytes, at most {max_body}")
}

/// `SendAck.code` of a send whose outcome is unknown (no router answered the server, or the
/// router's inbox append failed, perhaps only in its reply): the message may or may not be
/// stored, and a resend with the same `client_msg_id` settles it (without one, a resend may
/// store it twice).
pub const SEND_RETRY: &str = "retry";

/// Code of a request that could not be served now and did nothing (no router reached, or the
/// router could not reach its store). For a send (`SendAck.code`): refused before anything
/// was stored (also when the router holds no message-id node yet), so sending it again, to
/// any router, is safe.
pub const SEND_UNAVAILABLE: &str = "unavailable";

/// Codes of a send refused for the message itself, which no attempt of it escapes: too large,
/// malformed (empty, no recipient), to a user that does not exist, or under a client message
/// id recorded for another message.
pub const TOO_LARGE: &str = "too_large";
/// See [`TOO_LARGE`].
pub const BAD_REQUEST: &str = "bad_request";
/// See [`TOO_LARGE`].
pub const UNKNOWN_USER: &str = "unknown_user";
/// See [`TOO_LARGE`].
pub const CLIENT_MSG_ID_REUSED: &str = "client_msg_id_reused";

/// `SendAck.code` (and the API's) for a private message whose recipient blocks its sender:
/// nothing was stored, and a resend is refused the same way while the block stands.
pub const BLOCKED: &str = "blocked";

/// Code of a request refused for its sender's rate (sends, pulls, group requests, API calls):
/// nothing was done; the same request later may succeed.
pub const RATE_LIMITED: &str = "rate_limited";

/// Code of a session confirmation the router refused because the session is not the user's
/// (another login replaced it, it was logged out, or its route lapsed): the login must end.
pub const SESSION_REPLACED: &str = "session_replaced";

/// The group that reaches everyone online (CIM's group chat).
pub const BROADCAST_GROUP: &str = "all";

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
    let mut buf = BytesMut::new();
    encode_frame_into(msg, max, &mut buf)?;
    Ok(buf.freeze())
}

/// Appends `msg` to `buf` as one frame, refusing messages larger than `max`: several frames
/// in one buffer, for one write.
pub fn encode_frame_into<M: Message>(
    msg: &M,
    max: usize,
    buf: &mut BytesMut,
) -> Result<(), FrameError> {
    let len = msg.encoded_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    buf.reserve(LENGTH_PREFIX + len);
    // `len <= max`, and callers keep `max` far below u32::MAX.
    buf.put_u32(len as u32);
    msg.encode(buf)
        .map_err(|_| FrameError::TooLarge { len, max })
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

/// Bytes of a frame's body set aside before any of it has arrived; a longer body's buffer grows
/// as its bytes come (doubling, never past the announced length). A peer that sends length
/// prefixes alone, on every stream it may open, so holds this much per stream instead of its
/// frame limit.
const FIRST_BODY_ALLOCATION: usize = 1024;

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
    let mut body = Vec::with_capacity(len.min(FIRST_BODY_ALLOCATION));
    while body.len() < len {
        let remaining = len - body.len();
        if body.len() == body.capacity() {
            body.reserve_exact(remaining.min(body.capacity()));
        }
        if reader.read_buf(&mut (&mut body).limit(remaining)).await? == 0 {
            return Err(FrameError::Truncated);
        }
    }
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

/// A [`v1::Delivery`] encoded once for all its recipients: every field but `seq`, which is
/// each recipient's own inbox position. A fan-out queues one of these (a reference-counted
/// buffer, cheap to clone) per recipient instead of a copy of the message, and [`encode_delivery_batch`] writes a
/// `DeliveryBatch` frame from them without encoding the message again.
#[derive(Debug, Clone)]
pub struct SharedDelivery {
    /// The delivery encoded with `seq` 0 (which protobuf leaves out).
    fields: Bytes,
}

/// Key of `DeliveryBatch.deliveries` (field 1, length-delimited).
const BATCH_DELIVERY_KEY: u8 = (1 << 3) | 2;
/// Key of `Delivery.seq` (field 2, varint).
const DELIVERY_SEQ_KEY: u8 = 2 << 3;

impl SharedDelivery {
    /// Encodes `delivery`; its `seq` is ignored.
    pub fn new(mut delivery: v1::Delivery) -> Self {
        delivery.seq = 0;
        Self {
            fields: Bytes::from(delivery.encode_to_vec()),
        }
    }

    /// Length of the delivery with `seq`, as one message.
    fn message_len(&self, seq: u64) -> usize {
        let seq_len = if seq == 0 {
            0
        } else {
            1 + prost::encoding::encoded_len_varint(seq)
        };
        seq_len + self.fields.len()
    }

    /// Bytes the delivery with `seq` takes inside a `DeliveryBatch`.
    pub fn batch_len(&self, seq: u64) -> usize {
        let len = self.message_len(seq);
        1 + prost::length_delimiter_len(len) + len
    }

    fn encode_in_batch(&self, seq: u64, buf: &mut BytesMut) {
        buf.put_u8(BATCH_DELIVERY_KEY);
        encode_varint(self.message_len(seq) as u64, buf);
        if seq != 0 {
            // Protobuf takes fields in any order: seq first, then the shared ones.
            buf.put_u8(DELIVERY_SEQ_KEY);
            encode_varint(seq, buf);
        }
        buf.put_slice(&self.fields);
    }
}

fn encode_varint(mut value: u64, buf: &mut BytesMut) {
    while value >= 0x80 {
        buf.put_u8((value as u8) | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

/// Encodes the frame of a `DeliveryBatch` holding `deliveries` (each with its recipient's
/// seq), decoding to what [`encode_frame`] of the same batch gives.
pub fn encode_delivery_batch<'a>(
    deliveries: impl Iterator<Item = (u64, &'a SharedDelivery)> + Clone,
    max: usize,
) -> Result<Bytes, FrameError> {
    let len = deliveries
        .clone()
        .map(|(seq, shared)| shared.batch_len(seq))
        .sum();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = BytesMut::with_capacity(LENGTH_PREFIX + len);
    buf.put_u32(len as u32);
    for (seq, shared) in deliveries {
        shared.encode_in_batch(seq, &mut buf);
    }
    debug_assert_eq!(buf.len(), LENGTH_PREFIX + len);
    Ok(buf.freeze())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::v1::{ChatMessage, Delivery, DeliveryBatch, chat_message::Target};
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
        fn frames_appended_to_one_buffer_read_back_in_order(
            bodies in proptest::collection::vec(".{0,100}", 0..6),
        ) {
            let mut buf = BytesMut::new();
            for (i, body) in bodies.iter().enumerate() {
                encode_frame_into(&chat(body.clone(), i as u64, 1), DEFAULT_MAX_FRAME, &mut buf).unwrap();
            }
            let mut rest = &buf[..];
            for (i, body) in bodies.iter().enumerate() {
                let (back, used) = decode_frame::<ChatMessage>(rest, DEFAULT_MAX_FRAME).unwrap().unwrap();
                prop_assert_eq!(back, chat(body.clone(), i as u64, 1));
                rest = &rest[used..];
            }
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn partial_frames_ask_for_more(body in ".{1,100}", cut in 0usize..4) {
            let frame = encode_frame(&chat(body, 1, 2), DEFAULT_MAX_FRAME).unwrap();
            let short = &frame[..frame.len().saturating_sub(cut + 1)];
            prop_assert!(decode_frame::<ChatMessage>(short, DEFAULT_MAX_FRAME).unwrap().is_none());
        }

        #[test]
        fn shared_deliveries_encode_as_the_batch_would(
            items in proptest::collection::vec(
                (any::<u64>(), any::<u64>(), ".{0,40}", ".{0,200}", any::<u64>(), 0u64..3),
                0..12,
            ),
        ) {
            let batch = DeliveryBatch {
                deliveries: items
                    .iter()
                    .map(|(msg_id, seq, name, body, at, group)| Delivery {
                        msg_id: *msg_id,
                        seq: *seq,
                        from_user: msg_id.wrapping_mul(7),
                        from_name: name.clone(),
                        group: if *group == 0 { String::new() } else { format!("g{group}") },
                        body: body.clone(),
                        created_at_ms: *at,
                        unsends: if *group == 2 { at.wrapping_add(1) } else { 0 },
                    })
                    .collect(),
            };
            let shared: Vec<(u64, SharedDelivery)> = batch
                .deliveries
                .iter()
                .map(|d| (d.seq, SharedDelivery::new(d.clone())))
                .collect();
            let frame = encode_delivery_batch(shared.iter().map(|(seq, s)| (*seq, s)), DEFAULT_MAX_FRAME).unwrap();
            let expected = encode_frame(&batch, DEFAULT_MAX_FRAME).unwrap();
            prop_assert_eq!(frame.len(), expected.len());
            let (back, used) = decode_frame::<DeliveryBatch>(&frame, DEFAULT_MAX_FRAME).unwrap().unwrap();
            prop_assert_eq!(back, batch);
            prop_assert_eq!(used, frame.len());
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

    /// A reader handing out `data` a few bytes at a time, recording the most room any read
    /// offered it.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
        most_room: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let this = &mut *self;
            this.most_room = this.most_room.max(buf.remaining());
            let n = this
                .step
                .min(buf.remaining())
                .min(this.data.len() - this.at);
            buf.put_slice(&this.data[this.at..this.at + n]);
            this.at += n;
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_body_is_read_into_room_that_grows_as_it_comes() {
        let body = "x".repeat(20_000);
        let frame = encode_frame(&chat(body.clone(), 3, 4), 64 * 1024).unwrap();
        // The prefix and the first bytes alone: the room offered stays at the first allocation.
        let mut prefix_only = Trickle {
            data: frame[..LENGTH_PREFIX + 10].to_vec(),
            at: 0,
            step: 7,
            most_room: 0,
        };
        assert!(matches!(
            read_frame::<ChatMessage, _>(&mut prefix_only, 64 * 1024).await,
            Err(FrameError::Truncated)
        ));
        assert!(
            prefix_only.most_room <= FIRST_BODY_ALLOCATION,
            "{}",
            prefix_only.most_room
        );
        // All of it, in small pieces and whole: the same message.
        for step in [1000, frame.len()] {
            let mut whole = Trickle {
                data: frame.to_vec(),
                at: 0,
                step,
                most_room: 0,
            };
            let back: ChatMessage = read_required(&mut whole, 64 * 1024).await.unwrap();
            assert_eq!(back.body, body);
            assert_eq!(whole.at, frame.len(), "read past the frame");
        }
    }
}
