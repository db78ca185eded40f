//! The short names memplacectl prints for the API's enums (`bind`, `guest-memfd`,
//! `region-created`), and, with the `serde` feature, the `serialize_with` functions that give the
//! generated messages that shape (see build.rs).

use crate::v1 as pb;

/// `BACKEND_GUEST_MEMFD` with prefix `BACKEND_` → `guest-memfd`.
pub fn enum_name(proto_name: &str, prefix: &str) -> String {
    proto_name
        .trim_start_matches(prefix)
        .to_ascii_lowercase()
        .replace('_', "-")
}

/// A policy mode's short name (`preferred-many`); an unknown value prints as `mode-N`.
pub fn mode_name(mode: i32) -> String {
    pb::PolicyMode::try_from(mode)
        .map(|m| enum_name(m.as_str_name(), "POLICY_MODE_"))
        .unwrap_or_else(|_| format!("mode-{mode}"))
}

/// Node or CPU ids in the numactl list form, `0-3,5` (ids from 1024 up print as a plain list).
pub fn node_list(ids: &[u32]) -> String {
    if ids.iter().any(|i| *i >= 1024) {
        return format!("{ids:?}");
    }
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        while i + 1 < ids.len() && ids[i + 1] == ids[i] + 1 {
            i += 1;
        }
        out.push(if start == ids[i] {
            start.to_string()
        } else {
            format!("{start}-{}", ids[i])
        });
        i += 1;
    }
    out.join(",")
}

/// The `serialize_with` functions build.rs names.
#[cfg(feature = "serde")]
pub(crate) mod ser {
    use super::{enum_name, pb};
    use serde::Serializer;

    macro_rules! enum_serializer {
        ($name:ident, $ty:ty, $prefix:literal) => {
            pub(crate) fn $name<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
                let name = <$ty>::try_from(*v).unwrap_or_default().as_str_name();
                s.serialize_str(&enum_name(name, $prefix))
            }
        };
    }
    enum_serializer!(backend, pb::Backend, "BACKEND_");
    enum_serializer!(strategy, pb::Strategy, "STRATEGY_");
    enum_serializer!(region_status, pb::RegionStatus, "REGION_STATUS_");
    enum_serializer!(range_state, pb::RangeState, "RANGE_STATE_");
    enum_serializer!(governs, pb::Governs, "GOVERNS_");
    enum_serializer!(event_kind, pb::EventKind, "EVENT_KIND_");

    pub(crate) fn policy_mode<S: Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::mode_name(*v))
    }

    pub(crate) fn node_list<S: Serializer>(v: &[u32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::node_list(v))
    }

    /// `true`, `false`, or `"unknown"` when the agent could not tell.
    pub(crate) fn bool_or_unknown<S: Serializer>(
        v: &Option<bool>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_bool(*b),
            None => s.serialize_str("unknown"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short() {
        assert_eq!(enum_name("BACKEND_GUEST_MEMFD", "BACKEND_"), "guest-memfd");
        assert_eq!(
            mode_name(pb::PolicyMode::PreferredMany as i32),
            "preferred-many"
        );
        assert_eq!(mode_name(99), "mode-99");
        assert_eq!(node_list(&[5, 0, 1, 2]), "0-2,5");
        assert_eq!(node_list(&[]), "");
    }
}
