//! `svc-cloud`: see the library. Configured only by `PN_*`; the same code runs as `pnp svc-cloud`.

fn main() -> anyhow::Result<()> {
    svc_cloud::main_entry()
}
