//! `pn-ingress`: the dev stack's ingress at Center's host (see `center_sim::ingress`). Prints
//! `pn-ingress listening on http://ADDR` as its first stdout line, then serves until
//! SIGTERM/Ctrl-C.

fn main() -> anyhow::Result<()> {
    center_sim::ingress::main_entry(std::env::args_os())
}
