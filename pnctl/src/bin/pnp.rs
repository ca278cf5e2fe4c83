//! `pnp`: the multi-call binary the image ships (see `pnctl::multicall`). `pnp svc-meter`, or a
//! link named `svc-meter`, runs svc-meter; `pnp --help` lists the programs.

fn main() -> std::process::ExitCode {
    pnctl::multicall::main_entry(std::env::args_os())
}
