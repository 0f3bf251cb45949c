//! Every protobuf entry point a peer can reach, through the length-prefixed framing: client
//! control and requests (server side), server control and deliveries (client side), router and
//! server requests and their replies (internal links).
#![no_main]

use cim_proto::v1::*;
use cim_proto::{ProstMessage, decode_frame};
use libfuzzer_sys::fuzz_target;

fn each<M: ProstMessage + Default>(data: &[u8]) {
    // Small limit so the length check is exercised too.
    let _ = decode_frame::<M>(data, 4096);
    // And the raw message decoder, as after a successful length check.
    let _ = M::decode(data);
}

fuzz_target!(|data: &[u8]| {
    each::<ClientControl>(data);
    each::<ClientRequest>(data);
    each::<ServerControl>(data);
    each::<Delivery>(data);
    each::<DeliveryBatch>(data);
    each::<DeliveryAck>(data);
    each::<SendAck>(data);
    each::<PullResult>(data);
    each::<RouterRequest>(data);
    each::<ServerRequest>(data);
    each::<PushResult>(data);
    each::<KickResult>(data);
    each::<SessionResult>(data);
    each::<RenewResult>(data);
});
