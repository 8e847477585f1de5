//! `--state-timeout STATE=DUR`: a state that can hang with a positive duration, or a
//! one-line error.
#![no_main]

use connwatch::policy::{parse_state_timeout, TIMEOUT_STATES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_state_timeout(text) {
        Ok((state, d)) => {
            assert!(TIMEOUT_STATES.contains(&state), "{text:?} gave {state}");
            assert!(!d.is_zero(), "{text:?} gave zero");
        }
        Err(e) => {
            assert!(!e.trim().is_empty(), "empty error for {text:?}");
            assert!(text.contains('\n') || !e.contains('\n'), "two lines: {e:?}");
        }
    }
});
