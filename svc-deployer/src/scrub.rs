//! Defence in depth for every text the deployer puts in a failure reason or a log line:
//! the operation's secrets are cut out even if a node echoes them (a failing `tee` could
//! print its input), and so is anything that looks like a `.env` secret assignment.

use secrecy::{ExposeSecret, SecretString};

const MASK: &str = "[redacted]";
const SECRET_VARS: [&str; 2] = ["K2_NODE_SECRET", "K2_PRIVATE_CLAIM"];

/// Removes known secrets from texts.
#[derive(Default, Clone)]
pub struct Scrubber {
    secrets: Vec<SecretString>,
}

impl std::fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scrubber({} secrets)", self.secrets.len())
    }
}

impl Scrubber {
    pub fn add(&mut self, s: &SecretString) {
        // Very short strings would mask ordinary words; our secrets are long.
        if s.expose_secret().len() >= 6 {
            self.secrets.push(s.clone());
        }
    }

    pub fn clean(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            out = out.replace(s.expose_secret(), MASK);
        }
        for var in SECRET_VARS {
            out = mask_assignments(&out, var);
        }
        out
    }
}

/// `VAR=value` → `VAR=[redacted]`, wherever it appears.
fn mask_assignments(text: &str, var: &str) -> String {
    let pat = format!("{var}=");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(&pat) {
        out.push_str(&rest[..i + pat.len()]);
        rest = &rest[i + pat.len()..];
        let end = rest.find(|c: char| c.is_whitespace() || c == '|' || c == ',' || c == ';').unwrap_or(rest.len());
        if end > 0 {
            out.push_str(MASK);
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_assignments_are_masked() {
        let mut s = Scrubber::default();
        s.add(&SecretString::from("claim-XYZ-123"));
        s.add(&SecretString::from("ab"));
        let t = s.clean("tee: claim-XYZ-123: x | K2_NODE_SECRET=deadbeef more K2_PRIVATE_CLAIM= ab");
        assert_eq!(t, "tee: [redacted]: x | K2_NODE_SECRET=[redacted] more K2_PRIVATE_CLAIM= ab");
    }
}
