//! Inbox entries as read back from the store.
#![no_main]

use cim_router::store::InboxEntry;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(entry) = InboxEntry::decode(data) {
        assert_eq!(InboxEntry::decode(&entry.encode()), Some(entry));
    }
});
