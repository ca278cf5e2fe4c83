//! pnctl's command line: parses arguments and hands each command to its module. It owns only
//! the argument grammar and the dispatch; it never implements a command itself.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::endpoints::Endpoints;
use crate::parse_duration;
use crate::stack::{self, UpOptions};

/// The operator's CLI for Pnp: the dev stack, the demo, and tools to read the pipeline.
#[derive(Debug, Parser)]
#[command(name = "pnctl", version)]
struct Cli {
    /// Where the dev stack keeps everything (stack.json, secrets, logs, NATS store, sled).
    #[arg(long, global = true, default_value = "./.pn")]
    data_dir: PathBuf,
    /// NATS URL (default: from <data-dir>/stack.json).
    #[arg(long, global = true)]
    nats_url: Option<String>,
    /// svc-meter's ingest/ledger URL (default: from stack.json).
    #[arg(long, global = true)]
    meter_url: Option<String>,
    /// center-sim's URL (default: from stack.json).
    #[arg(long, global = true)]
    center_url: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the dev stack (nats-server, center-sim, the five services) and supervise it.
    Up {
        /// Run the supervisor in the background; return once the stack is healthy.
        #[arg(long)]
        detach: bool,
        /// (internal) the background supervisor started by --detach.
        #[arg(long, hide = true)]
        daemon: bool,
        /// Fixed NATS port (default: a free one).
        #[arg(long)]
        nats_port: Option<u16>,
        /// Fixed center-sim port (default: a free one).
        #[arg(long)]
        center_port: Option<u16>,
        /// Fixed svc-meter ingest port (default: a free one).
        #[arg(long)]
        meter_port: Option<u16>,
        /// How long the stack may take to become healthy.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        ready_timeout: Duration,
        /// With --detach: print stack.json's content instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Stop the stack started by `pnctl up --detach` (or a foreground one) and wait for it.
    Down,
    /// Run the whole pipeline: enqueue intents, follow them to verified and metered nodes.
    Demo {
        /// How many intents to enqueue.
        #[arg(long, default_value_t = 5)]
        intents: usize,
        /// Print one JSON object instead of progress and a table.
        #[arg(long)]
        json: bool,
        /// Give up on unfinished operations after this long.
        #[arg(long, default_value = "180s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// One operation's history from PN_OPS, or one line per operation.
    Status {
        operation_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Follow the decoded live events (pn.op.>, meter.>, pn.replay.>).
    Tail {
        #[arg(long)]
        json: bool,
        /// Start from the beginning of the streams instead of now.
        #[arg(long)]
        all: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Decode one pn.v1.Event body from stdin to JSON (a `nats --translate` command).
    Decode {
        /// Indented JSON.
        #[arg(long)]
        pretty: bool,
    },
    /// Ask a stage (claim|cloud|deploy|verify) to re-run an operation from its state; its
    /// outcome is published again under a msg id of its own (`<msgId>.replay.<unix-ms>`), so a
    /// replay within JetStream's dedup window is not swallowed. There is no meter replay (the
    /// meter's ledger is the record: `pnctl ledger`); NATS refuses `pn.replay.meter`.
    Replay {
        stage: String,
        operation_id: String,
        #[arg(long)]
        json: bool,
    },
    /// A node's quota ledger at the meter.
    Ledger {
        node: String,
        #[arg(long)]
        json: bool,
    },
    /// VPSs svc-cloud's reaper kept because it could not prove them dead and ours: list them
    /// (`--pending`), or delete one after the same checks (`--confirm <operation>`).
    Reap {
        /// List the kept, uncertain reaps.
        #[arg(long, conflicts_with = "confirm", required_unless_present = "confirm")]
        pending: bool,
        /// Delete this operation's VPS if the checks allow it (overrides only the soft doubts).
        #[arg(long, value_name = "OPERATION")]
        confirm: Option<String>,
        #[arg(long)]
        json: bool,
        /// svc-cloud's ops URL (default: from stack.json).
        #[arg(long)]
        cloud_url: Option<String>,
    },
    /// Find, show and end operations: from PN_OPS and the services' own state (never logs).
    Ops {
        #[command(subcommand)]
        what: OpsCmd,
    },
    /// Print a shell completion script (bash, zsh, fish) to stdout.
    Completions {
        shell: clap_complete::Shell,
    },
    /// Benchmarks on a dev stack of their own: pipeline, footprint, meter (`pnctl bench --help`;
    /// runs the `pn-bench` binary next to pnctl with these arguments).
    #[command(disable_help_flag = true)]
    Bench {
        /// `pipeline|footprint|meter [options]`, as `pnctl bench --help` lists them.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
}

#[derive(Debug, Subcommand)]
enum OpsCmd {
    /// Operations a stage holds (`--all`: every one), with their stage, age and deadline, and
    /// what the services hold (running, parked, retrying).
    List {
        /// Only operations held by this stage (claim|cloud|deploy|verify) or done|failed.
        #[arg(long)]
        stage: Option<String>,
        /// Only operations held in a stage longer than that stage's deadline.
        #[arg(long)]
        stuck: bool,
        /// Only operations a service holds parked (waiting on the world).
        #[arg(long)]
        parked: bool,
        /// Only activated operations whose later check does not hold.
        #[arg(long)]
        degraded: bool,
        /// Also the finished ones (done, failed).
        #[arg(long)]
        all: bool,
        /// A stage's deadline, e.g. `verify=10m` (default: the services' settings' defaults).
        #[arg(long, value_name = "STAGE=DURATION", value_parser = crate::ops::parse_deadline)]
        deadline: Vec<(String, u64)>,
        /// A service's ops URL, e.g. `svc-cloud=http://127.0.0.1:9464` (default: stack.json,
        /// then `PN_OPS_URLS`).
        #[arg(long, value_name = "SERVICE=URL")]
        ops_url: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every event of one operation on PN_OPS, each stage's record, the reason.
    Show {
        operation_id: String,
        #[arg(long, value_name = "SERVICE=URL")]
        ops_url: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Fail an operation in flight at Center, through svc-claimer (refused once activated);
    /// its VPS then goes to svc-cloud's fail-safe reaper.
    Abandon {
        operation_id: String,
        /// Why (reported to Center, on the pn.op.failed event).
        #[arg(long)]
        reason: String,
        /// svc-claimer's ops URL (default: `--ops-url svc-claimer=…`, `PN_OPS_URLS`, stack.json).
        #[arg(long)]
        claimer_url: Option<String>,
        #[arg(long, value_name = "SERVICE=URL")]
        ops_url: Vec<String>,
        #[arg(long)]
        json: bool,
    },
}

/// The `pnctl` process: parses `args` (argv-shaped: the program name first; clap exits with
/// usage on bad arguments), then runs the command on a multi-thread runtime of its own — what
/// `#[tokio::main]` did — so that `main.rs` and the multi-call binary `pnp pnctl …` share it.
pub fn main_entry<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let matches = <Cli as clap::CommandFactory>::command().get_matches_from(args);
    // `bench` runs on a fresh temporary stack unless --data-dir was given on purpose.
    let data_dir_given = matches.value_source("data_dir") == Some(clap::parser::ValueSource::CommandLine);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    run_tool(run(cli, data_dir_given))
}

/// Runs a command-line tool's future on a multi-thread runtime of its own, with human logs
/// when `RUST_LOG` is set: an error is printed as `pnctl: …` and exits 1. pnctl and `pn-bench`
/// (which pnctl's `bench` runs) share it.
pub fn run_tool(fut: impl std::future::Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pnctl: start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        if std::env::var_os("RUST_LOG").is_some() {
            kit::telemetry::init(kit::config::LogFormat::Human);
        }
        kit::init_crypto();
        match fut.await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("pnctl: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn run(cli: Cli, data_dir_given: bool) -> anyhow::Result<ExitCode> {
    let ep = || Endpoints::resolve(&cli.data_dir, cli.nats_url.clone(), cli.meter_url.clone(), cli.center_url.clone());
    match &cli.cmd {
        Cmd::Up { detach, daemon, nats_port, center_port, meter_port, ready_timeout, json } => {
            let opts = UpOptions {
                data_dir: cli.data_dir.clone(),
                nats_port: *nats_port,
                center_port: *center_port,
                meter_port: *meter_port,
                ready_timeout: *ready_timeout,
            };
            if *daemon {
                stack::become_daemon();
                stack::up(&opts, stack::stop_signal()).await?;
            } else if *detach {
                let d = stack::up_detached(&opts).await?;
                if *json {
                    println!("{}", serde_json::to_string(&d.stack)?);
                    return Ok(ExitCode::SUCCESS);
                }
                println!("Pnp dev stack is up in the background (supervisor pid {}):", d.stack.supervisor_pid);
                for l in stack::summary_lines(&d.stack) {
                    println!("{l}");
                }
                println!("Stop it with `pnctl down`.");
            } else {
                stack::up(&opts, stack::stop_signal()).await?;
            }
        }
        Cmd::Down => println!("{}", stack::down(&cli.data_dir).await?),
        Cmd::Demo { intents, json, timeout } => {
            let opts = crate::demo::DemoOptions {
                intents: *intents,
                json: *json,
                timeout: *timeout,
                up: UpOptions::new(cli.data_dir.clone()),
            };
            let report = crate::demo::run(&opts).await?;
            if *json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("{}", crate::demo::table(&report));
            }
            if !report.all_ok() {
                for o in report.operations.iter().filter(|o| o.error.is_some()) {
                    eprintln!("pnctl: {} failed: {}", o.operation_id, o.error.as_deref().unwrap_or(""));
                }
                return Ok(ExitCode::FAILURE);
            }
        }
        Cmd::Status { operation_id, json } => match operation_id {
            Some(op) => crate::status::one(&ep(), op, *json).await?,
            None => crate::status::all(&ep(), *json).await?,
        },
        Cmd::Tail { json, all, count } => {
            let opts = crate::tail::TailOptions { all: *all, count: *count, json: *json };
            crate::tail::run(&ep(), &opts).await?
        }
        Cmd::Decode { pretty } => println!("{}", crate::decode::decode(std::io::stdin().lock(), *pretty)?),
        Cmd::Replay { stage, operation_id, json } => crate::replay::run(&ep(), stage, operation_id, *json).await?,
        Cmd::Ledger { node, json } => crate::ledger::run(&ep(), node, *json).await?,
        Cmd::Reap { pending: _, confirm, json, cloud_url } => {
            let cmd = match confirm {
                Some(op) => crate::reap::ReapCmd::Confirm(op.clone()),
                None => crate::reap::ReapCmd::Pending,
            };
            return crate::reap::run(&cli.data_dir, cloud_url.clone(), &cmd, *json).await;
        }
        Cmd::Ops { what } => {
            return match what {
                OpsCmd::List { stage, stuck, parked, degraded, all, deadline, ops_url, json } => {
                    let opts = crate::ops::ListOptions {
                        stage: stage.clone(),
                        stuck: *stuck,
                        parked: *parked,
                        degraded: *degraded,
                        all: *all,
                        json: *json,
                        deadlines: deadline.clone(),
                        ops_urls: ops_url.clone(),
                    };
                    crate::ops::list(&ep(), &opts).await
                }
                OpsCmd::Show { operation_id, ops_url, json } => crate::ops::show(&ep(), operation_id, ops_url, *json).await,
                OpsCmd::Abandon { operation_id, reason, claimer_url, ops_url, json } => {
                    let base = crate::ops::claimer_url(&cli.data_dir, claimer_url.clone(), ops_url)?;
                    crate::ops::abandon(&base, operation_id, reason, crate::endpoints::ops_token(&cli.data_dir), *json).await
                }
            };
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "pnctl", &mut std::io::stdout());
        }
        Cmd::Bench { args } => {
            // The benchmarks live in their own crate (pn-bench), which starts services in
            // process; pnctl hands the whole command over to its binary and becomes it.
            use std::os::unix::process::CommandExt;
            let bin = stack::find_bin("pn-bench")?;
            let mut cmd = std::process::Command::new(&bin);
            cmd.arg0("pnctl bench");
            if data_dir_given {
                cmd.arg("--data-dir").arg(&cli.data_dir);
            }
            let err = cmd.args(args).exec();
            anyhow::bail!("run {}: {err}", bin.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
