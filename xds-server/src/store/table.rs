//! One resource type's published resources: each kept encoded once, ready to be
//! copied into any client's response, with its version and aliases.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hasher};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use mesh_api::discovery::Resource;
use mesh_api::prost::Message;
use mesh_api::prost::encoding::{WireType, encode_key, encode_varint};
use mesh_api::prost_types::Any;

/// The field number of `resources` in `DeltaDiscoveryResponse`.
pub(crate) const RESOURCES_FIELD: u32 = 2;

/// A published resource.
#[derive(Debug)]
pub(crate) struct Entry {
    /// A hash of the resource's encoding: its version, stable across restarts,
    /// so a reconnecting client that already has it is not sent it again.
    pub(crate) hash: u64,
    /// The resource as field 2 of a `DeltaDiscoveryResponse` (key, length,
    /// `Resource` message): responses are assembled by concatenation.
    pub(crate) framed: Bytes,
    /// Other names the resource answers to (`"<network>/<ip>"`).
    pub(crate) aliases: Box<[Arc<str>]>,
}

impl Entry {
    /// The version string clients see.
    pub(crate) fn version(&self) -> String {
        version_string(self.hash)
    }
}

/// The version string of a hash.
pub(crate) fn version_string(hash: u64) -> String {
    format!("{hash:016x}")
}

/// Resources of one type by name, and an index of their aliases.
#[derive(Debug)]
pub(crate) struct Table {
    type_url: &'static str,
    entries: BTreeMap<Arc<str>, Entry>,
    aliases: HashMap<Arc<str>, Arc<str>>,
}

/// What an upsert did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Upserted {
    Unchanged,
    Changed,
}

impl Table {
    pub(crate) fn new(type_url: &'static str) -> Self {
        Self {
            type_url,
            entries: BTreeMap::new(),
            aliases: HashMap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The entry a client's name refers to: by resource name, else by alias.
    pub(crate) fn lookup(&self, name: &str) -> Option<(&Arc<str>, &Entry)> {
        if let Some(found) = self.entries.get_key_value(name) {
            return Some(found);
        }
        let canonical = self.aliases.get(name)?;
        self.entries.get_key_value(canonical.as_ref())
    }

    /// Entries after `cursor` (all when `None`), in name order.
    pub(crate) fn after<'a>(
        &'a self,
        cursor: Option<&'a str>,
    ) -> impl Iterator<Item = (&'a Arc<str>, &'a Entry)> + 'a {
        use std::ops::Bound;
        let start = match cursor {
            Some(name) => Bound::Excluded(name),
            None => Bound::Unbounded,
        };
        self.entries.range::<str, _>((start, Bound::Unbounded))
    }

    /// Publishes `value` (an encoded `Address` or `Authorization`) under `name`.
    pub(crate) fn upsert(&mut self, name: &str, value: Vec<u8>, aliases: Vec<String>) -> Upserted {
        let hash = {
            let mut hasher = DefaultHasher::new();
            hasher.write(&value);
            for alias in &aliases {
                hasher.write(alias.as_bytes());
                hasher.write_u8(0);
            }
            hasher.finish()
        };
        if self
            .entries
            .get(name)
            .is_some_and(|entry| entry.hash == hash)
        {
            return Upserted::Unchanged;
        }
        let resource = Resource {
            version: version_string(hash),
            resource: Some(Any {
                type_url: self.type_url.to_owned(),
                value,
            }),
            name: name.to_owned(),
            aliases: aliases.clone(),
        };
        let length = resource.encoded_len();
        let mut framed = BytesMut::with_capacity(length + 6);
        encode_key(RESOURCES_FIELD, WireType::LengthDelimited, &mut framed);
        encode_varint(length as u64, &mut framed);
        resource.encode_raw(&mut framed);

        let name: Arc<str> = match self.entries.get_key_value(name) {
            Some((existing, _)) => existing.clone(),
            None => name.into(),
        };
        let aliases: Box<[Arc<str>]> = aliases.into_iter().map(Arc::from).collect();
        if let Some(old) = self.entries.get(&name) {
            for alias in &old.aliases {
                if self.aliases.get(alias) == Some(&name) {
                    self.aliases.remove(alias);
                }
            }
        }
        for alias in &aliases {
            self.aliases.insert(alias.clone(), name.clone());
        }
        self.entries.insert(
            name,
            Entry {
                hash,
                framed: framed.freeze(),
                aliases,
            },
        );
        Upserted::Changed
    }

    /// Withdraws `name`; whether it was published.
    pub(crate) fn remove(&mut self, name: &str) -> bool {
        let Some((name, entry)) = self.entries.remove_entry(name) else {
            return false;
        };
        for alias in &entry.aliases {
            if self.aliases.get(alias) == Some(&name) {
                self.aliases.remove(alias);
            }
        }
        true
    }

    /// The name as stored (shared), for the change log.
    pub(crate) fn shared_name(&self, name: &str) -> Arc<str> {
        self.entries
            .get_key_value(name)
            .map_or_else(|| Arc::from(name), |(name, _)| name.clone())
    }
}
