//! `center-sim`: see the library. Prints `center-sim listening on http://ADDR` as its first
//! stdout line (scripts and tests read it), then serves until SIGTERM/Ctrl-C. The same code
//! runs as `pnp center-sim …`.

fn main() -> anyhow::Result<()> {
    center_sim::main_entry(std::env::args_os())
}
