//! The identities every frame carries: [`AgentId`] (one per node, kept
//! across restarts) and [`BootId`] (one per agent process run).
//!
//! Both are 16 bytes (UUID bytes). On the wire they are those 16 bytes as
//! they are (see [`crate::frame`]); in text (logs, the agent's id file,
//! storage columns) they are 32 lower-case hex digits, written by
//! [`Display`](std::fmt::Display) / `to_hex` and read back by
//! [`FromStr`](std::str::FromStr), which also accepts upper case.

use std::fmt;
use std::str::FromStr;

/// Why text was not accepted as an id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {value:?} is not an id: expected 32 hex digits (16 bytes)")]
pub struct ParseIdError {
    /// Which id was being read (`agent id`, `boot id`).
    pub kind: &'static str,
    /// The text given (at most 64 characters of it).
    pub value: String,
}

/// Reads 32 hex digits into 16 bytes.
fn parse_hex16(s: &str, kind: &'static str) -> Result<[u8; 16], ParseIdError> {
    let bad = || ParseIdError { kind, value: s.chars().take(64).collect() };
    let digits = s.as_bytes();
    if digits.len() != 32 {
        return Err(bad());
    }
    let nibble = |c: u8| char::from(c).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = [0u8; 16];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (Some(hi), Some(lo)) = (nibble(pair[0]), nibble(pair[1])) else {
            return Err(bad());
        };
        *byte = hi << 4 | lo;
    }
    Ok(out)
}

/// Writes 16 bytes as 32 lower-case hex digits.
fn write_hex16(bytes: &[u8; 16], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        ///
        /// The field is the 16 bytes as carried on the wire.
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub [u8; 16]);

        impl $name {
            /// The 32 lower-case hex digits (the text form, as stored).
            pub fn to_hex(self) -> String {
                self.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex16(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<$name, ParseIdError> {
                parse_hex16(s, $kind).map($name)
            }
        }
    };
}

id_type!(
    /// Identity of an agent: drawn once per node and kept across restarts
    /// (in the agent's data directory).
    AgentId,
    "agent id"
);

id_type!(
    /// Identity of one run of an agent process; frame sequences restart with it.
    BootId,
    "boot id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = AgentId([0xab, 0x01, 0, 0xff, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0x7f]);
        let text = id.to_hex();
        assert_eq!(text, "ab0100ff0102030405060708090a0b7f");
        assert_eq!(text.parse::<AgentId>(), Ok(id));
        assert_eq!(format!("{id:?}"), "AgentId(ab0100ff0102030405060708090a0b7f)");
        assert_eq!("AB0100FF0102030405060708090A0B7F".parse::<AgentId>(), Ok(id));
    }

    #[test]
    fn bad_text_is_rejected_with_the_value() {
        for bad in ["", "zz", &"g".repeat(32), &"a".repeat(31), &"a".repeat(33), "ab0100ff0102030405060708090a0b7é"] {
            let e = bad.parse::<BootId>().expect_err(bad);
            assert_eq!(e.kind, "boot id");
            assert_eq!(e.value, bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
    }
}
