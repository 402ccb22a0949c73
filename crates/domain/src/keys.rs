//! Where the lobby's keys are: the plain layout, or the cluster layout that
//! puts each id in a hash tag so that every key a cascade step touches lies
//! in one Redis Cluster slot.

use std::fmt;
use std::str::FromStr;

/// How the lobby's keys are named.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum KeyLayout {
    /// `<prefix>:game:<id>`, `<prefix>:user:<id>:games`: standalone Redis
    /// and Sentinel (the default).
    #[default]
    Plain,
    /// `<prefix>:game:{<id>}`, `<prefix>:user:{<id>}:games`: a game's keys
    /// share one slot, and a user's keys another.
    Cluster,
}

/// A layout name that is neither `plain` nor `cluster`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown key layout {0:?}: use plain or cluster")]
pub struct ParseKeyLayoutError(pub String);

impl KeyLayout {
    /// The layout's name, as `--key-layout` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Cluster => "cluster",
        }
    }

    /// What an id is wrapped in within a key: nothing, or a hash tag.
    fn tag(self) -> (&'static str, &'static str) {
        match self {
            Self::Plain => ("", ""),
            Self::Cluster => ("{", "}"),
        }
    }

    /// The hash of game `game_id` (`<prefix>:game:<id>`); its sets append
    /// `:members`, `:applicants`, `:invitees` and `:dropped` to it.
    pub fn game_key(self, prefix: &str, game_id: &str) -> String {
        let (open, close) = self.tag();
        format!("{prefix}:game:{open}{game_id}{close}")
    }

    /// [`KeyLayout::game_key`] of an id as stored (any bytes).
    pub fn game_key_bytes(self, prefix: &str, game_id: &[u8]) -> Vec<u8> {
        let (open, close) = self.tag();
        [
            prefix.as_bytes(),
            b":game:",
            open.as_bytes(),
            game_id,
            close.as_bytes(),
        ]
        .concat()
    }

    /// The user's key named `what` (`games`: the index, `cascade`: the
    /// record).
    pub fn user_key(self, prefix: &str, user_id: &str, what: &str) -> String {
        let (open, close) = self.tag();
        format!("{prefix}:user:{open}{user_id}{close}:{what}")
    }

    /// Whether the keys of an id (a game's, or a user's) lie in one slot
    /// in this layout: always in the plain layout (one server); in the
    /// cluster layout unless the id is empty or starts with `}`, which
    /// makes an empty hash tag, which Redis ignores, so that each key would
    /// hash whole and apart.
    pub fn holds_id(self, id: &[u8]) -> bool {
        self == Self::Plain || !(id.is_empty() || id.starts_with(b"}"))
    }
}

impl fmt::Display for KeyLayout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyLayout {
    type Err = ParseKeyLayoutError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "plain" => Ok(Self::Plain),
            "cluster" => Ok(Self::Cluster),
            other => Err(ParseKeyLayoutError(other.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_layout_names_the_documented_keys() {
        let plain = KeyLayout::Plain;
        assert_eq!(plain.game_key("lobby", "g1"), "lobby:game:g1");
        assert_eq!(
            plain.user_key("lobby", "u1", "games"),
            "lobby:user:u1:games"
        );
        let cluster = KeyLayout::Cluster;
        assert_eq!(cluster.game_key("lobby", "g1"), "lobby:game:{g1}");
        assert_eq!(
            cluster.user_key("lobby", "u1", "cascade"),
            "lobby:user:{u1}:cascade"
        );
        assert_eq!(KeyLayout::default(), plain);
        for layout in [plain, cluster] {
            assert_eq!(
                layout.game_key_bytes("lobby", b"g1"),
                layout.game_key("lobby", "g1").into_bytes()
            );
        }
    }

    #[test]
    fn names_round_trip_and_others_are_refused() {
        for layout in [KeyLayout::Plain, KeyLayout::Cluster] {
            assert_eq!(layout.as_str().parse(), Ok(layout));
            assert_eq!(layout.to_string(), layout.as_str());
        }
        let err = "Cluster".parse::<KeyLayout>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown key layout \"Cluster\": use plain or cluster"
        );
    }

    #[test]
    fn an_id_making_an_empty_hash_tag_has_no_slot_of_its_own_in_the_cluster_layout() {
        for id in [&b""[..], b"}", b"}g"] {
            assert!(KeyLayout::Plain.holds_id(id));
            assert!(!KeyLayout::Cluster.holds_id(id), "{id:?}");
        }
        for id in [&b"g"[..], b"g}", b"{g}", b"g{"] {
            assert!(KeyLayout::Cluster.holds_id(id), "{id:?}");
        }
    }
}
