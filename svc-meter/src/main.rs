//! svc-meter: usage ingest, quota ledger and the 95 % cutoff. Configured only by `PN_*`.

fn main() -> anyhow::Result<()> {
    svc_meter::main_entry()
}
