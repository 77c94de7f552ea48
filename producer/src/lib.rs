//! taskmill-producer: reads records, batches them, publishes them, and reports on jobs.
//!
//! Every command is a front door over the client library (`taskmill-client`): it turns its
//! flags into a typed [`taskmill_client::JobSpec`] or a job handle, calls the client, and
//! renders what comes back; exit codes come from the client's error kinds ([`error`]).
//!
//! # Layout
//! - [`Cli`] and [`run`]: the command line and its dispatch.
//! - [`cmd`]: one subcommand a file (`enqueue`, `status`, `wait`, `results`, `jobs`, `dlq`, `queues`,
//!   `workers`).
//! - [`sources`]: files, stdin and HTTP, streamed into one bounded channel.

pub mod cmd;
pub mod error;
pub mod mgmt;
pub mod out;
pub mod schedules;
pub mod sources;
pub mod web;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use taskmill_common::{config::ConnArgs, logging::LogFormat};

/// The producer's command line.
#[derive(Parser, Debug)]
#[command(
    name = "producer",
    version,
    about = "taskmill producer: enqueue jobs and follow them"
)]
pub struct Cli {
    /// Broker, Redis and namespace.
    #[command(flatten)]
    pub conn: ConnArgs,

    /// Log format on stderr (`RUST_LOG` sets the filter).
    #[arg(
        long,
        env = "TASKMILL_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true,
        help_heading = "Output"
    )]
    pub log_format: LogFormat,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Read records, batch them and publish them as a new job; prints the job id first.
    Enqueue(Box<cmd::enqueue::EnqueueArgs>),
    /// Show a job's state, counters and summary.
    Status(cmd::status::StatusArgs),
    /// Wait for a job to finish: exit 0 completed, 1 finished with batches not done, 3 on timeout.
    Wait(cmd::wait::WaitArgs),
    /// Print each batch's result.
    Results(cmd::results::ResultsArgs),
    /// List the namespace's jobs.
    Jobs(cmd::jobs::JobsArgs),
    /// Inspect, replay and purge dead letters.
    Dlq(cmd::dlq::DlqArgs),
    /// The namespace's queues: ready and unacked batches, consumers, rates (management API).
    Queues(cmd::queues::ViewArgs),
    /// The workers consuming the namespace's queues: connection, address, queue, prefetch.
    Workers(cmd::queues::ViewArgs),
    /// The tasks the live workers serve, with their parameters (the task catalog).
    Tasks(cmd::tasks::TasksArgs),
    /// Cancel a job: its batches not yet started are dropped unrun.
    Cancel(cmd::cancel::CancelArgs),
    /// Delete a finished (or cancelled) job and its results.
    Delete(cmd::cancel::DeleteArgs),
    /// Serve the web dashboard and its JSON API (jobs, dead letters, queues, workers).
    Dashboard(web::DashboardArgs),
    /// Remove a namespace: its queues, exchanges and Redis keys.
    Namespace(cmd::namespace::NamespaceArgs),
    /// Groups of jobs (`enqueue --group`): close one, with a follow-up over all its results.
    Group(cmd::group::GroupArgs),
    /// Periodic jobs: add, list, show, remove, pause and resume schedules.
    Schedule(cmd::schedule::ScheduleArgs),
    /// Run the namespace's schedules (several schedulers may run at once).
    Scheduler(cmd::schedule::SchedulerArgs),
}

/// The connection options each command uses; the others stay accepted (they can stand
/// before the command) but are left out of its `--help`.
const USES: &[(&str, &[&str])] = &[
    (
        "enqueue",
        &["amqp_url", "redis_url", "namespace", "result_ttl"],
    ),
    ("status", &["redis_url", "namespace"]),
    ("wait", &["redis_url", "namespace"]),
    ("results", &["redis_url", "namespace"]),
    ("jobs", &["redis_url", "namespace"]),
    ("dlq", &["amqp_url", "redis_url", "namespace"]),
    ("queues", &["rabbitmq_api_url", "namespace"]),
    ("workers", &["rabbitmq_api_url", "namespace"]),
    ("tasks", &["redis_url", "namespace"]),
    ("cancel", &["redis_url", "namespace"]),
    ("delete", &["redis_url", "namespace"]),
    ("namespace", &["redis_url", "rabbitmq_api_url"]),
    ("schedule", &["redis_url", "namespace"]),
    ("group", &["redis_url", "namespace"]),
    (
        "scheduler",
        &["amqp_url", "redis_url", "namespace", "result_ttl"],
    ),
    (
        "dashboard",
        &[
            "amqp_url",
            "redis_url",
            "rabbitmq_api_url",
            "namespace",
            "result_ttl",
        ],
    ),
];

/// The command line, with each command's `--help` showing the connection options it uses.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    let conn: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set() && a.get_help_heading() == Some("Connection"))
        .cloned()
        .collect();
    for (name, uses) in USES {
        cmd = cmd.mut_subcommand(name, |mut sc| {
            for a in &conn {
                let id = a.get_id().as_str();
                if id != "config" && !uses.contains(&id) {
                    // Present (so it is not propagated visible), parsed the same, not shown.
                    sc = sc.arg(a.clone().hide(true));
                }
            }
            sc
        });
    }
    cmd
}

/// Parses the process's command line (exits with clap's usage error, code 2, when wrong).
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let matches = command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let (Command::Enqueue(args), Some(("enqueue", m))) = (&mut cli.command, matches.subcommand())
    {
        args.follow.then_at = cmd::enqueue::ThenAt::from_matches(m);
    }
    if let (Command::Group(args), Some(("group", m))) = (&mut cli.command, matches.subcommand()) {
        let cmd::group::GroupAction::Close(c) = &mut args.action;
        if let Some(("close", m)) = m.subcommand() {
            c.follow.then_at = cmd::enqueue::ThenAt::from_matches(m);
        }
    }
    cli
}

/// A client for the command line's connection options.
pub async fn client(conn: &ConnArgs) -> anyhow::Result<taskmill_client::Client> {
    Ok(taskmill_client::Client::connect(conn.client_settings()).await?)
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    cli.conn.check().map_err(error::CliError::Usage)?;
    match &cli.command {
        Command::Enqueue(a) => cmd::enqueue::run(&cli.conn, a).await,
        Command::Status(a) => cmd::status::run(&cli.conn, a).await,
        Command::Wait(a) => cmd::wait::run(&cli.conn, a).await,
        Command::Results(a) => cmd::results::run(&cli.conn, a).await,
        Command::Jobs(a) => cmd::jobs::run(&cli.conn, a).await,
        Command::Dlq(a) => cmd::dlq::run(&cli.conn, a).await,
        Command::Queues(a) => cmd::queues::run_queues(&cli.conn, a).await,
        Command::Workers(a) => cmd::queues::run_workers(&cli.conn, a).await,
        Command::Tasks(a) => cmd::tasks::run(&cli.conn, a).await,
        Command::Cancel(a) => cmd::cancel::run_cancel(&cli.conn, a).await,
        Command::Delete(a) => cmd::cancel::run_delete(&cli.conn, a).await,
        Command::Dashboard(a) => web::run(&cli.conn, a).await,
        Command::Namespace(a) => cmd::namespace::run(&cli.conn, a).await,
        Command::Group(a) => cmd::group::run(&cli.conn, a).await,
        Command::Schedule(a) => cmd::schedule::run(&cli.conn, a).await,
        Command::Scheduler(a) => cmd::schedule::run_scheduler(&cli.conn, a).await,
    }
}
