//! pnctl: the operator's CLI (see `pnctl::cli`). The same code runs as `pnp pnctl …`.

fn main() -> std::process::ExitCode {
    pnctl::cli::main_entry(std::env::args_os())
}
