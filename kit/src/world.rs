//! What Center says about an operation, asked before anything terminal or destructive
//! (DESIGN.md "Safety rules"): activation is final, and only what is provably dead may be
//! deleted. Events are hints; this is the check against the world.

use crate::center::{Center, CenterError, OpFilter};

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
/// status: the node's self-registration is what activates it. When Center ignores the `id`
/// filter (the full list comes back), the operation is picked from the list by id; when it is
/// absent from that list too, the answer is `Unknown`, never `Failed`.
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
    let f = OpFilter { action: Some("provision".into()), status: None, id: Some(operation_id.to_string()) };
    let ops = match center.list_node_operations(&f).await {
        Ok(o) => o,
        Err(e) => return Activation::Unknown { why: format!("center: list_node_operations failed ({})", short(&e)) },
    };
    let Some(op) = ops.iter().find(|o| o.id == operation_id) else {
        return Activation::Unknown { why: format!("center: operation {operation_id} not listed") };
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
