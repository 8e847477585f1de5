//! The control socket's request parser: any line is a request or an error, and the
//! error goes back to the client as one JSON line that says what is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = connwatch::control::protocol::parse(line) {
        assert!(!e.trim().is_empty(), "empty error for {line:?}");
        let reply = connwatch::control::protocol::error(e).to_line();
        assert!(!reply.contains('\n'), "reply spans lines: {reply:?}");
        let v: serde_json::Value = serde_json::from_str(&reply).expect("the reply is JSON");
        assert_eq!(v["ok"], false);
    }
});
