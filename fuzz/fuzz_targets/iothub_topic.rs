//! `$iothub/...` and `devices/...` topic names with their property bags, and subscription
//! filters (hub-core `topic`). Reads: a topic string. Checks: no panic, and every topic or
//! filter that parses prints back to text that parses to the same value (the module's
//! round-trip invariant, which the hub relies on when it formats topics it parsed).
#![no_main]

use hub_core::topic::{Topic, TopicFilter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(topic) = Topic::parse(text) {
        let printed = topic.to_string();
        assert_eq!(
            Topic::parse(&printed).as_ref(),
            Ok(&topic),
            "{text:?} printed as {printed:?}"
        );
        let _ = topic.property("$.mid");
    }
    if let Ok(filter) = TopicFilter::parse(text) {
        let printed = filter.to_string();
        assert_eq!(
            TopicFilter::parse(&printed).as_ref(),
            Ok(&filter),
            "{text:?} printed as {printed:?}"
        );
        if let Ok(topic) = Topic::parse(text) {
            let _ = filter.matches(&topic);
        }
    }
});
