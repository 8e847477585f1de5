//! `--block`, `--remote-addr`, `--exclude-addr` and the config's addresses: a block that
//! prints back to itself, or an error that quotes the value.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match connwatch::policy::parse_cidr(text) {
        Ok(net) => {
            let again = connwatch::policy::parse_cidr(&net.to_string());
            assert_eq!(again, Ok(net), "{text:?}");
        }
        Err(e) => {
            assert!(e.contains(&format!("'{text}'")), "value not named: {e}");
            assert!(text.contains('\n') || !e.contains('\n'), "two lines: {e:?}");
        }
    }
});
