//! `svc-verifier`: see the library. Configured only by `PN_*`; the same code runs as `pnp svc-verifier`.

fn main() -> anyhow::Result<()> {
    svc_verifier::main_entry()
}
