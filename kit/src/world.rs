//! What Center says about an operation, asked before anything terminal or destructive
//! (DESIGN.md "Safety rules"): activation is final, and only what is provably dead may be
//! deleted. Events are hints; this is the check against the world.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::center::{Center, CenterError, NodeOperation, OpFilter};

/// Set once Center was seen ignoring `list_node_operations`' `id` filter (its answer held other
/// operations): from then on this process finds an operation by listing it with its status.
static ID_FILTER_IGNORED: AtomicBool = AtomicBool::new(false);

/// The statuses an operation may have, in the order a status-listing looks: the short lists of
/// work in flight first, then the terminal ones (which grow with history).
pub const STATUS_ORDER: [&str; 5] = ["queued", "claimed", "in_progress", "failed", "done"];

/// Center's record of one provision operation, or `None` when Center does not list it.
///
/// First asked with the `id` filter (`list_node_operations(action=provision, id)`), paged only
/// until another operation shows up. An answer holding any other operation means Center
/// ignores the filter:
/// that is counted (`pn_center_id_filter_ignored_total`), warned about once, remembered for
/// the process, and the operation is found the runbook's way instead — one
/// `list_node_operations(action=provision, status=S)` per status in `statuses` (each paged
/// only until the operation shows up). Statuses move on between two listings, so a miss is a
/// `None` (the caller concludes nothing), never a wrong status.
pub async fn find_operation(center: &dyn Center, operation_id: &str, statuses: &[&str]) -> Result<Option<NodeOperation>, CenterError> {
    if !ID_FILTER_IGNORED.load(Ordering::Relaxed) {
        let f = OpFilter { action: Some("provision".into()), status: None, id: Some(operation_id.to_string()) };
        // Paged until another operation shows up (then the filter is ignored) or the list ends.
        let stop = |o: &NodeOperation| o.id != operation_id;
        let listed = center.list_node_operations_until(&f, &stop).await?;
        let ours = listed.iter().find(|o| o.id == operation_id).cloned();
        if listed.iter().all(|o| o.id == operation_id) {
            return Ok(ours);
        }
        if !ID_FILTER_IGNORED.swap(true, Ordering::Relaxed) {
            tracing::warn!("center ignores list_node_operations' id filter; operations are found by listing their status");
        }
        metrics::counter!("pn_center_id_filter_ignored_total").increment(1);
        if ours.is_some() {
            return Ok(ours);
        }
    }
    for status in statuses {
        let f = OpFilter { action: Some("provision".into()), status: Some(status.to_string()), id: None };
        let stop = |o: &NodeOperation| o.id == operation_id;
        let listed = center.list_node_operations_until(&f, &stop).await?;
        if let Some(o) = listed.into_iter().find(|o| o.id == operation_id) {
            return Ok(Some(o));
        }
    }
    Ok(None)
}

/// Whether this process has seen Center ignore the `id` filter.
pub fn id_filter_ignored() -> bool {
    ID_FILTER_IGNORED.load(Ordering::Relaxed)
}

/// Center's view of one provision and its node.
#[derive(Debug, Clone, PartialEq)]
pub enum Activation {
    /// The operation is `done`, or a node `pn-<subId>` is registered: final, never undone by Pnp.
    Active { why: String },
    /// Center failed the operation and no node of that name is registered.
    Failed { error: String },
    /// `queued`, `claimed` or `in_progress` (possibly under a newer claim attempt): someone is
    /// working on it.
    InFlight { status: String },
    /// Center could not be asked, or does not know the operation: nothing may be concluded.
    Unknown { why: String },
}

impl Activation {
    pub fn is_active(&self) -> bool {
        matches!(self, Activation::Active { .. })
    }
}

/// Asks Center for the operation's status and for a registered node named `node_name`
/// (`pn-<subId>`). A node that is registered with the claim (class `private`) wins over any
/// status: the node's self-registration is what activates it. The operation is found with
/// `find_operation` (the `id` filter, or its status when Center ignores the filter); when it
/// is not found, the answer is `Unknown`, never `Failed`.
pub async fn activation(center: &dyn Center, operation_id: &str, node_name: &str) -> Activation {
    let nodes = match center.list_nodes(Some(node_name)).await {
        Ok(n) => n,
        Err(e) => return Activation::Unknown { why: format!("center: list_nodes failed ({})", short(&e)) },
    };
    let named: Vec<_> = nodes.iter().filter(|n| n.name == node_name).collect();
    // Registered *with the claim*: Center flips the node's class to private (runbook 000). A
    // node of that name registered as another class (the claim never reached its sidecar)
    // activated nothing; a Center that names no class is taken at its word that it is registered.
    if named.iter().any(|n| n.class.is_empty() || n.class.eq_ignore_ascii_case("private")) {
        return Activation::Active { why: format!("{node_name} is registered at Center") };
    }
    let unclaimed = named.first().map(|n| n.class.clone());
    let op = match find_operation(center, operation_id, &STATUS_ORDER).await {
        Ok(Some(o)) => o,
        Ok(None) => return Activation::Unknown { why: format!("center: operation {operation_id} not listed") },
        Err(e) => return Activation::Unknown { why: format!("center: list_node_operations failed ({})", short(&e)) },
    };
    match op.status.as_str() {
        "done" => Activation::Active { why: "operation is done at Center".into() },
        // Failed, yet a node of that name is registered (without the claim): not provably dead.
        "failed" if unclaimed.is_some() => Activation::Unknown {
            why: format!("center: operation failed, but {node_name} is registered (class {:?}, without the claim)", unclaimed.unwrap_or_default()),
        },
        "failed" => Activation::Failed { error: op.error.clone().unwrap_or_default().chars().take(160).collect() },
        "queued" | "claimed" | "in_progress" => Activation::InFlight { status: op.status.clone() },
        other => Activation::Unknown { why: format!("center: operation status {other:?} not understood") },
    }
}

fn short(e: &CenterError) -> String {
    e.to_string().chars().take(160).collect()
}
