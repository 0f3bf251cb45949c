//! Optional TOML configuration files for the binaries. A file's keys are the long option
//! names (`heartbeat-ms = 5000`); its values are turned into command-line arguments placed
//! before the real ones, so flags given on the command line win. Unknown keys are refused
//! with the key's name.

use std::ffi::OsString;
use std::path::Path;

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// File.
        path: String,
        /// Parser message.
        message: String,
    },
    /// A key names no option.
    #[error(
        "config file {path}: unknown option {key:?} (keys are the long option names, e.g. heartbeat-ms)"
    )]
    UnknownKey {
        /// File.
        path: String,
        /// Offending key.
        key: String,
    },
    /// A value has a type options cannot take (tables, dates).
    #[error("config file {path}: option {key:?} must be a string, number, boolean or list")]
    BadValue {
        /// File.
        path: String,
        /// Offending key.
        key: String,
    },
}

/// Parses the process's arguments into `A`, with the options of a `--config` file (or
/// `CIM_CONFIG`) placed before the command line's. Exits with a message naming the offending
/// option or key when anything is invalid, as clap does.
pub fn parse<A: clap::Parser + clap::CommandFactory>() -> A {
    let known: Vec<String> = A::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .collect();
    match with_file(std::env::args_os().collect(), &known) {
        Ok(argv) => A::parse_from(argv),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// `args` (program name first) with the options of the file named by `--config FILE` (or
/// `CIM_CONFIG`) inserted after the program name. `known` lists the long option names the
/// program accepts.
pub fn with_file(args: Vec<OsString>, known: &[String]) -> Result<Vec<OsString>, ConfigError> {
    let mut path = std::env::var_os("CIM_CONFIG");
    let mut rest = Vec::with_capacity(args.len());
    let mut iter = args.into_iter();
    let program = iter.next();
    while let Some(arg) = iter.next() {
        if arg == "--config" {
            path = iter.next();
            continue;
        }
        if let Some(p) = arg.to_str().and_then(|a| a.strip_prefix("--config=")) {
            path = Some(OsString::from(p));
            continue;
        }
        rest.push(arg);
    }
    let mut out: Vec<OsString> = program.into_iter().collect();
    if let Some(path) = path {
        out.extend(file_args(Path::new(&path), known)?);
    }
    out.extend(rest);
    Ok(out)
}

fn file_args(path: &Path, known: &[String]) -> Result<Vec<OsString>, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Syntax {
            path: shown.clone(),
            message: e.to_string(),
        })?;
    let mut args = Vec::new();
    for (key, value) in table {
        if !known.contains(&key) {
            return Err(ConfigError::UnknownKey { path: shown, key });
        }
        let flag = OsString::from(format!("--{key}"));
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Float(f) => Some(f.to_string()),
            _ => None,
        };
        match &value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    let v = scalar(item).ok_or_else(|| ConfigError::BadValue {
                        path: shown.clone(),
                        key: key.clone(),
                    })?;
                    args.push(flag.clone());
                    args.push(v.into());
                }
            }
            other => {
                let v = scalar(other).ok_or_else(|| ConfigError::BadValue {
                    path: shown.clone(),
                    key: key.clone(),
                })?;
                args.push(flag);
                args.push(v.into());
            }
        }
    }
    Ok(args)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn known() -> Vec<String> {
        ["heartbeat-ms", "http", "host", "verbose"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn file_options_come_before_command_line_ones() {
        let dir = std::env::temp_dir().join(format!("cim-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a.toml");
        std::fs::write(
            &file,
            "heartbeat-ms = 250\nverbose = true\nhost = [\"a\", \"b\"]\n",
        )
        .unwrap();
        let args = with_file(
            os(&[
                "prog",
                "--config",
                file.to_str().unwrap(),
                "--heartbeat-ms",
                "300",
            ]),
            &known(),
        )
        .unwrap();
        let args: Vec<String> = args.into_iter().map(|a| a.into_string().unwrap()).collect();
        assert_eq!(args[0], "prog");
        assert!(args.ends_with(&["--heartbeat-ms".into(), "300".into()]));
        assert!(args.windows(2).any(|w| w == ["--heartbeat-ms", "250"]));
        assert!(args.contains(&"--verbose".to_string()));
        assert_eq!(args.iter().filter(|a| *a == "--host").count(), 2);
    }

    #[test]
    fn unknown_keys_and_bad_syntax_are_named() {
        let dir = std::env::temp_dir().join(format!("cim-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("b.toml");
        std::fs::write(&file, "heartbeat_ms = 5\n").unwrap();
        let err = with_file(os(&["p", "--config", file.to_str().unwrap()]), &known()).unwrap_err();
        assert!(err.to_string().contains("\"heartbeat_ms\""), "{err}");
        std::fs::write(&file, "heartbeat-ms = \n").unwrap();
        let err = with_file(os(&["p", "--config", file.to_str().unwrap()]), &known()).unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
    }
}
