//! Parsing of the CONNECT request head: the method and the `:authority` naming the
//! destination.
//!
//! The authority comes from a remote peer, so the parser is strict and total: an IP
//! literal (IPv6 in brackets) and a port in 1-65535, nothing else — no names to resolve, no
//! userinfo, no path, no zone, no leading zeros. Anything else is an error, never a panic;
//! a fuzz target holds it to that.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest authority accepted: `[` + the longest IPv6 text + `]:65535` fits easily.
const MAX_AUTHORITY_LEN: usize = 64;

/// Why an authority was rejected. The offending text is kept, shortened, for the log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthorityError {
    #[error("empty authority")]
    Empty,
    #[error("authority of {0} bytes is longer than {MAX_AUTHORITY_LEN}")]
    TooLong(usize),
    #[error("authority {0:?} has no port; expected ip:port")]
    MissingPort(String),
    #[error("authority {0:?} has an invalid port; expected 1-65535 without leading zeros")]
    BadPort(String),
    #[error("authority {0:?} is not an IP literal (IPv6 goes in brackets)")]
    BadHost(String),
}

fn shown(s: &str) -> String {
    s.chars().take(MAX_AUTHORITY_LEN).collect()
}

/// Parses a CONNECT `:authority` such as `10.0.0.7:8080` or `[fd00::7]:8080`.
pub fn parse_authority(s: &str) -> Result<SocketAddr, AuthorityError> {
    if s.is_empty() {
        return Err(AuthorityError::Empty);
    }
    if s.len() > MAX_AUTHORITY_LEN {
        return Err(AuthorityError::TooLong(s.len()));
    }
    let (ip, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| AuthorityError::BadHost(shown(s)))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| AuthorityError::MissingPort(shown(s)))?;
        // The standard parser refuses zones (`%eth0`) and embedded junk.
        let ip: Ipv6Addr = host
            .parse()
            .map_err(|_| AuthorityError::BadHost(shown(s)))?;
        (IpAddr::V6(ip), port)
    } else {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| AuthorityError::MissingPort(shown(s)))?;
        // An unbracketed host with a colon would be IPv6 without brackets: ambiguous.
        let ip: Ipv4Addr = host
            .parse()
            .map_err(|_| AuthorityError::BadHost(shown(s)))?;
        (IpAddr::V4(ip), port)
    };
    Ok(SocketAddr::new(
        ip,
        parse_port(port).ok_or_else(|| AuthorityError::BadPort(shown(s)))?,
    ))
}

fn parse_port(s: &str) -> Option<u16> {
    let digits_only = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || s.starts_with('0') {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Why a request head was refused, with the HTTP status to answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("method {0:?} is not CONNECT")]
    NotConnect(String),
    #[error("CONNECT without :authority")]
    MissingAuthority,
    #[error(transparent)]
    Authority(#[from] AuthorityError),
}

impl HeadError {
    /// The status the server answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::NotConnect(_) => 405,
            Self::MissingAuthority | Self::Authority(_) => 400,
        }
    }

    /// A short fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotConnect(_) => "method_not_allowed",
            Self::MissingAuthority | Self::Authority(_) => "bad_authority",
        }
    }
}

/// The destination of a tunnel request, from its method and `:authority`.
pub fn connect_target(method: &str, authority: Option<&str>) -> Result<SocketAddr, HeadError> {
    if method != "CONNECT" {
        return Err(HeadError::NotConnect(shown(method)));
    }
    let authority = authority.ok_or(HeadError::MissingAuthority)?;
    Ok(parse_authority(authority)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ip_literals() {
        assert_eq!(
            parse_authority("10.0.0.7:8080"),
            Ok("10.0.0.7:8080".parse().expect("valid"))
        );
        assert_eq!(
            parse_authority("[fd00::7]:1"),
            Ok("[fd00::7]:1".parse().expect("valid"))
        );
        assert_eq!(
            parse_authority("[::ffff:10.0.0.1]:65535"),
            Ok("[::ffff:10.0.0.1]:65535".parse().expect("valid"))
        );
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "10.0.0.7",
            "10.0.0.7:",
            "10.0.0.7:0",
            "10.0.0.7:65536",
            "10.0.0.7:080",
            "10.0.0.7:+80",
            "10.0.0.7:80/",
            "user@10.0.0.7:80",
            "example.com:80",
            "010.0.0.7:80",
            "fd00::7:80",
            "[fd00::7]",
            "[fd00::7]80",
            "[fd00::7%eth0]:80",
            "[10.0.0.7]:80",
            "[fd00::7:80",
            " 10.0.0.7:80",
            "10.0.0.7:8 0",
            "[::1]:80:80",
        ] {
            assert!(parse_authority(bad).is_err(), "{bad:?} was accepted");
        }
        let long = format!("[{}]:80", "0".repeat(100));
        assert_eq!(parse_authority(&long), Err(AuthorityError::TooLong(105)));
    }

    #[test]
    fn request_heads_map_to_statuses() {
        assert_eq!(
            connect_target("GET", Some("10.0.0.1:80")).map_err(|e| e.status()),
            Err(405)
        );
        assert_eq!(
            connect_target("CONNECT", None).map_err(|e| e.status()),
            Err(400)
        );
        assert_eq!(
            connect_target("CONNECT", Some("a:1")).map_err(|e| e.status()),
            Err(400)
        );
        assert_eq!(
            connect_target("CONNECT", Some("10.0.0.1:80")),
            Ok("10.0.0.1:80".parse().expect("valid"))
        );
    }
}
