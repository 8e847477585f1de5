//! The config file parser: any text either becomes a policy that builds, or is refused
//! with an error that names the file (and a line that exists).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    match connwatch::policy::parse_config(path, text) {
        Ok(spec) => {
            let policy = spec.build();
            let _ = policy.describe();
        }
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.toml:"), "unnamed file: {shown}");
            assert!(!e.message.trim().is_empty(), "empty message: {shown}");
            if let Some(line) = e.line {
                let lines = text.lines().count().max(1);
                assert!(
                    (1..=lines + 1).contains(&line),
                    "line {line} of a {lines}-line file: {shown}"
                );
            }
        }
    }
});
