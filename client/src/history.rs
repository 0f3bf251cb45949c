//! The console's message history (CIM's message log): every message it shows or sends, one
//! line each, appended to a file of its user's on this machine, and searched by `:q words`.
//! A line holds no line break (text is escaped as the console prints it), so a message can
//! never pass for another. The file is kept to [`MAX_BYTES`]: past it, it becomes
//! `FILE.1` (replacing an older one) and a new one starts, so at most twice that is kept.
//! Two consoles of one user may share the file: each line is one append, each size check
//! reads the file's own size, and a console whose file another rotated (or removed) goes on
//! in the new one. Two rotating at the same instant may lose the older half.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::console::printable;

/// Bytes a history file grows to before it is rotated.
pub const MAX_BYTES: u64 = 8 * 1024 * 1024;

/// Matches a search shows at most (the latest ones).
pub const SHOWN_MATCHES: usize = 50;

/// A history file, appended to by one console (others of the same user may append too: each
/// line is one write to a file opened for appending).
#[derive(Debug)]
pub struct History {
    path: PathBuf,
    max_bytes: u64,
    /// `None` once a write failed: the console said so, and keeps no more history.
    writer: Mutex<Option<Writer>>,
}

/// The open file.
#[derive(Debug)]
struct Writer {
    file: File,
}

/// What a search found: how many lines matched, and the latest of them, oldest first.
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    /// Lines that matched.
    pub total: usize,
    /// The last matching lines, at most the limit asked for, in the order they were written.
    pub lines: Vec<String>,
}

impl History {
    /// Opens (creating it and its directories, readable by the user alone) the history file at
    /// `path`, kept to [`MAX_BYTES`].
    pub fn open(path: PathBuf) -> io::Result<Self> {
        Self::open_with_limit(path, MAX_BYTES)
    }

    /// [`History::open`] rotating past `max_bytes`.
    pub fn open_with_limit(path: PathBuf, max_bytes: u64) -> io::Result<Self> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir)?;
        }
        let file = open_for_append(&path)?;
        Ok(Self {
            path,
            max_bytes,
            writer: Mutex::new(Some(Writer { file })),
        })
    }

    /// Where the history is kept.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file the history moves to when it is rotated.
    fn older_path(&self) -> PathBuf {
        let mut older = self.path.clone().into_os_string();
        older.push(".1");
        PathBuf::from(older)
    }

    /// Appends `line` (escaped as printed, so it stays one line). After a failed write, the
    /// error is returned once and nothing more is written.
    pub fn record(&self, line: &str) -> io::Result<()> {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let Some(open) = writer.as_mut() else {
            return Ok(());
        };
        let mut text = printable(line);
        text.push('\n');
        let written = self
            .rotate_if_full(open)
            .and_then(|()| open.file.write_all(text.as_bytes()));
        if written.is_err() {
            *writer = None;
        }
        written
    }

    /// Moves a full history aside and starts a new file; first follows the file at the path
    /// if it is another than the one open (another console rotated it, or it was removed).
    fn rotate_if_full(&self, open: &mut Writer) -> io::Result<()> {
        if !is_file_at(&open.file, &self.path)? {
            open.file = open_for_append(&self.path)?;
        }
        if open.file.metadata()?.len() < self.max_bytes {
            return Ok(());
        }
        match std::fs::rename(&self.path, self.older_path()) {
            // Another console moved it away a moment ago.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            result => result?,
        }
        open.file = open_for_append(&self.path)?;
        Ok(())
    }

    /// The lines that contain `words` (ignoring case), the latest `limit` of them. Reads the
    /// rotated file first, then the current one.
    pub fn search(&self, words: &str, limit: usize) -> io::Result<Found> {
        let wanted = words.to_lowercase();
        let mut found = Found {
            total: 0,
            lines: Vec::new(),
        };
        let mut latest = VecDeque::with_capacity(limit.min(SHOWN_MATCHES));
        for path in [self.older_path(), self.path.clone()] {
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut reader = BufReader::new(file);
            let mut raw = Vec::new();
            loop {
                raw.clear();
                if reader.read_until(b'\n', &mut raw)? == 0 {
                    break;
                }
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches('\n');
                if !line.to_lowercase().contains(&wanted) {
                    continue;
                }
                found.total += 1;
                if limit == 0 {
                    continue;
                }
                if latest.len() == limit {
                    latest.pop_front();
                }
                latest.push_back(line.to_string());
            }
        }
        found.lines = latest.into();
        Ok(found)
    }
}

/// Where a console keeps `name`'s history with the router at `router` when not told:
/// `$XDG_DATA_HOME/cim/history/HOST_PORT/NAME.log` (`~/.local/share` without it), or `None`
/// when neither that nor `$HOME` is set. `name` must be a user name the router accepted (no
/// path separators, not dots alone).
pub fn default_path(name: &str, router: &str) -> Option<PathBuf> {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .filter(|dir| dir.is_absolute())
        .or_else(|| {
            let home = PathBuf::from(std::env::var_os("HOME")?);
            home.is_absolute().then(|| home.join(".local/share"))
        })?;
    Some(
        data.join("cim/history")
            .join(router_dir(router))
            .join(format!("{name}.log")),
    )
}

/// A directory name for a router's URL: its host and port, anything but letters, digits, `.`
/// and `-` made `_` (`https://127.0.0.1:8443` is `127.0.0.1_8443`).
fn router_dir(router: &str) -> String {
    let authority = router
        .split_once("://")
        .map_or(router, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let dir: String = authority
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if dir.is_empty() || dir.chars().all(|c| c == '.') {
        return "router".into();
    }
    dir
}

/// Whether `file` is the file at `path` (false if none is there).
#[cfg(unix)]
fn is_file_at(file: &File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(there) => Ok(there.dev() == open.dev() && there.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Without inodes to compare, never: the file at the path is opened for each line.
#[cfg(not(unix))]
fn is_file_at(_file: &File, _path: &Path) -> io::Result<bool> {
    Ok(false)
}

#[cfg(unix)]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

#[cfg(not(unix))]
fn create_private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)
}

#[cfg(unix)]
fn open_for_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_for_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_latest_matching_lines_ignoring_case() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path().join("a/b/alice.log")).unwrap();
        for i in 0..10 {
            history.record(&format!("[t] bob (2): Hello {i}")).unwrap();
            history
                .record(&format!("[t] you to 2 (private): bye {i}"))
                .unwrap();
        }
        let found = history.search("hello", 3).unwrap();
        assert_eq!(found.total, 10);
        assert_eq!(
            found.lines,
            [
                "[t] bob (2): Hello 7",
                "[t] bob (2): Hello 8",
                "[t] bob (2): Hello 9"
            ]
        );
        assert_eq!(
            history.search("BYE 4", 50).unwrap().lines,
            ["[t] you to 2 (private): bye 4"]
        );
        assert_eq!(
            history.search("nothing like it", 50).unwrap(),
            Found {
                total: 0,
                lines: vec![]
            }
        );
        assert_eq!(history.search("bob", 0).unwrap().total, 10);
    }

    #[test]
    fn a_line_break_in_a_message_cannot_forge_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let history = History::open(dir.path().join("h.log")).unwrap();
        history
            .record("[t] eve (6): hi\n[t] bob (2): forged")
            .unwrap();
        let found = history.search("forged", 50).unwrap();
        assert_eq!(found.lines, ["[t] eve (6): hi\\n[t] bob (2): forged"]);
    }

    #[test]
    fn survives_a_restart_and_keeps_one_rotated_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.log");
        let line = |i: usize| format!("line {i:03} {}", "x".repeat(90));
        {
            let history = History::open_with_limit(path.clone(), 1_000).unwrap();
            for i in 0..5 {
                history.record(&line(i)).unwrap();
            }
        }
        // A new console carries on with the file, and its size counts toward the limit.
        let history = History::open_with_limit(path.clone(), 1_000).unwrap();
        for i in 5..25 {
            history.record(&line(i)).unwrap();
        }
        let found = history.search("line", 100).unwrap();
        // 10 lines of 100 bytes fill a file: lines 0-9 went first, when the second rotation
        // replaced them with 10-19; 20-24 are in the current file.
        assert_eq!(found.total, 15);
        assert_eq!(found.lines.first().unwrap(), &line(10));
        assert_eq!(found.lines.last().unwrap(), &line(24));
        assert!(std::fs::metadata(&path).unwrap().len() <= 1_000);
        assert!(std::fs::metadata(history.older_path()).unwrap().len() <= 1_000);
    }

    #[cfg(unix)]
    #[test]
    fn the_file_is_the_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new/h.log");
        History::open(path.clone()).unwrap().record("x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
    }

    #[test]
    fn a_failed_write_is_told_once_then_nothing_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.log");
        // Reopening needs the directory: once it is gone, the write fails.
        let history = History::open_with_limit(path, 1).unwrap();
        history.record("first").unwrap();
        drop(dir);
        assert!(history.record("second").is_err());
        history.record("third").unwrap();
    }

    #[test]
    fn two_consoles_share_a_file_and_its_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.log");
        let one = History::open_with_limit(path.clone(), 250).unwrap();
        let two = History::open_with_limit(path.clone(), 250).unwrap();
        let line = |i: usize| format!("line {i:02} {}", "x".repeat(41));
        // 50 bytes a line, taking turns: each checks the size both wrote.
        for i in 0..12 {
            let console = if i % 2 == 0 { &one } else { &two };
            console.record(&line(i)).unwrap();
        }
        // Rotated at 5 lines, by `two`, then at 10 by `one`, which first found its file
        // moved: lines 5-9 in the rotated file, 10 and 11 in the new one, in order.
        let older = std::fs::read_to_string(one.older_path()).unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        assert_eq!(older.lines().count(), 5, "{older}");
        assert!(older.starts_with(&line(5)), "{older}");
        assert_eq!(current.lines().collect::<Vec<_>>(), [line(10), line(11)]);
        // A file removed under them is started again.
        std::fs::remove_file(&path).unwrap();
        one.record(&line(12)).unwrap();
        two.record(&line(13)).unwrap();
        let current = std::fs::read_to_string(&path).unwrap();
        assert_eq!(current.lines().collect::<Vec<_>>(), [line(12), line(13)]);
    }

    #[test]
    fn a_routers_url_names_a_directory() {
        assert_eq!(router_dir("https://127.0.0.1:8443"), "127.0.0.1_8443");
        assert_eq!(router_dir("https://[::1]:8443/x"), "___1__8443");
        assert_eq!(router_dir("https://chat.example.com"), "chat.example.com");
        assert_eq!(router_dir("https://../"), "router");
        assert_eq!(router_dir(""), "router");
    }
}
