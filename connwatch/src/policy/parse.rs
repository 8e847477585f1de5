//! Parsing what operators write: ports, durations, address blocks, state timeouts.
//! Each error names the value and says what a valid one looks like.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::conn::TcpState;
use crate::kernel::netns;

/// An inclusive range of ports, parsed from `P` or `LO-HI`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        self.lo <= port && port <= self.hi
    }
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let port = |p: &str| -> Result<u16, String> {
            p.trim()
                .parse::<u16>()
                .map_err(|_| format!("'{p}' is not a port number (0-65535)"))
        };
        let range = match text.split_once('-') {
            None => {
                let p = port(text)?;
                PortRange { lo: p, hi: p }
            }
            Some((lo, hi)) => {
                let range = PortRange {
                    lo: port(lo)?,
                    hi: port(hi)?,
                };
                if range.lo > range.hi {
                    return Err(format!(
                        "port range {text} is reversed: write the low port first ({}-{})",
                        range.hi, range.lo
                    ));
                }
                range
            }
        };
        Ok(range)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// Parses `90s`, `5m`, `1h30m`; zero is refused because it would choose every socket.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim())
        .map_err(|e| format!("'{text}' is not a duration ({e}); write e.g. 90s, 5m, 1h30m"))?;
    if d.is_zero() {
        return Err(format!("'{text}' is zero: a limit must be positive"));
    }
    // Deadlines are nanoseconds in a u64: about 584 years.
    if d.as_nanos() > u128::from(u64::MAX) {
        return Err(format!(
            "'{text}' is longer than connwatch can count (at most {})",
            humantime::format_duration(Duration::from_nanos(u64::MAX))
        ));
    }
    Ok(d)
}

/// The longest process name the kernel keeps (`comm`, `TASK_COMM_LEN` less its NUL).
pub const COMM_LEN: usize = 15;

/// Parses a process name for `--exclude-process` (and the config's): the kernel keeps
/// only the first 15 bytes of a name, so a longer one could never match and is refused.
pub fn parse_process_name(text: &str) -> Result<String, String> {
    let name = text.trim();
    if name.is_empty() {
        return Err("a process name must not be empty".into());
    }
    if name.len() > COMM_LEN {
        let mut cut = COMM_LEN;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        return Err(format!(
            "'{name}' is {} bytes, but the kernel keeps only the first {COMM_LEN} bytes of a process name, so it could never match: write '{}'",
            name.len(),
            &name[..cut]
        ));
    }
    Ok(name.to_string())
}

/// Parses a CIDR block (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
pub fn parse_cidr(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!("'{text}' is not an address or CIDR block (e.g. 10.0.0.0/8, 2001:db8::/32)")
        })
}

/// Parses `STATE=DUR` (`close-wait=60s`), for `--state-timeout`.
pub fn parse_state_timeout(text: &str) -> Result<(TcpState, Duration), String> {
    let (state, dur) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not STATE=DURATION (e.g. close-wait=60s)"))?;
    let state = parse_timeout_state(state)?;
    Ok((state, parse_duration(dur)?))
}

/// The states a state timeout may name: the ones a connection can hang in.
pub const TIMEOUT_STATES: [TcpState; 6] = [
    TcpState::CLOSE_WAIT,
    TcpState::FIN_WAIT1,
    TcpState::FIN_WAIT2,
    TcpState::CLOSING,
    TcpState::LAST_ACK,
    TcpState::TIME_WAIT,
];

pub fn parse_timeout_state(text: &str) -> Result<TcpState, String> {
    let names = || {
        TIMEOUT_STATES
            .iter()
            .map(|s| s.name().to_ascii_lowercase().replace('_', "-"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match TcpState::parse(text) {
        Some(s) if TIMEOUT_STATES.contains(&s) => Ok(s),
        Some(s) => Err(format!(
            "{s} cannot have a timeout: connwatch never touches it (states with timeouts: {})",
            names()
        )),
        None => Err(format!("'{text}' is not a TCP state (one of: {})", names())),
    }
}

/// Resolves `--netns` (and the config's `netns`): `host` (the daemon's own), an
/// `ip netns` name (from /run/netns, resolved when the policy is read), or an inode.
pub fn parse_netns(text: &str) -> Result<u32, String> {
    let host =
        netns::own().map_err(|e| format!("cannot read this process's network namespace: {e}"))?;
    netns::resolve(text, host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse_and_refuse_bad_input() {
        assert_eq!("80".parse::<PortRange>(), Ok(PortRange { lo: 80, hi: 80 }));
        assert_eq!(
            "8000-8100".parse::<PortRange>(),
            Ok(PortRange { lo: 8000, hi: 8100 })
        );
        let err = "9-3".parse::<PortRange>().unwrap_err();
        assert!(err.contains("9-3") && err.contains("reversed"), "{err}");
        let err = "70000".parse::<PortRange>().unwrap_err();
        assert!(err.contains("70000"), "{err}");
        assert!("http".parse::<PortRange>().is_err());
        assert!("1-".parse::<PortRange>().is_err());
    }

    #[test]
    fn durations_parse_and_refuse_bad_input() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("5 parsecs"));
        assert!(parse_duration("0s").unwrap_err().contains("zero"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cidrs_and_state_timeouts_parse() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_cidr("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
        assert_eq!(parse_cidr("::1").unwrap().to_string(), "::1/128");
        assert!(parse_cidr("10.0.0.0/33")
            .unwrap_err()
            .contains("10.0.0.0/33"));
        assert_eq!(
            parse_state_timeout("close-wait=60s"),
            Ok((TcpState::CLOSE_WAIT, Duration::from_secs(60)))
        );
        assert_eq!(
            parse_state_timeout("FIN_WAIT2=2m"),
            Ok((TcpState::FIN_WAIT2, Duration::from_secs(120)))
        );
        assert!(parse_state_timeout("listen=1m")
            .unwrap_err()
            .contains("never touches"));
        assert!(parse_state_timeout("open=1m")
            .unwrap_err()
            .contains("'open'"));
        assert!(parse_state_timeout("close-wait").is_err());
        assert!(parse_state_timeout("close-wait=soon")
            .unwrap_err()
            .contains("soon"));
    }

    #[test]
    fn durations_too_long_to_count_are_refused() {
        assert!(parse_duration("500y").is_ok());
        for text in ["585y", "600y", "100000y"] {
            let e = parse_duration(text).unwrap_err();
            assert!(e.contains(text) && e.contains("at most 584years"), "{e}");
        }
    }

    #[test]
    fn process_names_longer_than_the_kernel_keeps_are_refused() {
        assert_eq!(parse_process_name("haproxy"), Ok("haproxy".into()));
        assert_eq!(
            parse_process_name("exactly15bytes!"),
            Ok("exactly15bytes!".into())
        );
        let e = parse_process_name("a-very-long-process-name").unwrap_err();
        assert!(
            e.contains("a-very-long-process-name")
                && e.contains("15 bytes")
                && e.contains("'a-very-long-pro'"),
            "{e}"
        );
        assert!(parse_process_name(" ").is_err());
    }
}
