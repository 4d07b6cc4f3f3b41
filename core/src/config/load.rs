//! Layering of configuration sources and the errors they produce.
//!
//! Precedence, lowest first: built-in defaults, the YAML file, environment
//! variables, command-line flags. The caller reads the file and the
//! environment (this crate does no I/O) and passes their contents in.

use std::fmt;

use serde::de::DeserializeOwned;

/// Where a configuration value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A YAML file, with the position when the parser knows it.
    File {
        /// Path as given.
        path: String,
        /// 1-based line, if known.
        line: Option<usize>,
        /// 1-based column, if known.
        column: Option<usize>,
    },
    /// An environment variable.
    Env(String),
    /// A command-line flag.
    Flag(String),
    /// Checks that span several keys, after every source was applied.
    Combined,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line: Some(l), column: Some(c) } => write!(f, "{path}:{l}:{c}"),
            Origin::File { path, line: Some(l), column: None } => write!(f, "{path}:{l}"),
            Origin::File { path, .. } => f.write_str(path),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
            Origin::Combined => f.write_str("configuration"),
        }
    }
}

/// A configuration mistake: where, which key, and what is wrong and allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {key_part}{message}", key_part = if key.is_empty() { String::new() } else { format!("`{key}`: ") })]
pub struct ConfigError {
    /// Where the bad value came from.
    pub origin: Origin,
    /// Dotted key path (`transport.buffer_capacity`), empty if not about one key.
    pub key: String,
    /// What is wrong, the bad value, and what is allowed.
    pub message: String,
}

/// A configuration type that can be layered from file, env and flags.
pub trait Layered: DeserializeOwned + Default {
    /// Environment variables read, and the key each one sets.
    const ENV: &'static [(&'static str, &'static str)];

    /// Sets the dotted `key` from its string form (an env var or flag value).
    /// Returns the message for a bad value. Unknown keys are a programming
    /// error reported as such.
    fn set(&mut self, key: &str, value: &str) -> Result<(), String>;

    /// Checks that need several keys, after all sources were applied:
    /// `Err((key, message))`.
    fn validate(&self) -> Result<(), (String, String)>;
}

/// A value given on the command line: the flag as the user typed it, the key it sets, and the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlagValue {
    /// Flag name for messages, e.g. `--mode`.
    pub flag: String,
    /// Dotted key it sets.
    pub key: String,
    /// Value as given.
    pub value: String,
}

impl FlagValue {
    /// A flag setting `key`.
    pub fn new(flag: &str, key: &str, value: impl Into<String>) -> FlagValue {
        FlagValue { flag: flag.to_owned(), key: key.to_owned(), value: value.into() }
    }
}

/// Builds a configuration from defaults, an optional file (`(path, contents)`),
/// the environment (a lookup function) and flags, in that order of precedence.
/// An empty environment variable counts as unset.
pub fn load<T: Layered>(
    file: Option<(&str, &str)>,
    env: &dyn Fn(&str) -> Option<String>,
    flags: &[FlagValue],
) -> Result<T, ConfigError> {
    let mut config = match file {
        Some((path, contents)) => parse_yaml::<T>(path, contents)?,
        None => T::default(),
    };
    for (var, key) in T::ENV {
        if let Some(value) = env(var).filter(|v| !v.is_empty()) {
            config.set(key, &value).map_err(|message| ConfigError {
                origin: Origin::Env((*var).to_owned()),
                key: String::new(),
                message,
            })?;
        }
    }
    for f in flags {
        config.set(&f.key, &f.value).map_err(|message| ConfigError {
            origin: Origin::Flag(f.flag.clone()),
            key: String::new(),
            message,
        })?;
    }
    config.validate().map_err(|(key, message)| ConfigError { origin: Origin::Combined, key, message })?;
    Ok(config)
}

/// Parses a YAML document; unknown keys are rejected by the types themselves.
pub fn parse_yaml<T: DeserializeOwned + Default>(path: &str, contents: &str) -> Result<T, ConfigError> {
    let only_comments = contents.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#') || l == "---"
    });
    if only_comments {
        return Ok(T::default());
    }
    let de = yaml_serde::Deserializer::from_str(contents);
    serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        let inner = e.into_inner();
        let location = inner.location();
        ConfigError {
            origin: Origin::File {
                path: path.to_owned(),
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
            },
            key,
            message: clean_yaml_message(&inner.to_string()),
        }
    })
}

/// The YAML parser's message without the position and path it appends or
/// prepends (the error shows both on its own).
fn clean_yaml_message(msg: &str) -> String {
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
    };
    // Messages about a nested key start with "path.to.key: ".
    let msg = match msg.split_once(": ") {
        Some((head, tail)) if !head.contains(' ') && !head.is_empty() => tail,
        _ => msg,
    };
    msg.to_owned()
}
