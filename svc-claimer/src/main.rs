//! `svc-claimer`: see the library. Configured only by `PN_*`; the same code runs as `pnp svc-claimer`.

fn main() -> anyhow::Result<()> {
    svc_claimer::main_entry()
}
