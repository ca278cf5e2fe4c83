//! `pnp`, the multi-call binary of the image (its own bin-only crate, so that pnctl depends on
//! no service): every Pnp program (the five services, center-sim,
//! pnctl) in one executable, so tokio, async-nats, sled, russh, reqwest/rustls and axum are
//! linked once instead of seven times (issue #11, image ≤ 30 MiB).
//!
//! It picks the program by the file name it was called by (a link `svc-meter → pnp` runs
//! svc-meter, like busybox), otherwise by its first argument (`pnp svc-meter`), and hands the
//! rest to that program's own entry point unchanged. It owns only that choice: it never parses
//! a program's arguments or environment, and a program run through it behaves exactly like its
//! own binary (same configuration, output, errors and exit status).

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::ExitCode;

/// A program `pnp` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Program {
    SvcClaimer,
    SvcCloud,
    SvcDeployer,
    SvcVerifier,
    SvcMeter,
    CenterSim,
    Pnctl,
}

/// Every program with its name (= its own binary's name) and a one-line description.
pub const PROGRAMS: [(Program, &str, &str); 7] = [
    (Program::SvcClaimer, "svc-claimer", "claims queued node operations at Center (PN_* environment)"),
    (Program::SvcCloud, "svc-cloud", "creates the VPS of a claimed operation (PN_* environment)"),
    (Program::SvcDeployer, "svc-deployer", "prepares the VPS and deploys the node over SSH (PN_* environment)"),
    (Program::SvcVerifier, "svc-verifier", "verifies a deployed node end to end (PN_* environment)"),
    (Program::SvcMeter, "svc-meter", "usage ingest, quota ledger and cutoff (PN_* environment)"),
    (Program::CenterSim, "center-sim", "simulator of Center, a cloud and its nodes (flags: center-sim --help)"),
    (Program::Pnctl, "pnctl", "the operator's CLI (pnctl --help)"),
];

/// The name the multi-call binary itself goes by.
pub const NAME: &str = "pnp";

impl Program {
    pub fn from_name(name: &str) -> Option<Program> {
        PROGRAMS.iter().find(|(_, n, _)| *n == name).map(|(p, _, _)| *p)
    }

    pub fn name(self) -> &'static str {
        PROGRAMS.iter().find(|(p, _, _)| *p == self).map(|(_, n, _)| *n).unwrap_or(NAME)
    }
}

/// What an invocation of `pnp` asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run `program` with `args` (argv-shaped: the program's name first, then its arguments).
    Run { program: Program, args: Vec<OsString> },
    /// `pnp --help` / `pnp help` / `pnp -h`: usage on stdout, success.
    Help,
    /// `pnp --version` / `pnp -V`.
    Version,
    /// `pnp` with no program: usage on stderr, exit 2 (like a missing clap subcommand).
    Missing,
    /// An argument that names no program: a message on stderr, exit 2.
    Unknown(String),
}

/// Decides what to run from the full argv (argv[0] included). Never fails: anything it does not
/// understand is `Unknown`/`Missing`, which the caller reports.
pub fn resolve(argv: Vec<OsString>) -> Invocation {
    let mut it = argv.into_iter();
    let argv0 = it.next().unwrap_or_default();
    // Called through a link (or a copy) named after a program: that program, every argument
    // its own. argv[0] keeps its path; clap takes only the file name for its usage lines.
    if let Some(program) = Path::new(&argv0).file_name().and_then(OsStr::to_str).and_then(Program::from_name) {
        return Invocation::Run { program, args: std::iter::once(argv0).chain(it).collect() };
    }
    let Some(first) = it.next() else { return Invocation::Missing };
    match first.to_str() {
        Some("--help" | "-h" | "help") => Invocation::Help,
        Some("--version" | "-V") => Invocation::Version,
        Some(name) => match Program::from_name(name) {
            Some(program) => Invocation::Run { program, args: std::iter::once(first).chain(it).collect() },
            None => Invocation::Unknown(name.to_string()),
        },
        None => Invocation::Unknown(first.to_string_lossy().into_owned()),
    }
}

/// The usage text `pnp --help` prints.
pub fn usage() -> String {
    let mut s = format!(
        "{NAME} {}: every Pnp program in one binary.\n\n\
         Usage: {NAME} <program> [args...]\n   \
         or: <program> [args...]  (a link named after the program: ln -s {NAME} svc-meter)\n\n\
         Programs:\n",
        env!("CARGO_PKG_VERSION")
    );
    for (_, name, what) in PROGRAMS {
        s.push_str(&format!("  {name:<14}{what}\n"));
    }
    s.push_str("\nThe services read only PN_* environment variables; their arguments are ignored, as with their own binaries.\n");
    s
}

/// Runs `program` with argv-shaped `args` and returns its exit status. A service or center-sim
/// error is reported as its own binary's `main` would (`Error: {:?}` on stderr, status 1).
pub fn run(program: Program, args: Vec<OsString>) -> ExitCode {
    let result = match program {
        Program::SvcClaimer => svc_claimer::main_entry(),
        Program::SvcCloud => svc_cloud::main_entry(),
        Program::SvcDeployer => svc_deployer::main_entry(),
        Program::SvcVerifier => svc_verifier::main_entry(),
        Program::SvcMeter => svc_meter::main_entry(),
        Program::CenterSim => center_sim::main_entry(args),
        Program::Pnctl => return pnctl::cli::main_entry(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::FAILURE
        }
    }
}

/// `pnp`'s `main`: resolve, then run, or explain.
fn main() -> ExitCode {
    let argv = std::env::args_os();
    let names = || PROGRAMS.iter().map(|(_, n, _)| *n).collect::<Vec<_>>().join(", ");
    match resolve(argv.collect()) {
        Invocation::Run { program, args } => run(program, args),
        Invocation::Help => {
            print!("{}", usage());
            ExitCode::SUCCESS
        }
        Invocation::Version => {
            println!("{NAME} {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Invocation::Missing => {
            eprint!("{NAME}: which program? ({})\n\n{}", names(), usage());
            ExitCode::from(2)
        }
        Invocation::Unknown(name) => {
            eprintln!("{NAME}: unknown program {name:?}: expected one of {}; see `{NAME} --help`", names());
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn the_first_argument_picks_the_program_and_the_rest_is_its_own() {
        assert_eq!(
            resolve(argv(&["/usr/local/bin/pnp", "center-sim", "--listen", "127.0.0.1:0"])),
            Invocation::Run { program: Program::CenterSim, args: argv(&["center-sim", "--listen", "127.0.0.1:0"]) }
        );
        assert_eq!(resolve(argv(&["pnp", "svc-meter"])), Invocation::Run { program: Program::SvcMeter, args: argv(&["svc-meter"]) });
        // A program name after the program is that program's argument, not a second dispatch.
        assert_eq!(
            resolve(argv(&["pnp", "pnctl", "svc-meter"])),
            Invocation::Run { program: Program::Pnctl, args: argv(&["pnctl", "svc-meter"]) }
        );
    }

    #[test]
    fn a_link_named_after_a_program_runs_it_with_every_argument() {
        assert_eq!(
            resolve(argv(&["/opt/bin/svc-claimer"])),
            Invocation::Run { program: Program::SvcClaimer, args: argv(&["/opt/bin/svc-claimer"]) }
        );
        // `pnctl --help` through a link is pnctl's help, not pnp's.
        assert_eq!(resolve(argv(&["pnctl", "--help"])), Invocation::Run { program: Program::Pnctl, args: argv(&["pnctl", "--help"]) });
    }

    /// pnctl (which depends on no service) knows each stage's default deadline by value; these
    /// are the services' own defaults.
    #[test]
    fn pnctls_stage_deadlines_are_the_services_defaults() {
        let d = pnctl::ops::default_deadlines();
        assert_eq!(d["claim"], u64::from(svc_claimer::Settings::default().lease_seconds) * 1000);
        assert_eq!(d["cloud"], svc_cloud::Settings::default().boot_timeout_ms);
        let ssh = svc_deployer::Settings::default().ssh;
        assert_eq!(d["deploy"], ssh.reach_patience_ms + ssh.prep_timeout_ms + ssh.outside_check_patience_ms);
        assert_eq!(d["verify"], svc_verifier::Settings::default().deadline_ms);
        assert_eq!(d.len(), pnctl::ops::STAGES.len());
    }

    #[test]
    fn help_version_nothing_and_unknown_names() {
        assert_eq!(resolve(argv(&["pnp", "--help"])), Invocation::Help);
        assert_eq!(resolve(argv(&["pnp", "help"])), Invocation::Help);
        assert_eq!(resolve(argv(&["pnp", "-V"])), Invocation::Version);
        assert_eq!(resolve(argv(&["pnp"])), Invocation::Missing);
        assert_eq!(resolve(argv(&[])), Invocation::Missing);
        assert_eq!(resolve(argv(&["pnp", "nope"])), Invocation::Unknown("nope".into()));
        // A renamed multi-call binary still dispatches on its first argument.
        assert_eq!(resolve(argv(&["./pnp-0.1", "svc-cloud"])), Invocation::Run { program: Program::SvcCloud, args: argv(&["svc-cloud"]) });
        // No prefix or suffix matching: `svc` is not a program.
        assert_eq!(resolve(argv(&["pnp", "svc"])), Invocation::Unknown("svc".into()));
        for (p, name, _) in PROGRAMS {
            assert_eq!(Program::from_name(name), Some(p));
            assert_eq!(p.name(), name);
            assert!(usage().contains(name));
        }
    }
}
