//! `--port P|LO-HI` and the config's ports: an ordered range that prints back to
//! itself, or a one-line error.
#![no_main]

use connwatch::policy::PortRange;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match text.parse::<PortRange>() {
        Ok(r) => {
            assert!(r.lo <= r.hi, "{text:?} gave a reversed {r:?}");
            assert_eq!(r.to_string().parse::<PortRange>(), Ok(r), "{text:?}");
        }
        Err(e) => {
            assert!(!e.trim().is_empty(), "empty error for {text:?}");
            assert!(text.contains('\n') || !e.contains('\n'), "two lines: {e:?}");
        }
    }
});
