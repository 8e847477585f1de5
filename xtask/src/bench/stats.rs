//! Pure helpers for the figures: percentiles, medians, and how numbers are shown.

/// The `p`-th percentile (0..=100) by nearest rank; None for no samples.
pub fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = (p / 100.0 * v.len() as f64).ceil() as usize;
    Some(v[rank.clamp(1, v.len()) - 1])
}

pub fn median(samples: &[f64]) -> Option<f64> {
    percentile(samples, 50.0)
}

/// `a / b` as a multiplier, `0.42x`; `-` where b is zero.
pub fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 || !a.is_finite() || !b.is_finite() {
        return "-".into();
    }
    let r = a / b;
    if r >= 100.0 {
        format!("{r:.0}x")
    } else if r >= 0.01 {
        format!("{r:.2}x")
    } else if r >= 0.0001 {
        format!("{r:.4}x")
    } else {
        format!("{r:.2e}x")
    }
}

/// `a / b` as a percentage with one decimal: `98.7%`.
pub fn percent(a: f64, b: f64) -> String {
    if b == 0.0 {
        return "-".into();
    }
    let p = a / b * 100.0;
    if p < 0.1 {
        format!("{p:.4}%")
    } else {
        format!("{p:.1}%")
    }
}

/// Seconds in the unit that reads best: `850 us`, `12.3 ms`, `1.48 s`.
pub fn secs(s: f64) -> String {
    if s < 1e-3 {
        format!("{:.0} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// A count with thousands separators: `100,000`.
pub fn count(n: u64) -> String {
    let s = n.to_string();
    let lead = match s.len() % 3 {
        0 => 3.min(s.len()),
        r => r,
    };
    let mut out = s[..lead].to_string();
    for group in s.as_bytes()[lead..].chunks(3) {
        out.push(',');
        out.push_str(std::str::from_utf8(group).unwrap_or_default());
    }
    out
}

/// Bytes in MiB or bytes: `184.0 MiB`, `212 B`.
pub fn bytes(b: f64) -> String {
    if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 50.0), Some(2.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(median(&[5.0]), Some(5.0));
        // Unsorted input, one outlier: p99 of 10 samples is the largest.
        let v = [1.0, 9.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 1000.0];
        assert_eq!(percentile(&v, 99.0), Some(1000.0));
        assert_eq!(percentile(&v, 90.0), Some(9.0));
    }

    #[test]
    fn ratios_and_percentages() {
        assert_eq!(ratio(1.0, 2.0), "0.50x");
        assert_eq!(ratio(3.0, 1.0), "3.00x");
        assert_eq!(ratio(500.0, 2.0), "250x");
        assert_eq!(ratio(1.0, 0.0), "-");
        assert_eq!(ratio(0.0015, 1.0), "0.0015x");
        assert_eq!(ratio(0.00001, 1.0), "1.00e-5x");
        assert_eq!(percent(98.7, 100.0), "98.7%");
        assert_eq!(percent(0.2, 100.0), "0.2%");
        assert_eq!(percent(0.0123, 100.0), "0.0123%");
        assert_eq!(percent(1.0, 0.0), "-");
    }

    #[test]
    fn units() {
        assert_eq!(secs(0.000_85), "850 us");
        assert_eq!(secs(0.0123), "12.3 ms");
        assert_eq!(secs(1.482), "1.48 s");
        assert_eq!(count(100_000), "100,000");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(bytes(212.0), "212 B");
        assert_eq!(bytes(2048.0), "2.0 KiB");
        assert_eq!(bytes(184.0 * 1024.0 * 1024.0), "184.0 MiB");
    }
}
