//! `--max-age`, `--idle` and the config's durations: a positive duration, or an error
//! that quotes the value and stays on one line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match connwatch::policy::parse_duration(text) {
        Ok(d) => assert!(!d.is_zero(), "{text:?} parsed to zero"),
        Err(e) => {
            assert!(e.contains(&format!("'{text}'")), "value not named: {e}");
            assert!(text.contains('\n') || !e.contains('\n'), "two lines: {e:?}");
        }
    }
});
