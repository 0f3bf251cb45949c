//! `cim-client`: the console client. A plain line goes to everyone online, `userId;;text` is
//! private, `:olu` lists online users, `:q` quits; `:help` lists all commands.

use std::path::PathBuf;

use anyhow::Context;
use cim_client::console::{self, Command};
use cim_client::{Client, ClientConfig, ClientError, Event, LoginOptions};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, BufReader};

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
    /// Password.
    #[arg(long, env = "CIM_PASSWORD", hide_env_values = true)]
    password: String,
    /// Register the name first (an existing name is fine if the password matches).
    #[arg(long)]
    register: bool,
    /// If the user is online elsewhere, end that session instead of being refused.
    #[arg(long)]
    takeover: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let ca = std::fs::read(&args.ca)
        .with_context(|| format!("reading CA file {}", args.ca.display()))?;
    let config = ClientConfig::new(args.router.clone(), ca);
    if args.register {
        match cim_client::register(&config, &args.name, &args.password).await {
            Ok(id) => println!("registered {} with id {id}", args.name),
            Err(e) if e.code() == Some("name_taken") => {}
            Err(e) => return Err(e).context("registering"),
        }
    }
    let options = LoginOptions {
        takeover: args.takeover,
    };
    let (client, mut events) = Client::login(&config, &args.name, &args.password, options)
        .await
        .context("logging in")?;
    announce(&client);
    println!("type :help for commands");

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => {
                let line = match line {
                    Ok(Some(line)) => line,
                    // End of input: leave like :q.
                    Ok(None) | Err(_) => {
                        let _ = client.logout().await;
                        return Ok(());
                    }
                };
                match console::parse(&line) {
                    Command::Quit => {
                        if let Err(e) = client.logout().await {
                            eprintln!("! logout: {e}");
                        }
                        println!("bye");
                        return Ok(());
                    }
                    command => run(&client, command).await,
                }
            }
            event = events.next() => match event {
                Some(Event::Message(m)) => {
                    let kind = match &m.group {
                        Some(g) if g == "all" => String::new(),
                        Some(g) => format!(" [{g}]"),
                        None => " (private)".into(),
                    };
                    println!("[{}] {}{kind}: {}", console::time_of_day(m.created_at_ms), m.from_name, m.body);
                }
                Some(Event::Kicked(reason)) => {
                    println!("! session ended by server: {reason}");
                    return Ok(());
                }
                Some(Event::Drain(reason)) => {
                    println!("! server is draining ({reason}); moving to another server");
                }
                Some(Event::Disconnected(reason)) => {
                    println!("! connection lost ({reason}); reconnecting");
                }
                Some(Event::Presence { user_id, name, online }) => {
                    let state = if online { "online" } else { "offline" };
                    println!("* {name} ({user_id}) is {state}");
                }
                Some(Event::Reconnected(how)) => {
                    let how_text = if how.relogin { "logged in again" } else { "resumed" };
                    println!("reconnected ({how_text}) on server {}", how.server_id);
                }
                None => {
                    println!("! session ended");
                    return Ok(());
                }
            }
        }
    }
}

fn announce(client: &Client) {
    let info = client.info();
    println!(
        "logged in as {} (id {}) on server {} at {}",
        info.name, info.user_id, info.server_id, info.server_addr
    );
}

fn report(result: Result<(), ClientError>, done: &str) {
    match result {
        Ok(()) => println!("{done}"),
        Err(e) => println!("! {e}"),
    }
}

/// How to report a failed send.
fn unsent(e: &ClientError) -> &'static str {
    if e.send_outcome_unknown() {
        "not confirmed (it may still arrive)"
    } else {
        "not sent"
    }
}

/// Carries out one console command.
async fn run(client: &Client, command: Command) {
    match command {
        Command::Broadcast(body) => {
            if let Err(e) = client.send_group("all", &body).await {
                println!("! {}: {e}", unsent(&e));
            }
        }
        Command::Private { to, body } => {
            if let Err(e) = client.send_private(to, &body).await {
                println!("! {} to {to}: {e}", unsent(&e));
            }
        }
        Command::Group { group, body } => {
            if let Err(e) = client.send_group(&group, &body).await {
                println!("! {} to #{group}: {e}", unsent(&e));
            }
        }
        Command::Create(group) => report(
            client.create_group(&group).await,
            &format!("created #{group}"),
        ),
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
                    println!("  {} {} {state}", m.id, m.name);
                }
            }
            Err(e) => println!("! {e}"),
        },
        Command::Groups => match client.my_groups().await {
            Ok(groups) => println!("your groups ({}): {}", groups.len(), groups.join(" ")),
            Err(e) => println!("! {e}"),
        },
        Command::OnlineUsers(prefix) => match client.online_users(&prefix).await {
            Ok(users) => {
                println!("online users ({}):", users.len());
                for u in users {
                    println!("  {} {}", u.id, u.name);
                }
            }
            Err(e) => println!("! {e}"),
        },
        Command::Info => {
            let info = client.info();
            println!(
                "you are {} (id {}) on server {} at {}",
                info.name, info.user_id, info.server_id, info.server_addr
            );
        }
        Command::Help => println!("{}", console::HELP),
        Command::Nothing => {}
        Command::Invalid(why) => println!("! {why}"),
        Command::Quit => {}
    }
}
