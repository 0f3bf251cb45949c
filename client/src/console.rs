//! Parsing of console input lines into commands (CIM's syntax), kept free of I/O so it is
//! tested with plain strings.

use std::fmt;

use cim_core::names::{MAX_NAME_LEN, NAME_RULE, is_valid_name};

/// A user a command names: by id, or by name (user names are never digits alone, so `42` is
/// always an id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    /// An account id.
    Id(u64),
    /// An account name, looked up at the router.
    Name(String),
}

impl UserRef {
    /// `word` as a user id or, failing that, a name.
    fn parse(word: &str) -> Option<Self> {
        match word.parse::<u64>() {
            Ok(id) => Some(UserRef::Id(id)),
            Err(_) if is_valid_name(word) => Some(UserRef::Name(word.to_string())),
            Err(_) => None,
        }
    }
}

/// Whose conversation an `:unsend` takes a message back from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    /// Private messages to a user.
    User(UserRef),
    /// Messages to a group.
    Group(String),
}

/// A password typed into the console: its `Debug` form (a failed assertion, a log line) does
/// not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl fmt::Display for UserRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserRef::Id(id) => write!(f, "{id}"),
            UserRef::Name(name) => f.write_str(name),
        }
    }
}

/// A command whose passwords the console asks for, one prompt at a time, without showing
/// what is typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// `:password`: the current password, then the new one twice.
    Password,
    /// `:delete-account`: the password.
    DeleteAccount,
}

impl Asked {
    /// The prompts, in order.
    pub fn prompts(self) -> &'static [&'static str] {
        match self {
            Asked::Password => &[
                "current password: ",
                "new password: ",
                "new password again: ",
            ],
            Asked::DeleteAccount => &["password (your account is deleted for good): "],
        }
    }

    /// How to give the command in one line (where nothing can be asked: input that is not a
    /// terminal).
    pub fn usage(self) -> &'static str {
        match self {
            Asked::Password => {
                "use :password at a terminal, or :password <old> <new> (passwords without blanks)"
            }
            Asked::DeleteAccount => {
                "use :delete-account at a terminal, or :delete-account <password> (it deletes \
                 your account for good)"
            }
        }
    }

    /// The command the answers to [`Asked::prompts`] make: refused if one is empty, or if the
    /// new password was not typed the same twice.
    pub fn answered(self, answers: Vec<String>) -> Command {
        if answers.iter().any(|a| a.is_empty()) {
            return Command::Invalid("an empty password; nothing was done".into());
        }
        match (self, &answers[..]) {
            (Asked::Password, [old, new, again]) if new == again => Command::Password {
                old: Secret(old.clone()),
                new: Secret(new.clone()),
            },
            (Asked::Password, [_, _, _]) => Command::Invalid(
                "the new password was not typed the same twice; nothing was changed".into(),
            ),
            (Asked::DeleteAccount, [password]) => Command::DeleteAccount(Secret(password.clone())),
            _ => Command::Invalid("not every password was given; nothing was done".into()),
        }
    }
}

/// What a console line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A plain line: a message to everyone online.
    Broadcast(String),
    /// `userId;;message` (or `name;;message`): a private message.
    Private {
        /// Recipient.
        to: UserRef,
        /// Text.
        body: String,
    },
    /// `#group text`: a message to a named group.
    Group {
        /// Group name.
        group: String,
        /// Text.
        body: String,
    },
    /// `:olu [prefix]`: list online users.
    OnlineUsers(String),
    /// `:create NAME [invite-only]`: create a group.
    Create {
        /// Group name.
        group: String,
        /// Only users the owner invites get in.
        invite_only: bool,
    },
    /// `:invite NAME USER`: the owner invites a user (by id or name).
    Invite {
        /// Group name.
        group: String,
        /// The user invited.
        user: UserRef,
    },
    /// `:remove NAME USER`: the owner removes a member (by id or name).
    Remove {
        /// Group name.
        group: String,
        /// The user removed.
        user: UserRef,
    },
    /// `:owner NAME USER`: the owner hands the group to a member (by id or name).
    Owner {
        /// Group name.
        group: String,
        /// The member who owns it from now on.
        user: UserRef,
    },
    /// `:join NAME`: join a group.
    Join(String),
    /// `:leave NAME`: leave a group.
    Leave(String),
    /// `:members NAME`: list a group's members.
    Members(String),
    /// `:groups`: list my groups.
    Groups,
    /// `:block USER`: refuse a user's private messages and invitations.
    Block(UserRef),
    /// `:unblock USER`: take them again.
    Unblock(UserRef),
    /// `:who NAME`: a user's id and whether they are online, or when they were last seen.
    Who(String),
    /// `:password OLD NEW`: change one's password.
    Password {
        /// The password now.
        old: Secret,
        /// The password from now on.
        new: Secret,
    },
    /// `:delete-account PASSWORD`: delete one's account for good, then quit.
    DeleteAccount(Secret),
    /// `:password` or `:delete-account` alone: the passwords are asked for, unseen (at a
    /// terminal; elsewhere the line is refused as incomplete).
    Ask(Asked),
    /// `:lastseen [hide|show]`: whether others see when I was last seen (and I theirs).
    LastSeen(Option<bool>),
    /// `:unsend [USER|#GROUP]`: take back the latest message this console sent (to USER or
    /// GROUP).
    Unsend(Option<Conversation>),
    /// `:receipts [hide|show]`: who read my private messages; or whether I give read
    /// receipts (and get others').
    Receipts(Option<bool>),
    /// `:status [TEXT|clear]`: show my status, set it, or clear it (`Some("")`).
    Status(Option<String>),
    /// `:report USER [REASON]`: report a user to the operators.
    Report {
        /// The user reported.
        user: UserRef,
        /// Why, in the reporter's words (may be empty).
        reason: String,
    },
    /// `:blocked`: list the users I block.
    Blocked,
    /// `:info`: own id, name and server.
    Info,
    /// `:help`: list commands.
    Help,
    /// `:q`: log out and quit.
    Quit,
    /// `:q words` (CIM's): search the message history for lines with `words`.
    Search(String),
    /// An empty line: nothing to do.
    Nothing,
    /// Unrecognised input, with an explanation.
    Invalid(String),
}

/// Help text for the console.
pub const HELP: &str = "\
commands:
  <text>               send <text> to everyone online
  <user>;;<text>       send <text> privately to <user>, an id or a name
  #<group> <text>      send <text> to a named group
  #all <text>          send <text> to everyone online, also text that starts with ':' or '#'
  :unsend [user|#group]
                       take back the last message you sent (to that user or group) from
                       this console, within 24 hours: if still waiting, it never arrives
  :create <group>      create a group (you become its owner and first member)
  :create <group> invite-only
                       create a group only users you invite get into
  :join <group>        join a group
  :leave <group>       leave a group (or decline its invitation)
  :invite <group> <user>
                       invite a user to a group you own (their :join lets them in)
  :remove <group> <user>
                       remove a member from a group you own, or withdraw an invitation
  :owner <group> <user>
                       hand a group you own to one of its members (you stay a member)
  :members <group>     list a group's members, who is online and who owns it
  :groups              list your groups and the invitations waiting for you
  :block <user>        refuse a user's private messages and group invitations
  :unblock <user>      take them again
  :blocked             list the users you block
  :lastseen [hide|show]
                       hide when you were last seen (and see no one's), or show it again
  :receipts            list who read your private messages (they are told when you read theirs)
  :receipts hide|show  give no read receipts (and get none), or give them again
  :status [text]       show your status, or set it: a line others see in :who
  :status clear        clear it (so a status cannot be the word clear alone)
  :report <user> [reason]
                       report a user (spam, abuse) to the cluster's operators
  :who <name>          show a user's id, and whether they are online or when last seen
  :password            change your password (this login stays): asked for, unseen (an
                       empty answer cancels)
  :password <old> <new>
                       the same, in one line (as typed, shown)
  :delete-account      delete your account for good (groups left, inbox gone), then quit:
                       the password is asked for, unseen
  :delete-account <password>
                       the same, in one line (as typed, shown)
  :olu [prefix]        list online users (optionally whose name starts with prefix)
  :info                show your id, name and server
  :q <words>           search your message history on this machine (the latest 50 lines)
  :help (or :all)      show this help
  :q (or :q!)          log out and quit";

/// Parses one input line.
pub fn parse(line: &str) -> Command {
    // Leading blanks too: " :q" or " #team hi" must not go to everyone as a broadcast.
    let line = line.trim_end_matches(['\r', '\n']).trim_start();
    if line.is_empty() {
        return Command::Nothing;
    }
    if let Some(rest) = line.strip_prefix(':') {
        let mut parts = rest.trim().splitn(2, char::is_whitespace);
        let verb = parts.next().unwrap_or_default().to_ascii_lowercase();
        let arg = parts.next().unwrap_or_default().trim().to_string();
        return match verb.as_str() {
            "" => Command::Invalid("a command follows ':'; type :help".into()),
            // CIM's `:q keyword`: a search, never a quit.
            "q" if !arg.is_empty() => Command::Search(arg),
            "q!" | "quit" | "groups" | "blocked" | "info" | "help" | "all" if !arg.is_empty() => {
                Command::Invalid(format!(":{verb} takes nothing after it; type :help"))
            }
            "q" | "q!" | "quit" => Command::Quit,
            "olu" if arg.len() > MAX_NAME_LEN => Command::Invalid(format!(
                "no name starts with that: names are at most {MAX_NAME_LEN} characters"
            )),
            "olu" => Command::OnlineUsers(arg),
            "groups" => Command::Groups,
            "blocked" => Command::Blocked,
            "block" | "unblock" => match UserRef::parse(&arg) {
                Some(user) if verb == "block" => Command::Block(user),
                Some(user) => Command::Unblock(user),
                None => Command::Invalid(format!("use :{verb} <userId or name>")),
            },
            "password" => match arg.split_whitespace().collect::<Vec<_>>()[..] {
                [] => Command::Ask(Asked::Password),
                [old, new] => Command::Password {
                    old: Secret(old.to_string()),
                    new: Secret(new.to_string()),
                },
                _ => Command::Invalid(Asked::Password.usage().into()),
            },
            "lastseen" | "receipts" => {
                let hide = match arg.as_str() {
                    "" => None,
                    "hide" => Some(true),
                    "show" => Some(false),
                    _ => {
                        let use_ = format!("use :{verb}, :{verb} hide or :{verb} show");
                        return Command::Invalid(use_);
                    }
                };
                if verb == "lastseen" {
                    Command::LastSeen(hide)
                } else {
                    Command::Receipts(hide)
                }
            }
            "unsend" if arg.is_empty() => Command::Unsend(None),
            "unsend" => match arg.strip_prefix('#') {
                Some(group) if is_valid_name(group) && group != cim_proto::BROADCAST_GROUP => {
                    Command::Unsend(Some(Conversation::Group(group.to_string())))
                }
                Some(cim_proto::BROADCAST_GROUP) => {
                    Command::Invalid("a message to everyone online cannot be unsent".into())
                }
                Some(_) => Command::Invalid(format!("use :unsend #<group>: names are {NAME_RULE}")),
                None => match UserRef::parse(&arg) {
                    Some(user) => Command::Unsend(Some(Conversation::User(user))),
                    None => Command::Invalid(
                        "use :unsend, :unsend <userId or name> or :unsend #<group>".into(),
                    ),
                },
            },
            "report" => {
                let (user, reason) = arg.split_once(char::is_whitespace).unwrap_or((&arg, ""));
                match UserRef::parse(user) {
                    Some(user) => Command::Report {
                        user,
                        reason: reason.trim().to_string(),
                    },
                    None => Command::Invalid("use :report <userId or name> [reason]".into()),
                }
            }
            "delete-account" => match arg.split_whitespace().collect::<Vec<_>>()[..] {
                [] => Command::Ask(Asked::DeleteAccount),
                [password] => Command::DeleteAccount(Secret(password.to_string())),
                _ => Command::Invalid(Asked::DeleteAccount.usage().into()),
            },
            "status" if arg.is_empty() => Command::Status(None),
            "status" if arg == "clear" => Command::Status(Some(String::new())),
            "status" => Command::Status(Some(arg)),
            "who" if is_valid_name(&arg) => Command::Who(arg),
            "who" => Command::Invalid(format!("use :who <name>: names are {NAME_RULE}")),
            "create" | "join" | "leave" | "members" | "invite" | "remove" | "owner"
                if arg.is_empty() =>
            {
                Command::Invalid(format!(":{verb} needs a group name"))
            }
            "create" => parse_create(&arg),
            "invite" | "remove" | "owner" => parse_member_change(&verb, &arg),
            "join" | "leave" | "members" if arg.len() > MAX_NAME_LEN => {
                Command::Invalid(no_such_group_name())
            }
            "join" => Command::Join(arg),
            "leave" => Command::Leave(arg),
            "members" => Command::Members(arg),
            "info" => Command::Info,
            "help" | "all" => Command::Help,
            other => Command::Invalid(format!("unknown command :{other}; type :help")),
        };
    }
    if let Some(rest) = line.strip_prefix('#') {
        return match rest.split_once(char::is_whitespace) {
            Some((group, _)) if group.len() > MAX_NAME_LEN => {
                Command::Invalid(no_such_group_name())
            }
            Some((group, body)) if !group.is_empty() && !body.trim().is_empty() => Command::Group {
                group: group.to_string(),
                body: body.to_string(),
            },
            _ => Command::Invalid("use #<group> <text>".into()),
        };
    }
    // `userId;;text` only with one word before the `;;`: "see you;; later" is chat.
    if let Some((to, body)) = line
        .split_once(";;")
        .filter(|(to, _)| !to.trim().contains(char::is_whitespace))
    {
        return match UserRef::parse(to.trim()) {
            Some(to) if !body.trim().is_empty() => Command::Private {
                to,
                body: body.to_string(),
            },
            Some(_) => Command::Invalid("empty private message".into()),
            None => Command::Invalid(format!(
                "{:?} is not a user id or name; use <user>;;<text>",
                printable(to)
            )),
        };
    }
    Command::Broadcast(line.to_string())
}

/// `:create NAME [invite-only]`.
fn parse_create(arg: &str) -> Command {
    let mut words = arg.split_whitespace();
    let group = words.next().unwrap_or_default();
    let invite_only = match (words.next(), words.next()) {
        (None, _) => false,
        (Some("invite-only"), None) => true,
        _ => return Command::Invalid("use :create <group> [invite-only]".into()),
    };
    if group.len() > MAX_NAME_LEN {
        return Command::Invalid(no_such_group_name());
    }
    Command::Create {
        group: group.to_string(),
        invite_only,
    }
}

/// `:invite NAME USER`, `:remove NAME USER` and `:owner NAME USER`.
fn parse_member_change(verb: &str, arg: &str) -> Command {
    let words: Vec<&str> = arg.split_whitespace().collect();
    let [group, user] = words[..] else {
        return Command::Invalid(format!("use :{verb} <group> <user>"));
    };
    if group.len() > MAX_NAME_LEN {
        return Command::Invalid(no_such_group_name());
    }
    let Some(user) = UserRef::parse(user) else {
        return Command::Invalid(format!(
            "{:?} is not a user id or name; use :{verb} <group> <user>",
            printable(user)
        ));
    };
    let group = group.to_string();
    match verb {
        "invite" => Command::Invite { group, user },
        "owner" => Command::Owner { group, user },
        _ => Command::Remove { group, user },
    }
}

/// Why a name longer than any group's is refused before asking the router.
fn no_such_group_name() -> String {
    format!("too long for a group name: group names are {NAME_RULE}")
}

/// `text` safe to print on a terminal: control characters (line breaks, escape sequences that
/// would move the cursor or recolour the screen) and bidirectional overrides are shown escaped,
/// so another user cannot forge a line or rewrite the screen. Tabs stay.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if cim_core::text::is_control_or_format(c) && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Milliseconds in a day.
const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// When a message was sent, `ms` after the Unix epoch, in UTC: the time of day `HH:MM:SS` for
/// a message of the day it is at `now_ms`, with the date before it (`YYYY-MM-DD HH:MM:SS`)
/// for an older one (an offline message from days ago).
pub fn timestamp(ms: u64, now_ms: u64) -> String {
    let secs = ms / 1000;
    let time = format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    );
    if ms / DAY_MS == now_ms / DAY_MS {
        return time;
    }
    let (year, month, day) = civil_date(ms / DAY_MS);
    format!("{year:04}-{month:02}-{day:02} {time}")
}

/// `ms` after the Unix epoch as `YYYY-MM-DD HH:MM:SS` in UTC, whatever day it is now (the
/// message history's time).
pub fn date_time(ms: u64) -> String {
    // The date shows for any moment not of day `u64::MAX / DAY_MS`, far beyond any clock.
    timestamp(ms, u64::MAX)
}

/// The proleptic Gregorian date `days` days after 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn printed_text_cannot_forge_lines_or_escape_the_terminal() {
        assert_eq!(printable("hi\tthere"), "hi\tthere");
        assert_eq!(
            printable("a\n[12:00:00] admin: b"),
            "a\\n[12:00:00] admin: b"
        );
        assert_eq!(printable("\u{1b}[2J"), "\\u{1b}[2J");
        assert_eq!(printable("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(printable("grüße 👋"), "grüße 👋");
    }

    #[test]
    fn parses_cim_syntax() {
        assert_eq!(parse("hello all"), Command::Broadcast("hello all".into()));
        assert_eq!(
            parse("42;;hi there;; you"),
            Command::Private {
                to: UserRef::Id(42),
                body: "hi there;; you".into()
            }
        );
        assert_eq!(parse(":olu"), Command::OnlineUsers(String::new()));
        assert_eq!(parse(":olu al"), Command::OnlineUsers("al".into()));
        assert_eq!(parse(":q"), Command::Quit);
        assert_eq!(parse(":info"), Command::Info);
        assert_eq!(parse(":Q"), Command::Quit);
        assert_eq!(
            parse("#team\thi"),
            Command::Group {
                group: "team".into(),
                body: "hi".into()
            }
        );
        assert!(matches!(parse("7;;   "), Command::Invalid(_)));
        assert_eq!(parse(":help"), Command::Help);
        assert_eq!(
            parse("#rust hello all"),
            Command::Group {
                group: "rust".into(),
                body: "hello all".into()
            }
        );
        assert!(matches!(parse("#rust"), Command::Invalid(_)));
        assert_eq!(parse(":join rust"), Command::Join("rust".into()));
        assert_eq!(
            parse(":create rust"),
            Command::Create {
                group: "rust".into(),
                invite_only: false
            }
        );
        assert_eq!(
            parse(":create rust  invite-only"),
            Command::Create {
                group: "rust".into(),
                invite_only: true
            }
        );
        assert!(matches!(parse(":create rust open"), Command::Invalid(_)));
        assert!(matches!(
            parse(":create rust invite-only x"),
            Command::Invalid(_)
        ));
        assert_eq!(
            parse(":invite rust 42"),
            Command::Invite {
                group: "rust".into(),
                user: UserRef::Id(42)
            }
        );
        assert_eq!(
            parse(":remove rust bob"),
            Command::Remove {
                group: "rust".into(),
                user: UserRef::Name("bob".into())
            }
        );
        assert_eq!(
            parse(":owner rust bob"),
            Command::Owner {
                group: "rust".into(),
                user: UserRef::Name("bob".into())
            }
        );
        assert!(matches!(parse(":owner rust"), Command::Invalid(_)));
        assert!(matches!(parse(":owner"), Command::Invalid(_)));
        assert!(matches!(parse(":invite rust bo/b"), Command::Invalid(_)));
        assert!(matches!(parse(":invite rust"), Command::Invalid(_)));
        assert!(matches!(parse(":remove"), Command::Invalid(_)));
        assert!(matches!(parse(":remove rust 4 2"), Command::Invalid(_)));
        assert_eq!(parse(":leave rust"), Command::Leave("rust".into()));
        assert_eq!(parse(":members rust"), Command::Members("rust".into()));
        assert_eq!(parse(":groups"), Command::Groups);
        assert_eq!(parse(":block 42"), Command::Block(UserRef::Id(42)));
        assert_eq!(
            parse(":unblock  bob "),
            Command::Unblock(UserRef::Name("bob".into()))
        );
        assert_eq!(parse(":who bob"), Command::Who("bob".into()));
        assert_eq!(
            parse(":password old-pw new-pw"),
            Command::Password {
                old: Secret("old-pw".into()),
                new: Secret("new-pw".into())
            }
        );
        let shown = format!("{:?}", parse(":password old-pw new-pw"));
        assert!(!shown.contains("-pw"), "{shown}");
        assert!(matches!(parse(":password new-pw"), Command::Invalid(_)));
        assert_eq!(parse(":password"), Command::Ask(Asked::Password));
        assert_eq!(
            parse(":delete-account "),
            Command::Ask(Asked::DeleteAccount)
        );
        assert_eq!(
            parse(":report bob  sends  spam "),
            Command::Report {
                user: UserRef::Name("bob".into()),
                reason: "sends  spam".into()
            }
        );
        assert_eq!(
            parse(":report 42"),
            Command::Report {
                user: UserRef::Id(42),
                reason: String::new()
            }
        );
        assert!(matches!(parse(":report"), Command::Invalid(_)));
        assert_eq!(parse(":lastseen"), Command::LastSeen(None));
        assert_eq!(parse(":lastseen hide"), Command::LastSeen(Some(true)));
        assert_eq!(parse(":LastSeen show"), Command::LastSeen(Some(false)));
        assert!(matches!(parse(":lastseen off"), Command::Invalid(_)));
        assert_eq!(parse(":status"), Command::Status(None));
        assert_eq!(parse(":status clear"), Command::Status(Some(String::new())));
        assert_eq!(
            parse(":status  at lunch, back at 2 "),
            Command::Status(Some("at lunch, back at 2".into()))
        );
        assert_eq!(parse(":unsend"), Command::Unsend(None));
        assert_eq!(
            parse(":unsend bob"),
            Command::Unsend(Some(Conversation::User(UserRef::Name("bob".into()))))
        );
        assert_eq!(
            parse(":unsend 7"),
            Command::Unsend(Some(Conversation::User(UserRef::Id(7))))
        );
        assert_eq!(
            parse(":unsend #team"),
            Command::Unsend(Some(Conversation::Group("team".into())))
        );
        for line in [
            ":unsend bob now",
            ":unsend #all",
            ":unsend #",
            ":unsend #a b",
        ] {
            assert!(matches!(parse(line), Command::Invalid(_)), "{line}");
        }
        assert_eq!(parse(":receipts"), Command::Receipts(None));
        assert_eq!(parse(":receipts hide"), Command::Receipts(Some(true)));
        assert_eq!(parse(":Receipts show"), Command::Receipts(Some(false)));
        assert!(matches!(parse(":receipts bob"), Command::Invalid(_)));
        assert!(matches!(parse(":report b!b spam"), Command::Invalid(_)));
        assert_eq!(
            parse(":delete-account my-pw"),
            Command::DeleteAccount(Secret("my-pw".into()))
        );
        let shown = format!("{:?}", parse(":delete-account my-pw"));
        assert!(!shown.contains("my-pw"), "{shown}");
        assert!(matches!(parse(":delete-account a b"), Command::Invalid(_)));
        assert!(matches!(parse(":who"), Command::Invalid(_)));
        assert!(matches!(parse(":who bob alice"), Command::Invalid(_)));
        assert_eq!(parse(":blocked"), Command::Blocked);
        assert!(matches!(parse(":block"), Command::Invalid(_)));
        assert!(matches!(parse(":block b!b"), Command::Invalid(_)));
        assert!(matches!(parse(":unblock 4 2"), Command::Invalid(_)));
        assert!(matches!(parse(":blocked 4"), Command::Invalid(_)));
        assert!(matches!(parse(":join"), Command::Invalid(_)));
        assert_eq!(parse("   "), Command::Nothing);
        // A name before the `;;` is a user too (names are never digits alone).
        assert_eq!(
            parse("bob;;hi"),
            Command::Private {
                to: UserRef::Name("bob".into()),
                body: "hi".into()
            }
        );
        assert!(matches!(parse("b@b;;hi"), Command::Invalid(_)));
        assert_eq!(
            parse("see you;; later"),
            Command::Broadcast("see you;; later".into())
        );
        assert_eq!(
            parse("#all :) hi"),
            Command::Group {
                group: "all".into(),
                body: ":) hi".into()
            }
        );
        assert!(matches!(parse("7;;"), Command::Invalid(_)));
        assert!(matches!(parse(":nope"), Command::Invalid(_)));
        // CIM's quit and help spellings; an argument after a command that takes none is
        // refused, not ignored (`:q word` was CIM's history search, not a quit).
        assert_eq!(parse(":q!"), Command::Quit);
        assert_eq!(parse(":all"), Command::Help);
        assert_eq!(
            parse(":q Hello  there "),
            Command::Search("Hello  there".into())
        );
        assert!(matches!(parse(":q! hello"), Command::Invalid(_)));
        assert!(matches!(parse(":info me"), Command::Invalid(_)));
        assert!(matches!(parse(":"), Command::Invalid(_)));
        // Names longer than any can be are refused before a request is made.
        let long = "g".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(parse(&format!("#{long} hi")), Command::Invalid(_)));
        assert!(matches!(
            parse(&format!(":join {long}")),
            Command::Invalid(_)
        ));
        assert!(matches!(
            parse(&format!(":olu {long}")),
            Command::Invalid(_)
        ));
        let longest = "g".repeat(MAX_NAME_LEN);
        assert_eq!(
            parse(&format!(":join {longest}")),
            Command::Join(longest.clone())
        );
        assert_eq!(
            parse(&format!(":olu {longest}")),
            Command::OnlineUsers(longest)
        );
        // Leading blanks do not turn a command or a group message into a broadcast.
        assert_eq!(parse("  :q"), Command::Quit);
        assert_eq!(
            parse(" #team hi"),
            Command::Group {
                group: "team".into(),
                body: "hi".into()
            }
        );
    }

    #[test]
    fn asked_passwords_make_their_command_only_when_typed_alike() {
        let typed = |answers: &[&str]| answers.iter().map(|a| a.to_string()).collect();
        assert_eq!(Asked::Password.prompts().len(), 3);
        assert_eq!(
            Asked::Password.answered(typed(&["old pw", "new pw", "new pw"])),
            Command::Password {
                old: Secret("old pw".into()),
                new: Secret("new pw".into())
            },
            "blanks are fine when asked"
        );
        for answers in [
            &["old", "new", "neu"][..],
            &["old", "", ""],
            &["old", "new"],
        ] {
            let refused = Asked::Password.answered(typed(answers));
            assert!(matches!(refused, Command::Invalid(_)), "{answers:?}");
        }
        assert_eq!(
            Asked::DeleteAccount.answered(typed(&["pw"])),
            Command::DeleteAccount(Secret("pw".into()))
        );
        for answers in [&[""][..], &[]] {
            let refused = Asked::DeleteAccount.answered(typed(answers));
            assert!(matches!(refused, Command::Invalid(_)), "{answers:?}");
        }
    }

    #[test]
    fn a_message_of_today_shows_its_time_and_an_older_one_its_date_too() {
        let at = ((13 * 60 + 5) * 60 + 9) * 1000 + 999;
        assert_eq!(timestamp(at, at + 1000), "13:05:09");
        assert_eq!(timestamp(0, DAY_MS - 1), "00:00:00");
        assert_eq!(timestamp(at, DAY_MS), "1970-01-01 13:05:09");
        // 2024-02-29 (a leap day) 23:59:59 UTC, read on 2026-11-29.
        assert_eq!(
            timestamp(1_709_251_199_000, 1_795_910_400_000),
            "2024-02-29 23:59:59"
        );
        assert_eq!(date_time(at), "1970-01-01 13:05:09");
        assert_eq!(date_time(1_795_910_400_000), "2026-11-29 00:00:00");
        assert_eq!(civil_date(0), (1970, 1, 1));
        assert_eq!(civil_date(11_016), (2000, 2, 29));
        assert_eq!(civil_date(20_786), (2026, 11, 29));
        assert_eq!(civil_date(20_818), (2026, 12, 31));
        assert_eq!(civil_date(20_819), (2027, 1, 1));
    }
}
