//! `cim-client`: the console client. A plain line goes to everyone online, `userId;;text` is
//! private, `:olu` lists online users, `:q` quits; `:help` lists all commands.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use cim_client::console::{self, Command, Conversation, UserRef};
use cim_client::history::{self, History};
use cim_client::receipts::{SentLog, Shown, Unreported, Unsent};
use cim_client::{
    Ack, Client, ClientConfig, ClientError, Event, IncomingMessage, LoginOptions, Target,
};
use clap::Parser;
use std::io::{BufRead, IsTerminal};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

/// cim console client.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Router URL.
    #[arg(long, env = "CIM_ROUTER", default_value = "https://127.0.0.1:8443")]
    router: String,
    /// CA certificate that signed the router and server certificates.
    #[arg(long, env = "CIM_CA", default_value = "certs-dev/ca.pem")]
    ca: PathBuf,
    /// User name.
    #[arg(long, env = "CIM_NAME")]
    name: String,
    /// Password (asked for, unseen, when not given and the input is a terminal).
    #[arg(long, env = "CIM_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// Register the name first (an existing name is fine if the password matches).
    #[arg(long)]
    register: bool,
    /// If the user is online elsewhere, end that session instead of being refused.
    #[arg(long)]
    takeover: bool,
    /// Local address of the client's UDP socket.
    #[arg(long, env = "CIM_BIND", default_value = "0.0.0.0:0")]
    bind: SocketAddr,
    /// File of the message history that `:q words` searches (default: under
    /// $XDG_DATA_HOME/cim/history/, or ~/.local/share/cim/history/, per router and user).
    #[arg(long, env = "CIM_HISTORY")]
    history: Option<PathBuf>,
    /// Keep no message history (also when CIM_HISTORY names a file).
    #[arg(long)]
    no_history: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // A failure to start is one line for a person, not an error chain with a backtrace.
    match start(&args).await {
        Ok((config, client, events)) => {
            announce(&client);
            let history = open_history(&args, &client);
            let terminal = terminal_settings();
            let status = chat(config, client, events, history).await;
            restore_terminal(terminal.as_ref());
            status
        }
        Err(why) => {
            eprintln!("! {why}");
            ExitCode::from(CANNOT_LOG_IN_EXIT)
        }
    }
}

/// Registers (if asked) and logs in; the error says why not, in words.
async fn start(args: &Args) -> Result<(ClientConfig, Client, cim_client::Events), String> {
    let ca = std::fs::read(&args.ca).map_err(|e| {
        format!(
            "cannot read the CA certificate {}: {e} (give it with --ca FILE, or run where the \
             router wrote certs-dev/)",
            args.ca.display()
        )
    })?;
    let mut config = ClientConfig::new(args.router.clone(), ca);
    config.bind_addr = args.bind;
    let password = password(args)?;
    let mut name_taken = false;
    if args.register {
        match cim_client::register(&config, &args.name, &password).await {
            Ok(id) => println!("registered {} with id {id}", args.name),
            Err(e) if e.code() == Some("name_taken") => name_taken = true,
            Err(e) => return Err(format!("cannot register: {}", in_words(&e, &args.router))),
        }
    }
    let options = LoginOptions {
        takeover: args.takeover,
    };
    match Client::login(&config, &args.name, &password, options).await {
        Ok((client, events)) => Ok((config, client, events)),
        Err(e) if name_taken && e.code() == Some("invalid_credentials") => Err(format!(
            "the name {:?} is registered already, and not with this password",
            args.name
        )),
        Err(e) => Err(format!("cannot log in: {}", in_words(&e, &args.router))),
    }
}

/// The message history the flags ask for, once logged in (the name is then a valid one);
/// says where it is kept, or why none is.
fn open_history(args: &Args, client: &Client) -> Option<Arc<History>> {
    if args.no_history {
        return None;
    }
    let path = args
        .history
        .clone()
        .or_else(|| history::default_path(&client.info().name, &args.router));
    let Some(path) = path else {
        println!("! no message history: $HOME is not set (give a file with --history FILE)");
        return None;
    };
    match History::open(path.clone()) {
        Ok(history) => {
            println!("message history: {} (:q words searches it)", path.display());
            Some(Arc::new(history))
        }
        Err(e) => {
            println!("! no message history: cannot open {}: {e}", path.display());
            None
        }
    }
}

/// Appends `text`, at `ms` after the epoch, to the history; says so if that failed (then
/// no more is kept).
fn keep(history: Option<&Arc<History>>, ms: u64, text: &str) {
    let Some(history) = history else {
        return;
    };
    if let Err(e) = history.record(&format!("[{}] {text}", console::date_time(ms))) {
        println!(
            "! message history: cannot write {}: {e}; no more is kept",
            history.path().display()
        );
    }
}

/// The invitations waiting for the user, and how to take one up.
fn invitations_line(groups: &[String]) -> String {
    let listed: Vec<String> = groups.iter().map(|g| format!("#{g}")).collect();
    format!(
        "invitations waiting ({}): {} (:join <group> to join)",
        groups.len(),
        listed.join(" ")
    )
}

/// Says at start which invitations wait (made while the user was away, who was not told
/// then). Best effort: a failure to ask is no reason to stop.
async fn announce_invitations(client: &Client) {
    if let Ok(mine) = client.groups_and_invitations().await
        && !mine.invitations.is_empty()
    {
        println!("* {}", invitations_line(&mine.invitations));
    }
}

/// A received message as shown, without its time: sender name and id (a reply is
/// `id;;text`), whether it was private or to which group, and the text, escaped.
fn message_text(m: &IncomingMessage) -> String {
    let kind = match &m.group {
        Some(g) if g == cim_proto::BROADCAST_GROUP => String::new(),
        Some(g) => format!(" [{}]", console::printable(g)),
        None => " (private)".into(),
    };
    format!(
        "{} ({}){kind}: {}",
        console::printable(&m.from_name),
        m.from_user,
        console::printable(&m.body)
    )
}

/// A registration's or login's error as a person at the console needs it.
fn in_words(e: &ClientError, router: &str) -> String {
    match (e.code(), e) {
        (Some("invalid_credentials"), _) => "wrong name or password".into(),
        (Some("already_online"), _) => {
            "you are logged in elsewhere; run again with --takeover to end that session".into()
        }
        (_, ClientError::Api { code, message, .. }) => format!("{message} ({code})"),
        (_, ClientError::Http(why)) => format!("the router at {router} did not answer: {why}"),
        _ => e.to_string(),
    }
}

/// Runs the console until the user quits or the session ends; returns the exit status.
async fn chat(
    config: ClientConfig,
    client: Client,
    mut events: cim_client::Events,
    history: Option<Arc<History>>,
) -> ExitCode {
    println!("type :help for commands; times are UTC");

    // Commands run one after another on a task of their own, so that a send waiting for a
    // reconnect neither holds up what arrives meanwhile nor a :q.
    let client = Arc::new(client);
    // Our messages: the private ones not yet read, to show which of them a read receipt
    // reaches, and the latest, for :unsend.
    let sent_log = Arc::new(Mutex::new(SentLog::default()));
    // Messages shown (private and to named groups), to say which one an unsend takes back.
    let mut shown = Shown::default();
    let (read, mut receipts) = give_read_receipts(client.clone());
    let (commands, mut queued) = mpsc::unbounded_channel::<Command>();
    // Commands typed and not yet done: a Ctrl-C that drops them says how many.
    let pending = Arc::new(AtomicUsize::new(0));
    // Sends that failed and commands dropped: the exit status says whether there were any.
    let failed = Arc::new(AtomicUsize::new(0));
    let mut worker = tokio::spawn({
        let client = client.clone();
        let history = history.clone();
        let pending = pending.clone();
        let failed = failed.clone();
        let sent_log = sent_log.clone();
        async move {
            // First, as if typed: what waits from while the user was away.
            announce_invitations(&client).await;
            while let Some(command) = queued.recv().await {
                run_counted(&client, history.as_ref(), &sent_log, command, &failed).await;
                pending.fetch_sub(1, Ordering::Relaxed);
            }
        }
    });
    let mut lines = stdin_commands();
    // One handler for the whole loop: a Ctrl-C between two turns is not missed.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let ended = loop {
        tokio::select! {
            line = lines.recv() => match line {
                // End of input (or Ctrl-D) leaves like :q.
                None | Some(Command::Quit) => break Ending::Quit,
                // What needs no cluster is done at once, not behind a send that waits for a
                // reconnect.
                Some(command @ (Command::Help | Command::Info | Command::Nothing | Command::Invalid(_))) => {
                    run_counted(&client, history.as_ref(), &sent_log, command, &failed).await;
                }
                // Done here, with the events left unread meanwhile: the kick it brings is read
                // only if the deletion failed after all.
                Some(Command::DeleteAccount(password)) => match client.delete_account(&password.0).await {
                    Ok(()) => break Ending::Deleted,
                    Err(e) => {
                        println!("! account not deleted: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Some(command) => {
                    pending.fetch_add(1, Ordering::Relaxed);
                    let _ = commands.send(command);
                }
            },
            _ = &mut ctrl_c => break Ending::Interrupted,
            event = events.next() => match event {
                Some(Event::Message(m)) => {
                    let text = match m.unsends {
                        Some(msg_id) => unsend_text(&mut shown, &m, msg_id),
                        None => {
                            // A broadcast cannot be unsent: not kept.
                            if m.group.as_deref() != Some(cim_proto::BROADCAST_GROUP) {
                                shown.shown(m.from_user, m.group.as_deref(), m.msg_id, &m.body);
                            }
                            // Shown is read, at a console.
                            if m.group.is_none() {
                                let _ = read.send((m.from_user, m.msg_id));
                            }
                            Some(message_text(&m))
                        }
                    };
                    if let Some(text) = text {
                        println!("[{}] {text}", console::timestamp(m.created_at_ms, cim_core::now_ms()));
                        keep(history.as_ref(), m.created_at_ms, &text);
                    }
                }
                // Said only of a message this console sent: a receipt is the reader's word,
                // and one for nothing sent here (or told already) would say nothing.
                Some(Event::Read(r)) => {
                    if let Some(text) = lock(&sent_log).read(r.user_id, r.up_to_msg_id) {
                        let who = named(&r.name, r.user_id);
                        println!("* {who} read: {}", console::printable(&text));
                    }
                }
                Some(Event::Kicked(reason)) => break Ending::Ended(format!("session ended: {}", console::printable(&reason))),
                Some(Event::Drain(reason)) => {
                    println!("! server is draining ({}); moving to another server", console::printable(&reason));
                }
                Some(Event::Disconnected(reason)) => {
                    println!("! connection lost ({}); reconnecting", console::printable(&reason));
                }
                Some(Event::Presence { user_id, name, online }) => {
                    let state = if online { "online" } else { "offline" };
                    println!("* {} ({user_id}) is {state}", console::printable(&name));
                }
                Some(Event::GroupChange { group, user_id, name, joined, by }) => {
                    let group = console::printable(&group);
                    let (who, were) = if user_id == client.info().user_id {
                        ("you".to_string(), "were")
                    } else {
                        (named(&name, user_id), "was")
                    };
                    match (by, joined) {
                        (_, true) => println!("* {who} joined #{group}"),
                        (None, false) => println!("* {who} left #{group}"),
                        (Some((by_id, by_name)), false) => {
                            println!("* {who} {were} removed from #{group} by {} ({by_id})", console::printable(&by_name));
                        }
                    }
                }
                Some(Event::GroupOwner { group, previous_owner_id, previous_owner_name, handed_over }) => {
                    let group = console::printable(&group);
                    let previous = named(&previous_owner_name, previous_owner_id);
                    if handed_over {
                        println!("* you own #{group} now: {previous} handed it to you");
                    } else {
                        println!("* you own #{group} now: {previous} left it");
                    }
                }
                Some(Event::GroupOwnerChange { group, owner_id, owner_name, previous_owner_id, previous_owner_name, handed_over }) => {
                    let group = console::printable(&group);
                    let owner = named(&owner_name, owner_id);
                    let previous = named(&previous_owner_name, previous_owner_id);
                    let how = if handed_over { "handed it over" } else { "left it" };
                    println!("* {owner} owns #{group} now: {previous} {how}");
                }
                Some(Event::GroupInvite { group, by_user_id, by_name }) => {
                    let group = console::printable(&group);
                    println!("* {} ({by_user_id}) invited you to #{group}: :join {group} to join", console::printable(&by_name));
                }
                Some(Event::Reconnecting { attempts, error }) => {
                    println!("! still reconnecting ({attempts} attempts): {}", console::printable(&error));
                }
                Some(Event::Reconnected(how)) => {
                    let how_text = if how.relogin { "logged in again" } else { "resumed" };
                    println!("reconnected ({how_text}) on server {}", how.server_id);
                }
                // A kind of event this console does not know yet (a newer library).
                Some(_) => {}
                None => break Ending::Ended("session ended".to_string()),
            }
        }
    };
    if !matches!(ended, Ending::Quit) {
        stop(&mut receipts).await;
    }
    match ended {
        Ending::Deleted => {
            stop(&mut worker).await;
            println!("account deleted; bye");
            dropped(&pending, &failed, "account deleted");
            return quit_status(&failed);
        }
        Ending::Ended(why) => {
            stop(&mut worker).await;
            println!("! {why}");
            dropped(&pending, &failed, "session ended");
            // Not a quit the user asked for: a script running the console can tell.
            return ExitCode::from(SESSION_ENDED_EXIT);
        }
        Ending::Quit => {
            // What was typed before :q still goes out, in order; a Ctrl-C gives up on it. The
            // wait is per command: a long paste goes out at the rate limit's pace, and only a
            // command that makes no progress for a send's time (and then some) gives up.
            drop(commands);
            let limit = config.send_timeout + Duration::from_secs(5);
            let unfinished = loop {
                let left = pending.load(Ordering::Relaxed);
                tokio::select! {
                    done = tokio::time::timeout(limit, &mut worker) => match done {
                        Ok(_) => break None,
                        Err(_) if pending.load(Ordering::Relaxed) < left => {}
                        Err(_) => break Some("timed out"),
                    },
                    _ = &mut ctrl_c => break Some(INTERRUPTED),
                }
            };
            if let Some(why) = unfinished {
                stop(&mut worker).await;
                dropped(&pending, &failed, why);
            }
            // The messages read last are told before the logout, unless a Ctrl-C came (then
            // its future is spent) or comes meanwhile.
            drop(read);
            let flushed = async {
                if unfinished == Some(INTERRUPTED) {
                    return false;
                }
                tokio::select! {
                    done = tokio::time::timeout(RECEIPTS_AT_QUIT, &mut receipts) => done.is_ok(),
                    _ = &mut ctrl_c => false,
                }
            };
            if !flushed.await {
                stop(&mut receipts).await;
            }
        }
        Ending::Interrupted => {
            stop(&mut worker).await;
            dropped(&pending, &failed, "interrupted");
            println!("logging out (Ctrl-C again to skip)");
        }
    }
    // The worker and the receipts' task are gone, so this is the only holder left.
    match Arc::try_unwrap(client) {
        Ok(client) => tokio::select! {
            result = client.logout() => {
                if let Err(e) = result {
                    eprintln!("! logout: {e}");
                }
            }
            _ = tokio::signal::ctrl_c() => eprintln!("! logout skipped"),
        },
        Err(_) => eprintln!("! logout: the client is still in use"),
    }
    println!("bye");
    quit_status(&failed)
}

/// The exit status of a console the user ended: a script piping commands in can tell that
/// not everything went out.
fn quit_status(failed: &AtomicUsize) -> ExitCode {
    if failed.load(Ordering::Relaxed) > 0 {
        ExitCode::from(COMMANDS_FAILED_EXIT)
    } else {
        ExitCode::SUCCESS
    }
}

/// The exit status when registering or logging in failed.
const CANNOT_LOG_IN_EXIT: u8 = 1;

/// The exit status when the session ended without the user quitting (taken over elsewhere,
/// logged out, or ended by the server).
const SESSION_ENDED_EXIT: u8 = 2;

/// The exit status after a quit when a command failed (a send not sent or not confirmed, a
/// group command refused) or typed commands were dropped.
const COMMANDS_FAILED_EXIT: u8 = 3;

/// How long a send refused `rate_limited` (nothing stored) is tried again: a pasted burst of
/// lines goes out at the allowed pace instead of mostly refused.
const RATE_LIMIT_PATIENCE: Duration = Duration::from_secs(30);

/// Says how many typed commands were dropped, and `why` (a send among them may or may not
/// have gone out), and counts them as failed.
fn dropped(pending: &AtomicUsize, failed: &AtomicUsize, why: &str) {
    let dropped = pending.load(Ordering::Relaxed);
    if dropped > 0 {
        failed.fetch_add(dropped, Ordering::Relaxed);
        eprintln!("! {why}: {dropped} command(s) typed before were not done");
    }
}

/// Runs `send` until it is not refused `rate_limited` or [`RATE_LIMIT_PATIENCE`] has passed,
/// waiting a little longer each time (a refusal stored nothing, so trying again cannot
/// duplicate).
async fn paced<T, F: std::future::Future<Output = Result<T, ClientError>>>(
    mut send: impl FnMut() -> F,
) -> Result<T, ClientError> {
    let deadline = tokio::time::Instant::now() + RATE_LIMIT_PATIENCE;
    let mut pause = Duration::from_millis(100);
    loop {
        match send().await {
            Err(e)
                if e.code() == Some(cim_proto::RATE_LIMITED)
                    && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            result => return result,
        }
    }
}

/// How often the console gives the read receipts of what it showed: one per sender for the
/// latest message, not one per message.
const RECEIPTS_EVERY: Duration = Duration::from_secs(1);

/// Stops `task` and waits until it has.
async fn stop(task: &mut tokio::task::JoinHandle<()>) {
    task.abort();
    let _ = task.await;
}

/// Why a quit's wait ended early: a Ctrl-C.
const INTERRUPTED: &str = "interrupted";

/// How long a quit waits for the last read receipts.
const RECEIPTS_AT_QUIT: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Gives read receipts on a task of its own: `(sender, msg id)` sent to the channel is a
/// private message shown, and every [`RECEIPTS_EVERY`] the latest of each sender's is told.
/// Once the channel is dropped, what is left is told once more and the task ends. A receipt
/// that failed is tried again at the next turn, with those not tried yet, unless it was
/// refused for good (a bad id, an account gone); the router says nothing when either user
/// hides receipts.
fn give_read_receipts(
    client: Arc<Client>,
) -> (
    mpsc::UnboundedSender<(u64, u64)>,
    tokio::task::JoinHandle<()>,
) {
    let (read, mut shown) = mpsc::unbounded_channel::<(u64, u64)>();
    let task = tokio::spawn(async move {
        let mut unreported = Unreported::default();
        let mut ticker = tokio::time::interval(RECEIPTS_EVERY);
        loop {
            let last = tokio::select! {
                got = shown.recv() => match got {
                    Some((sender, msg_id)) => {
                        unreported.read(sender, msg_id);
                        continue;
                    }
                    None => true,
                },
                _ = ticker.tick() => false,
            };
            let mut due = unreported.take().into_iter();
            while let Some((sender, msg_id)) = due.next() {
                let Err(e) = client.mark_read(sender, msg_id).await else {
                    continue;
                };
                tracing::debug!(sender, msg_id, error = %e, "read receipt not given");
                let for_good = [cim_proto::BAD_REQUEST, cim_proto::UNKNOWN_USER];
                if !e.code().is_some_and(|code| for_good.contains(&code)) {
                    // The router is away or busy: this and the rest wait for the next turn,
                    // rather than each failing in turn (however many senders there are).
                    for (sender, msg_id) in std::iter::once((sender, msg_id)).chain(due) {
                        unreported.read(sender, msg_id);
                    }
                    break;
                }
            }
            if last {
                return;
            }
        }
    });
    (read, task)
}

/// Why the console loop ended.
enum Ending {
    /// `:q` or the end of input: queued commands finish, then log out.
    Quit,
    /// Ctrl-C: log out at once.
    Interrupted,
    /// The session ended (taken over, logged out elsewhere): nothing to log out.
    Ended(String),
    /// `:delete-account` deleted the account: nothing to log out.
    Deleted,
}

/// Console input, line by line, parsed into commands on a thread of its own: a read on the
/// runtime's blocking pool (`tokio::io::stdin`) cannot be cancelled and would hold the exit
/// until the next Enter. Bytes that are not UTF-8 are replaced, not taken for the end of
/// input. The passwords of `:password` and `:delete-account` alone are asked for here, in
/// turn with the lines, without showing what is typed.
fn stdin_commands() -> mpsc::UnboundedReceiver<Command> {
    let (commands, received) = mpsc::unbounded_channel();
    let terminal = std::io::stdin().is_terminal();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut line = Vec::new();
        loop {
            line.clear();
            match stdin.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    let command = match console::parse(&String::from_utf8_lossy(&line)) {
                        Command::Ask(asked) if terminal => ask(asked),
                        Command::Ask(asked) => Command::Invalid(asked.usage().into()),
                        command => command,
                    };
                    if commands.send(command).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("! cannot read input: {e}");
                    return;
                }
            }
        }
    });
    received
}

/// Asks for the passwords `asked` needs at the terminal, unseen. An empty answer cancels (the
/// rest is not asked), and so does a Ctrl-C, which quits the console as it does anywhere.
fn ask(asked: console::Asked) -> Command {
    ASKING.store(true, Ordering::Relaxed);
    let answered = (|| {
        let mut answers = Vec::new();
        for prompt in asked.prompts() {
            match rpassword::prompt_password(prompt)? {
                answer if answer.is_empty() => break,
                answer => answers.push(answer),
            }
        }
        Ok::<_, std::io::Error>(answers)
    })();
    ASKING.store(false, Ordering::Relaxed);
    match answered {
        Ok(answers) if answers.len() < asked.prompts().len() => {
            println!("(cancelled: nothing was done)");
            Command::Nothing
        }
        Ok(answers) => asked.answered(answers),
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Command::Nothing,
        Err(e) => Command::Invalid(format!("cannot read a password: {e}")),
    }
}

/// Whether a password prompt is open: its terminal echoes nothing, and a console that ends
/// meanwhile (its session taken over) puts the terminal back as it found it.
static ASKING: AtomicBool = AtomicBool::new(false);

/// The terminal's settings when the console started, if its input is one.
fn terminal_settings() -> Option<rustix::termios::Termios> {
    rustix::termios::tcgetattr(std::io::stdin()).ok()
}

/// Puts back `settings` if a password prompt is still open (its thread cannot be stopped in
/// the middle of a read), so the shell is not left without echo.
fn restore_terminal(settings: Option<&rustix::termios::Termios>) {
    if let Some(settings) = settings
        && ASKING.load(Ordering::Relaxed)
    {
        let now = rustix::termios::OptionalActions::Now;
        let _ = rustix::termios::tcsetattr(std::io::stdin(), now, settings);
        println!();
    }
}

/// The password: the one given (`--password`, `CIM_PASSWORD`), or else asked for at the
/// terminal, unseen (twice to register).
fn password(args: &Args) -> Result<String, String> {
    if let Some(password) = &args.password {
        return Ok(password.clone());
    }
    if !std::io::stdin().is_terminal() {
        return Err(
            "no password: give it with --password or CIM_PASSWORD, or run at a terminal to be \
             asked for it"
                .into(),
        );
    }
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt).map_err(|e| format!("cannot read a password: {e}"))
    };
    let password = ask(&format!("password for {}: ", args.name))?;
    if args.register && ask("password again: ")? != password {
        return Err("the password was not typed the same twice".into());
    }
    Ok(password)
}

fn announce(client: &Client) {
    let info = client.info();
    println!(
        "logged in as {} (id {}) on server {} at {}",
        info.name, info.user_id, info.server_id, info.server_addr
    );
}

/// Prints `done` or the error; returns whether it went well.
fn report(result: Result<(), ClientError>, done: &str) -> bool {
    match result {
        Ok(()) => {
            println!("{done}");
            true
        }
        Err(e) => {
            println!("! {e}");
            false
        }
    }
}

/// The id of the user `user` names, with how to name them in what the console prints (the id,
/// or `name (id)`): as given, or looked up by name. `None`, said, if no user has the name or
/// the lookup failed.
async fn user_id(client: &Client, user: &UserRef) -> Option<(u64, String)> {
    match user {
        UserRef::Id(id) => Some((*id, id.to_string())),
        UserRef::Name(name) => match client.user_id_of(name).await {
            Ok(Some(id)) => Some((id, format!("{name} ({id})"))),
            Ok(None) => {
                println!("! {}", no_such_name(name));
                None
            }
            Err(e) => {
                println!("! could not look up {name}: {e}");
                None
            }
        },
    }
}

/// Runs `act` with the id `user` names. A name's id is kept once looked up
/// ([`Client::user_id_of`]); should `act` be refused `unknown_user` (that account was deleted,
/// and its name may be someone else's now), the name is looked up afresh and, if it names
/// another user, `act` runs once more (a refusal stored nothing). Returns the id used, how to
/// show the user, and what `act` gave; `None` if the name names no one.
async fn on_user<T, F: std::future::Future<Output = Result<T, ClientError>>>(
    client: &Client,
    user: &UserRef,
    act: impl Fn(u64) -> F,
) -> Option<(u64, String, Result<T, ClientError>)> {
    let (id, shown) = user_id(client, user).await?;
    let result = act(id).await;
    if let (UserRef::Name(name), Err(e)) = (user, &result)
        && e.code() == Some(cim_proto::UNKNOWN_USER)
    {
        client.forget_user_id(name);
        let (new_id, shown) = user_id(client, user).await?;
        if new_id != id {
            return Some((new_id, shown, act(new_id).await));
        }
    }
    Some((id, shown, result))
}

/// What the console says of a name no user has.
fn no_such_name(name: &str) -> String {
    format!("no user is named {name}")
}

/// What the console says of `m`, an unsend of `sender`'s message `msg_id`: which message it
/// takes back, if this console showed it; nothing for an unsend told already (one may come
/// twice).
fn unsend_text(shown: &mut Shown, m: &IncomingMessage, msg_id: u64) -> Option<String> {
    let unsent = shown.unsent(m.from_user, m.group.as_deref(), msg_id);
    if unsent == Unsent::Told {
        return None;
    }
    let who = named(&m.from_name, m.from_user);
    let place = m
        .group
        .as_deref()
        .map(|g| format!(" in #{}", console::printable(g)))
        .unwrap_or_default();
    Some(match unsent {
        Unsent::Shown(text) => format!("* {who} unsent{place}: {}", console::printable(&text)),
        _ => format!("* {who} unsent a message{place}"),
    })
}

/// How the console names a user: `name (id)`, the name escaped.
fn named(name: &str, id: u64) -> String {
    format!("{} ({id})", console::printable(name))
}

/// Refusals of an unsend that asking again would get again.
const UNSEND_REFUSED_FOR_GOOD: [&str; 6] = [
    "too_late",
    cim_proto::BLOCKED,
    "not_member",
    "unknown_group",
    cim_proto::UNKNOWN_USER,
    cim_proto::BAD_REQUEST,
];

/// `:unsend [user|#group]`: takes back the latest message this console sent (to `user` or
/// `group`).
async fn unsend(
    client: &Client,
    history: Option<&Arc<History>>,
    sent_log: &Mutex<SentLog>,
    from: Option<Conversation>,
) -> bool {
    let to = match &from {
        Some(Conversation::User(user)) => match user_id(client, user).await {
            Some((id, _)) => Some(Target::ToUser(id)),
            None => return false,
        },
        Some(Conversation::Group(group)) => Some(Target::Group(group.clone())),
        None => None,
    };
    let Some(message) = lock(sent_log).latest(to.as_ref()).cloned() else {
        let to = from.map(|_| " to them").unwrap_or_default();
        println!("! no message sent{to} from this console is left to unsend");
        return false;
    };
    let result = client.unsend_to(&message.to, message.msg_id).await;
    let done = format!(
        "you unsent to {}: {}",
        message.to_shown,
        console::printable(&message.excerpt)
    );
    if result.is_ok() {
        keep(history, cim_core::now_ms(), &done);
    }
    // Forgotten once done, or refused for good: the next :unsend goes on to the one before.
    let forget = match &result {
        Ok(()) => true,
        Err(e) => e
            .code()
            .is_some_and(|c| UNSEND_REFUSED_FOR_GOOD.contains(&c)),
    };
    if forget {
        lock(sent_log).unsent(&message.to, message.msg_id);
    }
    report(result, &done)
}

/// How to report a failed send.
fn unsent(e: &ClientError) -> &'static str {
    if e.send_outcome_unknown() {
        "not confirmed (it may still arrive)"
    } else {
        "not sent"
    }
}

/// [`run`], counting a failure in `failed`.
async fn run_counted(
    client: &Client,
    history: Option<&Arc<History>>,
    sent_log: &Mutex<SentLog>,
    command: Command,
    failed: &AtomicUsize,
) {
    if !run(client, history, sent_log, command).await {
        failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether `body` is over the limit the server named; if so, says so (`to` names the target).
fn refused_as_too_long(client: &Client, body: &str, to: &str) -> bool {
    match client.max_body_bytes() {
        Some(max) if body.len() > max => {
            println!("! not sent{to}: {}", cim_proto::too_long(body.len(), max));
            true
        }
        _ => false,
    }
}

/// Carries out one console command, keeping what it sent in `history`, and its private
/// messages in `sent_log`. Returns false if it failed.
async fn run(
    client: &Client,
    history: Option<&Arc<History>>,
    sent_log: &Mutex<SentLog>,
    command: Command,
) -> bool {
    match command {
        // Checked here, as a text field would: the server would refuse it the same way.
        Command::Broadcast(body) if refused_as_too_long(client, &body, "") => false,
        Command::Private { to, body }
            if refused_as_too_long(client, &body, &format!(" to {to}")) =>
        {
            false
        }
        Command::Group { group, body }
            if refused_as_too_long(client, &body, &format!(" to #{group}")) =>
        {
            false
        }
        Command::Broadcast(body) => {
            let result = paced(|| client.send_group(cim_proto::BROADCAST_GROUP, &body)).await;
            let mine = format!("you: {}", console::printable(&body));
            sent(result, "", "no one else is online", history, &mine)
        }
        Command::Private { to, body } => {
            let body = &body;
            let send = |id| paced(move || client.send_private(id, body));
            let Some((id, to, result)) = on_user(client, &to, send).await else {
                return false;
            };
            if let Ok(ack) = &result {
                lock(sent_log).sent(id, &to, ack.msg_id, body);
            }
            let mine = format!("you to {to} (private): {}", console::printable(body));
            sent(result, &format!(" to {to}"), "", history, &mine)
        }
        Command::Group { group, body } => {
            let result = paced(|| client.send_group(&group, &body)).await;
            if let Ok(ack) = &result
                && group != cim_proto::BROADCAST_GROUP
            {
                lock(sent_log).sent_in_group(&group, ack.msg_id, &body);
            }
            let mine = format!(
                "you [{}]: {}",
                console::printable(&group),
                console::printable(&body)
            );
            let alone = format!("no one else is in #{group}");
            sent(result, &format!(" to #{group}"), &alone, history, &mine)
        }
        Command::Search(words) => search(history, words).await,
        Command::Unsend(user) => unsend(client, history, sent_log, user).await,
        Command::Create {
            group,
            invite_only: false,
        } => report(
            client.create_group(&group).await,
            &format!("created #{group}"),
        ),
        Command::Create {
            group,
            invite_only: true,
        } => report(
            client.create_invite_only_group(&group).await,
            &format!("created #{group} (invite-only: :invite {group} <user> lets users in)"),
        ),
        Command::Invite { group, user } => {
            match on_user(client, &user, |id| client.invite(&group, id)).await {
                Some((_, user, result)) => report(result, &format!("invited {user} to #{group}")),
                None => false,
            }
        }
        Command::Owner { group, user } => {
            match on_user(client, &user, |id| client.transfer_group(&group, id)).await {
                Some((_, user, result)) => {
                    report(result, &format!("#{group} is owned by {user} now"))
                }
                None => false,
            }
        }
        Command::Remove { group, user } => match user_id(client, &user).await {
            Some((id, user)) => report(
                client.remove_member(&group, id).await,
                &format!("removed {user} from #{group} (or withdrew the invitation)"),
            ),
            None => false,
        },
        Command::Join(group) => {
            report(client.join_group(&group).await, &format!("joined #{group}"))
        }
        Command::Leave(group) => {
            report(client.leave_group(&group).await, &format!("left #{group}"))
        }
        Command::Members(group) => match client.group_members(&group).await {
            Ok(members) => {
                println!("#{group} members ({}):", members.len());
                for m in members {
                    let state = if m.online { "online" } else { "offline" };
                    let owner = if m.owner { " (owner)" } else { "" };
                    println!("  {} {} {state}{owner}", m.id, m.name);
                }
                true
            }
            Err(e) => report(Err(e), ""),
        },
        Command::Groups => match client.groups_and_invitations().await {
            Ok(mine) => {
                println!(
                    "your groups ({}): {}",
                    mine.groups.len(),
                    mine.groups.join(" ")
                );
                if !mine.invitations.is_empty() {
                    println!("{}", invitations_line(&mine.invitations));
                }
                true
            }
            Err(e) => report(Err(e), ""),
        },
        Command::Block(user) => {
            let Some((id, _, result)) = on_user(client, &user, |id| client.block(id)).await else {
                return false;
            };
            match result {
                Ok(reply) => {
                    let name = console::printable(&reply.name);
                    if reply.already_blocked {
                        println!("{name} ({id}) was blocked already");
                    } else {
                        println!(
                            "blocked {name} ({id}): their private messages and invitations are refused"
                        );
                    }
                    true
                }
                Err(e) => report(Err(e), ""),
            }
        }
        Command::Unblock(user) => {
            let Some((id, user)) = user_id(client, &user).await else {
                return false;
            };
            match client.unblock(id).await {
                Ok(true) => report(Ok(()), &format!("unblocked {user}")),
                Ok(false) => report(Ok(()), &format!("{user} was not blocked")),
                Err(e) => report(Err(e), ""),
            }
        }
        Command::LastSeen(change) => {
            let settings = match change {
                Some(hidden) => client.hide_last_seen(hidden).await,
                None => client.settings().await,
            };
            said(settings, last_seen_setting)
        }
        Command::Receipts(Some(hidden)) => {
            said(client.hide_read_receipts(hidden).await, receipts_setting)
        }
        Command::Receipts(None) => {
            let (settings, receipts) = tokio::join!(client.settings(), client.read_receipts());
            match (settings, receipts) {
                (Ok(settings), _) if settings.hide_read_receipts => {
                    println!("{}", receipts_setting(&settings));
                    true
                }
                (Ok(_), Ok(receipts)) => {
                    println!("read receipts ({}), the latest first:", receipts.len());
                    for r in receipts {
                        let at = console::date_time(r.read_at_ms);
                        let name = console::printable(&r.name);
                        println!("  {name} ({}) read your messages at {at} UTC", r.user_id);
                    }
                    true
                }
                (Err(e), _) | (_, Err(e)) => report(Err(e), ""),
            }
        }
        Command::Status(None) => {
            let me = client.info().name;
            match client.find_user(&me).await {
                Ok(Some(user)) => {
                    match user.status {
                        Some(status) => println!("your status: {}", console::printable(&status)),
                        None => println!("you have no status: :status <text> sets one"),
                    }
                    true
                }
                Ok(None) => report(
                    Err(ClientError::Protocol("your account is gone".into())),
                    "",
                ),
                Err(e) => report(Err(e), ""),
            }
        }
        Command::Status(Some(text)) => match client.set_status(&text).await {
            Ok(Some(status)) => {
                println!("your status: {}", console::printable(&status));
                true
            }
            Ok(None) => {
                println!("your status is cleared");
                true
            }
            Err(e) => report(Err(e), ""),
        },
        Command::Report { user, reason } => {
            let act = |id| client.report(id, &reason);
            match on_user(client, &user, act).await {
                Some((id, _, Ok(reply))) => {
                    let name = console::printable(&reply.name);
                    if reply.already_reported {
                        println!("you reported {name} ({id}) in the last day already");
                    } else {
                        println!("reported {name} ({id}) to the operators");
                    }
                    true
                }
                Some((_, _, Err(e))) => report(Err(e), ""),
                None => false,
            }
        }
        Command::Password { old, new } => match client.change_password(&old.0, &new.0).await {
            Err(ClientError::Http(why)) => {
                println!(
                    "! the password change got no clear answer ({why}): it may have been made; \
                     logging in with the new password tells"
                );
                false
            }
            changed => report(
                changed,
                "password changed: use the new one at your next login (this one stays)",
            ),
        },
        Command::Who(name) => match client.find_user(&name).await {
            Ok(Some(user)) => {
                let state = match (user.online, user.last_seen_ms) {
                    (true, _) => "online".to_string(),
                    (false, Some(at)) => {
                        format!("offline, last seen {} UTC", console::date_time(at))
                    }
                    (false, None) => "offline".to_string(),
                };
                let status = user.status.as_deref().map(console::printable);
                let status = status.map(|s| format!(": {s}")).unwrap_or_default();
                println!("{} ({}) is {state}{status}", user.name, user.id);
                true
            }
            Ok(None) => {
                println!("{}", no_such_name(&name));
                true
            }
            Err(e) => report(Err(e), ""),
        },
        Command::Blocked => match client.blocked_users().await {
            Ok(users) => {
                let listed: Vec<String> = users.iter().map(|u| named(&u.name, u.id)).collect();
                println!("you block ({}): {}", users.len(), listed.join(", "));
                true
            }
            Err(e) => report(Err(e), ""),
        },
        Command::OnlineUsers(prefix) => match client.online_page(&prefix, "", None).await {
            Ok(page) => {
                let more = if page.more {
                    "; more online: narrow it with :olu PREFIX"
                } else {
                    ""
                };
                if page.users.is_empty() {
                    // Only with a prefix: without one, this user is online.
                    println!(
                        "online users (0): no one whose name starts with \"{}\"",
                        console::printable(&prefix)
                    );
                    return true;
                }
                println!("online users ({}{more}):", page.users.len());
                for u in page.users {
                    println!("  {} {}", u.id, u.name);
                }
                true
            }
            Err(e) => report(Err(e), ""),
        },
        Command::Info => {
            let info = client.info();
            println!(
                "you are {} (id {}) on server {} at {}",
                info.name, info.user_id, info.server_id, info.server_addr
            );
            true
        }
        Command::Help => {
            println!("{}", console::HELP);
            true
        }
        // Done by the input loop (see `chat`), or by the input thread, which asks for the
        // passwords and passes the command their answers make (`stdin_commands`).
        Command::Nothing | Command::Quit | Command::DeleteAccount(_) | Command::Ask(_) => true,
        Command::Invalid(why) => {
            println!("! {why}");
            false
        }
    }
}

/// Prints the latest lines of `history` that contain `words`; returns whether it could.
async fn search(history: Option<&Arc<History>>, words: String) -> bool {
    let Some(history) = history.cloned() else {
        println!("! no message history is kept (see --history)");
        return false;
    };
    let asked = console::printable(&words);
    let found =
        tokio::task::spawn_blocking(move || history.search(&words, history::SHOWN_MATCHES)).await;
    match found {
        Ok(Ok(found)) if found.total == 0 => {
            println!("history: no line with \"{asked}\"");
            true
        }
        Ok(Ok(found)) => {
            let latest = if found.total > found.lines.len() {
                format!(", the latest {}", found.lines.len())
            } else {
                String::new()
            };
            println!("history: {} line(s) with \"{asked}\"{latest}:", found.total);
            for line in found.lines {
                println!("  {line}");
            }
            true
        }
        Ok(Err(e)) => {
            println!("! cannot read the message history: {e}");
            false
        }
        Err(e) => {
            println!("! cannot search the message history: {e}");
            false
        }
    }
}

/// Reports a failed send (`to` names its target), one stored for no one (`alone` says why),
/// or a private one whose recipient is offline; keeps a sent one (`mine`, as the history
/// shows it) in `history`; returns whether it was sent.
fn sent(
    result: Result<Ack, ClientError>,
    to: &str,
    alone: &str,
    history: Option<&Arc<History>>,
    mine: &str,
) -> bool {
    if result.is_ok() {
        keep(history, cim_core::now_ms(), mine);
    }
    match result {
        Ok(ack) if ack.recipient_online == Some(false) => {
            println!("(sent{to}, who is offline: it waits for their next login)");
            true
        }
        Ok(ack) if ack.recipients == 0 => {
            println!("(sent{to}, but {alone})");
            true
        }
        Ok(_) => true,
        Err(e) => {
            println!("! {}{to}: {e}", unsent(&e));
            false
        }
    }
}

/// Prints what `text` says of the settings, or the error; returns whether there was none.
fn said(
    settings: Result<cim_client::Settings, ClientError>,
    text: fn(&cim_client::Settings) -> &'static str,
) -> bool {
    match settings {
        Ok(settings) => {
            println!("{}", text(&settings));
            true
        }
        Err(e) => report(Err(e), ""),
    }
}

/// What the console says of the last seen setting.
fn last_seen_setting(settings: &cim_client::Settings) -> &'static str {
    if settings.hide_last_seen {
        "your last seen is hidden (and you see no one's): :lastseen show shows it"
    } else {
        "your last seen is shown to anyone who looks you up: :lastseen hide hides it"
    }
}

/// What the console says of the read receipts setting.
fn receipts_setting(settings: &cim_client::Settings) -> &'static str {
    if settings.hide_read_receipts {
        "you give no read receipts (and see no one's): :receipts show gives them again"
    } else {
        "you give read receipts (and see others'): :receipts hide stops them"
    }
}
