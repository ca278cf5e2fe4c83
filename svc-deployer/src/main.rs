//! `svc-deployer`: see the library. Configured only by `PN_*`; the same code runs as `pnp svc-deployer`.

fn main() -> anyhow::Result<()> {
    svc_deployer::main_entry()
}
