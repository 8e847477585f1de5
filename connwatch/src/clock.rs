//! The daemon's clock: `CLOCK_MONOTONIC` nanoseconds, the same clock as
//! `bpf_ktime_get_ns`, so kernel timestamps and deadlines compare directly.

use std::time::{Duration, SystemTime};

/// Nanoseconds in a second: the unit of every kernel and deadline timestamp.
pub const SEC: u64 = 1_000_000_000;

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; CLOCK_MONOTONIC cannot fail on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time of a monotonic timestamp, for display only.
pub fn to_wall(mono_ns: u64) -> SystemTime {
    let now_mono = monotonic_ns();
    let now_wall = SystemTime::now();
    if mono_ns <= now_mono {
        now_wall - Duration::from_nanos(now_mono - mono_ns)
    } else {
        now_wall + Duration::from_nanos(mono_ns - now_mono)
    }
}

/// `4m12s`, `2d3h`, `950ms`: the two largest units, as people read ages.
pub fn human(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    const UNITS: [(&str, u64); 4] = [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)];
    // secs > 0, so some unit fits.
    let first = UNITS
        .iter()
        .position(|(_, size)| secs >= *size)
        .unwrap_or(3);
    let (name, size) = UNITS[first];
    let mut out = format!("{}{name}", secs / size);
    if let Some((next, next_size)) = UNITS.get(first + 1) {
        let n = secs % size / next_size;
        if n > 0 {
            out.push_str(&format!("{n}{next}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_durations() {
        assert_eq!(human(Duration::from_millis(950)), "950ms");
        assert_eq!(human(Duration::from_secs(59)), "59s");
        assert_eq!(human(Duration::from_secs(252)), "4m12s");
        assert_eq!(
            human(Duration::from_secs(2 * 86_400 + 3 * 3_600 + 5)),
            "2d3h"
        );
        assert_eq!(human(Duration::from_secs(3_600)), "1h");
        assert_eq!(human(Duration::from_secs(3_605)), "1h");
    }

    #[test]
    fn monotonic_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
