//! Operation and subscription ids, parsed once at the edge: a value of these types is a valid
//! subject token (`subjects::is_token`), so it can go into a subject, a msg id or a sled key
//! without another check.

use crate::subjects;

/// An id that is not a subject token (empty, too long, or holding `.`, `*`, `>`, whitespace…).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadId {
    /// What was expected: "operation id" or "subscription id".
    pub what: &'static str,
}

impl std::fmt::Display for BadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not an {}", self.what)
    }
}

impl std::error::Error for BadId {}

macro_rules! token_id {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        ///
        /// Serialized as the plain string (`#[serde(transparent)]`: a record that held the id
        /// as a `String` reads and writes the same bytes). Deserializing does not check the
        /// token rule again: a state store holds ids its service parsed, or — in records
        /// written before this type — the ids it accepted then, which must still read.
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Checks `s` is a subject token (whitespace anywhere is refused).
            pub fn parse(s: &str) -> Result<$name, BadId> {
                if subjects::is_token(s) { Ok($name(s.to_string())) } else { Err(BadId { what: $what }) }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl std::str::FromStr for $name {
            type Err = BadId;
            fn from_str(s: &str) -> Result<$name, BadId> {
                $name::parse(s)
            }
        }
    };
}

token_id!(
    /// A Center operation id (`pn.op.<event>.<operationId>`'s last token).
    OpId,
    "operation id"
);
token_id!(
    /// A Center subscription id (the node is `pn-<subId>`).
    SubId,
    "subscription id"
);

impl OpId {
    /// The operation id a `pn.op.<event>.<operationId>` subject names, if it is a valid one.
    pub fn of_subject(subject: &str) -> Option<OpId> {
        subjects::op_id_of(subject).and_then(|s| OpId::parse(s).ok())
    }
}

impl SubId {
    /// `pn-<subId>`.
    pub fn node_name(&self) -> String {
        crate::node_name(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_subject_tokens_or_errors() {
        assert_eq!(OpId::parse("op-1").map(OpId::into_string), Ok("op-1".to_string()));
        for bad in ["", " op-1", "op-1\n", "a b", "pn.op.>", "op*", "a.b", &"x".repeat(129)] {
            assert_eq!(OpId::parse(bad), Err(BadId { what: "operation id" }), "{bad:?}");
            assert!(SubId::parse(bad).is_err());
        }
        assert_eq!(OpId::of_subject("pn.op.failed.op-9").map(|o| o.to_string()), Some("op-9".to_string()));
        assert_eq!(OpId::of_subject("pn.op.failed."), None);
        assert_eq!(SubId::parse("s_1").map(|s| s.node_name()), Ok("pn-s_1".to_string()));
        assert_eq!(OpId::parse("bad id").map_err(|e| e.to_string()), Err("not an operation id".to_string()));
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn ids_serialize_as_the_plain_string() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Was {
            operation_id: String,
            sub_id: String,
        }
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Now {
            operation_id: OpId,
            sub_id: SubId,
        }
        let old = r#"{"operation_id":"op-1","sub_id":"s_1"}"#;
        let now: Now = serde_json::from_str(old).unwrap();
        assert_eq!((now.operation_id.as_str(), now.sub_id.as_str()), ("op-1", "s_1"));
        assert_eq!(serde_json::to_string(&now).unwrap(), old);
        let was = Was { operation_id: "op-1".into(), sub_id: "s_1".into() };
        assert_eq!(serde_json::to_string(&was).unwrap(), old);
    }
}
