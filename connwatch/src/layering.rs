//! The house rules, checked on the sources: dependencies point down the data flow
//! (the order of `lib.rs`), and no file holds more than one job's worth of code.

use std::path::{Path, PathBuf};

/// The top-level modules, bottom to top: each may use only those before it.
const ORDER: [&str; 10] = [
    "clock", "conn", "kernel", "policy", "track", "engine", "observe", "control", "daemon", "cli",
];

/// The most lines a source file may hold before its tests.
const MAX_LINES: usize = 700;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Each source file under `src/`, its top-level module and its code before the tests.
fn code() -> Vec<(PathBuf, String, String)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} sources in {}",
        files.len(),
        src.display()
    );
    files
        .into_iter()
        .map(|path| {
            let rel = path.strip_prefix(&src).unwrap();
            let top = rel.iter().next().unwrap().to_string_lossy();
            let top = top.trim_end_matches(".rs").to_string();
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("").to_string();
            (path, top, code)
        })
        .collect()
}

#[test]
fn dependencies_point_down_the_flow() {
    let mut upward = Vec::new();
    for (path, top, code) in code() {
        let Some(rank) = ORDER.iter().position(|m| *m == top) else {
            continue;
        };
        for used in code.split("crate::").skip(1) {
            // `crate::x::...` or a group, `crate::{x, y::z}`.
            let names: Vec<&str> = match used.strip_prefix('{') {
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .map(|n| n.trim().split("::").next().unwrap_or(""))
                    .collect(),
                None => vec![used
                    .split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .next()
                    .unwrap_or("")],
            };
            for name in names {
                if let Some(r) = ORDER.iter().position(|m| *m == name) {
                    if r > rank {
                        upward.push(format!("{} uses crate::{name}", path.display()));
                    }
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports against the flow:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_file_holds_more_than_one_job() {
    let long: Vec<String> = code()
        .into_iter()
        .filter(|(_, _, code)| code.lines().count() > MAX_LINES)
        .map(|(path, _, code)| format!("{}: {} lines", path.display(), code.lines().count()))
        .collect();
    assert!(
        long.is_empty(),
        "over {MAX_LINES} lines before the tests: {long:?}"
    );
}
